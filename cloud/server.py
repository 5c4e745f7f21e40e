"""The grpc.aio server: a thin servicer over cloud.handlers, plus health and reflection.

Decoding and inference run in a thread pool, off the event loop. Within a stream, requests are
worked on concurrently (up to `max_inflight`) and answered in request order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from cloud.handlers import EchoModel, Limits, Model, RequestError, handle
from protos.coach.v1 import coach_pb2 as pb
from protos.coach.v1 import coach_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CollaborativeInference"].full_name


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:0"  # localhost unless told otherwise; port 0 picks a free one
    workers: int = 2
    max_inflight: int = 8  # per stream
    max_message_bytes: int = 64 * 1024 * 1024
    limits: Limits = field(default_factory=Limits)


class ModelRegistry:
    """(model name, plan sha256) -> Model. An empty sha256 in a request matches the only plan of a model."""

    def __init__(self, models: list[Model]):
        self._models = {(m.name, m.plan_sha256): m for m in models}

    def find(self, name: str, plan_sha256: str) -> Model:
        m = self._models.get((name, plan_sha256))
        if m is None and not plan_sha256:
            same = [v for (n, _), v in self._models.items() if n == name]
            m = same[0] if len(same) == 1 else None
        if m is None:
            known = ", ".join(f"{n}@{h[:12] or '-'}" for n, h in self._models) or "none"
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"no bundle for model '{name}' plan '{plan_sha256[:12]}'; loaded: {known}")
        return m

    def __iter__(self):
        return iter(self._models.values())


class CollaborativeInference(pb_grpc.CollaborativeInferenceServicer):
    def __init__(self, registry: ModelRegistry, config: ServerConfig, describe=None):
        self.registry = registry
        self.config = config
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="coach-cloud")
        self._describe = describe

    def _submit(self, request: pb.InferRequest) -> asyncio.Future:
        recv_ns, recv_t = time.time_ns(), time.perf_counter()
        return asyncio.get_running_loop().run_in_executor(
            self.pool, handle, request, self.registry.find, self.config.limits,
            recv_ns, request.ByteSize(), recv_t,
        )

    async def Infer(self, request, context):
        return await self._submit(request)

    async def Stream(self, request_iterator, context):
        pending: asyncio.Queue = asyncio.Queue(maxsize=self.config.max_inflight)

        async def read():
            try:
                async for request in request_iterator:
                    await pending.put(self._submit(request))
            finally:
                await pending.put(None)

        reader = asyncio.create_task(read())
        try:
            while (fut := await pending.get()) is not None:
                yield await fut
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()

    async def Describe(self, request, context):
        if self._describe is not None:
            return self._describe()
        resp = pb.DescribeResponse(server_version=_version(), max_message_bytes=self.config.max_message_bytes)
        for m in self.registry:
            resp.bundles.add(model=m.name, plan_sha256=m.plan_sha256)
        return resp


def _version() -> str:
    from coach_runtime.cli import version

    return version()


async def start_server(models: list[Model] | None = None, config: ServerConfig | None = None):
    """Start serving; returns (server, bound port, health servicer). Health reports SERVING."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    config = config or ServerConfig()
    registry = ModelRegistry(models if models is not None else [EchoModel()])
    opts = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    server = grpc.aio.server(options=opts)
    servicer = CollaborativeInference(registry, config)
    pb_grpc.add_CollaborativeInferenceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await _set_health(health_servicer, name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving on port %d", port)
    return server, port, health_servicer


async def _set_health(servicer, name, status):
    res = servicer.set(name, status)
    if asyncio.iscoroutine(res):
        await res
