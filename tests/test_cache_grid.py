"""The semantic cache's pooling grid, planner to edge: on a model whose classes live in *where* the
activity is (a quadrant of the image), a global average of the cut tensor says nothing, and the
planner must pick a grid that keeps the layout; the edge, pooling at the bundle's grid, answers
from the cache as the full model would."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from coach_runtime.cli import main
from edge.semantic_cache import CacheConfig, SemanticCache
from protos.bundle import BundleError, load_bundle
from test_plan_cli import write_profile

SIZE = 16


def quadrant_model() -> onnx.ModelProto:
    """x (N, 1, 16, 16) -> 2x2 average (a stride-2 conv) -> Relu -> Flatten -> Gemm: the logit of a
    quadrant is the sum of the activity in it (so the answer is the brightest quadrant)."""
    h = SIZE // 2
    w = np.zeros((4, h * h), np.float32)
    for q in range(4):
        r, c = divmod(q, 2)
        m = np.zeros((h, h), np.float32)
        m[r * h // 2:(r + 1) * h // 2, c * h // 2:(c + 1) * h // 2] = 1.0
        w[q] = m.ravel()
    inits = [numpy_helper.from_array(np.full((1, 1, 2, 2), 0.25, np.float32), "avg_w"),
             numpy_helper.from_array(w, "fc_w"), numpy_helper.from_array(np.zeros(4, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["x", "avg_w"], ["a"], name="avg", strides=[2, 2]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "quadrants", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = np.abs(rng.normal(1.0, 0.5, (n, 1, SIZE, SIZE))).astype(np.float32)
    h = SIZE // 2
    for i, q in enumerate(y):
        r, c = divmod(int(q), 2)
        x[i, 0, r * h:(r + 1) * h, c * h:(c + 1) * h] += rng.uniform(0.5, 1.5)
    return x, y


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("grid")
    data = quadrant_model().SerializeToString()
    (d / "q.onnx").write_bytes(data)
    x, y = blobs(400, seed=0)
    np.savez(d / "calib.npz", x=x, label=y)
    # a slow edge at the classifier and a link too slow for the input: the interior cuts are the plan
    write_profile(d / "edge.json", data, {"avg": 0.5, "relu": 0.1, "flat": 0.1, "fc": 40.0}, "slow-board")
    write_profile(d / "cloud.json", data, {"avg": 0.05, "relu": 0.05, "flat": 0.05, "fc": 0.05}, "gpu-box")
    assert main(["plan", str(d / "q.onnx"), "--out", str(d / "b"), "--edge-profile", str(d / "edge.json"),
                 "--cloud-profile", str(d / "cloud.json"), "--bandwidth", "0.05,0.2", "--no-timing",
                 "--calibration", str(d / "calib.npz")]) == 0
    return load_bundle(d / "b")


def test_planner_keeps_the_layout_where_the_classes_live_in_it(bundle):
    spatial = [c for c in bundle.cuts.values() if c.kind == "interior" and len(c.tensors[0].shape) == 4]
    assert spatial, "the plan kept no cut before the Flatten"
    for cut in spatial:
        spec = bundle.cache_for(cut.id)
        assert spec is not None and spec.grid >= 2, (cut.id, spec and spec.grid)
        assert spec.dim == cut.tensors[0].shape[1] * spec.grid ** 2
        assert spec.hit is not None and spec.hit_rate >= 0.5 and spec.precision >= 0.99


def test_edge_cache_at_the_bundle_grid_answers_like_the_full_model(bundle):
    import onnxruntime as ort

    x, _ = blobs(200, seed=1)  # fresh inputs
    full = ort.InferenceSession(str(bundle.full_path), providers=["CPUExecutionProvider"])
    answers = np.array([full.run(None, {"x": x[i:i + 1]})[0].argmax() for i in range(len(x))])
    cut = next(c for c in bundle.cuts.values() if c.kind == "interior" and len(c.tensors[0].shape) == 4)
    spec = bundle.cache_for(cut.id)
    head = ort.InferenceSession(str(bundle.head_path(cut.id)), providers=["CPUExecutionProvider"])
    cache = SemanticCache(spec.centers, spec.valid, CacheConfig(hit=spec.hit, band=spec.hit, band_bits=None,
                                                                 momentum=None, verify_fraction=0.0), grid=spec.grid)
    hits = right = 0
    for i in range(len(x)):
        t = head.run([cut.tensors[0].name], {"x": x[i:i + 1]})[0]
        d = cache.decide(cache.feature([t]))
        if d.outcome == "hit":
            hits += 1
            right += int(d.cls == answers[i])
    assert hits >= 100 and right / hits >= 0.98


def test_the_global_average_alone_would_answer_nothing(bundle):
    """What the cache did before the grid: the build split's inner hit rate at grid 1 is ~0."""
    for cid, e in bundle.raw["cache"]["cuts"].items():
        if len(bundle.cuts[cid].tensors[0].shape) == 4:
            assert e["grid_hit_rates"]["1"] < 0.1 < 0.5 < e["grid_hit_rates"][str(e["grid"])]


def test_a_grid_that_does_not_match_the_centers_is_refused(bundle, tmp_path):
    """A bundle whose grid was edited (or mixed up) would make the edge compare features of the wrong
    length with the centers: refused on load, naming the field."""
    bad = tmp_path / "b"
    shutil.copytree(bundle.path, bad)
    doc = json.loads((bad / "plan.json").read_text())
    cid = next(c for c, e in doc["cache"]["cuts"].items() if e["grid"] > 1)
    doc["cache"]["cuts"][cid]["grid"] = 1
    (bad / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError) as info:
        load_bundle(bad)
    msg = str(info.value)
    assert f"cache.cuts.{cid}.dim" in msg and "grid 1" in msg and "\n" not in msg
