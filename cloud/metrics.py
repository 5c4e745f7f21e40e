"""Prometheus metrics of the cloud service, in a registry of its own.

    metrics = Metrics()
    metrics.observe(response)              # one answered request (its timing and error code)
    metrics.start_http("127.0.0.1", 9100)  # GET /metrics

Names: coach_requests_total, coach_errors_total{code}, coach_received_bytes_total,
coach_stage_seconds{stage=queue|decode|compute}, coach_batch_size, coach_active_streams,
coach_stream_errors_total{code} (streams that ended with an error status), coach_probes_total
(measure_only requests: link probes, answered without a run; counted in coach_requests_total too).
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from protos.coach.v1 import coach_pb2 as pb

_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def code_name(code: int) -> str:
    return _CODE_NAMES.get(code, str(code))


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("coach_requests", "Inference requests answered", registry=r)
        self.errors = Counter("coach_errors", "Requests answered with an error, by gRPC code", ["code"], registry=r)
        self.bytes = Counter("coach_received_bytes", "Serialized request bytes received", registry=r)
        self.stage = Histogram("coach_stage_seconds", "Per-request time in each server stage", ["stage"],
                               buckets=_STAGE_BUCKETS, registry=r)
        self.batch = Histogram("coach_batch_size", "Requests per tail run",
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.probes = Counter("coach_probes", "Measure-only requests (link probes) answered without a run",
                              registry=r)
        self.streams = Gauge("coach_active_streams", "Open Stream calls", registry=r)
        self.stream_errors = Counter("coach_stream_errors", "Streams ended with an error status, by gRPC code",
                                     ["code"], registry=r)
        self._http = None

    def observe(self, resp: pb.InferResponse) -> None:
        self.requests.inc()
        self.bytes.inc(resp.timing.bytes_received)
        if resp.error.code:
            self.errors.labels(code_name(resp.error.code)).inc()
            return
        t = resp.timing
        if not t.batch_size:  # nothing ran: a measure_only request
            self.probes.inc()
            return
        self.stage.labels("queue").observe(t.queue_ms / 1e3)
        self.stage.labels("decode").observe(t.decode_ms / 1e3)
        self.stage.labels("compute").observe(t.compute_ms / 1e3)

    def observe_batch(self, size: int) -> None:
        self.batch.observe(size)

    def stream_error(self, code: grpc.StatusCode) -> None:
        self.stream_errors.labels(code.name).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (port 0: a free one); returns the bound port."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
