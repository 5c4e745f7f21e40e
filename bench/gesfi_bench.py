"""`coach bench gesfi`: GesFi preprocessing time per 2 s window, single-threaded.

Target (issue 8): <= 10 ms per 2 s window at 1 kHz, 30 subcarriers, 3 receive antennas, one core.
Timed cases, on synthetic CSI with a moving reflector (edge/csi/synthetic.py):
  1 receiver   one NIC, 3 rx antennas: CSI (2000, 30, 3, 1) -> (1, 32, 32)   [the target's case]
  3 receivers  the GesFi model's input: 3 such NICs -> (3, 32, 32)
and the stages of the 1-receiver case (ratio, PCA + band filter, STFT, image). BLAS/OpenMP pools
are held at one thread (threadpoolctl when installed, and the *_NUM_THREADS variables). Wall time
(perf_counter) and CPU time (process_time) are both reported: on a shared machine the wall time
includes waiting for a core. Never fails on a timing.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # effective only if numpy is not loaded yet; threadpoolctl below

import argparse  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from edge.csi.synthetic import synthetic_csi  # noqa: E402
from edge.gesfi import preprocess as pp  # noqa: E402

TARGET_MS = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--windows", type=int, default=200, help="timed windows per case (default 200)")
    p.add_argument("--subcarriers", type=int, default=30)
    p.add_argument("--antennas", type=int, default=3, help="receive antennas per NIC")
    p.add_argument("--fs", type=float, default=1000.0)
    p.add_argument("--out", type=Path, default=Path("bench/results/gesfi.json"))


def _single_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ModuleNotFoundError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _time(fn, inputs: list, repeats: int) -> dict:
    for x in inputs[:3]:
        fn(x)  # warm-up: caches, filter design, FFT plans
    wall, cpu = [], []
    for i in range(repeats):
        x = inputs[i % len(inputs)]
        t0, c0 = time.perf_counter(), time.process_time()
        fn(x)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    w, c = np.array(wall) * 1e3, np.array(cpu) * 1e3
    return {"median_ms": float(np.median(w)), "p95_ms": float(np.percentile(w, 95)), "min_ms": float(w.min()),
            "cpu_median_ms": float(np.median(c)), "cpu_p95_ms": float(np.percentile(c, 95)), "n": repeats}


def measure(windows: int, n_sub: int, n_ant: int, fs: float) -> dict:
    cfg = pp.PreprocessConfig(fs=fs)
    T = cfg.window_len
    # a few distinct windows (different reflector speeds and scenes), cycled through
    rx = [synthetic_csi(T, fs, n_sub, n_ant, 1, path_rate=r, seed=s)
          for s, r in enumerate((-1.2, -0.6, 0.4, 0.9, 1.5, 0.0))]
    triples = [[rx[i], rx[(i + 1) % len(rx)], rx[(i + 2) % len(rx)]] for i in range(len(rx))]
    ratios = [pp.csi_ratio(x) for x in rx]
    comps = [pp.pca_components(r, cfg) for r in ratios]
    powers = [pp.stft_power(c, cfg)[2] for c in comps]
    cases = {
        "1 receiver (3 antennas)": _time(lambda x: pp.doppler_image([x], cfg), rx, windows),
        "3 receivers (model input)": _time(lambda xs: pp.doppler_image(xs, cfg), triples, windows),
        "  stage: CSI ratio": _time(pp.csi_ratio, rx, windows),
        "  stage: PCA + band filter": _time(lambda r: pp.pca_components(r, cfg), ratios, windows),
        "  stage: STFT": _time(lambda c: pp.stft_power(c, cfg), comps, windows),
        "  stage: normalise + resize": _time(lambda p: pp.spectrogram_image(p, cfg), powers, windows),
    }
    return {"config": {"fs": fs, "window_s": cfg.window_s, "subcarriers": n_sub, "antennas": n_ant,
                       "image_size": list(cfg.image_size), "n_components": cfg.n_components,
                       "nperseg": cfg.nperseg, "band_hz": list(cfg.band_hz)},
            "cases": cases}


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.windows < 1:
        from coach_runtime.errors import UserError

        raise UserError("--windows must be >= 1")
    console = Console()
    load_before = os.getloadavg()
    with _single_thread():
        res = measure(args.windows, args.subcarriers, args.antennas, args.fs)
    res.update({"machine": platform.machine(), "processor": platform.processor() or platform.platform(),
                "numpy": np.__version__, "target_ms": TARGET_MS, "loadavg_before": list(load_before),
                "loadavg_after": list(os.getloadavg()), "cpu_count": os.cpu_count()})
    c = res["config"]
    table = Table(title=f"GesFi preprocessing per {c['window_s']:g} s window at {c['fs']:g} Hz, "
                  f"{c['subcarriers']} subcarriers, {c['antennas']} rx antennas, 1 thread")
    for col in ("case", "median ms", "p95 ms", "min ms", "CPU median ms", "target"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for name, r in res["cases"].items():
        target = ""
        if not name.startswith("  "):
            target = f"{TARGET_MS:g} ms " + ("ok" if r["median_ms"] <= TARGET_MS else "MISS")
        table.add_row(name, f"{r['median_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['min_ms']:.2f}",
                      f"{r['cpu_median_ms']:.2f}", target)
    console.print(table)
    console.print(f"load average before/after: {load_before[0]:.2f} / {res['loadavg_after'][0]:.2f} "
                  f"on {res['cpu_count']} cores (wall times include waiting for a core)")
    from bench.procs import write_json

    write_json(args.out, res)
    console.print(f"wrote {args.out}")
    return 0
