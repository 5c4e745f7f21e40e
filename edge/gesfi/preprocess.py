"""GesFi preprocessing: CSI (time, subcarrier, rx, tx) -> signed Doppler image (C, H, W).

The very same code runs on the device (edge/gesfi/source.py) and in training
(models/gesfi/), so there is no train/serve skew. numpy, scipy and opencv only.

Per receiver (one NIC with >= 2 receive antennas):

1. CSI ratio H_num / H_den between two receive antennas of the NIC, for one transmit antenna.
   The per-packet phase offsets (CFO, SFO, packet detection delay) and the AGC gain are common to
   the antennas of one NIC, so they cancel. The denominator is the strongest, most stable antenna:
   when its static part dominates, the ratio is a Moebius map of the moving path's phasor that keeps
   the direction of rotation, so the sign of the Doppler survives. Bad entries (zero, NaN, Inf,
   a near-zero denominator, huge outliers) are masked and repaired by interpolation over time.
   For NICs with per-chain AGC (Atheros: cfg.chain_agc, set by the CSI source from the format)
   each chain's per-packet gain is normalised; subcarriers where the denominator is faded are
   weighted down (there the Doppler would come out mirrored).
2. Band filter: |Doppler| in band_hz (a real Butterworth filter on the complex signal keeps +f and
   -f alike). band_hz[0] == 0 keeps the static (0 Hz) part.
3. Subcarrier combination: PCA over subcarriers of the band-limited ratio (the Doppler of the
   moving path is common to all subcarriers); the top n_components are kept.
4. Two-sided STFT (Hann) of the complex components, power summed over components, keeping the
   signed bins -fmax..+fmax (fmax = band_hz[1]); exactly W = image_size[1] frames spread evenly
   over the window.
5. Normalisation: dB relative to the image maximum, clipped to dynamic_range_db, mapped to [0, 1],
   then cv2.resize to image_size.

Image layout: float32 (C, H, W); C = receivers, H = signed Doppler with row 0 = -fmax and the last
row = +fmax (frequency grows with the row index), W = time frames, oldest first.
A path that gets shorter (hand moving towards the link) has positive Doppler.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import signal

log = logging.getLogger(__name__)

# Bump when the images change for the same CSI and config, so datasets built with an older
# preprocessing can be told apart (train/serve skew).
PREPROCESS_VERSION = "3"


@dataclass(frozen=True)
class PreprocessConfig:
    fs: float = 1000.0  # sampling rate (Hz) the CSI is at (resample first if it is not)
    window_s: float = 2.0  # one image covers this much time
    hop_s: float = 0.5  # stream windowing step
    band_hz: tuple[float, float] = (2.0, 80.0)  # the |Doppler| band kept; fmax = band_hz[1]
    filter_order: int = 4  # Butterworth order (applied forwards and backwards)
    n_components: int = 3  # PCA components over subcarriers (power summed)
    image_size: tuple[int, int] = (32, 32)  # (H = signed Doppler bins, W = time frames)
    nperseg: int = 256  # STFT segment (samples)
    nfft: int = 256  # STFT FFT length (>= nperseg)
    dynamic_range_db: float = 40.0  # image shows [max - range, max] dB mapped to [0, 1]
    # Normalise each receive chain's per-packet gain: for NICs with per-chain AGC (Atheros), whose
    # |ratio| jumps from packet to packet. Off otherwise: over a narrow band the moving path itself
    # changes the per-packet level, and normalising that away mirrors the Doppler (+f and -f alike).
    chain_agc: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.band_hz
        if self.fs <= 0 or self.window_s <= 0 or self.hop_s <= 0:
            raise ValueError(f"fs, window_s and hop_s must be > 0, got {self}")
        if not 0 <= lo < hi <= self.fs / 2:
            raise ValueError(f"band_hz must satisfy 0 <= lo < hi <= fs/2, got {self.band_hz}")
        if self.nperseg < 4 or self.nfft < self.nperseg:
            raise ValueError(f"need 4 <= nperseg <= nfft, got {self.nperseg}, {self.nfft}")
        if self.n_components < 1 or min(self.image_size) < 1 or self.dynamic_range_db <= 0:
            raise ValueError(f"bad n_components/image_size/dynamic_range_db in {self}")

    @property
    def window_len(self) -> int:
        return int(round(self.window_s * self.fs))

    @property
    def hop_len(self) -> int:
        return max(1, int(round(self.hop_s * self.fs)))

    @property
    def fmax(self) -> float:
        return float(self.band_hz[1])


# ---------------------------------------------------------------------------------------------
# 1. CSI ratio


def antenna_quality(csi: np.ndarray) -> np.ndarray:
    """Quality (R, Tx) of each receive antenna per transmit antenna: bigger is better.

    valid fraction x median amplitude / (1 + coefficient of variation of the amplitude over time).
    A dead or a tenth-amplitude antenna, or one whose amplitude jumps around, scores low.
    """
    _check_csi(csi)
    step = max(1, csi.shape[0] // 256)  # a subsample of packets is plenty for statistics
    amp = np.abs(csi[::step]).astype(np.float32)  # (t, S, R, Tx)
    valid = np.isfinite(amp) & (amp > 0)
    amp = np.where(valid, amp, 0.0)
    n = valid.sum(axis=0)  # (S, R, Tx) valid packets per subcarrier
    with np.errstate(all="ignore"):
        mean = amp.sum(axis=0) / n
        std = np.sqrt(np.maximum((amp * amp).sum(axis=0) / n - mean * mean, 0.0))
        cv = _nanmedian0(np.where(n > 1, std / mean, np.nan))  # (R, Tx)
        med = _nanmedian0(np.where(n > 0, mean, np.nan))  # typical level over subcarriers
    frac = valid.mean(axis=(0, 1))
    q = frac * np.nan_to_num(med) / (1.0 + np.nan_to_num(cv, nan=1e3))
    return np.nan_to_num(q).astype(np.float64)


def _nanmedian0(x: np.ndarray) -> np.ndarray:
    """Median over axis 0 ignoring NaN (the lower middle for even counts); NaN where all are NaN.

    np.nanmedian goes through masked arrays for small inputs and costs ~0.5 ms; this costs ~10 us.
    """
    srt = np.sort(x, axis=0)  # NaN sort last
    k = (~np.isnan(x)).sum(axis=0)
    idx = np.maximum(k - 1, 0) // 2
    med = np.take_along_axis(srt, idx[None], axis=0)[0]
    return np.where(k > 0, med, np.nan)


def choose_pair(csi: np.ndarray) -> tuple[int, int, int]:
    """(numerator rx, denominator rx, tx) for the ratio of a NIC with >= 2 receive antennas.

    The best antenna (antenna_quality) divides, the next best is divided; the transmit antenna is
    the one whose two best receive antennas score highest together.
    """
    q = antenna_quality(csi)
    n_rx, n_tx = q.shape
    if n_rx < 2:
        raise ValueError("choose_pair needs >= 2 receive antennas")
    best_tx, best = 0, -1.0
    for tx in range(n_tx):
        top2 = np.sort(q[:, tx])[-2:]
        if top2.sum() > best:
            best_tx, best = tx, float(top2.sum())
    order = np.argsort(q[:, best_tx])[::-1]
    return int(order[1]), int(order[0]), best_tx


def for_format(cfg: "PreprocessConfig", fmt: str) -> "PreprocessConfig":
    """The config for captures of a given reader format: per-chain AGC normalisation for Atheros."""
    import dataclasses

    return dataclasses.replace(cfg, chain_agc=fmt.split(":")[0] == "atheros") if fmt else cfg


def csi_ratio(csi: np.ndarray, pair: tuple[int, int] | None = None, chain_agc: bool = False) -> np.ndarray:
    """CSI ratio (T, S) complex64 between two receive antennas: csi[..., pair[0], tx] / csi[..., pair[1], tx].

    pair=None chooses by signal quality (choose_pair). With one receive antenna, the ratio is taken
    between the two best transmit chains; with one antenna and one chain, against the most stable
    subcarrier (weaker, but still cancels the per-packet phase offsets). See pair_ratio for the
    masking, gain normalisation and notch weighting. Never NaN, never divides by 0.
    """
    _check_csi(csi)
    T, S, R, X = csi.shape
    if R >= 2:
        if pair is None:
            num_i, den_i, tx = choose_pair(csi)
        else:
            num_i, den_i = pair
            if not (0 <= num_i < R and 0 <= den_i < R) or num_i == den_i:
                raise ValueError(f"bad antenna pair {pair} for {R} receive antennas")
            tx = int(np.argmax(antenna_quality(csi)[[num_i, den_i]].sum(axis=0)))
        num, den = csi[:, :, num_i, tx], csi[:, :, den_i, tx]
    elif X >= 2:
        q = antenna_quality(csi.transpose(0, 1, 3, 2))[:, 0]  # tx chains of the single rx
        order = np.argsort(q)[::-1]
        num, den = csi[:, :, 0, order[1]], csi[:, :, 0, order[0]]
    else:
        x = csi[:, :, 0, 0]
        q = antenna_quality(x[:, :, None, None].transpose(0, 2, 1, 3))[:, 0]  # subcarriers as "antennas"
        if T >= 3:  # a column identical in every packet is firmware filler, not a channel
            q[(x == x[:1]).all(axis=0)] = 0.0
        return pair_ratio(x, np.repeat(x[:, [int(np.argmax(q))]], S, axis=1), normalise=False)
    return pair_ratio(num, den, chain_agc=chain_agc)


def pair_ratio(num: np.ndarray, den: np.ndarray, normalise: bool = True, chain_agc: bool = False) -> np.ndarray:
    """num / den (T, S) complex64, safely, in few passes over the data.

    - Entries that are NaN/Inf, or whose denominator is below 1e-3 of its typical amplitude, or
      whose |ratio| is over 20x typical (a denominator in a deep fade), are masked and repaired by
      interpolation over time (repair_gaps).
    - chain_agc (with normalise): each chain's per-packet gain is normalised, i.e. the ratio is
      multiplied by rms(den) / rms(num) over subcarriers. Some NICs (Atheros) apply AGC per receive
      chain, which makes |ratio| jump from packet to packet. Only for those: over a narrow band a
      moving path changes that rms coherently, and normalising it mirrors the Doppler.
    - normalise: subcarriers where the denominator is faded are weighted down by
      (level / median level)^2, capped at 1 (level: the denominator's median amplitude there).
      Where its static part is faded the moving path can outweigh it, and the ratio's Doppler comes
      out mirrored (-f_D) and loud (noise / small). Squared weights let the subcarriers with a
      strong denominator carry the sign (moving path at half the static level: sign right in 40/40
      synthetic scenes; linear weights below the median: 34/40). The weighted ratio is still
      referenced to the denominator's phase: phase offsets cancel, nothing blows up.
    """
    num = np.ascontiguousarray(num, dtype=np.complex64)
    den = np.ascontiguousarray(den, dtype=np.complex64)
    T = num.shape[0]
    pn = num.real * num.real + num.imag * num.imag
    pd = den.real * den.real + den.imag * den.imag
    if not (np.isfinite(pn.sum()) and np.isfinite(pd.sum())):  # rare: NaN/Inf somewhere
        bad = ~(np.isfinite(pn) & np.isfinite(pd))
        pn[bad] = 0.0
        pd[bad] = 0.0
        num = np.where(bad, 0, num)
        den = np.where(bad, 0, den)
    step = max(1, T // 128)  # a subsample of packets is plenty for typical levels
    ref = float(np.median(pd[::step]))
    good = pd > max(1e-6 * ref, float(np.finfo(np.float32).tiny))  # |den| > 1e-3 of typical
    q = np.zeros_like(pd)
    np.divide(pn, pd, out=q, where=good)  # |ratio|^2
    qs = q[::step][good[::step]]
    if qs.size:
        good &= q <= 400.0 * float(np.median(qs)) + 1e-30  # |ratio| <= 20x typical
    ratio = num * den.conj()
    scale = np.zeros_like(pd)
    np.divide(1.0, pd, out=scale, where=good)
    ratio *= scale
    if normalise:
        mn, md = pn.mean(axis=1), pd.mean(axis=1)
        gain = np.ones(T, np.float32)
        ok = (mn > 0) & (md > 0)
        gain[ok] = np.sqrt(md[ok] / mn[ok])
        level = np.sqrt(np.median(pd[::step], axis=0))  # (S,)
        lref = float(np.median(level))
        weight = np.clip(level / lref, 1e-3, 1.0) ** 2 if lref > 0 else np.ones_like(level)
        if chain_agc:
            ratio *= gain[:, None]
        ratio *= weight[None, :].astype(np.float32)
    return repair_gaps(ratio, good)


def repair_gaps(x: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Fill entries of x (T, S) where good is False by linear interpolation over time, per column.

    Before the first / after the last good entry the nearest good value is held; a column without
    any good entry becomes 0 (PCA then ignores it). Vectorised; returns a complex64 array.
    """
    cols = np.flatnonzero(~good.all(axis=0))
    if cols.size == 0:
        return x.astype(np.complex64, copy=False)
    out = x.astype(np.complex64, copy=True)
    g = good[:, cols]
    v = np.where(g, out[:, cols], 0)
    T = x.shape[0]
    t = np.arange(T)[:, None]
    prev = np.maximum.accumulate(np.where(g, t, -1), axis=0)  # last good index <= t
    nxt = np.minimum.accumulate(np.where(g, t, T)[::-1], axis=0)[::-1]  # next good index >= t
    none = prev[-1] < 0  # columns with no good entry at all
    prev_c = np.where(prev < 0, nxt, prev)
    nxt_c = np.where(nxt >= T, prev_c, nxt)
    prev_c = np.clip(prev_c, 0, T - 1)
    nxt_c = np.clip(nxt_c, 0, T - 1)
    span = nxt_c - prev_c
    w = np.where(span > 0, (t - prev_c) / np.maximum(span, 1), 0.0).astype(np.float32)
    a = np.take_along_axis(v, prev_c, axis=0)
    b = np.take_along_axis(v, nxt_c, axis=0)
    fill = a + w * (b - a)
    fill[:, none] = 0
    out[:, cols] = np.where(g, v, fill)
    return out


# ---------------------------------------------------------------------------------------------
# 2-3. band filter and subcarrier combination


@functools.lru_cache(maxsize=32)
def _sos(order: int, lo: float, hi: float, fs: float) -> np.ndarray | None:
    nyq = fs / 2
    if lo <= 0 and hi >= nyq:
        return None
    if lo <= 0:
        return signal.butter(order, hi, btype="lowpass", fs=fs, output="sos")
    if hi >= nyq:
        return signal.butter(order, lo, btype="highpass", fs=fs, output="sos")
    return signal.butter(order, [lo, hi], btype="bandpass", fs=fs, output="sos")


def band_filter(x: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Zero-phase Butterworth band filter of x (T, ...) along time; keeps |f| in cfg.band_hz."""
    sos = _sos(cfg.filter_order, float(cfg.band_hz[0]), float(cfg.band_hz[1]), float(cfg.fs))
    if sos is None or x.shape[0] < 2:
        return x
    padlen = min(3 * (2 * len(sos) + 1), x.shape[0] - 1)
    return signal.sosfiltfilt(sos, x, axis=0, padlen=padlen)


def pca_components(x: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Band-limited principal components (T, n) of x (T, S) complex.

    The PCA basis comes from the covariance of the band-limited signal, computed in the frequency
    domain (a sum over the in-band FFT bins of the block-averaged signal; block averaging to
    >= 2.5 fmax only trims what the band filter removes anyway); only the n kept components are
    then filtered in time.
    This is "filter all subcarriers, then PCA" (filtering commutes with the projection) at a
    fraction of the cost. The spectrogram sums the power of the n components, which depends on
    their subspace only, so a subspace iteration is enough (no LAPACK).

    Every product here is kept small (row chunks, see _rows_matmul): multithreaded OpenBLAS on a
    busy device turns a 30x30 eigh or a (2000 x 30) @ (30 x 3) into tens of milliseconds of
    spinning threads; below its threading threshold the same calls take microseconds.
    """
    T, S = x.shape
    n = min(cfg.n_components, S)
    lo, hi = cfg.band_hz
    if S > n:
        # block means of q samples: a cheap low-pass that leaves the band intact (fs/q > 2 fmax)
        q = max(1, int(cfg.fs // (2.5 * hi))) if T >= 8 * cfg.fs / hi else 1
        y = x[: T // q * q].reshape(-1, q, S).mean(axis=1) if q > 1 else x
        spec = np.fft.fft(y, axis=0)
        f = np.abs(np.fft.fftfreq(y.shape[0], q / cfg.fs))
        sel = spec[(f >= lo) & (f <= hi)] if y.shape[0] > 1 else spec
        if sel.shape[0] == 0:
            sel = spec
        cov = _gram(sel)  # (S, S) Hermitian: band-limited covariance
        basis = top_subspace(cov, n)
        comps = _rows_matmul(x, basis.astype(np.complex64))
    else:
        comps = x
    return band_filter(comps, cfg).astype(np.complex64, copy=False)


_CHUNK = 128  # rows per product: 128 x 30 x 30 is far below OpenBLAS's threading threshold


def _rows_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b computed in row chunks, so that BLAS never starts its thread pool for it."""
    out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    for i in range(0, a.shape[0], _CHUNK):
        np.matmul(a[i : i + _CHUNK], b, out=out[i : i + _CHUNK])
    return out


def _gram(a: np.ndarray) -> np.ndarray:
    """a^H a in row chunks (see _rows_matmul)."""
    out = np.zeros((a.shape[1], a.shape[1]), np.result_type(a, np.complex64))
    for i in range(0, a.shape[0], _CHUNK):
        blk = a[i : i + _CHUNK]
        out += blk.conj().T @ blk
    return out


def top_subspace(cov: np.ndarray, n: int, oversample: int = 4, iters: int = 4) -> np.ndarray:
    """Orthonormal basis (S, n) of the dominant n-dimensional eigenspace of a Hermitian PSD matrix.

    Block subspace iteration (block n + oversample, started from the strongest columns of cov^4)
    with a Rayleigh-Ritz step. Only small products (S x S x b, far below OpenBLAS's threading
    threshold), a QR of S x b and an eigh of b x b: a full eigh of the S x S matrix goes through
    multithreaded OpenBLAS, which on a busy device costs tens of milliseconds of spinning threads.
    """
    S = cov.shape[0]
    scale = float(np.abs(np.diagonal(cov)).max()) if S else 0.0
    if not np.isfinite(scale) or scale <= 0:
        return np.eye(S, n, dtype=np.complex128)
    c = np.ascontiguousarray(cov / scale, dtype=np.complex128)
    b = min(S, n + oversample)
    p = c @ c
    p = p @ p  # cov^4: the dominant directions stand out
    col = (p.real**2 + p.imag**2).sum(axis=0)
    v = np.linalg.qr(p[:, np.argsort(-col, kind="stable")[:b]])[0]
    for _ in range(iters):
        v = np.linalg.qr(c @ v)[0]
    h = v.conj().T @ (c @ v)  # b x b Rayleigh quotient
    _, u = np.linalg.eigh((h + h.conj().T) / 2)
    return v @ u[:, ::-1][:, :n]


# ---------------------------------------------------------------------------------------------
# 4. STFT to a signed Doppler spectrogram


@functools.lru_cache(maxsize=32)
def _hann(n: int) -> np.ndarray:
    return signal.get_window("hann", n).astype(np.float32)


def stft_power(comps: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-sided STFT power of components (T, n) summed over n: (freqs (F,), times (W,), power (F, W))."""
    T = comps.shape[0]
    L = cfg.nperseg
    if T < L:  # a short capture: one segment, zero-padded on both sides (centred under the window)
        before = (L - T) // 2
        comps = np.pad(comps, ((before, L - T - before), (0, 0)))
    W = cfg.image_size[1]
    starts = np.round(np.linspace(0, comps.shape[0] - L, W)).astype(np.int64)
    frames = comps[starts[:, None] + np.arange(L)[None, :]]  # (W, L, n)
    frames = frames * _hann(L)[None, :, None]
    spec = np.fft.fft(frames, n=cfg.nfft, axis=1)  # (W, nfft, n)
    power = (spec.real**2 + spec.imag**2).sum(axis=2)  # (W, nfft)
    freqs = np.fft.fftshift(np.fft.fftfreq(cfg.nfft, 1.0 / cfg.fs))
    keep = np.abs(freqs) <= cfg.fmax + 1e-9
    power = np.fft.fftshift(power, axes=1)[:, keep].T  # (F, W), frequency ascending
    times = (starts + L / 2.0) / cfg.fs if T >= L else np.full(W, (T - 1) / 2.0 / cfg.fs)
    return freqs[keep], times, power.astype(np.float64)


def doppler_spectrogram(csi: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed Doppler spectrogram of one receiver's CSI (T, S, R, Tx) at cfg.fs.

    Returns (freqs (F,) Hz ascending in [-fmax, fmax], times (W,) s, power (F, W) float64, not normalised).
    """
    ratio = csi_ratio(csi, chain_agc=cfg.chain_agc)
    return stft_power(pca_components(ratio, cfg), cfg)


# ---------------------------------------------------------------------------------------------
# 5. normalisation and the model's image


def spectrogram_image(power: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(F, W) power -> (H, W) float32 in [0, 1]: dB relative to the maximum, clipped, resized."""
    H, W = cfg.image_size
    peak = float(power.max()) if power.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        return np.zeros((H, W), np.float32)
    db = 10.0 * np.log10(np.maximum(power / peak, 1e-30))
    img = np.clip(1.0 + db / cfg.dynamic_range_db, 0.0, 1.0).astype(np.float32)
    if img.shape != (H, W):
        img = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA)
    return np.clip(img, 0.0, 1.0)


def doppler_image(receivers: Sequence[np.ndarray] | np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The model's input: float32 (C = len(receivers), H, W) in [0, 1], one channel per receiver.

    Each receiver is complex CSI (T, S, R, Tx) at cfg.fs (a single 4-D array counts as one receiver).
    """
    if isinstance(receivers, np.ndarray) and receivers.ndim == 4:
        receivers = [receivers]
    if len(receivers) == 0:
        raise ValueError("doppler_image needs at least one receiver")
    chans = [spectrogram_image(doppler_spectrogram(np.asarray(r), cfg)[2], cfg) for r in receivers]
    return np.stack(chans).astype(np.float32, copy=False)


def windows(n_samples: int, cfg: PreprocessConfig) -> list[slice]:
    """Windows of cfg.window_len samples every cfg.hop_len over a stream of n_samples.

    Only full windows; a stream shorter than one window gives [] (callers may then use the whole
    capture as one short window: the STFT zero-pads).
    """
    win, hop = cfg.window_len, cfg.hop_len
    return [slice(s, s + win) for s in range(0, n_samples - win + 1, hop)]


def _check_csi(csi: np.ndarray) -> None:
    if not isinstance(csi, np.ndarray) or csi.ndim != 4:
        shape = getattr(csi, "shape", None)
        raise ValueError(f"CSI must be an array (time, subcarrier, rx, tx), got shape {shape}")
    if csi.shape[0] < 1 or csi.shape[1] < 1:
        raise ValueError(f"CSI has no packets or no subcarriers: shape {csi.shape}")
