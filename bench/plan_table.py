"""COACH vs the five baselines on onnx's nine light models, with profiles measured here.

    .venv/bin/python -m bench.plan_table [--models light_vgg19,...] [--bandwidth 2,8,20]

For each model: `coach profile` (this machine; used as the cloud profile, and scaled by
--edge-slowdown as the edge profile, standing for a Jetson-class board), then `coach plan` with a
small random calibration set (mechanics only: the light models' weights are constant, so their
outputs barely depend on the input) and the bandwidth levels given. Every emitted cut is verified
by coach plan itself. Prints the predicted period / latency of each method per level and writes
bench/results/plan_table.json. Never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("light_bvlc_alexnet", "light_densenet121", "light_inception_v1", "light_inception_v2",
          "light_resnet50", "light_shufflenet", "light_squeezenet", "light_vgg19", "light_zfnet512")
METHODS = ("coach", "edge-only", "cloud-only", "neurosurgeon", "dads", "jalad")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated light model names")
    p.add_argument("--bandwidth", default="2,8,20", help="levels in Mbit/s")
    p.add_argument("--runs", default="5", help="timed runs per profile")
    p.add_argument("--edge-slowdown", default="4", help="edge = this machine's profile times F")
    p.add_argument("--samples", default="8", help="random calibration samples")
    p.add_argument("--keep", help="directory to keep the profiles and bundles in")


def _calibration(model_path: Path, out: Path, samples: int) -> Path:
    import onnx

    from partitioner.graph import analyze

    model = onnx.load(model_path)
    info = analyze(model)
    rng = np.random.default_rng(0)
    arrays = {}
    for name in info.inputs:
        t = info.tensors[name]
        shape = [d if d else 1 for d in (t.shape or ())]
        arrays[name] = rng.standard_normal([samples, *shape]).astype(t.dtype or "float32")
    np.savez(out, **arrays)
    return out


def run(args) -> int:
    import onnx
    from rich.console import Console
    from rich.table import Table

    from coach_runtime.cli import main

    light = Path(onnx.__file__).parent / "backend/test/data/light"
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="coach-plan-table-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"bandwidth_mbps": [float(b) for b in args.bandwidth.split(",")],
               "edge_slowdown": float(args.edge_slowdown), "runs": int(args.runs), "models": {}}
    for name in args.models.split(","):
        path = light / f"{name}.onnx"
        if not path.exists():
            print(f"skip {name}: {path} not found", file=sys.stderr)
            continue
        prof, bundle = work / f"{name}.profile.json", work / f"{name}.bundle"
        t0 = time.perf_counter()
        rc = main(["profile", str(path), "--out", str(prof), "--runs", args.runs,
                   "--device-name", "planning-host"])
        t1 = time.perf_counter()
        calib = _calibration(path, work / f"{name}.calib.npz", int(args.samples))
        rc = rc or main(["plan", str(path), "--out", str(bundle), "--force", "--edge-profile", str(prof),
                         "--cloud-profile", str(prof), "--edge-slowdown", args.edge_slowdown,
                         "--bandwidth", args.bandwidth, "--calibration", str(calib), "--runs", args.runs])
        t2 = time.perf_counter()
        if rc != 0:
            results["models"][name] = {"error": f"exit {rc}"}
            continue
        doc = json.loads((bundle / "plan.json").read_text())
        rows = {}
        for level, row in enumerate(doc["plan_table"]):
            per = {"coach": row} | {m: rs[level] for m, rs in doc["baselines"].items()}
            rows[f"{row['bandwidth_mbps']:g}"] = {
                m: {k: r[k] for k in ("cut", "bits", "edge_ms", "transfer_ms", "cloud_ms", "latency_ms",
                                      "period_ms", "bubble_ratio", "bytes", "accuracy_drop")}
                for m, r in per.items()}
        results["models"][name] = {
            "compute_nodes": sum(1 for n in doc["profiles"]["edge"]["nodes"].values() if not n["constant"]),
            "search_mode": doc["objective"]["search_mode"], "candidates": doc["objective"]["candidates"],
            "accuracy_evaluations": doc["objective"]["accuracy_evaluations"],
            "cuts_verified": len(doc["cuts"]),
            "max_split_error": max(c["validation"]["max_relative_error"] for c in doc["cuts"]),
            "profile_s": round(t1 - t0, 1), "plan_s": round(t2 - t1, 1),
            "full_ms_here": doc["profiles"]["cloud"]["segments"]["full_ms"],
            "node_sum_ms_here": doc["profiles"]["cloud"]["segments"]["node_sum_ms"],
            "prediction_check": [
                {"cut": c["id"], "predicted_head_ms": c["predicted"]["edge_ms"] / float(args.edge_slowdown),
                 "measured_head_ms": c["validation"].get("head_ms"),
                 "predicted_tail_ms": c["predicted"]["cloud_ms"],
                 "measured_tail_ms": c["validation"].get("tail_ms")}
                for c in doc["cuts"]],
            "levels": rows,
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plan_table.json").write_text(json.dumps(results, indent=1))

    table = Table(title="predicted period / latency (ms): COACH vs baselines "
                        f"(edge = this host x{args.edge_slowdown}, cloud = this host)")
    for col in ("model", "Mbit/s", *METHODS, "COACH cut, bits"):
        table.add_column(col, justify="left" if col in ("model", "COACH cut, bits") else "right")
    for name, r in results["models"].items():
        if "error" in r:
            table.add_row(name, "-", r["error"], *[""] * (len(METHODS) + 1))
            continue
        for bw, per in r["levels"].items():
            c = per["coach"]
            table.add_row(name, bw, *[f"{per[m]['period_ms']:.1f}/{per[m]['latency_ms']:.1f}" if m in per else "-"
                                      for m in METHODS], f"{c['cut'].removeprefix('cut-')}, {c['bits']}")
    Console(width=200).print(table)
    print(f"wrote {RESULTS / 'plan_table.json'}; profiles and bundles in {work}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
