"""The edge agent: a three-stage pipeline (head compute -> encode+send -> receive) over a plan bundle.

    agent = Agent("bundle/", AgentConfig(cloud="10.0.0.2:50051"))
    for result in agent.run(open_source("inputs.npz", agent.inputs)):
        print(result.to_json())

Stage threads are joined by bounded queues, so in steady state sample i is computed while i-1 is
on the wire and i-2 in the cloud; the slowest stage sets the pace and nothing piles up. Results
come back in input order, exactly one per input: a request the cloud does not answer (stream
broken, deadline passed) is computed locally with the full model, and a late answer is dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from coach_runtime.errors import UserError
from edge.adapt import (BITS_RULES, DEFAULT_BITS_RULE, AccuracyBank, AdaptConfig, AdaptiveQuantizer,
                        CutProfile, Decision, drop_upper_bound)
from edge.adapt import PlanRow as AdaptRow
from edge.bandwidth import BandwidthEstimator, Observation, stall_bound_mbps
from edge.cloud_link import CloudLink, LinkConfig
from edge.sample import Sample
from edge.semantic_cache import CacheConfig, CacheDecision, SemanticCache
from edge.sessions import choose_providers, load_session
from protos import codec
from protos.bundle import Bundle, BundleError, load_bundle
from protos.coach.v1 import coach_pb2 as pb

log = logging.getLogger(__name__)
_DONE = object()


@dataclass
class AgentConfig:
    cloud: str | None = None  # HOST:PORT; None runs everything on the edge
    providers: list[str] | None = None  # e.g. ["cuda", "cpu"]; default: best available
    threads: int = 1  # onnxruntime intra-op threads for the head
    max_inflight: int = 8  # requests sent but not answered (covers the RTT on a high-latency link)
    deadline_ms: float = 5000.0  # past this an unanswered request is computed locally
    # ...or sooner: past rtt_factor x the median round trip of the recent answers (at least stall_ms)
    deadline_rtt_factor: float = 5.0  # 0: the fixed deadline only
    stall_ms: float = 150.0  # an answer this overdue (and rtt_factor x the median round trip) is a stall
    plan: str = "coach"  # whose plan table to follow: "coach" or a baseline of the bundle ("neurosurgeon", ...)
    bits: int | None = None  # fixed bit width (no adaptation)
    # which of the widths that keep up is sent (edge/adapt.fitting_bits): "least-drop" (the fewest bits
    # with the least measured drop) or "highest" (the highest that keeps up)
    bits_rule: str = DEFAULT_BITS_RULE
    cut: str | None = None  # fixed cut id (no cut switching)
    compress: str | None = None  # lossless stage: "zstd" | "lz4"
    # Probes: when no answer gave the estimator a sample for this long (not calibrated yet, or too little
    # is sent: a deep cut, cache hits), copies of the input are sent back to back through the cloud-only
    # cut (Agent._send_probes), measure_only (the cloud runs nothing). On edge-only (nothing sent)
    # after probe_interval_s.
    calibrate_interval_s: float = 2.0  # 0: never
    probe_interval_s: float = 1.0
    edge_slowdown: float = 1.0  # stretch edge compute by this factor to stand for a slower board (benchmarks)
    connect_timeout_s: float = 5.0
    offline_ok: bool = False  # start even if the cloud is unreachable (compute locally until it is up)
    link: dict = field(default_factory=dict)  # extra LinkConfig fields: tls_ca, tls_cert, tls_key, token
    cache: bool = True  # the semantic cache, where the bundle has one
    cache_context: bool = True  # temporal smoothing and reuse of the last answer (streams)
    cache_update: bool = True  # move the centers with the cloud's answers
    cache_band: bool = True  # fewer bits in the margin band
    cache_verify: float = 0.1  # share of cache hits still sent to the cloud to check them
    # share of the plan's accuracy budget the cache's answers may spend (the rest: the quantizer's bank)
    cache_budget_share: float = 0.5
    bank: bool = True  # on dips, widths below the admissible ones paid by the budget's slack (edge/adapt.py)
    bank_window: float = 200.0  # horizon (answers) of the running accuracy drop


@dataclass
class Result:
    id: int
    cls: int
    score: float
    where: str  # "cloud" | "edge" | "cache"
    bits: int | None
    cut: str
    timing: dict[str, float]
    label: int | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        d = {"id": self.id, "class": self.cls, "score": round(self.score, 6), "where": self.where,
             "bits": self.bits, "cut": self.cut, "timing": {k: round(v, 3) for k, v in self.timing.items()}}
        if self.label is not None:
            d["label"] = self.label
        if self.error:
            d["error"] = self.error
        return d


@dataclass
class _Item:
    """One input on its way through the pipeline."""

    seq: int
    sample: Sample
    t_capture: float
    cut: str = ""
    bits: int | None = None
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    head_ms: float = 0.0
    encode_ms: float = 0.0
    t_queued: float = 0.0
    t_sent: float = 0.0
    send_ns: int = 0
    nbytes: int = 0
    feature: np.ndarray | None = None  # pooled cut feature, when the cut has a semantic cache
    cache: CacheDecision | None = None
    verify_only: bool = False  # a cache hit sent only to check it: its answer is no result
    probe: bool = False  # a copy sent only to measure the link (verify_only too)
    charged: bool = False  # its drop at the bits it was sent with is in the quantizer's accuracy bank


def _payload_bytes(cut, bits: int) -> int:
    """Bytes a request of `cut` carries at `bits`: the plan's figure, else computed from the shapes."""
    try:
        return cut.bytes_at(bits)
    except KeyError:
        return sum(codec.packed_nbytes(t.elements, bits) for t in cut.tensors)


def _top1(logits: np.ndarray) -> tuple[int, float]:
    v = np.asarray(logits, np.float64).reshape(-1)
    p = np.exp(v - v.max())
    p /= p.sum()
    i = int(np.argmax(p))
    return i, float(p[i])


class Agent:
    def __init__(self, bundle: str | Path | Bundle, config: AgentConfig | None = None):
        self.config = config or AgentConfig()
        if self.config.bits_rule not in BITS_RULES:
            raise UserError(f"bits rule '{self.config.bits_rule}': use one of {', '.join(BITS_RULES)}")
        try:
            self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        except BundleError as exc:
            raise UserError(str(exc)) from None
        b = self.bundle
        self.inputs = b.inputs
        self.providers = choose_providers(self.config.providers)
        # Heads of every cut the plan may switch to, and the full model for edge-only and fallback.
        self.heads = {cid: load_session(b.head_path(cid), self.providers, self.config.threads)
                      for cid, c in b.cuts.items() if c.kind == "interior"}
        self.full = load_session(b.full_path, self.providers, self.config.threads)
        self.estimator = BandwidthEstimator()
        self.cache_budget = self._cache_budget()  # points of the accuracy budget the cache may spend
        self.caches = self._make_caches() if self.config.cache else {}
        self.quantizer = self._make_quantizer()
        # whether the bandwidth estimate can change anything (edge-only or cloud-only alone: no probes)
        self._adapts = (len(self.quantizer.cuts) > 1
                        or any(len(c.bytes_by_bits) + len(c.below_bytes) > 1 for c in self.quantizer.cuts.values()))
        self.link: CloudLink | None = None
        # bytes put on the uplink (answered or not): bytes, requests; verify_bytes, cache hits also sent to
        # check them; probe_bytes, copies sent to measure the link
        self.stats = {"cloud": 0, "edge": 0, "cache": 0, "fallback": 0, "late": 0, "bytes": 0, "verify_bytes": 0,
                      "probe_bytes": 0,
                      "reconnects": 0}
        self._lock = threading.Lock()
        self._pending: dict[int, _Item] = {}
        self._room = threading.Condition(self._lock)  # in-flight slots (_inflight_cap)
        self._inflight = 0
        self._results: queue.Queue = queue.Queue()
        self._local: queue.Queue = queue.Queue()
        self._next_id = 0
        self._last_sample = self._last_calibration = -1e9  # perf_counter: latest estimator sample, probe pair
        self._last_answer = -1e9  # perf_counter of the latest answer from the cloud
        self._rtts: collections.deque[float] = collections.deque(maxlen=32)  # ms, recent answers
        self._rtt_median = self._rtt_min = None  # of _rtts, kept by _note_rtt (read on every decision)
        self._stalled = False  # an answer was overdue by the stall time, and none came since

    def _make_quantizer(self) -> AdaptiveQuantizer:
        """Adaptive bits (and cut switching) over the plan's cuts; --cut/--bits pin either."""
        b, cfg = self.bundle, self.config
        if cfg.plan == "coach":
            table, row_bits = b.plan_table, None
        elif cfg.plan in b.baselines:  # a baseline sends each cut at the bits of its own plan rows
            table = b.baselines[cfg.plan]
            row_bits = {r.cut: r.bits for r in table}
        else:
            raise UserError(f"plan '{cfg.plan}': the bundle has coach and {', '.join(b.baselines)}")
        profiles, samples = [], self._calibration_samples()
        for cid, c in b.cuts.items():
            fixed = cfg.bits or (row_bits or {}).get(cid)
            if c.kind == "edge-only":  # nothing crosses the link
                sizes = {fixed or 32: 0}
            elif fixed is not None:
                sizes = {fixed: _payload_bytes(c, fixed)}
            else:
                sizes = {q.bits: q.bytes for q in c.quantization if q.admissible}
            measured = {q.bits: q.accuracy_drop for q in c.quantization if q.accuracy_drop is not None}
            below = {q.bits: q.bytes for q in c.quantization if fixed is None and c.kind != "edge-only"
                     and not q.admissible and q.bits in measured and q.bits < min(sizes)}
            measured.update({bits: drop_upper_bound(measured[bits], samples) for bits in below})
            # the cache's hit rate (the plan's held-out one until lookups move it; _observe)
            hit_rate = self.caches[cid].hit_rate if cid in self.caches else 0.0
            profiles.append(CutProfile(cid, c.edge_ms, c.cloud_ms, sizes, below_bytes=below, drop_by_bits=measured,
                                       bits_rule=cfg.bits_rule, hit_rate=hit_rate))
        rows = [AdaptRow(r.bandwidth_mbps, cfg.cut or r.cut, cfg.bits or r.bits) for r in table]
        if row_bits is not None:
            profiles = [p for p in profiles if p.cut_id in row_bits or p.cut_id == cfg.cut]
        if cfg.cut:
            profiles = [p for p in profiles if p.cut_id == cfg.cut]
        bank = None
        if cfg.bank and cfg.bits is None and row_bits is None:
            bank = AccuracyBank(budget=self._bank_budget(), window=cfg.bank_window)
        # a baseline's cut is its own planner's choice for the level (no switching by the live period)
        config = AdaptConfig() if row_bits is None else AdaptConfig(period_margin=None)
        return AdaptiveQuantizer(profiles, rows, config, bank=bank)

    def _calibration_samples(self) -> int:
        """How many calibration inputs the plan measured its accuracy drops on (100 if it does not say)."""
        try:
            return int(self.bundle.raw["objective"]["calibration"]["samples"])
        except (KeyError, TypeError, ValueError):
            return 100

    def _cache_budget(self) -> float:
        """Points of the plan's accuracy budget the semantic cache may spend (its hits' disagreement with
        the full model, and its band's drop): `cache_budget_share` of it, or what the plan's held-out
        inputs say the cache spends if that is more; 0 with no cache that can answer."""
        b, planned, any_hit = self.bundle, 0.0, False
        for cid in b.cuts if self.config.cache else ():
            spec = b.cache_for(cid)
            if spec is not None and spec.hit is not None:
                any_hit = True
                hits = 100.0 * spec.hit_rate * (1.0 - (spec.precision or 0.0))
                planned = max(planned, hits + (spec.band_drop or 0.0))  # band_drop is None without a band
        if not any_hit:
            return 0.0
        return min(b.accuracy_budget, max(planned, b.accuracy_budget * self.config.cache_budget_share))

    def _bank_budget(self) -> float:
        """The plan's accuracy budget less the semantic cache's part of it."""
        return max(0.0, self.bundle.accuracy_budget - self.cache_budget)

    def _observe(self, cut_id: str, edge_ms: float | None = None, cloud_ms: float | None = None,
                 hit_rate: float | None = None) -> None:
        """Measured stage times replace the plan's predictions (EMA), so the bits follow reality; the
        cut's cache's live hit rate (`SemanticCache.hit_rate`, after each lookup) replaces the plan's,
        so that the choice among cuts of equal period counts the hits the stream really gives.
        Called with the lock held (the compute, receive and local threads all measure)."""
        p = self.quantizer.cuts.get(cut_id)
        if p is None:
            return
        a = 0.2
        if edge_ms is not None:
            p = dataclasses.replace(p, edge_ms=(1 - a) * p.edge_ms + a * edge_ms)
        if cloud_ms is not None:
            p = dataclasses.replace(p, cloud_ms=(1 - a) * p.cloud_ms + a * cloud_ms)
        if hit_rate is not None:
            p = dataclasses.replace(p, hit_rate=hit_rate)
        self.quantizer.cuts[cut_id] = p

    def _observe_input(self, ms: float, first: bool = False) -> None:
        """Time between inputs spent in the source (reading and preprocessing, or waiting for the next
        input; never for our own queues) is part of the edge stage of every cut (EMA): T_e = input + head.
        A stream slower than the link leaves room for more bits; a costly preprocessing does too."""
        a = 1.0 if first else 0.2
        with self._lock:
            for cid, p in self.quantizer.cuts.items():
                self.quantizer.cuts[cid] = dataclasses.replace(p, input_ms=(1 - a) * p.input_ms + a * ms)

    @property
    def decision(self) -> Decision:
        return self.quantizer.update(None)

    def _make_caches(self) -> dict[str, SemanticCache]:
        caches = {}
        cfg = self.config
        for cid, cut in self.bundle.cuts.items():
            spec = self.bundle.cache_for(cid) if cut.kind == "interior" else None
            if spec is None or (spec.hit is None and spec.band is None):
                continue
            band_bits = spec.band_bits if cfg.cache_band else None
            band_drop = (spec.band_drop or 0.0) if band_bits is not None else 0.0
            caches[cid] = SemanticCache(spec.centers, spec.valid, CacheConfig(
                hit=float("inf") if spec.hit is None else spec.hit,
                band=float("inf") if spec.band is None else spec.band, band_bits=band_bits,
                target_precision=spec.target_precision,
                smoothing=0.5 if cfg.cache_context else 0.0,
                reuse_similarity=0.995 if cfg.cache_context else None,
                momentum=0.99 if cfg.cache_update else None, verify_fraction=cfg.cache_verify,
                drop_budget=max(0.0, self.cache_budget - band_drop),  # what the hits may cost
                hit_rate=spec.hit_rate), grid=spec.grid)
        return caches

    def cache_telemetry(self) -> dict:
        """Hit rate, verified precision, bytes saved, summed over the cuts' caches."""
        tel = [c.telemetry() for c in self.caches.values()]
        if not tel:
            return {}
        hits = sum(t["hit"] for t in tel)
        seen = sum(t["hit"] + t["band"] + t["full"] for t in tel)
        ver = sum(t["verified"] for t in tel)
        return {"hit_rate": hits / seen if seen else 0.0, "hits": hits, "band": sum(t["band"] for t in tel),
                "verified": ver, "verified_precision": sum(t["verified_ok"] for t in tel) / ver if ver else None,
                "bytes_saved": sum(t["bytes_saved"] for t in tel),
                "hit_threshold": {cid: c.hit for cid, c in self.caches.items()}}

    # ------------------------------------------------------------ connection

    def connect(self) -> None:
        """Probe the cloud, check it serves this plan, open the stream (or start reconnecting)."""
        if self.config.cloud is None or self.link is not None:
            return
        import grpc

        cfg = LinkConfig(target=self.config.cloud, **self.config.link)
        self.link = CloudLink(cfg, self._on_response, self._on_broken)
        try:
            desc = self.link.describe(timeout_s=self.config.connect_timeout_s)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                self.link.close()
                self.link = None
                raise UserError(f"cloud {self.config.cloud} refused this device ({exc.code().name}: "
                                f"{exc.details()}); check --token and the client certificate") from None
            if not self.config.offline_ok:
                self.link.close()
                self.link = None
                raise UserError(
                    f"cloud {self.config.cloud} unreachable ({exc.code().name}: {exc.details()}); start "
                    "`coach cloud serve` there, check --cloud, or pass --offline-ok to compute locally until it is up"
                ) from None
            log.warning("cloud %s unreachable; computing locally until it answers", self.config.cloud)
            self.link.start(connected=False)
            return
        plans = {(x.model, x.plan_sha256) for x in desc.bundles}
        if (self.bundle.model_name, self.bundle.plan_sha256) not in plans:
            self.link.close()
            self.link = None
            have = ", ".join(f"{m}@{h[:12]}" for m, h in sorted(plans)) or "none"
            raise UserError(f"cloud {self.config.cloud} has not loaded plan {self.bundle.model_name}@"
                            f"{self.bundle.plan_sha256[:12]} (it has: {have}); serve the same bundle there")
        self.link.start(connected=True)

    def close(self) -> None:
        if self.link is not None:
            self.stats["reconnects"] = self.link.reconnects
            self.link.close()
            self.link = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ the pipeline

    def run(self, samples: Iterable[Sample], rate_hz: float | None = None) -> Iterator[Result]:
        """Results in input order, one per sample. `rate_hz` paces the inputs (default: as fast as possible)."""
        self.connect()
        to_send: queue.Queue = queue.Queue(maxsize=1)
        state = {"count": None, "error": None}
        stop = threading.Event()

        def guarded(fn):
            def body():
                try:
                    fn()
                except BaseException as exc:  # surfaced in the caller's thread
                    state["error"] = exc
                    self._results.put(_DONE)
            return body

        def compute():
            period = 1.0 / rate_hz if rate_hz else 0.0
            t_next = time.perf_counter()
            seq = -1
            source = iter(samples)
            while True:
                t_ask = time.perf_counter()  # the source's own work (reading, preprocessing) or wait
                sample = next(source, None)
                if sample is None or stop.is_set():
                    break
                seq += 1
                if period:
                    delay = t_next - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    t_next = max(t_next + period, time.perf_counter() - period)
                if seq:  # the first one also opened the source
                    self._observe_input((time.perf_counter() - t_ask) * 1e3, first=seq == 1)
                item = _Item(seq=seq, sample=sample, t_capture=time.perf_counter())
                self._compute_head(item, to_send)
            state["count"] = seq + 1
            to_send.put(None)
            self._results.put(None)  # wakes the collector to re-check the count

        def send():
            while (item := to_send.get()) is not None:
                self._send(item)

        def local():
            while (item := self._local.get()) is not None:
                if not item.verify_only:  # a verification is dropped: its answer came from the cache
                    self._results.put(self._run_locally(item, fallback=True))

        threads = [threading.Thread(target=guarded(f), daemon=True, name=f"coach-edge-{f.__name__}")
                   for f in (compute, send, local)]
        watchdog = threading.Thread(target=guarded(lambda: self._watchdog(stop)), daemon=True)
        for t in threads + [watchdog]:
            t.start()
        try:
            yield from self._collect(state)
        finally:
            stop.set()
            self._local.put(None)
            for t in threads:
                t.join(timeout=5)

    def _collect(self, state) -> Iterator[Result]:
        ready: dict[int, Result] = {}
        nxt = 0
        while state["count"] is None or nxt < state["count"]:
            r = self._results.get()
            if r is _DONE and state["error"] is not None:
                raise state["error"]
            if isinstance(r, tuple):
                ready[r[0]] = r[1]
            while nxt in ready:
                yield ready.pop(nxt)
                nxt += 1

    def _compute_head(self, item: _Item, to_send: queue.Queue) -> None:
        decision = self._decide()
        cut = self.bundle.cuts[decision.cut_id]
        item.cut, item.bits = cut.id, decision.bits
        if cut.kind == "edge-only" or self.link is None or not self.link.up:
            if cut.kind == "edge-only" and self._calibration_due(self.config.probe_interval_s):
                to_send.put(dataclasses.replace(item, probe=True))  # nothing else measures the link now
            self._results.put(self._run_locally(item, fallback=cut.kind != "edge-only"))
            return
        t0 = time.perf_counter()
        # A cut tensor is a head output, or a model input the edge forwards as it is.
        item.tensors = {t.name: item.sample.inputs[t.name] for t in cut.tensors if t.source == "input"}
        names = [t.name for t in cut.tensors if t.source != "input"]
        if names:
            item.tensors.update(zip(names, self.heads[cut.id].run(names, item.sample.inputs)))
        item.head_ms = self._stretch(t0)
        with self._lock:
            self._observe(cut.id, edge_ms=item.head_ms)
        cache = self.caches.get(cut.id)
        if cache is not None:
            item.feature = cache.feature([item.tensors[t.name] for t in cut.tensors])
            item.cache = cache.decide(item.feature)
            with self._lock:
                self._observe(cut.id, hit_rate=cache.hit_rate)
            if item.cache.outcome == "hit":
                self._answer_from_cache(item, cache)
                if not item.cache.verify:
                    return
                item.verify_only = True
            elif item.cache.outcome == "band" and (item.bits is None or cache.config.band_bits < item.bits):
                item.bits = cache.config.band_bits
        item.t_queued = time.perf_counter()
        to_send.put(item)

    def _stretch(self, t0: float) -> float:
        """Milliseconds since t0, after waiting so that they are edge_slowdown times what they were."""
        ms = (time.perf_counter() - t0) * 1e3
        if self.config.edge_slowdown > 1:
            time.sleep(ms * (self.config.edge_slowdown - 1) / 1e3)
            ms *= self.config.edge_slowdown
        return ms

    def _answer_from_cache(self, item: _Item, cache: SemanticCache) -> None:
        d = item.cache
        if not d.verify:  # a verified hit is sent all the same
            cache.add_saved(_payload_bytes(self.bundle.cuts[item.cut], item.bits or 32))
        timing = {"edge_ms": item.head_ms, "encode_ms": 0.0, "wire_ms": 0.0, "cloud_ms": 0.0, "queue_ms": 0.0,
                  "total_ms": (time.perf_counter() - item.t_capture) * 1e3}
        with self._lock:
            self.stats["cache"] += 1
        score = 0.0 if d.reused else d.margin
        self._results.put((item.seq, Result(id=item.sample.id, cls=d.cls, score=score, where="cache", bits=None,
                                            cut=item.cut, timing=timing, label=item.sample.label)))

    def _send(self, item: _Item) -> None:
        if item.probe:  # from edge-only: only the copies
            self._send_probes(item)
            return
        self._wait_for_room()
        banded = item.cache is not None and item.cache.outcome == "band"
        if self.config.bits is None and not banded:  # the freshest estimate decides this request's bits
            d = self._decide()
            if d.cut_id == item.cut:
                item.bits = d.bits
            elif self.bundle.cuts[d.cut_id].kind == "edge-only":  # the link stalled since its head ran
                self._release_room()
                self._local.put(item)  # (a verification is dropped there)
                return
        if not banded and not item.verify_only and not item.charged:  # the cache pays for its band and hits
            with self._lock:
                self.quantizer.record(item.cut, item.bits)
            item.charged = True  # charged when sent: answered locally after a failure, it is not charged again
        self._transmit(item)
        if self._calibration_due():
            self._send_probes(item)

    def _calibration_due(self, interval_s: float | None = None) -> bool:
        """Probes are due: the estimate can change a decision (more than one cut or width to choose
        from), the link is up, and no answer gave the estimator a sample for `interval_s` (default
        `calibrate_interval_s`), nor were probes sent (so the first request is followed by some).
        Once the estimator is calibrated, not while the decision is settled (edge/adapt.settled: no
        higher estimate could change it): the probes' bytes would only delay the requests behind them."""
        cfg, now = self.config, time.perf_counter()
        interval = cfg.calibrate_interval_s if interval_s is None else interval_s
        if not self._adapts or interval <= 0 or self.link is None or not self.link.up:
            return False
        if now - max(self._last_sample, self._last_calibration) < interval:
            return False
        with self._lock:
            return not (self.estimator.calibrated and self.quantizer.settled())

    def _send_probes(self, item: _Item) -> None:
        """Copies of the input through the cloud-only cut (its raw inputs: no head to compute), back
        to back: one at 2 bits, then two at 32 bits. The big ones are several packets each, so the
        arrival gap of each behind the one before is a dispersion sample (a sub-packet message
        cannot give one), and the small one makes sure the estimator sees that they queued (its
        shorter transfer lowers the minimum delay below theirs). They are measure_only: the cloud
        answers with their arrival and runs nothing, and the answers only feed the estimator.
        They take in-flight slots beyond the cap (and count in it)."""
        cut = next((c for c in self.bundle.cuts.values() if c.kind == "cloud-only"), None)
        if cut is None:
            return
        self._last_calibration = time.perf_counter()
        tensors = {t.name: item.sample.inputs[t.name] for t in cut.tensors}
        for bits in (2, 32, 32):
            self._wait_for_room(cap=False)
            self._transmit(_Item(seq=item.seq, sample=item.sample, t_capture=item.t_capture, cut=cut.id, bits=bits,
                                 tensors=tensors, verify_only=True, charged=True, probe=True,
                                 t_queued=time.perf_counter()))

    def _transmit(self, item: _Item) -> None:
        """Encode, register as pending and send one request (its slot is taken)."""
        cut = self.bundle.cuts[item.cut]
        t0 = time.perf_counter()
        tensors = [codec.encode(item.tensors[t.name], item.bits, axis=t.quant_axis if item.bits <= 8 else None,
                                compress=self.config.compress, name=t.name) for t in cut.tensors]
        with self._lock:
            req_id = self._next_id
            self._next_id += 1
        req = pb.InferRequest(request_id=req_id, model=self.bundle.model_name, plan_sha256=self.bundle.plan_sha256,
                              cut_id=item.cut, tensors=tensors, measure_only=item.probe)
        item.encode_ms = (time.perf_counter() - t0) * 1e3
        item.nbytes = req.ByteSize()
        req.edge_timing.head_ms = item.head_ms
        req.edge_timing.encode_ms = item.encode_ms
        req.edge_timing.queue_ms = (t0 - item.t_queued) * 1e3
        req.edge_timing.send_unix_ns = item.send_ns = time.time_ns()
        item.t_sent = time.perf_counter()
        with self._lock:
            self._pending[req_id] = item
        if not (self.link is not None and self.link.send(req)):
            taken = self._take(req_id)
            if taken is not None:
                self._local.put(taken)
            return
        with self._lock:  # bytes on the uplink, answered or not (a request past its deadline was sent too)
            self.stats["probe_bytes" if item.probe else "verify_bytes" if item.verify_only else "bytes"] += item.nbytes

    def _take(self, req_id: int) -> _Item | None:
        """Remove a pending request exactly once (response, deadline and broken link race for it)."""
        with self._lock:
            item = self._pending.pop(req_id, None)
        if item is not None:
            self._release_room()
        return item

    def _note_rtt(self, rtt_ms: float) -> None:
        """One more round trip into the recent window, and its median and minimum. Lock held."""
        self._rtts.append(rtt_ms)
        self._rtt_median, self._rtt_min = float(np.median(self._rtts)), min(self._rtts)

    def _inflight_cap(self) -> int:
        """Requests in flight needed to keep the link and the cloud busy (Little's law: the recent
        median round trip over the current cut's period, plus one), at most `max_inflight`. More
        would only wait in the link's queue, and strand there when it stalls. Lock held."""
        cfg = self.config
        d = self.quantizer.decision
        cut = self.quantizer.cuts.get(d.cut_id) if d is not None else None
        if self._rtt_median is None or cut is None or cut.target_ms <= 0:
            return cfg.max_inflight
        return max(1, min(cfg.max_inflight, math.ceil(self._rtt_median / cut.target_ms) + 1))

    def _wait_for_room(self, cap: bool = True) -> None:
        """Take an in-flight slot, waiting for one under the cap (`cap` False: at once, beyond it)."""
        with self._room:
            while cap and self._inflight >= self._inflight_cap():
                self._room.wait(0.05)
            self._inflight += 1

    def _release_room(self) -> None:
        with self._room:
            self._inflight -= 1
            self._room.notify()

    def _on_response(self, resp: pb.InferResponse) -> None:
        t_recv = self._last_answer = time.perf_counter()
        with self._lock:
            self._stalled = False  # an answer, even a late one: the link moves again
        item = self._take(resp.request_id)
        if item is None:
            self.stats["late"] += 1  # already computed locally
            return
        if resp.error.code:
            log.warning("cloud refused request %d: %s; computing it locally", resp.request_id, resp.error.message)
            self._local.put(item)  # (a refused verification is dropped there)
            return
        st = resp.timing
        server_ms = st.queue_ms + st.decode_ms + st.compute_ms
        rtt_ms = (t_recv - item.t_sent) * 1e3
        wire_ms = max(rtt_ms - server_ms, 0.0)
        with self._lock:
            self._note_rtt(rtt_ms)
        if self.estimator.update(Observation(send_ns=item.send_ns, recv_ns=st.receive_unix_ns,
                                             nbytes=st.bytes_received)) is not None:
            self._last_sample = t_recv
        if not item.probe:  # (a probe runs nothing on the cloud: no T_c to learn from it)
            with self._lock:
                self._observe(item.cut, cloud_ms=st.decode_ms + st.compute_ms)  # service time: a queue is not T_c
        top = resp.topk[0] if resp.topk else pb.ClassScore(index=-1, score=0.0)
        if item.feature is not None:
            self.caches[item.cut].observe(item.feature, top.index, item.cache)
        if item.verify_only:
            return  # its result, from the cache, is out already
        timing = {"edge_ms": item.head_ms, "encode_ms": item.encode_ms, "wire_ms": wire_ms,
                  "cloud_ms": st.decode_ms + st.compute_ms,
                  "queue_ms": (item.t_sent - item.t_queued) * 1e3 + st.queue_ms,
                  "total_ms": (t_recv - item.t_capture) * 1e3}
        with self._lock:
            self.stats["cloud"] += 1
        self._results.put((item.seq, Result(id=item.sample.id, cls=top.index, score=top.score, where="cloud",
                                            bits=item.bits, cut=item.cut, timing=timing, label=item.sample.label)))

    def _on_broken(self) -> None:
        with self._lock:
            ids = list(self._pending)
        for i in ids:
            item = self._take(i)
            if item is not None:
                self._local.put(item)

    def _stall_ms(self) -> float:
        """How overdue an answer must be to call it a stall: rtt_factor x the median round trip of the
        recent answers, at least `stall_ms`; with no answers yet (or rtt_factor 0), the fixed deadline.
        Called with the lock held."""
        cfg = self.config
        if self._rtt_median is None or cfg.deadline_rtt_factor <= 0:
            return cfg.deadline_ms
        return max(cfg.stall_ms, cfg.deadline_rtt_factor * self._rtt_median)

    def _silent_ms(self, item: _Item, now: float) -> float:
        """How long the link has said nothing to this request: since it left, or since the latest
        answer if one came after (answers to others mean the link moves; a queue, not an outage)."""
        return (now - max(item.t_sent, self._last_answer)) * 1e3

    def _watchdog(self, stop: threading.Event) -> None:
        """Requests unanswered past the deadline are computed locally (a late answer is dropped). The
        deadline is the configured one, or sooner the stall time (`_stall_ms`): in an outage the
        requests in flight would otherwise wait for the link to come back."""
        while not stop.wait(0.05):
            now = time.perf_counter()
            with self._lock:
                limit_ms = min(self.config.deadline_ms, self._stall_ms())
                late = [i for i, it in self._pending.items() if now - it.t_sent > limit_ms / 1e3]
                if any(self._silent_ms(self._pending[i], now) > limit_ms for i in late):
                    # Silent that long (no answer since it left): an outage, as _bandwidth calls it. Said
                    # here too: taking these out of _pending first would hide it from _bandwidth, and
                    # the next requests would go on into the dead link, a batch every stall time.
                    self._stalled = True
            for i in late:
                item = self._take(i)
                if item is not None:
                    log.warning("request %d passed its %.0f ms deadline; computing it locally", i, limit_ms)
                    self._local.put(item)

    def _run_locally(self, item: _Item, fallback: bool) -> tuple[int, Result]:
        t0 = time.perf_counter()
        out = self.full.run(None, item.sample.inputs)[0]
        cls, score = _top1(out)
        full_ms = self._stretch(t0)
        edge_ms = full_ms + item.head_ms
        with self._lock:
            self.stats["fallback" if fallback else "edge"] += 1
            if not fallback:  # edge-only's T_e, measured like the heads'
                self._observe(item.cut, edge_ms=full_ms)
            if not item.charged:
                self.quantizer.record(item.cut, None)  # the full model's own answer: no drop
        timing = {"edge_ms": edge_ms, "encode_ms": 0.0, "wire_ms": 0.0, "cloud_ms": 0.0, "queue_ms": 0.0,
                  "total_ms": (time.perf_counter() - item.t_capture) * 1e3}
        return item.seq, Result(id=item.sample.id, cls=cls, score=score, where="edge", bits=None,
                                cut=item.cut if not fallback else f"{item.cut}>local", timing=timing,
                                label=item.sample.label)

    # ------------------------------------------------------------ adaptation

    def _decide(self) -> Decision:
        with self._lock:
            return self.quantizer.update(self._bandwidth())

    def _bandwidth(self) -> float | None:
        """The estimator's figure, or, when answers are overdue by far (an outage, during which no
        sample arrives), the stall bound (edge/bandwidth.stall_bound_mbps) if it is under half of it;
        0 (an outage) once the oldest answer is overdue by the stall time (`_stall_ms`), and until an
        answer comes (the estimate before the outage is stale). Called with the lock held."""
        est = self.estimator.estimate_mbps()
        if self._stalled:
            return 0.0
        if not self._pending:
            return est
        oldest = self._pending[min(self._pending)]
        cut = self.quantizer.cuts.get(oldest.cut)
        waited_ms = self._silent_ms(oldest, time.perf_counter())
        if waited_ms > self._stall_ms():
            self._stalled = True  # (the deadline computes these locally)
            return 0.0  # a measured outage, until the next answer
        if est is None:  # not calibrated yet (nothing queued): no figure
            return None
        # What any answer takes besides the transfer (propagation, the cloud): the shortest recent round
        # trip. And the bound is evidence only well past the transfer the estimate expects (4x, and 50 ms
        # more): for a message of a few hundred bytes a scheduling hiccup would otherwise "bound" the
        # link to a few kbit/s.
        base_ms = self._rtt_min if self._rtt_min is not None else (cut.cloud_ms if cut else 0.0)
        if est > 0 and waited_ms < base_ms + 4 * oldest.nbytes * 8 / (est * 1e3) + 50.0:
            return est
        bound = stall_bound_mbps(oldest.nbytes, waited_ms, base_ms)
        return bound if bound < 0.5 * est else est
