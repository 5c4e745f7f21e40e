"""Smoke test of `coach bench cache --quick`: a digits model planned with a cache, every ablation step
and the drift run through the link emulator against a real cloud process; the JSON and the plots."""

import argparse
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from bench import cache_bench  # noqa: E402
from coach_runtime.errors import UserError  # noqa: E402


def parse(*argv):
    p = argparse.ArgumentParser()
    cache_bench.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache_bench")
    out = d / "out" / "cache.json"
    assert cache_bench.run(parse("--quick", "--work", str(d / "work"), "--out", str(out))) == 0
    return out, json.loads(out.read_text())


def test_every_ablation_step_runs_with_its_own_settings(quick):
    _, res = quick
    w = res["workloads"]["digits"]
    rows = {r["config"]: r for r in w["ablation"]}
    assert list(rows) == [label for label, _ in cache_bench.ABLATION]
    n = res["workloads"]["digits"]["ablation"][0]["inputs"]
    assert n == 80 and all(r["inputs"] == n for r in rows.values())  # exactly one result per input
    base = rows["no cache"]
    assert base["hit_rate"] == 0 and base["where"]["cache"] == 0 and base["bytes_sent"] > 0
    for label in ("centers", "+ context", "+ update", "+ bits"):
        r = rows[label]
        assert r["where"]["cache"] > 0, f"{label}: the cache was never used"
        assert r["bytes_sent"] < base["bytes_sent"]  # answered here: those inputs send nothing
        assert 0 <= r["precision_fp32"] <= 1 and 0 <= r["accuracy"] <= 1
        # the drop is against the no-cache run on the same inputs
        assert r["drop_points"] == pytest.approx(100 * (base["accuracy"] - r["accuracy"]), abs=1e-6)
    # the parts that are off really are off
    assert rows["centers"]["reused"] == 0
    for label in ("centers", "+ context", "+ update"):
        assert rows[label]["band"] == 0
    # the pinned cut is an interior cut with a planned cache
    assert w["cut"].startswith("cut-") and w["cache_plan"]["hit"] is not None


def test_drift_run_reports_phases_history_and_series(quick):
    _, res = quick
    d = res["workloads"]["digits"]["drift"]
    assert d["switch"] > 0
    assert set(d["phases"]) == {"seen", "unseen first third", "unseen middle third", "unseen last third"}
    assert d["phases"]["seen"]["inputs"] == [0, d["switch"]]
    assert len(d["series"]["hit_rate_rolling"]) == 2 * d["switch"]
    assert len(d["series"]["hit_index"]) == len(d["series"]["precision_rolling"]) > 0
    full, none = d["rows"]
    assert full["where"]["cache"] > 0 and none["where"]["cache"] == 0
    assert full["verified"] > 0  # drift runs verify a share of the hits
    for seen, thr, prec in d["history"]:
        assert 0 < seen <= 2 * d["switch"] and thr >= d["hit_threshold"]["calibrated"] - 1e-9
        assert prec is None or 0 <= prec <= 1


def test_outputs_written(quick):
    out, res = quick
    assert res["plots"] == ["cache_drift_digits.png", "cache_ablation.png"]
    for name in res["plots"]:
        assert (out.parent / name).stat().st_size > 1000
    assert not list(out.parent.glob("*.tmp*"))
    assert "digits" in res["targets"]


def test_user_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="--workloads"):
        cache_bench.run(parse("--workloads", "mnist", "--work", str(tmp_path)))
    with pytest.raises(UserError, match="--trace"):
        cache_bench.run(parse("--quick", "--trace", str(tmp_path / "missing.up"), "--work", str(tmp_path)))
    with pytest.raises(UserError, match="--drift-verify"):
        cache_bench.run(parse("--quick", "--drift-verify", "1.5", "--work", str(tmp_path)))


def test_rolling_mean_is_trailing():
    import numpy as np

    r = cache_bench.rolling(np.array([1, 0, 1, 1, 0], float), 2)
    assert r.tolist() == [1.0, 0.5, 0.5, 1.0, 0.5]


# The semantic cache changes the bench motivated (edge/semantic_cache.py): a threshold controller
# balanced at the target precision, and temporal smoothing that does not blend different classes.


def _cache(**kw):
    import numpy as np

    from edge.semantic_cache import CacheConfig, SemanticCache

    centers = np.eye(3, 4, dtype=np.float32)  # three orthogonal class centers
    return SemanticCache(centers, np.ones(3, bool), CacheConfig(**{"hit": 0.1, "band": 0.1, "band_bits": None, **kw}))


def test_threshold_controller_balances_at_the_target_precision():
    import numpy as np

    from edge.semantic_cache import CacheDecision

    cache = _cache(target_precision=0.98, tighten_step=0.25, momentum=None)
    f = np.array([1, 0, 0, 0], np.float32)
    # mistakes at the threshold's own margin: plain multiplicative steps
    right, wrong = CacheDecision("hit", 0, 0.5, verify=True), CacheDecision("hit", 1, 0.1, verify=True)
    for _ in range(4):
        cache.observe(f, 0, wrong)
    assert cache.hit == pytest.approx(0.1 * 1.25**4)
    # 49 right answers per wrong one is precision 0.98 exactly: the threshold comes back to where it was
    for _ in range(4 * 49):
        cache.observe(f, 0, right)
    assert cache.hit == pytest.approx(0.1, rel=1e-6)
    for _ in range(100):  # above target it relaxes, but never below the calibrated threshold
        cache.observe(f, 0, right)
    assert cache.hit == pytest.approx(0.1)
    seen, thr, prec = cache.history[-1]
    assert prec == 1.0 and len(cache.history) == 4 + 4 * 49 + 100


def test_a_confident_mistake_lifts_the_threshold_past_its_margin():
    import numpy as np

    from edge.semantic_cache import CacheDecision

    cache = _cache(tighten_step=0.1, momentum=None)
    f = np.array([1, 0, 0, 0], np.float32)
    g = np.array([0.6, 0.4, 0, 0], np.float32) / np.hypot(0.6, 0.4)  # margin 0.28
    assert cache.decide(g).outcome == "hit"
    cache.observe(f, 1, CacheDecision("hit", 0, 0.6, verify=True))  # wrong, with margin 0.6
    assert cache.hit == pytest.approx(0.66)
    assert cache.decide(g).outcome == "full"
    cache.observe(f, 1, CacheDecision("hit", 0, 0.7, verify=True))  # wrong again, at 0.7: past it
    assert cache.hit == pytest.approx(0.77)


def test_a_wrong_reuse_narrows_reuse_not_the_hit_threshold():
    """Reused answers (consecutive features alike) skip the margin test, so their mistakes are
    charged to the reuse gap: after a drift they were where wrong hits came from (GesFi)."""
    import numpy as np

    from edge.semantic_cache import CacheDecision

    cache = _cache(tighten_step=0.1, momentum=None, reuse_similarity=0.99, smoothing=0.0)
    a = np.array([1, 0, 0, 0], np.float32)
    near = np.array([1, 0.1, 0, 0], np.float32) / np.hypot(1, 0.1)  # gap 1 - cos = 0.005
    assert cache.decide(a).outcome == "hit"
    d = cache.decide(near)
    assert d.reused and d.gap == pytest.approx(1 - float(near @ a), abs=1e-6)
    cache.observe(near, 1, CacheDecision("hit", 0, d.margin, verify=True, reused=True, gap=d.gap))  # wrong
    assert cache.hit == pytest.approx(0.1)  # the margin threshold is untouched
    assert cache.reuse_gap == pytest.approx(d.gap / 1.1)  # below the gap that was wrong
    cache.decide(a)
    assert not cache.decide(near).reused  # the same step is no longer reused
    for _ in range(2000):  # right reuses let it grow back, never past the configured one
        cache.observe(near, 0, CacheDecision("hit", 0, 0.5, verify=True, reused=True, gap=0.001))
    assert cache.reuse_gap == pytest.approx(0.01)


def test_verification_boosts_while_precision_is_below_target():
    import numpy as np

    from edge.semantic_cache import CacheDecision

    cache = _cache(verify_fraction=0.1, verify_boost=5.0, momentum=None, seed=3)
    f = np.array([1, 0, 0, 0], np.float32)
    def share():
        return np.mean([cache.decide(f).verify for _ in range(4000)])
    assert share() == pytest.approx(0.1, abs=0.02)
    cache.observe(f, 1, CacheDecision("hit", 0, 0.05, verify=True))  # one wrong in one: below target
    assert share() == pytest.approx(0.5, abs=0.03)
    for _ in range(200):  # right ones fill the window: at the target again
        cache.observe(f, 0, CacheDecision("hit", 0, 0.5, verify=True))
    assert share() == pytest.approx(0.1, abs=0.02)


def test_smoothing_does_not_blend_across_a_class_change():
    import numpy as np

    cache = _cache(smoothing=0.5, momentum=None)
    a = np.array([1, 0, 0, 0], np.float32)
    b = np.array([0, 1, 0, 0], np.float32)
    cache.decide(a)
    d = cache.decide(b)  # an input of another class right after: judged on its own
    assert d.cls == 1 and d.margin == pytest.approx(1.0)
    near = np.array([0.2, 1, 0, 0], np.float32) / np.hypot(0.2, 1)
    d2 = cache.decide(near)  # alike (closer than any two centers): smoothed with the previous one
    assert d2.cls == 1 and d2.margin > 1.0 - 0.2 / np.hypot(0.2, 1)


def test_status_line_shows_the_cache_of_the_cut_in_use():
    import io
    from types import SimpleNamespace

    import numpy as np

    from edge.status import RunStats, StatusLine, cache_text

    cache = _cache(verify_fraction=1.0, momentum=None)
    f = np.array([1, 0, 0, 0], np.float32)
    cache.observe(f, 0, cache.decide(f))  # a hit (margin 1 >= 0.1), verified right
    agent = SimpleNamespace(caches={"cut-a": cache}, decision=SimpleNamespace(cut_id="cut-a", bits=8),
                            estimator=SimpleNamespace(estimate_mbps=lambda: 2.0), link=None)
    assert cache_text(agent) == "  cache hit 100% prec 100.0% thr 0.1000"
    out = io.StringIO()
    StatusLine(out).update(RunStats(), agent, force=True)
    assert "cache hit 100%" in out.getvalue()
    agent.decision.cut_id = "edge-only"  # a cut without a cache: nothing about it
    assert cache_text(agent) == ""


def test_band_bits_stay_below_the_calibrated_hit_threshold():
    import numpy as np

    from edge.semantic_cache import CacheDecision

    cache = _cache(hit=0.3, band=0.05, band_bits=2, momentum=None)
    g = np.array([0.6, 0.4, 0, 0], np.float32) / np.hypot(0.6, 0.4)  # margin 0.28: in the band
    assert cache.decide(g).outcome == "band"
    cache.observe(g, 1, CacheDecision("hit", 0, 0.5, verify=True))  # a confident mistake: hit -> 0.55
    h = np.array([0.7, 0.3, 0, 0], np.float32) / np.hypot(0.7, 0.3)  # margin 0.52: no longer a hit
    assert cache.decide(h).outcome == "full"  # and not sent at 2 bits either
    assert cache.decide(g).outcome == "band"
