"""`coach gesfi simulate --out DIR`: simulate a CSI gesture dataset with domain labels."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from coach_runtime.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True,
                        help="output dataset directory (manifest.json, data.npz, raw.npz)")
    parser.add_argument("--reps", type=int, default=1,
                        help="repetitions per (gesture, domain) combination (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--locations", default=None,
                        help="location indices, e.g. '0,1' or '0-4' (default all 5)")
    parser.add_argument("--orientations", default=None, help="orientation indices (default all 5)")
    parser.add_argument("--rooms", default=None, help="room indices (default all 3)")
    parser.add_argument("--users", default=None, help="user indices (default all 5)")
    parser.add_argument("--gestures", default=None, help="gesture indices (default all 6)")
    parser.add_argument("--raw", type=int, default=3,
                        help="keep the raw CSI of the first N samples (default 3)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--walkers", action="store_true",
                        help="other people walk about in the rooms (interference; off by default, as in "
                             "a controlled collection such as Widar3.0)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from models.gesfi.dataset import DatasetSpec, build_dataset, parse_indices, save_dataset
    from models.gesfi.simulate import DOMAIN_VALUES, GESTURES, SimConfig

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"{out} exists; pick another --out or pass --force to replace it")
    if args.reps < 1 or args.raw < 0 or args.workers < 1:
        raise UserError("--reps and --workers must be >= 1 and --raw >= 0")
    spec = DatasetSpec(
        locations=parse_indices(args.locations, len(DOMAIN_VALUES["location"]), "locations"),
        orientations=parse_indices(args.orientations, len(DOMAIN_VALUES["orientation"]), "orientations"),
        rooms=parse_indices(args.rooms, len(DOMAIN_VALUES["room"]), "rooms"),
        users=parse_indices(args.users, len(DOMAIN_VALUES["user"]), "users"),
        gestures=parse_indices(args.gestures, len(GESTURES), "gestures"),
        reps=args.reps, seed=args.seed, raw=args.raw,
    )
    n = len(spec.plan())
    console = Console()
    workers = min(args.workers, os.cpu_count() or 1)
    t0 = time.perf_counter()
    with Progress(
        TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("sim", total=n)
        data, raw = build_dataset(spec, SimConfig(walkers=args.walkers), workers=workers, progress=lambda k: bar.advance(task, k))
    save_dataset(data, out, raw)
    secs = time.perf_counter() - t0
    table = Table(title=f"GesFi dataset {out}")
    table.add_column("what")
    table.add_column("value")
    table.add_row("samples", str(len(data)))
    table.add_row("images X", f"{tuple(data.x.shape)} float32")
    table.add_row("gestures", ", ".join(GESTURES[g] for g in spec.gestures))
    for f in ("location", "orientation", "room", "user"):
        vals = getattr(spec, f + "s")
        table.add_row(f, ", ".join(DOMAIN_VALUES[f][i] for i in vals))
    table.add_row("simulator", f"version {data.manifest['simulator_version']}, walkers {'on' if args.walkers else 'off'}")
    table.add_row("raw CSI kept", f"{0 if raw is None else len(raw)} samples")
    table.add_row("time", f"{secs:.1f} s ({1000 * secs / max(n, 1):.1f} ms/sample, {workers} worker(s))")
    console.print(table)
    return 0
