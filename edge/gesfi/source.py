"""The GesFi source of the edge agent: CSI in, Doppler images out, as edge.sample.Sample.

Spec strings (`coach edge run --source ...`):
    csi:PATH                  a CSI file of any format edge.csi reads, a directory of such files
                              (sorted by name), or an .npz of simulated receivers: key csi of shape
                              (T,S,R,Tx), (C,T,S,R,Tx) or (N,C,T,S,R,Tx) (models/gesfi raw.npz), or
                              key X (N,C,H,W) of ready images (models/gesfi data.npz, labels from y)
    csi+udp://HOST:PORT       live ESP32-CSI-Tool CSV lines over UDP
Options ride on the spec after '?', e.g. csi:cap.dat?channels=3&format=intel5300:
    channels=N     make every image N channels (see below)
    format=NAME    the file format, when detection is not wanted (edge/csi/formats.py)
    loop=1         replay the file(s) forever (a demo stream)
    idle_timeout=S end a UDP stream after S seconds without a packet (default: never)

Channels: one receiver gives one channel. A model trained on C=3 receivers (the GesFi default)
needs three: channels=3 replicates a single receiver's image into every channel (the model then
sees a scene where all receivers agree: it runs, but is less accurate than with three real
receivers). With more receivers than channels, the first `channels` are used.

Every window is resampled onto a uniform grid at cfg.fs from the packets around it (linear
interpolation, edge.csi.interp_at), so irregular (AP mode) captures work, and long captures are
never resampled whole. A capture shorter than one window gives one (zero-padded) image.
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np

from coach_runtime.errors import UserError
from edge.csi import CSICapture, UDPSource, interp_at, read_csi, read_npz_receivers
from edge.csi.capture import finish_capture
from edge.csi.formats import FormatError
from edge.gesfi.preprocess import for_format
from edge.gesfi.preprocess import PreprocessConfig, doppler_image
from edge.sample import Sample

log = logging.getLogger(__name__)

CSI_SUFFIXES = {".dat", ".pcap", ".csv", ".csi", ".npy", ".npz"}


def open_csi_source(
    spec: str,
    input_name: str,
    cfg: PreprocessConfig,
    *,
    channels: int | None = None,
) -> Iterator[Sample]:
    """Samples {input_name: (1, C, H, W) float32} from a spec string (see the module doc).

    channels (or ?channels=N in the spec) fixes C; None keeps the number of receivers.
    Errors a user can cause (no such file, bad format, busy port) raise UserError when the
    source is opened, not later in the stream.
    """
    kind, target, opts = parse_spec(spec)
    if channels is None and "channels" in opts:
        channels = _int_opt(opts, "channels", spec)
    if channels is not None and channels < 1:
        raise UserError(f"source {spec!r}: channels must be >= 1")
    if kind == "udp":
        host, port = target
        idle = _float_opt(opts, "idle_timeout", spec) if "idle_timeout" in opts else None
        src = UDPSource(host, port, idle_timeout_s=idle)  # binds now: a busy port fails here
        return _counted(_udp_images(src, cfg, spec), input_name, channels)
    path = Path(target)
    files = _list_files(path, spec)
    fmt = opts.get("format")
    loop = opts.get("loop", "0") not in ("0", "", "false", "no")
    # open the first file now so that a bad file fails at open, not mid-stream
    first = _file_images(files[0], cfg, fmt, spec)
    return _counted(_files_images(files, cfg, fmt, spec, loop, first), input_name, channels)


def parse_spec(spec: str) -> tuple[str, object, dict[str, str]]:
    """'csi:PATH[?opts]' -> ('file', PATH, opts); 'csi+udp://HOST:PORT[?opts]' -> ('udp', (HOST, PORT), opts)."""
    body, _, query = spec.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    if body.startswith("csi+udp://"):
        hostport = body[len("csi+udp://") :]
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise UserError(f"source {spec!r}: want csi+udp://HOST:PORT, e.g. csi+udp://0.0.0.0:5500")
        return "udp", (host.strip("[]"), int(port)), opts
    if body.startswith("csi:"):
        target = body[len("csi:") :]
        if not target:
            raise UserError(f"source {spec!r}: want csi:PATH (a CSI file, a directory of them, or an .npz)")
        return "file", target, opts
    raise UserError(f"source {spec!r}: want csi:PATH or csi+udp://HOST:PORT")


# ---------------------------------------------------------------------------------------------
# images from files


def _list_files(path: Path, spec: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in CSI_SUFFIXES)
        if not files:
            raise UserError(f"source {spec!r}: no CSI files ({', '.join(sorted(CSI_SUFFIXES))}) in {path}")
        return files
    if not path.exists():
        raise UserError(f"source {spec!r}: {path} does not exist")
    return [path]


def _files_images(files, cfg, fmt, spec, loop, first) -> Iterator[tuple[np.ndarray, int | None, dict]]:
    rounds = 0
    while True:
        for i, f in enumerate(files):
            it = first if (rounds == 0 and i == 0) else _file_images(f, cfg, fmt, spec)
            yield from it
        rounds += 1
        if not loop:
            return


def _file_images(path: Path, cfg: PreprocessConfig, fmt: str | None, spec: str):
    """Open one file now (errors raise here) and return an iterator of (image, label, meta)."""
    if fmt is None and path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                has_images = "X" in z.files
            if has_images:
                return _npz_images(path, cfg)
            rx, ts, fs, extras = read_npz_receivers(path, cfg.fs)
        except UserError:
            raise
        except (FormatError, ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"{path}: cannot read as npz ({msg})") from None
        return _npz_receivers(path, rx, ts, fs, extras, cfg)
    cap = read_csi(path, fmt)
    return _capture_images(cap, for_format(cfg, cap.format))


def _npz_images(path: Path, cfg: PreprocessConfig):
    with np.load(path, allow_pickle=False) as z:
        X = np.asarray(z["X"], np.float32)
        y = np.asarray(z["y"]).astype(int) if "y" in z.files else None
    if X.ndim != 4 or tuple(X.shape[2:]) != tuple(cfg.image_size):
        raise UserError(f"{path}: images X have shape {X.shape}, want (N, C, {cfg.image_size[0]}, {cfg.image_size[1]})")
    if not np.isfinite(X).all():
        raise UserError(f"{path}: images X contain NaN/Inf")

    def gen():
        for i in range(X.shape[0]):
            label = int(y[i]) if y is not None and i < y.size else None
            yield X[i], label, {"file": str(path), "index": i, "format": "npz-images"}

    return gen()


def _npz_receivers(path, rx, ts, fs, extras, cfg: PreprocessConfig):
    per = int(extras["receivers_per_recording"])
    labels = extras.get("labels")
    fs = float(fs or cfg.fs)
    groups = [rx[i : i + per] for i in range(0, len(rx), per)]
    for g in groups:
        if len({r.shape[0] for r in g}) != 1:
            raise UserError(f"{path}: receivers of one recording have different lengths")

    def gen():
        for n, g in enumerate(groups):
            T = g[0].shape[0]
            t = np.arange(T) / fs if ts is None or ts.size != T else ts - ts[0]
            caps = [finish_capture(r, t, "npz", str(path), {}, drop_null_subcarriers=False, require_valid=False)
                    for r in g]
            label = int(labels[n]) if labels is not None and n < labels.size else None
            for img, meta in _windows_images(caps, cfg):
                meta.update(file=str(path), recording=n, format="npz")
                yield img, label, meta

    return gen()


def _capture_images(cap: CSICapture, cfg: PreprocessConfig):
    def gen():
        for img, meta in _windows_images([cap], cfg):
            meta.update(file=cap.source, format=cap.format)
            yield img, None, meta

    return gen()


def window_starts(duration_s: float, cfg: PreprocessConfig) -> list[float]:
    """Start times (s) of the windows over a capture of this duration: full windows every hop_s;
    one window at 0 if the capture is shorter than a window."""
    if duration_s + 1e-9 < cfg.window_s:
        return [0.0]
    n = int(np.floor((duration_s - cfg.window_s) / cfg.hop_s + 1e-9)) + 1
    return [k * cfg.hop_s for k in range(n)]


def _windows_images(caps: list[CSICapture], cfg: PreprocessConfig) -> Iterator[tuple[np.ndarray, dict]]:
    """(C, H, W) image and meta per window over the receivers' captures (same time base)."""
    duration = min(span_s(c) for c in caps)
    for k, t0 in enumerate(window_starts(duration, cfg)):
        n = min(cfg.window_len, max(1, int(np.floor((duration - t0) * cfg.fs + 1e-9))))
        grid = t0 + np.arange(max(n, 1)) / cfg.fs
        windows, filled = [], 0.0
        for c in caps:
            w, far = window_csi(c, grid)
            windows.append(w)
            filled = max(filled, float(far.mean()))
        img = doppler_image(windows, cfg)
        yield img, {"window": k, "t_start_s": round(t0, 6), "t_end_s": round(float(grid[-1]), 6),
                    "samples": int(grid.size), "interpolated_fraction": round(filled, 4),
                    "receivers": len(caps)}


def span_s(cap: CSICapture) -> float:
    """Time the packets cover: first to last packet plus one nominal period (3000 packets at
    1 kHz span 3.0 s and hold two 2 s windows 1 s apart)."""
    return cap.duration_s + (1.0 / cap.fs if cap.fs > 0 else 0.0)


def window_csi(cap: CSICapture, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The capture's CSI on a time grid (resampled), and the mask of filled gaps."""
    if cap.n_packets < 2:
        return np.repeat(cap.csi[:1], 1, axis=0), np.zeros(1, bool)
    if cap.uniform and abs(cap.fs * (grid[1] - grid[0] if grid.size > 1 else 0) - 1) < 1e-6:
        i0 = int(round(grid[0] * cap.fs))  # already on this grid: slice, no interpolation
        return cap.csi[i0 : i0 + grid.size], np.zeros(grid.size, bool)
    return interp_at(cap, grid)


# ---------------------------------------------------------------------------------------------
# images from a live UDP stream


def _udp_images(src: UDPSource, cfg: PreprocessConfig, spec: str) -> Iterator[tuple[np.ndarray, None, dict]]:
    """Sliding windows over the live stream: one image every hop_s of stream time."""
    buf: deque[tuple[float, np.ndarray]] = deque()  # (stream time s, csi (S, 1, 1))
    keep: np.ndarray | None = None  # subcarriers that carry channel (decided on the first packets)
    next_end: float | None = None
    k = 0
    try:
        for chunk in src:
            t_abs = chunk.timestamps + chunk.meta["t0_s"]
            for t, row in zip(t_abs, chunk.csi):
                buf.append((float(t), row))
            if keep is None and len(buf) >= 20:
                stack = np.stack([r for _, r in buf])
                keep = (np.abs(stack) > 0).any(axis=(0, 2, 3)) & ~(stack == stack[:1]).all(axis=(0, 2, 3))
                if not keep.any():
                    keep = np.ones(stack.shape[1], bool)
            if keep is None:
                continue
            t_last = buf[-1][0]
            if next_end is None:
                next_end = buf[0][0] + cfg.window_s
            while t_last >= next_end:
                while buf and buf[0][0] < next_end - cfg.window_s - 1.0:
                    buf.popleft()
                ts = np.array([t for t, _ in buf])
                rows = np.stack([r for _, r in buf])[:, keep]
                cap = finish_capture(rows, ts, "esp32-udp", src.url, {}, drop_null_subcarriers=False,
                                     require_valid=False)
                start = next_end - cfg.window_s - cap.meta["t0_s"]
                grid = start + np.arange(cfg.window_len) / cfg.fs
                w, far = interp_at(cap, grid)
                img = doppler_image([w], cfg)
                yield img, None, {"window": k, "t_start_s": round(next_end - cfg.window_s, 6),
                                  "t_end_s": round(next_end, 6), "interpolated_fraction": round(float(far.mean()), 4),
                                  "receivers": 1, "format": "esp32-udp", "file": src.url,
                                  "wall_time": time.time(), "bad_lines": src.stats["bad_lines"]}
                k += 1
                next_end += cfg.hop_s
    finally:
        src.close()


# ---------------------------------------------------------------------------------------------


def fit_channels(img: np.ndarray, channels: int | None) -> tuple[np.ndarray, bool]:
    """(C, H, W) -> (channels, H, W): replicate a single receiver, or keep the first `channels`."""
    if channels is None or img.shape[0] == channels:
        return img, False
    if img.shape[0] == 1:
        return np.repeat(img, channels, axis=0), True
    if img.shape[0] > channels:
        return img[:channels], False
    raise UserError(f"capture has {img.shape[0]} receivers but the model wants {channels} channels; "
                    "give channels=1 or a capture with more receivers")


def _counted(images, input_name: str, channels: int | None) -> Iterator[Sample]:
    for i, (img, label, meta) in enumerate(images):
        img, replicated = fit_channels(img, channels)
        meta = dict(meta, channels_replicated=replicated)
        x = np.ascontiguousarray(img[None], dtype=np.float32)
        yield Sample(id=i, inputs={input_name: x}, label=label, meta=meta)


def _float_opt(opts: dict[str, str], key: str, spec: str) -> float:
    try:
        return float(opts[key])
    except ValueError:
        raise UserError(f"source {spec!r}: {key} must be a number, got {opts[key]!r}") from None


def _int_opt(opts: dict[str, str], key: str, spec: str) -> int:
    try:
        return int(opts[key])
    except ValueError:
        raise UserError(f"source {spec!r}: {key} must be an integer, got {opts[key]!r}") from None
