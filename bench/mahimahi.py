"""Mahimahi link traces: parsing, capacity over an interval, statistics, and a pure link model.

A mahimahi trace is a text file with one integer per line: a millisecond timestamp, counted from
the start of the trace, at which one 1500-byte packet may cross the link. Several packets in one
millisecond repeat the timestamp. At its end the trace repeats, shifted by its last timestamp
(mahimahi's `LinkQueue` does the same), so a file holding just "1" is a 12 Mbit/s link.

Besides files, `load_trace` understands a fixed-rate pseudo-trace, `const:R` for R Mbit/s, built as
the shortest exact-rate schedule (8 Mbit/s = 2 packets every 3 ms).

Everything here is pure (numpy over a small dataclass), shared by the link emulator
(bench/link.py), the benchmarks and the tests of the bandwidth estimator and the adaptive
quantizer, which replay traces without sockets through `simulate_messages`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from coach_runtime.errors import UserError

PACKET_BYTES = 1500  # one delivery opportunity carries one MTU-sized packet
TRACES_DIR = Path(__file__).resolve().parent / "traces"  # the traces shipped with the project


@dataclass(frozen=True)
class Trace:
    """Delivery opportunities: sorted ms timestamps within one period; repeats every period_ms."""

    name: str
    timestamps_ms: np.ndarray  # int64, non-decreasing, in [0, period_ms]
    period_ms: int  # the last timestamp: the trace repeats shifted by this much

    @property
    def packets(self) -> int:
        return int(self.timestamps_ms.size)

    @property
    def mean_mbps(self) -> float:
        return self.packets * PACKET_BYTES * 8 / (self.period_ms * 1e3)

    def count(self, t_ms) -> np.ndarray | int:
        """Number of opportunities at times <= t_ms (t_ms >= 0, scalar or array)."""
        t = np.asarray(t_ms, dtype=np.float64)
        cycles = np.floor(t / self.period_ms)
        rest = t - cycles * self.period_ms
        n = cycles.astype(np.int64) * self.packets + np.searchsorted(
            self.timestamps_ms, rest, side="right"
        )
        return int(n) if n.ndim == 0 else n

    def count_before(self, t_ms) -> np.ndarray | int:
        """Number of opportunities at times < t_ms: the index of the first one at or after t_ms."""
        t = np.asarray(t_ms, dtype=np.float64)
        cycles = np.floor(t / self.period_ms)
        rest = t - cycles * self.period_ms
        n = cycles.astype(np.int64) * self.packets + np.searchsorted(
            self.timestamps_ms, rest, side="left"
        )
        return int(n) if n.ndim == 0 else n

    def time_of(self, index) -> np.ndarray | float:
        """Time (ms) of the opportunity with 0-based `index` (scalar or array)."""
        k = np.asarray(index, dtype=np.int64)
        t = (k // self.packets) * self.period_ms + self.timestamps_ms[k % self.packets]
        return float(t) if t.ndim == 0 else t.astype(np.float64)


def parse_trace(text: str, name: str = "trace") -> Trace:
    """Parse mahimahi trace text; raises UserError naming the line on bad input."""
    values = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            v = int(line)
        except ValueError:
            raise UserError(
                f"trace {name}, line {lineno}: '{line[:20]}' is not an integer millisecond "
                "timestamp; a mahimahi trace has one per line"
            ) from None
        if v < 0 or (values and v < values[-1]):
            raise UserError(
                f"trace {name}, line {lineno}: timestamps must be >= 0 and non-decreasing"
            )
        values.append(v)
    if not values or values[-1] <= 0:
        raise UserError(
            f"trace {name}: empty, or its last timestamp is 0; it needs a period > 0 ms"
        )
    return Trace(name, np.asarray(values, dtype=np.int64), int(values[-1]))


def constant_trace(mbps: float) -> Trace:
    """A fixed-rate link: the shortest schedule with exactly `mbps` (to 1/1000 packet per ms)."""
    if not (mbps > 0 and math.isfinite(mbps)):
        raise UserError(f"const:{mbps}: the rate must be a positive number of Mbit/s")
    # packets per ms = Mbit/s / 12 (one 1500-byte packet per ms is 12 Mbit/s)
    per_ms = (Fraction(mbps).limit_denominator(10_000) / Fraction(PACKET_BYTES * 8, 1000))
    per_ms = per_ms.limit_denominator(1000)
    p, q = per_ms.numerator, per_ms.denominator  # p packets every q ms
    if p == 0:
        raise UserError(f"const:{mbps}: below one packet per second; give a higher rate")
    ts = [math.ceil((k + 1) * q / p) for k in range(p)]  # evenly spread, last one at q
    return Trace(f"const:{mbps:g}", np.asarray(ts, dtype=np.int64), q)


def load_trace(spec: str | Path | Trace) -> Trace:
    """A Trace from `const:R` (Mbit/s), a file path, or a file name in bench/traces/."""
    if isinstance(spec, Trace):
        return spec
    s = str(spec)
    if s.startswith("const:"):
        try:
            rate = float(s.split(":", 1)[1])
        except ValueError:
            raise UserError(f"'{s}': expected const:MBPS, e.g. const:8") from None
        return constant_trace(rate)
    path = Path(s)
    if not path.exists() and (TRACES_DIR / s).exists():
        path = TRACES_DIR / s
    try:
        text = path.read_text()
    except OSError as exc:
        shipped = ", ".join(p.name for p in sorted(TRACES_DIR.glob("*.up")))
        raise UserError(
            f"cannot read trace '{s}' ({exc.strerror}); give a mahimahi file, const:MBPS, "
            f"or one of: {shipped}"
        ) from None
    return parse_trace(text, name=path.name)


# ---------------------------------------------------------------- capacity and statistics


def capacity_mbps(trace: Trace, start_ms: float, end_ms: float) -> float:
    """Link capacity averaged over (start_ms, end_ms] of the (repeating) trace, Mbit/s."""
    if end_ms <= start_ms:
        raise ValueError("capacity_mbps: end_ms must be after start_ms")
    n = trace.count(end_ms) - trace.count(start_ms)
    return n * PACKET_BYTES * 8 / ((end_ms - start_ms) * 1e3)


def windowed_capacity(
    trace: Trace, window_ms: float, duration_ms: float | None = None
) -> np.ndarray:
    """Capacity (Mbit/s) of consecutive windows over one period (or `duration_ms`)."""
    duration_ms = trace.period_ms if duration_ms is None else duration_ms
    edges = np.arange(0.0, duration_ms + 1e-9, window_ms)
    counts = np.diff(trace.count(edges))
    return counts * PACKET_BYTES * 8 / (window_ms * 1e3)


def percentiles(values, qs=(5, 25, 50, 75, 95)) -> dict[str, float]:
    """{'p5': ..., 'p50': ...} of `values`."""
    v = np.asarray(values, dtype=np.float64)
    return {f"p{q:g}": float(np.percentile(v, q)) for q in qs}


@dataclass(frozen=True)
class TraceStats:
    name: str
    duration_s: float
    packets: int
    mean_mbps: float
    window_s: float
    min_mbps: float  # over windows of window_s
    max_mbps: float
    p5_mbps: float
    p50_mbps: float
    p95_mbps: float
    zero_windows: float  # fraction of windows with no capacity at all (outages)


def trace_stats(trace: Trace, window_s: float = 1.0) -> TraceStats:
    """Mean and spread of the capacity over windows of `window_s` (a period, >= 10 windows)."""
    w = windowed_capacity(trace, window_s * 1e3, max(trace.period_ms, 10 * window_s * 1e3))
    p = percentiles(w, (5, 50, 95))
    return TraceStats(
        name=trace.name,
        duration_s=trace.period_ms / 1e3,
        packets=trace.packets,
        mean_mbps=trace.mean_mbps,
        window_s=window_s,
        min_mbps=float(w.min()),
        max_mbps=float(w.max()),
        p5_mbps=p["p5"],
        p50_mbps=p["p50"],
        p95_mbps=p["p95"],
        zero_windows=float(np.mean(w == 0)),
    )


# ---------------------------------------------------------------- pure link model


class TraceLink:
    """The emulator's link model, one message at a time (state: the last opportunity used).

    Message i enters the FIFO whole at `send(t_ms, nbytes)` (calls in time order); each
    opportunity at or after that time carries up to 1500 queued bytes, a partly used opportunity
    may carry the head of the next message if it was already queued, and capacity unused while the
    queue is empty is lost. `send` returns when the last byte arrives: the time of the opportunity
    that carries it, plus delay_ms.
    """

    def __init__(self, trace: Trace, delay_ms: float = 0.0):
        self.trace, self.delay_ms = trace, delay_ms
        self._last = -1  # index of the opportunity that carried the previous message's last byte
        self._left = 0  # bytes still free in that opportunity
        self._t = -math.inf

    def send(self, t_ms: float, nbytes: int) -> float:
        if t_ms < self._t or nbytes <= 0:
            raise ValueError("TraceLink.send: times must not go back and nbytes must be > 0")
        self._t = t_ms
        first_free = self.trace.count_before(t_ms)  # first opportunity this message could use
        b = int(nbytes)
        if self._last >= first_free and self._left > 0:  # share the last opportunity
            used = min(self._left, b)
            b -= used
            self._left -= used
            if b == 0:
                return self.trace.time_of(self._last) + self.delay_ms
        k = max(first_free, self._last + 1)
        n = -(-b // PACKET_BYTES)
        self._last = k + n - 1
        self._left = n * PACKET_BYTES - b
        return self.trace.time_of(self._last) + self.delay_ms


def simulate_messages(trace: Trace, send_ms, nbytes, delay_ms: float = 0.0) -> np.ndarray:
    """Arrival time (ms) of each message written into the link at send_ms (see TraceLink)."""
    send = np.asarray(send_ms, dtype=np.float64)
    size = np.asarray(nbytes, dtype=np.int64)
    if send.shape != size.shape:
        raise ValueError("simulate_messages: send_ms and nbytes differ in length")
    link = TraceLink(trace, delay_ms)
    return np.array([link.send(t, n) for t, n in zip(send.tolist(), size.tolist())])
