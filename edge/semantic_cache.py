"""Online half of the semantic cache: answer early from label semantic centers, or send fewer bits.

Per input, the pooled cut feature (protos.semantic.pool, at the cut's grid) is compared with the class centers:
  margin >= hit threshold           -> "hit": answer from the cache, send nothing
  band threshold <= margin < hit    -> "band": send with the band's (lower) bits (below the
                                       calibrated hit threshold only)
  otherwise                         -> "full": send at the adaptive bits
Context for streams: the feature is smoothed over consecutive inputs (EMA) while they stay alike
(closer to each other than any two class centers are; a jump to another class restarts the
average), and when a feature barely moves from the previous one the previous answer is reused.
Centers follow the cloud's answers (momentum). A fraction of hits is still sent to the cloud to
verify them, and each verified hit moves the hit threshold: a wrong one raises it by a factor
(1 + s), and past (1 + s) times its own margin (a confident mistake, as after a domain shift, says
that hits need more than that margin); a right one lowers it by (1 + s) ** ((1 - target) / target),
never below the calibrated threshold. The steps are multiplicative (margins differ in scale from
model to model) and balance where the precision of hits is the target (above it when mistakes come
at margins well above the threshold): below the target the threshold climbs, above it it relaxes
slowly. Reused answers skip the margin test, so their verified mistakes move their own knob
instead, the largest feature step (1 - cosine) still reused: a wrong reuse shrinks it below that
step, right ones let it grow back to the configured one, at the same rates. While the verified
precision is below the target, hits are verified `verify_boost` times as often, so that the
thresholds settle sooner after a drift. The verified precision reported is over the last `window`
verified hits.
Accuracy budget: with `drop_budget` (points of agreement with the full model, over all inputs looked
up) the target is no lower than 1 - drop_budget / (100 * hit rate), the live hit rate (`hit_rate`:
an EMA over ~20 lookups, from the plan's held-out one): a wrong hit costs the stream's accuracy in
proportion to how many inputs are hits, so the more the cache answers, the more precise it must be.
All state sits behind one lock: the compute and receive threads of the agent call in concurrently.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from protos.semantic import margins, normalize, pool


@dataclass(frozen=True)
class CacheConfig:
    hit: float  # calibrated hit threshold on the margin
    band: float  # band threshold (== hit: no band)
    band_bits: int | None
    target_precision: float = 0.99
    smoothing: float = 0.0  # EMA weight of the previous smoothed feature (0: off)
    context_similarity: float | None = None  # smooth only while cos(f, smoothed) > this (None: the
    # largest cosine between two class centers)
    reuse_similarity: float | None = None  # reuse the last answer when cos(f, f_prev) >= this (None: off)
    momentum: float | None = 0.99  # center update weight of the old center (None: no online update)
    verify_fraction: float = 0.1  # share of hits also sent to the cloud
    verify_boost: float = 3.0  # ... times this while the verified precision is below the target
    window: int = 50  # verified hits over which the reported precision is measured
    tighten_step: float = 0.1  # relative threshold raise on a wrong verified hit (and past its margin)
    relax_step: float | None = None  # relative decrease on a right one (None: balanced at the target, see above)
    min_step: float = 1e-3  # smallest raise (a threshold of 0 still moves)
    max_hit: float = 2.0  # margins lie in [0, 2]
    drop_budget: float | None = None  # points of accuracy the hits may cost the stream (None: no bound)
    hit_rate: float = 0.0  # expected hit rate until the live one is measured (the plan's held-out rate)
    seed: int = 0


@dataclass(frozen=True)
class CacheDecision:
    outcome: str  # "hit" | "band" | "full"
    cls: int
    margin: float
    verify: bool = False  # a hit that is also sent to the cloud
    reused: bool = False  # answered from temporal context
    gap: float = 0.0  # of a reused answer: 1 - cos(previous feature, this one)


class SemanticCache:
    def __init__(self, centers: np.ndarray, valid: np.ndarray, config: CacheConfig, grid: int = 1):
        self.grid = grid  # protos.semantic.pool's grid, as the planner chose it for this cut
        self.centers = np.array(centers, np.float32)
        self.valid = np.array(valid, bool)
        self.config = config
        self.hit = config.hit
        self._floor = config.hit  # relaxing never goes below the calibrated threshold
        self._lock = threading.Lock()
        self._rng = random.Random(config.seed)
        self._rate = config.hit_rate  # live hit rate (EMA)
        self._smoothed: np.ndarray | None = None
        self._last: tuple[np.ndarray, int] | None = None  # (feature, answer) of the previous input
        self._verified: deque[bool] = deque(maxlen=config.window)
        # Reuse of the last answer has its own knob, the largest 1 - cos(previous, feature) reused;
        # wrong verified reuses shrink it, right ones let it grow back to the configured one.
        self._reuse_gap0 = None if config.reuse_similarity is None else 1.0 - config.reuse_similarity
        self.reuse_gap = self._reuse_gap0
        self._gate = config.context_similarity
        if self._gate is None:
            self._gate = _closest_centers(self.centers, self.valid)
        self.counts = {"hit": 0, "band": 0, "full": 0, "reused": 0, "verified": 0, "verified_ok": 0}
        self.bytes_saved = 0
        self.history: list[tuple[int, float, float | None]] = []  # (inputs seen, hit threshold, precision)

    # ------------------------------------------------------------ decisions

    def feature(self, tensors: list[np.ndarray]) -> np.ndarray:
        return pool(tensors, self.grid)[0]

    def decide(self, feature: np.ndarray) -> CacheDecision:
        c = self.config
        with self._lock:
            f = feature
            if c.smoothing and self._smoothed is not None and float(self._smoothed @ feature) > self._gate:
                f = normalize(c.smoothing * self._smoothed + (1 - c.smoothing) * feature)
            self._smoothed = f
            cls, margin, _ = margins(f[None], self.centers, self.valid)
            cls, margin = int(cls[0]), float(margin[0])
            if c.reuse_similarity is not None and self._last is not None:
                # Context may confirm, never override: pooled ReLU features of different classes can
                # sit close in cosine, so the previous answer is reused only where the centers agree.
                prev, answer = self._last
                gap = 1.0 - float(prev @ feature)
                if gap <= self.reuse_gap and answer == cls:
                    self._last = (feature, answer)
                    self._count("hit")
                    self.counts["reused"] += 1
                    return CacheDecision("hit", answer, margin, verify=self._verify_draw(), reused=True,
                                         gap=gap)
            if margin >= self.hit:
                outcome = "hit"
            elif c.band_bits is not None and c.band <= margin < self._floor:
                # (the band's bits were calibrated below the calibrated hit threshold only: what a
                # tightened threshold no longer answers goes at full precision, not at band bits)
                outcome = "band"
            else:
                outcome = "full"
            self._count(outcome)
            if outcome == "hit":
                self._last = (feature, cls)
                return CacheDecision("hit", cls, margin, verify=self._verify_draw())
            self._last = None  # the answer comes later, from the cloud
            return CacheDecision(outcome, cls, margin)

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        self._rate = 0.95 * self._rate + 0.05 * (outcome == "hit")

    @property
    def hit_rate(self) -> float:
        """Share of recent lookups answered (EMA over ~20), from the plan's held-out rate."""
        return self._rate

    def target(self) -> float:
        """The precision hits must have: the configured one, or more where the drop budget says so."""
        c = self.config
        if c.drop_budget is None:
            return c.target_precision
        return min(1.0, max(c.target_precision, 1.0 - c.drop_budget / (100.0 * max(self._rate, 1e-3))))

    def _verify_draw(self) -> bool:
        """Verify a share of hits, a larger one while the verified precision is below the target
        (more evidence sooner, so the thresholds settle faster after a drift)."""
        c = self.config
        share = c.verify_fraction
        if self._verified and sum(self._verified) < self.target() * len(self._verified):
            share = min(1.0, share * c.verify_boost)
        return self._rng.random() < share

    # ------------------------------------------------------------ feedback from the cloud

    def observe(self, feature: np.ndarray, cloud_cls: int, decision: CacheDecision | None) -> None:
        """The cloud's answer for an input: update the center, the context and (for verified hits) precision."""
        c = self.config
        with self._lock:
            if c.momentum is not None and 0 <= cloud_cls < len(self.centers):
                old = self.centers[cloud_cls] if self.valid[cloud_cls] else feature
                self.centers[cloud_cls] = normalize(c.momentum * old + (1 - c.momentum) * feature)
                self.valid[cloud_cls] = True
            if decision is not None and decision.outcome != "hit":
                self._last = (feature, cloud_cls)
            if decision is not None and decision.verify:
                ok = decision.cls == cloud_cls
                self._verified.append(ok)
                self.counts["verified"] += 1
                self.counts["verified_ok"] += int(ok)
                if decision.reused:
                    self._adjust_reuse(ok, decision.gap)
                else:
                    self._adjust(ok, decision.margin)
                self._record()

    def _relax_step(self) -> float:
        c = self.config
        if c.relax_step is not None:
            return c.relax_step
        target = self.target()
        return (1 + c.tighten_step) ** ((1 - target) / target) - 1

    def _adjust(self, ok: bool, margin: float) -> None:
        c = self.config
        if ok:
            self.hit = max(self._floor, self.hit / (1 + self._relax_step()))
        else:
            up = max(self.hit * (1 + c.tighten_step), self.hit + c.min_step, margin * (1 + c.tighten_step))
            self.hit = min(c.max_hit, up)

    def _adjust_reuse(self, ok: bool, gap: float) -> None:
        """The same rule for the reuse gap, mirrored: a wrong reuse shrinks it below that reuse's gap."""
        if self.reuse_gap is None:
            return
        if ok:
            self.reuse_gap = min(self._reuse_gap0, self.reuse_gap * (1 + self._relax_step()))
        else:
            # (never to 0, from where the multiplicative growth could not come back)
            self.reuse_gap = max(min(self.reuse_gap, gap) / (1 + self.config.tighten_step), 1e-3 * self._reuse_gap0)

    def _record(self) -> None:
        prec = sum(self._verified) / len(self._verified)
        self.history.append((sum(self.counts[k] for k in ("hit", "band", "full")), self.hit, prec))

    def add_saved(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_saved += nbytes

    def telemetry(self) -> dict:
        with self._lock:
            seen = sum(self.counts[k] for k in ("hit", "band", "full"))
            v = self.counts["verified"]
            return {"hit_rate": self.counts["hit"] / seen if seen else 0.0,
                    "verified_precision": self.counts["verified_ok"] / v if v else None,
                    "hit_threshold": self.hit, "reuse_gap": self.reuse_gap, "bytes_saved": self.bytes_saved,
                    "target_precision": self.target(),
                    **self.counts}


def _closest_centers(centers: np.ndarray, valid: np.ndarray) -> float:
    """The largest cosine between two valid class centers (1.0, i.e. no smoothing, with fewer than two)."""
    c = centers[valid]
    if len(c) < 2:
        return 1.0
    sims = c @ c.T
    return float(sims[~np.eye(len(c), dtype=bool)].max())
