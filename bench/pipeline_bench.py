"""`coach bench pipeline`: the runtime's acceptance figures, measured end to end on this machine.

    coach bench pipeline [--quick] [--parts 1,2,...] [--seconds S]

1. fidelity     the link emulator's goodput vs the trace's capacity (const 8 Mbit/s, ATT LTE uplink)
2. bubbles      a balanced plan on a fixed-rate emulated link: pipelined throughput vs the plan's
                1/period and vs a sequential loop (head, encode, unary Infer, wait) of the same plan
3. overhead     median extra time per request of the gRPC path over head + tail in one process
                (~200 KB cut tensor, 32 bits, loopback, one request at a time)
4. adaptation   adaptive quantization (with and without its accuracy bank) vs each fixed bit width
                on two LTE uplink traces
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
    gesfi: Path | None = None  # a `coach gesfi train` output directory for part 4
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
    p.add_argument("--gesfi", type=Path, metavar="DIR",
                   help="part 4 on this trained GesFi model (`coach gesfi train` output with model.onnx, e.g. "
                        "models/gesfi/default); default: a squeeze_chain toy of 20 + 20 conv layers")
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
        ["predicted (plan)", _f(period_ms), _f(pred_tput, 1), _f(row.edge_ms), _f(row.transfer_ms),
         _f(row.cloud_ms), ""],
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
    # The server's defaults (micro-batching on, 2 decode threads), as an operator runs it; only the
    # intra-op threads are pinned to 1 (its core).
    cloud = start_cloud(path, b.cloud_cores, extra=["--intra-op-threads", "1"])
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
    """A squeeze_chain of 20 + 20 conv layers (each compute stage ~25 ms on one core here), or the
    trained GesFi ONNX of --gesfi (the default GesFi CNN is so light that its plan is edge-only at both
    traces' medians, and adaptive and fixed widths then have nothing to differ on)."""
    from bench.pipeline_models import find_gesfi, smooth_images, squeeze_chain

    n_cal = 100 if b.quick else 200
    found = find_gesfi(b.gesfi) if b.gesfi is not None else None
    if found is not None:
        import onnx

        model, x, y = found
        name = onnx.load(str(model), load_external_data=False).graph.input[0].name
        order = np.random.default_rng(0).permutation(len(x))  # the dataset is sorted by domain
        n_cal = min(n_cal, len(x) // 2)
        cal_rows, rest = order[:n_cal], order[n_cal:n_cal + (100 if b.quick else 400)]
        cal = b.work / "gesfi-cal.npz"
        np.savez(cal, **{name: x[cal_rows]}, **({"label": y[cal_rows]} if y is not None else {}))
        return Workload(f"GesFi ({model})", model, {name: x[rest]}, None if y is None else y[rest], cal)
    # a fixed model (its plan still follows this machine's profiles): a depth sized from a timing probe made
    # a different model, and so a different plan, on every run of a shared machine
    size, width, depth = 64, 64, 20
    model = squeeze_chain(b.work / "squeeze.onnx", width=width, size=size, head_depth=depth, tail_depth=depth,
                          squeeze=1, readout_inputs=smooth_images(200, size=size, seed=1))
    cal = b.work / "squeeze-cal.npz"
    np.savez(cal, input=smooth_images(n_cal, size=size, seed=2))
    return Workload(f"squeeze_chain {width}ch {size}x{size}, {depth}+{depth} conv layers, 1-channel bottleneck",
                    model,
                    {"input": smooth_images(100 if b.quick else 400, size=size, seed=3)}, None, cal)


def _until(w: Workload, stop_at: float):
    """The workload's inputs, looped, until time.perf_counter() reaches `stop_at`."""
    for s in _samples(w.inputs, 10**9, w.labels):
        if time.perf_counter() >= stop_at:
            return
        yield s


def _run_on_trace(b: Bench, bundle, cloud_address: str, trace: str, bits: int | None, w: Workload,
                  reference: np.ndarray, rate_hz: float, start_mbps: float, bank: bool = True,
                  cut: str | None = None, label: str = "") -> dict:
    from bench.mahimahi import capacity_mbps, load_trace
    from edge.adapt import Decision
    from edge.agent import Agent, AgentConfig

    link = start_link(trace, cloud_address, cores=b.link_cores)
    try:
        cfg = AgentConfig(cloud=link.address, bits=bits, cut=cut, threads=1, cache=False, bank=bank)
        rows = len(reference)
        with Agent(bundle, cfg) as agent:
            # Work-around: with no estimate yet the agent starts at the plan's lowest level. When that row
            # is edge-only, only its probe pairs cross the link, and the pair's second request queues
            # behind the first only if T_t > T_e, so on a fast link the estimator never calibrates and
            # the agent stays edge-only. Every configuration starts at the row of the trace's median.
            row = bundle.row_for_bandwidth(start_mbps)
            agent.quantizer.decision = Decision(cut or row.cut, bits or row.bits, "bench: start at the trace's median")
            t0 = time.perf_counter()
            results, arrivals = [], []
            for r in agent.run(_until(w, t0 + b.seconds), rate_hz=rate_hz):
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
    sent = [r.timing for r in results if r.where == "cloud"]
    stages = {k: float(np.median([t[k] for t in sent])) for k in ("edge_ms", "encode_ms", "queue_ms", "wire_ms",
                                                                  "cloud_ms")} if sent else {}
    used: dict[str, int] = {}
    for r in results:
        key = f"{r.cut}@{r.bits}" if r.where == "cloud" else f"{r.where}:{r.cut}"
        used[key] = used.get(key, 0) + 1
    return {
        "bits": bits if bits is not None else "adaptive", "label": label, "bank": bank and bits is None,
        "cut_pinned": cut, "results": n, "offered": int(rate_hz * b.seconds), "wall_s": wall,
        "throughput": n / (arrivals[-1] - t0) if n else 0.0,
        "latency_ms": _stats(lat),
        "stage_median_ms": stages,  # of the answers from the cloud
        "agreement": float(agree.mean()) if n else None,
        "label_accuracy": float(np.mean(lab)) if lab else None,
        "where": {k: v for k, v in stats.items() if k in ("cloud", "edge", "cache", "fallback", "late")},
        "bytes": {k: v for k, v in stats.items() if k in ("bytes", "probe_bytes", "verify_bytes")},
        "decisions": used, "decision_changes": changes, "final_estimate_mbps": estimate,
        "trace_capacity_mbps": capacity_mbps(load_trace(trace), 0.0, b.seconds * 1e3),
    }


def _pilot_throughput(b: Bench, bundle, cloud_address: str, cut: str, bits: int, w: Workload) -> dict:
    """What the compute stages of (cut, bits) sustain in the pipeline itself: the agent straight to the
    cloud (no link emulator, loopback), inputs as fast as the in-flight cap lets them in, for a quarter
    of a run (at least 4 s); the steady throughput after the first 10%. The stages run slower side by
    side than profiled alone (part 2), by how much depends on the machine and its load: an input rate
    set from this, not from the plan's profiled T_e and T_c, leaves only the link to fall behind."""
    from edge.agent import Agent, AgentConfig

    cfg = AgentConfig(cloud=cloud_address, bits=bits, cut=cut, threads=1, cache=False, bank=False)
    seconds = max(4.0, b.seconds / 4)
    times = []
    with Agent(bundle, cfg) as agent:
        for r in agent.run(_until(w, time.perf_counter() + seconds)):
            times.append(time.perf_counter())
        where = {k: v for k, v in agent.stats.items() if k in ("cloud", "edge", "fallback")}
    tput, counted = _steady(times)
    return {"cut": cut, "bits": bits, "seconds": seconds, "results": len(times), "steady_results": counted,
            "throughput": tput, "where": where}


def part_adaptation(b: Bench) -> dict:
    from bench.mahimahi import load_trace, trace_stats
    from bench.pipeline_models import full_predictions, plan_doc_summary, plan_pinned, profile_pinned
    from partitioner.plan_cli import trace_levels

    pin_self(b.edge_cores)
    with b.console.status("4. building the workload"):
        w = _adaptation_workload(b)
    b.print(f"4. workload: {w.name}")
    with b.console.status("4. profiling on the edge core and on the cloud core"):
        edge_prof = profile_pinned(w.model, b.work / "adapt.edge.json", b.edge_cores, "edge-core")
        cloud_prof = profile_pinned(w.model, b.work / "adapt.cloud.json", b.cloud_cores, "cloud-core")
    traces = ["ATT-LTE-driving-2016.up", "Verizon-LTE-short.up"]
    levels = sorted({x for t in traces for x in trace_levels(TRACES / t, 7, 1000.0)[0]})
    with b.console.status(f"4. planning for both traces' levels ({len(levels)}), accuracy on the calibration set"):
        bundle = plan_pinned(w.model, b.work / "adapt.bundle", edge_prof, cloud_prof,
                             ["--calibration", str(w.calibration), "--bits", "32,16,8,6,4,3,2",
                              "--bandwidth", ",".join(f"{x:g}" for x in levels), "--no-cache"], b.edge_cores)
    with b.console.status("4. the full model's answers on the stream inputs"):
        reference = full_predictions(w.model, w.inputs)
    budget = bundle.accuracy_budget
    out = {"workload": w.name, "accuracy_budget_pp": budget, "seconds_per_run": b.seconds,
           "plan": plan_doc_summary(bundle), "traces": {}}
    _print_plan(b, bundle)
    cloud = start_cloud(bundle.path, b.cloud_cores, extra=CLOUD_FLAGS)
    pilots: dict[tuple[str, int], dict] = {}
    try:
        for t in traces:
            median = trace_stats(load_trace(t)).p50_mbps
            row = bundle.row_for_bandwidth(median)
            main_cut = bundle.cuts[row.cut]
            # input rate: 75% of what the compute stages of the median's plan row sustain in the pipeline,
            # measured (a pilot run without the link), so that only the link can fall behind
            key = (row.cut, row.bits)
            if key not in pilots:
                with b.console.status(f"4. pilot: cut {row.cut} at {row.bits} bits, no link, as fast as it goes"):
                    pilots[key] = _pilot_throughput(b, bundle, cloud.address, row.cut, row.bits, w)
            pilot = pilots[key]
            planned_hz = 1e3 / max(row.edge_ms, row.cloud_ms)
            measured_hz = pilot["throughput"] if math.isfinite(pilot["throughput"]) else planned_hz
            rate = round(0.75 * measured_hz, 1)
            b.print(f"4. {t}: the compute stages of cut {row.cut} at {row.bits} bits sustain {measured_hz:.1f}/s "
                    f"in the pipeline (plan's profile: {planned_hz:.1f}/s); input at 75%: {rate:g} Hz")
            admissible = sorted(main_cut.admissible_bits, reverse=True)
            over = [q.bits for q in main_cut.quantization if q.bits not in admissible]
            fixed = admissible + ([max(over)] if over else [])  # the admissible widths and the first that is not
            # A fixed width is a static configuration: the plan's cut for the trace's median, these bits. The
            # lowest admissible width is also run with cut switching (the plan table's cut per bandwidth, with
            # the stall bound), i.e. adaptive without its choice of bits: the hardest fixed-width rival.
            configs = [("adaptive", None, True, None), ("adaptive, no bank", None, False, None)]
            configs += [(f"{x} bits", x, False, row.cut) for x in fixed]
            if admissible:
                configs.append((f"{min(admissible)} bits, cut switching", min(admissible), False, None))
            runs = []
            for label, bits, bank, pinned in configs:
                with b.console.status(f"4. {t}: {label}, {b.seconds:g} s at {rate:g} Hz"):
                    r = _run_on_trace(b, bundle, cloud.address, t, bits, w, reference, rate, median, bank,
                                      pinned, label)
                r["agreement_drop_pp"] = None if r["agreement"] is None else 100.0 * (1.0 - r["agreement"])
                r["plan_admissible"] = _plan_admissible(bundle, bits, r["decisions"])
                r["admissible"] = r["agreement_drop_pp"] is not None and r["agreement_drop_pp"] <= budget
                r["load_average"] = load_average()
                runs.append(r)
            ada = runs[0]
            verdict, static = {}, set()
            for r in runs[2:]:
                if not r["admissible"]:  # measured drop of agreement with the full model > budget
                    continue
                if r["cut_pinned"]:
                    static.add(r["label"])
                tput = ada["throughput"] > r["throughput"] * 1.02
                p95 = ada["latency_ms"].get("p95", math.inf) < r["latency_ms"].get("p95", math.inf) * 0.98
                verdict[r["label"]] = {"throughput": bool(tput), "p95": bool(p95), "beats": bool(tput or p95)}
            out["traces"][t] = {"rate_hz": rate, "pilot": pilot, "planned_hz": planned_hz, "median_mbps": median,
                                "start_row": {"cut": row.cut, "bits": row.bits},
                                "main_cut": row.cut, "admissible_bits": admissible, "runs": runs,
                                "adaptive_vs_fixed": verdict,
                                # None: nothing to compare (the plan sends nothing at this trace's median)
                                "adaptive_beats_every_admissible_fixed":
                                    all(verdict[k]["beats"] for k in static) if static else None,
                                "adaptive_within_budget": ada["admissible"]}
            rows = []
            for r in runs:
                top = sorted(r["decisions"].items(), key=lambda kv: -kv[1])[:3]
                rows.append([r["label"], "yes" if r["admissible"] else "no", f"{r['results']}/{r['offered']}",
                             _f(r["throughput"], 1), _f(r["latency_ms"].get("median"), 1),
                             _f(r["latency_ms"].get("p95"), 1),
                             "-" if r["agreement"] is None else f"{100 * r['agreement']:.1f}%",
                             f"{r['where'].get('cloud', 0)}/"
                             f"{r['where'].get('edge', 0) + r['where'].get('fallback', 0)}",
                             " ".join(f"{k.replace('cut-', '')}:{v}" for k, v in top)])
            b.print(_table(f"4. {t} (median {median:.2f} Mbit/s): {rate:g} Hz input, {b.seconds:g} s per run, "
                           f"budget {budget:g} pp, main cut {row.cut} (load {load_average()})",
                           ["configuration", "in budget", "results/offered", "req/s", "p50 ms", "p95 ms", "agreement",
                            "cloud/edge", "decisions (cut@bits: count)"], rows))
            if not verdict:
                b.print(f"adaptive vs fixed widths: nothing to compare (main cut {row.cut} sends nothing); "
                        "use a workload whose plan cuts the model at this trace's median")
            else:
                vs = "; ".join(f"{k}: throughput {v['throughput']}, p95 {v['p95']}" for k, v in verdict.items())
                b.print(f"adaptive beats every static fixed width within the budget on throughput or p95: "
                        f"{out['traces'][t]['adaptive_beats_every_admissible_fixed']} ({vs}); its agreement drop "
                        f"{_f(ada['agreement_drop_pp'])} pp (budget {budget:g})")
    finally:
        cloud.stop()
    return out


def _plan_admissible(bundle, bits: int | None, decisions: dict[str, int]) -> bool | None:
    """Whether the plan (its calibration set) counts a fixed width as within the budget on every cut it was
    actually sent on (fixed bits still switch cuts); None for adaptive. The verdict itself uses the drop
    measured in the run, the same test for every configuration ("in budget")."""
    if bits is None:
        return None
    sent = {key.rpartition("@")[0] for key in decisions if "@" in key}
    return all(bits in bundle.cuts[c].admissible_bits for c in sent if c in bundle.cuts)


def _print_plan(b: Bench, bundle) -> None:
    rows = []
    for r in bundle.plan_table:
        c = bundle.cuts[r.cut]
        adm = ",".join(str(x) for x in sorted(c.admissible_bits, reverse=True)) if c.kind != "edge-only" else "-"
        rows.append([f"{r.bandwidth_mbps:g}", r.cut.replace("cut-", ""), r.bits, r.bytes, _f(r.edge_ms, 1),
                     _f(r.transfer_ms, 1), _f(r.cloud_ms, 1), _f(r.period_ms, 1), adm])
    b.print(_table("4. the plan (predicted ms)", ["Mbit/s", "cut", "bits", "bytes", "T_e", "T_t", "T_c", "period",
                                                  "admissible bits of the cut"], rows))


# ---------------------------------------------------------------- 5. fault: kill -9 the cloud


def part_fault(b: Bench) -> dict:
    from bench.load_bench import write_tiny_bundle
    from edge.agent import Agent, AgentConfig
    from protos.bundle import load_bundle

    pin_self(b.edge_cores)
    path = write_tiny_bundle(b.work / "fault.bundle", channels=16, size=32, classes=10, name="fault")
    bundle = load_bundle(path)
    # 1000 requests at 40 Hz: 25 s; kill at 5 s, restart at 10 s (quick: 300 at 30 Hz, down 2 s)
    n, rate, down_s = (300, 30.0, 2.0) if b.quick else (1000, 40.0, 5.0)
    kill_after = n / rate / 5
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


HEADS_ONLY_PROBE = r"""
import json, sys
from edge.sessions import load_session
from protos.bundle import load_bundle
b = load_bundle(sys.argv[1])
sessions = [load_session(b.head_path(c), ['CPUExecutionProvider'], 1)
            for c, s in b.cuts.items() if s.kind == 'interior']
rss = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')][0]
print('MEMORY ' + json.dumps({'heads_only_kib': rss}))
"""


def _probe(code: str, args: list[str], cores) -> dict:
    import sys

    from bench.procs import Proc

    p = Proc([sys.executable, "-c", code, *args], cores=cores, name="edge memory probe")
    rc = p.proc.wait(600)
    line = next((x for x in p.stdout_lines if x.startswith("MEMORY ")), None)
    if rc != 0 or line is None:
        raise RuntimeError(f"the edge memory probe failed (exit {rc}): " + " | ".join(p.stderr_lines[-5:]))
    return json.loads(line[len("MEMORY "):])


def part_memory(b: Bench) -> dict:
    import onnx

    from bench.pipeline_models import plan_pinned

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
            m = _probe(MEMORY_PROBE, [str(bundle.path), cloud.address, str(n)], b.edge_cores)
    finally:
        cloud.stop()
    heads_only = _probe(HEADS_ONLY_PROBE, [str(bundle.path)], b.edge_cores)["heads_only_kib"]
    row = bundle.plan_table[0]
    out = {"bundle": {"model": "light_resnet50", "cut": row.cut, "bits": row.bits, "cuts": list(bundle.cuts),
                      "heads_loaded": m["heads"]},
           "vmrss_kib": {k: m[k]["VmRSS"] for k in ("start", "imported", "loaded", "ran")},
           "vmhwm_kib": m["ran"]["VmHWM"], "heads_only_process_kib": heads_only,
           "where": m["where"], "modules": m["modules"], "torch_loaded": m["torch_loaded"], "requests": n}
    out["checks"] = {"torch not imported": not m["torch_loaded"]}
    b.print(f"6. light_resnet50 bundle: plan cut {row.cut} at {row.bits} bits; the agent loads the heads "
            f"{', '.join(m['heads']) or 'none'} and full.onnx; modules imported: "
            f"{', '.join(k for k, v in m['modules'].items() if v) or 'none of ' + ', '.join(m['modules'])}")
    rows = [[f"agent process: {k}", f"{v / 1024:.1f}"] for k, v in out["vmrss_kib"].items()]
    rows += [["agent process: peak (VmHWM)", f"{out['vmhwm_kib'] / 1024:.1f}"],
             ["a process holding only the heads' sessions", f"{heads_only / 1024:.1f}"]]
    b.print(_table(f"6. resident memory (torch imported: {m['torch_loaded']})", ["VmRSS", "MiB"], rows))
    return out


# ---------------------------------------------------------------- CLI


PARTS = {1: part_fidelity, 2: part_bubbles, 3: part_overhead, 4: part_adaptation, 5: part_fault, 6: part_memory}


def _parse_parts(text: str) -> list[int]:
    try:
        parts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--parts {text!r}: expected numbers from 1 to 6, e.g. --parts 2,3") from None
    if not parts or any(p not in PARTS for p in parts):
        names = ", ".join(f"{k} {v}" for k, v in PART_NAMES.items())
        raise UserError(f"--parts {text!r}: each part is one of 1..6 ({names})")
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
    if args.gesfi is not None and 4 in parts:
        from bench.pipeline_models import find_gesfi

        if find_gesfi(args.gesfi) is None:
            raise UserError(f"--gesfi {args.gesfi}: no model.onnx with its dataset (data.npz with X and y) there; "
                            "train one with `coach gesfi train --out DIR`")
    console = Console(width=max(Console().width, 130))
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
        tmp = None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="coach-pipeline-")
        work = Path(tmp.name)
    b = Bench(quick=args.quick, seconds=seconds, edge_cores=edge, cloud_cores=cloud, link_cores=link,
              work=work, console=console, gesfi=args.gesfi)
    path = RESULTS / "pipeline.json"
    try:
        doc = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("parts", {})
    machine = {"cpus": os.cpu_count(), "usable_cores": usable_cores(), "platform": platform.platform(),
               "python": platform.python_version()}
    doc.update({"benchmark": "pipeline", "machine": machine})
    failed = []
    try:
        for k in parts:
            name = PART_NAMES[k]
            console.rule(f"part {k}: {name} (load average {load_average()})")
            t0 = time.perf_counter()
            try:
                res = PARTS[k](b)
            except UserError:
                raise
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
