"""`coach gesfi eval --data DIR`: leave-one-domain-out table of ERM vs DANN vs GesFi.

Writes DIR/eval/ (or --out): results.json (every run, the summary, the K sensitivity table) and
confusion.png (test confusion per method over all splits and seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from coach_runtime.errors import UserError
from models.gesfi.train_cli import add_mining_arguments, mining_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="dataset directory from 'coach gesfi simulate'")
    parser.add_argument("--out", default=None, help="output directory (default DATA/eval)")
    parser.add_argument("--methods", default="erm,dann,gesfi",
                        help="comma list of erm, dann, gesfi")
    parser.add_argument("--splits", default="location,orientation,room,user",
                        help="factors to leave out one value of (comma list)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per split (default 3)")
    parser.add_argument("--holdout", default="rotate",
                        help="'rotate': seed s holds out value s; or a fixed value index (default rotate)")
    parser.add_argument("--epochs", type=int, default=30,
                        help="classifier epochs per run (default 30)")
    parser.add_argument("--mine-epochs", type=int, default=20,
                        help="GesFi domain-feature epochs (default 20)")
    parser.add_argument("--k", type=int, default=0,
                        help="GesFi latent domains; 0 = silhouette (default)")
    parser.add_argument("--adv-weight", type=float, default=None,
                        help="max gradient-reversal weight (default 0.5)")
    add_mining_arguments(parser)
    parser.add_argument("--k-sweep", default="",
                        help="also run GesFi with these K on one split, e.g. '2,3,4,6,8'")
    parser.add_argument("--k-sweep-split", default="orientation",
                        help="split for the K sweep (default orientation)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: many short runs; 2 threads spin badly on a busy machine)")


def _pct(m: float, s: float | None = None) -> str:
    return f"{100 * m:.1f}" if s is None else f"{100 * m:.1f} ± {100 * s:.1f}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from models.gesfi.dataset import load_dataset
    from models.gesfi.evaluate import EvalConfig, k_sensitivity, plot_confusions, run_eval, runs_to_json, summarize
    from models.gesfi.simulate import FACTORS
    from models.gesfi.train import METHODS, TrainConfig

    data = load_dataset(args.data)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    if not methods or any(m not in METHODS for m in methods):
        raise UserError(f"--methods: comma list of {', '.join(METHODS)}, got {args.methods!r}")
    if not splits or any(s not in FACTORS for s in splits):
        raise UserError(f"--splits: comma list of {', '.join(FACTORS)}, got {args.splits!r}")
    if args.seeds < 1:
        raise UserError("--seeds must be >= 1")
    if args.holdout != "rotate" and not args.holdout.isdigit():
        raise UserError(f"--holdout: 'rotate' or a value index, got {args.holdout!r}")
    try:
        ks = [int(k) for k in args.k_sweep.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--k-sweep: comma list of integers, got {args.k_sweep!r}") from None
    if any(k < 2 for k in ks):
        raise UserError("--k-sweep: every K must be >= 2")
    kw = {} if args.adv_weight is None else {"adv_weight": args.adv_weight}
    try:
        base = TrainConfig(epochs=args.epochs, mine_epochs=args.mine_epochs, k=args.k, threads=args.threads,
                           **mining_options(args), **kw)
    except ValueError as exc:
        raise UserError(f"bad training option: {exc}") from None
    if args.holdout != "rotate":
        for f in splits:
            if int(args.holdout) not in set(data.domains[f].tolist()):
                raise UserError(f"--holdout {args.holdout}: the dataset has no {f} with that index")
    ecfg = EvalConfig(methods=methods, factors=splits, seeds=tuple(range(args.seeds)), holdout=args.holdout, train=base)
    out = Path(args.out) if args.out else Path(args.data) / "eval"
    out.mkdir(parents=True, exist_ok=True)

    console = Console()
    n_runs = len(methods) * len(splits) * args.seeds + len(ks)
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[last]}"), console=console) as bar:
        task = bar.add_task("training runs", total=n_runs, last="")

        def on_run(r) -> None:
            bar.update(task, advance=1, last=f"{r.method} {r.factor}={r.held_out_name} s{r.seed}: {100 * r.test_acc:.1f}%")

        runs = run_eval(data, ecfg, on_run)
        sweep = k_sensitivity(data, args.k_sweep_split, 0, args.holdout, ks, base, on_run) if ks else []
    summary = summarize(runs)

    table = Table(title="Leave-one-domain-out test accuracy (%), mean ± std over seeds; column = factor held out")
    table.add_column("method")
    for f in splits:
        table.add_column(f, justify="right", no_wrap=True)
    table.add_column("mean", justify="right")
    table.add_column("in-domain", justify="right")
    for m in methods:
        row = [summary["per_split"][m][f] for f in splits]
        ov = summary["overall"][m]
        table.add_row(m.upper(), *[_pct(c["mean"], c["std"]) for c in row], _pct(ov["cross_domain_mean"]),
                      _pct(ov["in_domain_mean"]))
    console.print(table)
    if sweep:
        st = Table(title=f"GesFi sensitivity to K (leave-one-{args.k_sweep_split}-out, seed 0)")
        for c in ("K", "silhouette", "cross-domain %", "in-domain %"):
            st.add_column(c, justify="right")
        for r in sweep:
            sil = "-" if r["silhouette"] is None else f"{r['silhouette']:.3f}"
            st.add_row(str(r["k"]), sil, _pct(r["test_acc"]), _pct(r["val_acc"]))
        console.print(st)

    results = {
        "data": str(Path(args.data).resolve()),
        "config": {"methods": list(methods), "splits": list(splits), "seeds": list(ecfg.seeds),
                   "holdout": args.holdout, "train": asdict(base)},
        "summary": summary,
        "k_sensitivity": sweep,
        "runs": runs_to_json(runs),
        "seconds": time.perf_counter() - t0,
    }
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".json", dir=out)
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, out / "results.json")
    fd, tmp = tempfile.mkstemp(prefix=".confusion.", suffix=".png", dir=out)
    os.close(fd)
    plot_confusions(runs, data.manifest.get("gestures", []), tmp)
    os.replace(tmp, out / "confusion.png")
    console.print(f"wrote {out / 'results.json'} and {out / 'confusion.png'} ({time.perf_counter() - t0:.0f} s)")
    return 0
