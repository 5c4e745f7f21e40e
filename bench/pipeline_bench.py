"""`coach bench pipeline`: the runtime's acceptance figures, measured end to end on this machine.

    coach bench pipeline [--quick] [--parts 1,2,...] [--seconds S]

1. fidelity     the link emulator's goodput vs the trace's capacity (const 8 Mbit/s, ATT LTE uplink)
2. bubbles      a balanced plan on a fixed-rate emulated link: pipelined throughput vs the plan's
                1/period and vs a sequential loop (head, encode, unary Infer, wait) of the same plan
3. overhead     median extra time per request of the gRPC path over head + tail in one process
                (~200 KB cut tensor, 32 bits, loopback, one request at a time)
4. adaptation   adaptive quantization vs each fixed bit width on two LTE uplink traces
5. fault        kill -9 of the cloud in the middle of 1000 requests, restarted 5 s later
6. memory       resident memory of an edge agent process on a ResNet-50 bundle (no torch)

The edge (this process) is pinned to one core and the cloud subprocess to another (taskset), so
that the two stages compete as two machines would; the link emulator runs as a subprocess
(`coach bench link`). Prints a table per part and writes bench/results/pipeline.json (the parts
run now replace theirs in the file; the others are kept). Never fails on a timing: every check is
reported as measured, with the load average next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.procs import load_average, pin_self, start_cloud, start_link, usable_cores
from coach_runtime.errors import UserError

RESULTS = Path(__file__).resolve().parent / "results"
TRACES = Path(__file__).resolve().parent / "traces"
PART_NAMES = {1: "fidelity", 2: "bubbles", 3: "overhead", 4: "adaptation", 5: "fault", 6: "memory"}
CLOUD_FLAGS = ["--max-batch", "1", "--intra-op-threads", "1", "--compute-workers", "1", "--workers", "1"]


@dataclass
class Bench:
    """Options and shared state of one run."""

    quick: bool
    seconds: float  # length of a timed run (fidelity per trace, adaptation per configuration)
    edge_cores: set[int] | None
    cloud_cores: set[int] | None
    link_cores: set[int] | None
    work: Path
    console: object = None
    notes: list[str] = field(default_factory=list)

    def print(self, *a, **k) -> None:
        self.console.print(*a, **k)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test, figures are rough)")
    p.add_argument("--parts", default="1,2,3,4,5,6", metavar="LIST",
                   help="which parts to run, e.g. 2,3 (1 fidelity, 2 bubbles, 3 overhead, 4 adaptation, "
                        "5 fault, 6 memory)")
    p.add_argument("--seconds", type=float, default=None, metavar="S",
                   help="length of each timed run: fidelity per trace and adaptation per configuration; the "
                        "bubble runs take about S too (default 20, 6 with --quick)")
    p.add_argument("--edge-core", type=int, default=None, metavar="N", help="core of the edge (default: the first)")
    p.add_argument("--cloud-core", type=int, default=None, metavar="N",
                   help="core of the cloud subprocess (default: the second)")
    p.add_argument("--link-core", default="cloud", metavar="N|cloud|none",
                   help="core of the link emulator subprocess: a number, 'cloud' (default: the cloud's) or 'none' "
                        "(unpinned)")
    p.add_argument("--keep", metavar="DIR", help="keep the models, bundles and profiles in DIR (default: a temp dir)")


# ---------------------------------------------------------------- small helpers


def _stats(values) -> dict:
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "median": float(np.median(v)), "mean": float(v.mean()),
            "p5": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95))}


def _steady(times: list[float], drop: float = 0.1) -> tuple[float, int]:
    """(throughput per second, results counted) over the arrival times after the first `drop` share."""
    t = sorted(times)[int(len(times) * drop):]
    if len(t) < 2 or t[-1] <= t[0]:
        return float("nan"), len(t)
    return (len(t) - 1) / (t[-1] - t[0]), len(t)


def _table(title: str, columns: list[str], rows: list[list], left: int = 1):
    from rich.table import Table

    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i < left else "right")
    for r in rows:
        table.add_row(*[str(x) for x in r])
    return table


def _f(x, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}"


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def _samples(inputs: dict[str, np.ndarray], n: int, labels: np.ndarray | None = None):
    """n Samples cycling over the rows of `inputs` (id = sequence number; row = id % rows)."""
    from edge.sample import Sample

    rows = len(next(iter(inputs.values())))
    for i in range(n):
        r = i % rows
        yield Sample(id=i, inputs={k: v[r:r + 1] for k, v in inputs.items()},
                     label=None if labels is None else int(labels[r]))


def _random_inputs(specs, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal([rows] + [d if d > 0 else 1 for d in s.shape[1:]]).astype(np.float32)
            for s in specs}


# ---------------------------------------------------------------- 1. link emulator fidelity


def part_fidelity(b: Bench) -> dict:
    from bench.link import fidelity

    results = []
    for spec in ("const:8", "ATT-LTE-driving-2016.up"):
        with b.console.status(f"pushing bytes through {spec} for {b.seconds:g} s"):
            results.append(fidelity(spec, b.seconds))
    rows = []
    for r in results:
        worst = max((abs(g / c - 1) for g, c in r["per_second"] if c > 0), default=float("nan"))
        rows.append([r["trace"], _f(r["goodput_mbps"], 3), _f(r["capacity_mbps"], 3), f"{100 * r['error']:+.1f}%",
                     f"{100 * worst:.1f}%", "yes" if r["within_10pct"] else "NO"])
    b.print(_table(f"1. link emulator fidelity, {b.seconds:g} s per trace",
                   ["trace", "goodput Mbit/s", "capacity Mbit/s", "error", "worst 1 s", "within 10%"], rows))
    return {"seconds": b.seconds, "results": results,
            "all_within_10pct": all(r["within_10pct"] for r in results)}


# ---------------------------------------------------------------- 2. bubble-free pipeline


def _sequential(bundle, cut_id: str, bits: int, target: str, samples) -> list[float]:
    """One request at a time, as a plain loop: head, encode, unary Infer, wait. Completion times."""
    import grpc

    from edge.sessions import load_session
    from protos import codec
    from protos.coach.v1 import coach_pb2 as pb
    from protos.coach.v1 import coach_pb2_grpc as pb_grpc

    cut = bundle.cuts[cut_id]
    head = load_session(bundle.head_path(cut_id), ["CPUExecutionProvider"], 1)
    names = [t.name for t in cut.tensors]
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    done = []
    with grpc.insecure_channel(target, options=opts) as channel:
        stub = pb_grpc.CollaborativeInferenceStub(channel)
        for i, s in enumerate(samples):
            outs = head.run(names, s.inputs)
            tensors = [codec.encode(x, bits, axis=t.quant_axis if bits <= 8 else None, name=t.name)
                       for x, t in zip(outs, cut.tensors)]
            req = pb.InferRequest(request_id=i, model=bundle.model_name, plan_sha256=bundle.plan_sha256,
                                  cut_id=cut_id, tensors=tensors)
            resp = stub.Infer(req, timeout=30)
            if resp.error.code:
                raise RuntimeError(f"cloud refused a sequential request: {resp.error.message}")
            done.append(time.perf_counter())
    return done


def part_bubbles(b: Bench) -> dict:
    from bench.pipeline_models import median_run_ms, plan_pinned, profile_pinned
    from bench.toy_models import conv_chain
    from edge.agent import Agent, AgentConfig

    pin_self(b.edge_cores)
    channels, size, target_ms = 256, 16, 25.0
    with b.console.status("2. sizing the conv_chain model on the edge core"):
        probe = conv_chain(b.work / "probe.onnx", channels=channels, size=size, depth=4)
        per_layer = median_run_ms(probe) / 3.0  # the first layer (3 input channels) costs ~nothing
    half = int(min(30, max(3, round(target_ms / per_layer))))
    model = conv_chain(b.work / "chain.onnx", channels=channels, size=size, depth=2 * half)
    with b.console.status("2. profiling the model on the edge core and on the cloud core"):
        edge_prof = profile_pinned(model, b.work / "chain.edge.json", b.edge_cores, "edge-core")
        cloud_prof = profile_pinned(model, b.work / "chain.cloud.json", b.cloud_cores, "cloud-core")
    with b.console.status("2. planning: the balanced cut, then the rate that balances the link"):
        fast = plan_pinned(model, b.work / "chain-fast.bundle", edge_prof, cloud_prof,
                           ["--bits", "8", "--bandwidth", "100000", "--no-timing"], b.edge_cores)
        row0 = fast.plan_table[0]
        rate = row0.bytes * 8 / (max(row0.edge_ms, row0.cloud_ms) * 1e3)  # Mbit/s: T_t = max(T_e, T_c)
        rate = float(f"{rate:.3g}")
        bundle = plan_pinned(model, b.work / "chain.bundle", edge_prof, cloud_prof,
                             ["--bits", "8", "--bandwidth", f"{rate:g}"], b.edge_cores)
    row = bundle.plan_table[0]
    cut = bundle.cuts[row.cut]
    period_ms = row.period_ms
    b.print(f"conv_chain {channels}x{size}x{size}, depth {2 * half} (~{per_layer:.2f} ms/layer here); plan at "
            f"{rate:g} Mbit/s: cut {row.cut}, {row.bits} bits, {row.bytes} B; predicted T_e {row.edge_ms:.1f}, "
            f"T_t {row.transfer_ms:.1f}, T_c {row.cloud_ms:.1f} ms, period {period_ms:.1f} ms")
    if cut.kind != "interior":
        b.notes.append(f"bubbles: the plan chose {cut.kind}, not an interior cut; the figures are not a pipeline")
    n_pipe = max(60, int(b.seconds / 2 / (period_ms / 1e3)))
    n_seq = max(30, int(b.seconds / 2 / (3 * period_ms / 1e3)))
    inputs = _random_inputs(bundle.inputs, 16)
    load = load_average()
    cloud = start_cloud(bundle.path, b.cloud_cores, extra=CLOUD_FLAGS)
    try:
        link = start_link(f"const:{rate:g}", cloud.address, cores=b.link_cores)
        try:
            cfg = AgentConfig(cloud=link.address, bits=row.bits, cut=row.cut, threads=1, max_inflight=3, cache=False)
            times, results = [], []
            cpu0 = {"edge": time.process_time(), "cloud": cloud.cpu_s(), "link": link.cpu_s()}
            with b.console.status(f"2. pipelined: {n_pipe} requests"), Agent(bundle, cfg) as agent:
                t0 = time.perf_counter()
                for r in agent.run(_samples(inputs, n_pipe)):
                    times.append(time.perf_counter())
                    results.append(r)
                pipe_wall = time.perf_counter() - t0
                stats = dict(agent.stats)
            cpu1 = {"edge": time.process_time(), "cloud": cloud.cpu_s(), "link": link.cpu_s()}
            cpu_ms = {k: None if cpu0[k] is None or cpu1[k] is None else (cpu1[k] - cpu0[k]) * 1e3 / n_pipe
                      for k in cpu0}
            with b.console.status(f"2. sequential: {n_seq} requests"):
                seq_times = _sequential(bundle, row.cut, row.bits, link.address, _samples(inputs, n_seq))
        finally:
            link.stop()
    finally:
        cloud.stop()
    load_after = load_average()
    pipe_tput, pipe_n = _steady(times)
    seq_tput, seq_n = _steady(seq_times)
    steady = results[int(len(results) * 0.1):]
    where = {w: sum(1 for r in results if r.where == w) for w in ("cloud", "edge", "cache")}
    stage = {k: _stats(r.timing[k] for r in steady if r.where == "cloud")
             for k in ("edge_ms", "encode_ms", "wire_ms", "cloud_ms", "queue_ms", "total_ms")}
    wire_bytes = stats["bytes"] / max(1, stats["cloud"])
    pred_tput = 1e3 / period_ms
    out = {
        "model": {"kind": "conv_chain", "channels": channels, "size": size, "depth": 2 * half,
                  "per_layer_ms": per_layer},
        "rate_mbps": rate,
        "plan_row": {"cut": row.cut, "bits": row.bits, "bytes": row.bytes, "edge_ms": row.edge_ms,
                     "transfer_ms": row.transfer_ms, "cloud_ms": row.cloud_ms, "period_ms": period_ms,
                     "latency_ms": row.latency_ms},
        "validation_ms": bundle.raw["cuts"][[c["id"] for c in bundle.raw["cuts"]].index(row.cut)].get("validation"),
        "requests": {"pipelined": n_pipe, "sequential": n_seq, "steady_pipelined": pipe_n, "steady_sequential": seq_n},
        "where": where,
        "wire_bytes_per_request": wire_bytes,
        "link_ms_per_request": wire_bytes * 8 / (rate * 1e3),
        "predicted_throughput": pred_tput,
        "pipelined_throughput": pipe_tput,
        "sequential_throughput": seq_tput,
        "pipelined_period_ms": 1e3 / pipe_tput if pipe_tput > 0 else None,
        "sequential_period_ms": 1e3 / seq_tput if seq_tput > 0 else None,
        "pipelined_vs_predicted": pipe_tput / pred_tput,
        "pipelined_vs_sequential": pipe_tput / seq_tput,
        "pipelined_wall_s": pipe_wall,
        "cpu_ms_per_request": cpu_ms,
        "period_from_measured_stages_ms": max(stage["edge_ms"].get("median", 0.0),
                                              stage["cloud_ms"].get("median", 0.0), wire_bytes * 8 / (rate * 1e3)),
        "stage_ms": stage,
        "agent_stats": stats,
        "load_average": {"before": load, "after": load_after},
    }
    out["pipelined_vs_measured_stages"] = pipe_tput * out["period_from_measured_stages_ms"] / 1e3
    out["checks"] = {"throughput >= 0.9x predicted": bool(out["pipelined_vs_predicted"] >= 0.9),
                     "throughput >= 1.8x sequential": bool(out["pipelined_vs_sequential"] >= 1.8)}
    rows = [
        ["predicted (plan)", _f(period_ms), _f(pred_tput, 1), _f(row.edge_ms), _f(row.transfer_ms), _f(row.cloud_ms), ""],
        ["pipelined", _f(out["pipelined_period_ms"]), _f(pipe_tput, 1), _f(stage["edge_ms"].get("median")),
         _f(out["link_ms_per_request"]), _f(stage["cloud_ms"].get("median")),
         f"{out['pipelined_vs_predicted']:.2f}x predicted"],
        ["sequential", _f(out["sequential_period_ms"]), _f(seq_tput, 1), "", "", "",
         f"pipelined {out['pipelined_vs_sequential']:.2f}x"],
        ["slowest measured stage", _f(out["period_from_measured_stages_ms"]),
         _f(1e3 / out["period_from_measured_stages_ms"], 1), "", "", "",
         f"pipelined {out['pipelined_vs_measured_stages']:.2f}x"],
    ]
    b.print(_table(f"2. bubble-free pipeline at const {rate:g} Mbit/s (load {load_after})",
                   ["run", "period ms", "req/s", "T_e ms", "T_t ms", "T_c ms", "ratio"], rows))
    b.print("CPU per pipelined request (ms): " + ", ".join(f"{k} {_f(v)}" for k, v in cpu_ms.items()))
    return out


# ---------------------------------------------------------------- 3. overhead of the gRPC path


def part_overhead(b: Bench) -> dict:
    import grpc

    from bench.load_bench import write_tiny_bundle
    from edge.agent import Agent, AgentConfig
    from edge.sessions import load_session
    from protos import codec
    from protos.bundle import load_bundle
    from protos.coach.v1 import coach_pb2 as pb
    from protos.coach.v1 import coach_pb2_grpc as pb_grpc

    pin_self(b.edge_cores)
    path = write_tiny_bundle(b.work / "overhead.bundle", channels=50, size=32, classes=10, name="overhead")
    bundle = load_bundle(path)
    cut = bundle.cuts["c1"]
    head = load_session(bundle.head_path("c1"), ["CPUExecutionProvider"], 1)
    tail = load_session(bundle.tail_path("c1"), ["CPUExecutionProvider"], 1)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    feeds = {bundle.inputs[0].name: x}
    hname = cut.tensors[0].name
    n = 100 if b.quick else 500
    warm = 20
    load = load_average()
    cloud = start_cloud(path, b.cloud_cores, extra=CLOUD_FLAGS)
    try:
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        local, unary, nbytes, server, floor = [], [], 0, [], []
        with grpc.insecure_channel(cloud.address, options=opts) as channel, \
                b.console.status(f"3. {n} requests: local and unary gRPC, interleaved"):
            stub = pb_grpc.CollaborativeInferenceStub(channel)
            for i in range(n + warm):
                t0 = time.perf_counter()
                h = head.run([hname], feeds)[0]
                logits = tail.run(None, {hname: h})[0]
                int(np.argmax(logits))
                t1 = time.perf_counter()
                h = head.run([hname], feeds)[0]
                req = pb.InferRequest(request_id=i, model=bundle.model_name, plan_sha256=bundle.plan_sha256,
                                      cut_id="c1", tensors=[codec.encode(h, 32, name=hname)])
                resp = stub.Infer(req, timeout=10)
                if resp.error.code:
                    raise RuntimeError(f"cloud refused: {resp.error.message}")
                t2 = time.perf_counter()
                stub.Describe(pb.DescribeRequest(), timeout=10)  # the smallest round trip there is
                t3 = time.perf_counter()
                if i >= warm:
                    local.append((t1 - t0) * 1e3)
                    unary.append((t2 - t1) * 1e3)
                    floor.append((t3 - t2) * 1e3)
                    server.append((resp.timing.decode_ms, resp.timing.queue_ms, resp.timing.compute_ms))
                    nbytes = req.ByteSize()
        # the agent's path: Stream, pipeline threads, one request at a time (next input after the result)
        agent_ms = []
        gate = threading.Semaphore(1)
        released: dict[int, float] = {}

        def one_at_a_time():
            for s in _samples(feeds, n + warm):
                gate.acquire()
                released[s.id] = time.perf_counter()
                yield s

        cfg = AgentConfig(cloud=cloud.address, bits=32, cut="c1", threads=1, max_inflight=1, cache=False)
        with b.console.status(f"3. {n} requests through the edge agent, one at a time"), Agent(bundle, cfg) as agent:
            for r in agent.run(one_at_a_time()):
                t = time.perf_counter()
                if r.where != "cloud":
                    raise RuntimeError(f"request {r.id} was answered on the {r.where}, not by the cloud")
                if r.id >= warm:
                    agent_ms.append((t - released[r.id]) * 1e3)
                gate.release()
    finally:
        cloud.stop()
    load_after = load_average()
    med = {k: float(np.median(v)) for k, v in (("local", local), ("unary", unary), ("agent", agent_ms))}
    out = {
        "cut_tensor": {"name": hname, "shape": [1, 50, 32, 32], "dtype": "float32", "bits": 32,
                       "request_bytes": nbytes},
        "requests": n,
        "local_ms": _stats(local), "unary_grpc_ms": _stats(unary), "agent_stream_ms": _stats(agent_ms),
        "describe_rtt_ms": _stats(floor),
        "server_ms": {k: _stats(x[i] for x in server) for i, k in enumerate(("decode", "queue", "compute"))},
        "overhead_unary_ms": med["unary"] - med["local"],
        "overhead_agent_ms": med["agent"] - med["local"],
        "load_average": {"before": load, "after": load_after},
    }
    out["checks"] = {"unary overhead <= 1 ms": bool(out["overhead_unary_ms"] <= 1.0),
                     "agent overhead <= 1 ms": bool(out["overhead_agent_ms"] <= 1.0)}
    rows = [["head + tail in one process", _f(med["local"], 3), _f(out["local_ms"]["p95"], 3), "-"],
            ["unary Infer (plain loop)", _f(med["unary"], 3), _f(out["unary_grpc_ms"]["p95"], 3),
             _f(out["overhead_unary_ms"], 3)],
            ["edge agent, Stream, max_inflight=1", _f(med["agent"], 3), _f(out["agent_stream_ms"]["p95"], 3),
             _f(out["overhead_agent_ms"], 3)],
            ["Describe (empty unary call: the floor)", _f(out["describe_rtt_ms"]["median"], 3),
             _f(out["describe_rtt_ms"]["p95"], 3), "-"]]
    b.print(_table(f"3. overhead per request, {nbytes} B request, loopback, no shaping (load {load_after})",
                   ["path", "median ms", "p95 ms", "extra ms (median)"], rows))
    return out


# ---------------------------------------------------------------- 4. adaptive quantization on traces


@dataclass
class Workload:
    name: str
    model: Path
    inputs: dict[str, np.ndarray]  # stream inputs (rows)
    labels: np.ndarray | None
    calibration: Path


def _adaptation_workload(b: Bench) -> Workload:
    from bench.pipeline_models import find_gesfi, smooth_images, squeeze_chain

    found = find_gesfi()
    if found is not None:
        model, data = found
        with np.load(data, allow_pickle=False) as z:
            x = z["image"].astype(np.float32)
            y = z["label"].astype(np.int64) if "label" in z.files else None
        import onnx

        name = onnx.load(str(model), load_external_data=False).graph.input[0].name
        n_cal = min(300, len(x) // 2)
        cal = b.work / "gesfi-cal.npz"
        np.savez(cal, **{name: x[:n_cal]}, **({"label": y[:n_cal]} if y is not None else {}))
        rest = slice(n_cal, None)
        return Workload(f"GesFi ({model})", model, {name: x[rest]}, None if y is None else y[rest], cal)
    size = 64
    model = squeeze_chain(b.work / "squeeze.onnx", width=64, size=size, head_depth=6, tail_depth=6, squeeze=1,
                          readout_inputs=smooth_images(200, size=size, seed=1))
    cal = b.work / "squeeze-cal.npz"
    np.savez(cal, input=smooth_images(300, size=size, seed=2))
    return Workload("squeeze_chain 64ch 64x64, 1-channel bottleneck (no trained GesFi ONNX found)", model,
                    {"input": smooth_images(100 if b.quick else 400, size=size, seed=3)}, None, cal)


def _run_on_trace(b: Bench, bundle, cloud_address: str, trace: str, bits: int | None, w: Workload,
                  reference: np.ndarray, rate_hz: float) -> dict:
    from bench.mahimahi import capacity_mbps, load_trace
    from edge.agent import Agent, AgentConfig

    link = start_link(trace, cloud_address, cores=b.link_cores)
    try:
        cfg = AgentConfig(cloud=link.address, bits=bits, threads=1, cache=False)
        rows = len(reference)
        with Agent(bundle, cfg) as agent:
            t0 = time.perf_counter()
            stop_at = t0 + b.seconds

            def feed():
                for s in _samples(w.inputs, 10**9, w.labels):
                    if time.perf_counter() >= stop_at:
                        return
                    yield s

            results, arrivals = [], []
            for r in agent.run(feed(), rate_hz=rate_hz):
                results.append(r)
                arrivals.append(time.perf_counter())
            wall = time.perf_counter() - t0
            stats = dict(agent.stats)
            changes = agent.quantizer.changes
            estimate = agent.estimator.estimate_mbps()
    finally:
        link.stop()
    n = len(results)
    agree = np.array([r.cls == reference[r.id % rows] for r in results]) if n else np.array([])
    lab = [r.cls == r.label for r in results if r.label is not None]
    lat = [r.timing["total_ms"] for r in results]
    bits_used: dict[str, int] = {}
    for r in results:
        key = f"{r.cut}@{r.bits}" if r.where == "cloud" else r.where if r.where != "edge" else f"edge:{r.cut}"
        bits_used[key] = bits_used.get(key, 0) + 1
    offered = int(rate_hz * b.seconds)
    return {
        "bits": bits if bits is not None else "adaptive",
        "results": n, "offered": offered, "wall_s": wall,
        "throughput": n / (arrivals[-1] - t0) if n else 0.0,
        "latency_ms": _stats(lat),
        "agreement": float(agree.mean()) if n else None,
        "label_accuracy": float(np.mean(lab)) if lab else None,
        "where": {k: v for k, v in stats.items() if k in ("cloud", "edge", "cache", "fallback", "late")},
        "decisions": bits_used, "decision_changes": changes, "final_estimate_mbps": estimate,
        "trace_capacity_mbps": capacity_mbps(load_trace(trace), 0.0, b.seconds * 1e3),
    }


def part_adaptation(b: Bench) -> dict:
    from bench.pipeline_models import full_predictions, plan_doc_summary, plan_pinned, profile_pinned

    pin_self(b.edge_cores)
    with b.console.status("4. building the workload"):
        w = _adaptation_workload(b)
    b.print(f"4. workload: {w.name}")
    with b.console.status("4. profiling on the edge core and on the cloud core"):
        edge_prof = profile_pinned(w.model, b.work / "adapt.edge.json", b.edge_cores, "edge-core")
        cloud_prof = profile_pinned(w.model, b.work / "adapt.cloud.json", b.cloud_cores, "cloud-core")
    traces = ["ATT-LTE-driving-2016.up", "Verizon-LTE-short.up"]
    bundles = {}
    for t in traces:
        with b.console.status(f"4. planning for {t} (accuracy measured on the calibration set)"):
            bundles[t] = plan_pinned(w.model, b.work / f"adapt-{t.split('.')[0]}.bundle", edge_prof, cloud_prof,
                                     ["--calibration", str(w.calibration), "--bits", "32,16,8,6,4,3,2",
                                      "--trace", str(TRACES / t), "--levels", "7", "--no-cache"], b.edge_cores)
    with b.console.status("4. the full model's answers on the stream inputs"):
        reference = full_predictions(w.model, w.inputs)
    budget = next(iter(bundles.values())).accuracy_budget
    out = {"workload": w.name, "accuracy_budget_pp": budget, "seconds_per_run": b.seconds, "traces": {}}
    cloud = start_cloud([bd.path for bd in bundles.values()], b.cloud_cores, extra=CLOUD_FLAGS)
    try:
        for t in traces:
            bundle = bundles[t]
            interior = [r for r in bundle.plan_table if bundle.cuts[r.cut].kind == "interior"]
            main = max(interior, key=lambda r: sum(1 for x in interior if x.cut == r.cut)) if interior else None
            main_cut = bundle.cuts[main.cut] if main else None
            # input rate: what the compute stages could sustain, with 10% to spare
            busy = max(main_cut.edge_ms, main_cut.cloud_ms) if main_cut else bundle.plan_table[-1].period_ms
            rate = round(0.9 * 1e3 / busy, 1)
            admissible = sorted(main_cut.admissible_bits, reverse=True) if main_cut else []
            widths = [q.bits for q in main_cut.quantization] if main_cut else []
            over = [x for x in widths if x not in admissible]
            fixed = admissible + ([max(over)] if over else [])  # the admissible widths and the first that is not
            runs = []
            for bits in [None] + fixed:
                label = "adaptive" if bits is None else f"{bits} bits"
                with b.console.status(f"4. {t}: {label}, {b.seconds:g} s at {rate:g} Hz"):
                    r = _run_on_trace(b, bundle, cloud.address, t, bits, w, reference, rate)
                r["admissible"] = bits is None or bits in admissible
                r["load_average"] = load_average()
                runs.append(r)
            ada = runs[0]
            verdict = {}
            for r in runs[1:]:
                if not r["admissible"]:
                    continue
                better_tput = ada["throughput"] > r["throughput"] * 1.02
                better_p95 = ada["latency_ms"].get("p95", math.inf) < r["latency_ms"].get("p95", math.inf) * 0.98
                verdict[f"{r['bits']} bits"] = {"throughput": bool(better_tput), "p95": bool(better_p95),
                                                "beats": bool(better_tput or better_p95)}
            out["traces"][t] = {"rate_hz": rate, "main_cut": main.cut if main else None,
                                "admissible_bits": admissible, "plan": plan_doc_summary(bundle),
                                "runs": runs, "adaptive_vs_fixed": verdict,
                                "adaptive_beats_every_admissible_fixed": all(v["beats"] for v in verdict.values())}
            rows = []
            for r in runs:
                rows.append([r["bits"], "yes" if r["admissible"] else "no", f"{r['results']}/{r['offered']}",
                             _f(r["throughput"], 1), _f(r["latency_ms"].get("median"), 1),
                             _f(r["latency_ms"].get("p95"), 1),
                             "-" if r["agreement"] is None else f"{100 * r['agreement']:.1f}%",
                             f"{r['where'].get('cloud', 0)}/{r['where'].get('edge', 0) + r['where'].get('fallback', 0)}",
                             " ".join(f"{k}:{v}" for k, v in sorted(r["decisions"].items(), key=lambda kv: -kv[1])[:3])])
            b.print(_table(f"4. {t}: {rate:g} Hz input, {b.seconds:g} s per run, budget {budget:g} pp "
                           f"(load {load_average()})",
                           ["bits", "in budget", "results/offered", "req/s", "p50 ms", "p95 ms", "agreement",
                            "cloud/edge", "decisions (cut@bits: count)"], rows))
            b.print(f"adaptive beats every admissible fixed width (throughput or p95): "
                    f"{out['traces'][t]['adaptive_beats_every_admissible_fixed']} "
                    f"({', '.join(f'{k}: {v}' for k, v in verdict.items())})")
    finally:
        cloud.stop()
    return out


# ---------------------------------------------------------------- 5. fault: kill -9 the cloud


def part_fault(b: Bench) -> dict:
    from bench.load_bench import write_tiny_bundle
    from edge.agent import Agent, AgentConfig
    from protos.bundle import load_bundle

    pin_self(b.edge_cores)
    path = write_tiny_bundle(b.work / "fault.bundle", channels=16, size=32, classes=10, name="fault")
    bundle = load_bundle(path)
    n, rate = (300, 50.0) if b.quick else (1000, 50.0)
    kill_after, down_s = n / rate / 4, 5.0
    inputs = _random_inputs(bundle.inputs, 32)
    cloud = start_cloud(path, b.cloud_cores, extra=CLOUD_FLAGS)
    port = cloud.port
    events: dict = {}
    restarted: list = []

    def chaos(t0: float) -> None:
        time.sleep(max(0.0, t0 + kill_after - time.perf_counter()))
        cloud.kill9()
        events["killed_s"] = time.perf_counter() - t0
        time.sleep(down_s)
        events["restart_s"] = time.perf_counter() - t0
        restarted.append(start_cloud(path, b.cloud_cores, listen=f"127.0.0.1:{port}", extra=CLOUD_FLAGS))
        events["ready_s"] = time.perf_counter() - t0

    load = load_average()
    results, arrivals = [], []
    cfg = AgentConfig(cloud=cloud.address, bits=8, cut="c1", threads=1, cache=False)
    try:
        with b.console.status(f"5. {n} requests at {rate:g} Hz; kill -9 of the cloud at {kill_after:.1f} s, "
                              f"restart {down_s:g} s later"), Agent(bundle, cfg) as agent:
            t0 = time.perf_counter()
            th = threading.Thread(target=chaos, args=(t0,), daemon=True)
            th.start()
            for r in agent.run(_samples(inputs, n), rate_hz=rate):
                results.append(r)
                arrivals.append(time.perf_counter() - t0)
            th.join(60)
            stats_before_close = dict(agent.stats)
        stats = dict(agent.stats)  # close() fills in reconnects
    finally:
        cloud.kill9()
        for c in restarted:
            c.stop()
    ids = [r.id for r in results]
    ready = events.get("ready_s", math.inf)
    killed = events.get("killed_s", math.inf)
    after = [r for r, t in zip(results, arrivals) if t > ready]
    out = {
        "requests": n, "rate_hz": rate, "events_s": events,
        "delivered": len(results), "in_order_exactly_once": ids == list(range(n)),
        "duplicates": len(ids) - len(set(ids)), "missing": len(set(range(n)) - set(ids)),
        "where": {w: sum(1 for r in results if r.where == w) for w in ("cloud", "edge", "cache")},
        "computed_locally": stats["fallback"], "reconnects": stats["reconnects"],
        "cloud_before_kill": sum(1 for r, t in zip(results, arrivals) if r.where == "cloud" and t <= killed),
        "cloud_after_restart": sum(1 for r in after if r.where == "cloud"),
        "first_cloud_after_restart_s": next((t - ready for r, t in zip(results, arrivals)
                                              if t > ready and r.where == "cloud"), None),
        "agent_stats": stats, "agent_stats_before_close": stats_before_close,
        "load_average": {"before": load, "after": load_average()},
    }
    out["checks"] = {"all delivered exactly once, in order": out["in_order_exactly_once"],
                     "collaboration resumed": out["cloud_after_restart"] > 0 and out["reconnects"] >= 1}
    rows = [[n, len(results), "yes" if out["in_order_exactly_once"] else "NO", out["where"]["cloud"],
             out["computed_locally"], out["cloud_before_kill"], out["cloud_after_restart"], out["reconnects"],
             _f(out["first_cloud_after_restart_s"], 1)]]
    b.print(_table(f"5. kill -9 at {_f(killed, 1)} s, restarted at {_f(events.get('restart_s'), 1)} s "
                   f"(ready {_f(ready, 1)} s) (load {load_average()})",
                   ["requests", "delivered", "in order, once", "cloud", "local (fallback)", "cloud before kill",
                    "cloud after restart", "reconnects", "resumed after s"], rows, left=0))
    return out


# ---------------------------------------------------------------- 6. memory of an edge agent process


MEMORY_PROBE = r"""
import json, sys, time
def status():
    d = {}
    for line in open('/proc/self/status'):
        k, _, v = line.partition(':')
        if k in ('VmRSS', 'VmHWM'):
            d[k] = int(v.split()[0])
    return d
out = {'start': status()}
from edge.agent import Agent, AgentConfig
from edge.sources import synthetic_samples
out['imported'] = status()
agent = Agent(sys.argv[1], AgentConfig(cloud=sys.argv[2] or None, threads=1, cache=False))
out['loaded'] = status()
n = int(sys.argv[3])
with agent:
    where = [r.where for r in agent.run(synthetic_samples(agent.inputs, n))]
out['ran'] = status()
out['where'] = {w: where.count(w) for w in set(where)}
heavy = ('torch', 'onnx', 'partitioner', 'cloud', 'matplotlib', 'scipy', 'sklearn', 'models', 'bench')
out['modules'] = {m: m in sys.modules for m in heavy}
out['torch_loaded'] = 'torch' in sys.modules
out['heads'] = sorted(agent.heads)
print('MEMORY ' + json.dumps(out))
"""


def part_memory(b: Bench) -> dict:
    import onnx

    from bench.pipeline_models import plan_pinned
    from bench.procs import Proc

    pin_self(b.edge_cores)
    model = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    if not model.is_file():
        raise RuntimeError(f"{model}: onnx's light ResNet-50 test model is missing")
    with b.console.status("6. planning light_resnet50 (--bits 32,8 --bandwidth 8; profiles measured here)"):
        bundle = plan_pinned(model, b.work / "resnet50.bundle", None, None,
                             ["--bits", "32,8", "--bandwidth", "8", "--runs", "3" if b.quick else "5"], b.edge_cores)
    n = 10 if b.quick else 30
    cloud = start_cloud(bundle.path, b.cloud_cores, extra=CLOUD_FLAGS)
    try:
        with b.console.status(f"6. an edge agent process on the bundle, {n} inputs through the cloud"):
            p = Proc([__import__("sys").executable, "-c", MEMORY_PROBE, str(bundle.path), cloud.address, str(n)],
                     cores=b.edge_cores, name="edge memory probe")
            rc = p.proc.wait(600)
    finally:
        cloud.stop()
    line = next((x for x in p.stdout_lines if x.startswith("MEMORY ")), None)
    if rc != 0 or line is None:
        raise RuntimeError(f"the edge memory probe failed (exit {rc}): " + " | ".join(p.stderr_lines[-5:]))
    m = json.loads(line[len("MEMORY "):])
    row = bundle.plan_table[0]
    out = {"bundle": {"model": "light_resnet50", "cut": row.cut, "bits": row.bits, "cuts": list(bundle.cuts),
                      "heads_loaded": m["heads"]},
           "vmrss_kib": {k: m[k]["VmRSS"] for k in ("start", "imported", "loaded", "ran")},
           "vmhwm_kib": m["ran"]["VmHWM"], "where": m["where"], "modules": m["modules"],
           "torch_loaded": m["torch_loaded"], "requests": n}
    out["checks"] = {"torch not imported": not m["torch_loaded"]}
    rows = [[k, f"{v / 1024:.1f}"] for k, v in out["vmrss_kib"].items()] + [["peak (VmHWM)", f"{out['vmhwm_kib'] / 1024:.1f}"]]
    b.print(_table(f"6. edge agent process on light_resnet50 (plan cut {row.cut} at {row.bits} bits; heads "
                   f"{', '.join(m['heads']) or 'none'}); torch imported: {m['torch_loaded']}",
                   ["VmRSS after", "MiB"], rows))
    return out


# ---------------------------------------------------------------- CLI


PARTS = {1: part_fidelity, 2: part_bubbles, 3: part_overhead, 4: part_adaptation, 5: part_fault, 6: part_memory}


def _parse_parts(text: str) -> list[int]:
    try:
        parts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--parts {text!r}: expected numbers from 1 to 6, e.g. --parts 2,3") from None
    if not parts or any(p not in PARTS for p in parts):
        raise UserError(f"--parts {text!r}: each part is one of 1..6 ({', '.join(f'{k} {v}' for k, v in PART_NAMES.items())})")
    return parts


def _cores(args) -> tuple[set[int] | None, set[int] | None, set[int] | None]:
    have = usable_cores()
    if len(have) < 2:
        return None, None, None  # one core: nothing to pin apart
    edge = have[0] if args.edge_core is None else args.edge_core
    cloud = have[1] if args.cloud_core is None else args.cloud_core
    for name, c in (("--edge-core", edge), ("--cloud-core", cloud)):
        if c not in have:
            raise UserError(f"{name} {c}: this process may use cores {have}")
    if args.link_core == "cloud":
        link = {cloud}
    elif args.link_core == "none":
        link = None
    else:
        try:
            link = {int(args.link_core)}
        except ValueError:
            raise UserError(f"--link-core {args.link_core!r}: a core number, 'cloud' or 'none'") from None
        if int(args.link_core) not in have:
            raise UserError(f"--link-core {args.link_core}: this process may use cores {have}")
    return {edge}, {cloud}, link


def run(args) -> int:
    from rich.console import Console

    parts = _parse_parts(args.parts)
    seconds = args.seconds if args.seconds is not None else (6.0 if args.quick else 20.0)
    if not seconds > 0:
        raise UserError(f"--seconds {args.seconds}: must be positive")
    edge, cloud, link = _cores(args)
    console = Console(width=max(Console().width, 130))
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
        tmp = None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="coach-pipeline-")
        work = Path(tmp.name)
    b = Bench(quick=args.quick, seconds=seconds, edge_cores=edge, cloud_cores=cloud, link_cores=link,
              work=work, console=console)
    path = RESULTS / "pipeline.json"
    try:
        doc = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("parts", {})
    doc.update({"benchmark": "pipeline", "machine": {"cpus": os.cpu_count(), "usable_cores": usable_cores(),
                                                   "platform": platform.platform(), "python": platform.python_version()}})
    failed = []
    try:
        for k in parts:
            name = PART_NAMES[k]
            console.rule(f"part {k}: {name} (load average {load_average()})")
            t0 = time.perf_counter()
            try:
                res = PARTS[k](b)
            except Exception as exc:  # report it, go on with the other parts
                console.print(f"[red]part {k} ({name}) failed: {type(exc).__name__}: {exc}[/red]")
                res = {"error": f"{type(exc).__name__}: {exc}"}
                failed.append(k)
            res.update({"ran_unix": int(time.time()), "wall_s": round(time.perf_counter() - t0, 1),
                        "quick": args.quick, "seconds": seconds, "cores": {
                            "edge": sorted(edge or []), "cloud": sorted(cloud or []), "link": sorted(link or [])},
                        "load_average_end": load_average()})
            doc["parts"][name] = res
            _write_json(path, doc)  # after every part: a crash later keeps what was measured
    finally:
        if tmp is not None:
            tmp.cleanup()
    if b.notes:
        doc["notes"] = b.notes
        _write_json(path, doc)
        for n in b.notes:
            console.print(f"note: {n}")
    console.print(f"wrote {path}")
    return 1 if failed else 0
