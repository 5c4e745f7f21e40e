"""GesFi preprocessing: CSI ratio, band filter, PCA, signed Doppler STFT, image (edge/gesfi/preprocess.py).

Synthetic CSI comes from a small physical model (edge/csi/synthetic.py) with per-packet phase
offsets: a static scene must put its energy at 0 Hz, a moving reflector its peak at
f_D = -(1/lambda) d(path)/dt with the right sign. Real captures from /work/shared/data/csi must
preprocess without NaN, and their (mostly static) windows must have their energy near 0 Hz.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.csi import read_csi
from edge.csi.synthetic import expected_doppler, synthetic_csi
from edge.gesfi import preprocess as pp
from edge.gesfi.preprocess import PreprocessConfig, doppler_image, doppler_spectrogram, windows

SHARED = Path(__file__).resolve().parents[2] / "shared"
CSI_DIR = SHARED / "data" / "csi"
REAL = ["sample_0x1_ap.dat", "ath_csi_1.dat", "example_csi.csv", "example.pcap", "rx_by_iwl5300.csi"]

CFG = PreprocessConfig()
STATIC_CFG = PreprocessConfig(band_hz=(0.0, 80.0))  # keep 0 Hz to see where a static scene sits


def near_zero_fraction(freqs: np.ndarray, power: np.ndarray, hz: float = 5.0) -> float:
    e = power.sum(axis=1)
    return float(e[np.abs(freqs) <= hz].sum() / e.sum())


def peak_hz(csi: np.ndarray, cfg: PreprocessConfig = CFG) -> float:
    f, _, p = doppler_spectrogram(csi, cfg)
    return float(f[np.argmax(p.sum(axis=1))])


def df(cfg: PreprocessConfig = CFG) -> float:
    return cfg.fs / cfg.nfft


# ---------------------------------------------------------------------------------------------
# config and shapes


def test_config_defaults_and_validation():
    assert CFG.window_len == 2000 and CFG.hop_len == 500 and CFG.fmax == 80.0
    for bad in ({"band_hz": (50.0, 10.0)}, {"band_hz": (0.0, 600.0)}, {"nfft": 64}, {"fs": 0.0},
                {"image_size": (0, 32)}):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)


def test_image_shape_dtype_range_and_channels():
    rx = [synthetic_csi(path_rate=r, seed=s) for s, r in enumerate((0.8, -0.5, 1.5))]
    img = doppler_image(rx, CFG)
    assert img.shape == (3, 32, 32) and img.dtype == np.float32
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    assert img.max() == pytest.approx(1.0, abs=0.05)
    # channel i is receiver i
    np.testing.assert_array_equal(img[1], doppler_image([rx[1]], CFG)[0])
    # deterministic
    np.testing.assert_array_equal(img, doppler_image(rx, CFG))
    # a bare 4-D array is one receiver
    assert doppler_image(rx[0], CFG).shape == (1, 32, 32)


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError):
        doppler_image([], CFG)
    with pytest.raises(ValueError):
        pp.csi_ratio(np.zeros((10, 30), np.complex64))
    with pytest.raises(ValueError):
        pp.csi_ratio(synthetic_csi(100, n_rx=3), pair=(1, 1))


def test_windows_over_a_stream():
    assert windows(1999, CFG) == []
    w = windows(4000, CFG)
    assert [s.start for s in w] == [0, 500, 1000, 1500, 2000]
    assert all(s.stop - s.start == 2000 and s.stop <= 4000 for s in w)


# ---------------------------------------------------------------------------------------------
# static scene: energy at 0 Hz, and the ratio is what puts it there


def test_static_scene_energy_near_zero_hz():
    x = synthetic_csi(path_rate=0.0, noise=0.02, seed=4)
    f, _, p = doppler_spectrogram(x, STATIC_CFG)
    assert near_zero_fraction(f, p) > 0.95
    # control: the same scene without the CSI ratio (one antenna's raw CSI): the per-packet phase
    # offsets spread the energy over all Doppler bins, so the check above can fail
    raw = pp.pca_components(x[:, :, 0, 0], STATIC_CFG)
    f2, _, p2 = pp.stft_power(raw, STATIC_CFG)
    assert near_zero_fraction(f2, p2) < 0.3


def test_static_scene_has_little_in_band_power():
    f, _, p_static = doppler_spectrogram(synthetic_csi(path_rate=0.0, seed=5), CFG)
    f, _, p_moving = doppler_spectrogram(synthetic_csi(path_rate=1.0, seed=5), CFG)
    assert p_static.sum() < 0.01 * p_moving.sum()


# ---------------------------------------------------------------------------------------------
# moving reflector: the peak where physics puts it, with its sign


@pytest.mark.parametrize("rate", [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 3.5])
def test_moving_reflector_peak_at_expected_doppler(rate):
    fd = expected_doppler(rate)
    got = peak_hz(synthetic_csi(path_rate=rate, seed=int(10 * abs(rate))))
    assert abs(got - fd) <= 1.5 * df(), (rate, fd, got)
    assert np.sign(got) == np.sign(fd)


def test_sign_shows_in_image_rows():
    # row index grows with frequency: positive Doppler is brightest in the upper half of the rows
    up = doppler_image([synthetic_csi(path_rate=-1.5, seed=1)], CFG)[0]  # path shortens: f_D > 0
    down = doppler_image([synthetic_csi(path_rate=1.5, seed=1)], CFG)[0]
    h = CFG.image_size[0] / 2
    row_up, row_down = np.argmax(up.mean(axis=1)), np.argmax(down.mean(axis=1))
    assert row_up > h and row_down < h
    # and roughly mirrored: |f_D| is the same
    assert abs((row_up - (h - 0.5)) + (row_down - (h - 0.5))) <= 2


def test_doppler_tracks_a_changing_rate():
    # the reflector speeds up in the second half: the peak frequency follows, frame by frame
    a = synthetic_csi(1000, path_rate=-0.6, seed=2)
    b = synthetic_csi(1000, path_rate=-1.8, seed=2)
    x = np.concatenate([a, b * (a[-1:].mean() / b[:1].mean())])  # splice (phase jump ok)
    f, t, p = doppler_spectrogram(x, CFG)
    peaks = f[np.argmax(p, axis=0)]
    early, late = peaks[t < 0.8], peaks[t > 1.2]
    assert abs(np.median(early) - expected_doppler(-0.6)) <= 2 * df()
    assert abs(np.median(late) - expected_doppler(-1.8)) <= 2 * df()


# ---------------------------------------------------------------------------------------------
# messy captures: weak antenna, bad packets, NaN/Inf, per-chain gain jitter


def test_weak_antenna_is_not_used_and_doppler_survives():
    x = synthetic_csi(path_rate=1.2, noise=0.03, seed=6)
    x[:, :, 0, :] *= 0.1  # a receive antenna at a tenth of the amplitude of the others
    num, den, _ = pp.choose_pair(x)
    assert 0 not in (num, den)
    assert abs(peak_hz(x) - expected_doppler(1.2)) <= 1.5 * df()


def test_bad_packets_nan_inf_are_repaired():
    rng = np.random.default_rng(7)
    x = synthetic_csi(path_rate=-1.0, seed=7)
    bad = rng.choice(x.shape[0], 150, replace=False)
    x[bad[:50]] = 0  # empty packets
    x[bad[50:100], :, 1, :] = 0  # one antenna missing
    x[bad[100:125], 3] = np.nan
    x[bad[125:], :, 2] = np.inf
    x[:, 7, :, :] = 0  # a dead subcarrier
    r = pp.csi_ratio(x)
    assert np.isfinite(r).all()
    img = doppler_image([x], CFG)
    assert np.isfinite(img).all()
    assert abs(peak_hz(x) - expected_doppler(-1.0)) <= 1.5 * df()


def test_all_invalid_csi_gives_a_blank_image_not_nan():
    for x in (np.zeros((2000, 30, 3, 1), np.complex64), np.full((500, 30, 2, 1), np.nan, np.complex64)):
        img = doppler_image([x], CFG)
        assert np.isfinite(img).all() and img.shape == (1, 32, 32)


def test_per_chain_gain_jitter_is_normalised():
    """With chain_agc (what the source sets for Atheros captures) per-chain AGC jumps are undone."""
    import dataclasses

    from edge.gesfi.preprocess import for_format

    agc = dataclasses.replace(STATIC_CFG, chain_agc=True)
    assert for_format(STATIC_CFG, "atheros").chain_agc and not for_format(STATIC_CFG, "intel5300").chain_agc
    x = synthetic_csi(path_rate=0.0, chain_gain_jitter=0.3, seed=8)
    f, _, p = doppler_spectrogram(x, agc)
    assert near_zero_fraction(f, p) > 0.9
    y = synthetic_csi(path_rate=0.9, chain_gain_jitter=0.3, seed=8)
    assert abs(peak_hz(y, cfg=dataclasses.replace(CFG, chain_agc=True)) - expected_doppler(0.9)) <= 1.5 * df()


def test_single_antenna_capture_runs():
    # ESP32-like: one antenna, one chain: ratio against the most stable subcarrier
    x = synthetic_csi(path_rate=1.0, n_rx=1, n_sub=52, seed=9)
    x[:, :2] = (3 + 4j)  # firmware filler words, identical in every packet: never the reference
    img = doppler_image([x], CFG)
    assert np.isfinite(img).all()
    f, _, p = doppler_spectrogram(x, STATIC_CFG)
    assert np.isfinite(p).all() and p.sum() > 0


@pytest.mark.parametrize("T", [1, 2, 13, 255])
def test_short_captures_run(T):
    img = doppler_image([synthetic_csi(T, path_rate=1.0, seed=T)], CFG)
    assert img.shape == (1, 32, 32) and np.isfinite(img).all()


# ---------------------------------------------------------------------------------------------
# the linear algebra


def test_top_subspace_matches_eigh():
    rng = np.random.default_rng(0)
    for gap in (30.0, 5.0, 2.0):
        a = rng.normal(size=(400, 30)) + 1j * rng.normal(size=(400, 30))
        a[:, :3] *= np.array([3.0, 1.5, 1.0]) * gap
        q, _ = np.linalg.qr(rng.normal(size=(30, 30)) + 1j * rng.normal(size=(30, 30)))
        cov = (a @ q).conj().T @ (a @ q)
        w = np.linalg.eigvalsh(cov)[::-1]
        v = pp.top_subspace(cov, 3)
        np.testing.assert_allclose(v.conj().T @ v, np.eye(3), atol=1e-10)
        captured = np.real(np.trace(v.conj().T @ cov @ v))
        assert captured >= 0.999 * w[:3].sum()


# ---------------------------------------------------------------------------------------------
# real captures


def _windows(name: str) -> list[np.ndarray]:
    """The first and the last 2 s window of a real capture, resampled at 1 kHz."""
    p = CSI_DIR / name
    if not p.exists():
        pytest.skip(f"shared CSI data not found at {p}")
    from edge.gesfi.source import span_s, window_csi, window_starts

    cap = read_csi(p)
    starts = window_starts(span_s(cap), CFG)
    out = []
    for t0 in sorted({starts[0], starts[-1]}):
        n = min(CFG.window_len, max(1, int((span_s(cap) - t0) * CFG.fs)))
        out.append(window_csi(cap, t0 + np.arange(n) / CFG.fs)[0])
    return out


@pytest.mark.parametrize("name", REAL)
def test_real_captures_preprocess_without_nan(name):
    for x in _windows(name):
        for cfg in (CFG, STATIC_CFG):
            img = doppler_image([x], cfg)
            assert img.shape == (1, 32, 32) and np.isfinite(img).all()
            f, t, p = doppler_spectrogram(x, cfg)
            assert np.isfinite(p).all() and (p >= 0).all()


@pytest.mark.parametrize("name,floor", [("sample_0x1_ap.dat", 0.95), ("ath_csi_1.dat", 0.8),
                                        ("rx_by_iwl5300.csi", 0.6), ("example_csi.csv", 0.6)])
def test_real_static_windows_have_energy_near_zero_hz(name, floor):
    x = _windows(name)[0]
    f, _, p = doppler_spectrogram(x, STATIC_CFG)
    assert near_zero_fraction(f, p) >= floor
