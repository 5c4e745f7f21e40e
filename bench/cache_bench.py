"""`coach bench cache`: the semantic cache's acceptance figures (issue 5).

Two workloads, each a model, a plan bundle whose interior cut has a cache, a labelled test stream and
a drift stream (all made once in --work and reused; a recipe stamp rebuilds what changed):
  gesfi   a GesFi model trained here on simulated CSI (locations 0-2, orientations 0-2, rooms 0-1,
          users 0-2, as `coach demo`), its cache calibrated on fresh draws of those domains (not on
          training data). Test stream: unseen locations 3-4 and users 3-4 (as the demo's stream, larger),
          in recording order (each gesture repeated, as people perform them). Drift: seen domains,
          then, from the middle on, an unseen room with the users facing an unseen way (+45 degrees).
  digits  a CNN on the 8x8 handwritten digits shipped with scikit-learn, seen as 32x32 camera crops:
          another task, ten classes, inputs in random order (no temporal correlation). Drift: the test
          digits, then the same digits with the crop shifted by a pixel and sensor noise.

Every run: one `coach cloud serve` process for both bundles (pinned to core 1), the edge agent here
(core 0), through the link emulator replaying --trace (restarted per run: every run sees the same
stretch), with the agent pinned to the cut that has the cache (AgentConfig(cut=...)) so that the
cache is exercised. Per workload: no cache; centers only; + temporal context; + online update;
+ cache-aware bits (the full cache). Drift: the full cache with cache_verify = --drift-verify, and no
cache, on the drift stream.

Figures: hit rate; accuracy against the labels with and without the cache (drop in points: target
<= 0.5); precision of the cache's answers against the fp32 full model (every hit, computed here) and
as the agent verified it; band inputs; bytes sent; throughput, p50/p95 latency. Writes --out (JSON)
and next to it cache_drift_<workload>.png and cache_ablation.png. Never fails on a timing.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.e2e import _until
from coach_runtime.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "bench/traces/ATT-LTE-driving-2016.up"
EDGE_SLOWDOWN = 8.0  # as `coach demo`: this machine's core standing for a Jetson-class board
WORKLOADS = ("gesfi", "digits")

# (label, AgentConfig cache fields; None: no cache). Each step adds one part to the one before.
ABLATION = (
    ("no cache", None),
    ("centers", dict(cache_context=False, cache_update=False, cache_band=False)),
    ("+ context", dict(cache_context=True, cache_update=False, cache_band=False)),
    ("+ update", dict(cache_context=True, cache_update=True, cache_band=False)),
    ("+ bits", dict(cache_context=True, cache_update=True, cache_band=True)),
)
FULL = ABLATION[-1][1]

# GesFi domains (indices into models.gesfi.simulate's tables), as `coach demo` trains.
GESFI_TRAIN = dict(locations=(0, 1, 2), orientations=(0, 1, 2), rooms=(0, 1), users=(0, 1, 2), reps=2, seed=0)
GESFI_CALIB = dict(GESFI_TRAIN, seed=5)
GESFI_STREAM = dict(locations=(3, 4), orientations=(0, 1, 2), rooms=(0,), users=(0, 1, 2, 3, 4), reps=3, seed=11)
GESFI_DRIFT = (dict(locations=(0, 1, 2), orientations=(1,), rooms=(0, 1), users=(0, 1, 2), reps=4, seed=12),
               dict(locations=(0, 1, 2, 3), orientations=(3,), rooms=(2,), users=(0, 1, 2), reps=6, seed=13))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workloads", help=f"comma-separated subset of {', '.join(WORKLOADS)} (default: all; "
                                       "--quick: digits)")
    p.add_argument("--quick", action="store_true", help="small model and streams, a minute (the smoke test)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "coach-cache-bench",
                   help="where models, streams and bundles are made and kept (default /tmp/coach-cache-bench)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/cache.json",
                   help="results JSON; plots go next to it (default bench/results/cache.json)")
    p.add_argument("--trace", default=str(TRACE), help="uplink trace (default: the ATT LTE driving trace)")
    p.add_argument("--down", default="const:50", help="downlink trace (default const:50)")
    p.add_argument("--delay-ms", type=float, default=10.0, help="one-way link delay (default 10)")
    p.add_argument("--inputs", type=int, help="inputs per run (default: the whole stream)")
    p.add_argument("--seconds", type=float, default=120.0, help="at most this long per run (default 120)")
    p.add_argument("--verify", type=float, default=0.1, help="cache_verify of the ablation runs (default 0.1)")
    p.add_argument("--drift-verify", type=float, default=0.3, help="cache_verify of the drift run (default 0.3)")
    p.add_argument("--cache-precision", type=float, default=0.99,
                   help="target precision the bundles' caches are planned for (default 0.99)")
    p.add_argument("--edge-slowdown", type=float, default=EDGE_SLOWDOWN,
                   help=f"edge compute stretch, planned and run (default {EDGE_SLOWDOWN:g}, as coach demo)")
    p.add_argument("--rebuild", action="store_true", help="make the models, streams and bundles afresh")


# ---------------------------------------------------------------- workloads (made once, kept in --work)


@dataclass(frozen=True)
class Workload:
    name: str
    bundle: Path
    stream: Path  # .npz: the model's input by name, `label`
    drift: Path  # .npz, the same keys: seen domain, then the unseen one from `switch` on
    switch: int
    about: dict  # what the model, the streams and the drift are


def coach(*args: str, log: Path) -> None:
    """Run a `coach` command; its output goes to `log`, and a failure is one line naming it."""
    with open(log, "a") as f:
        r = subprocess.run([sys.executable, "-m", "coach_runtime.cli", *args], cwd=ROOT, stdout=f, stderr=f)
    if r.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise UserError(f"coach {args[0]} {args[1] if len(args) > 1 else ''} failed (exit {r.returncode}): "
                        f"{tail[0]}; the whole output is in {log}")


def source_stamp(*modules: str) -> str:
    """Hash of the source files that make a workload's data (a change rebuilds it)."""
    h = hashlib.sha256()
    for m in modules:
        h.update((ROOT / m).read_bytes())
    return h.hexdigest()[:16]


def prepared(work: Path, name: str, recipe: dict, make, rebuild: bool) -> Path:
    """work/name made by make(tmp_dir, log) unless it is there with the same recipe; atomic (temp dir, then a
    rename). The output of the `coach` commands it runs goes to work/name.log."""
    d = work / name
    stamp = d / "recipe.json"
    recipe = json.loads(json.dumps(recipe))  # tuples as lists, as read back
    if not rebuild and stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return d
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=work))
    log = work / f"{name}.log"
    log.write_text("")
    try:
        make(tmp, log)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))
        if d.exists():
            shutil.rmtree(d)
        tmp.rename(d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return d


def plan_bundle(model: Path, name: str, calib: Path, out: Path, args, log: Path) -> None:
    quick = ["--runs", "3", "--no-timing"] if args.quick else []  # (the smoke test: less profiling)
    coach("plan", str(model), "--out", str(out), "--model-name", name, "--calibration", str(calib),
          "--cache-precision", str(args.cache_precision), "--edge-slowdown", str(args.edge_slowdown),
          "--trace", str(args.trace), *quick, log=log)


def gesfi_data(spec: dict):
    """Simulated CSI turned into Doppler images by the edge's own preprocessing, in recording order."""
    from models.gesfi.dataset import DatasetSpec, build_dataset

    data, _ = build_dataset(DatasetSpec(**spec, raw=0), workers=2)
    return data


def make_gesfi(d: Path, args, log: Path) -> None:
    from models.gesfi.dataset import save_dataset

    print("  gesfi: simulating the training set and training the model (a few minutes, once)", flush=True)
    save_dataset(gesfi_data(GESFI_TRAIN), d / "train")
    coach("gesfi", "train", "--data", str(d / "train"), "--method", "gesfi", "--out", str(d / "model"), "--epochs", "12",
          "--force", log=log)
    print("  gesfi: simulating calibration, test and drift streams", flush=True)
    for name, spec in (("calib", GESFI_CALIB), ("stream", GESFI_STREAM)):
        data = gesfi_data(spec)
        np.savez(d / f"{name}.npz", image=data.x, label=data.y)
    a, b = (gesfi_data(s) for s in GESFI_DRIFT)
    np.savez(d / "drift.npz", image=np.concatenate([a.x, b.x]), label=np.concatenate([a.y, b.y]), switch=len(a.y))
    print("  gesfi: planning the bundle", flush=True)
    plan_bundle(d / "model/model.onnx", "gesfi-cache-bench", d / "calib.npz", d / "bundle", args, log)


def digits_split(seed: int = 0):
    """scikit-learn's 8x8 digits, as 8x8 images in [0, 1]; indices of train, calibration and test."""
    from sklearn.datasets import load_digits

    dg = load_digits()
    x = (dg.images / 16.0).astype(np.float32)
    y = dg.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(y))
    return x, y, idx[:800], idx[800:1300], idx[1300:]


def sensor(x8: np.ndarray) -> np.ndarray:
    """8x8 digits as a 32x32 camera crop (bilinear): (N, 1, 32, 32) float32."""
    import cv2

    return np.stack([cv2.resize(im, (32, 32), interpolation=cv2.INTER_LINEAR) for im in x8])[:, None].astype(np.float32)


def shifted_noisy(x8: np.ndarray, seed: int = 1) -> np.ndarray:
    """The drift domain of digits: the crop misaligned by one pixel (to the right), with sensor noise."""
    out = np.zeros_like(x8)
    out[:, :, 1:] = x8[:, :, :-1]
    out += np.random.default_rng(seed).normal(0, 0.1, size=x8.shape).astype(np.float32)
    return np.clip(out, 0, 1)


def digits_net():
    """Three conv blocks to a 128-d feature (the edge's natural share), then a classifier heavy enough
    (two 1024-wide layers) that the planner keeps an interior cut on the ATT trace's levels."""
    from torch import nn

    def block(i: int, o: int) -> list:
        return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(), nn.Linear(1024, 128), nn.ReLU(),
                         nn.Linear(128, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def train_digits(x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    net = digits_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()
            opt.step()
    return net.eval()


def make_digits(d: Path, args, epochs: int, stream_n: int | None, log: Path) -> None:
    from models.gesfi.export import export_onnx

    print("  digits: training a small CNN on scikit-learn's digits", flush=True)
    x8, y, train, calib, test = digits_split()
    (d / "model").mkdir(parents=True)
    export_onnx(train_digits(sensor(x8[train]), y[train], epochs), d / "model/model.onnx", (1, 1, 32, 32))
    np.savez(d / "calib.npz", image=sensor(x8[calib]), label=y[calib])
    test = test[:stream_n]
    np.savez(d / "stream.npz", image=sensor(x8[test]), label=y[test])
    drift = np.concatenate([x8[test], shifted_noisy(x8[test])])  # the test digits, then the same moved
    np.savez(d / "drift.npz", image=sensor(drift), label=np.concatenate([y[test], y[test]]), switch=len(test))
    print("  digits: planning the bundle", flush=True)
    plan_bundle(d / "model/model.onnx", "digits-cache-bench", d / "calib.npz", d / "bundle", args, log)


def prepare(name: str, args) -> Workload:
    common = {"cache_precision": args.cache_precision, "edge_slowdown": args.edge_slowdown,
              "trace": Path(args.trace).name, "planner": source_stamp("partitioner/plan_cli.py",
                                                                     "partitioner/semantic_cache.py")}
    if name == "gesfi":
        recipe = {**common, "train": GESFI_TRAIN, "calib": GESFI_CALIB, "stream": GESFI_STREAM, "drift": GESFI_DRIFT,
                  "sources": source_stamp("models/gesfi/simulate.py", "models/gesfi/dataset.py",
                                          "edge/gesfi/preprocess.py", "models/gesfi/train.py", "models/gesfi/net.py")}
        d = prepared(args.work, "gesfi-quick" if args.quick else "gesfi", recipe,
                     lambda t, log: make_gesfi(t, args, log), args.rebuild)
        about = {"model": "GesFi CNN trained here (coach gesfi train, 12 epochs) on simulated CSI",
                 "train_domains": GESFI_TRAIN, "calibration": f"fresh draws of the training domains (seed "
                 f"{GESFI_CALIB['seed']})", "stream": "unseen locations 3-4, users 0-4, recording order",
                 "stream_domains": GESFI_STREAM, "drift": "seen domains, then an unseen room (office) with the "
                 "users facing an unseen way (+45 degrees)",
                 "drift_domains": GESFI_DRIFT}
    elif name == "digits":
        epochs, n = (4, 120) if args.quick else (15, None)
        recipe = {**common, "epochs": epochs, "stream_n": n, "split": "800/500/497 seed 0",
                  "net": "32x32 input, 3 conv blocks, linear 1024-128-1024-1024-10",
                  "drift": "test digits, then the same shifted right 1 px with noise 0.1"}
        d = prepared(args.work, "digits-quick" if args.quick else "digits", recipe,
                     lambda t, log: make_digits(t, args, epochs, n, log), args.rebuild)
        about = {"model": f"CNN (3 conv blocks, 4 linear) on scikit-learn's digits upsampled to 32x32, {epochs} "
                          "epochs on 800 digits",
                 "calibration": "500 held-out digits", "stream": "held-out digits in random order",
                 "drift": "the test digits, then the same digits shifted right by one pixel with noise (sigma 0.1)"}
    else:
        raise UserError(f"--workloads: unknown {name!r}; use {', '.join(WORKLOADS)}")
    with np.load(d / "drift.npz", allow_pickle=False) as z:
        switch = int(z["switch"])
    return Workload(name, d / "bundle", d / "stream.npz", d / "drift.npz", switch, about)


def cache_cut(bundle) -> str:
    """The interior cut whose cache the runs pin: one with a hit threshold, a band if any has one,
    then the most bytes at fp32 (where the cache saves most)."""
    cands = [cid for cid, c in bundle.cuts.items() if c.kind == "interior"
             and (s := bundle.cache_for(cid)) is not None and s.hit is not None]
    if not cands:
        raise UserError(f"bundle {bundle.path}: no interior cut has a semantic cache with a hit threshold "
                        "(see plan.json objective.semantic_cache); plan with --calibration")
    return max(cands, key=lambda cid: (bundle.cache_for(cid).band_bits is not None, bundle.cuts[cid].bytes_at(32)))


def reference(bundle, stream: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, fp32 full-model answers) of every input of a stream."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle.full_path), opts, providers=["CPUExecutionProvider"])
    name = bundle.inputs[0].name
    with np.load(stream, allow_pickle=False) as z:
        x, y = z[name], z["label"]
    ref = np.array([int(np.argmax(sess.run(None, {name: x[i : i + 1]})[0])) for i in range(len(x))])
    return y.astype(np.int64), ref


# ---------------------------------------------------------------- one run through the emulated link


@dataclass
class CacheRun:
    run: object  # bench.e2e.MethodRun
    history: list  # SemanticCache.history: (inputs seen, hit threshold, verified precision)
    telemetry: dict  # SemanticCache.telemetry() of the pinned cut ({} without a cache)


def run_once(bundle, cut: str, port: int, source: Path, n: int | None, cache: dict | None, verify: float,
             args, label: str) -> CacheRun:
    from bench.e2e import MethodRun
    from bench.link import LinkEmulator
    from edge.agent import Agent, AgentConfig
    from edge.sources import npz_samples

    emu = LinkEmulator("127.0.0.1:0", ("127.0.0.1", port), args.trace, args.down, delay_ms=args.delay_ms).start()
    try:
        cfg = AgentConfig(cloud=f"127.0.0.1:{emu.address[1]}", cut=cut, deadline_ms=20000,
                          edge_slowdown=args.edge_slowdown, cache=cache is not None, cache_verify=verify,
                          **(cache or {}))
        agent = Agent(bundle, cfg)
        samples = list(itertools.islice(npz_samples(source, agent.inputs), n))
        results, done_at, bw = [], [], []
        t0 = time.perf_counter()
        with agent:
            for r in agent.run(_until(samples, t0 + args.seconds)):
                results.append(r)
                done_at.append(time.perf_counter() - t0)
                bw.append(agent.estimator.estimate_mbps())
            wall = time.perf_counter() - t0
        c = agent.caches.get(cut)
        return CacheRun(MethodRun(str(args.trace), label, results, done_at, bw, wall, dict(agent.stats),
                                  agent.cache_telemetry()),
                        list(c.history) if c else [], c.telemetry() if c else {})
    finally:
        emu.stop()


def figures(cr: CacheRun, labels: np.ndarray, ref: np.ndarray, base: CacheRun | None = None) -> dict:
    """One run's row: e2e's summary plus the cache's figures against labels and the fp32 model."""
    from bench.e2e import summarize

    s = summarize(cr.run)
    rs = cr.run.results
    ids = np.array([r.id for r in rs], np.int64)
    cls = np.array([r.cls for r in rs], np.int64)
    hit = np.array([r.where == "cache" for r in rs], bool)
    t = cr.telemetry
    row = {
        "config": cr.run.method, "inputs": len(rs),
        "accuracy": float((cls == labels[ids]).mean()) if len(rs) else None,
        "agreement_fp32": float((cls == ref[ids]).mean()) if len(rs) else None,
        "hit_rate": float(hit.mean()) if len(rs) else 0.0,
        "precision_fp32": float((cls[hit] == ref[ids[hit]]).mean()) if hit.any() else None,
        "hits_wrong_fp32_right": int(((cls != labels[ids]) & (ref[ids] == labels[ids]) & hit).sum()),
        "hits_right_fp32_wrong": int(((cls == labels[ids]) & (ref[ids] != labels[ids]) & hit).sum()),
        "band": t.get("band", 0), "reused": t.get("reused", 0), "verified": t.get("verified", 0),
        "verified_precision": t.get("verified_precision"), "hit_threshold_end": t.get("hit_threshold"),
        # every byte on the uplink: requests answered by the cloud and cache hits sent to verify them
        "bytes_sent": s["bytes_sent"] + cr.run.stats.get("verify_bytes", 0),
        "verify_bytes": cr.run.stats.get("verify_bytes", 0), "bits_used": s["bits_used"], "where": s["where"],
        "throughput_hz": s["throughput_hz"], "p50_ms": s["p50_ms"], "p95_ms": s["p95_ms"], "mean_ms": s["mean_ms"],
    }
    if base is not None:  # accuracy drop against the no-cache run, on the inputs both answered
        bids = {r.id: r.cls for r in base.run.results}
        both = [(r.cls, bids[r.id], int(labels[r.id])) for r in rs if r.id in bids]
        if both:
            a = np.array(both)
            row["drop_points"] = float(100 * ((a[:, 1] == a[:, 2]).mean() - (a[:, 0] == a[:, 2]).mean()))
    return row


# ---------------------------------------------------------------- drift


def rolling(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start)."""
    c = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    i = np.arange(1, len(values) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def drift_figures(cr: CacheRun, base: CacheRun, labels, ref, switch: int, target: float, calibrated: float) -> dict:
    rs = sorted(cr.run.results, key=lambda r: r.id)
    ids = np.array([r.id for r in rs])
    cls = np.array([r.cls for r in rs])
    hit = np.array([r.where == "cache" for r in rs])
    right = cls == ref[ids]
    bcls = {r.id: r.cls for r in base.run.results}
    n = len(rs)

    def phase(lo: int, hi: int) -> dict:
        m = (ids >= lo) & (ids < hi)
        h = m & hit
        b = [i for i in ids[m] if i in bcls]
        return {"inputs": [int(lo), int(min(hi, n))], "hit_rate": float(h.sum() / max(m.sum(), 1)),
                "precision_fp32": float(right[h].mean()) if h.any() else None,
                "accuracy": float((cls[m] == labels[ids[m]]).mean()) if m.any() else None,
                "accuracy_no_cache": float(np.mean([bcls[i] == labels[i] for i in b])) if b else None}

    third = max((n - switch) // 3, 1)
    hist = [(int(s), float(t), None if p is None else float(p)) for s, t, p in cr.history]
    at_switch = [t for s, t, _ in hist if s <= switch]
    return {
        "switch": switch, "target_precision": target,
        "phases": {"seen": phase(0, switch), "unseen first third": phase(switch, switch + third),
                   "unseen middle third": phase(switch + third, switch + 2 * third),
                   "unseen last third": phase(switch + 2 * third, n)},
        "hit_threshold": {"calibrated": calibrated, "at_switch": at_switch[-1] if at_switch else calibrated,
                          "end": cr.telemetry.get("hit_threshold")},
        "history": hist,
        # per input (in stream order): rolling precision of the last 40 cache answers, rolling hit rate
        "series": {"hit_index": ids[hit].tolist(), "precision_rolling": rolling(right[hit], 40).round(4).tolist(),
                   "hit_rate_rolling": rolling(hit, 50).round(4).tolist()},
    }


# ---------------------------------------------------------------- plots


def plot_drift(name: str, d: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, hist = d["series"], d["history"]
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    a1.plot(s["hit_index"], s["precision_rolling"], lw=1.2, label="precision of cache answers vs fp32 (last 40 hits)")
    pts = [(x, p) for x, _, p in hist if p is not None]
    if pts:
        a1.plot(*zip(*pts), ".", ms=4, label="verified precision (agent's window)")
    a1.axhline(d["target_precision"], color="k", ls=":", lw=1, label=f"target {d['target_precision']:g}")
    a1.set_ylabel("precision")
    a1.legend(fontsize=7, loc="lower left")
    if hist:
        a2.step([x for x, _, _ in hist], [t for _, t, _ in hist], where="post")
    a2.set_ylabel("hit threshold\n(margin)")
    a3.plot(np.arange(len(s["hit_rate_rolling"])), s["hit_rate_rolling"], lw=1.2)
    a3.set_ylabel("hit rate\n(last 50 inputs)")
    a3.set_xlabel("inputs seen")
    for a in (a1, a2, a3):
        a.axvline(d["switch"], color="r", ls="--", lw=1)
    a1.set_title(f"{name}: semantic cache under drift (unseen domain from input {d['switch']}, red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["workloads"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = result["workloads"][name]["ablation"]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [100 * r["hit_rate"] for r in rows], 0.4, label="hit rate %")
        ax2 = ax.twinx()
        ax2.bar(x + 0.2, [r.get("drop_points", 0.0) for r in rows], 0.4, color="tab:red", label="accuracy drop, points (< 0: a gain)")
        ax2.axhline(0.5, color="tab:red", ls=":", lw=1)
        ax.set_xticks(x, [r["config"] for r in rows], fontsize=8)
        ax.set_ylabel("hit rate %")
        ax2.set_ylabel("accuracy drop vs no cache (points)", color="tab:red")
        ax.set_title(name)
        ax.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the benchmark


def evaluate(args, workloads: list[Workload]) -> dict:
    from bench.e2e import pin
    from bench.load_bench import ServerProcess
    from protos.bundle import load_bundle

    bundles = {w.name: load_bundle(w.bundle) for w in workloads}
    srv_args = ["--listen", "127.0.0.1:0", "--compute-workers", "1", "--intra-op-threads", "1"]
    for w in workloads:
        srv_args += ["--bundle", str(w.bundle)]
    two_cores = len(os.sched_getaffinity(0)) >= 2
    cores = os.sched_getaffinity(0)
    srv = ServerProcess(srv_args)
    out = {}
    try:
        if two_cores:
            pin(srv.proc.pid, {1})
            os.sched_setaffinity(0, {0})
        for w in workloads:
            b = bundles[w.name]
            cut = cache_cut(b)
            spec = b.cache_for(cut)
            labels, ref = reference(b, w.stream)
            n = args.inputs
            runs = []
            for label, cache in ABLATION:
                print(f"  {w.name}: {label} ({min(n or len(labels), len(labels))} inputs, cut {cut})", flush=True)
                runs.append(run_once(b, cut, srv.port, w.stream, n, cache, args.verify, args, label))
            rows = [figures(r, labels, ref, runs[0] if i else None) for i, r in enumerate(runs)]
            dl, dref = reference(b, w.drift)
            print(f"  {w.name}: drift (full cache, verify {args.drift_verify:g}; and no cache)", flush=True)
            dn = None if args.inputs is None else max(args.inputs, 2 * w.switch)
            drift = run_once(b, cut, srv.port, w.drift, dn, FULL, args.drift_verify, args, "drift: full cache")
            dbase = run_once(b, cut, srv.port, w.drift, dn, None, args.drift_verify, args, "drift: no cache")
            out[w.name] = {
                "about": w.about, "bundle": str(w.bundle), "plan_sha256": b.plan_sha256, "cut": cut,
                "cut_bytes_fp32": b.cuts[cut].bytes_at(32),
                "cache_plan": {"hit": spec.hit, "band": spec.band, "band_bits": spec.band_bits,
                               "target_precision": spec.target_precision, "precision_held_out": spec.precision,
                               "hit_rate_held_out": spec.hit_rate, "band_rate_held_out": spec.band_rate,
                               "held_out": spec.held_out},
                "stream": {"inputs": len(labels), "fp32_accuracy": float((ref == labels).mean())},
                "ablation": rows,
                "drift": {"fp32_accuracy_seen": float((dref[: w.switch] == dl[: w.switch]).mean()),
                          "fp32_accuracy_unseen": float((dref[w.switch :] == dl[w.switch :]).mean()),
                          "rows": [figures(drift, dl, dref, dbase), figures(dbase, dl, dref)],
                          **drift_figures(drift, dbase, dl, dref, w.switch, spec.target_precision, spec.hit)},
            }
    finally:
        srv.proc.terminate()
        srv.proc.wait(30)
        if two_cores:
            os.sched_setaffinity(0, cores)
    return out


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(Console().width, 150))

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    for name, w in result["workloads"].items():
        cp = w["cache_plan"]
        band = (f"band >= {cp['band']:.4f} at {cp['band_bits']} bits" if cp.get("band_bits") is not None
                else "no band: the hits spend the accuracy budget")
        t = Table(title=f"{name}: cut {w['cut']} (hit >= {cp['hit']:.4f}, {band}), {w['stream']['inputs']} inputs, fp32 accuracy "
                        f"{pct(w['stream']['fp32_accuracy'])}, on {Path(result['trace']).name}")
        for col in ("config", "hit rate", "band", "accuracy", "drop pts", "prec vs fp32", "verified prec",
                    "threshold end", "bytes sent", "thr /s", "p50 ms", "p95 ms"):
            t.add_column(col, justify="right")
        for r in w["ablation"]:
            thr = r["hit_threshold_end"]
            t.add_row(r["config"], pct(r["hit_rate"]), str(r["band"]), pct(r["accuracy"]),
                      "-" if "drop_points" not in r else f"{r['drop_points']:+.2f}", pct(r["precision_fp32"]),
                      pct(r["verified_precision"]), "-" if thr is None else f"{thr:.4f}", str(r["bytes_sent"]),
                      f"{r['throughput_hz']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}")
        con.print(t)
        d = w["drift"]
        th = d["hit_threshold"]
        t = Table(title=f"{name} drift: unseen domain from input {d['switch']}; hit threshold {th['calibrated']:.4f} "
                        f"(calibrated), {th['at_switch']:.4f} (at the switch), {th['end']:.4f} (end); target "
                        f"precision {d['target_precision']:g}")
        for col in ("phase", "inputs", "hit rate", "prec vs fp32", "accuracy", "acc. no cache"):
            t.add_column(col, justify="right")
        for ph, v in d["phases"].items():
            t.add_row(ph, f"{v['inputs'][0]}-{v['inputs'][1]}", pct(v["hit_rate"]), pct(v["precision_fp32"]),
                      pct(v["accuracy"]), pct(v["accuracy_no_cache"]))
        con.print(t)


def run(args) -> int:
    if args.workloads:
        names = [s.strip() for s in args.workloads.split(",") if s.strip()]
    else:
        names = ["digits"] if args.quick else list(WORKLOADS)
    bad = [s for s in names if s not in WORKLOADS]
    if bad or not names:
        raise UserError(f"--workloads {args.workloads!r}: use a comma-separated subset of {', '.join(WORKLOADS)}")
    if not str(args.trace).startswith("const:") and not Path(args.trace).exists():
        raise UserError(f"--trace {args.trace}: no such file (a mahimahi trace, or const:MBPS)")
    for flag in ("verify", "drift_verify"):
        if not 0 <= getattr(args, flag) <= 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: a fraction in [0, 1]")
    if not 0 < args.cache_precision <= 1:
        raise UserError(f"--cache-precision {args.cache_precision}: a precision in (0, 1], e.g. 0.99")
    if args.inputs is None and args.quick:
        args.inputs = 80
    if args.inputs is not None and args.inputs < 10:
        raise UserError(f"--inputs {args.inputs}: give at least 10")
    t0 = time.perf_counter()
    print(f"preparing {', '.join(names)} in {args.work}", flush=True)
    workloads = [prepare(n, args) for n in names]
    print(f"running through the link emulator ({Path(args.trace).name}, {args.delay_ms:g} ms one way)", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "trace": str(args.trace), "down": args.down,
              "delay_ms": args.delay_ms, "edge_slowdown": args.edge_slowdown, "verify": args.verify,
              "drift_verify": args.drift_verify, "quick": args.quick,
              "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
              "workloads": evaluate(args, workloads)}
    result["targets"] = {name: {"accuracy_drop_points_full_cache": w["ablation"][-1].get("drop_points"),
                                "met_0.5_points": (w["ablation"][-1].get("drop_points") or 0.0) <= 0.5}
                         for name, w in result["workloads"].items()}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_outputs(result, args.out)
    print_tables(result)
    print(f"results: {args.out} and {', '.join(result['plots'])} next to it ({result['seconds']:.0f} s)")
    return 0


def write_outputs(result: dict, out: Path) -> None:
    """Plots and JSON next to each other, each written to a temp file and renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result["plots"] = []
    for name, w in result["workloads"].items():
        f = out.parent / f"cache_drift_{name}.png"
        plot_drift(name, w["drift"], f.with_name(f.stem + ".tmp.png"))
        os.replace(f.with_name(f.stem + ".tmp.png"), f)
        result["plots"].append(f.name)
    f = out.parent / "cache_ablation.png"
    plot_ablation(result, f.with_name(f.stem + ".tmp.png"))
    os.replace(f.with_name(f.stem + ".tmp.png"), f)
    result["plots"].append(f.name)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
