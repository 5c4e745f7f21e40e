"""Prometheus metrics of the edge agent, read from its state at each scrape.

    registry = agent_registry(agent)      # a CollectorRegistry holding one AgentCollector
    server = serve_metrics(registry, "0.0.0.0", 9101)

Nothing is counted twice: the collector turns the agent's own counters (where answers came from,
bytes sent, reconnects), its decision and bandwidth estimate, and each semantic cache's telemetry
(hits, band sends, verified hits and their precision, hit threshold, bytes saved) into samples when
Prometheus scrapes. prometheus-client is imported only here, so an agent without --metrics-port
does not need it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class AgentCollector:
    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        a = self.agent
        answers = CounterMetricFamily("coach_edge_answers", "Results delivered, by where they were computed",
                                      labels=["where"])
        for where in ("cloud", "edge", "cache", "fallback"):
            answers.add_metric([where], a.stats.get(where, 0))
        yield answers
        yield CounterMetricFamily("coach_edge_sent_bytes", "Request bytes sent to the cloud (verification included)",
                                  value=a.stats.get("bytes", 0) + a.stats.get("verify_bytes", 0))
        yield CounterMetricFamily("coach_edge_reconnects", "Reconnections to the cloud", value=a.stats.get("reconnects", 0))
        est = a.estimator.estimate_mbps()
        if est is not None:
            yield GaugeMetricFamily("coach_edge_bandwidth_mbps", "Uplink bandwidth estimate", value=est)
        d = a.decision
        if d is not None:
            dec = GaugeMetricFamily("coach_edge_bits", "Bit width of the current decision", labels=["cut"])
            dec.add_metric([d.cut_id], d.bits or 32)
            yield dec
        yield from _cache_families(a.caches)


def _cache_families(caches: dict):
    fams = {
        "hits": CounterMetricFamily("coach_edge_cache_hits", "Inputs answered from the semantic cache", labels=["cut"]),
        "band": CounterMetricFamily("coach_edge_cache_band", "Inputs sent at the band's lower bits", labels=["cut"]),
        "lookups": CounterMetricFamily("coach_edge_cache_lookups", "Inputs looked up in the cache", labels=["cut"]),
        "verified": CounterMetricFamily("coach_edge_cache_verified", "Cache hits also sent to the cloud to verify",
                                        labels=["cut"]),
        "verified_ok": CounterMetricFamily("coach_edge_cache_verified_ok", "Verified hits the cloud agreed with",
                                           labels=["cut"]),
        "saved": CounterMetricFamily("coach_edge_cache_saved_bytes", "Request bytes not sent thanks to the cache",
                                     labels=["cut"]),
        "rate": GaugeMetricFamily("coach_edge_cache_hit_rate", "Hits per lookup so far", labels=["cut"]),
        "precision": GaugeMetricFamily("coach_edge_cache_verified_precision",
                                       "Verified precision of cache hits so far", labels=["cut"]),
        "threshold": GaugeMetricFamily("coach_edge_cache_hit_threshold", "Current hit threshold on the margin",
                                       labels=["cut"]),
    }
    for cut, cache in caches.items():
        t = cache.telemetry()
        fams["hits"].add_metric([cut], t["hit"])
        fams["band"].add_metric([cut], t["band"])
        fams["lookups"].add_metric([cut], t["hit"] + t["band"] + t["full"])
        fams["verified"].add_metric([cut], t["verified"])
        fams["verified_ok"].add_metric([cut], t["verified_ok"])
        fams["saved"].add_metric([cut], t["bytes_saved"])
        fams["rate"].add_metric([cut], t["hit_rate"])
        if t["verified_precision"] is not None:
            fams["precision"].add_metric([cut], t["verified_precision"])
        fams["threshold"].add_metric([cut], t["hit_threshold"])
    yield from fams.values()


def agent_registry(agent) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    return registry


def serve_metrics(registry: CollectorRegistry, host: str, port: int):
    """Serve /metrics over HTTP in a daemon thread (port 0: a free one); returns the server
    (`server.server_address[1]` is the port; `shutdown()` stops it)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
