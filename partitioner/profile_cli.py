"""`coach profile MODEL.onnx --out profile.json`: per-node times on this device (run it on the device).

The JSON (docs/profile-format.md) feeds `coach plan --edge-profile/--cloud-profile`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coach_runtime.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the ONNX model to profile")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--device-name", default="", help="name of this device in the profile (default: host name)")
    p.add_argument("--providers", default="",
                   help="onnxruntime execution providers, comma-separated, in priority order "
                        "(default: CPUExecutionProvider)")
    p.add_argument("--runs", default="20", metavar="N", help="timed runs; node times are medians (default 20)")
    p.add_argument("--warmup", default="3", metavar="N", help="untimed runs first (default 3)")
    p.add_argument("--optimization", default="all", choices=("disable", "basic", "extended", "all"),
                   help="onnxruntime graph optimization level to time (default all, as the runtime runs)")
    p.add_argument("--threads", default="0", metavar="N",
                   help="intra-op threads (default 0: onnxruntime's choice)")


def _int(value: str, flag: str, minimum: int) -> int:
    try:
        v = int(value)
    except ValueError:
        raise UserError(f"{flag} {value!r}: expected an integer") from None
    if v < minimum:
        raise UserError(f"{flag} {value!r}: must be >= {minimum}")
    return v


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from partitioner.profile import profile_model, save_profile

    runs = _int(args.runs, "--runs", 1)
    warmup = _int(args.warmup, "--warmup", 0)
    threads = _int(args.threads, "--threads", 0)
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; --out names the profile JSON file")
    if not out.absolute().parent.is_dir():
        raise UserError(f"{out.absolute().parent}: no such directory for --out")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] or None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
                  TimeElapsedColumn(), transient=True) as prog:
        task = prog.add_task(f"profiling {Path(args.model).name}", total=1)
        prof = profile_model(args.model, device_name=args.device_name, providers=providers, runs=runs,
                             warmup=warmup, optimization=args.optimization, threads=threads,
                             progress=lambda d, t: prog.update(task, completed=d, total=t))
    save_profile(prof, out)

    table = Table(title=f"{prof.model_name} on {prof.device['name']}: slowest nodes")
    for col in ("node", "op", "ms", "unfused ms", "fused with"):
        table.add_column(col, justify="right" if col.endswith("ms") else "left")
    top = sorted(prof.nodes.items(), key=lambda kv: -kv[1].ms)[:10]
    for nid, n in top:
        table.add_row(nid, n.op, f"{n.ms:.3f}", f"{n.unfused_ms or 0:.3f}", n.cluster or "")
    console = Console()
    console.print(table)
    s = prof.segments
    console.print(f"whole model {s['full_ms']:.2f} ms (median of {runs}); node sum {s['node_sum_ms']:.2f} ms; "
                  f"{sum(1 for n in prof.nodes.values() if not n.constant)} compute nodes, "
                  f"{sum(1 for n in prof.nodes.values() if n.constant)} constant-like; written to {out}")
    return 0
