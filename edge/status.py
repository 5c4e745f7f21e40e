"""Running figures of an edge run and the live status line (throughput, p50/p95, bits, cut, bandwidth,
and the semantic cache's hit rate, verified precision and hit threshold)."""

from __future__ import annotations

import sys
import time
from collections import deque

import numpy as np


class RunStats:
    def __init__(self, window: int = 200):
        self.t0 = time.perf_counter()
        self.count = 0
        self.where: dict[str, int] = {}
        self.latencies: list[float] = []
        self.recent: deque[float] = deque(maxlen=window)  # completion times
        self.correct = 0
        self.labelled = 0

    def add(self, r) -> None:
        self.count += 1
        self.where[r.where] = self.where.get(r.where, 0) + 1
        self.latencies.append(r.timing.get("total_ms", 0.0))
        self.recent.append(time.perf_counter())
        if r.label is not None:
            self.labelled += 1
            self.correct += int(r.cls == r.label)

    def throughput(self) -> float:
        if len(self.recent) < 2:
            return 0.0
        span = self.recent[-1] - self.recent[0]
        return (len(self.recent) - 1) / span if span > 0 else 0.0

    def summary(self) -> dict:
        lat = np.asarray(self.latencies) if self.latencies else np.zeros(1)
        elapsed = time.perf_counter() - self.t0
        out = {"results": self.count, "seconds": elapsed, "throughput_hz": self.count / elapsed if elapsed else 0.0,
               "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
               "mean_ms": float(lat.mean()), "where": dict(self.where)}
        if self.labelled:
            out["accuracy"] = self.correct / self.labelled
        return out


class StatusLine:
    """Redraws one line on a terminal; on a pipe or file, logs a line every `every_s` seconds."""

    def __init__(self, stream=sys.stderr, every_s: float = 0.5):
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every_s if self.tty else 5.0
        self.last = 0.0

    def update(self, stats: RunStats, agent, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        lat = stats.latencies[-200:] or [0.0]
        est = agent.estimator.estimate_mbps()
        link = "local" if agent.link is None else ("up" if agent.link.up else "DOWN")
        line = (f"{stats.count} done  {stats.throughput():.1f}/s  p50 {np.percentile(lat, 50):.1f} ms  "
                f"p95 {np.percentile(lat, 95):.1f} ms  cut {agent.decision.cut_id}  bits {agent.decision.bits}  "
                f"bw {'?' if est is None else f'{est:.2f}'} Mbit/s  cloud {link}  "
                f"where {' '.join(f'{k}={v}' for k, v in sorted(stats.where.items()))}{cache_text(agent)}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def cache_text(agent) -> str:
    """'  cache hit 63% prec 98.5% thr 0.0181' for the cut in use ('' when it has no cache)."""
    cache = getattr(agent, "caches", {}).get(agent.decision.cut_id)
    if cache is None:
        return ""
    t = cache.telemetry()
    prec = "?" if t["verified_precision"] is None else f"{100 * t['verified_precision']:.1f}%"
    return f"  cache hit {100 * t['hit_rate']:.0f}% prec {prec} thr {t['hit_threshold']:.4f}"
