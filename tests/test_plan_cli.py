"""`coach plan` end to end: a small numpy-trained MLP (accuracy really measured), a light ONNX
model profiled here, a real mahimahi trace, and every user error (exit 2, one line, --out untouched)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from coach_runtime.cli import main
from partitioner.accuracy import quant_axis, quantize
from partitioner.plan_cli import trace_levels
from partitioner.split import TensorType
from protos.bundle import load_bundle

SHARED = Path(__file__).resolve().parents[2] / "shared"
LIGHT = Path(onnx.__file__).parent / "backend/test/data/light"


# ---------------------------------------------------------------- fixtures


def train_mlp(seed=0, d=64, hidden=16, classes=10, n=400, steps=300, spread=0.2):
    """A 2-layer MLP trained with numpy on overlapping Gaussian classes, exported with onnx.helper.
    Its decisions are close enough to each other that 2-3 bit quantization flips some of them."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * spread
    y = rng.integers(0, classes, n)
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    w1, b1 = rng.normal(size=(d, hidden)) * 0.2, np.zeros(hidden)
    w2, b2 = rng.normal(size=(hidden, classes)) * 0.2, np.zeros(classes)
    onehot = np.eye(classes)[y]
    for _ in range(steps):
        z = x @ w1 + b1
        a = np.maximum(z, 0)
        logits = a @ w2 + b2
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / n
        gz = (g @ w2.T) * (z > 0)
        for prm, gr in ((w1, x.T @ gz), (b1, gz.sum(0)), (w2, a.T @ g), (b2, g.sum(0))):
            prm -= 0.5 * gr
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in
             (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
             helper.make_node("Gemm", ["a1", "w2", "b2"], ["logits"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model, x, y


def write_profile(path: Path, model_bytes: bytes, times: dict[str, float], device: str) -> Path:
    """A hand-written (foreign) profile in the documented format, shorthand node -> ms."""
    path.write_text(json.dumps({
        "schema": "coach.profile", "schema_version": 1,
        "model": {"name": "mlp", "sha256": hashlib.sha256(model_bytes).hexdigest()},
        "device": {"name": device}, "nodes": times}))
    return path


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlp")
    model, x, y = train_mlp()
    data = model.SerializeToString()
    (d / "mlp.onnx").write_bytes(data)
    np.savez(d / "calib.npz", x=x, label=y)
    # The edge is slow at the last layer, so edge-only loses and the link is the bottleneck.
    write_profile(d / "edge.json", data, {"fc1": 2.0, "relu1": 0.5, "fc2": 40.0}, "slow-board")
    write_profile(d / "cloud.json", data, {"fc1": 0.05, "relu1": 0.05, "fc2": 0.05}, "gpu-box")
    return d


def plan(d: Path, out: Path, *extra: str) -> int:
    return main(["plan", str(d / "mlp.onnx"), "--out", str(out), "--edge-profile", str(d / "edge.json"),
                 "--cloud-profile", str(d / "cloud.json"), "--bandwidth", "0.05,0.2,5", "--no-timing", *extra])


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


# ---------------------------------------------------------------- success paths


def test_calibration_changes_chosen_bits_and_drops_are_real(mlp, tmp_path, capsys):
    assert plan(mlp, tmp_path / "nocal") == 0
    assert "cannot be measured" in capsys.readouterr().out
    assert plan(mlp, tmp_path / "cal", "--calibration", str(mlp / "calib.npz")) == 0
    nocal, cal = load_bundle(tmp_path / "nocal"), load_bundle(tmp_path / "cal")

    assert all(r.bits in (32, 16) for r in nocal.plan_table)
    low = cal.plan_table[0]  # 0.05 Mbit/s: transfer-bound
    assert low.bits < nocal.plan_table[0].bits
    assert low.period_ms < nocal.plan_table[0].period_ms

    # Every admissible width is within budget, every measured inadmissible one is not.
    for cut in cal.cuts.values():
        for q in cut.quantization:
            if q.admissible and q.accuracy_drop is not None:
                assert q.accuracy_drop <= cal.accuracy_budget
            if not q.admissible:
                assert q.accuracy_drop is None or q.accuracy_drop > cal.accuracy_budget
    assert any(not q.admissible for c in cal.cuts.values() for q in c.quantization), \
        "2-bit quantization of this model should exceed a 0.5 point budget somewhere"

    # Recompute the chosen (cut, bits) drop independently from the bundle's own files.
    import onnxruntime as ort

    cut = cal.cut(low.cut)
    with np.load(mlp / "calib.npz") as z:
        x = z["x"]
    full = ort.InferenceSession(str(cal.full_path), providers=["CPUExecutionProvider"])
    ref = np.array([full.run(None, {"x": x[i:i + 1]})[0].argmax() for i in range(len(x))])
    head = ort.InferenceSession(str(cal.head_path(cut.id)), providers=["CPUExecutionProvider"]) if cut.head else None
    tail = ort.InferenceSession(str(cal.tail_path(cut.id)), providers=["CPUExecutionProvider"])
    agree = 0
    for i in range(len(x)):
        sent = {"x": x[i:i + 1]} if head is None else dict(zip([o.name for o in head.get_outputs()],
                                                              head.run(None, {"x": x[i:i + 1]})))
        t = cut.tensors[0]
        q = {t.name: quantize(sent[t.name], low.bits, t.quant_axis)}
        agree += tail.run(None, q)[0].argmax() == ref[i]
    drop = 100.0 * (1 - agree / len(x))
    assert drop == pytest.approx(low.accuracy_drop, abs=1e-9)
    assert drop <= cal.accuracy_budget


def test_budget_trades_bits_for_accuracy(mlp, tmp_path):
    common = ("--calibration", str(mlp / "calib.npz"))
    assert plan(mlp, tmp_path / "tight", *common, "--accuracy-budget", "0") == 0
    assert plan(mlp, tmp_path / "loose", *common, "--accuracy-budget", "100") == 0
    tight, loose = load_bundle(tmp_path / "tight").plan_table[0], load_bundle(tmp_path / "loose").plan_table[0]
    assert loose.bits == 2  # anything goes: the fewest bytes
    assert tight.bits > loose.bits
    assert tight.accuracy_drop == 0.0


def test_bundle_contents_report_and_baselines(mlp, tmp_path):
    out = tmp_path / "b"
    assert plan(mlp, out, "--calibration", str(mlp / "calib.npz"), "--rate", "20") == 0
    b = load_bundle(out)
    doc = json.loads((out / "plan.json").read_bytes())
    assert b.plan_sha256 == hashlib.sha256((out / "plan.json").read_bytes()).hexdigest()
    assert {"edge-only", "cloud-only"} <= set(b.cuts)
    assert set(b.baselines) == {"edge-only", "cloud-only", "neurosurgeon", "dads", "jalad"}
    assert all(len(rows) == len(b.plan_table) for rows in b.baselines.values())
    used = {r.cut for r in b.plan_table} | {r.cut for rows in b.baselines.values() for r in rows}
    assert used <= set(b.cuts)
    assert doc["objective"]["rate_hz"] == 20.0
    # with calibration data the semantic cache is built for every interior cut (tests/test_plan_cache.py)
    assert set(doc["cache"]["cuts"]) == {c.id for c in b.cuts.values() if c.kind == "interior"}
    assert doc["profiles"]["edge"]["device"]["name"] == "slow-board"
    for c in doc["cuts"]:
        assert c["validation"]["max_relative_error"] <= 1e-5
    report = (out / "report.md").read_text()
    for label in ("COACH", "edge-only", "cloud-only", "Neurosurgeon", "DADS", "JALAD-like"):
        assert f"| {label} |" in report
    assert (out / "pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The prediction is the stage-time formula on the profile sums.
    for r in b.plan_table:
        assert r.latency_ms == pytest.approx(r.edge_ms + r.transfer_ms + r.cloud_ms)
        assert r.period_ms == pytest.approx(max(r.edge_ms, r.transfer_ms, r.cloud_ms))


def test_light_model_profiled_here_every_cut_verified(tmp_path):
    model = LIGHT / "light_squeezenet.onnx"
    if not model.exists():
        pytest.skip("onnx light models not installed")
    out = tmp_path / "sq"
    assert main(["plan", str(model), "--out", str(out), "--runs", "2", "--bandwidth", "2,8,20",
                 "--edge-slowdown", "4", "--no-timing"]) == 0
    b = load_bundle(out)
    doc = json.loads((out / "plan.json").read_bytes())
    assert doc["profiles"]["edge"]["device"]["scale"] == 4.0
    for c in b.cuts.values():
        if c.kind == "interior":
            assert b.head_path(c.id).exists() and b.tail_path(c.id).exists()
    assert all(c["validation"]["max_relative_error"] <= 1e-5 for c in doc["cuts"])


def test_trace_levels_from_a_real_mahimahi_trace(mlp, tmp_path):
    trace = SHARED / "data/traces/ATT-LTE-driving-2016.up"
    if not trace.exists():
        pytest.skip(f"shared trace data not found at {trace}")
    levels, pcts = trace_levels(trace, 5, 1000)
    stamps = np.loadtxt(trace, dtype=np.int64)
    per_s = np.bincount(stamps // 1000)[: stamps[-1] // 1000] * 1500 * 8 / 1e6
    assert levels == sorted(levels) and len(levels) >= 2
    assert per_s.min() - 1e-9 <= levels[0] and levels[-1] <= per_s.max() + 1e-9
    assert levels[len(levels) // 2] == pytest.approx(np.percentile(per_s, pcts[len(levels) // 2]), abs=1e-3)
    out = tmp_path / "t"
    assert main(["plan", str(mlp / "mlp.onnx"), "--out", str(out), "--edge-profile", str(mlp / "edge.json"),
                 "--cloud-profile", str(mlp / "cloud.json"), "--trace", str(trace), "--levels", "5",
                 "--no-timing"]) == 0
    assert [r.bandwidth_mbps for r in load_bundle(out).plan_table] == levels


def test_single_node_model_offers_only_edge_and_cloud(tmp_path, capsys):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="only")], "one",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    (tmp_path / "one.onnx").write_bytes(m.SerializeToString())
    assert main(["plan", str(tmp_path / "one.onnx"), "--out", str(tmp_path / "o"), "--runs", "1",
                 "--bandwidth", "10", "--no-timing"]) == 0
    assert "no valid interior cut" in capsys.readouterr().out
    assert set(load_bundle(tmp_path / "o").cuts) == {"edge-only", "cloud-only"}
    assert "no valid interior cut" in (tmp_path / "o/report.md").read_text()


# ---------------------------------------------------------------- user errors


def _bad_inputs(d: Path, tmp: Path) -> dict[str, list[str]]:
    (tmp / "notonnx.onnx").write_text("this is not a model\n")
    np.savez(tmp / "wrongshape.npz", x=np.zeros((5, 63), np.float32))
    np.savez(tmp / "wrongname.npz", y=np.zeros((5, 64), np.float32))
    other, _, _ = train_mlp(seed=1)
    write_profile(tmp / "other.json", other.SerializeToString(), {"fc1": 1, "relu1": 1, "fc2": 1}, "x")
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="r"),
                           helper.make_node("FooBar", ["r"], ["y"], name="foo", domain="com.example")], "custom",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    custom = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)],
                               ir_version=8)
    (tmp / "custom.onnx").write_bytes(custom.SerializeToString())
    (tmp / "bad.trace").write_text("1\n2\nabc\n")
    m = str(d / "mlp.onnx")
    prof = ["--edge-profile", str(d / "edge.json"), "--cloud-profile", str(d / "cloud.json")]
    return {
        "not onnx": [str(tmp / "notonnx.onnx")],
        "missing model": [str(tmp / "nope.onnx")],
        "calibration shape": [m, *prof, "--calibration", str(tmp / "wrongshape.npz")],
        "calibration names": [m, *prof, "--calibration", str(tmp / "wrongname.npz")],
        "profile hash": [m, "--edge-profile", str(tmp / "other.json"), "--cloud-profile", str(d / "cloud.json")],
        "unknown op": [str(tmp / "custom.onnx"), "--runs", "1"],
        "bad bits": [m, *prof, "--bits", "32,5"],
        "bad bandwidth": [m, *prof, "--bandwidth", "2,-1"],
        "bad rate": [m, *prof, "--rate", "0"],
        "bad budget": [m, *prof, "--accuracy-budget", "lots"],
        "trace and bandwidth": [m, *prof, "--bandwidth", "2", "--trace", str(tmp / "bad.trace")],
        "bad trace": [m, *prof, "--trace", str(tmp / "bad.trace")],
        "bad provider": [m, "--providers", "NoSuchExecutionProvider"],
    }


def test_user_errors_exit_2_one_line_and_leave_out_untouched(mlp, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = snapshot(out)
    for name, argv in _bad_inputs(mlp, tmp_path).items():
        code = main(["plan", *argv, "--out", str(out), "--force", "--no-timing"])
        captured = capsys.readouterr()
        assert code == 2, f"{name}: exit {code}"
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("coach: error: "), f"{name}: {captured.err!r}"
        assert "Traceback" not in captured.err
        assert snapshot(out) == before, f"{name}: --out changed"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".existing.")], f"{name}: temp left"


def test_existing_out_needs_force(mlp, tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert plan(mlp, out) == 2
    assert "--force" in capsys.readouterr().err
    assert plan(mlp, out, "--force") == 0
    assert not (out / "old.txt").exists() and load_bundle(out)


def test_quantize_matches_codec_axis_rule():
    t3 = TensorType("a", "float32", (1, 4, 5))
    assert quant_axis(t3) == 1 and quant_axis(TensorType("b", "float32", (1, 9))) is None
    x = np.random.default_rng(0).normal(size=(1, 4, 5)).astype(np.float32)
    err = np.abs(quantize(x, 8, 1) - x).max()
    assert 0 < err < (x.max() - x.min()) / 255
    assert quantize(x, 32, None) is x
