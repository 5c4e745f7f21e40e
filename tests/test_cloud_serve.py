"""`coach cloud serve` on real plan bundles: tails, Describe, micro-batching, timing, metrics, providers,
health, graceful shutdown, and the CLI (ready line, SIGTERM, one-line errors)."""

import asyncio
import threading
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from bench.load_bench import ServerProcess, write_tiny_bundle
from cloud.server import ServerConfig, serve
from cloud.tails import Runtime, choose_providers, load_model
from protos import codec
from protos.bundle import load_bundle
from protos.coach.v1 import coach_pb2 as pb
from protos.coach.v1 import coach_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return write_tiny_bundle(root / "tiny"), write_tiny_bundle(root / "fixed", fixed_batch=True, name="fixed")


@pytest.fixture(scope="module")
def models(bundles):
    rt = Runtime(("CPUExecutionProvider",), 1)
    return [load_model(b, rt) for b in bundles]


@contextlib.asynccontextmanager
async def _server(models, **cfg):
    running = await serve(models, ServerConfig(listen="127.0.0.1:0", **cfg))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            yield running, pb_grpc.CollaborativeInferenceStub(ch), ch
    finally:
        await running.shutdown(grace_s=1)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _requests(bundle_dir, n, bits=8, seed=0, batch=1, cut="c1", **kw):
    """Requests for cut c1 (head run here, as the edge would) and the expected tail outputs."""
    b = load_bundle(bundle_dir)
    head, tail = _session(b.head_path("c1")), _session(b.tail_path("c1"))
    rng = np.random.default_rng(seed)
    reqs, expected = [], []
    for i in range(n):
        x = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)
        if cut == "c1":
            (h,) = head.run(None, {"x": x})
            t = codec.encode(h, bits, axis=1 if bits <= 8 else None, name="h")
            expected.append(tail.run(None, {"h": codec.decode(t)})[0])
        else:
            t = codec.encode(x, bits, name="x")
            expected.append(_session(b.full_path).run(None, {"x": codec.decode(t)})[0])
        reqs.append(pb.InferRequest(request_id=i, model=b.model_name, plan_sha256=b.plan_sha256, cut_id=cut,
                                    tensors=[t], return_outputs=True, top_k=3, **kw))
    return reqs, expected


def test_describe_lists_bundles_cuts_and_tensor_specs(bundles, models):
    async def go():
        async with _server(models) as (_, stub, _ch):
            return await stub.Describe(pb.DescribeRequest())

    d = asyncio.run(go())
    assert d.max_message_bytes == ServerConfig().max_message_bytes and d.server_version
    by_model = {b.model: b for b in d.bundles}
    assert set(by_model) == {"tiny", "fixed"}
    tiny = by_model["tiny"]
    assert tiny.plan_sha256 == load_bundle(bundles[0]).plan_sha256
    assert [(t.name, t.dtype, list(t.shape)) for t in tiny.inputs] == [("x", pb.FLOAT32, [-1, 3, 8, 8])]
    assert [t.name for t in tiny.outputs] == ["logits"]
    cuts = {c.id: c for c in tiny.cuts}
    assert set(cuts) == {"c1", "cloud-only"}  # edge-only has nothing to run here
    assert [(t.name, list(t.shape)) for t in cuts["c1"].tensors] == [("h", [-1, 8, 8, 8])]
    assert [t.name for t in cuts["cloud-only"].tensors] == ["x"]


def test_stream_runs_the_tail_in_order_with_topk_outputs_and_timing(bundles, models):
    reqs, expected = _requests(bundles[0], 12, bits=8)
    creqs, cexp = _requests(bundles[0], 3, bits=32, seed=5, cut="cloud-only")
    for i, r in enumerate(creqs):
        r.request_id = 100 + i

    async def go():
        async with _server(models) as (_, stub, _ch):
            before = time.time_ns()
            out = [r async for r in stub.Stream(iter(reqs[:6] + creqs + reqs[6:]))]
            return before, out

    before, out = asyncio.run(go())
    assert [r.request_id for r in out] == list(range(6)) + [100, 101, 102] + list(range(6, 12))
    by_id = {r.request_id: r for r in out}
    for i, (req, exp) in enumerate(list(zip(reqs, expected)) + [(r, e) for r, e in zip(creqs, cexp)]):
        r = by_id[req.request_id]
        assert r.error.code == 0, r.error.message
        y = codec.decode(r.outputs[0])
        assert r.outputs[0].name == "logits" and np.allclose(y, exp, rtol=1e-5, atol=1e-5)
        assert [c.index for c in r.topk] == list(np.argsort(-exp[0], kind="stable")[:3])
        assert sum(c.score for c in r.topk) <= 1.0 + 1e-6
        t = r.timing
        assert before <= t.receive_unix_ns <= time.time_ns()
        assert t.bytes_received == req.ByteSize()
        assert t.queue_ms >= 0 and t.decode_ms > 0 and t.compute_ms > 0 and t.batch_size >= 1


def test_measure_only_requests_are_answered_with_their_arrival_and_run_nothing(bundles, models):
    """A link probe (measure_only) gets its receive time and size back at once, in stream order, with
    nothing decoded or run: a payload that could not be decoded is no error, no batch is counted, and
    the metrics count it as a probe. An unknown plan is still refused."""
    reqs, _ = _requests(bundles[0], 4, bits=8)
    probe = pb.InferRequest()
    probe.CopyFrom(reqs[1])
    probe.request_id, probe.measure_only = 50, True
    probe.tensors[0].data = probe.tensors[0].data[:-3]  # truncated: decoding would refuse it
    stranger = pb.InferRequest(request_id=51, model=probe.model, plan_sha256="0" * 64, cut_id="c1",
                               measure_only=True)

    async def go():
        async with _server(models) as (running, stub, _ch):
            before = time.time_ns()
            out = [r async for r in stub.Stream(iter([reqs[0], probe, reqs[2], reqs[3]]))]
            refused = await stub.Infer(stranger)
            return before, out, refused, running.metrics.text().decode()

    before, out, refused, metrics = asyncio.run(go())
    assert [r.request_id for r in out] == [0, 50, 2, 3]
    p = out[1]
    assert p.error.code == 0 and not p.topk and not p.outputs
    assert before <= p.timing.receive_unix_ns <= time.time_ns() and p.timing.bytes_received == probe.ByteSize()
    assert p.timing.batch_size == 0 and p.timing.compute_ms == 0 and p.timing.decode_ms == 0
    assert all(r.error.code == 0 and r.topk and r.timing.batch_size == 1 for r in out if r.request_id != 50)
    assert refused.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "coach_probes_total 1.0" in metrics and "coach_requests_total 5.0" in metrics
    assert 'coach_stage_seconds_count{stage="compute"} 3.0' in metrics


def test_requests_from_many_streams_share_micro_batches_with_exact_results(bundles, models):
    per_stream = [_requests(bundles[0], 6, bits=8, seed=s) for s in range(4)]
    fixed = [_requests(bundles[1], 6, bits=8, seed=s) for s in range(2)]

    async def go():
        async with _server(models, max_batch=4, batch_timeout_ms=40) as (running, stub, _ch):
            outs = await asyncio.gather(*(
                _collect(stub.Stream(iter(reqs))) for reqs, _ in per_stream + fixed))
            return outs, running.metrics.text().decode()

    async def _collect(call):
        return [r async for r in call]

    outs, metrics = asyncio.run(go())
    sizes = []
    for (reqs, exp), out in zip(per_stream, outs[:4]):
        assert [r.request_id for r in out] == [r.request_id for r in reqs]
        for r, e in zip(out, exp):
            assert r.error.code == 0 and np.allclose(codec.decode(r.outputs[0]), e, rtol=1e-5, atol=1e-5)
            sizes.append(r.timing.batch_size)
    assert max(sizes) > 1  # 4 streams at once with a 40 ms window: requests shared runs
    for (reqs, exp), out in zip(fixed, outs[4:]):
        for r, e in zip(out, exp):
            assert r.error.code == 0 and r.timing.batch_size == 1  # fixed batch dim: one by one
            assert np.allclose(codec.decode(r.outputs[0]), e, rtol=1e-5, atol=1e-5)
    assert "coach_requests_total 36.0" in metrics
    assert 'coach_stage_seconds_count{stage="compute"} 36.0' in metrics
    assert "coach_batch_size_count" in metrics


def test_batched_requests_with_several_rows_each(bundles, models):
    reqs, expected = [], []
    for i, rows in enumerate((3, 1, 2, 3, 1)):  # different batch sizes still share runs
        r, e = _requests(bundles[0], 1, bits=16, batch=rows, seed=i)
        r[0].request_id = i
        reqs += r
        expected += e

    class Busy:
        """The model, but its first run waits until every request has arrived: the compute thread
        is busy, so (opportunistic batching) the others collect into one batch meanwhile."""

        def __init__(self, model):
            self.model, self.gate, self.started, self.first = model, threading.Event(), threading.Event(), True

        def __getattr__(self, name):
            return getattr(self.model, name)

        def run(self, cut, feeds):
            if self.first:
                self.first = False
                self.started.set()
                self.gate.wait(10)
            return self.model.run(cut, feeds)

    busy = Busy(models[0])

    async def go():
        async with _server([busy, models[1]], max_batch=8, batch_timeout_ms=10_000) as (running, stub, _ch):
            first = asyncio.ensure_future(stub.Infer(reqs[0]))
            await asyncio.get_running_loop().run_in_executor(None, busy.started.wait, 10)
            rest = [asyncio.ensure_future(stub.Infer(r)) for r in reqs[1:]]
            while running.servicer.batcher.waiting() < len(reqs) - 1:
                await asyncio.sleep(0.01)
            busy.gate.set()
            return await asyncio.wait_for(asyncio.gather(first, *rest), 10)  # (not the 10 s timer)

    out = asyncio.run(go())
    assert [r.timing.batch_size for r in out] == [1] + [len(reqs) - 1] * (len(reqs) - 1)
    for r, e in zip(out, expected):
        y = codec.decode(r.outputs[0])
        assert r.request_id == reqs[out.index(r)].request_id
        assert y.shape == e.shape and np.allclose(y, e, rtol=1e-5, atol=1e-5)


def test_metrics_http_endpoint_counts_requests_and_errors(bundles, models):
    reqs, _ = _requests(bundles[0], 3)
    bad = pb.InferRequest(request_id=9, model="nope")

    async def go():
        async with _server(models) as (running, stub, _ch):
            port = running.metrics.start_http("127.0.0.1", 0)
            try:
                for r in reqs + [bad]:
                    await stub.Infer(r)
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    None, lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
            finally:
                running.metrics.stop_http()

    text = asyncio.run(go())
    assert "coach_requests_total 4.0" in text
    assert 'coach_errors_total{code="NOT_FOUND"} 1.0' in text
    sent = sum(r.ByteSize() for r in reqs) + bad.ByteSize()
    assert f"coach_received_bytes_total {float(sent)}" in text
    assert "coach_active_streams 0.0" in text


def test_providers_choice_and_a_failing_provider_is_dropped(bundles, monkeypatch, caplog):
    assert choose_providers(None, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(None, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])[0] == \
        "TensorrtExecutionProvider"
    assert choose_providers(["cuda", "CPU"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ValueError, match="'cuda' is not available"):
        choose_providers(["cuda"], ["CPUExecutionProvider"])

    real = ort.InferenceSession
    tried = []

    class Flaky:  # "Fake" builds but fails its warm-up run, as a broken GPU provider would
        def __init__(self, path, sess_options=None, providers=None):
            tried.append(providers[0])
            self._s = real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
            self._bad = providers[0] == "FakeExecutionProvider"

        def run(self, *a, **k):
            if self._bad:
                raise RuntimeError("CUDA failure 999: no kernel image")
            return self._s.run(*a, **k)

        def __getattr__(self, name):
            return getattr(self._s, name)

    monkeypatch.setattr(ort, "InferenceSession", Flaky)
    with caplog.at_level("WARNING"):
        m = load_model(bundles[0], Runtime(("FakeExecutionProvider", "CPUExecutionProvider"), 1))
    assert "FakeExecutionProvider" in tried and "CPUExecutionProvider" in tried
    assert "failed its warm-up" in caplog.text and "dropping it" in caplog.text
    x = np.ones((1, 8, 8, 8), np.float32)
    assert m.run("c1", {"h": x})["logits"].shape == (1, 5)


def test_shutdown_answers_in_flight_requests_then_ends_streams(bundles, models):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reqs, _ = _requests(bundles[0], 6)

    async def go():
        running = await serve(models, ServerConfig(listen="127.0.0.1:0", idle_timeout_s=30))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.CollaborativeInferenceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            call = stub.Stream()
            for r in reqs:
                await call.write(r)
            got = [await call.read() for _ in range(3)]
            status_before = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
            stopping = asyncio.ensure_future(running.shutdown(grace_s=10))
            rest = []
            with contextlib.suppress(grpc.aio.AioRpcError):  # read() raises once the status is not OK
                while (r := await call.read()) is not grpc.aio.EOF:
                    rest.append(r)
            code, details = await call.code(), await call.details()
            clean = await stopping
            return status_before, got + rest, code, details, clean

    status_before, answered, code, details, clean = asyncio.run(go())
    assert status_before == 1  # SERVING
    assert sorted(r.request_id for r in answered) == list(range(6))  # nothing in flight was dropped
    assert all(r.error.code == 0 for r in answered)
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
    assert clean


# ---------------------------------------------------------------- the CLI


def test_cli_serves_prints_ready_line_and_exits_0_on_sigterm(bundles, free_port):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    mport = free_port
    srv = ServerProcess(["--bundle", str(bundles[0]), "--listen", "127.0.0.1:0", "--metrics-port", str(mport)])
    try:
        assert srv.models == "tiny" and srv.host == "127.0.0.1"
        with grpc.insecure_channel(srv.address) as ch:
            st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="coach.v1.CollaborativeInference"))
            assert st.status == health_pb2.HealthCheckResponse.SERVING
            reqs, expected = _requests(bundles[0], 4)
            out = list(pb_grpc.CollaborativeInferenceStub(ch).Stream(iter(reqs)))
        assert [r.request_id for r in out] == [0, 1, 2, 3]
        assert np.allclose(codec.decode(out[0].outputs[0]), expected[0], rtol=1e-5, atol=1e-5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        assert "coach_requests_total 4.0" in text
        assert any("c1" in line and "micro-batched" in line for line in srv.stderr_lines)
    finally:
        rc = srv.stop()
    assert rc == 0


def _cli(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "coach_runtime.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_cli_bad_bundles_and_flags_are_one_line_errors(bundles, tmp_path):
    tampered = write_tiny_bundle(tmp_path / "tampered")
    with open(tampered / "cuts" / "c1" / "tail.onnx", "ab") as f:
        f.write(b"\0")
    not_bundle = tmp_path / "empty"
    not_bundle.mkdir()
    broken = write_tiny_bundle(tmp_path / "broken")
    plan = json.loads((broken / "plan.json").read_text())
    del plan["cuts"][2]["tensors"][0]["dtype"]
    (broken / "plan.json").write_text(json.dumps(plan))
    cases = [
        (["--bundle", str(tampered)], "tail.onnx"),
        (["--bundle", str(not_bundle)], "plan.json"),
        (["--bundle", str(broken)], "cuts[2].tensors[0].dtype"),
        (["--bundle", str(bundles[0]), "--bundle", str(bundles[0])], "pass each bundle once"),
        (["--bundle", str(bundles[0]), "--providers", "NoSuchThing"], "--providers"),
        (["--bundle", str(bundles[0]), "--tls-cert", str(tmp_path / "x.pem")], "--tls-key"),
        (["--bundle", str(bundles[0]), "--listen", "nonsense"], "HOST:PORT"),
        (["--bundle", str(bundles[0]), "--max-batch", "0"], "--max-batch"),
    ]
    for argv, needle in cases:
        r = _cli("cloud", "serve", "--listen", "127.0.0.1:0", *argv) if "--listen" not in argv else _cli("cloud", "serve", *argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("coach: error: "), r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr


def test_cli_port_in_use_is_a_one_line_error(bundles):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = _cli("cloud", "serve", "--bundle", str(bundles[0]), "--listen", f"127.0.0.1:{port}")
    assert r.returncode == 2 and "coach: error: --listen" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("coach: error:")


def test_cli_sigint_also_stops_cleanly(bundles):
    srv = ServerProcess(["--bundle", str(bundles[1]), "--listen", "127.0.0.1:0"])
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(30) == 0


def test_serves_a_bundle_written_by_coach_plan(bundles, tmp_path):
    """The planner's real output: every cut with a cloud side answers like the full model."""
    pytest.importorskip("partitioner.plan_cli", reason="coach plan is not available in this checkout")
    src = tmp_path / "tinyplan.onnx"
    src.write_bytes((bundles[0] / "full.onnx").read_bytes())
    r = _cli("plan", str(src), "--bits", "32,8", "--bandwidth", "2,20", "--runs", "2", "--out", str(tmp_path / "planned"),
             timeout=300)
    assert r.returncode == 0, r.stderr
    rt = Runtime(("CPUExecutionProvider",), 1)
    model = load_model(tmp_path / "planned", rt)
    b = model.bundle
    assert set(model.tails) == {c.id for c in b.cuts.values() if c.kind != "edge-only"}
    full = _session(b.full_path)
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    (want,) = full.run(None, {"x": x})
    reqs = []
    for i, (cid, cut) in enumerate(model.tails.items()):
        feeds = {"x": x}
        if cut.cut.kind == "interior":
            head = _session(b.head_path(cid))
            feeds.update(zip([o.name for o in head.get_outputs()], head.run(None, {"x": x})))
        tensors = [codec.encode(feeds[s.name], 32, name=s.name) for s in cut.cut.tensors]
        reqs.append(pb.InferRequest(request_id=i, model=b.model_name, plan_sha256=b.plan_sha256, cut_id=cid,
                                    tensors=tensors, return_outputs=True))

    async def go():
        async with _server([model]) as (_, stub, _ch):
            return [r async for r in stub.Stream(iter(reqs))]

    out = asyncio.run(go())
    assert len(out) == len(reqs) >= 1  # cloud-only always; interior cuts as the (timing-based) plan picks them
    for r in out:
        assert r.error.code == 0, r.error.message
        assert np.allclose(codec.decode(r.outputs[0]), want, rtol=1e-4, atol=1e-5)


def test_during_shutdown_health_is_not_serving_and_new_calls_are_refused():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cloud.handlers import EchoModel

    class SlowEcho(EchoModel):
        def run(self, cut_id, tensors):
            time.sleep(0.4)  # a long tail run: still in flight when the shutdown starts
            return super().run(cut_id, tensors)

    req = [pb.InferRequest(request_id=i, model="echo", tensors=[codec.encode(np.ones((1, 4), np.float32))])
           for i in range(2)]

    async def go():
        running = await serve([SlowEcho()], ServerConfig(listen="127.0.0.1:0", compute_workers=2))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.CollaborativeInferenceStub(ch)
            call = stub.Stream()
            for r in req:
                await call.write(r)
            await asyncio.sleep(0.1)
            stopping = asyncio.ensure_future(running.shutdown(grace_s=10))
            await asyncio.sleep(0.05)
            health = (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))).status
            try:
                await stub.Infer(req[0], timeout=5)
                refused = None
            except grpc.aio.AioRpcError as exc:
                refused = exc.code()
            got = []
            with contextlib.suppress(grpc.aio.AioRpcError):
                while (r := await call.read()) is not grpc.aio.EOF:
                    got.append(r)
            return health, refused, got, await call.code(), await stopping

    health, refused, got, code, clean = asyncio.run(go())
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING
    assert refused == grpc.StatusCode.UNAVAILABLE
    assert [r.request_id for r in got] == [0, 1] and all(r.error.code == 0 for r in got)
    assert code == grpc.StatusCode.UNAVAILABLE and clean
