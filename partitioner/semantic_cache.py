"""Offline half of the semantic cache: label semantic centers and calibrated margin thresholds.

Pure functions. `build_centers` averages the pooled, normalised cut features of calibration inputs
the full model gets right. `calibrate` picks, on a held-out split, the hit threshold on the margin
(top-1 minus top-2 cosine similarity) above which the cached answer agrees with the full model's
answer at the target precision, and the band below it in which a lower bit width still keeps the
accuracy budget. `choose_grid` picks, per cut, how finely `protos.semantic.pool` keeps the cut
tensor's layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from protos.semantic import margins, normalize


@dataclass(frozen=True)
class Centers:
    centers: np.ndarray  # (K, D) float32, L2-normalised; zero rows for classes never seen
    valid: np.ndarray  # (K,) bool
    counts: np.ndarray  # (K,) samples per center


@dataclass(frozen=True)
class CacheThresholds:
    hit: float  # margin at or above which the edge answers from the cache (inf: never)
    band: float  # margin in [band, hit) sends `band_bits`
    band_bits: int | None  # None: no band
    precision: float  # measured precision of cache answers on the held-out split
    hit_rate: float  # fraction of held-out inputs at or above `hit`
    band_rate: float
    band_drop: float | None  # accuracy drop (points) of band_bits inside the band
    target_precision: float
    held_out: int

    def to_json(self) -> dict:
        d = asdict(self)
        d["hit"] = None if not np.isfinite(self.hit) else float(self.hit)
        return d


def build_centers(features: np.ndarray, answers: np.ndarray, labels: np.ndarray | None, num_classes: int) -> Centers:
    """Class means of features whose full-model answer is right (or, without labels, of each answer)."""
    keep = answers == labels if labels is not None else np.ones(len(answers), bool)
    d = features.shape[1]
    sums = np.zeros((num_classes, d), np.float64)
    counts = np.zeros(num_classes, np.int64)
    np.add.at(sums, answers[keep], features[keep])
    np.add.at(counts, answers[keep], 1)
    valid = counts > 0
    centers = np.where(valid[:, None], normalize(sums), 0.0).astype(np.float32)
    return Centers(centers=centers, valid=valid, counts=counts)


def hit_threshold(margin: np.ndarray, correct: np.ndarray, target: float, min_hits: int = 5) -> tuple[float, float, float]:
    """Lowest margin threshold whose cache answers (margin >= t) reach `target` precision.

    Returns (threshold, precision, hit rate); threshold inf when no threshold with at least
    `min_hits` hits reaches the target. Precision is taken over every sample at or above t."""
    order = np.argsort(-margin, kind="stable")
    m, c = margin[order], correct[order].astype(np.float64)
    prec = np.cumsum(c) / np.arange(1, len(c) + 1)
    best = (np.inf, 1.0, 0.0)
    for i in range(min_hits - 1, len(m)):
        if i + 1 < len(m) and m[i + 1] == m[i]:
            continue  # a threshold includes every sample with the same margin
        if prec[i] >= target:
            best = (float(m[i]), float(prec[i]), (i + 1) / len(m))
    return best


def band_threshold(margin: np.ndarray, hit: float, agree_at_bits: dict[int, np.ndarray], budget_points: float,
                   normal_agree: np.ndarray) -> tuple[float, int | None, float | None, float]:
    """Widest band [t, hit) and lowest bits whose extra disagreement there stays within the budget.

    `agree_at_bits[b]`: per sample, does head -> b-bit quantization -> tail agree with the full model;
    `normal_agree`: the same at the bits normally sent. The drop in the band is measured over all
    held-out samples (points of top-1 agreement), so that the band as a whole keeps the budget."""
    n = len(margin)
    below_hit = margin < hit
    best = (hit, None, None, 0.0)
    for bits in sorted(agree_at_bits):  # lowest bits first: the most bytes saved
        extra = (normal_agree.astype(int) - agree_at_bits[bits].astype(int))  # 1 where b bits break an answer
        candidates = np.unique(margin[below_hit])[::-1]
        chosen = None
        for t in candidates:
            inband = below_hit & (margin >= t)
            drop = 100.0 * extra[inband].sum() / n
            if drop <= budget_points:
                chosen = (float(t), bits, float(drop), float(inband.mean()))
            else:
                break
        if chosen is not None and chosen[3] > best[3]:
            best = chosen
    return best


def calibrate(features: np.ndarray, answers: np.ndarray, centers: Centers, target_precision: float,
              agree_at_bits: dict[int, np.ndarray] | None = None, normal_agree: np.ndarray | None = None,
              budget_points: float = 0.5) -> CacheThresholds:
    """Thresholds on held-out features (with the full model's answers) for the given centers.
    The band spends what the hits leave of `budget_points`: their disagreement with the full model
    (points over all held-out samples) comes off first, so that hits and band together keep it."""
    cls, margin, _ = margins(features, centers.centers, centers.valid)
    correct = cls == answers
    hit, prec, rate = hit_threshold(margin, correct, target_precision)
    band, bits, drop, band_rate = hit, None, None, 0.0
    if agree_at_bits and normal_agree is not None:
        hits_points = 100.0 * float((~correct & (margin >= hit)).sum()) / max(1, len(correct))
        left = budget_points - hits_points
        if left >= 0:
            band, bits, drop, band_rate = band_threshold(margin, hit, agree_at_bits, left, normal_agree)
    return CacheThresholds(hit=hit, band=band, band_bits=bits, precision=prec, hit_rate=rate, band_rate=band_rate,
                           band_drop=drop, target_precision=target_precision, held_out=len(answers))


@dataclass(frozen=True)
class GridChoice:
    grid: int  # protos.semantic.pool's grid for this cut
    hit_rate: dict[int, float]  # per candidate grid: the inner split's hit rate at the target precision


def choose_grid(features: dict[int, np.ndarray], answers: np.ndarray, labels: np.ndarray | None, num_classes: int,
                target_precision: float, seed: int = 0) -> GridChoice:
    """The pooling grid whose features give the most cache hits at the target precision, judged on
    the build split alone (the held-out split stays for the thresholds): centers from one half of
    it, hits on the other, and the other way round; the mean of the two hit rates. Ties go to the
    smaller grid (fewer dimensions: cheaper, and less to overfit)."""
    n = len(answers)
    a, b = split_held_out(n, 0.5, seed + 1)
    rates = {}
    for g in sorted(features):
        f = features[g]
        got = []
        for fit, test in ((a, b), (b, a)):
            if len(fit) == 0 or len(test) == 0:
                continue
            c = build_centers(f[fit], answers[fit], None if labels is None else labels[fit], num_classes)
            if not c.valid.any():
                got.append(0.0)
                continue
            cls, margin, _ = margins(f[test], c.centers, c.valid)
            got.append(hit_threshold(margin, cls == answers[test], target_precision)[2])
        rates[g] = float(np.mean(got)) if got else 0.0
    best = max(rates, key=lambda g: (rates[g], -g))
    return GridChoice(grid=best, hit_rate=rates)


def split_held_out(n: int, fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (build, held-out) of a seeded random split."""
    idx = np.random.default_rng(seed).permutation(n)
    k = int(round(n * (1 - fraction)))
    return np.sort(idx[:k]), np.sort(idx[k:])
