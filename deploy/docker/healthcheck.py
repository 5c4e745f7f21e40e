#!/usr/bin/env python3
"""Health probe for `coach cloud serve`: one grpc.health.v1 Check; exit 0 iff the answer is SERVING.

    python healthcheck.py                                   # plaintext, 127.0.0.1:50051, overall status
    python healthcheck.py --tls-ca /etc/coach/tls/ca.crt --server-name coach-cloud
    python healthcheck.py --service coach.v1.CollaborativeInference

Used by the container HEALTHCHECK (deploy/docker/Dockerfile.cloud) and by the Kubernetes exec probes
(deploy/k8s/deployment.yaml). Kubelet's built-in `grpc:` probe speaks plaintext only, so a server that
serves TLS needs this (or grpc_health_probe -tls). The health service needs no device token (the
token interceptor leaves it open); with mutual TLS pass a client certificate (--tls-cert/--tls-key).
Every flag can also come from the environment: COACH_HEALTH_ADDR, COACH_HEALTH_TLS_CA,
COACH_HEALTH_TLS_CERT, COACH_HEALTH_TLS_KEY, COACH_HEALTH_SERVER_NAME, COACH_HEALTH_SERVICE.
Exit codes: 0 SERVING, 1 another status, 2 an error (refused, TLS failure, timeout, unknown service).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"COACH_HEALTH_{name}") or default


def read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def channel(args) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(args.addr)
    creds = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.addr, creds, options=options)


def main() -> int:
    p = argparse.ArgumentParser(description="grpc.health.v1 probe for coach cloud serve")
    p.add_argument("--addr", default=env("ADDR", "127.0.0.1:50051"), help="HOST:PORT of the server")
    p.add_argument("--tls-ca", default=env("TLS_CA"), help="CA that signed the server certificate: use TLS")
    p.add_argument("--tls-cert", default=env("TLS_CERT"), help="client certificate, when the server wants mTLS")
    p.add_argument("--tls-key", default=env("TLS_KEY"), help="client key, when the server wants mTLS")
    p.add_argument("--server-name", default=env("SERVER_NAME"),
                   help="name to check the server certificate against (default: the host of --addr)")
    p.add_argument("--service", default=env("SERVICE", ""), help="service to ask about ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=float(env("TIMEOUT", "3")), help="seconds")
    args = p.parse_args()
    try:
        with channel(args) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except (grpc.RpcError, OSError) as exc:
        why = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
        print(f"unhealthy: {args.addr}: {why}", file=sys.stderr)
        return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.addr}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
