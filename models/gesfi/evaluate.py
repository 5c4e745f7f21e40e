"""Leave-one-domain-out evaluation of ERM, DANN and GesFi on a GesFi dataset.

For each split factor (location, orientation, room, user), each seed and each method: train on
every sample whose factor value is not the held-out one, test on the held-out ones (cross-domain
accuracy); in-domain accuracy is measured on samples held out of the training domains.
With holdout="rotate", seed s holds out value s (mod the number of values), so three seeds see three
different held-out domains and the spread covers both the initialisation and the domain; an integer
holdout fixes the held-out value and the spread is over initialisation only. Every method sees the
very same split for a given (factor, seed). DANN's physical domain labels are the split factor's
values (the factor the test shifts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from models.gesfi.dataset import GesFiData, leave_one_out
from models.gesfi.simulate import FACTORS
from models.gesfi.train import METHODS, TrainConfig, predict, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    methods: tuple[str, ...] = METHODS
    factors: tuple[str, ...] = FACTORS
    seeds: tuple[int, ...] = (0, 1, 2)
    holdout: str = "rotate"  # or the index of the held-out value, e.g. "0"
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class Run:
    method: str
    factor: str
    held_out: int
    held_out_name: str
    seed: int
    test_acc: float
    val_acc: float
    seconds: float
    k: int | None = None
    silhouette: dict | None = None
    latent_diagnostics: dict | None = None
    confusion: list[list[int]] = field(default_factory=list)  # test confusion, rows = truth


def held_out_value(factor_values: Sequence[int], seed: int, holdout: str) -> int:
    vals = sorted(set(int(v) for v in factor_values))
    if holdout == "rotate":
        return vals[seed % len(vals)]
    v = int(holdout)
    if v not in vals:
        raise ValueError(f"holdout {v} not among the values {vals}")
    return v


def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), np.int64)
    np.add.at(m, (y, pred), 1)
    return m


def run_one(data: GesFiData, method: str, factor: str, seed: int, holdout: str, base: TrainConfig,
            on_progress: Callable | None = None) -> Run:
    value = held_out_value(data.domains[factor], seed, holdout)
    tr, te = leave_one_out(data, factor, value)
    cfg = replace(base, method=method, domain_factor=factor, seed=seed)
    res = train(data, tr, cfg, on_progress)
    pred = predict(res.model, data.x[te]).argmax(1)
    names = data.manifest.get("factors", {}).get(factor, [])
    run = Run(
        method=method, factor=factor, held_out=value,
        held_out_name=names[value] if value < len(names) else str(value), seed=seed,
        test_acc=float((pred == data.y[te]).mean()), val_acc=res.val_acc, seconds=res.seconds,
        confusion=confusion(data.y[te], pred, data.n_classes).tolist(),
    )
    if res.latent is not None:
        run.k = res.latent.k
        run.silhouette = {str(k): v for k, v in res.latent.silhouette.items()}
        run.latent_diagnostics = res.latent.diagnostics
    return run


def run_eval(data: GesFiData, cfg: EvalConfig, on_run: Callable[[Run], None] | None = None) -> list[Run]:
    runs = []
    for factor in cfg.factors:
        for seed in cfg.seeds:
            for method in cfg.methods:
                r = run_one(data, method, factor, seed, cfg.holdout, cfg.train)
                log.info("%s %s seed=%d held-out=%s: test %.3f val %.3f (%.0f s)", method, factor, seed,
                         r.held_out_name, r.test_acc, r.val_acc, r.seconds)
                runs.append(r)
                if on_run:
                    on_run(r)
    return runs


def summarize(runs: list[Run]) -> dict:
    """Mean and std (over seeds) of cross-domain accuracy per (method, factor); overall means."""
    out: dict = {"per_split": {}, "overall": {}}
    methods = list(dict.fromkeys(r.method for r in runs))
    factors = list(dict.fromkeys(r.factor for r in runs))
    for m in methods:
        out["per_split"][m] = {}
        for f in factors:
            acc = [r.test_acc for r in runs if r.method == m and r.factor == f]
            out["per_split"][m][f] = {"mean": float(np.mean(acc)), "std": float(np.std(acc)), "n": len(acc)}
        mine = [r for r in runs if r.method == m]
        split_means = [out["per_split"][m][f]["mean"] for f in factors]
        out["overall"][m] = {
            "cross_domain_mean": float(np.mean(split_means)),
            "cross_domain_std_over_seeds": float(np.mean([out["per_split"][m][f]["std"] for f in factors])),
            "in_domain_mean": float(np.mean([r.val_acc for r in mine])),
            "seconds_mean": float(np.mean([r.seconds for r in mine])),
        }
    return out


def k_sensitivity(data: GesFiData, factor: str, seed: int, holdout: str, ks: Sequence[int],
                  base: TrainConfig, on_run: Callable[[Run], None] | None = None) -> list[dict]:
    """GesFi with a fixed number of latent domains K, on one split: K, silhouette, accuracies."""
    rows = []
    for k in ks:
        r = run_one(data, "gesfi", factor, seed, holdout, replace(base, k=int(k)))
        sil = (r.silhouette or {}).get(str(k))
        rows.append({"k": int(k), "silhouette": sil, "test_acc": r.test_acc, "val_acc": r.val_acc,
                     "factor": factor, "held_out": r.held_out_name, "seed": seed,
                     "latent_diagnostics": r.latent_diagnostics})
        if on_run:
            on_run(r)
    return rows


def plot_confusions(runs: list[Run], gestures: Sequence[str], path: str) -> None:
    """One panel per method: test confusion summed over every split and seed, row-normalised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.method for r in runs))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4.2), squeeze=False)
    for ax, m in zip(axes[0], methods):
        cm = np.sum([np.array(r.confusion) for r in runs if r.method == m], axis=0).astype(float)
        cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(cm)):
            for j in range(len(cm)):
                ax.text(j, i, f"{100 * cm[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > 0.5 else "black")
        acc = np.mean([r.test_acc for r in runs if r.method == m])
        ax.set_title(f"{m.upper()}: cross-domain {100 * acc:.1f}%")
        ax.set_xticks(range(len(gestures)), gestures, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(gestures)), gestures, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def runs_to_json(runs: list[Run]) -> list[dict]:
    return [asdict(r) for r in runs]


def timing_note(t0: float) -> float:
    return time.perf_counter() - t0
