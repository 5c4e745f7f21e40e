"""COACH plan search: which cut, which bit width, for each bandwidth level.

    cands, mode = frontier(g)          # Pareto frontier of cuts of a CostGraph ("exact" or not)
    choice = choose(cands, [32, 16, 8, 6, 4, 3, 2], Link(40.0), accuracy_drop, budget=0.5)
    rows = plan_table(cands, bits, [5, 10, 20, 40], accuracy_drop, budget=0.5)

Public API (kept stable for plan_cli / baselines / bench):
    CutCandidate, Link, StageTimes, Choice, PlanRow   frozen dataclasses
    payload_bytes(elements, bits) -> int
    stage_times(cut, bits, link) -> StageTimes
    frontier(g, *, exact_limit=4096, orders=4, max_points=5000, stats=None)
        -> (list[CutCandidate], mode)   mode: "exact" | "topological-fallback" | "approximate"
    enumerate_downsets(g, limit=1 << 16) -> list[CutCandidate]
    topological_cuts(g, order=None) -> list[CutCandidate]
    choose(cands, bits_options, link, accuracy_drop, budget, rate_hz=None, *,
           objective="pipeline", lazy=True, oracle=None) -> Choice
    plan_table(cands, bits_options, bandwidths_mbps, accuracy_drop, budget, rate_hz=None,
               overhead_ms=0.0, *, oracle=None) -> list[PlanRow]
    AccuracyOracle(accuracy_drop, budget, bits_options)  memoised, counted, binary-searched drops

1. Frontier. A cut E (down-set of the cost DAG) costs T_e = sum of edge times in E, saves
   sum of cloud times in E, and sends the cut tensors (partitioner.graph). Every objective below is
   monotone in (T_e, T_c, elements), so only the Pareto frontier of those three matters (for a
   fixed bit width; the accuracy of a cut is not part of the frontier). The frontier is computed by
   recursive divide and conquer over *regions* (sets of nodes, all of whose outside readers are
   in the cloud while the region is partly on the edge). A region's points carry, beside
   (T_e, saved, elements), the set of its entry tensors (made outside it) that its cloud part
   still reads; a parent counts those once. A region is split, in this order:
     - into weakly connected components (parallel branches): frontiers add up (Minkowski sum);
     - at chain boundaries, where the only live tensors come from one node and no entry is read
       later (single-tensor cut points): a cut lies in one segment, all segments before it on the
       edge, all after it in the cloud (union);
     - by peeling a unique sink (in the edge => all of the region is) or a unique source (not in
       the edge => none of the region is);
     - else (not series-parallel there): all down-sets of the region when there are at most
       `exact_limit` of them (still exact), otherwise the prefixes of several topological orders
       of the region (mode "topological-fallback").
   Frontiers are pruned at every level; a point dominates another when it has no more edge time,
   no less saved time and no more elements even after paying for entries only it reads. This is
   exact on series-parallel graphs (tests compare it with enumerate_downsets). A safety valve keeps
   memory and time bounded: a region frontier of more than `max_points` points (or parallel
   branches whose frontiers multiply to more than MAX_PRODUCT) is thinned to one point per box of
   a fine grid (relative step from 0.2%, the region's empty and full points always kept), and the
   mode says "approximate". The nine onnx light CNNs stay exact with synthetic profiles.

2. Choice (DESIGN.md objective). With a rate r: minimise latency subject to period <= 1/r; with
   none, or when nothing meets it: minimise period, then latency. Always subject to accuracy drop
   <= budget. (cut, bits) pairs are ranked best first as if admissible (vectorised, numpy) and
   walked in that order; the accuracy callback is called only for a pair that would win now and
   whose admissibility is unknown. Admissibility per cut is an up-set in bits (drop is assumed
   non-increasing in bits): the smallest admissible width is found by binary search over the bit
   widths, memoised. bits 32 is always admissible (drop 0, no call); a callback that returns None
   ("cannot measure") makes that width admissible when it is >= 16 (fp16) and inadmissible below.
   Edge-only sends nothing and is offered at 32 bits only.

   Payload: elements x bits (4 bytes at 32, whatever the dtype) + HEADER_BYTES per message.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import sys
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable

import numpy as np

from partitioner.graph import CostGraph, cut_elements, cut_tensors

log = logging.getLogger(__name__)

HEADER_BYTES = 64  # per message on the wire: request id, dtype, shape, scale/zero point
SUPPORTED_BITS = (32, 16, 8, 6, 4, 3, 2)
UNSIZED = 1 << 62  # element count standing for "size unknown" inside the search
MAX_PRODUCT = 400_000  # parallel branches whose frontiers multiply to more are thinned first

AccuracyDrop = Callable[["CutCandidate", int], "float | None"]


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class CutCandidate:
    id: str  # "edge-only", "cloud-only" or "cut-<hash of the edge node set>"
    edge_nodes: frozenset[str]
    tensors: tuple[str, ...]  # cut tensors, model inputs first, then in topological order
    elements: int  # sum of the cut tensors' element counts
    edge_ms: float  # T_e (edge session overhead included)
    cloud_ms: float  # T_c (cloud session overhead included)
    kind: str  # "edge-only" | "cloud-only" | "interior"

    def as_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "tensors": list(self.tensors),
                "elements": self.elements, "edge_ms": self.edge_ms, "cloud_ms": self.cloud_ms,
                "edge_nodes": sorted(self.edge_nodes)}


@dataclass(frozen=True)
class Link:
    bandwidth_mbps: float
    overhead_ms: float = 0.0  # per message (round-trip share, framing)

    def __post_init__(self):
        if not self.bandwidth_mbps > 0:
            raise ValueError(f"bandwidth must be > 0 Mbit/s, got {self.bandwidth_mbps}")
        if not self.overhead_ms >= 0:
            raise ValueError(f"link overhead must be >= 0 ms, got {self.overhead_ms}")


@dataclass(frozen=True)
class StageTimes:
    edge_ms: float
    transfer_ms: float
    cloud_ms: float
    latency_ms: float  # T_e + T_t + T_c
    period_ms: float  # max(T_e, T_t, T_c)
    bubble_ratio: float  # 1 - (T_e + T_t + T_c) / (3 * period)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Choice:
    cut: CutCandidate
    bits: int
    times: StageTimes
    evaluations: int  # accuracy callback calls made by this choice (memo hits not counted)
    drop: float | None  # accuracy drop of (cut, bits) when known (0 for 32 bits)
    meets_rate: bool | None  # period <= 1/rate; None without a rate


@dataclass(frozen=True)
class PlanRow:
    bandwidth_mbps: float
    cut: CutCandidate
    bits: int
    times: StageTimes
    drop: float | None
    evaluations: int
    meets_rate: bool | None

    def as_dict(self) -> dict:
        return {"bandwidth_mbps": self.bandwidth_mbps, "cut": self.cut.id, "bits": self.bits,
                "tensors": list(self.cut.tensors), "drop": self.drop, "meets_rate": self.meets_rate,
                **self.times.as_dict()}


# ---------------------------------------------------------------- stage times


def payload_bytes(elements: int, bits: int) -> int:
    """Bytes on the wire for `elements` values at `bits`: 4n (32), 2n (16), ceil(n*b/8) (b <= 8),
    plus HEADER_BYTES per message."""
    if elements < 0:
        raise ValueError(f"element count must be >= 0, got {elements}")
    if bits == 32:
        body = 4 * elements
    elif bits == 16:
        body = 2 * elements
    elif 1 <= bits <= 8:
        body = (elements * bits + 7) // 8
    else:
        raise ValueError(f"unsupported bit width {bits}; use 32, 16 or 1..8")
    return body + HEADER_BYTES


def _times(edge_ms: float, transfer_ms: float, cloud_ms: float) -> StageTimes:
    lat = edge_ms + transfer_ms + cloud_ms
    per = max(edge_ms, transfer_ms, cloud_ms)
    bubble = 1.0 - lat / (3.0 * per) if per > 0 else 0.0
    return StageTimes(edge_ms, transfer_ms, cloud_ms, lat, per, bubble)


def transfer_ms(c: CutCandidate, bits: int, link: Link) -> float:
    if c.kind == "edge-only":
        return 0.0
    return payload_bytes(c.elements, bits) * 8.0 / (link.bandwidth_mbps * 1e3) + link.overhead_ms


def stage_times(c: CutCandidate, bits: int, link: Link) -> StageTimes:
    """Predicted stage times of cut `c` sending at `bits` over `link` (edge-only: no transfer)."""
    return _times(c.edge_ms, transfer_ms(c, bits, link), c.cloud_ms)


# ---------------------------------------------------------------- the compiled problem


class _Problem:
    """The cost DAG as integer-indexed arrays and bitmasks (nodes in topological order)."""

    def __init__(self, g: CostGraph):
        info = g.info
        self.g = g
        self.names = list(info.compute)
        n = len(self.names)
        pos = {nm: i for i, nm in enumerate(self.names)}
        self.e = [g.edge_ms[nm] for nm in self.names]
        self.c = [g.cloud_ms[nm] for nm in self.names]
        outputs = set(info.outputs)
        tnames = [t for t in info.inputs if t in info.consumers or t in outputs]
        tnames += [o for nm in self.names for o in info.node(nm).outputs
                   if o in info.consumers or o in outputs]
        self.tnames = tnames
        tid = {t: i for i, t in enumerate(tnames)}
        self.size = []
        for t in tnames:
            k = info.elements(t)
            self.size.append(UNSIZED if k is None else k)
        self.prod = [pos[info.producer[t]] if t in info.producer else -1 for t in tnames]
        self.cons = [sum(1 << pos[c] for c in info.consumers.get(t, ())) for t in tnames]
        self.is_out = [t in outputs for t in tnames]
        self.passthrough = sum(1 << tid[t] for t in info.inputs if t in outputs and t in tid)
        self.node_in: list[list[int]] = [[] for _ in range(n)]
        self.node_out: list[list[int]] = [[] for _ in range(n)]
        for t, i in tid.items():
            if self.prod[i] >= 0:
                self.node_out[self.prod[i]].append(i)
            for c in info.consumers.get(t, ()):
                self.node_in[pos[c]].append(i)
        self.in_mask = [sum(1 << t for t in ts) for ts in self.node_in]
        self.out_mask = [sum(1 << t for t in ts) for ts in self.node_out]
        self.preds = [[pos[p] for p in info.preds[nm]] for nm in self.names]
        self.succs = [[pos[s] for s in info.succs[nm]] for nm in self.names]
        self.e_arr = np.array(self.e, dtype=np.float64)
        self.c_arr = np.array(self.c, dtype=np.float64)
        self.by_name = np.argsort(np.array(self.names, dtype=object))
        self.sorted_names = np.array(self.names, dtype=object)[self.by_name]
        self.pred_mask = [sum(1 << p for p in ps) for ps in self.preds]
        self.succ_mask = [sum(1 << s for s in ss) for ss in self.succs]
        self._msize: dict[int, int] = {}

    def msize(self, mask: int) -> int:
        """Sum of the sizes of the tensors in a bitmask (memoised)."""
        v = self._msize.get(mask)
        if v is None:
            v, m = 0, mask
            while m:
                low = m & -m
                v += self.size[low.bit_length() - 1]
                m ^= low
            self._msize[mask] = v
        return v

    def bits_of(self, mask: int) -> list[int]:
        out = []
        while mask:
            low = mask & -mask
            out.append(low.bit_length() - 1)
            mask ^= low
        return out


# A point: (edge_ms, saved_cloud_ms, elements, entry_mask, node_bits, tensor_bits).


def _prune(pts: list[tuple], msize: Callable[[int], int]) -> list[tuple]:
    """Pareto pruning (dominance rule with entry masks: see the module doc), O(n log n) per mask
    group: points sorted by edge time, then per entry mask a staircase of (elements, saved)."""
    if len(pts) <= 1:
        return pts
    pts.sort(key=lambda p: (p[0], -p[1], p[2], msize(p[3])))
    stairs: dict[int, tuple[list[int], list[float]]] = {}  # mask -> (elements up, saved up)
    kept: list[tuple] = []
    for q in pts:
        qs, qel, qm = q[1], q[2], q[3]
        dominated = False
        for m, (els, ss) in stairs.items():
            extra = m & ~qm
            lim = qel - msize(extra) if extra else qel
            k = bisect_right(els, lim) - 1
            if k >= 0 and ss[k] >= qs:
                dominated = True
                break
        if dominated:
            continue
        kept.append(q)
        els, ss = stairs.setdefault(qm, ([], []))
        k = bisect_right(els, qel)
        if k > 0 and els[k - 1] == qel:
            k -= 1  # same elements, less saved: q replaces it
        j = k
        while j < len(els) and ss[j] <= qs:
            j += 1
        els[k:j] = [qel]
        ss[k:j] = [qs]
    return kept


def _thin(pts: list[tuple], cap: int, msize: Callable[[int], int], keep: int) -> list[tuple]:
    """Keep at most `cap` points: the empty and the full point (node bits 0 and `keep`), then one
    per box of a grid that is relative eps in elements and eps * (largest value) in the two times
    (and per entry mask while eps < 1), eps doubling from 0.2% until the points fit."""
    ends = [p for p in pts if p[4] == 0 or p[4] == keep]
    pts = [p for p in pts if p[4] != 0 and p[4] != keep]
    cap = max(0, cap - len(ends))
    if not pts:
        return ends
    top_e = max(p[0] for p in pts) or 1.0
    top_s = max(p[1] for p in pts) or 1.0
    eps = 0.002
    while True:
        boxes: dict[tuple, tuple] = {}
        for p in pts:  # sorted by edge time already (by _prune)
            key = (int(p[0] / (eps * top_e)), int(p[1] / (eps * top_s)),
                   int(math.log1p(p[2] + msize(p[3])) / math.log1p(eps)), p[3] if eps < 1 else 0)
            boxes.setdefault(key, p)
        if len(boxes) <= cap:
            return ends + list(boxes.values())
        eps *= 2


class _Solver:
    def __init__(self, prob: _Problem, exact_limit: int, orders: int, max_points: int = 0):
        self.p = prob
        self.exact_limit = exact_limit
        self.orders = max(1, orders)
        self.max_points = max_points
        self.stats = {"regions": 0, "components": 0, "chains": 0, "peel_sink": 0, "peel_source": 0,
                      "exhaustive_regions": 0, "fallback_regions": 0, "fallback_nodes": 0,
                      "thinned_regions": 0, "largest_region_frontier": 0}

    # -- region helpers (a region: sorted list of node indices + its bitmask)

    def entries(self, region: list[int], rbits: int) -> int:
        p = self.p
        ins = outs = 0
        for i in region:
            ins |= p.in_mask[i]
            outs |= p.out_mask[i]
        return ins & ~outs

    def exits(self, region: list[int], rbits: int) -> int:
        """Tensors made in the region that something outside it reads (or model outputs)."""
        p = self.p
        m = 0
        for i in region:
            for t in p.node_out[i]:
                if p.cons[t] & ~rbits or p.is_out[t]:
                    m |= 1 << t
        return m

    def full(self, region: list[int], rbits: int) -> tuple:
        p = self.p
        ex = self.exits(region, rbits)
        return (sum(p.e[i] for i in region), sum(p.c[i] for i in region), p.msize(ex), 0, rbits, ex)

    def empty(self, region: list[int], rbits: int) -> tuple:
        return (0.0, 0.0, 0, self.entries(region, rbits), 0, 0)

    # -- the recursion

    def solve(self, region: list[int], rbits: int) -> list[tuple]:
        pts = self._solve(region, rbits)
        self.stats["largest_region_frontier"] = max(self.stats["largest_region_frontier"], len(pts))
        if self.max_points and len(pts) > self.max_points:
            self.stats["thinned_regions"] += 1
            pts = _thin(pts, self.max_points, self.p.msize, rbits)
        return pts

    def _solve(self, region: list[int], rbits: int) -> list[tuple]:
        self.stats["regions"] += 1
        if len(region) == 1:
            return [self.empty(region, rbits), self.full(region, rbits)]
        comps = self.components(region, rbits)
        if len(comps) > 1:
            self.stats["components"] += 1
            acc, accbits = None, 0
            for comp, cbits in comps:
                f = self.solve(comp, cbits)
                acc = f if acc is None else self.minkowski(acc, f, accbits, cbits)
                accbits |= cbits
            return acc
        segs = self.chain(region, rbits)
        if len(segs) > 1:
            self.stats["chains"] += 1
            return self.series(region, rbits, segs)
        p = self.p
        sinks = [i for i in region if not p.succ_mask[i] & rbits]
        if len(sinks) == 1:
            self.stats["peel_sink"] += 1
            last = sinks[0]
            sub = [i for i in region if i != last]
            sbits = rbits & ~(1 << last)
            need = p.in_mask[last] & ~self.made(sub)  # entries the sink reads (cloud side)
            pts = [(q[0], q[1], q[2], q[3] | need, q[4], q[5]) for q in self.solve(sub, sbits)]
            pts.append(self.full(region, rbits))
            return _prune(pts, p.msize)
        sources = [i for i in region if not p.pred_mask[i] & rbits]
        if len(sources) == 1:
            self.stats["peel_source"] += 1
            first = sources[0]
            sub = [i for i in region if i != first]
            sbits = rbits & ~(1 << first)
            outs = p.out_mask[first]
            always = 0
            for t in p.node_out[first]:
                if p.cons[t] & ~rbits or p.is_out[t]:
                    always |= 1 << t
            e0, c0, b0 = p.e[first], p.c[first], 1 << first
            pts = [self.empty(region, rbits)]
            for q in self.solve(sub, sbits):
                res = (q[3] & outs) | always
                pts.append((q[0] + e0, q[1] + c0, q[2] + p.msize(res), q[3] & ~outs, q[4] | b0,
                            q[5] | res))
            return _prune(pts, p.msize)
        return self.fallback(region, rbits)

    def made(self, region: list[int]) -> int:
        m = 0
        for i in region:
            m |= self.p.out_mask[i]
        return m

    def components(self, region: list[int], rbits: int) -> list[tuple[list[int], int]]:
        parent = {i: i for i in region}

        def find(a):
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for i in region:
            for q in self.p.preds[i]:
                if rbits >> q & 1:
                    ra, rb = find(i), find(q)
                    if ra != rb:
                        parent[ra] = rb
        groups: dict[int, list[int]] = {}
        for i in region:
            groups.setdefault(find(i), []).append(i)
        if len(groups) == 1:
            return [(region, rbits)]
        return [(g, sum(1 << i for i in g)) for g in groups.values()]

    def chain(self, region: list[int], rbits: int) -> list[list[int]]:
        """Split at boundaries where every live tensor comes from the node just before."""
        p = self.p
        n = len(region)
        first: dict[int, int] = {}  # tensor -> position made (-1: an entry, made outside)
        last: dict[int, int] = {}  # tensor -> last position read (n: read outside / an output)
        for k, node in enumerate(region):
            for t in p.node_in[node]:
                first.setdefault(t, -1)
                last[t] = max(last.get(t, -1), k)
            for t in p.node_out[node]:
                first[t] = k
                if p.cons[t] & ~rbits or p.is_out[t]:
                    last[t] = n
        # live[b] = tensors live at the boundary after position b: first <= b < last.
        diff = [0] * (n + 2)
        for t, f in first.items():
            hi = max(last.get(t, f), f)
            diff[f + 1] += 1
            diff[hi + 1] -= 1
        segs, start, live = [], 0, diff[0]
        for b in range(0, n - 1):
            live += diff[b + 1]
            if live == len(p.node_out[region[b]]):
                segs.append(region[start:b + 1])
                start = b + 1
        segs.append(region[start:])
        return segs

    def series(self, region: list[int], rbits: int, segs: list[list[int]]) -> list[tuple]:
        p = self.p
        entries = self.entries(region, rbits)
        pts: list[tuple] = []
        pe = ps = 0.0
        pbits = 0
        prev_live = 0  # tensors live at the boundary before the current segment
        for k, seg in enumerate(segs):
            sbits = sum(1 << i for i in seg)
            always = 0
            for t in p.bits_of(prev_live):
                if p.cons[t] & ~sbits or p.is_out[t]:
                    always |= 1 << t
            for q in self.solve(seg, sbits):
                if k > 0 and q[4] == 0:
                    continue  # the segment empty = the previous one full
                res = (q[3] & ~entries) | always
                pts.append((pe + q[0], ps + q[1], q[2] + p.msize(res), q[3] & entries,
                            pbits | q[4], q[5] | res))
            pe += sum(p.e[i] for i in seg)
            ps += sum(p.c[i] for i in seg)
            pbits |= sbits
            prev_live = self.exits(seg, sbits)
        return _prune(pts, p.msize)

    def minkowski(self, a: list[tuple], b: list[tuple], abits: int, bbits: int) -> list[tuple]:
        msize = self.p.msize
        if self.max_points and len(a) * len(b) > MAX_PRODUCT:  # thin both sides first
            side = max(2, math.isqrt(MAX_PRODUCT))
            self.stats["thinned_regions"] += 1
            a = _thin(a, side, msize, abits) if len(a) > side else a
            b = _thin(b, side, msize, bbits) if len(b) > side else b
        pts = []
        for x in a:
            for y in b:
                mask = x[3] | y[3]
                # entries both read are counted once at the parent: keep them in the mask only
                pts.append((x[0] + y[0], x[1] + y[1], x[2] + y[2], mask, x[4] | y[4], x[5] | y[5]))
        return _prune(pts, msize)

    # -- not series-parallel here

    def point(self, region: list[int], rbits: int, ebits: int) -> tuple:
        """The point of the down-set `ebits` of a region, computed directly."""
        p = self.p
        e = s = 0.0
        mask = tens = 0
        for i in region:
            if ebits >> i & 1:
                e += p.e[i]
                s += p.c[i]
                for t in p.node_out[i]:
                    if p.cons[t] & ~ebits or p.is_out[t]:
                        tens |= 1 << t
            else:
                mask |= p.in_mask[i]
        made = self.made(region)
        mask &= ~made
        return (e, s, p.msize(tens), mask, ebits, tens)

    def downsets(self, region: list[int], rbits: int, limit: int) -> list[int] | None:
        """All down-sets of the region (bitmasks), or None when there are more than `limit`."""
        p = self.p
        out: list[int] = []
        stack = [(0, 0)]  # (position in region, chosen bits)
        while stack:
            k, bits = stack.pop()
            if k == len(region):
                out.append(bits)
                if len(out) > limit:
                    return None
                continue
            node = region[k]
            stack.append((k + 1, bits))
            if all(bits >> q & 1 for q in p.preds[node] if rbits >> q & 1):
                stack.append((k + 1, bits | 1 << node))
        return out

    def fallback(self, region: list[int], rbits: int) -> list[tuple]:
        sets = self.downsets(region, rbits, self.exact_limit) if self.exact_limit > 0 else None
        if sets is not None:
            self.stats["exhaustive_regions"] += 1
            return _prune([self.point(region, rbits, b) for b in sets], self.p.msize)
        self.stats["fallback_regions"] += 1
        self.stats["fallback_nodes"] += len(region)
        pts = [self.empty(region, rbits)]
        for order in _orders(self.p, region, rbits, self.orders):
            pts += self.prefix_points(region, rbits, order)
        return _prune(pts, self.p.msize)

    def prefix_points(self, region: list[int], rbits: int, order: list[int]) -> list[tuple]:
        """Points of every prefix of a topological order of the region (incremental)."""
        p = self.p
        remaining: dict[int, int] = {}  # tensor -> readers in the region not yet on the edge
        for i in region:
            for t in p.node_in[i]:
                remaining[t] = remaining.get(t, 0) + 1
        made = self.made(region)
        mask = 0
        for t, k in remaining.items():
            if not made >> t & 1:
                mask |= 1 << t
        tens = 0
        e = s = 0.0
        ebits = 0
        pts = []
        for i in order:
            e += p.e[i]
            s += p.c[i]
            ebits |= 1 << i
            for t in p.node_in[i]:
                remaining[t] -= 1
                if remaining[t] == 0:
                    mask &= ~(1 << t)
                    if not (p.cons[t] & ~rbits or p.is_out[t]):
                        tens &= ~(1 << t)
            for t in p.node_out[i]:
                if remaining.get(t, 0) > 0 or p.cons[t] & ~rbits or p.is_out[t]:
                    tens |= 1 << t
            pts.append((e, s, p.msize(tens), mask, ebits, tens))
        return pts


def _orders(p: _Problem, region: list[int], rbits: int, count: int) -> list[list[int]]:
    """Several topological orders of a region: index order, depth-first (finish a branch before
    the next), largest index first among ready nodes, and fewest live tensors first."""
    orders = [list(region)]
    indeg = {i: sum(1 for q in p.preds[i] if rbits >> q & 1) for i in region}

    def kahn(priority) -> list[int]:
        deg = dict(indeg)
        heap = [(priority(i, 0), i) for i in region if deg[i] == 0]
        heapq.heapify(heap)
        out, step = [], 0
        while heap:
            _, i = heapq.heappop(heap)
            out.append(i)
            step += 1
            for s in p.succs[i]:
                if s in deg:
                    deg[s] -= 1
                    if deg[s] == 0:
                        heapq.heappush(heap, (priority(s, step), s))
        return out

    if count >= 2:
        orders.append(kahn(lambda i, step: (-step, i)))  # depth-first: newest ready node first
    if count >= 3:
        orders.append(kahn(lambda i, step: (-i, 0)))
    if count >= 4:
        # memory-aware: prefer nodes that free more than they make
        def gain(i, step):
            return (p.msize(p.out_mask[i]) - p.msize(p.in_mask[i]), i)
        orders.append(kahn(gain))
    return orders[:count]


# ---------------------------------------------------------------- candidates


def _node_mask(ebits: int, n: int) -> np.ndarray:
    raw = np.frombuffer(ebits.to_bytes((n + 7) // 8, "little"), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:n].astype(bool)


def _candidate(prob: _Problem, ebits: int, tbits: int) -> CutCandidate | None:
    g = prob.g
    n = len(prob.names)
    everything = (1 << n) - 1
    if ebits == everything:
        kind, tbits = "edge-only", 0
    else:
        tbits |= prob.passthrough
        kind = "cloud-only" if ebits == 0 else "interior"
    elements = prob.msize(tbits)
    if elements >= UNSIZED:
        return None
    mask = _node_mask(ebits, n)
    in_order = prob.sorted_names[mask[prob.by_name]]  # edge node names, sorted
    edge_nodes = frozenset(in_order)
    e = float(prob.e_arr[mask].sum())
    c = float(prob.c_arr[~mask].sum())
    if ebits:
        e += g.edge_overhead_ms
    if ebits != everything:
        c += g.cloud_overhead_ms
    tensors = tuple(prob.tnames[t] for t in prob.bits_of(tbits))
    cid = kind if kind != "interior" else _digest(in_order)
    return CutCandidate(cid, edge_nodes, tensors, elements, e, c, kind)


def _digest(sorted_names) -> str:
    return "cut-" + hashlib.sha1("\n".join(sorted_names).encode()).hexdigest()[:10]


def cut_id(kind: str, edge_nodes: frozenset[str]) -> str:
    """A candidate's id: its kind for edge-only and cloud-only, else "cut-" + a hash of the
    sorted edge node ids (stable across profiles of the same model)."""
    return kind if kind != "interior" else _digest(sorted(edge_nodes))


def _pareto_candidates(cands: list[CutCandidate]) -> list[CutCandidate]:
    cands = sorted(cands, key=lambda c: (c.edge_ms, c.cloud_ms, c.elements, c.id))
    kept: list[CutCandidate] = []
    for q in cands:
        if any(p.cloud_ms <= q.cloud_ms and p.elements <= q.elements for p in kept):
            continue
        kept.append(q)
    return kept


def frontier(g: CostGraph, *, exact_limit: int = 4096, orders: int = 4, max_points: int = 5000,
             stats: dict | None = None) -> tuple[list[CutCandidate], str]:
    """Pareto frontier of cuts in (edge ms, cloud ms, elements), sorted by edge time, and the mode:
    "exact"; "topological-fallback" when some region was neither series-parallel nor small enough
    for exhaustive enumeration (see the module doc); "approximate" when some region's frontier had
    more than `max_points` points and was thinned to that many (a grid of relative step >= 0.2%;
    0 = never thin). `stats`, when given, is filled with counts."""
    prob = _Problem(g)
    n = len(prob.names)
    if n == 0:
        raise ValueError("the model has no compute nodes to place (every node is constant-like)")
    solver = _Solver(prob, exact_limit, orders, max_points)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 8 * n + 1000))
    try:
        region = list(range(n))
        pts = solver.solve(region, (1 << n) - 1)
    finally:
        sys.setrecursionlimit(old)
    cands = []
    for q in pts:
        c = _candidate(prob, q[4], q[5] | q[3])
        if c is not None:
            cands.append(c)
    unsized = len(pts) - len(cands)
    if unsized:
        log.warning("%d frontier cut(s) left out: a cut tensor has no static size", unsized)
    out = _pareto_candidates(cands)
    mode = "exact"
    if solver.stats["fallback_regions"]:
        mode = "topological-fallback"
    elif solver.stats["thinned_regions"]:
        mode = "approximate"
    if stats is not None:
        stats.update(solver.stats, nodes=n, points=len(pts), candidates=len(out), mode=mode)
    return out, mode


def enumerate_downsets(g: CostGraph, limit: int = 1 << 16) -> list[CutCandidate]:
    """Every down-set of the cost DAG as a candidate (not pruned), its cut tensors computed by
    partitioner.graph.cut_tensors (independently of the frontier's bookkeeping). For tests and
    small graphs; ValueError when there are more than `limit`."""
    prob = _Problem(g)
    n = len(prob.names)
    solver = _Solver(prob, limit, 1)
    sets = solver.downsets(list(range(n)), (1 << n) - 1, limit)
    if sets is None:
        raise ValueError(f"more than {limit} down-sets; use frontier() for a graph this size")
    info = g.info
    out = []
    for b in sets:
        edge = frozenset(prob.names[i] for i in range(n) if b >> i & 1)
        tensors = cut_tensors(info, edge)
        elements = cut_elements(info, tensors)
        if elements is None:
            continue
        kind = "edge-only" if len(edge) == n else ("cloud-only" if not edge else "interior")
        e = sum(g.edge_ms[nm] for nm in edge) + (g.edge_overhead_ms if edge else 0.0)
        c = sum(g.cloud_ms[nm] for nm in info.compute if nm not in edge)
        c += g.cloud_overhead_ms if kind != "edge-only" else 0.0
        out.append(CutCandidate(cut_id(kind, edge), edge, tensors, elements, e, c, kind))
    return out


def topological_cuts(g: CostGraph, order: list[str] | None = None) -> list[CutCandidate]:
    """The cuts along one topological order (each prefix, cloud-only and edge-only included):
    the chain view of Neurosurgeon-style partitioners. Default order: GraphInfo.compute."""
    prob = _Problem(g)
    n = len(prob.names)
    pos = {nm: i for i, nm in enumerate(prob.names)}
    idx = list(range(n)) if order is None else [pos[nm] for nm in order]
    if sorted(idx) != list(range(n)):
        raise ValueError("order must list every cost-DAG node once")
    done = 0
    for i in idx:
        if prob.pred_mask[i] & ~done:
            raise ValueError(f"order is not topological at node '{prob.names[i]}'")
        done |= 1 << i
    solver = _Solver(prob, 0, 1)
    region = list(range(n))
    pts = [solver.empty(region, (1 << n) - 1)] + solver.prefix_points(region, (1 << n) - 1, idx)
    out = []
    for q in pts:
        c = _candidate(prob, q[4], q[5] | q[3])
        if c is not None:
            out.append(c)
    return out


# ---------------------------------------------------------------- accuracy


class AccuracyOracle:
    """Memoised accuracy drops with binary search for the smallest admissible bit width per cut.

    `calls` counts callback calls. Share one oracle between choices (plan_table does) so that a
    (cut, bits) pair is measured at most once. Per cut it keeps the largest width known to be
    inadmissible and the smallest known to be admissible (32 to begin with); widths in between
    are unknown, and `admissible` probes the middle one of those until the asked width is known."""

    def __init__(self, accuracy_drop: AccuracyDrop, budget: float, bits_options=SUPPORTED_BITS):
        self.accuracy_drop = accuracy_drop
        self.budget = float(budget)
        self.levels = sorted({int(b) for b in bits_options} | {32})
        for b in self.levels:
            payload_bytes(0, b)  # validates the width
        self.calls = 0
        self.drops: dict[tuple[str, int], float | None] = {}
        self._bad: dict[str, int] = {}  # cut id -> largest width known inadmissible
        self._good: dict[str, int] = {}  # cut id -> smallest width known admissible

    def _ok(self, bits: int, drop: float | None) -> bool:
        if bits >= 32:
            return True
        if drop is None:
            return bits >= 16
        return drop <= self.budget

    def measure(self, cut: CutCandidate, bits: int) -> float | None:
        """The callback's drop for (cut, bits), memoised (32 bits: 0, no call)."""
        if bits >= 32:
            return 0.0
        key = (cut.id, bits)
        if key not in self.drops:
            self.calls += 1
            d = self.accuracy_drop(cut, bits)
            self.drops[key] = None if d is None else float(d)
            if bits not in self.levels:
                payload_bytes(0, bits)
                self.levels = sorted(set(self.levels) | {bits})
            if self._ok(bits, self.drops[key]):
                self._good[cut.id] = min(self._good.get(cut.id, 32), bits)
            else:
                self._bad[cut.id] = max(self._bad.get(cut.id, 0), bits)
        return self.drops[key]

    def known(self, cut: CutCandidate, bits: int) -> bool | None:
        """Admissibility of (cut, bits) if known without a call, else None."""
        if bits >= 32:
            return True
        key = (cut.id, bits)
        if key in self.drops:
            return self._ok(bits, self.drops[key])
        if bits >= self._good.get(cut.id, 32):
            return True
        if bits <= self._bad.get(cut.id, 0):
            return False
        return None

    def admissible(self, cut: CutCandidate, bits: int) -> bool:
        """Is (cut, bits) within the budget? Binary search over the unknown widths of this cut."""
        while True:
            k = self.known(cut, bits)
            if k is not None:
                return k
            lo, hi = self._bad.get(cut.id, 0), self._good.get(cut.id, 32)
            unknown = sorted({b for b in self.levels if lo < b < hi} | {bits})
            self.measure(cut, unknown[(len(unknown) - 1) // 2])

    def drop(self, cut: CutCandidate, bits: int) -> float | None:
        """The measured drop if known (no call), 0 for 32 bits."""
        return 0.0 if bits >= 32 else self.drops.get((cut.id, bits))


# ---------------------------------------------------------------- choice


def choose(cands: list[CutCandidate], bits_options, link: Link, accuracy_drop: AccuracyDrop | None,
           budget: float, rate_hz: float | None = None, *, objective: str = "pipeline",
           lazy: bool = True, oracle: AccuracyOracle | None = None) -> Choice:
    """The best admissible (cut, bits) for one link (see the module doc). objective "pipeline"
    is COACH's (rate, period, latency); "latency" minimises latency only (baselines). lazy=False
    measures every (cut, bits < 32) pair first (for comparison; same answer)."""
    if not cands:
        raise ValueError("no cut candidates to choose from")
    if objective not in ("pipeline", "latency"):
        raise ValueError(f"objective must be 'pipeline' or 'latency', got {objective!r}")
    if rate_hz is not None and not rate_hz > 0:
        raise ValueError(f"rate must be > 0 Hz, got {rate_hz}")
    bits_list = sorted({int(b) for b in bits_options}, reverse=True)
    if not bits_list:
        raise ValueError("no bit widths to choose from")
    for b in bits_list:
        payload_bytes(0, b)  # ValueError for an unsupported width
    if oracle is None:
        if accuracy_drop is None:
            accuracy_drop = _no_callback
        oracle = AccuracyOracle(accuracy_drop, budget, bits_list)
    calls0 = oracle.calls
    cap = None if rate_hz is None else 1000.0 / rate_hz
    order, bits_of_pair = _ranked_pairs(cands, bits_list, link, cap, objective)
    if not lazy:
        for c in cands:
            if c.kind != "edge-only":
                for b in bits_list:
                    oracle.measure(c, b)
    k = len(cands)
    for pair in order:
        c, b = cands[pair % k], int(bits_of_pair[pair // k])
        if oracle.admissible(c, b):
            st = stage_times(c, b, link)
            meets = None if cap is None else st.period_ms <= cap * (1 + 1e-12)
            return Choice(c, b, st, oracle.calls - calls0, oracle.drop(c, b), meets)
    raise ValueError("no admissible cut: every candidate exceeds the accuracy budget "
                     "(add the edge-only cut or 32 bits)")


def _ranked_pairs(cands: list[CutCandidate], bits_list: list[int], link: Link, cap: float | None,
                  objective: str) -> tuple[np.ndarray, np.ndarray]:
    """Every (cut, bits) pair, as index bits_row * len(cands) + cut, best first by the objective
    (ties: more bits, then candidate order); edge-only only at 32 bits. Same arithmetic as
    stage_times, vectorised."""
    k = len(cands)
    edge = np.array([c.edge_ms for c in cands], dtype=np.float64)
    cloud = np.array([c.cloud_ms for c in cands], dtype=np.float64)
    n = np.array([c.elements for c in cands], dtype=np.int64)
    only_edge = np.array([c.kind == "edge-only" for c in cands])
    bits_rows = np.array(sorted(set(bits_list) | {32}, reverse=True), dtype=np.int64)
    lat, per, valid = [], [], []
    for b in bits_rows:
        body = 4 * n if b == 32 else (2 * n if b == 16 else (n * b + 7) // 8)
        wire = (body + HEADER_BYTES).astype(np.float64)
        t = wire * 8.0 / (link.bandwidth_mbps * 1e3) + link.overhead_ms
        t = np.where(only_edge, 0.0, t)
        lat.append(edge + t + cloud)
        per.append(np.maximum(np.maximum(edge, t), cloud))
        valid.append(only_edge if b == 32 and 32 not in bits_list
                     else (~only_edge if b != 32 else np.ones(k, bool)))
    lat, per, valid = np.concatenate(lat), np.concatenate(per), np.concatenate(valid)
    if objective == "latency":
        flag, first, second = np.zeros(lat.shape, bool), lat, per
    elif cap is not None:
        ok = per <= cap * (1 + 1e-12)
        flag, first, second = ~ok, np.where(ok, lat, per), np.where(ok, per, lat)
    else:
        flag, first, second = np.zeros(lat.shape, bool), per, lat
    pair = np.arange(lat.size)
    minus_bits = -np.repeat(bits_rows, k)
    order = np.lexsort((pair % k, minus_bits, second, first, flag))
    return order[valid[order]], bits_rows


def _no_callback(cut: CutCandidate, bits: int) -> float | None:
    return None


def plan_table(cands: list[CutCandidate], bits_options, bandwidths_mbps: list[float],
               accuracy_drop: AccuracyDrop | None, budget: float, rate_hz: float | None = None,
               overhead_ms: float = 0.0, *, oracle: AccuracyOracle | None = None) -> list[PlanRow]:
    """One choice per bandwidth level, sharing one memoised accuracy oracle."""
    oracle = oracle or AccuracyOracle(accuracy_drop or _no_callback, budget, bits_options)
    rows = []
    for bw in bandwidths_mbps:
        ch = choose(cands, bits_options, Link(float(bw), overhead_ms), accuracy_drop, budget,
                    rate_hz, oracle=oracle)
        rows.append(PlanRow(float(bw), ch.cut, ch.bits, ch.times, ch.drop, ch.evaluations,
                            ch.meets_rate))
    return rows
