"""COACH plan search: frontier vs exhaustive enumeration, lazy accuracy evaluation, objectives,
baselines. Random graphs come from bench.plan_bench (the benchmark reports the same figures)."""

from __future__ import annotations

import itertools
import random

import onnx
import pytest

from bench.plan_bench import (
    BITS,
    light_model_path,
    optimality,
    random_cost_graph,
    random_dag_model,
    random_sp_model,
    scenarios,
    synthetic_drop,
    synthetic_times,
)
from partitioner.baselines import baselines, dads_cut
from partitioner.graph import analyze, cost_graph, cut_elements, cut_tensors, is_downset
from partitioner.search import (
    HEADER_BYTES,
    AccuracyOracle,
    Link,
    choose,
    enumerate_downsets,
    frontier,
    payload_bytes,
    plan_table,
    stage_times,
    topological_cuts,
)


def _resnet_graph():
    path = light_model_path("light_resnet50")
    if not path.exists():
        pytest.skip(f"onnx light model missing: {path}")
    info = analyze(onnx.load(str(path)))
    edge, cloud = synthetic_times(info, seed=3)
    return cost_graph(info, edge, cloud)


def _assert_valid(g, cands):
    for c in cands:
        assert is_downset(g.info, c.edge_nodes), c.id
        assert c.tensors == cut_tensors(g.info, c.edge_nodes), c.id
        assert c.elements == cut_elements(g.info, c.tensors)
        e = sum(g.edge_ms[n] for n in c.edge_nodes)
        cl = sum(g.cloud_ms[n] for n in g.info.compute if n not in c.edge_nodes)
        assert c.edge_ms == pytest.approx(e, abs=1e-9)
        assert c.cloud_ms == pytest.approx(cl, abs=1e-9)


# ---------------------------------------------------------------- optimality


def test_frontier_matches_exhaustive_on_random_dags():
    res = optimality(320, seed=11, max_nodes=14)
    print(f"\nSP exact {res['sp_exact']}/{res['sp_graphs']}; non-SP graphs {res['nonsp_graphs']} "
          f"({res['nonsp_fully_decomposed']} decomposed anyway); topological fallback only: "
          f"worst gap {res['nonsp_topological_worst_gap']:.2%}, "
          f"mean {res['nonsp_topological_mean_gap']:.3%}, "
          f"exact on {res['nonsp_topological_exact_fraction']:.0%}; default worst gap "
          f"{res['nonsp_default_worst_gap']:.2%}")
    assert res["sp_graphs"] == 160
    assert res["sp_exact"] == res["sp_graphs"], res["sp_failures"]
    # The fallback can only lose optimality, never beat enumeration of every down-set.
    assert res["nonsp_topological_worst_gap"] >= 0.0
    # Non-SP graphs this small have few down-sets: the default enumerates those regions exactly.
    assert res["nonsp_default_worst_gap"] == 0.0
    # The generator really produces graphs the decomposition cannot finish.
    assert res["nonsp_needing_topological_fallback"] > 0


def test_frontier_candidates_are_valid_cuts():
    rng = random.Random(2)
    for i in range(60):
        n = rng.randint(1, 14)
        model = random_sp_model(rng, n) if i % 2 else random_dag_model(rng, n)
        g = random_cost_graph(model, rng)
        for kw in (dict(), dict(exact_limit=0), dict(max_points=3)):
            cands, mode = frontier(g, **kw)
            _assert_valid(g, cands)
            assert len({c.id for c in cands}) == len(cands)
            assert any(c.kind == "edge-only" for c in cands)  # never dominated: T_c = 0, sends 0
            if kw.get("max_points") == 3:
                assert len(cands) <= 3


def test_enumerate_downsets_is_complete():
    rng = random.Random(4)
    for _ in range(25):
        model = random_dag_model(rng, rng.randint(1, 9))
        g = random_cost_graph(model, rng)
        names = list(g.info.compute)
        subsets = (s for k in range(len(names) + 1) for s in itertools.combinations(names, k))
        brute = {frozenset(s) for s in subsets if is_downset(g.info, s)}
        got = enumerate_downsets(g)
        assert {c.edge_nodes for c in got} == brute
        assert len(got) == len(brute)


def test_frontier_is_pareto_and_covers_enumeration():
    rng = random.Random(8)
    for _ in range(40):
        g = random_cost_graph(random_sp_model(rng, rng.randint(2, 12)), rng)
        cands, mode = frontier(g)
        assert mode == "exact"
        everything = enumerate_downsets(g)
        for q in everything:  # every cut is matched or beaten by a frontier cut
            assert any(p.edge_ms <= q.edge_ms + 1e-9 and p.cloud_ms <= q.cloud_ms + 1e-9
                       and p.elements <= q.elements for p in cands), q.id
        for p in cands:  # no frontier cut is strictly beaten by another
            assert not any(o is not p and o.edge_ms <= p.edge_ms - 1e-9 and o.cloud_ms <= p.cloud_ms
                           and o.elements <= p.elements for o in cands)


def test_topological_fallback_is_reported():
    rng = random.Random(6)
    modes = set()
    for _ in range(40):
        g = random_cost_graph(random_dag_model(rng, 14), rng)
        cands, mode = frontier(g, exact_limit=0)
        modes.add(mode)
        _assert_valid(g, cands)
    assert "topological-fallback" in modes


# ---------------------------------------------------------------- stage times


def test_payload_bytes():
    assert payload_bytes(1000, 32) == 4000 + HEADER_BYTES
    assert payload_bytes(1000, 16) == 2000 + HEADER_BYTES
    assert payload_bytes(1000, 8) == 1000 + HEADER_BYTES
    assert payload_bytes(1001, 3) == 376 + HEADER_BYTES  # ceil(3003 / 8)
    assert payload_bytes(7, 2) == 2 + HEADER_BYTES
    with pytest.raises(ValueError):
        payload_bytes(10, 12)
    with pytest.raises(ValueError):
        payload_bytes(-1, 8)


def test_edge_only_and_cloud_only():
    g = _resnet_graph()
    cands, _ = frontier(g)
    by_kind = {c.kind: c for c in topological_cuts(g) if c.kind != "interior"}
    edge, cloud = by_kind["edge-only"], by_kind["cloud-only"]
    assert edge.tensors == () and edge.elements == 0 and edge.cloud_ms == 0
    assert cloud.tensors == g.info.inputs and cloud.edge_ms == 0
    assert cloud.elements == 3 * 224 * 224
    st = stage_times(edge, 8, Link(1.0))
    assert st.transfer_ms == 0 and st.latency_ms == pytest.approx(g.total_edge_ms)
    st = stage_times(cloud, 32, Link(100.0, overhead_ms=2.0))
    assert st.transfer_ms == pytest.approx(payload_bytes(cloud.elements, 32) * 8 / 1e5 + 2.0)
    # A starved link: edge-only wins; a fat one: the cloud (here 20x faster) takes nearly all.
    slow = choose(cands + [cloud], BITS, Link(0.001), synthetic_drop, 0.5)
    assert slow.cut.kind == "edge-only" and slow.bits == 32
    fast = choose(cands + [cloud], [32], Link(1e7), None, 0.5)
    assert fast.times.edge_ms < 0.1 * g.total_edge_ms


# ---------------------------------------------------------------- objectives


def _brute(cands, bits, link, adm, rate):
    pairs = [(c, b) for c in cands for b in ([32] if c.kind == "edge-only" else bits) if adm(c, b)]
    times = [(stage_times(c, b, link), c, b) for c, b in pairs]
    if rate is not None:
        ok = [x for x in times if x[0].period_ms <= 1000.0 / rate * (1 + 1e-12)]
        if ok:
            return min(ok, key=lambda x: (x[0].latency_ms, x[0].period_ms))
    return min(times, key=lambda x: (x[0].period_ms, x[0].latency_ms))


def test_choice_matches_brute_force_with_and_without_rate():
    g = _resnet_graph()
    cands, _ = frontier(g)
    total = g.total_edge_ms
    budget = 0.5
    checked_rate = checked_infeasible = 0
    for bw in (0.5, 5.0, 50.0, 500.0):
        link = Link(bw, 0.2)
        for rate in (None, 1000.0 / (0.6 * total), 1000.0 / (0.05 * total), 1e6):
            ch = choose(cands, BITS, link, synthetic_drop, budget, rate)
            st, c, b = _brute(cands, BITS, link,
                              lambda c, b: b == 32 or synthetic_drop(c, b) <= budget, rate)
            got = (ch.times.period_ms, ch.times.latency_ms)
            assert got == pytest.approx((st.period_ms, st.latency_ms))
            assert ch.bits == 32 or synthetic_drop(ch.cut, ch.bits) <= budget
            if rate is not None:
                checked_rate += 1
                if ch.meets_rate:
                    assert ch.times.period_ms <= 1000.0 / rate * (1 + 1e-12)
                else:
                    checked_infeasible += 1
            else:
                assert ch.meets_rate is None
    assert checked_rate and checked_infeasible  # both branches of the rate objective ran


def test_rate_trades_period_for_latency():
    # A rate the min-period choice meets easily: the latency-optimal feasible cut is taken.
    g = _resnet_graph()
    cands, _ = frontier(g)
    link = Link(20.0)
    no_rate = choose(cands, [32], link, None, 0.5)
    loose = choose(cands, [32], link, None, 0.5, rate_hz=1000.0 / (2 * no_rate.times.latency_ms))
    assert loose.meets_rate
    assert loose.times.latency_ms <= no_rate.times.latency_ms + 1e-9
    assert loose.times.period_ms >= no_rate.times.period_ms - 1e-9


# ---------------------------------------------------------------- lazy accuracy evaluation


class _Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, cut, bits):
        self.calls.append((cut.id, bits))
        return self.fn(cut, bits)


def test_lazy_evaluation_fewer_calls_same_choice():
    g = _resnet_graph()
    cands, _ = frontier(g)
    levels = [0.5 * 2 ** k for k in range(12)]
    lazy_cb = _Counting(synthetic_drop)
    rows = plan_table(cands, BITS, levels, lazy_cb, 0.5)
    assert sum(r.evaluations for r in rows) == len(lazy_cb.calls)
    assert len(set(lazy_cb.calls)) == len(lazy_cb.calls)  # memoised: no pair measured twice
    assert all(b != 32 for _, b in lazy_cb.calls)  # 32 bits never measured
    full_cb = _Counting(synthetic_drop)
    full = AccuracyOracle(full_cb, 0.5, BITS)
    for r in rows:
        ch = choose(cands, BITS, Link(r.bandwidth_mbps), full_cb, 0.5, lazy=False, oracle=full)
        assert (ch.cut.id, ch.bits) == (r.cut.id, r.bits)
    assert len(full_cb.calls) == sum(len(BITS) - 1 for c in cands if c.kind != "edge-only")
    assert 0 < len(lazy_cb.calls) < len(full_cb.calls) / 10
    assert any(r.bits < 32 for r in rows) and len({r.cut.id for r in rows}) > 1


def test_binary_search_finds_smallest_admissible_width():
    g = _resnet_graph()
    cands, _ = frontier(g)
    rng = random.Random(0)
    thresholds = {c.id: rng.choice(BITS) for c in cands}  # smallest admissible width per cut
    drop = _Counting(lambda c, b: 0.0 if b >= thresholds[c.id] else 1.0)
    oracle = AccuracyOracle(drop, 0.5, BITS)
    for c in cands[:40]:
        before = len(drop.calls)
        for b in sorted(BITS):
            assert oracle.admissible(c, b) == (b >= thresholds[c.id])
        assert len(drop.calls) - before <= 3  # log2(6 unknown widths) rounded up


def test_unmeasurable_cuts_only_get_16_or_32_bits():
    g = _resnet_graph()
    cands, _ = frontier(g)
    for bw in (1.0, 10.0, 100.0):
        ch = choose(cands, BITS, Link(bw), lambda c, b: None, 0.5)
        assert ch.bits in (16, 32)


# ---------------------------------------------------------------- baselines


def test_baselines_on_random_graphs():
    rng = random.Random(9)
    for i in range(30):
        n = rng.randint(2, 12)
        model = random_sp_model(rng, n) if i % 2 else random_dag_model(rng, n)
        g = random_cost_graph(model, rng)
        everything = enumerate_downsets(g)
        for link, _rate in scenarios(g)[::2]:
            best = min(stage_times(c, 32, link).latency_ms for c in everything)
            base = baselines(g, link, synthetic_drop, 0.5)
            assert set(base) == {"edge-only", "cloud-only", "neurosurgeon", "dads", "jalad"}
            assert base["dads"].times.latency_ms == pytest.approx(best, rel=1e-6)
            assert dads_cut(g, link).edge_nodes in {c.edge_nodes for c in everything}
            assert base["neurosurgeon"].times.latency_ms >= best - 1e-9
            assert base["neurosurgeon"].bits == base["dads"].bits == 32
            j = base["jalad"]
            assert j.cut.kind == "edge-only" or (j.bits == 8 and synthetic_drop(j.cut, 8) <= 0.5)
            assert base["edge-only"].times.transfer_ms == 0
            assert base["cloud-only"].cut.tensors == g.info.inputs


def test_baselines_from_candidate_list():
    g = _resnet_graph()
    cands, _ = frontier(g)
    cands = cands + [c for c in topological_cuts(g) if c.kind == "cloud-only"]
    base = baselines(cands, Link(10.0), synthetic_drop, 0.5)
    assert set(base) == {"edge-only", "cloud-only", "jalad"}
    assert base["jalad"].times.latency_ms <= base["edge-only"].times.latency_ms + 1e-9


def test_no_admissible_candidate_is_an_error():
    g = _resnet_graph()
    interior = [c for c in frontier(g)[0] if c.kind == "interior"]
    with pytest.raises(ValueError, match="no admissible"):
        choose(interior, [8, 4], Link(10.0), lambda c, b: 99.0, 0.5)
    with pytest.raises(ValueError):
        Link(0.0)
