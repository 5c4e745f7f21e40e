"""Prometheus metrics of the edge agent: the agent's counters and each semantic cache's telemetry,
read at scrape time, over HTTP."""

import types
import urllib.request

import numpy as np
from prometheus_client import generate_latest

from edge.metrics import agent_registry, serve_metrics
from edge.semantic_cache import CacheConfig, SemanticCache


def _sample(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{want}}}" if want else name):
            return float(value)
    raise AssertionError(f"{name} {labels} not in the scrape:\n{text}")


def test_cache_telemetry_and_agent_counters_are_scraped():
    cache = SemanticCache(np.eye(3, 4, dtype=np.float32), np.ones(3, bool),
                          CacheConfig(hit=0.5, band=0.2, band_bits=4, verify_fraction=1.0, momentum=None))
    f = np.array([1, 0, 0, 0], np.float32)
    for cls in (0, 0, 1):  # three verified hits, the cloud agrees with two
        d = cache.decide(f)
        cache.observe(f, cls, d)
    cache.decide(np.array([0.6, 0.5, 0, 0], np.float32) / np.hypot(0.6, 0.5))  # margin ~0.13: full
    cache.add_saved(1234)
    est = types.SimpleNamespace(estimate_mbps=lambda: 3.5)
    agent = types.SimpleNamespace(stats={"cloud": 7, "edge": 2, "cache": 3, "fallback": 1, "bytes": 1000,
                                         "verify_bytes": 300, "reconnects": 1},
                                  estimator=est, decision=types.SimpleNamespace(cut_id="c1", bits=6),
                                  caches={"c1": cache})
    text = generate_latest(agent_registry(agent)).decode()
    assert _sample(text, "coach_edge_answers_total", where="cloud") == 7
    assert _sample(text, "coach_edge_answers_total", where="fallback") == 1
    assert _sample(text, "coach_edge_sent_bytes_total") == 1300
    assert _sample(text, "coach_edge_bandwidth_mbps") == 3.5
    assert _sample(text, "coach_edge_bits", cut="c1") == 6
    assert _sample(text, "coach_edge_cache_hits_total", cut="c1") == 3
    assert _sample(text, "coach_edge_cache_lookups_total", cut="c1") == 4
    assert _sample(text, "coach_edge_cache_verified_ok_total", cut="c1") == 2
    assert _sample(text, "coach_edge_cache_verified_precision", cut="c1") == 2 / 3
    assert _sample(text, "coach_edge_cache_hit_rate", cut="c1") == 0.75
    assert _sample(text, "coach_edge_cache_saved_bytes_total", cut="c1") == 1234
    assert _sample(text, "coach_edge_cache_hit_threshold", cut="c1") > 0.5  # the wrong hit raised it


def test_a_running_agent_serves_its_metrics_over_http(toy_bundle):
    from edge.agent import Agent, AgentConfig
    from edge.sources import open_source

    with Agent(toy_bundle, AgentConfig(cloud=None)) as agent:
        results = list(agent.run(open_source("synthetic:5", agent.inputs)))
        server = serve_metrics(agent_registry(agent), "127.0.0.1", 0)
        try:
            port = server.server_address[1]
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        finally:
            server.shutdown()
            server.server_close()
    assert len(results) == 5
    local = {w: _sample(text, "coach_edge_answers_total", where=w) for w in ("edge", "fallback")}
    # no cloud: all five computed here (as "edge" on an edge-only plan row, else as "fallback")
    fallback = sum(r.cut.endswith(">local") for r in results)  # (the plan's cut, computed here instead)
    assert local == {"edge": 5 - fallback, "fallback": fallback}
    assert sum(local.values()) == 5
    assert _sample(text, "coach_edge_answers_total", where="cloud") == 0
