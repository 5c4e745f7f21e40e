"""The grpc.aio server: the coach.v1 servicer over cloud.handlers, plus health and reflection.

    running = await serve(models, ServerConfig(listen="127.0.0.1:0", max_batch=8))
    running.port, running.metrics
    await running.shutdown(grace_s=30)   # NOT_SERVING, streams stop reading, in-flight work answers

Requests arrive as raw bytes (a lenient deserializer stamps their arrival time and size), so a
message that is not a valid protobuf gets its own INVALID_ARGUMENT answer and the stream goes on.
Parsing and decoding run in one thread pool, tail runs (micro-batched across streams by
cloud.batching) in another, never on the event loop; a request that finds a compute thread free and
no batch waiting is decoded and run there in one step. Within a stream up to `max_inflight` requests
are worked on at once and answered in request order; the stream stops reading while that many are
pending, so a fast client is held back by HTTP/2 flow control rather than by server memory.

Per-stream and per-client protection: an idle stream is closed with DEADLINE_EXCEEDED after
`idle_timeout_s`; more than `max_streams_per_client` open streams from one client (its device id
when tokens are on, else its address) get RESOURCE_EXHAUSTED; messages over `max_message_bytes`
are refused by gRPC itself (RESOURCE_EXHAUSTED, that stream only).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc

from cloud.auth import TokenAuth, TokenStore, bearer
from cloud.batching import MicroBatcher
from cloud.handlers import (EchoModel, Limits, Model, Prepared, Received, RequestError, answer_alone, error_response,
                            prepare, read_request_id, run_batch)
from cloud.metrics import Metrics
from cloud.refusal import refuse_stream
from protos.coach.v1 import coach_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CollaborativeInference"].full_name


@dataclass(frozen=True)
class TlsConfig:
    cert: Path  # server certificate chain (PEM)
    key: Path  # its private key (PEM)
    client_ca: Path | None = None  # set: mutual TLS, clients must present a certificate this CA signed


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:0"  # localhost unless told otherwise; port 0 picks a free one
    workers: int = 2  # parse + decode threads
    compute_workers: int = 1  # tail-run threads (each run uses the session's intra-op threads)
    max_inflight: int = 8  # per stream
    max_message_bytes: int = 64 * 1024 * 1024
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 8
    batch_timeout_ms: float = 2.0
    idle_timeout_s: float | None = 300.0  # None or 0: never
    max_streams_per_client: int = 64
    max_concurrent_rpcs: int | None = None
    tls: TlsConfig | None = None
    tokens: TokenStore | None = None


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
                               f"no bundle for model '{name[:100]}' plan '{plan_sha256[:12]}'; loaded: {known}")
        return m

    def __iter__(self):
        return iter(self._models.values())


def client_id(context, tokens: TokenStore | None) -> str:
    """Who opened a call: the device of its bearer token, else the peer's host (port dropped)."""
    if tokens is not None:
        device = tokens.device_for(bearer(context.invocation_metadata()))
        if device is not None:
            return f"device:{device}"
    peer = context.peer() or "unknown"
    kind, _, addr = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        addr = addr.rsplit(":", 1)[0]
    return f"peer:{kind}:{addr}"


class CollaborativeInference:
    """The coach.v1 service (registered by `register`, with raw-bytes request deserializers)."""

    def __init__(self, registry: ModelRegistry, config: ServerConfig, metrics: Metrics | None = None):
        self.registry = registry
        self.config = config
        self.metrics = metrics or Metrics()
        self.decode_pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="coach-decode")
        self.compute_pool = ThreadPoolExecutor(max_workers=config.compute_workers, thread_name_prefix="coach-compute")
        self.batcher = MicroBatcher(partial(run_batch, limits=config.limits), self.compute_pool,
                                    config.max_batch, config.batch_timeout_ms / 1e3, self.metrics.observe_batch,
                                    slots=config.compute_workers)
        self.closing = False
        self._streams: Counter[str] = Counter()
        self._readers: set[asyncio.Task] = set()
        self._calls = 0
        self._no_calls = asyncio.Event()
        self._no_calls.set()

    # ------------------------------------------------------------ one request

    async def answer(self, received: Received) -> pb.InferResponse:
        loop = asyncio.get_running_loop()
        try:
            alone = self.batcher.run_now(answer_alone, received, self.registry.find, self.config.limits)
            if alone is not None:  # a compute slot is free and nobody waits: decode and run in one hop
                item = await alone
                if item.timing.batch_size:  # it ran (not an error, nor a measure_only request)
                    self.metrics.observe_batch(1)
            else:
                item = await loop.run_in_executor(self.decode_pool, prepare, received, self.registry.find,
                                                  self.config.limits)
                if isinstance(item, Prepared):
                    try:
                        batchable = item.model.batchable(item.request.cut_id)
                    except Exception:
                        batchable = False
                    item = await self.batcher.submit(item.batch_key, item, batchable)
        except Exception as exc:  # the pools are gone (shutdown) or a bug: answer, don't break the stream
            log.exception("request failed outside its handler")
            item = error_response(read_request_id(received.raw), exc, received)
        self.metrics.observe(item)
        return item

    # ------------------------------------------------------------ RPCs

    def _enter(self) -> None:
        self._calls += 1
        self._no_calls.clear()

    def _leave(self) -> None:
        self._calls -= 1
        if self._calls == 0:
            self._no_calls.set()

    async def Infer(self, received: Received, context) -> pb.InferResponse:
        if self.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica")
        self._enter()
        try:
            return await self.answer(received)
        finally:
            self._leave()

    async def Stream(self, requests, context):
        if self.closing:
            await refuse_stream(requests, context, grpc.StatusCode.UNAVAILABLE,
                                "server is shutting down; reconnect to another replica")
            return
        who = client_id(context, self.config.tokens)
        limit = self.config.max_streams_per_client
        if self._streams[who] >= limit:
            self.metrics.stream_error(grpc.StatusCode.RESOURCE_EXHAUSTED)
            await refuse_stream(requests, context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{who.split(':', 1)[1]} already has {limit} open streams, the limit per client; "
                                "close one or multiplex requests on one stream")
            return
        self._streams[who] += 1
        self.metrics.streams.inc()
        self._enter()
        pending: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self.config.max_inflight)
        ending: list[tuple[grpc.StatusCode, str]] = []
        idle = self.config.idle_timeout_s or None

        async def read() -> None:
            try:
                while True:
                    await slots.acquire()
                    try:
                        received = await asyncio.wait_for(requests.__anext__(), idle)
                    except StopAsyncIteration:
                        break
                    pending.put_nowait(asyncio.ensure_future(self.answer(received)))
            except asyncio.TimeoutError:
                ending.append((grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no request for {idle:g} s; the server closed this idle stream, open a new one when there is data"))
            except asyncio.CancelledError:
                if self.closing:
                    ending.append((grpc.StatusCode.UNAVAILABLE,
                                   "server is shutting down; requests sent so far were answered, reconnect to another replica"))
            except Exception as exc:  # the transport failed (e.g. a message over the size limit)
                log.info("stream from %s ended: %s: %s", who, type(exc).__name__, exc)
                ending.append((grpc.StatusCode.INTERNAL, f"reading the stream failed: {type(exc).__name__}: {exc}"))
            finally:
                pending.put_nowait(None)

        reader = asyncio.create_task(read())
        self._readers.add(reader)
        try:
            while (fut := await pending.get()) is not None:
                response = await fut
                slots.release()
                yield response
            if ending:
                code, message = ending[0]
                self.metrics.stream_error(code)
                context.set_code(code)
                context.set_details(message)
        finally:
            reader.cancel()
            self._readers.discard(reader)
            while not pending.empty():
                fut = pending.get_nowait()
                if fut is not None:
                    fut.cancel()
            self._streams[who] -= 1
            if self._streams[who] <= 0:
                del self._streams[who]
            self.metrics.streams.dec()
            self._leave()

    async def Describe(self, request, context) -> pb.DescribeResponse:
        resp = pb.DescribeResponse(server_version=_version(), max_message_bytes=self.config.max_message_bytes)
        resp.bundles.extend(m.describe() for m in self.registry)
        return resp

    # ------------------------------------------------------------ shutdown

    async def drain(self, timeout_s: float) -> bool:
        """Stop reading new requests, let every call answer what it has; True if all ended in time."""
        self.closing = True
        for r in list(self._readers):
            r.cancel()
        try:
            await asyncio.wait_for(self._no_calls.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.compute_pool.shutdown(wait=False, cancel_futures=True)


def register(servicer: CollaborativeInference, server) -> None:
    serialize = pb.InferResponse.SerializeToString
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(servicer.Stream, request_deserializer=Received,
                                                        response_serializer=serialize),
        "Infer": grpc.unary_unary_rpc_method_handler(servicer.Infer, request_deserializer=Received,
                                                     response_serializer=serialize),
        "Describe": grpc.unary_unary_rpc_method_handler(servicer.Describe,
                                                        request_deserializer=pb.DescribeRequest.FromString,
                                                        response_serializer=pb.DescribeResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _version() -> str:
    from coach_runtime.cli import version

    return version()


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS (and mutual TLS when a client CA is given); ValueError naming an unreadable file."""
    def read(p: Path) -> bytes:
        try:
            return Path(p).read_bytes()
        except OSError as exc:
            raise ValueError(f"{p}: cannot read ({exc.strerror})") from None

    pair = [(read(tls.key), read(tls.cert))]
    if tls.client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=read(tls.client_ca), require_client_auth=True)


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    health: object
    servicer: CollaborativeInference
    metrics: Metrics

    async def shutdown(self, grace_s: float = 30.0) -> bool:
        """NOT_SERVING, stop taking requests, answer the in-flight ones, stop. True if all finished."""
        from grpc_health.v1 import health_pb2

        for name in ("", SERVICE_NAME):
            await _set_health(self.health, name, health_pb2.HealthCheckResponse.NOT_SERVING)
        clean = await self.servicer.drain(grace_s)
        await self.server.stop(grace=1.0 if clean else 0)
        self.servicer.close()
        return clean


async def serve(models: list[Model] | None = None, config: ServerConfig | None = None,
                metrics: Metrics | None = None) -> Running:
    """Start serving `models` (already loaded and warmed up); health reports SERVING when this returns."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    config = config or ServerConfig()
    registry = ModelRegistry(models if models is not None else [EchoModel()])
    opts = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),  # find dead edge links (cellular) within minutes
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
        # each stream may send 4 MiB before the server reads: a 200 KB request crosses in one go instead
        # of waiting on flow-control window updates (A/B of `coach bench pipeline --parts 3`, 4 runs each:
        # about -0.1 ms per request, lower p95)
        ("grpc.http2.lookahead_bytes", 4 << 20),
    ]
    interceptors = [TokenAuth(config.tokens)] if config.tokens is not None else []
    server = grpc.aio.server(options=opts, interceptors=interceptors,
                             maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    servicer = CollaborativeInference(registry, config, metrics)
    register(servicer, server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await _set_health(health_servicer, name, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        if config.tls is not None:
            port = server.add_secure_port(config.listen, server_credentials(config.tls))
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
        raise OSError(f"cannot listen on {config.listen}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await _set_health(health_servicer, name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving on port %d", port)
    return Running(server, port, health_servicer, servicer, servicer.metrics)


async def start_server(models: list[Model] | None = None, config: ServerConfig | None = None):
    """Start serving; returns (server, bound port, health servicer). Health reports SERVING."""
    running = await serve(models, config)
    return running.server, running.port, running.health


async def _set_health(servicer, name, status):
    res = servicer.set(name, status)
    if asyncio.iscoroutine(res):
        await res
