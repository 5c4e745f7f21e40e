"""Uplink goodput estimation from the cloud's receive timestamps.

For every request the edge knows when it handed the request to gRPC (`send_ns`, edge clock) and
the server reports when it had received it and how big it was (`ServerTiming.receive_unix_ns`,
`bytes_received`, server clock). From these we estimate the rate at which the uplink moves our
bytes while it is busy with them, the number the adaptive quantizer needs (T_t = bytes / rate).

Two kinds of rate samples, one per request i:

- dispersion ("back-to-back"): request i was already waiting when request i-1 finished, so the
  link spent exactly the gap recv_i - recv_{i-1} on request i's bytes: rate = bytes_i / gap.
  Needs no clock synchronisation: both times are the server's.
- one-way: request i found the link idle, so it crossed between send_i + B and recv_i, where B is
  the clock offset plus the propagation delay (unknown, constant): rate = bytes_i / (recv_i -
  send_i - B). B is estimated with the classic base-delay filter: D = min(recv_j - send_j) over
  a long window is B plus the shortest transfer seen, that of the request j* that achieved it; the
  shortest transfer is bytes_j* / C_hi, with C_hi the fastest recent dispersion rate (the link at
  its fast moments), so B = D - bytes_j* / C_hi. Before any request queued there is no C_hi, and
  no one-way sample is made (`calibrated` is False, the estimate None): constant-size requests
  on an idle link with unsynchronised clocks say nothing about its capacity; that is the limit of
  one-way timing. One request that surely queued calibrates it; an edge that must know can send
  its first three requests back to back (the third surely waits). Cellular links deliver in
  bursts (several packets in one millisecond), so the fastest transfers are short and the
  correction small.

Messages shorter than a packet: a link that delivers in packet opportunities (mahimahi, and a
cellular uplink's grants) carries a 100-byte message in one opportunity, after waiting for it: on
average half the gap between opportunities, i.e. half a packet's time at the link's rate. Its
one-way time says "half a packet at rate C", not "100 bytes at rate C" (read as bytes / time it
under-states C by packet / (2 * bytes): 0.5 instead of 4 Mbit/s for 96 bytes). So a one-way sample
is credited at least half a packet (`min_credit_bytes`, 750 of 1500). Dispersion samples need no
credit: back-to-back small messages share opportunities, and their telescoped gaps add up right.

Whether request i queued behind i-1 is decided with D, not B: since D >= B, send_i + D < recv_{i-1}
means request i surely waited; a request that waited less than the shortest transfer counts as
one-way, which over-states its transfer by that wait (a conservative error).

The estimate is the byte-weighted harmonic mean of the samples in a window (the last `window_s`
seconds, at least `min_samples` samples): sum(bytes) / sum(time), i.e. goodput over the time the
link was busy with us. For consecutive back-to-back requests the times telescope to
recv_last - recv_first, so jitter or a stall on a server timestamp (one gap longer, the next one
shorter) cancels exactly, and a near-zero gap (two requests read in one go) adds bytes but almost
no time, which the harmonic mean weighs as little as it should, unlike an arithmetic mean of
rates. Dispersion samples are therefore all kept, outages included. One-way samples have no such
partner: one more than `outlier_factor` times away from the window's median rate (a server stall,
a request held up in the sender's buffers) is left out; a real change of capacity passes as soon as
it is the window's median.

Everything is pure functions over small dataclasses plus a tiny state class:

    est = BandwidthEstimator()
    est.update(Observation(send_ns, resp.timing.receive_unix_ns, resp.timing.bytes_received))
    est.estimate_mbps()        # None until there is a sample (see `calibrated`)
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Observation:
    """One request: edge send time, server receive time (different clocks), bytes on the wire."""

    send_ns: int  # EdgeTiming.send_unix_ns: handed to gRPC (edge clock)
    recv_ns: int  # ServerTiming.receive_unix_ns: fully received (server clock)
    nbytes: int  # ServerTiming.bytes_received


@dataclass(frozen=True)
class Sample:
    """`nbytes` crossed the link in `seconds`, ending at recv_ns; kind: dispersion or one-way."""

    recv_ns: int
    nbytes: int
    seconds: float
    kind: str

    @property
    def mbps(self) -> float:
        return self.nbytes * 8 / self.seconds / 1e6


@dataclass(frozen=True)
class EstimatorConfig:
    window_s: float = 0.5  # samples received within this long before the latest one...
    min_samples: int = 4  # ...and at least this many latest ones
    max_samples: int = 256
    outlier_factor: float = 4.0  # leave out one-way samples beyond median * f or median / f
    base_window_s: float = 30.0  # window of the minimum delay D
    min_seconds: float = 50e-6  # shortest transfer time a sample may claim
    min_credit_bytes: int = 750  # a one-way sample counts at least half a 1500-byte packet (module doc)


# ---------------------------------------------------------------- pure functions


def queued_behind(prev_recv_ns: int, obs: Observation, sure_base_ns: int) -> bool:
    """Was `obs` surely waiting when the previous request finished? (`sure_base_ns` >= B)"""
    return obs.send_ns + sure_base_ns < prev_recv_ns


def make_sample(
    prev_recv_ns: int | None,
    obs: Observation,
    sure_base_ns: int,
    base_ns: int | None,
    min_seconds: float = 50e-6,
    min_credit_bytes: int = 0,
) -> Sample | None:
    """The rate sample of one request, or None (first request, empty, or one-way before B).

    `sure_base_ns` is D = min(recv - send), `base_ns` the estimated B (<= D), None until some
    request queued (see the module doc).
    """
    if obs.nbytes <= 0 or prev_recv_ns is None:
        return None
    if queued_behind(prev_recv_ns, obs, sure_base_ns):
        gap = (obs.recv_ns - prev_recv_ns) / 1e9
        return Sample(obs.recv_ns, obs.nbytes, max(gap, min_seconds), "dispersion")
    if base_ns is None:
        return None
    seconds = (obs.recv_ns - obs.send_ns - base_ns) / 1e9
    return Sample(obs.recv_ns, max(obs.nbytes, min_credit_bytes), max(seconds, min_seconds), "one-way")


def base_delay_ns(min_delay_ns: int, min_delay_bytes: int, fast_mbps: float | None) -> int:
    """B = D minus the transfer of the request that achieved D at the link's fast rate."""
    if not fast_mbps:
        return min_delay_ns
    return min_delay_ns - int(min_delay_bytes * 8 / (fast_mbps * 1e6) * 1e9)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, linear interpolation (numpy's default)."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def stall_bound_mbps(oldest_bytes: int, waited_ms: float, base_ms: float, floor_ms: float = 1.0) -> float:
    """An upper bound on the uplink's rate while answers are overdue (an outage: no sample arrives).

    The oldest unanswered request has had `waited_ms` (since it was sent, or since the last answer
    came, whichever is later; the link was busy with earlier requests before that) to cross the
    link, and it has not come back; `base_ms` is what an answer takes besides the transfer (the
    cloud's compute, and the propagation: the agent passes the shortest recent round trip). So the
    link moved fewer than `oldest_bytes` in waited_ms - base_ms. Answers keep coming when the
    cloud, not the link, is the slow stage, so a long wait is the link's."""
    return oldest_bytes * 8 / (max(waited_ms - base_ms, floor_ms) * 1e3)


def harmonic_mbps(samples: Iterable[Sample]) -> float | None:
    """Byte-weighted harmonic mean of the samples' rates: total bytes / total time."""
    nbytes = seconds = 0.0
    for s in samples:
        nbytes += s.nbytes
        seconds += s.seconds
    return nbytes * 8 / seconds / 1e6 if seconds > 0 else None


def robust_mbps(samples: Sequence[Sample], outlier_factor: float = 4.0) -> float | None:
    """harmonic_mbps of the samples, one-way ones beyond `outlier_factor` of the median left out."""
    if not samples:
        return None
    median = percentile([s.mbps for s in samples], 50)
    lo, hi = median / outlier_factor, median * outlier_factor
    return harmonic_mbps(s for s in samples if s.kind == "dispersion" or lo <= s.mbps <= hi)


# ---------------------------------------------------------------- the state


class BandwidthEstimator:
    """Feed it observations in the order the server received them; ask for the estimate."""

    def __init__(self, config: EstimatorConfig | None = None):
        self.config = config or EstimatorConfig()
        self.samples: collections.deque[Sample] = collections.deque(maxlen=self.config.max_samples)
        self._prev_recv: int | None = None
        # sliding-window minimum of recv - send: (recv_ns, delay_ns, nbytes), delays increasing
        self._delays: collections.deque[tuple[int, int, int]] = collections.deque()
        self._fast: collections.deque[float] = collections.deque(maxlen=self.config.max_samples)
        self._estimate: float | None = None

    @property
    def calibrated(self) -> bool:
        """True once some request queued: B is known and idle requests give one-way samples."""
        return bool(self._fast)

    def sure_base_ns(self) -> int | None:
        """D = min(recv - send) over the window: B plus the shortest transfer (None: no data)."""
        return self._delays[0][1] if self._delays else None

    def fast_mbps(self) -> float | None:
        """C_hi: the fastest recent dispersion rate (None without any).

        An outlier here (a near-zero gap) only makes the correction smaller, i.e. B closer to D.
        """
        return max(self._fast) if self._fast else None

    def base_ns(self) -> int | None:
        """B = clock offset + propagation delay (server minus edge clock); None until calibrated."""
        if not self._delays or not self._fast:
            return None
        _, delay, nbytes = self._delays[0]
        return base_delay_ns(delay, nbytes, self.fast_mbps())

    def update(self, obs: Observation) -> Sample | None:
        """Take one observation; returns the sample it gave (or None)."""
        cfg = self.config
        if self._prev_recv is not None and obs.recv_ns < self._prev_recv:
            obs = Observation(obs.send_ns, self._prev_recv, obs.nbytes)  # out of order: clamp
        self._push_delay(obs)
        sample = make_sample(
            self._prev_recv, obs, self.sure_base_ns(), self.base_ns(), cfg.min_seconds, cfg.min_credit_bytes
        )
        if sample is not None:
            self.samples.append(sample)
            if sample.kind == "dispersion":
                self._fast.append(sample.mbps)
            self._estimate = robust_mbps(self._window(), cfg.outlier_factor)
        self._prev_recv = obs.recv_ns
        return sample

    def estimate_mbps(self) -> float | None:
        """Uplink goodput while busy, Mbit/s (None until the first sample)."""
        return self._estimate

    def span_ns(self) -> tuple[int, int] | None:
        """The interval (server clock) the current estimate covers: from the start of the oldest
        sample in the window to the newest arrival."""
        if not self.samples:
            return None
        window = self._window()
        start = min(s.recv_ns - int(s.seconds * 1e9) for s in window)
        return start, window[-1].recv_ns

    # helpers
    def _window(self) -> list[Sample]:
        cfg = self.config
        horizon = self.samples[-1].recv_ns - int(cfg.window_s * 1e9)
        out = [s for s in self.samples if s.recv_ns >= horizon]
        if len(out) < cfg.min_samples:
            out = list(self.samples)[-cfg.min_samples:]
        return out

    def _push_delay(self, obs: Observation) -> None:
        q, delay = self._delays, obs.recv_ns - obs.send_ns
        while q and q[-1][1] >= delay:
            q.pop()
        q.append((obs.recv_ns, delay, obs.nbytes))
        horizon = obs.recv_ns - int(self.config.base_window_s * 1e9)
        while q[0][0] < horizon:
            q.popleft()


def estimate_series(
    observations: Iterable[Observation], config: EstimatorConfig | None = None
) -> list[float | None]:
    """The estimate after each observation (for tests, benchmarks and plots)."""
    est = BandwidthEstimator(config)
    out = []
    for obs in observations:
        est.update(obs)
        out.append(est.estimate_mbps())
    return out
