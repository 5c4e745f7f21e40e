"""`coach bench load`: many concurrent streams against one `coach cloud serve` process.

    coach bench load --streams 32 --seconds 60 [--bundle DIR]

Starts the server as a subprocess (on a tiny generated bundle unless --bundle is given), opens
--streams bidirectional streams from one client process, each keeping --depth requests in flight
(a pipelined edge device), and reports: requests answered, errors (per-request and per-stream),
p50/p90/p99 round-trip latency, throughput, the server's own timing breakdown and batch sizes, and
the server's RSS over time (VmRSS from /proc/PID/status), with the growth after warm-up
(the first 20% of the run, at least 5 s). Writes bench/results/load.json. Never fails on a timing.

`write_tiny_bundle(dir)` makes the small bundle (conv -> relu | pool -> gemm, cut at the relu) that
this benchmark, the fuzz benchmark and the cloud tests serve.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

READY_RE = re.compile(r"^serving (.+) on (\S+):(\d+)$")


# ---------------------------------------------------------------- a tiny bundle


def _tiny_models(batch, channels: int, size: int, classes: int, seed: int):
    """(full, head, tail) ONNX models: x[N,3,S,S] -> conv3x3 -> relu = h | gap -> flatten -> gemm -> logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    g = numpy_helper.from_array(rng.standard_normal((channels, classes)).astype(np.float32), "g")
    b = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32) * 0.1, "b")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, [batch, channels, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])
    head_nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c"], ["h"])]
    tail_nodes = [helper.make_node("GlobalAveragePool", ["h"], ["p"]),
                  helper.make_node("Flatten", ["p"], ["f"]),
                  helper.make_node("Gemm", ["f", "g", "b"], ["logits"])]

    def model(nodes, inputs, outputs, inits, name):
        m = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 13)], producer_name="coach-tiny")
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m.SerializeToString()

    return (model(head_nodes + tail_nodes, [x], [y], [w, g, b], "tiny"),
            model(head_nodes, [x], [h], [w], "tiny_head"),
            model(tail_nodes, [h], [y], [g, b], "tiny_tail"))


def write_tiny_bundle(out: str | Path, fixed_batch: bool = False, channels: int = 8, size: int = 8,
                      classes: int = 5, name: str = "tiny", seed: int = 0) -> Path:
    """Write a valid plan bundle with cuts edge-only, cloud-only and c1 (at the relu) to `out`."""
    out = Path(out)
    batch = 1 if fixed_batch else "N"
    full, head, tail = _tiny_models(batch, channels, size, classes, seed)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny.", dir=out.parent if out.parent.is_dir() else None))
    files = {"full.onnx": full, "cuts/edge-only/head.onnx": full, "cuts/cloud-only/tail.onnx": full,
             "cuts/c1/head.onnx": head, "cuts/c1/tail.onnx": tail}
    sha = {}
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
        sha[rel] = hashlib.sha256(data).hexdigest()
    dim = -1 if not fixed_batch else 1
    x_shape, h_shape = [dim, 3, size, size], [dim, channels, size, size]
    n_x, n_h = 3 * size * size, channels * size * size

    def quant(n):
        return [{"bits": b, "bytes": (4 * n if b == 32 else 2 * n if b == 16 else (n * b + 7) // 8),
                 "accuracy_drop": 0.0, "admissible": True} for b in (32, 16, 8, 4)]

    def ref(rel):
        return {"file": rel, "sha256": sha[rel]}

    def row(mbps, cut, bits, nbytes):
        t = nbytes * 8 / (mbps * 1e3)
        return {"bandwidth_mbps": mbps, "cut": cut, "bits": bits, "edge_ms": 0.2, "transfer_ms": t,
                "cloud_ms": 0.1, "latency_ms": 0.3 + t, "period_ms": max(0.2, t, 0.1),
                "bubble_ratio": 1 - (0.3 + t) / (3 * max(0.2, t, 0.1)), "bytes": nbytes, "accuracy_drop": 0.0}

    plan = {
        "schema_version": 1,
        "model": {"name": name, "sha256": sha["full.onnx"],
                  "inputs": [{"name": "x", "dtype": "float32", "shape": x_shape}],
                  "outputs": [{"name": "logits", "dtype": "float32", "shape": [dim, classes]}]},
        "full": ref("full.onnx"),
        "objective": {"rate_hz": None, "accuracy_budget": 0.5},
        "cuts": [
            {"id": "edge-only", "kind": "edge-only", "head": ref("cuts/edge-only/head.onnx"), "tail": None,
             "tensors": [], "quantization": [], "predicted": {"edge_ms": 0.3, "cloud_ms": 0.0}},
            {"id": "cloud-only", "kind": "cloud-only", "head": None, "tail": ref("cuts/cloud-only/tail.onnx"),
             "tensors": [{"name": "x", "dtype": "float32", "shape": x_shape, "source": "input"}],
             "quantization": quant(n_x), "predicted": {"edge_ms": 0.0, "cloud_ms": 0.3}},
            {"id": "c1", "kind": "interior", "head": ref("cuts/c1/head.onnx"), "tail": ref("cuts/c1/tail.onnx"),
             "tensors": [{"name": "h", "dtype": "float32", "shape": h_shape, "source": "head", "quant_axis": 1}],
             "quantization": quant(n_h), "predicted": {"edge_ms": 0.2, "cloud_ms": 0.1}},
        ],
        "plan_table": [row(2.0, "c1", 8, n_h), row(20.0, "c1", 32, 4 * n_h)],
        "baselines": {"cloud-only": [row(2.0, "cloud-only", 32, 4 * n_x), row(20.0, "cloud-only", 32, 4 * n_x)]},
        "cache": None,
    }
    (tmp / "plan.json").write_text(json.dumps(plan, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- the server process


class ServerProcess:
    """`coach cloud serve` as a subprocess; waits for its ready line."""

    def __init__(self, args: list[str], timeout_s: float = 120.0, env: dict | None = None):
        cmd = [sys.executable, "-m", "coach_runtime.cli", "cloud", "serve", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, cwd=Path(__file__).resolve().parents[1])
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.host, self.port, self.models = self._wait_ready(timeout_s)
        self.stdout_lines: list[str] = []
        threading.Thread(target=self._drain_stdout, daemon=True).start()

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    def _drain_stdout(self) -> None:
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))

    def _wait_ready(self, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        result: list = []

        def read():
            for line in self.proc.stdout:
                m = READY_RE.match(line.strip())
                if m:
                    result.append((m.group(2), int(m.group(3)), m.group(1)))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.monotonic()))
        if not result:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("coach cloud serve did not become ready: " + " | ".join(self.stderr_lines[-5:]))
        return result[0]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def rss_kib(self) -> int | None:
        from bench.procs import rss_kib

        return rss_kib(self.proc.pid)

    def stop(self, timeout_s: float = 30.0) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# ---------------------------------------------------------------- the load


def _cut_and_request(bundle_dir: Path, bits: int):
    """A request body for the bundle's first interior cut (else cloud-only), random data."""
    from protos import codec
    from protos.bundle import load_bundle
    from protos.coach.v1 import coach_pb2 as pb

    b = load_bundle(bundle_dir)
    cuts = [c for c in b.cuts.values() if c.kind == "interior"] or [c for c in b.cuts.values() if c.kind == "cloud-only"]
    cut = cuts[0]
    rng = np.random.default_rng(0)
    tensors = []
    for s in cut.tensors:
        shape = [1 if d < 0 else d for d in s.shape]
        x = np.maximum(rng.standard_normal(shape), 0).astype(s.dtype)
        tb = bits if np.issubdtype(x.dtype, np.floating) else 32
        tensors.append(codec.encode(x, tb, axis=s.quant_axis if tb <= 8 else None, name=s.name))
    req = pb.InferRequest(model=b.model_name, plan_sha256=b.plan_sha256, cut_id=cut.id, tensors=tensors)
    return cut.id, req


async def _one_stream(stub, template, depth: int, stop_at: float, stats: dict, sid: int) -> None:
    import grpc

    from protos.coach.v1 import coach_pb2 as pb

    sent: dict[int, float] = {}
    slots = asyncio.Semaphore(depth)
    call = stub.Stream()
    done_sending = asyncio.Event()

    async def writer():
        i = 0
        try:
            while time.perf_counter() < stop_at:
                await slots.acquire()
                req = pb.InferRequest()
                req.CopyFrom(template)
                req.request_id = (sid << 32) | i
                sent[req.request_id] = time.perf_counter()
                await call.write(req)
                i += 1
            await call.done_writing()
        finally:
            done_sending.set()

    w = asyncio.create_task(writer())
    try:
        async for resp in call:
            t = sent.pop(resp.request_id, None)
            slots.release()
            if t is None:
                stats["unexpected"] += 1
                continue
            if resp.error.code:
                stats["errors"] += 1
                stats["error_messages"].setdefault(resp.error.message[:120], 0)
                stats["error_messages"][resp.error.message[:120]] += 1
                continue
            now = time.perf_counter()
            stats["lat"].append((now, (now - t) * 1e3))
            tm = resp.timing
            stats["server"].append((tm.queue_ms, tm.decode_ms, tm.compute_ms, tm.batch_size))
    except grpc.aio.AioRpcError as exc:
        stats["stream_errors"].append(f"{exc.code().name}: {exc.details()}")
    await w


async def _load(address: str, template, streams: int, depth: int, seconds: float, stats: dict) -> None:
    import grpc

    from protos.coach.v1 import coach_pb2_grpc as pb_grpc

    stop_at = time.perf_counter() + seconds
    # A few connections, as separate devices would have; streams spread over them.
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(min(4, streams))]
    try:
        stubs = [pb_grpc.CollaborativeInferenceStub(c) for c in channels]
        await asyncio.gather(*(_one_stream(stubs[i % len(stubs)], template, depth, stop_at, stats, i)
                               for i in range(streams)))
    finally:
        for c in channels:
            await c.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", type=int, default=32, help="concurrent streams (edge devices)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the run")
    p.add_argument("--depth", type=int, default=2, help="requests in flight per stream")
    p.add_argument("--bundle", type=Path, default=None, help="plan bundle to serve (default: a tiny generated one)")
    p.add_argument("--bits", type=int, default=8, help="bit width of the cut tensors sent")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-timeout-ms", type=float, default=2.0)
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for coach cloud serve")
    p.add_argument("--out", type=Path, default=Path("bench/results/load.json"))


def _percentiles(v: list[float]) -> dict:
    if not v:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(v)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from coach_runtime.errors import UserError

    if args.streams < 1 or args.seconds <= 0 or args.depth < 1:
        raise UserError("--streams and --depth must be >= 1 and --seconds > 0")
    work = Path(tempfile.mkdtemp(prefix="coach-load-"))
    try:
        bundle = args.bundle or write_tiny_bundle(work / "bundle")
        try:
            cut_id, template = _cut_and_request(bundle, args.bits)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        server_args = ["--bundle", str(bundle), "--listen", "127.0.0.1:0", "--max-batch", str(args.max_batch),
                       "--batch-timeout-ms", str(args.batch_timeout_ms),
                       "--max-streams-per-client", str(max(64, args.streams)), *args.server_arg]
        server = ServerProcess(server_args)
        rss: list[tuple[float, int]] = []
        stats = {"lat": [], "server": [], "errors": 0, "unexpected": 0, "stream_errors": [], "error_messages": {}}
        stop = threading.Event()
        t0 = time.perf_counter()

        def sample():
            while not stop.is_set():
                kib = server.rss_kib()
                if kib is not None:
                    rss.append((time.perf_counter() - t0, kib))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            asyncio.run(_load(server.address, template, args.streams, args.depth, args.seconds, stats))
        finally:
            elapsed = time.perf_counter() - t0
            stop.set()
            sampler.join()
            exit_code = server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    warm = max(5.0, 0.2 * args.seconds)
    after = [k for t, k in rss if t >= warm]
    base = after[0] if after else None
    growth = (max(after) - base) / base if after and base else None
    lat = [ms for _, ms in stats["lat"]]
    srv = np.asarray(stats["server"]) if stats["server"] else np.zeros((0, 4))
    result = {
        "machine": platform.machine(), "cpus": os.cpu_count(), "bundle": str(args.bundle or "tiny (generated)"),
        "cut": cut_id, "bits": args.bits, "request_bytes": template.ByteSize(),
        "streams": args.streams, "depth": args.depth, "seconds": elapsed,
        "max_batch": args.max_batch, "batch_timeout_ms": args.batch_timeout_ms,
        "answered": len(lat), "errors": stats["errors"], "stream_errors": stats["stream_errors"],
        "error_messages": stats["error_messages"], "unexpected_responses": stats["unexpected"],
        "throughput_rps": len(lat) / elapsed if elapsed else 0.0,
        "latency_ms": _percentiles(lat),
        "server_ms": {"queue": _percentiles(list(srv[:, 0])), "decode": _percentiles(list(srv[:, 1])),
                      "compute": _percentiles(list(srv[:, 2]))},
        "batch_size_mean": float(srv[:, 3].mean()) if len(srv) else None,
        "rss_kib": rss, "rss_warmup_s": warm, "rss_after_warmup_kib": base,
        "rss_max_kib": max(after) if after else None, "rss_growth_after_warmup": growth,
        "rss_growth_ok": growth is not None and growth <= 0.10,
        "server_exit_code": exit_code,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out)

    table = Table(title=f"coach bench load: {args.streams} streams x depth {args.depth}, {elapsed:.0f} s, "
                        f"cut {cut_id} at {args.bits} bits ({template.ByteSize()} B/request)")
    for col in ("metric", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    L = result["latency_ms"]

    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    rows = [
        ("answered", str(len(lat))), ("errors (requests)", str(stats["errors"])),
        ("errors (streams)", str(len(stats["stream_errors"]))),
        ("throughput (req/s)", fmt(result["throughput_rps"], ".0f")),
        ("latency p50 / p90 / p99 (ms)", f"{fmt(L['p50'])} / {fmt(L['p90'])} / {fmt(L['p99'])}"),
        ("server queue p50 / p99 (ms)", f"{fmt(result['server_ms']['queue']['p50'])} / {fmt(result['server_ms']['queue']['p99'])}"),
        ("server decode p50 (ms)", fmt(result["server_ms"]["decode"]["p50"], ".3f")),
        ("server compute p50 (ms, share)", fmt(result["server_ms"]["compute"]["p50"], ".3f")),
        ("mean batch size", fmt(result["batch_size_mean"])),
        ("server RSS after warm-up / max (MiB)",
         f"{fmt(base / 1024 if base else None, '.1f')} / {fmt(max(after) / 1024 if after else None, '.1f')}"),
        ("RSS growth after warm-up", "-" if growth is None else f"{growth * 100:+.1f}% "
         + ("(ok, <= 10%)" if result["rss_growth_ok"] else "(over 10%)")),
        ("server exit code (SIGTERM)", str(exit_code)),
    ]
    for r in rows:
        table.add_row(*r)
    Console().print(table)
    print(f"wrote {args.out}")
    return 0
