"""`coach gesfi inspect FILE [--image OUT.png]`: what is in a CSI capture, and its Doppler image.

Prints the detected format, packet count, sampling rate, array shape, antenna layout, what was
repaired, the antenna pair the CSI ratio uses, and how the Doppler energy is spread. With --image,
renders the model's input image of one window (one panel per receiver, enlarged, +fmax at the top)
and, for longer captures, a strip of consecutive windows, as a PNG.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from coach_runtime.errors import UserError
from edge.csi.capture import CSICapture, finish_capture
from edge.csi.formats import FORMATS, detect_format, read_csi, read_npz_receivers
from edge.gesfi.preprocess import PreprocessConfig, antenna_quality, choose_pair, doppler_image, doppler_spectrogram
from edge.gesfi.source import window_csi as csi_on_grid
from edge.gesfi.source import span_s, window_starts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="CSI capture (.dat, .pcap, .csv, .csi, .npy, .npz)")
    parser.add_argument("--image", metavar="OUT.png", help="write the Doppler image here")
    parser.add_argument("--format", dest="fmt", metavar="NAME",
                        help=f"file format instead of detecting it: {', '.join(FORMATS)} "
                        "(options: atheros:big, nexmon:CHIP[:BW])")
    parser.add_argument("--start", type=float, default=0.0, metavar="S", help="window start (s) for the image")
    parser.add_argument("--fs", type=float, default=1000.0, help="preprocessing rate (Hz); also the rate of "
                        "array files without timestamps")
    parser.add_argument("--scale", type=int, default=12, help="image enlargement factor (default 12)")
    parser.add_argument("--allow-truncated", action="store_true", help="read the complete records of a truncated file")


def run(args: argparse.Namespace) -> int:
    from edge.gesfi.preprocess import for_format

    if args.scale < 1 or args.scale > 64:
        raise UserError(f"--scale must be in 1..64, got {args.scale}")
    cfg = PreprocessConfig(fs=args.fs)
    path = Path(args.file)
    caps = load_receivers(path, args.fmt, args.fs, args.allow_truncated)
    cap = caps[0]
    cfg = for_format(cfg, cap.format)
    _print_summary(path, args.fmt, caps, cfg)
    if args.image:
        t0 = min(max(0.0, args.start), max(0.0, span_s(cap) - cfg.window_s))
        img = window_image(caps, cfg, t0)
        strip = strip_images(caps, cfg) if span_s(cap) >= 2 * cfg.window_s else None
        png = render(img, cfg, args.scale, strip, title=f"{path.name}  {cap.format}  t={t0:.1f}s")
        write_png(Path(args.image), png)
        print(f"wrote {args.image} ({png.shape[1]}x{png.shape[0]} px)")
    return 0


def load_receivers(path: Path, fmt: str | None, fs: float, allow_truncated: bool) -> list[CSICapture]:
    """One capture per receiver: all receivers of an .npz of simulated CSI, else the file's one."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    name = fmt or detect_format(path)
    if name == "npz":
        try:
            rx, ts, f, extras = read_npz_receivers(path, fs)
        except UserError:
            raise
        except Exception as exc:  # formats' FormatError and numpy's errors: one line
            raise UserError(f"{path}: cannot read as npz ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        per = int(extras["receivers_per_recording"])
        f = float(f or fs)
        t = ts if ts is not None and ts.size == rx[0].shape[0] else np.arange(rx[0].shape[0]) / f
        meta = {"device": "array file", "recordings": extras.get("recordings", 1), "receivers": per}
        return [finish_capture(r, t, "npz", str(path), dict(meta), drop_null_subcarriers=False) for r in rx[:per]]
    return [read_csi(path, fmt, fs=fs, allow_truncated=allow_truncated)]


def window_csi(cap: CSICapture, cfg: PreprocessConfig, t0: float) -> np.ndarray:
    """The window starting at t0, resampled at cfg.fs by the same rule as the edge source."""
    n = min(cfg.window_len, max(1, int(np.floor((span_s(cap) - t0) * cfg.fs + 1e-9))))
    grid = t0 + np.arange(max(n, 1)) / cfg.fs
    return csi_on_grid(cap, grid)[0]


def window_image(caps: list[CSICapture], cfg: PreprocessConfig, t0: float) -> np.ndarray:
    return doppler_image([window_csi(c, cfg, t0) for c in caps], cfg)


def strip_images(caps: list[CSICapture], cfg: PreprocessConfig, max_windows: int = 30) -> np.ndarray:
    """(C, H, k*W): consecutive non-overlapping windows side by side (the first max_windows)."""
    n = min(max_windows, int(span_s(caps[0]) // cfg.window_s))
    return np.concatenate([window_image(caps, cfg, k * cfg.window_s) for k in range(n)], axis=2)


def _print_summary(path: Path, fmt: str | None, caps: list[CSICapture], cfg: PreprocessConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    cap = caps[0]
    m = cap.meta
    d = np.diff(cap.timestamps)
    mean_rate = (cap.n_packets - 1) / cap.duration_s if cap.duration_s > 0 else 0.0
    layout = m.get("layout", {})
    t = Table(title=f"{path}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("format", f"{cap.format}" + (" (given)" if fmt else " (detected)") + f"  {m.get('device', '')}")
    t.add_row("packets", f"{cap.n_packets} over {cap.duration_s:.3f} s")
    if cap.n_packets > 1:
        t.add_row("sampling rate", f"{cap.fs:.2f} Hz nominal (median gap), {mean_rate:.2f} Hz mean, "
                  f"{'uniform' if cap.uniform else 'irregular'}; gaps {d.min() * 1e3:.2f}..{d.max() * 1e3:.1f} ms")
    else:
        t.add_row("sampling rate", "unknown (one packet)")
    t.add_row("array", f"{tuple(cap.csi.shape)} {cap.csi.dtype} (time, subcarrier, rx, tx)"
              + (f" x {len(caps)} receivers" if len(caps) > 1 else ""))
    extra = {k: v for k, v in layout.items() if k not in ("rx", "tx", "subcarriers")}
    t.add_row("antennas", f"{layout.get('rx')} rx x {layout.get('tx')} tx, {layout.get('subcarriers')} subcarriers"
              + (f"  {extra}" if extra else ""))
    if "packet_layouts" in m:
        t.add_row("packet layouts", ", ".join(f"{k}: {v}" for k, v in m["packet_layouts"].items()))
    t.add_row("repairs", f"missing entries {m.get('missing_entries', 0)}, packets with gaps {m.get('bad_packets', 0)}, "
              f"empty packets {m.get('empty_packets', 0)}, NaN/Inf {m.get('nonfinite_values', 0)}, "
              f"null subcarriers dropped {m.get('null_subcarriers_dropped', 0)}"
              + (f", chain phase jumps {m['chain_phase_jumps_removed']}" if "chain_phase_jumps_removed" in m else "")
              + (f", PHY-error packets {m['phy_error_packets']}" if "phy_error_packets" in m else ""))
    q = antenna_quality(cap.csi)
    t.add_row("antenna quality", np.array2string(q, precision=1, suppress_small=True).replace("\n", ""))
    if cap.csi.shape[2] >= 2:
        num, den, tx = choose_pair(cap.csi)
        t.add_row("CSI ratio", f"rx{num} / rx{den} (tx{tx})")
    elif cap.csi.shape[3] >= 2:
        t.add_row("CSI ratio", "one rx antenna: ratio of its two best tx chains")
    else:
        t.add_row("CSI ratio", "one antenna: ratio to its most stable subcarrier (weaker)")
    # energy near 0 Hz with the static part kept: a quick "is anything moving" indicator
    c0 = PreprocessConfig(fs=cfg.fs, band_hz=(0.0, cfg.fmax))
    fr, _, p = doppler_spectrogram(window_csi(cap, c0, 0.0), c0)
    e = p.sum(axis=1)
    if cap.n_packets < 2:
        t.add_row("Doppler", "n/a: one packet has no Doppler (the image is a flat placeholder)")
    elif e.sum() > 0:
        near = float(e[np.abs(fr) <= 5].sum() / e.sum())
        fr2, _, p2 = doppler_spectrogram(window_csi(cap, cfg, 0.0), cfg)
        peak = float(fr2[np.argmax(p2.sum(axis=1))])
        t.add_row("Doppler (first window)", f"{near:.1%} of the energy within |f| <= 5 Hz (static part kept); "
                  f"strongest in-band bin {peak:+.1f} Hz")
    t.add_row("model input", f"{len(window_starts(span_s(cap), cfg))} windows of {cfg.window_s:g} s every "
              f"{cfg.hop_s:g} s at {cfg.fs:g} Hz -> ({len(caps)}, {cfg.image_size[0]}, {cfg.image_size[1]}) float32")
    Console(width=None if sys.stdout.isatty() else 120).print(t)


def render(img: np.ndarray, cfg: PreprocessConfig, scale: int, strip: np.ndarray | None = None,
           title: str = "") -> np.ndarray:
    """BGR uint8 picture: one enlarged panel per channel, +fmax at the top, axes labelled."""
    pad, lab = 8, 64
    panels = [_panel(ch, scale) for ch in img]
    h, w = panels[0].shape[:2]
    rows = [_hcat([_with_axes(p, cfg, lab, f"rx{i}") for i, p in enumerate(panels)], pad)]
    if strip is not None:
        sc = max(1, min(scale, 1600 // strip.shape[2]))
        s_panels = [_with_axes(_panel(ch, sc), cfg, lab, f"rx{i}: {strip.shape[2] // cfg.image_size[1]} windows",
                               t_end=cfg.window_s * strip.shape[2] / cfg.image_size[1]) for i, ch in enumerate(strip)]
        rows += [s for s in s_panels]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    head = np.zeros((28, width, 3), np.uint8)
    cv2.putText(head, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([head] + [np.pad(r, ((0, pad), (0, 0), (0, 0))) for r in rows], axis=0)


def _panel(ch: np.ndarray, scale: int) -> np.ndarray:
    u8 = np.clip(ch[::-1] * 255.0, 0, 255).astype(np.uint8)  # row 0 = +fmax after the flip
    big = cv2.resize(u8, (u8.shape[1] * scale, u8.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    return cv2.applyColorMap(big, cv2.COLORMAP_INFERNO)


def _with_axes(panel: np.ndarray, cfg: PreprocessConfig, lab: int, name: str, t_end: float | None = None) -> np.ndarray:
    h, w = panel.shape[:2]
    out = np.zeros((h + 22, w + lab, 3), np.uint8)
    out[:h, lab:] = panel
    font, white = cv2.FONT_HERSHEY_SIMPLEX, (255, 255, 255)
    for text, y in ((f"+{cfg.fmax:g} Hz", 12), ("0 Hz", h // 2 + 4), (f"-{cfg.fmax:g} Hz", h - 2)):
        cv2.putText(out, text, (2, y), font, 0.38, white, 1, cv2.LINE_AA)
    cv2.putText(out, "0 s", (lab, h + 16), font, 0.4, white, 1, cv2.LINE_AA)
    end = f"{(t_end if t_end is not None else cfg.window_s):g} s"
    cv2.putText(out, end, (lab + w - 8 * len(end), h + 16), font, 0.4, white, 1, cv2.LINE_AA)
    cv2.putText(out, name, (lab + w // 2 - 4 * len(name), h + 16), font, 0.4, (180, 220, 255), 1, cv2.LINE_AA)
    return out


def _hcat(panels: list[np.ndarray], pad: int) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    parts = []
    for p in panels:
        parts += [np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0))), np.zeros((h, pad, 3), np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def write_png(out: Path, png: np.ndarray) -> None:
    """Write atomically: a temp file in the same directory, then rename."""
    out = out.expanduser()
    if out.suffix.lower() != ".png":
        raise UserError(f"--image {out}: the file name must end in .png")
    if not out.parent.exists():
        raise UserError(f"--image {out}: directory {out.parent} does not exist")
    ok, buf = cv2.imencode(".png", png)
    if not ok:
        raise UserError(f"--image {out}: could not encode the PNG")
    fd, tmp = tempfile.mkstemp(prefix=".inspect-", suffix=".png", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.tobytes())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
