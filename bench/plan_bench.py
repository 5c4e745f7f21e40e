"""`coach bench plan`: how fast the COACH plan search is, how few accuracy measurements it needs,
and how close to optimal it is.

1. Search time (profiling and accuracy excluded) on onnx's light DenseNet-121 and ResNet-50 (and
   the other light models with --all): frontier + a plan table of 7 bit widths x 16 bandwidth
   levels, with synthetic per-node times (FLOP-ish counts over a Jetson-like edge and a GPU-like
   cloud, +-30% noise per node) and a synthetic monotone accuracy drop. Targets: DenseNet-121 < 2 s,
   ResNet-50 < 0.5 s (reported, never failed on).
2. Accuracy-callback calls: lazy evaluation (plan_table, shared memo) vs measuring every
   (cut, bits < 32) pair; the choices must be the same (checked, reported).
3. Optimality on random small DAGs (<= 14 nodes): series-parallel ones (random series/parallel
   composition) must match exhaustive enumeration of all down-sets exactly; on random non-SP DAGs
   the worst and mean relative gap of the objective with topological-order fallback only
   (exact_limit=0), and with the default (small non-SP regions enumerated exhaustively).

The random-graph generators and the synthetic profile/drop live here so that the tests use the
very same ones (tests/test_partitioner_search.py).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import platform
import random
import time
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from partitioner.graph import CostGraph, GraphInfo, analyze, cost_graph
from partitioner.search import (
    AccuracyOracle,
    CutCandidate,
    Link,
    choose,
    enumerate_downsets,
    frontier,
    plan_table,
)

BITS = [32, 16, 8, 6, 4, 3, 2]
BANDWIDTHS = [round(0.5 * 1.6 ** k, 3) for k in range(16)]  # 0.5 .. ~580 Mbit/s
MODELS = ["light_densenet121", "light_resnet50"]
ALL_MODELS = ["light_bvlc_alexnet", "light_vgg19", "light_resnet50", "light_inception_v1",
              "light_inception_v2", "light_densenet121", "light_shufflenet", "light_squeezenet",
              "light_zfnet512"]
TARGET_S = {"light_densenet121": 2.0, "light_resnet50": 0.5}
TEST_DOMAIN = "coach.test"


# ---------------------------------------------------------------- light models, synthetic costs


def light_model_path(name: str) -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"{name}.onnx"


def _flops(info: GraphInfo, nid: str) -> float:
    node = info.node(nid)
    out = sum(info.elements(o) or 0 for o in node.outputs)
    if node.op in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
        w = info.tensors.get(node.inputs[1])
        if w is not None and w.shape and None not in w.shape:
            return 2.0 * out * math.prod(w.shape[1:])
    if node.op in ("Gemm", "MatMul") and len(node.inputs) > 1:
        a = info.tensors.get(node.inputs[0])
        if a is not None and a.shape and None not in a.shape:
            return 2.0 * out * a.shape[-1]
    return float(out + sum(info.elements(i) or 0 for i in node.inputs))


def synthetic_times(info: GraphInfo, seed: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """Per-node (edge_ms, cloud_ms): compute-bound ops at 150 GFLOP/s on the edge and 8 TFLOP/s in
    the cloud, memory-bound ones at 2 and 40 G elements/s, plus a launch cost; +-30% noise."""
    rng = random.Random(seed)
    edge, cloud = {}, {}
    for nid in info.compute:
        f = _flops(info, nid)
        heavy = info.node(nid).op in ("Conv", "ConvTranspose", "Gemm", "MatMul")
        e = f / (150e9 if heavy else 2e9) * 1e3 + 0.02
        c = f / (8e12 if heavy else 40e9) * 1e3 + 0.01
        edge[nid] = e * rng.uniform(0.7, 1.3)
        cloud[nid] = c * rng.uniform(0.7, 1.3)
    return edge, cloud


def synthetic_drop(cut: CutCandidate, bits: int) -> float:
    """A monotone (non-increasing in bits) accuracy drop in percentage points, different per cut:
    sensitivity s in [0.03, 3] from a hash of the cut; drop = s * 2^(4 - bits), fp16 s / 4096."""
    h = int(hashlib.sha1(cut.id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    s = 0.03 * 100 ** h
    return s / 4096 if bits >= 16 else s * 2.0 ** (4 - bits)


# ---------------------------------------------------------------- random small DAGs


class _Builder:
    """Builds a model of opaque ops (domain coach.test) with explicit tensor sizes."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.sizes: dict[str, int] = {}
        self.inputs: list[str] = []

    def tensor(self) -> str:
        name = f"t{len(self.sizes)}"
        self.sizes[name] = self.rng.randint(1, 2000)
        return name

    def input(self) -> str:
        t = self.tensor()
        self.inputs.append(t)
        return t

    def op(self, inputs: list[str], n_out: int = 1) -> list[str]:
        outs = [self.tensor() for _ in range(n_out)]
        self.nodes.append(helper.make_node("Op", inputs, outs, name=f"n{len(self.nodes)}",
                                           domain=TEST_DOMAIN))
        return outs

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        def vi(t: str) -> onnx.ValueInfoProto:
            return helper.make_tensor_value_info(t, TensorProto.FLOAT, [self.sizes[t]])

        internal = [t for t in self.sizes if t not in self.inputs and t not in outputs]
        graph = helper.make_graph(self.nodes, "random", [vi(t) for t in self.inputs],
                                  [vi(t) for t in outputs], value_info=[vi(t) for t in internal])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                       helper.make_opsetid(TEST_DOMAIN, 1)])


def _sp(b: _Builder, n: int, x: str) -> str:
    """A series-parallel net of exactly n ops reading x; returns its output tensor."""
    rng = b.rng
    if n == 1:
        return b.op([x])[0]
    if rng.random() < 0.5:  # parallel branches (one may be the identity) joined by one op
        k = rng.randint(2, min(4, n))
        sizes = [0] * k
        for _ in range(n - 1):
            sizes[rng.randrange(k)] += 1
        while sizes.count(0) > 1:  # at most one identity branch
            j = sizes.index(0)
            donor = max(range(k), key=lambda i: sizes[i])
            if sizes[donor] <= 1:
                sizes.pop(j)
                continue
            sizes[donor] -= 1
            sizes[j] = 1
        outs = [x if s == 0 else _sp(b, s, x) for s in sizes]
        return b.op(outs)[0]
    a = rng.randint(1, n - 1)
    return _sp(b, n - a, _sp(b, a, x))


def random_sp_model(rng: random.Random, n: int) -> onnx.ModelProto:
    """A random series-parallel model of n ops; sometimes two parallel nets with two outputs."""
    b = _Builder(rng)
    x = b.input()
    if n >= 2 and rng.random() < 0.25:
        a = rng.randint(1, n - 1)
        return b.model([_sp(b, a, x), _sp(b, n - a, x)])
    return b.model([_sp(b, n, x)])


def random_dag_model(rng: random.Random, n: int) -> onnx.ModelProto:
    """A random DAG of n ops (1-3 inputs each, some with two outputs, sometimes two model inputs);
    every tensor nobody reads is a model output, so no op is dead."""
    b = _Builder(rng)
    avail = [b.input() for _ in range(2 if rng.random() < 0.2 else 1)]
    for i in range(n):
        k = min(len(avail), rng.choice([1, 1, 2, 2, 3]))
        ins = rng.sample(avail, k)
        if i < len(b.inputs) and b.inputs[i] not in ins:
            ins[0] = b.inputs[i]  # every model input is read
        avail += b.op(ins, 2 if rng.random() < 0.15 else 1)
    read = {i for node in b.nodes for i in node.input}
    return b.model([t for t in avail if t not in read and t not in b.inputs])


def random_cost_graph(model: onnx.ModelProto, rng: random.Random) -> CostGraph:
    info = analyze(model)
    edge = {nid: rng.uniform(0.1, 5.0) for nid in info.compute}
    cloud = {nid: edge[nid] * rng.uniform(0.05, 0.6) for nid in info.compute}
    return cost_graph(info, edge, cloud)


def objective(choice) -> tuple:
    """The lexicographic objective value of a choice (see partitioner.search._key)."""
    t = choice.times
    if choice.meets_rate is None:
        return (0, t.period_ms, t.latency_ms)
    return (0, t.latency_ms, t.period_ms) if choice.meets_rate else (1, t.period_ms, t.latency_ms)


def scenarios(g: CostGraph) -> list[tuple[Link, float | None]]:
    """Links and rates that put the bottleneck on each stage in turn."""
    total_e = g.total_edge_ms
    sizes = [g.info.elements(t) or 0 for t in g.info.tensors]
    mean_bytes = 4.0 * sum(sizes) / max(1, len(sizes))
    out = []
    for frac in (0.05, 0.3, 1.0, 4.0):  # transfer of a mean tensor = frac x total edge time
        bw = mean_bytes * 8 / (frac * total_e * 1e3)
        out.append((Link(bw, 0.1), None))
        out.append((Link(bw, 0.1), 1000.0 / (0.4 * total_e)))  # a demanding rate
    return out


def optimality(count: int, seed: int = 0, max_nodes: int = 14) -> dict:
    """Frontier choice vs exhaustive enumeration on random SP and non-SP DAGs (32 bits only)."""
    rng = random.Random(seed)
    sp_checked = sp_exact = 0
    sp_fail: list[str] = []
    gaps_topo, gaps_default = [], []
    nonsp_graphs = nonsp_decomposed = nonsp_topo_used = 0
    for i in range(count):
        is_sp = i % 2 == 0
        n = rng.randint(2, max_nodes)
        model = random_sp_model(rng, n) if is_sp else random_dag_model(rng, n)
        g = random_cost_graph(model, rng)
        everything = enumerate_downsets(g)
        modes = [dict(exact_limit=4096)] if is_sp else [dict(exact_limit=0), dict(exact_limit=4096)]
        for kw in modes:
            st: dict = {}
            cands, mode = frontier(g, stats=st, **kw)
            if not is_sp and kw["exact_limit"] == 0:
                nonsp_graphs += 1
                if st["fallback_regions"] == 0:
                    nonsp_decomposed += 1
                if mode == "topological-fallback":
                    nonsp_topo_used += 1
            worst = 0.0
            for link, rate in scenarios(g):
                best = objective(choose(everything, [32], link, None, 0.5, rate))
                got = objective(choose(cands, [32], link, None, 0.5, rate))
                if got[0] != best[0]:
                    gap = math.inf
                else:
                    gap = (got[1] - best[1]) / best[1] if best[1] > 0 else 0.0
                    if abs(gap) < 1e-9:  # equal primary: compare the secondary
                        gap = max(0.0, (got[2] - best[2]) / best[2]) if best[2] > 0 else 0.0
                    gap = 0.0 if gap < 1e-9 else gap  # float noise of sums in another order
                worst = max(worst, gap)
            if is_sp:
                sp_checked += 1
                if worst <= 1e-9 and mode == "exact":
                    sp_exact += 1
                else:
                    sp_fail.append(f"graph {i} ({n} nodes): gap {worst:.3g}, mode {mode}")
            elif kw["exact_limit"] == 0:
                gaps_topo.append(worst)
            else:
                gaps_default.append(worst)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {
        "graphs": count, "seed": seed, "max_nodes": max_nodes,
        "sp_graphs": sp_checked, "sp_exact": sp_exact, "sp_failures": sp_fail[:10],
        "nonsp_graphs": nonsp_graphs,
        "nonsp_fully_decomposed": nonsp_decomposed,
        "nonsp_needing_topological_fallback": nonsp_topo_used,
        "nonsp_topological_worst_gap": max(gaps_topo, default=0.0),
        "nonsp_topological_mean_gap": mean(gaps_topo),
        "nonsp_topological_exact_fraction": mean([1.0 if x <= 1e-9 else 0.0 for x in gaps_topo]),
        "nonsp_default_worst_gap": max(gaps_default, default=0.0),
        "nonsp_default_mean_gap": mean(gaps_default),
    }


# ---------------------------------------------------------------- search timing


def search_timing(name: str, seed: int = 0, exhaustive_check: bool = True) -> dict:
    model = onnx.load(str(light_model_path(name)))
    t0 = time.perf_counter()
    info = analyze(model)
    t1 = time.perf_counter()
    edge, cloud = synthetic_times(info, seed)
    g = cost_graph(info, edge, cloud)
    t2 = time.perf_counter()
    st: dict = {}
    cands, mode = frontier(g, stats=st)
    t3 = time.perf_counter()
    oracle = AccuracyOracle(synthetic_drop, 0.5, BITS)
    rows = plan_table(cands, BITS, BANDWIDTHS, synthetic_drop, 0.5, oracle=oracle)
    t4 = time.perf_counter()
    rated = plan_table(cands, BITS, BANDWIDTHS, synthetic_drop, 0.5,
                       rate_hz=1000.0 / (0.5 * g.total_edge_ms), oracle=oracle)
    t5 = time.perf_counter()
    out = {
        "model": name, "nodes": len(info.all_nodes), "compute_nodes": len(info.compute),
        "candidates": len(cands), "mode": mode, "bits": BITS, "bandwidth_levels": len(BANDWIDTHS),
        "analyze_s": t1 - t0, "frontier_s": t3 - t2, "plan_table_s": t4 - t3,
        "search_s": t4 - t2, "rated_plan_table_s": t5 - t4, "target_s": TARGET_S.get(name),
        "lazy_calls": sum(r.evaluations for r in rows),
        "lazy_calls_with_rate_too": oracle.calls,
        "every_pair_calls": sum(len(BITS) - 1 for c in cands if c.kind != "edge-only"),
        "frontier_stats": {k: v for k, v in st.items() if k != "mode"},
        "rows": [{"bandwidth_mbps": r.bandwidth_mbps, "cut": r.cut.id, "kind": r.cut.kind,
                  "bits": r.bits, "period_ms": r.times.period_ms, "latency_ms": r.times.latency_ms,
                  "bubble_ratio": r.times.bubble_ratio} for r in rows],
    }
    if exhaustive_check:
        full = AccuracyOracle(synthetic_drop, 0.5, BITS)
        same = True
        for r in rows:
            ch = choose(cands, BITS, Link(r.bandwidth_mbps), synthetic_drop, 0.5, lazy=False,
                        oracle=full)
            same &= (ch.cut.id, ch.bits) == (r.cut.id, r.bits)
        out["every_pair_calls_measured"] = full.calls
        out["same_choices_as_every_pair"] = same
    return out


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="time every onnx light model, not only "
                   "DenseNet-121 and ResNet-50")
    p.add_argument("--graphs", type=int, default=400, help="random DAGs for the optimality check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/plan.json"))


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from coach_runtime.errors import UserError

    if args.graphs < 0:
        raise UserError(f"--graphs must be >= 0, got {args.graphs}")
    console = Console(width=max(Console().width, 112))  # the table stays readable in a pipe
    names = ALL_MODELS if args.all else MODELS
    missing = [n for n in names if not light_model_path(n).exists()]
    if missing:
        raise UserError(f"onnx light model {missing[0]} not found under "
                        f"{light_model_path(missing[0]).parent}; reinstall onnx (pip install onnx)")
    timings = []
    with console.status("timing the search on the light models"):
        for name in names:
            timings.append(search_timing(name, args.seed))
    table = Table(title=f"plan search, {len(BITS)} bit widths x {len(BANDWIDTHS)} bandwidths")
    for col in ("model", "nodes", "cuts", "mode", "frontier s", "table s", "search s",
                "calls lazy/all", "same"):
        table.add_column(col, justify="left" if col in ("model", "mode") else "right")
    for t in timings:
        tgt = t["target_s"]
        mark = "" if tgt is None else f" (<{tgt:g} {'ok' if t['search_s'] < tgt else 'MISS'})"
        table.add_row(t["model"].removeprefix("light_"), str(t["compute_nodes"]),
                      str(t["candidates"]),
                      t["mode"], f"{t['frontier_s']:.3f}", f"{t['plan_table_s']:.3f}",
                      f"{t['search_s']:.3f}{mark}", f"{t['lazy_calls']}/{t['every_pair_calls']}",
                      "yes" if t.get("same_choices_as_every_pair") else "NO")
    console.print(table)

    with console.status(f"optimality on {args.graphs} random DAGs"):
        t0 = time.perf_counter()
        opt = optimality(args.graphs, args.seed)
        opt["seconds"] = time.perf_counter() - t0
    t2 = Table(title=f"optimality vs enumeration of all down-sets ({args.graphs} random DAGs "
                     "<= 14 nodes)")
    t2.add_column("check")
    t2.add_column("result", justify="right")
    t2.add_row("series-parallel graphs exact", f"{opt['sp_exact']} / {opt['sp_graphs']}")
    t2.add_row("non-SP graphs fully decomposed anyway",
               f"{opt['nonsp_fully_decomposed']} / {opt['nonsp_graphs']}")
    t2.add_row("non-SP, topological fallback only: exact",
               f"{opt['nonsp_topological_exact_fraction']:.1%}")
    t2.add_row("non-SP, topological fallback only: worst gap",
               f"{opt['nonsp_topological_worst_gap']:.2%}")
    t2.add_row("non-SP, topological fallback only: mean gap",
               f"{opt['nonsp_topological_mean_gap']:.3%}")
    t2.add_row("non-SP, default (small regions exhaustive): worst gap",
               f"{opt['nonsp_default_worst_gap']:.2%}")
    console.print(t2)

    results = {"machine": platform.machine(), "python": platform.python_version(),
               "bits": BITS, "bandwidths_mbps": BANDWIDTHS, "models": timings, "optimality": opt}
    from bench.procs import write_json

    write_json(args.out, results)
    console.print(f"wrote {args.out}")
    return 0
