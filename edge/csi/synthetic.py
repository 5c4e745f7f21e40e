"""A small physical CSI generator for tests and benchmarks (not the GesFi simulator in models/).

Static multipath plus at most one reflector whose path length changes at a constant rate, seen by
a linear array of receive antennas (half-wavelength spacing), with what real NICs add: a random
common phase and timing offset per packet (shared by the antennas of one NIC), common gain jitter,
per-chain gain jitter, and noise. The moving path's Doppler is f_D = -(1/lambda) d(path length)/dt:
a path that gets shorter has positive Doppler.
"""

from __future__ import annotations

import numpy as np

from edge.csi.capture import CSICapture, finish_capture

C = 299_792_458.0


def synthetic_csi(
    n_packets: int = 2000,
    fs: float = 1000.0,
    n_sub: int = 30,
    n_rx: int = 3,
    n_tx: int = 1,
    *,
    path_rate: float = 0.0,  # d(path length)/dt of the moving reflector in m/s; 0 = static scene
    moving_gain: float = 0.3,  # |moving path| relative to the static paths' typical amplitude
    noise: float = 0.01,  # complex Gaussian noise std relative to the static amplitude
    carrier_hz: float = 5.32e9,
    spacing_hz: float = 4 * 312.5e3,  # 30 groups over 40 MHz, like the Intel 5300
    chain_gain_jitter: float = 0.0,  # per-packet, per-chain AGC jitter (std of log-gain)
    seed: int = 0,
    times: np.ndarray | None = None,  # packet times (s); default n_packets uniform at fs
) -> np.ndarray:
    """complex64 (n_packets, n_sub, n_rx, n_tx)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_packets) / fs if times is None else np.asarray(times, np.float64)
    n_packets = t.size
    f = carrier_hz + (np.arange(n_sub) - (n_sub - 1) / 2) * spacing_hz  # (S,)
    lam = C / carrier_hz
    ant = np.arange(n_rx) * lam / 2  # (R,) positions along the array

    # static paths: length, angle of arrival, gain
    k = 6
    length = rng.uniform(3.0, 15.0, k)
    aoa = rng.uniform(-np.pi / 2, np.pi / 2, k)
    gain = rng.rayleigh(1.0, k) / length * 5.0
    phase = (length[:, None, None] + ant[None, None, :] * np.sin(aoa)[:, None, None]) / C * f[None, :, None]
    static = (gain[:, None, None] * np.exp(-2j * np.pi * phase)).sum(axis=0)  # (S, R)
    static = static[:, :, None] * np.exp(2j * np.pi * rng.uniform(0, 1, (1, 1, n_tx)))  # (S, R, Tx)
    level = np.sqrt(np.mean(np.abs(static) ** 2))

    csi = np.broadcast_to(static, (n_packets, n_sub, n_rx, n_tx)).astype(np.complex128)
    if path_rate != 0.0 and moving_gain > 0:
        d0, a0 = 4.0, rng.uniform(-0.6, 0.6)
        d = d0 + path_rate * t  # (T,)
        ph = (d[:, None, None] + ant[None, None, :] * np.sin(a0)) / C * f[None, :, None]  # (T, S, R)
        csi = csi + (moving_gain * level * np.exp(-2j * np.pi * ph))[:, :, :, None]
    # what the NIC adds: per-packet common phase offset and timing offset (linear in subcarrier),
    # common gain jitter, per-chain gain jitter, then receiver noise
    cpo = rng.uniform(0, 2 * np.pi, n_packets)
    sto = rng.normal(0, 0.3, n_packets)
    sidx = np.arange(n_sub) - (n_sub - 1) / 2
    offset = np.exp(1j * (cpo[:, None] + sto[:, None] * sidx[None, :] / n_sub))  # (T, S)
    g = np.exp(rng.normal(0, 0.1, n_packets))
    csi = csi * (offset * g[:, None])[:, :, None, None]
    if chain_gain_jitter > 0:
        csi = csi * np.exp(rng.normal(0, chain_gain_jitter, (n_packets, 1, n_rx, 1)))
    shape = csi.shape
    csi = csi + noise * level / np.sqrt(2) * (rng.normal(size=shape) + 1j * rng.normal(size=shape))
    return csi.astype(np.complex64)


def expected_doppler(path_rate: float, carrier_hz: float = 5.32e9) -> float:
    """f_D = -(1/lambda) d(path length)/dt."""
    return -path_rate * carrier_hz / C


def synthetic_capture(n_packets: int = 2000, fs: float = 1000.0, jitter: float = 0.0, **kw) -> CSICapture:
    """synthetic_csi as a CSICapture; jitter in (0, 0.5) moves each packet time by up to
    +-jitter/fs (irregular arrivals, as in AP mode)."""
    rng = np.random.default_rng(kw.get("seed", 0) + 1)
    ts = np.arange(n_packets) / fs + (rng.uniform(-jitter, jitter, n_packets) / fs if jitter > 0 else 0.0)
    csi = synthetic_csi(times=ts, **kw)
    return finish_capture(csi, ts, "synthetic", "synthetic", {"device": "synthetic"}, drop_null_subcarriers=False)
