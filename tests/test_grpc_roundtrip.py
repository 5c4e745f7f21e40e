"""A real grpc.aio server on localhost and a client exchange quantized tensors over Stream and Infer."""

import asyncio

import grpc
import numpy as np

from cloud.server import ServerConfig, start_server
from protos import codec
from protos.coach.v1 import coach_pb2 as pb
from protos.coach.v1 import coach_pb2_grpc as pb_grpc


def _request(i, x, bits=8, **kw):
    return pb.InferRequest(request_id=i, model="echo", tensors=[codec.encode(x, bits, name="cut")],
                           return_outputs=True, **kw)


def _malformed(i):
    t = codec.encode(np.ones((4, 4), np.float32), 8, name="cut")
    t.data = t.data[:-3]  # truncated payload
    return pb.InferRequest(request_id=i, model="echo", tensors=[t])


async def _with_server(fn):
    server, port, _ = await start_server(config=ServerConfig(listen="127.0.0.1:0"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await fn(pb_grpc.CollaborativeInferenceStub(channel), channel)
    finally:
        await server.stop(grace=None)


def test_stream_round_trip_in_order_with_per_request_error():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 8, 6, 6)).astype(np.float32) for _ in range(6)]

    async def go(stub, _):
        reqs = [_request(i, x) for i, x in enumerate(xs)]
        reqs.insert(3, _malformed(100))
        call = stub.Stream(iter(reqs))
        return [r async for r in call]

    responses = asyncio.run(_with_server(go))
    assert [r.request_id for r in responses] == [0, 1, 2, 100, 3, 4, 5]  # request order, none dropped
    bad = responses[3]
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "tensor 'cut'" in bad.error.message and "bytes" in bad.error.message
    for r, x in zip([r for r in responses if r.request_id != 100], xs):
        assert r.error.code == 0
        y = codec.decode(r.outputs[0])
        scale = codec.encode(x, 8).quantization.scales[0]
        assert np.abs(y - x).max() <= scale / 2 + 1e-5
        assert r.timing.bytes_received > 0 and r.timing.receive_unix_ns > 0
        assert len(r.topk) == 5


def test_unary_infer_and_unknown_model_and_describe():
    x = np.arange(10, dtype=np.float32).reshape(1, 10)

    async def go(stub, _):
        ok = await stub.Infer(_request(7, x, bits=32))
        missing = await stub.Infer(pb.InferRequest(request_id=8, model="nope", tensors=[codec.encode(x)]))
        desc = await stub.Describe(pb.DescribeRequest())
        return ok, missing, desc

    ok, missing, desc = asyncio.run(_with_server(go))
    assert ok.request_id == 7 and np.array_equal(codec.decode(ok.outputs[0]), x)
    assert ok.topk[0].index == 9  # the largest value has the highest softmax score
    assert missing.error.code == grpc.StatusCode.NOT_FOUND.value[0] and "nope" in missing.error.message
    assert [b.model for b in desc.bundles] == ["echo"]


def test_health_serving_and_reflection_listed():
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    async def go(_, channel):
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="coach.v1.CollaborativeInference"))
        return status.status

    assert asyncio.run(_with_server(go)) == health_pb2.HealthCheckResponse.SERVING

    async def services():
        server, port, _ = await start_server()
        try:
            def sync_list():
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    return list(ProtoReflectionDescriptorDatabase(ch).get_services())
            return await asyncio.get_running_loop().run_in_executor(None, sync_list)
        finally:
            await server.stop(grace=None)

    assert "coach.v1.CollaborativeInference" in asyncio.run(services())
