"""CSICapture, the one in-memory form of CSI from any source, and the clean-ups every reader applies.

csi is complex64 (time, subcarrier, rx, tx). A missing entry (an antenna absent from a packet,
a dropped value) is stored as 0 and counted in meta; the preprocessing masks and repairs zeros, so
nothing downstream ever divides by zero. NaN/Inf never leave this module: they become missing
entries, or a UserError when nothing valid is left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from coach_runtime.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class CSICapture:
    csi: np.ndarray  # complex64 (time, subcarrier, rx, tx)
    timestamps: np.ndarray  # float64 seconds, (time,), starting at 0
    fs: float  # nominal sampling rate (Hz): the rate after resampling, else the median packet rate
    format: str  # e.g. "intel5300", "atheros", "nexmon", "esp32", "picoscenes", "npz"
    source: str  # file path or udp://host:port
    meta: dict = field(default_factory=dict)  # antenna layout, bad-packet counts, chosen pair, ...

    def __post_init__(self) -> None:
        if self.csi.ndim != 4:
            raise ValueError(f"csi must be (time, subcarrier, rx, tx), got shape {self.csi.shape}")
        if self.timestamps.shape != (self.csi.shape[0],):
            raise ValueError(f"timestamps {self.timestamps.shape} do not match csi {self.csi.shape}")

    @property
    def n_packets(self) -> int:
        return int(self.csi.shape[0])

    @property
    def duration_s(self) -> float:
        return float(self.timestamps[-1] - self.timestamps[0]) if self.n_packets > 1 else 0.0

    @property
    def uniform(self) -> bool:
        return bool(self.meta.get("uniform", False))


def estimate_rate(timestamps: np.ndarray) -> float:
    """Nominal packet rate (Hz): 1 / median positive inter-packet gap; 0.0 when unknown."""
    d = np.diff(np.asarray(timestamps, np.float64))
    d = d[d > 0]
    return float(1.0 / np.median(d)) if d.size else 0.0


def unwrap_counter(ticks: np.ndarray, bits: int) -> np.ndarray:
    """Unwrap a free-running unsigned counter of `bits` bits (e.g. a 32-bit microsecond clock)."""
    t = np.asarray(ticks, np.float64)
    if t.size < 2:
        return t
    period = float(2**bits)
    d = np.diff(t)
    wraps = np.cumsum(np.where(d < -period / 2, period, 0.0))
    return np.concatenate([[t[0]], t[1:] + wraps])


def finish_capture(
    csi: np.ndarray,
    timestamps: np.ndarray,
    fmt: str,
    source: str,
    meta: dict | None = None,
    drop_null_subcarriers: bool = True,
    require_valid: bool = True,
) -> CSICapture:
    """The clean-ups every reader applies: dtype, NaN/Inf -> missing, time order, null subcarriers.

    Timestamps are rebased to start at 0 (meta["t0_s"] keeps the original start).
    Raises UserError when no valid CSI is left (all zero / non-finite) and require_valid.
    """
    meta = dict(meta or {})
    csi = np.asarray(csi)
    if csi.ndim != 4 or csi.shape[0] == 0 or csi.shape[1] == 0:
        raise UserError(f"{source}: no CSI packets found (read as {fmt}, shape {csi.shape})")
    csi = csi.astype(np.complex64, copy=False)
    ts = np.asarray(timestamps, np.float64).reshape(-1)
    if ts.shape[0] != csi.shape[0] or not np.isfinite(ts).all():
        log.warning("%s: bad timestamps; assuming uniform packet spacing", source)
        ts = np.arange(csi.shape[0], dtype=np.float64) / float(meta.get("fs_assumed", 1000.0))
        meta["timestamps_assumed"] = True

    finite = np.isfinite(csi)
    n_nonfinite = int((~finite).sum())
    if n_nonfinite:
        csi = np.where(finite, csi, 0).astype(np.complex64)
        log.warning("%s: %d NaN/Inf CSI values marked missing", source, n_nonfinite)
    meta["nonfinite_values"] = n_nonfinite

    order = np.argsort(ts, kind="stable")
    if np.any(order != np.arange(ts.size)):
        meta["reordered_packets"] = int((order != np.arange(ts.size)).sum())
        csi, ts = csi[order], ts[order]
    meta.setdefault("t0_s", float(ts[0]))
    ts = ts - ts[0]

    if drop_null_subcarriers:
        n_raw = csi.shape[1]
        csi, kept = _drop_null_subcarriers(csi)
        meta["null_subcarriers_dropped"] = int(n_raw - kept.size)
        if kept.size < n_raw:
            meta["subcarriers_kept"] = kept.tolist()  # indices into the reader's subcarrier axis

    present = np.abs(csi) > 0  # (T, S, R, Tx)
    if require_valid and not present.any():
        raise UserError(f"{source}: every CSI value is zero or not finite (read as {fmt}); nothing to use")
    stream_ok = present.any(axis=1)  # (T, R, Tx): the antenna pair delivered this packet
    meta["missing_entries"] = int((~present).sum())
    meta["bad_packets"] = int((~present.all(axis=(1, 2, 3))).sum())  # any zero/missing entry
    meta["empty_packets"] = int((~stream_ok.any(axis=(1, 2))).sum())
    meta["antenna_valid_fraction"] = np.round(stream_ok.mean(axis=0), 4).tolist()  # (R, Tx)
    layout = dict(meta.get("layout", {}))
    if layout.get("subcarriers", csi.shape[1]) != csi.shape[1]:
        layout["subcarriers_raw"] = layout["subcarriers"]
    layout.update(rx=int(csi.shape[2]), tx=int(csi.shape[3]), subcarriers=int(csi.shape[1]))
    meta["layout"] = layout
    fs = estimate_rate(ts)
    d = np.diff(ts)
    meta["uniform"] = bool(d.size == 0 or (fs > 0 and np.all(np.abs(d * fs - 1.0) < 0.1)))
    meta["max_gap_s"] = float(d.max()) if d.size else 0.0
    return CSICapture(csi=csi, timestamps=ts, fs=fs, format=fmt, source=source, meta=meta)


def _drop_null_subcarriers(csi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop subcarriers that carry no channel: all zero, or (>= 3 packets) bit-identical in every packet.

    Guard and DC tones come out as zeros; some firmwares fill them with a fixed word (ESP32's first
    subcarriers). Real CSI is never identical across packets (noise, per-packet phase offsets).
    """
    S = csi.shape[1]
    zero = ~(np.abs(csi) > 0).any(axis=(0, 2, 3))
    const = np.zeros(S, bool)
    if csi.shape[0] >= 3:
        const = (csi == csi[:1]).all(axis=(0, 2, 3))
    keep = ~(zero | const)
    if not keep.any():
        return csi, np.arange(S)
    return csi[:, keep], np.flatnonzero(keep)


def remove_chain_phase_jumps(csi: np.ndarray, step: float = np.pi / 2) -> tuple[np.ndarray, int]:
    """Undo the phase jumps of whole receive chains by multiples of `step` (Intel 5300 quirk).

    The Intel 5300 re-locks its receive chains now and then, and the phase of a chain relative to
    the others jumps by a multiple of pi/2 (seen in sample_0x1_ap.dat: the antenna ratio of a
    static scene hops between four phases). Per packet, the common phase step of each chain's
    ratio to the reference chain (the strongest) is rounded to a multiple of `step`; the
    cumulative jumps are removed. A real Doppler phase change below step/2 per packet is kept.
    Returns (corrected csi, number of jumps removed).
    """
    T, S, R, X = csi.shape
    if T < 2 or R < 2:
        return csi, 0
    power = (np.abs(csi) ** 2).sum(axis=(0, 1, 3))
    ref = int(np.argmax(power))
    r = csi * np.conj(csi[:, :, ref : ref + 1, :])  # (T, S, R, Tx), phase of chain i vs ref
    d = np.angle((r[1:] * np.conj(r[:-1])).sum(axis=1))  # (T-1, R, Tx) packet-to-packet step
    k = np.round(d / step)
    k[:, ref, :] = 0
    n_jumps = int((k != 0).sum())
    if n_jumps == 0:
        return csi, 0
    K = np.concatenate([np.zeros((1, R, X)), np.cumsum(k, axis=0)])
    return (csi * np.exp(-1j * step * K)[:, None, :, :]).astype(np.complex64), n_jumps


def resample_uniform(cap: CSICapture, fs: float | None = None, method: str = "linear") -> CSICapture:
    """Resample a capture onto a uniform time grid at fs (default: its nominal packet rate).

    Each grid point takes its two neighbouring packets and interpolates linearly (method="linear")
    or takes the nearest (method="nearest"). An entry missing (0) in one neighbour takes the other;
    missing in both stays missing. Linear interpolation of raw CSI is safe for the CSI ratio: the
    ratio of two antennas hardly changes between neighbouring packets, so numerator and
    denominator interpolate alike even though each packet has its own phase offset.
    meta gains: resampled_from (packets), interpolated_fraction (grid points farther than one
    nominal period from a packet: the gaps that were filled).
    """
    if method not in ("linear", "nearest"):
        raise ValueError(f"method must be 'linear' or 'nearest', got {method!r}")
    fs = float(fs) if fs else cap.fs
    if cap.n_packets < 2 or fs <= 0:
        if cap.n_packets >= 2:
            raise UserError(f"{cap.source}: cannot resample, unknown sampling rate")
        meta = dict(cap.meta, uniform=True, resampled_from=cap.n_packets)
        return replace(cap, fs=fs if fs > 0 else cap.fs, meta=meta)
    n = int(np.floor(cap.timestamps[-1] * fs + 1e-9)) + 1
    grid = np.arange(n, dtype=np.float64) / fs
    out, far = interp_at(cap, grid, method)
    meta = dict(cap.meta, uniform=True, resampled_from=cap.n_packets,
                interpolated_fraction=round(float(far.mean()), 4), native_fs=cap.fs)
    return replace(cap, csi=out, timestamps=grid, fs=fs, meta=meta)


def interp_at(cap: CSICapture, grid: np.ndarray, method: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """CSI (len(grid), S, R, Tx) at the times in grid (see resample_uniform), and a bool mask of
    the grid points farther than one nominal period from any packet (filled gaps).

    Lets a stream resample one window at a time instead of the whole capture.
    """
    ts = cap.timestamps
    if ts.size < 2:
        return np.repeat(cap.csi[:1], len(grid), axis=0), np.zeros(len(grid), bool)
    i1 = np.clip(np.searchsorted(ts, grid, side="right"), 1, ts.size - 1)
    i0 = i1 - 1
    t0, t1 = ts[i0], ts[i1]
    w = np.clip((grid - t0) / np.maximum(t1 - t0, 1e-12), 0.0, 1.0)
    if method == "nearest":
        w = np.round(w)
    a, b = cap.csi[i0], cap.csi[i1]
    wb = w.astype(np.float32)[:, None, None, None]
    out = b - a
    out *= wb
    out += a
    if cap.meta.get("missing_entries", 1):  # entries missing in one neighbour take the other's
        va, vb = a != 0, b != 0
        out = np.where(va & vb, out, np.where(va, a, b))
    out = out.astype(np.complex64, copy=False)
    nominal = 1.0 / cap.fs if cap.fs > 0 else float(np.median(np.diff(ts)))
    far = np.minimum(np.abs(grid - t0), np.abs(t1 - grid)) > nominal
    return out, far
