"""The planners COACH is compared with, computed by the same code on the same profiles.

    base = baselines(g, Link(20.0), accuracy_drop, budget=0.5)   # {name: search.Choice}

- "edge-only": the whole model on the device, nothing sent.
- "cloud-only": the input sent in fp32, the whole model in the cloud.
- "neurosurgeon": a chain cut along one topological order (GraphInfo.compute), fp32, min latency.
- "dads": the min s-t cut of the DAG for min latency, fp32 (scipy max flow on integer capacities).
- "jalad": COACH's frontier cuts with a fixed 8-bit quantization, min latency, within the accuracy
  budget (the same accuracy callback, lazily; edge-only stays available at 32 bits).
All latencies are the same stage-time model as COACH's (search.stage_times); these planners ignore
pipelining, so they minimise latency, not the period.

Public API:
    baselines(cands_or_graph, link, accuracy_drop, budget, *, oracle=None, jalad_bits=8,
              cands=None) -> dict[str, Choice]
        Given a CostGraph, jalad searches `cands` (pass COACH's frontier to avoid recomputing it
        per link) or else frontier(g). Given a candidate list instead of a graph: edge-only,
        cloud-only and jalad only (neurosurgeon and dads need the graph).
    dads_cut(g, link) -> CutCandidate
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from partitioner.graph import CostGraph, cut_elements, cut_tensors
from partitioner.search import (
    AccuracyDrop,
    AccuracyOracle,
    Choice,
    CutCandidate,
    Link,
    cut_id,
    choose,
    frontier,
    topological_cuts,
)

log = logging.getLogger(__name__)

_UNITS = 1 << 28  # finite capacities are scaled to sum to at most this
_INF = 1 << 30  # "never cut this edge" (> any finite cut; int32-safe)


def _candidate(g: CostGraph, edge: frozenset[str]) -> CutCandidate | None:
    info = g.info
    n = len(info.compute)
    kind = "edge-only" if len(edge) == n else ("cloud-only" if not edge else "interior")
    tensors = cut_tensors(info, edge)
    elements = cut_elements(info, tensors)
    if elements is None:
        return None
    e = sum(g.edge_ms[x] for x in edge) + (g.edge_overhead_ms if edge else 0.0)
    c = sum(g.cloud_ms[x] for x in info.compute if x not in edge)
    c += g.cloud_overhead_ms if kind != "edge-only" else 0.0
    return CutCandidate(cut_id(kind, edge), edge, tensors, elements, e, c, kind)


def dads_cut(g: CostGraph, link: Link) -> CutCandidate:
    """The DADS cut: min over down-sets E of T_e(E) + T_c(E) + fp32 transfer of cut(E), as a min
    s-t cut. Flow network: s -> v (cloud time of v: paid if v is in the cloud), v -> t (edge time:
    paid if v is on the edge), v -> a_x (transfer of tensor x made by v) and a_x -> each reader
    (infinite) so a tensor read by several cloud nodes is paid once, s -> a_x for model inputs,
    a_x -> t (infinite) for model outputs, and reader -> maker (infinite) so E is a down-set.
    Per-message constants and edge-only (which sends nothing) are compared outside the flow."""
    info = g.info
    names = list(info.compute)
    pos = {nm: i for i, nm in enumerate(names)}
    n = len(names)
    tensors = [t for t in info.inputs if t in info.consumers or t in info.outputs]
    tensors += [o for nm in names for o in info.node(nm).outputs
                if o in info.consumers or o in info.outputs]
    s, t_sink = n + len(tensors), n + len(tensors) + 1
    ms_per_element = 4 * 8 / (link.bandwidth_mbps * 1e3)  # fp32

    edges: dict[tuple[int, int], float | None] = {}  # None: infinite
    for i, nm in enumerate(names):
        edges[(s, i)] = g.cloud_ms[nm]
        edges[(i, t_sink)] = g.edge_ms[nm]
        for p in info.preds[nm]:
            edges[(i, pos[p])] = None
    unknown = []
    for k, x in enumerate(tensors):
        a = n + k
        src = pos[info.producer[x]] if x in info.producer else s
        size = info.elements(x)
        edges[(src, a)] = None if size is None else size * ms_per_element
        if size is None:
            unknown.append((src, a))
        for r in info.consumers.get(x, ()):
            edges[(a, pos[r])] = None
        if x in info.outputs:
            edges[(a, t_sink)] = None
    finite = sum(v for v in edges.values() if v is not None)
    for key in unknown:  # a tensor of unknown size: dearer than every cut that avoids it
        edges[key] = finite + 1.0
    finite = sum(v for v in edges.values() if v is not None) or 1.0
    scale = _UNITS / finite
    rows, cols, caps = [], [], []
    for (u, v), w in edges.items():
        rows.append(u)
        cols.append(v)
        caps.append(_INF if w is None else int(round(w * scale)))
    size = n + len(tensors) + 2
    cap = csr_array((np.array(caps, dtype=np.int32), (np.array(rows), np.array(cols))),
                    shape=(size, size))
    flow = maximum_flow(cap, s, t_sink).flow
    residual = (cap - flow).tocsr()
    residual.data[residual.data < 0] = 0
    residual.eliminate_zeros()
    reach = breadth_first_order(residual, s, directed=True, return_predecessors=False)
    edge = frozenset(names[i] for i in reach if i < n)
    cand = _candidate(g, edge)
    if cand is None:  # cannot happen with the weights above; keep the device side safe
        cand = _candidate(g, frozenset(names))
    return cand


def _ends(g: CostGraph) -> dict[str, CutCandidate]:
    names = frozenset(g.info.compute)
    out = {}
    for kind, edge in (("edge-only", names), ("cloud-only", frozenset())):
        c = _candidate(g, edge)
        if c is not None:
            out[kind] = c
    return out


def baselines(cands_or_graph: CostGraph | list[CutCandidate], link: Link,
              accuracy_drop: AccuracyDrop | None, budget: float, *,
              oracle: AccuracyOracle | None = None, jalad_bits: int = 8,
              cands: list[CutCandidate] | None = None) -> dict[str, Choice]:
    """The baselines' choices on one link (see the module doc)."""
    out: dict[str, Choice] = {}
    if isinstance(cands_or_graph, CostGraph):
        g = cands_or_graph
        ends = _ends(g)
        cands = list(cands) if cands is not None else frontier(g)[0]
        cands += [c for k, c in ends.items() if all(x.kind != k for x in cands)]
    else:
        g = None
        cands = list(cands_or_graph)
        ends = {c.kind: c for c in cands if c.kind != "interior"}
        log.info("baselines from a candidate list: neurosurgeon and dads need the cost graph")
    fp32 = dict(objective="latency", oracle=oracle)
    for kind in ("edge-only", "cloud-only"):
        if kind in ends:
            out[kind] = choose([ends[kind]], [32], link, accuracy_drop, budget, **fp32)
    if g is not None:
        out["neurosurgeon"] = choose(topological_cuts(g), [32], link, accuracy_drop, budget, **fp32)
        pool = [dads_cut(g, link)] + list(ends.values())
        out["dads"] = choose(pool, [32], link, accuracy_drop, budget, **fp32)
    if oracle is None and accuracy_drop is not None:
        oracle = AccuracyOracle(accuracy_drop, budget, [jalad_bits])
    out["jalad"] = choose(cands, [jalad_bits], link, accuracy_drop, budget, objective="latency",
                          oracle=oracle)
    return out
