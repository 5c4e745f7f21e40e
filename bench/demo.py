"""`coach demo`: the main job end to end on an embedded default, localhost only.

1. simulate a small CSI gesture dataset and train a small GesFi model (cached in .cache/demo/);
2. profile the model here for the edge (core 0) and the cloud (core 1); the edge profile is slowed by
   EDGE_SLOWDOWN to stand for a Jetson-class board (the live edge agent is slowed the same way);
3. plan with COACH and the baselines over the levels of a real uplink trace shipped in bench/traces/,
   the accuracy drop measured at a location neither trained on nor streamed;
4. start the cloud service and run the edge agent through the link emulator replaying that trace, on
   a stream of raw simulated CSI that the edge turns into Doppler images itself, once per method;
5. print the table and write the report directory (demo-out/).
The first run makes everything (a few minutes); later runs reuse the cached dataset, model and bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "bench/traces/ATT-LTE-driving-2016.up"
EDGE_SLOWDOWN = 8.0  # this machine's core vs a Jetson Nano-class CPU running a small CNN (order of magnitude)
# The demo's network: GesFi's compact stem (a 2048-element tensor at a quarter of the image's size, cheap
# to send quantized) before a heavy body (~5 ms here at batch 1, ~40 ms slowed): on the edge alone it
# is the bottleneck, so where to cut and at how many bits matters (the default compact arch is so light
# that every method stays on the edge).
MODEL_ARGS = ["--arch", "offload", "--depth", "6", "--body-width", "384"]
# Profiles with one onnxruntime thread, as the edge agent's head and the cloud service's tails run in the
# demo (onnxruntime's default, one thread per core, under taskset to one core measured the edge ~2x fast).
PROFILE_ARGS = ["--runs", "20", "--threads", "1"]
DATA_ARGS = ["--locations", "0-2", "--orientations", "0-2", "--rooms", "0,1", "--users", "0-2", "--reps", "2"]
STREAM_ARGS = ["--locations", "3", "--orientations", "1", "--rooms", "0", "--users", "0-4", "--reps", "2",
               "--seed", "7"]
# The accuracy drop is measured on a location neither trained on nor streamed (all five users, two of them
# never trained on): drawn from the training domains, 400 images admitted 3 bits of the input with no flip
# while one of the stream's 60 windows flipped there (a new domain's margins are smaller). The semantic
# cache is still built from the training domains (`--cache-calibration`): centres from another location
# answer the stream wrongly.
HELDOUT_ARGS = ["--locations", "4", "--orientations", "0-2", "--rooms", "0,1", "--users", "0-4", "--reps", "2",
                "--seed", "11"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache/demo", help="where the dataset, model and bundle are kept")
    p.add_argument("--out", type=Path, default=ROOT / "demo-out", help="report directory")
    p.add_argument("--trace", default=str(TRACE), help="uplink trace (default: the shipped ATT LTE driving trace)")
    p.add_argument("--inputs", type=int, default=150, help="inputs per method (default 150; the 60-window stream is looped)")
    p.add_argument("--seconds", type=float, default=20.0, help="at most this long per method (default 20)")
    p.add_argument("--epochs", type=int, default=12, help="GesFi training epochs (default 12)")
    p.add_argument("--fresh", action="store_true", help="rebuild the dataset, model and bundle")


def step(msg: str) -> None:
    print(f"\n[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def coach(*args: str, cores: str | None = None) -> None:
    cmd = [sys.executable, "-m", "coach_runtime.cli", *args]
    if cores and len(os.sched_getaffinity(0)) >= 2:
        cmd = ["taskset", "-c", cores, *cmd]
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"coach demo: step failed: coach {' '.join(args)} (exit {r.returncode})")


def stream_npz(stream_dir: Path, out: Path) -> None:
    """The stream's raw CSI with its labels, as an .npz the edge's CSI source reads."""
    with np.load(stream_dir / "raw.npz", allow_pickle=False) as raw, np.load(stream_dir / "data.npz", allow_pickle=False) as d:
        csi = raw["csi"]
        np.savez(out, csi=csi, y=d["y"][: len(csi)])


def calibration_npz(data_dir: Path, out: Path, n: int = 400, seed: int = 0) -> None:
    """Up to n images of a simulated dataset, with their labels, as `coach plan --calibration` reads them."""
    with np.load(data_dir / "data.npz", allow_pickle=False) as d:
        idx = np.random.default_rng(seed).permutation(len(d["y"]))[:n]
        np.savez(out, image=d["X"][idx], label=d["y"][idx])


def cache_version() -> str:
    """The stamp of .cache/demo: preprocessing, simulator, model and profiling options (any change rebuilds)."""
    from edge.gesfi.preprocess import PREPROCESS_VERSION
    from models.gesfi.simulate import SIM_VERSION

    return f"{PREPROCESS_VERSION} simulator {SIM_VERSION} model {' '.join(MODEL_ARGS)} profile {' '.join(PROFILE_ARGS)}"


def plan_is_stale(bundle: Path, calibration: Path, cache_calibration: Path) -> bool:
    """A cached bundle planned by an older coach (its semantic cache pools another way than this coach
    writes) or with other calibration sets: planned again, the trained model and the data are kept."""
    import hashlib

    from protos.bundle import POOLING

    try:
        plan = json.loads((bundle / "plan.json").read_text())
    except (OSError, ValueError):
        return True
    cache = plan.get("cache") or {}
    used = (((plan.get("objective") or {}).get("calibration") or {}).get("sha256"),
            (cache.get("calibration") or {}).get("sha256"))
    wanted = tuple(hashlib.sha256(f.read_bytes()).hexdigest() for f in (calibration, cache_calibration))
    return cache.get("pooling", POOLING) != POOLING or used != wanted


def prepare(args) -> Path:
    c = args.cache_dir
    stamp, version = c / "preprocess_version", cache_version()
    stale = c.exists() and (not stamp.exists() or stamp.read_text().strip() != version)
    if (args.fresh or stale) and c.exists():  # other preprocessing, physics or model: everything is rebuilt
        import shutil

        shutil.rmtree(c)
    c.mkdir(parents=True, exist_ok=True)
    stamp.write_text(version + "\n")
    data, stream, model = c / "data", c / "stream", c / "model"
    if not (data / "manifest.json").exists():
        step("simulating the training set (CSI of 6 gestures across locations, orientations, rooms, users)")
        coach("gesfi", "simulate", "--out", str(data), "--raw", "0", "--workers", "2", "--force", *DATA_ARGS)
    if not (stream / "manifest.json").exists():
        step("simulating the test stream (raw CSI, a location the model never saw)")
        coach("gesfi", "simulate", "--out", str(stream), "--raw", "1000", "--workers", "2", "--force", *STREAM_ARGS)
    if not (c / "stream.npz").exists():
        stream_npz(stream, c / "stream.npz")
    if not (model / "model.onnx").exists():
        step("training the GesFi model (latent-domain adversarial training), exporting ONNX")
        coach("gesfi", "train", "--data", str(data), "--method", "gesfi", "--out", str(model), "--epochs",
              str(args.epochs), "--force", *MODEL_ARGS)
    if not (c / "calib.npz").exists():
        calibration_npz(data, c / "calib.npz")
    heldout = c / "heldout"
    if not (heldout / "manifest.json").exists():
        step("simulating the calibration set (a location neither trained on nor streamed)")
        coach("gesfi", "simulate", "--out", str(heldout), "--raw", "0", "--workers", "2", "--force", *HELDOUT_ARGS)
    if not (c / "calib-heldout.npz").exists():
        calibration_npz(heldout, c / "calib-heldout.npz")
    bundle = c / "bundle"
    if not (bundle / "plan.json").exists() or plan_is_stale(bundle, c / "calib-heldout.npz", c / "calib.npz"):
        step(f"profiling: edge on core 0 (then x{EDGE_SLOWDOWN:g} to stand for a Jetson), cloud on core 1")
        coach("profile", str(model / "model.onnx"), "--out", str(c / "edge.json"), "--device-name", "edge", *PROFILE_ARGS,
              cores="0")
        coach("profile", str(model / "model.onnx"), "--out", str(c / "cloud.json"), "--device-name", "cloud", *PROFILE_ARGS,
              cores="1")
        step("planning: COACH and the baselines over the trace's bandwidth levels, with calibration")
        coach("plan", str(model / "model.onnx"), "--model-name", "gesfi", "--out", str(bundle), "--force",
              "--edge-profile", str(c / "edge.json"), "--cloud-profile", str(c / "cloud.json"),
              "--edge-slowdown", str(EDGE_SLOWDOWN), "--calibration", str(c / "calib-heldout.npz"),
              "--cache-calibration", str(c / "calib.npz"), "--trace", args.trace)
    return bundle


def run(args) -> int:
    from bench.e2e import evaluate, print_table

    t0 = time.perf_counter()
    bundle = prepare(args)
    step(f"running the edge agent through the link emulator ({Path(args.trace).name}) against the cloud service")
    result = evaluate(bundle, [args.trace], f"csi:{args.cache_dir / 'stream.npz'}?loop=1", list_methods(), args.inputs,
                      args.seconds, "const:50", 10.0, args.out,
                      progress=lambda tr, m: print(f"  {m} ...", flush=True), edge_slowdown=EDGE_SLOWDOWN)
    result["edge_slowdown"] = EDGE_SLOWDOWN
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    step("results")
    print_table(result)
    print(f"\nreport: {args.out}/ (table.md, results.json, latency CDFs, bits and cut over time, pipeline.png); "
          f"edge slowed x{EDGE_SLOWDOWN:g}; {time.perf_counter() - t0:.0f} s in all")
    return 0


def list_methods() -> list[str]:
    from bench.e2e import METHODS

    return list(METHODS)
