"""Semantic cache: centers, calibrated thresholds (offline) and the online decisions and feedback."""

import threading

import numpy as np
import pytest

from edge.semantic_cache import CacheConfig, SemanticCache
from partitioner.semantic_cache import build_centers, calibrate, choose_grid, hit_threshold, split_held_out
from protos.semantic import grid_means, margins, normalize, pool


def clusters(n, k=5, d=16, spread=0.6, seed=0, shift=None, means_seed=None):
    rng = np.random.default_rng(seed)
    means = normalize(np.random.default_rng(seed if means_seed is None else means_seed).standard_normal((k, d)))
    y = rng.integers(0, k, n)
    x = means[y] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    if shift is not None:
        x = x + shift
    return normalize(x).astype(np.float32), y


def test_pool_averages_spatial_axes_and_normalises():
    t = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    f = pool([t, np.ones((2, 5), np.float32)])
    assert f.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1, rtol=1e-6)
    expect = np.concatenate([t.mean(axis=(2, 3)), np.ones((2, 5))], axis=1)
    np.testing.assert_allclose(f, normalize(expect), rtol=1e-5)


def test_pool_grid_averages_cells_channel_major():
    t = np.random.default_rng(0).standard_normal((2, 3, 8, 6)).astype(np.float32)
    g = grid_means(t, 2)
    assert g.shape == (2, 3 * 4)
    cells = [t[:, :, :4, :3], t[:, :, :4, 3:], t[:, :, 4:, :3], t[:, :, 4:, 3:]]
    expect = np.stack([c.mean(axis=(2, 3)) for c in cells], axis=2).reshape(2, -1)
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool([t], 2), normalize(expect), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool([t], 1), pool([t]), rtol=0)  # grid 1 is the global average
    assert pool([t], 16).shape == (2, 3 * 8 * 6)  # an axis shorter than the grid: one cell per element
    assert pool([np.ones((2, 4, 10), np.float32)], 4).shape == (2, 16)  # (N, C, L): cells along L
    assert pool([np.ones((2, 4, 5, 8, 8), np.float32)], 2).shape == (2, 16)  # the depth axis averaged whole
    assert pool([np.ones((2, 5), np.float32)], 4).shape == (2, 5)  # a 2-D tensor is taken as is


def blobs(n, size=8, channels=4, seed=0):
    """Cut tensors whose class is *where* the activity is (a quadrant), not which channel: every
    channel's global average is the same for every class, so only a grid tells the classes apart."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    t = 0.3 * rng.standard_normal((n, channels, size, size)).astype(np.float32) + 1.0
    h = size // 2
    for i, k in enumerate(y):
        r, c = divmod(int(k), 2)
        t[i, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 2.0
    return t, y


def test_choose_grid_keeps_the_layout_when_the_classes_live_in_it():
    t, y = blobs(400)
    feats = {g: pool([t], g) for g in (1, 2, 4)}
    choice = choose_grid(feats, y, y, 4, 0.99)
    assert choice.hit_rate[1] < 0.2 < 0.8 < choice.hit_rate[2]
    assert choice.grid == 2  # grid 4 does as well here: the tie goes to the smaller grid
    # where the layout carries nothing (identical features at every grid), the global average is kept
    same = {g: feats[1] for g in (1, 2, 4)}
    assert choose_grid(same, y, y, 4, 0.99).grid == 1


def test_the_edge_pools_at_the_cut_grid():
    t, y = blobs(40)
    c = build_centers(pool([t], 2), y, y, 4)
    cache = SemanticCache(c.centers, c.valid, CacheConfig(hit=0.0, band=0.0, band_bits=None), grid=2)
    np.testing.assert_array_equal(cache.feature([t[3:4]]), pool([t[3:4]], 2)[0])
    assert cache.decide(cache.feature([t[3:4]])).cls == y[3]


def test_hit_threshold_meets_target_on_fresh_data():
    x, y = clusters(4000, spread=1.2)
    build, held = split_held_out(len(y))
    c = build_centers(x[build], y[build], y[build], 5)
    th = calibrate(x[held], y[held], c, target_precision=0.99)
    assert 0 < th.hit_rate < 1 and th.precision >= 0.99
    # Same classes, a new draw of inputs: the calibrated threshold holds its precision (within noise).
    xt, yt = clusters(4000, spread=1.2, seed=1, means_seed=0)
    cls, m, _ = margins(xt, c.centers, c.valid)
    hits = m >= th.hit
    assert hits.mean() > 0.1
    assert (cls[hits] == yt[hits]).mean() >= 0.98


def test_hit_threshold_is_infinite_when_target_unreachable():
    m = np.linspace(0, 1, 100)
    correct = np.zeros(100, bool)
    t, prec, rate = hit_threshold(m, correct, 0.99)
    assert t == np.inf and rate == 0


def test_centers_use_only_correct_answers():
    x = normalize(np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]], np.float32))
    answers = np.array([0, 0, 1, 1])
    labels = np.array([0, 1, 1, 1])  # the second sample is wrong: excluded from center 0
    c = build_centers(x, answers, labels, 3)
    np.testing.assert_allclose(c.centers[0], x[0], rtol=1e-6)
    assert c.valid.tolist() == [True, True, False]


def test_band_lowers_bits_only_within_budget():
    x, y = clusters(2000, spread=1.5, seed=3)
    build, held = split_held_out(len(y))
    c = build_centers(x[build], y[build], y[build], 5)
    _, m, _ = margins(x[held], c.centers, c.valid)
    rng = np.random.default_rng(0)
    normal = np.ones(len(held), bool)
    at2 = m > 0.3  # 2 bits breaks every low-margin answer
    at4 = rng.random(len(held)) > 0.002
    th = calibrate(x[held], y[held], c, 0.99, agree_at_bits={2: at2, 4: at4}, normal_agree=normal, budget_points=0.5)
    cls = margins(x[held], c.centers, c.valid)[0]
    hits_points = 100.0 * np.mean((cls != y[held]) & (m >= th.hit))  # what the hits already spend
    assert th.band_bits in (2, 4) and th.band_drop <= 0.5 - hits_points
    assert th.band <= th.hit
    # hits that spend the whole budget leave no band, however cheap the lower bits are
    wrong = y[held].copy()
    top = np.argsort(-m)[: int(0.01 * len(m))]  # 1% of the answers, the most confident, disagree
    wrong[top] = (wrong[top] + 1) % 5
    tight = calibrate(x[held], wrong, c, 0.95, agree_at_bits={4: np.ones(len(held), bool)}, normal_agree=normal,
                      budget_points=0.5)
    assert tight.hit < np.inf and tight.band_bits is None and tight.band == tight.hit


def test_online_precision_tracking_tightens_under_drift():
    x, y = clusters(3000, spread=1.0)
    c = build_centers(x, y, y, 5)
    th = calibrate(x, y, c, 0.99)
    cache = SemanticCache(c.centers, c.valid, CacheConfig(hit=th.hit, band=th.hit, band_bits=None,
                                                          verify_fraction=1.0, momentum=None, window=20))
    # An unseen domain: the features of class k now sit where class k+1's center is.
    xd, yd = clusters(3000, spread=1.0)
    xd = normalize(np.roll(c.centers, -1, axis=0)[yd] + 0.3 * (xd - c.centers[yd]))
    start = cache.hit
    for f, label in zip(xd, yd):
        d = cache.decide(f)
        cache.observe(f, int(label), d)
    assert cache.hit > start  # tightened
    late = cache.history[-5:]
    assert all(t >= start for _, t, _ in late)


def test_a_drop_budget_asks_more_precision_of_a_cache_that_answers_more():
    """Wrong hits cost the stream's accuracy in proportion to the hit rate: with a budget of 0.25
    points, hits must be 99.5% right at a 50% hit rate, 99.75% at 100%; never below the configured
    target, and the threshold relaxes more slowly the stricter the target."""
    x, y = clusters(2000, spread=0.8)
    c = build_centers(x, y, y, 5)
    th = calibrate(x, y, c, 0.99)

    def cache(**kw):
        return SemanticCache(c.centers, c.valid, CacheConfig(hit=th.hit, band=th.hit, band_bits=None,
                                                             verify_fraction=1.0, momentum=None, **kw))

    free, bounded = cache(), cache(drop_budget=0.25, hit_rate=0.5)
    assert free.target() == pytest.approx(0.99)
    assert bounded.target() == pytest.approx(0.995)
    assert cache(drop_budget=5.0, hit_rate=0.5).target() == pytest.approx(0.99)  # the configured floor
    assert cache(drop_budget=0.0, hit_rate=0.5).target() == 1.0
    assert bounded._relax_step() < free._relax_step()
    # the live hit rate replaces the plan's: a stream of sure hits asks for 1 - 0.0025
    sure = normalize(c.centers[0] + 0.01 * c.centers[1])
    for _ in range(600):
        bounded.decide(sure)
    assert bounded.telemetry()["target_precision"] == pytest.approx(0.9975, abs=2e-4)
    # from the same raised threshold, right verified hits bring the bounded one down more slowly
    for k in (free, bounded):
        k.hit = 2 * th.hit
        for _ in range(200):
            d = k.decide(sure)
            k.observe(sure, int(d.cls), d)
    assert th.hit <= free.hit < bounded.hit


def test_online_update_moves_centers_and_is_thread_safe():
    x, y = clusters(500)
    c = build_centers(x, y, y, 5)
    cache = SemanticCache(c.centers, c.valid, CacheConfig(hit=0.2, band=0.1, band_bits=4, momentum=0.9))
    before = cache.centers.copy()

    def worker(seed):
        xs, ys = clusters(300, seed=seed)
        for f, label in zip(xs, ys):
            d = cache.decide(f)
            cache.observe(f, int(label), d)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not np.allclose(before, cache.centers)
    np.testing.assert_allclose(np.linalg.norm(cache.centers, axis=1), 1, rtol=1e-5)
    tel = cache.telemetry()
    assert tel["hit"] + tel["band"] + tel["full"] == 900


def test_temporal_reuse_answers_repeated_features_only_where_the_centers_agree():
    x, y = clusters(100)
    c = build_centers(x, y, y, 5)
    cache = SemanticCache(c.centers, c.valid, CacheConfig(hit=5.0, band=5.0, band_bits=None, reuse_similarity=0.999))
    d1 = cache.decide(x[0])
    assert d1.outcome == "full"  # the hit threshold is out of reach: only context can answer early
    other = (d1.cls + 1) % 5
    cache.observe(x[0], other, d1)  # the cloud says another class than the centers
    d2 = cache.decide(x[0])  # the same window again, but the centers disagree with it: no reuse
    assert d2.outcome == "full" and not d2.reused
    cache.observe(x[0], d1.cls, d2)  # now the cloud agrees with the centers
    d3 = cache.decide(x[0])  # the same window again: the previous answer is reused
    assert d3.outcome == "hit" and d3.reused and d3.cls == d1.cls
    d4 = cache.decide(-x[0])  # a feature that moved: no reuse
    assert d4.outcome == "full" and not d4.reused
