"""`coach bench codec`: encode+decode throughput of protos.codec per bit width, beside numpy.copyto.

Throughput is GB/s of float32 input for one encode plus one decode (the round trip a cut tensor
makes). `numpy.copyto` of the same array, timed in the same run, is the yardstick: the ratio column
is codec throughput / copy throughput. Targets (issue 2): 8-bit >= 0.25x, 2/3/4/6-bit >= 0.10x.

Beside the codec, the bench times a "numpy floor": the fewest numpy calls that any pure-numpy 8-bit
UAQ round trip has to make (min, max, multiply, add, cast to uint8; cast to float32, multiply), into
preallocated buffers, with no protobuf, no validation and no packing, in cache-sized chunks or whole
(the faster of the two). Its ratio to the copy bounds what a pure-numpy codec can reach on this
machine; where it is under a target, that target is out of reach for numpy, not for lack of tuning.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from protos.codec import SUPPORTED_BITS, decode, encode

SHAPES = {"1x256x28x28": (1, 256, 28, 28), "16MB": (4 * 1024 * 1024,)}
TARGETS = {8: 0.25, 6: 0.10, 4: 0.10, 3: 0.10, 2: 0.10}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=15, help="timed runs per cell (median reported)")
    p.add_argument("--per-channel", action="store_true", help="quantize per channel (axis 1) instead of per tensor")
    p.add_argument("--compress", choices=["zstd", "lz4"], default=None, help="add the lossless stage")
    p.add_argument("--out", type=Path, default=Path("bench/results/codec.json"))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, first-touch of pages
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def numpy_floor(x: np.ndarray, repeats: int) -> dict:
    """Seconds of the minimal 8-bit round trip (see module doc), whole and in chunks; the best wins."""
    flat = x.reshape(-1)
    q, back = np.empty(flat.size, np.uint8), np.empty(flat.size, np.float32)
    inv, off = np.array(1.0, np.float32), np.array(0.5, np.float32)

    def round_trip(step: int):
        buf = np.empty(min(step, flat.size), np.float32)

        def go():
            for s in range(0, flat.size, step):
                c = flat[s : s + step]  # the range first: quantizing needs the whole tensor's
                np.minimum.reduce(c)
                np.maximum.reduce(c)
            for s in range(0, flat.size, step):
                c, qc, o = flat[s : s + step], q[s : s + step], back[s : s + step]
                b = buf[: c.size]
                np.multiply(c, inv, out=b)
                np.add(b, off, out=b)
                np.copyto(qc, b, casting="unsafe")
                np.copyto(o, qc)
                np.multiply(o, inv, out=o)
        return go

    times = {step: _median_seconds(round_trip(step), repeats) for step in (flat.size, 1 << 16, 1 << 17)}
    best = min(times, key=times.get)
    return {"seconds": times[best], "chunk": best}


def measure(shape, repeats: int, per_channel: bool, compress: str | None) -> list[dict]:
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal(shape, dtype=np.float32), 0)  # ReLU-like activations
    axis = 1 if per_channel and len(shape) > 1 else None
    dst = np.empty_like(x)
    rows = []
    for bits in SUPPORTED_BITS:
        # Interleave the copy and the codec so that both see the same machine load.
        t_copy = _median_seconds(lambda: np.copyto(dst, x), repeats)
        t_codec = _median_seconds(lambda: decode(encode(x, bits, axis=axis, compress=compress)), repeats)
        wire = len(encode(x, bits, axis=axis, compress=compress).data)
        rows.append({
            "bits": bits,
            "codec_gbps": x.nbytes / t_codec / 1e9,
            "copy_gbps": x.nbytes / t_copy / 1e9,
            "ratio": t_copy / t_codec,
            "codec_ms": t_codec * 1e3,
            "wire_bytes": wire,
            "target_ratio": TARGETS.get(bits),
        })
    t_copy = _median_seconds(lambda: np.copyto(dst, x), repeats)
    floor = numpy_floor(x, repeats)
    rows.append({"bits": "numpy floor (8)", "codec_gbps": x.nbytes / floor["seconds"] / 1e9,
                 "copy_gbps": x.nbytes / t_copy / 1e9, "ratio": t_copy / floor["seconds"],
                 "codec_ms": floor["seconds"] * 1e3, "wire_bytes": x.size, "target_ratio": TARGETS[8],
                 "floor_chunk": floor["chunk"]})
    return rows


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    results = {"machine": platform.machine(), "numpy": np.__version__, "per_channel": args.per_channel,
               "compress": args.compress, "shapes": {}}
    console = Console()
    for name, shape in SHAPES.items():
        rows = measure(shape, args.repeats, args.per_channel, args.compress)
        results["shapes"][name] = rows
        table = Table(title=f"codec encode+decode, {name} float32 ({np.prod(shape) * 4 / 1e6:.1f} MB)")
        for col in ("bits", "codec GB/s", "copyto GB/s", "ratio", "target", "ms", "wire bytes"):
            table.add_column(col, justify="right")
        for r in rows:
            tgt = r["target_ratio"]
            mark = "" if tgt is None else (" ok" if r["ratio"] >= tgt else " MISS")
            table.add_row(str(r["bits"]), f"{r['codec_gbps']:.2f}", f"{r['copy_gbps']:.2f}",
                          f"{r['ratio']:.3f}", f"{tgt or '-'}{mark}", f"{r['codec_ms']:.3f}", str(r["wire_bytes"]))
        console.print(table)
    from bench.procs import write_json

    write_json(args.out, results)
    console.print(f"wrote {args.out}")
    return 0
