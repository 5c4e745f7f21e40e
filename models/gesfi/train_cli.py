"""`coach gesfi train --data DIR --method gesfi|erm|dann --out DIR`: train, export ONNX, write metrics.

The output directory holds model.onnx (input "image" (batch, 3, 32, 32), output "logits", opset 17,
checked against torch with onnxruntime), weights.npz (the state_dict as plain arrays) and
metrics.json (config, in-domain accuracy, history, latent domains for GesFi, export check).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from coach_runtime.errors import UserError

MAX_REL_ERR = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="dataset directory from 'coach gesfi simulate'")
    parser.add_argument("--method", choices=["gesfi", "erm", "dann"], default="gesfi",
                        help="training method (default gesfi)")
    parser.add_argument("--out", required=True,
                        help="output directory (model.onnx, weights.npz, metrics.json)")
    parser.add_argument("--epochs", type=int, default=30, help="classifier epochs (default 30)")
    parser.add_argument("--mine-epochs", type=int, default=20,
                        help="GesFi domain-feature epochs (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--k", type=int, default=0,
                        help="GesFi latent domains; 0 = choose by silhouette (default)")
    parser.add_argument("--domain-factor", default="location", choices=["location", "orientation", "room", "user"],
                        help="DANN's physical domain labels (default location)")
    parser.add_argument("--adv-weight", type=float, default=None,
                        help="max gradient-reversal weight (default 0.5)")
    add_mining_arguments(parser)
    parser.add_argument("--width", type=int, default=16,
                        help="channels of the first conv block (default 16)")
    parser.add_argument("--arch", choices=["compact", "offload"], default="compact",
                        help="network: compact (default; 3 conv blocks) or offload (compact stem, heavy body: "
                             "worth splitting between edge and cloud)")
    parser.add_argument("--depth", type=int, default=6, help="arch offload: conv layers in the body (default 6)")
    parser.add_argument("--body-width", type=int, default=384,
                        help="arch offload: channels of the body (default 384)")
    parser.add_argument("--val-frac", type=float, default=0.15,
                        help="fraction held out for in-domain accuracy")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def add_mining_arguments(parser: argparse.ArgumentParser) -> None:
    """GesFi's latent-domain mining options, shared by `coach gesfi train` and `coach gesfi eval`."""
    parser.add_argument("--domain-input", choices=["profile", "image"], default="profile",
                        help="what GesFi's domain encoder sees: the time-marginal Doppler profile (default) or "
                             "the whole image (first version)")
    parser.add_argument("--no-classwise-standardize", action="store_true",
                        help="cluster GesFi's domain feature without standardising it within each gesture")


def mining_options(args: argparse.Namespace) -> dict:
    """TrainConfig fields from add_mining_arguments' flags."""
    return {"domain_input": args.domain_input, "classwise_standardize": not args.no_classwise_standardize}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from models.gesfi.dataset import load_dataset
    from models.gesfi.export import export_onnx, save_weights, verify_onnx
    from models.gesfi.net import n_params
    from models.gesfi.train import TrainConfig, train

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"{out} exists; pick another --out or pass --force to replace it")
    data = load_dataset(args.data)
    kw = {} if args.adv_weight is None else {"adv_weight": args.adv_weight}
    try:
        cfg = TrainConfig(method=args.method, epochs=args.epochs, mine_epochs=args.mine_epochs, seed=args.seed,
                          k=args.k, domain_factor=args.domain_factor, width=args.width, arch=args.arch,
                          depth=args.depth, body_width=args.body_width, val_frac=args.val_frac,
                          threads=args.threads, **mining_options(args), **kw)
    except ValueError as exc:
        raise UserError(f"bad training option: {exc}") from None
    if not 0 <= args.val_frac < 1:
        raise UserError("--val-frac must be in [0, 1)")
    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console) as bar:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int, info: dict) -> None:
            if stage not in tasks:
                label = "GesFi: domain feature" if stage == "mine" else f"{cfg.method.upper()}: classifier"
                tasks[stage] = bar.add_task(label, total=total, info="")
            text = " ".join(f"{k}={v:.3f}" for k, v in info.items() if k != "epoch")
            bar.update(tasks[stage], completed=done, info=text)

        res = train(data, None, cfg, on_progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)
        onnx_path = export_onnx(res.model, tmp / "model.onnx", data.x.shape)
        probe = data.x[res.val_idx[:64]] if len(res.val_idx) else data.x[:64]
        rel = verify_onnx(res.model, onnx_path, probe)
        if rel > MAX_REL_ERR:
            raise RuntimeError(f"ONNX export differs from torch: max relative error {rel:.2e} > {MAX_REL_ERR}")
        save_weights(res.model, tmp / "weights.npz")
        metrics = {
            "method": cfg.method,
            "config": asdict(cfg),
            "data": {"path": str(Path(args.data).resolve()), "n": len(data), "image_shape": list(data.x.shape[1:]),
                     "gestures": data.manifest.get("gestures")},
            "n_train": int(len(res.train_idx)),
            "n_val": int(len(res.val_idx)),
            "in_domain_val_acc": res.val_acc,
            "final_train_acc": res.history[-1]["train_acc"],
            "train_seconds": res.seconds,
            "history": res.history,
            "latent_domains": None if res.latent is None else {
                "k": res.latent.k, "silhouette": {str(k): v for k, v in res.latent.silhouette.items()},
                "counts": [int((res.latent.labels == i).sum()) for i in range(res.latent.k)],
                "diagnostics": res.latent.diagnostics,
            },
            "onnx": {"file": "model.onnx", "sha256": _sha256(onnx_path), "opset": 17, "input": "image",
                     "output": "logits", "input_shape": ["batch", *data.x.shape[1:]], "bytes": onnx_path.stat().st_size,
                     "params": n_params(res.model), "max_rel_err_vs_torch": rel},
        }
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    table = Table(title=f"coach gesfi train --method {cfg.method}")
    table.add_column("what")
    table.add_column("value")
    table.add_row("train / val samples", f"{len(res.train_idx)} / {len(res.val_idx)}")
    table.add_row("final train accuracy", f"{100 * res.history[-1]['train_acc']:.1f}%")
    table.add_row("in-domain val accuracy", f"{100 * res.val_acc:.1f}%")
    if res.latent is not None:
        sil = ", ".join(f"{k}:{v:.3f}" for k, v in res.latent.silhouette.items())
        table.add_row("latent domains K", f"{res.latent.k} (silhouette {sil})")
    table.add_row("time", f"{res.seconds:.1f} s")
    table.add_row("model.onnx", f"{metrics['onnx']['bytes'] / 1024:.0f} KiB, {metrics['onnx']['params']} params, "
                  f"ORT vs torch rel err {rel:.1e}")
    table.add_row("written", str(out))
    console.print(table)
    return 0
