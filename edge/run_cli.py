"""`coach edge run`: run a plan bundle's head here and stream cut tensors to the cloud."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edge.adapt import BITS_RULES, DEFAULT_BITS_RULE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, type=Path, help="plan bundle directory (from `coach plan`)")
    p.add_argument("--cloud", help="cloud service HOST:PORT; omit to run everything on this device")
    p.add_argument("--source", required=True,
                   help="inputs: FILE.npz | DIR of .npz | synthetic[:N] | csi:PATH | csi+udp://HOST:PORT")
    p.add_argument("--rate", type=float, help="input rate in Hz (default: as fast as the pipeline goes)")
    p.add_argument("--out", type=Path, help="write results as JSON lines here")
    p.add_argument("--providers", help="onnxruntime providers in order, e.g. tensorrt,cuda,cpu (default: best available)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--plan", default="coach",
                   help="follow this plan table: coach (default) or a baseline of the bundle, e.g. neurosurgeon")
    p.add_argument("--no-cache", action="store_true", help="switch the semantic cache off")
    p.add_argument("--bits", type=int, help="fixed bit width (disables adaptive quantization)")
    p.add_argument("--cut", help="fixed cut id (disables cut switching)")
    p.add_argument("--bits-rule", choices=BITS_RULES, default=DEFAULT_BITS_RULE,
                   help="which of the bit widths that keep up with the link to send: least-drop (default), the "
                        "fewest bits among those with the least accuracy drop the plan measured; highest, the "
                        "highest width that keeps up")
    p.add_argument("--no-accuracy-bank", action="store_true",
                   help="never send below the plan's admissible bit widths (default: on dips, when the running "
                        "accuracy drop has room in the budget, narrower measured widths keep the link up)")
    p.add_argument("--compress", choices=["zstd", "lz4"], help="lossless stage on the packed tensor")
    p.add_argument("--max-inflight", type=int, default=8,
                   help="at most this many requests on the wire (default 8; the agent keeps fewer: what the "
                        "median round trip needs at the current period, plus one)")
    p.add_argument("--deadline-ms", type=float, default=5000.0, help="compute locally past this (default 5000)")
    p.add_argument("--deadline-rtt-factor", type=float, default=5.0,
                   help="...or past this many median round trips, at least 150 ms (default 5; 0: fixed deadline only)")
    p.add_argument("--offline-ok", action="store_true", help="start even if the cloud is unreachable")
    p.add_argument("--tls-ca", help="CA certificate (PEM) that signed the cloud's certificate; enables TLS")
    p.add_argument("--tls-cert", help="this device's client certificate (PEM), for mutual TLS")
    p.add_argument("--tls-key", help="this device's client key (PEM)")
    p.add_argument("--token", help="bearer token of this device (or env COACH_TOKEN)")
    p.add_argument("--overwrite", action="store_true",
                   help="start --out afresh (default: resume, skipping inputs whose results it already has)")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    p.add_argument("--metrics-port", type=int, metavar="P",
                   help="serve Prometheus metrics (answers by place, bytes, bandwidth, bits, semantic cache) on this port")
    p.add_argument("--metrics-host", default="0.0.0.0", metavar="H", help="address for --metrics-port (default 0.0.0.0)")


def results_written(path: Path) -> set[int]:
    """Ids of the complete result lines in `path`; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    ids = set()
    for line in keep.splitlines():
        try:
            ids.add(int(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            continue
    return ids


def run(args) -> int:
    from coach_runtime.errors import UserError
    from edge.agent import Agent, AgentConfig
    from edge.sources import open_source
    from edge.status import RunStats, StatusLine

    if args.deadline_rtt_factor < 0:
        raise UserError(f"--deadline-rtt-factor {args.deadline_rtt_factor:g}: use 0 (the fixed deadline only) "
                        "or a positive number of round trips")
    if args.bits is not None and args.bits not in (32, 16, 8, 6, 4, 3, 2):
        raise UserError(f"--bits {args.bits}: use one of 32, 16, 8, 6, 4, 3, 2")
    link = {k: v for k, v in {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
                              "token": args.token or os.environ.get("COACH_TOKEN")}.items() if v}
    cfg = AgentConfig(cloud=args.cloud, providers=args.providers.split(",") if args.providers else None,
                      threads=args.threads, max_inflight=args.max_inflight, deadline_ms=args.deadline_ms,
                      deadline_rtt_factor=args.deadline_rtt_factor,
                      bits=args.bits, cut=args.cut, compress=args.compress, offline_ok=args.offline_ok, link=link,
                      plan=args.plan, cache=not args.no_cache, bank=not args.no_accuracy_bank,
                      bits_rule=args.bits_rule)
    import signal

    def stop(*_):  # systemd stops with SIGTERM: finish like Ctrl-C (results written so far are kept)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    agent = Agent(args.bundle, cfg)
    if args.cut and args.cut not in agent.bundle.cuts:
        raise UserError(f"--cut {args.cut}: the bundle has cuts {', '.join(agent.bundle.cuts)}")
    samples = open_source(args.source, agent.inputs)
    metrics = None
    if args.metrics_port is not None:
        try:
            from edge.metrics import agent_registry, serve_metrics
        except ImportError:
            raise UserError("--metrics-port needs prometheus-client: pip install 'coach-runtime[edge]'") from None
        try:
            metrics = serve_metrics(agent_registry(agent), args.metrics_host, args.metrics_port)
        except OSError as exc:
            raise UserError(f"--metrics-port {args.metrics_port}: {exc.strerror}; pick a free port") from None
        print(f"metrics on http://{args.metrics_host}:{metrics.server_address[1]}/metrics", file=sys.stderr)
    agent.connect()  # an unreachable or mismatched cloud fails here, before any output
    stats, status = RunStats(), StatusLine()
    out = None
    if args.out:
        done = set() if args.overwrite else results_written(args.out)
        if done:
            print(f"resuming {args.out}: {len(done)} results already there", file=sys.stderr)
            samples = (s for s in samples if s.id not in done)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out = open(args.out, "a" if done else "w")
    try:
        with agent:
            for r in agent.run(samples, rate_hz=args.rate):
                stats.add(r)
                if out:
                    out.write(json.dumps(r.to_dict()) + "\n")
                if not args.quiet:
                    status.update(stats, agent)
    finally:
        if out:
            out.close()
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        if not args.quiet and stats.count:
            status.update(stats, agent, force=True)
            status.close()
    summary = stats.summary()
    summary["fallback"] = agent.stats["fallback"]
    summary["reconnects"] = agent.stats["reconnects"]
    print(json.dumps(summary), file=sys.stderr if args.out is None else sys.stdout)
    return 0
