"""`coach cloud serve --bundle DIR [...]`: serve plan bundles' tails over gRPC.

Loads and verifies every bundle (sha256 of each file), opens and warms up a session per cut, then
starts the server and prints one line, "serving MODEL[, MODEL...] on HOST:PORT", once the health
service reports SERVING. SIGTERM or SIGINT: health goes NOT_SERVING, streams stop taking requests,
the requests already received are answered, then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from coach_runtime.errors import UserError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", action="append", type=Path, required=True, metavar="DIR",
                   help="plan bundle directory (repeat for several models)")
    p.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:50051; port 0 picks a free one)")
    p.add_argument("--providers", default=None, metavar="LIST",
                   help="onnxruntime providers, best first, e.g. CUDA,CPU (default: TensorRT, CUDA, CPU as available)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests per micro-batch (1: no batching)")
    p.add_argument("--batch-timeout-ms", type=float, default=2.0, metavar="T",
                   help="while the compute threads are busy, longest a request waits for others to batch "
                        "with (default 2 ms; an idle compute thread takes a request at once)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve Prometheus metrics on this port (same host as --listen)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="threads that parse and decode requests")
    p.add_argument("--compute-workers", type=int, default=1, metavar="N", help="threads that run tails")
    p.add_argument("--intra-op-threads", type=int, default=None, metavar="N",
                   help="onnxruntime threads per tail run (default: CPU cores / compute workers)")
    p.add_argument("--max-inflight", type=int, default=8, metavar="N", help="requests worked on at once per stream")
    p.add_argument("--max-message-mb", type=float, default=64.0, metavar="MB", help="largest request message (MiB)")
    p.add_argument("--max-elements", type=int, default=64 * 1024 * 1024, metavar="N", help="largest tensor (elements)")
    p.add_argument("--idle-timeout-s", type=float, default=300.0, metavar="S", help="close a stream idle this long (0: never)")
    p.add_argument("--max-streams-per-client", type=int, default=64, metavar="N",
                   help="open streams allowed per device token (or per client address without tokens)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=None, metavar="N",
                   help="calls the whole server takes at once; more get RESOURCE_EXHAUSTED (default: no limit)")
    p.add_argument("--grace-s", type=float, default=30.0, metavar="S", help="on SIGTERM, wait this long for in-flight requests")
    p.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help="server certificate (PEM): serve TLS")
    p.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="server private key (PEM)")
    p.add_argument("--client-ca", type=Path, default=None, metavar="PEM",
                   help="CA of client certificates (PEM): require mutual TLS")
    p.add_argument("--tokens", type=Path, default=None, metavar="FILE",
                   help="device token file (lines 'device-id sha256-hex'; coach cloud add-device): require tokens")


def _config(args):
    from cloud.auth import TokenStore
    from cloud.handlers import Limits
    from cloud.server import ServerConfig, TlsConfig

    for name in ("max_batch", "workers", "compute_workers", "max_inflight", "max_streams_per_client", "max_elements"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_concurrent_rpcs is not None and args.max_concurrent_rpcs < 1:
        raise UserError(f"--max-concurrent-rpcs must be at least 1, got {args.max_concurrent_rpcs}")
    for name in ("batch_timeout_ms", "idle_timeout_s", "grace_s"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative")
    if not 0 < args.max_message_mb <= 2047:
        raise UserError(f"--max-message-mb must lie in (0, 2047], got {args.max_message_mb}")
    if args.listen.rpartition(":")[0] == "" or not args.listen.rpartition(":")[2].isdigit():
        raise UserError(f"--listen '{args.listen}': expected HOST:PORT, e.g. 127.0.0.1:50051")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UserError("--tls-cert and --tls-key go together; pass both (coach cloud certs DIR makes a dev pair)")
    if args.client_ca is not None and args.tls_cert is None:
        raise UserError("--client-ca needs --tls-cert and --tls-key (mutual TLS is TLS plus client certificates)")
    tls = None
    if args.tls_cert is not None:
        for f in (args.tls_cert, args.tls_key, args.client_ca):
            if f is not None and not f.is_file():
                raise UserError(f"{f}: no such file; make dev certificates with: coach cloud certs DIR")
        tls = TlsConfig(args.tls_cert, args.tls_key, args.client_ca)
    tokens = None
    if args.tokens is not None:
        try:
            tokens = TokenStore.load(args.tokens)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if not tokens.by_hash:
            raise UserError(f"{args.tokens}: no device listed; add one with: coach cloud add-device --tokens "
                            f"{args.tokens} DEVICE_ID")
    return ServerConfig(
        listen=args.listen, workers=args.workers, compute_workers=args.compute_workers,
        max_inflight=args.max_inflight, max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        limits=Limits(max_elements=args.max_elements), max_batch=args.max_batch,
        batch_timeout_ms=args.batch_timeout_ms, idle_timeout_s=args.idle_timeout_s or None,
        max_streams_per_client=args.max_streams_per_client, max_concurrent_rpcs=args.max_concurrent_rpcs,
        tls=tls, tokens=tokens,
    )


def load_models(bundles: list[Path], providers: str | None, threads: int | None, compute_workers: int):
    """Every bundle verified and every tail warmed up; UserError naming the file on any problem."""
    from cloud.tails import Runtime, TailError, choose_providers, default_threads, load_model
    from protos.bundle import BundleError

    try:
        chosen = choose_providers([p for p in providers.split(",") if p.strip()] if providers else None)
    except ValueError as exc:
        raise UserError(f"--providers: {exc}") from None
    runtime = Runtime(tuple(chosen), threads or default_threads(compute_workers))
    models, seen = [], {}
    for path in bundles:
        try:
            m = load_model(path, runtime)
        except (BundleError, TailError) as exc:
            raise UserError(str(exc)) from None
        key = (m.name, m.plan_sha256)
        if key in seen:
            raise UserError(f"{path}: same model and plan as {seen[key]}; pass each bundle once")
        seen[key] = path
        models.append(m)
    for m in models:
        for cid, t in m.tails.items():
            provider = t.session.get_providers()[0].replace("ExecutionProvider", "")
            how = "micro-batched" if t.batchable else "one by one (the tail has a fixed batch dimension)"
            print(f"  {m.name} cut {cid}: {t.path.name} on {provider}, {how}", file=sys.stderr)
    return models


async def _serve(args, models, config) -> int:
    from cloud.metrics import Metrics
    from cloud.server import serve

    metrics = Metrics()
    try:
        running = await serve(models, config, metrics)
    except (OSError, ValueError) as exc:
        raise UserError(f"--listen {args.listen}: {exc}; pick a free port or another address") from None
    host = args.listen.rpartition(":")[0]
    if args.metrics_port is not None:
        try:
            mport = metrics.start_http(host.strip("[]"), args.metrics_port)
        except OSError as exc:
            await running.server.stop(0)
            raise UserError(f"--metrics-port {args.metrics_port}: {exc.strerror}; pick a free port") from None
        print(f"  metrics on http://{host}:{mport}/metrics", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    names = ", ".join(dict.fromkeys(m.name for m in models))
    print(f"serving {names} on {host}:{running.port}", flush=True)
    await stop.wait()
    print("shutting down: finishing in-flight requests", file=sys.stderr, flush=True)
    clean = await running.shutdown(args.grace_s)
    metrics.stop_http()
    if not clean:
        log.warning("some calls were still open after %.0f s and were cancelled", args.grace_s)
    return 0


def run(args) -> int:
    config = _config(args)
    models = load_models(args.bundle, args.providers, args.intra_op_threads, args.compute_workers)
    return asyncio.run(_serve(args, models, config))
