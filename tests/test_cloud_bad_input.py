"""Bad input against a real server: every bad request is answered on its own (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED or NOT_FOUND, with a clear message) while the stream and everyone else go on;
oversized messages, garbage bytes, idle streams and too many streams per client."""

import asyncio
import contextlib
import math
import tracemalloc

import grpc
import numpy as np
import pytest

from bench.load_bench import write_tiny_bundle
from cloud.handlers import Limits, handle
from cloud.server import ModelRegistry, ServerConfig, serve
from cloud.tails import Runtime, load_model
from protos import codec
from protos.coach.v1 import coach_pb2 as pb
from protos.coach.v1 import coach_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
LIMITS = Limits(max_elements=1 << 20)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_tiny_bundle(tmp_path_factory.mktemp("b") / "tiny"), Runtime(("CPUExecutionProvider",), 1))


@contextlib.asynccontextmanager
async def _server(model, **cfg):
    cfg.setdefault("limits", LIMITS)
    running = await serve([model], ServerConfig(listen="127.0.0.1:0", **cfg))
    try:
        yield running
    finally:
        await running.shutdown(grace_s=1)


def _channel(running):
    return grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")


def _good(model, i, bits=8):
    h = np.maximum(np.random.default_rng(i).standard_normal((1, 8, 8, 8)), 0).astype(np.float32)
    return pb.InferRequest(request_id=i, model=model.name, plan_sha256=model.plan_sha256, cut_id="c1",
                           tensors=[codec.encode(h, bits, axis=1, name="h")])


def _bad_cases(model):
    """(request, expected code, text the message must contain) for every kind of bad request."""
    cases = []

    def add(mutate, code, needle, base_bits=8):
        r = _good(model, 1000 + len(cases), base_bits)
        mutate(r)
        cases.append((r, code, needle))

    def tensor(r):
        return r.tensors[0]

    add(lambda r: tensor(r).CopyFrom(codec.encode(np.ones((1, 8, 8, 8), np.int32), name="h")), INVALID, "dtype INT32")
    add(lambda r: tensor(r).CopyFrom(codec.encode(np.ones((1, 8, 8, 8), np.float16), 16, name="h")), INVALID, "dtype FLOAT16")
    add(lambda r: tensor(r).CopyFrom(codec.encode(np.ones((1, 8, 4, 16), np.float32), 8, name="h")), INVALID, "shape [1, 8, 4, 16]")
    add(lambda r: tensor(r).CopyFrom(codec.encode(np.ones((8, 8, 8), np.float32), 8, name="h")), INVALID, "expects [-1, 8, 8, 8]")
    add(lambda r: setattr(tensor(r), "name", "x"), INVALID, "missing ['h']")
    add(lambda r: r.tensors.append(codec.encode(np.ones(3, np.float32), name="extra")), INVALID, "unexpected ['extra']")
    add(lambda r: r.tensors.append(r.tensors[0]), INVALID, "sent twice")
    add(lambda r: r.ClearField("tensors"), INVALID, "missing ['h']")
    add(lambda r: setattr(tensor(r), "data", tensor(r).data[:-1]), INVALID, "bytes, expected")  # truncated
    add(lambda r: setattr(tensor(r), "data", tensor(r).data + b"\0\0"), INVALID, "bytes, expected")  # surplus
    add(lambda r: setattr(tensor(r), "data", tensor(r).data[:-4]), INVALID, "bytes, expected", base_bits=32)
    add(lambda r: setattr(tensor(r).quantization, "bits", 5), INVALID, "bits=5")
    add(lambda r: setattr(tensor(r).quantization, "bits", 12), INVALID, "bits=12")
    add(lambda r: setattr(tensor(r).quantization, "bits", 1), INVALID, "bits=1")
    add(lambda r: tensor(r).quantization.scales.__setitem__(3, math.nan), INVALID, "finite")
    add(lambda r: tensor(r).quantization.scales.__setitem__(0, math.inf), INVALID, "finite")
    add(lambda r: tensor(r).quantization.scales.__setitem__(0, -1.0), INVALID, "> 0")
    add(lambda r: tensor(r).quantization.zero_points.__setitem__(0, 300), INVALID, "zero points")
    add(lambda r: tensor(r).quantization.scales.pop(), INVALID, "scales")
    add(lambda r: setattr(tensor(r).quantization, "axis", 7), INVALID, "axis 7")
    add(lambda r: setattr(tensor(r), "dtype", 0), INVALID, "dtype")
    add(lambda r: setattr(tensor(r), "compression", pb.ZSTD), INVALID, "corrupt ZSTD")  # not a zstd frame
    add(lambda r: setattr(tensor(r), "compression", 9), INVALID, "compression")
    add(lambda r: tensor(r).shape.__setitem__(1, -8), INVALID, "shape")
    add(lambda r: tensor(r).CopyFrom(pb.Tensor(name="h", dtype=pb.FLOAT32, shape=[1, 1 << 30, 1 << 30, 8])),
        EXHAUSTED, "over the server's limit")  # declared size only: nothing is allocated
    add(lambda r: tensor(r).shape.__setitem__(0, 1 << 14), EXHAUSTED, "over the server's limit")
    add(lambda r: setattr(r, "model", "nope"), NOT_FOUND, "no bundle for model 'nope'")
    add(lambda r: setattr(r, "plan_sha256", "0" * 64), NOT_FOUND, "plan '000000000000'")
    add(lambda r: setattr(r, "cut_id", "c9"), NOT_FOUND, "no cut 'c9'")
    add(lambda r: setattr(r, "cut_id", "edge-only"), NOT_FOUND, "runs entirely on the edge")
    return cases


def test_each_bad_request_is_answered_alone_and_the_stream_goes_on(model):
    cases = _bad_cases(model)
    stream = []
    for i, (bad, _, _) in enumerate(cases):
        stream += [_good(model, i), bad]

    async def go():
        async with _server(model) as running, _channel(running) as ch:
            stub = pb_grpc.CollaborativeInferenceStub(ch)
            other = stub.Stream(iter([_good(model, 5000 + i) for i in range(20)]))  # another client, meanwhile
            mine, theirs = await asyncio.gather(_collect(stub.Stream(iter(stream))), _collect(other))
            unary = [await stub.Infer(bad) for bad, _, _ in cases[:5]]
            return mine, theirs, unary, running.metrics.text().decode()

    mine, theirs, unary, metrics = asyncio.run(go())
    assert [r.request_id for r in mine] == [r.request_id for r in stream]  # order kept, none dropped
    for r in mine[0::2]:
        assert r.error.code == 0 and len(r.topk) == 5
    for r, (bad, code, needle) in zip(mine[1::2], cases):
        assert (r.error.code, r.request_id) == (code, bad.request_id), (needle, r.error.message)
        assert needle in r.error.message, (needle, r.error.message)
        assert "\n" not in r.error.message and not r.topk and not r.outputs
    assert len(theirs) == 20 and all(r.error.code == 0 for r in theirs)
    assert [r.error.code for r in unary] == [c for _, c, _ in cases[:5]]
    assert 'coach_errors_total{code="INVALID_ARGUMENT"}' in metrics and 'code="NOT_FOUND"' in metrics


async def _collect(call):
    return [r async for r in call]


def test_oversized_declared_shape_is_refused_before_any_allocation(model):
    registry = ModelRegistry([model])
    req = _good(model, 1)
    req.tensors[0].CopyFrom(pb.Tensor(name="h", dtype=pb.FLOAT32, shape=[1, 8, 1 << 28, 1 << 28]))
    tracemalloc.start()
    try:
        resp = handle(req, registry.find, Limits(), 0, req.ByteSize(), 0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.error.code == EXHAUSTED and "over the server's limit" in resp.error.message
    assert peak < 1 << 20  # not a byte of the 2^59-element tensor was allocated


def test_message_over_the_size_limit_fails_only_its_own_stream(model):
    big = _good(model, 1, bits=32)
    big.tensors[0].data = big.tensors[0].data * 200  # ~400 KB > 256 KB

    async def go():
        async with _server(model, max_message_bytes=256 * 1024) as running, _channel(running) as ch:
            stub = pb_grpc.CollaborativeInferenceStub(ch)
            slow = stub.Stream()
            await slow.write(_good(model, 7))
            first = await slow.read()
            doomed = stub.Stream(iter([_good(model, 1), big, _good(model, 2)]))
            try:
                await _collect(doomed)
                failure = None
            except grpc.aio.AioRpcError as exc:
                failure = (exc.code(), exc.details())
            await slow.write(_good(model, 8))  # the other stream never noticed
            second = await slow.read()
            await slow.done_writing()
            after = await _collect(stub.Stream(iter([_good(model, 3)])))  # and new streams work
            return first, failure, second, after

    first, failure, second, after = asyncio.run(go())
    assert failure is not None and failure[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in failure[1]
    assert first.error.code == 0 and second.error.code == 0 and second.request_id == 8
    assert [r.error.code for r in after] == [0]


def test_garbage_bytes_get_a_per_request_invalid_argument_and_the_stream_goes_on(model):
    good = [_good(model, i).SerializeToString() for i in (1, 2, 3)]
    truncated = _good(model, 77).SerializeToString()[:-40]  # request_id 77 is still readable
    garbage = [b"\xff\xff\xff\xff", truncated, b"\x0a\x05abc"]  # bad tag, cut short, length past the end

    async def go():
        async with _server(model) as running, _channel(running) as ch:
            raw = ch.stream_stream("/coach.v1.CollaborativeInference/Stream",
                                   request_serializer=lambda b: b, response_deserializer=pb.InferResponse.FromString)
            mixed = [good[0], garbage[0], good[1], garbage[1], garbage[2], good[2]]
            stream_out = await _collect(raw(iter(mixed)))
            unary = ch.unary_unary("/coach.v1.CollaborativeInference/Infer",
                                   request_serializer=lambda b: b, response_deserializer=pb.InferResponse.FromString)
            return stream_out, await unary(garbage[1])

    out, unary = asyncio.run(go())
    assert [r.request_id for r in out] == [1, 0, 2, 77, 0, 3]
    assert [r.error.code for r in out] == [0, INVALID, 0, INVALID, INVALID, 0]
    for r in (out[1], out[3], out[4], unary):
        assert "not a valid coach.v1.InferRequest" in r.error.message and r.timing.bytes_received > 0
    assert unary.request_id == 77 and unary.error.code == INVALID


def test_idle_stream_is_closed_with_deadline_exceeded(model):
    async def go():
        async with _server(model, idle_timeout_s=0.5) as running, _channel(running) as ch:
            stub = pb_grpc.CollaborativeInferenceStub(ch)
            call = stub.Stream()
            await call.write(_good(model, 1))
            answered = await call.read()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()  # nothing more sent: the server gives up on us
            fresh = await _collect(stub.Stream(iter([_good(model, 2)])))
            return answered, e.value, fresh

    answered, err, fresh = asyncio.run(go())
    assert answered.error.code == 0
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in err.details()
    assert [r.error.code for r in fresh] == [0]


def test_too_many_streams_from_one_client(model):
    async def go():
        async with _server(model, max_streams_per_client=2) as running, _channel(running) as ch:
            stub = pb_grpc.CollaborativeInferenceStub(ch)
            a, b = stub.Stream(), stub.Stream()
            for i, call in enumerate((a, b)):
                await call.write(_good(model, i))
                await call.read()  # both open and serving
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _collect(stub.Stream(iter([_good(model, 9)])))
            await a.write(_good(model, 10))
            still = await a.read()  # the open ones are unaffected
            await a.done_writing()
            assert await a.read() is grpc.aio.EOF
            await asyncio.sleep(0.1)
            again = await _collect(stub.Stream(iter([_good(model, 11)])))  # a slot is free again
            await b.done_writing()
            return e.value, still, again

    err, still, again = asyncio.run(go())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 open streams" in err.details()
    assert still.error.code == 0 and [r.request_id for r in again] == [11]
