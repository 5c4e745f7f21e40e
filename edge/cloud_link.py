"""The edge's connection to the cloud: one bidirectional Stream, reopened with backoff when it breaks.

Requests go in with `send`; every response is handed to `on_response`. When the stream breaks
(cloud killed, network cut) `on_broken` is called once: the agent then computes every unanswered
request locally. A background loop probes the cloud with Describe, with exponential backoff and full
jitter, and opens a new stream once it answers.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from dataclasses import dataclass
from typing import Callable

import grpc

from coach_runtime.errors import UserError
from protos.coach.v1 import coach_pb2 as pb
from protos.coach.v1 import coach_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkConfig:
    target: str  # HOST:PORT
    tls_ca: str | None = None  # PEM of the CA that signed the server (enables TLS)
    tls_cert: str | None = None  # client certificate for mutual TLS
    tls_key: str | None = None
    token: str | None = None  # per-device bearer token
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    probe_timeout_s: float = 1.0
    max_message_bytes: int = 64 * 1024 * 1024


def backoff_delays(initial: float, maximum: float, rng: random.Random):
    """Exponential backoff with full jitter: uniform(0, min(maximum, initial * 2^k))."""
    k = 0
    while True:
        yield rng.uniform(0, min(maximum, initial * 2**k))
        k += 1


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def make_channel(cfg: LinkConfig) -> grpc.Channel:
    opts = [("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]
    if cfg.tls_ca or cfg.tls_cert:
        creds = grpc.ssl_channel_credentials(_read(cfg.tls_ca), _read(cfg.tls_key), _read(cfg.tls_cert))
        return grpc.secure_channel(cfg.target, creds, options=opts)
    return grpc.insecure_channel(cfg.target, options=opts)


class CloudLink:
    def __init__(self, cfg: LinkConfig, on_response: Callable[[pb.InferResponse], None],
                 on_broken: Callable[[], None], on_up: Callable[[], None] = lambda: None):
        self.cfg = cfg
        self.on_response = on_response
        self.on_broken = on_broken
        self.on_up = on_up
        self.metadata = (("authorization", f"Bearer {cfg.token}"),) if cfg.token else ()
        self._channel = make_channel(cfg)
        self._stub = pb_grpc.CollaborativeInferenceStub(self._channel)
        self._lock = threading.Lock()
        self._outbox: queue.Queue | None = None  # the open stream's request queue; None when down
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self.reconnects = 0

    # ------------------------------------------------------------ public

    def describe(self, timeout_s: float | None = None) -> pb.DescribeResponse:
        return self._stub.Describe(pb.DescribeRequest(), timeout=timeout_s or self.cfg.probe_timeout_s,
                                   metadata=self.metadata)

    @property
    def up(self) -> bool:
        return self._outbox is not None

    def start(self, connected: bool) -> None:
        """Open the stream now (the cloud answered a probe) or start the reconnect loop."""
        if connected:
            self._open()
        else:
            self._spawn(self._reconnect_loop)

    def send(self, request: pb.InferRequest) -> bool:
        """Queue a request on the open stream; False when the link is down (compute it locally)."""
        with self._lock:
            if self._outbox is None:
                return False
            self._outbox.put(request)
            return True

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._outbox is not None:
                self._outbox.put(None)
                self._outbox = None
        for t in self._threads:
            t.join(timeout=2)
        self._channel.close()

    # ------------------------------------------------------------ internals

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"coach-link-{fn.__name__}")
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _open(self) -> None:
        outbox: queue.Queue = queue.Queue()

        def requests():
            while (item := outbox.get()) is not None:
                yield item

        call = self._stub.Stream(requests(), metadata=self.metadata)
        with self._lock:
            self._outbox = outbox
        self._spawn(self._receive, call, outbox)
        self.on_up()

    def _receive(self, call, outbox: queue.Queue) -> None:
        try:
            for response in call:
                self.on_response(response)
            if self._closed.is_set():
                return
            reason = "the cloud ended the stream"
        except grpc.RpcError as exc:
            if self._closed.is_set():
                return
            reason = f"{exc.code().name}: {exc.details()}"
        with self._lock:
            if self._outbox is outbox:
                self._outbox = None
        outbox.put(None)  # ends the request generator of the dead call
        log.warning("cloud stream broke (%s); computing locally and reconnecting", reason)
        self.on_broken()
        self._reconnect_loop()

    def _reconnect_loop(self) -> None:
        delays = backoff_delays(self.cfg.backoff_initial_s, self.cfg.backoff_max_s, random.Random())
        while not self._closed.is_set():
            if self._closed.wait(next(delays)):
                return
            try:
                self.describe()
            except grpc.RpcError:
                continue
            self.reconnects += 1
            log.warning("cloud is back; resuming collaboration")
            self._open()
            return
