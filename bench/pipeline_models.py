"""Models and plan bundles for `coach bench pipeline`, planned with profiles measured on pinned cores.

    per_layer_ms(conv_chain_layer_model, cores={0})          # how fast this machine is
    squeeze_chain("m.onnx", width=64, size=64, head_depth=6)  # a split-computing style toy model
    bundle = plan_pinned("m.onnx", work, edge_cores={0}, cloud_cores={1}, flags=[...])
    find_gesfi()                                               # a trained GesFi ONNX + data, if any

`squeeze_chain` is conv_chain with a bottleneck in the middle: [Conv3x3 + Relu] * head_depth at
`width` channels, a 1x1 Conv squeezing to `squeeze` channels (+ Relu: the small cut tensor), a 1x1
Conv expanding back, [Conv3x3 + Relu] * tail_depth, GlobalAveragePool, Gemm. The input (C_in x S x S)
is larger than the squeezed tensor, so, as in real split computing, cutting at the bottleneck sends
less than sending the input, and the head and the tail both carry real compute.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bench.procs import Proc, coach_argv

GESFI_PLACES = (Path(__file__).resolve().parents[1] / "models" / "gesfi", Path("/tmp/gesfi"))


def smooth_images(n: int, channels: int = 3, size: int = 64, seed: int = 0) -> np.ndarray:
    """n random images (n, C, S, S) in [0, 1]: 4x4 random colour fields upsampled, plus a little noise."""
    rng = np.random.default_rng(seed)
    low = rng.random((n, channels, 4, 4), dtype=np.float32)
    idx = np.minimum((np.arange(size) * 4) // size, 3)
    x = low[:, :, idx][:, :, :, idx]
    x += 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def squeeze_chain(path: str | Path, width: int = 64, size: int = 64, head_depth: int = 6, tail_depth: int = 6,
                  squeeze: int = 1, in_channels: int = 3, classes: int = 10, seed: int = 0,
                  readout_inputs: np.ndarray | None = None) -> Path:
    """Write the model. With `readout_inputs` (N, C_in, S, S), the classifier is fitted to standardized
    pooled features of those inputs (random directions over z-scores), so that its top-1 varies from
    input to input (with random weights and raw features, every input gets the same class)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    state = {"prev": "input", "cin": in_channels, "i": 0}

    def conv(cout: int, k: int) -> None:
        i, cin = state["i"], state["cin"]
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.05).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")])
        pad = k // 2
        nodes.append(helper.make_node("Conv", [state["prev"], f"w{i}", f"b{i}"], [f"conv{i}"], name=f"conv{i}",
                                      pads=[pad] * 4))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        state.update(prev=f"relu{i}", cin=cout, i=i + 1)

    for _ in range(head_depth):
        conv(width, 3)
    conv(squeeze, 1)  # the bottleneck
    conv(width, 1)
    for _ in range(tail_depth):
        conv(width, 3)
    nodes.append(helper.make_node("GlobalAveragePool", [state["prev"]], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    wf = (rng.standard_normal((classes, width)) * 0.5).astype(np.float32)
    bf = np.zeros(classes, np.float32)

    def build(wf: np.ndarray, bf: np.ndarray, outputs: list[str]):
        fc = [numpy_helper.from_array(wf, "wf"), numpy_helper.from_array(bf, "bf")]
        gemm = helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1)
        out_info = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])]
        out_info += [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, width]) for o in outputs]
        graph = helper.make_graph(
            nodes + [gemm], "squeeze_chain",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, in_channels, size, size])],
            out_info, inits + fc)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="coach-bench")
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m

    if readout_inputs is not None:
        s = session_bytes(build(wf, bf, ["flat"]).SerializeToString())
        feats = np.concatenate([s.run(["flat"], {"input": x[None]})[0] for x in readout_inputs])
        mean, std = feats.mean(0), feats.std(0) + 1e-6
        wf = (wf / std).astype(np.float32)
        bf = (-(wf @ mean)).astype(np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(wf, bf, []), str(path))
    return path


def session_bytes(data: bytes, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def median_run_ms(path: str | Path, runs: int = 15, warmup: int = 3) -> float:
    """Median wall time of one run of `path` here (1 thread), random input."""
    s = session(path)
    feeds = {i.name: np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in i.shape],
                                                    dtype=np.float32) for i in s.get_inputs()}
    for _ in range(warmup):
        s.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def full_predictions(path: str | Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Top-1 of the full model for every sample (first axis of each input)."""
    s = session(path)
    n = len(next(iter(inputs.values())))
    out = np.empty(n, np.int64)
    for i in range(n):
        logits = s.run(None, {k: v[i:i + 1] for k, v in inputs.items()})[0]
        out[i] = int(np.argmax(logits))
    return out


def _coach(args: list[str], cores: set[int] | None, what: str, timeout_s: float) -> Proc:
    p = Proc(coach_argv(*args), cores=cores, name=what)
    try:
        rc = p.proc.wait(timeout_s)
    except Exception:
        p.kill9()
        raise RuntimeError(f"{what} took longer than {timeout_s:.0f} s") from None
    if rc != 0:
        raise RuntimeError(f"{what} failed (exit {rc}): " + " | ".join((p.stderr_lines + p.stdout_lines)[-5:]))
    return p


def profile_pinned(model: Path, out: Path, cores: set[int] | None, name: str, runs: int = 10,
                   timeout_s: float = 600.0) -> Path:
    """`coach profile` in a subprocess on `cores`, one intra-op thread (as the edge and cloud run)."""
    _coach(["profile", str(model), "--out", str(out), "--device-name", name, "--threads", "1",
            "--runs", str(runs), "--warmup", "2"], cores, f"coach profile ({name})", timeout_s)
    return out


def plan_pinned(model: Path, out: Path, edge_profile: Path | None, cloud_profile: Path | None,
                flags: list[str], cores: set[int] | None, timeout_s: float = 900.0):
    """`coach plan` in a subprocess (its verification and timing on `cores`); the loaded Bundle."""
    from protos.bundle import load_bundle

    args = ["plan", str(model), "--out", str(out), "--force", *flags]
    if edge_profile is not None:
        args += ["--edge-profile", str(edge_profile)]
    if cloud_profile is not None:
        args += ["--cloud-profile", str(cloud_profile)]
    _coach(args, cores, f"coach plan {model.name}", timeout_s)
    return load_bundle(out)


def _gesfi_data(model: Path) -> Path | None:
    """The dataset a trained GesFi model came from: metrics.json's data.path, else a data.npz near it."""
    metrics = model.parent / "metrics.json"
    places = []
    if metrics.is_file():
        try:
            places.append(Path(json.loads(metrics.read_text())["data"]["path"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    places += [model.parent, model.parent.parent]
    for place in places:
        npz = place if place.suffix == ".npz" else place / "data.npz"
        if npz.is_file():
            return npz
    return None


def find_gesfi(where: Path | None = None) -> tuple[Path, np.ndarray, np.ndarray | None] | None:
    """(model.onnx, images, labels) of a trained GesFi network (`coach gesfi train` output) and its
    dataset (`coach gesfi simulate`: data.npz with X and y), searched in `where` or the usual places."""
    roots = [where] if where is not None else [p for p in GESFI_PLACES if p.is_dir()]
    for root in roots:
        models = [root / "model.onnx"] if (root / "model.onnx").is_file() else sorted(root.rglob("model.onnx"))
        for model in models:
            data = _gesfi_data(model)
            if data is None:
                continue
            try:
                with np.load(data, allow_pickle=False) as z:
                    x = z["X"] if "X" in z.files else z["image"]
                    y = z["y"] if "y" in z.files else z["label"] if "label" in z.files else None
                    x = np.asarray(x, np.float32)
                    y = None if y is None else np.asarray(y, np.int64)
            except (OSError, ValueError, KeyError):
                continue
            if x.ndim == 4:
                return model, x, y
    return None


def plan_doc_summary(bundle) -> dict:
    """What a report needs from a bundle: its plan table and cut quantization tables."""
    cuts = {}
    for cid, c in bundle.cuts.items():
        cuts[cid] = {"kind": c.kind, "edge_ms": c.edge_ms, "cloud_ms": c.cloud_ms,
                     "quantization": [{"bits": q.bits, "bytes": q.bytes, "accuracy_drop": q.accuracy_drop,
                                       "admissible": q.admissible} for q in c.quantization]}
    rows = [{"bandwidth_mbps": r.bandwidth_mbps, "cut": r.cut, "bits": r.bits, "edge_ms": r.edge_ms,
             "transfer_ms": r.transfer_ms, "cloud_ms": r.cloud_ms, "period_ms": r.period_ms,
             "latency_ms": r.latency_ms} for r in bundle.plan_table]
    return json.loads(json.dumps({"cuts": cuts, "plan_table": rows}))
