"""protos.bundle.load_bundle: a bundle written by `coach plan` loads; a damaged one is a BundleError
naming the file and the field (missing file, wrong hash, bad fields, wrong schema version)."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from coach_runtime.cli import main
from protos.bundle import BundleError, load_bundle


def chain_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(2, 8, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["y"], name="flat")]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bundle")
    data = chain_model().SerializeToString()
    (d / "m.onnx").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    names = ["conv1", "relu1", "pool1", "conv2", "gap", "flat"]
    for side, ms in (("edge", [4, 1, 1, 4, 1, 0.1]), ("cloud", [0.1] * 6)):
        (d / f"{side}.json").write_text(json.dumps({
            "schema": "coach.profile", "schema_version": 1, "model": {"name": "m", "sha256": sha},
            "nodes": dict(zip(names, ms))}))
    out = d / "b"
    assert main(["plan", str(d / "m.onnx"), "--out", str(out), "--edge-profile", str(d / "edge.json"),
                 "--cloud-profile", str(d / "cloud.json"), "--bandwidth", "1,10,100", "--bits", "32,16,8",
                 "--no-timing"]) == 0
    return out


def damaged(src: Path, tmp_path: Path, edit=None, plan_edit=None) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    if plan_edit is not None:
        doc = json.loads((dst / "plan.json").read_text())
        plan_edit(doc)
        (dst / "plan.json").write_text(json.dumps(doc))
    if edit is not None:
        edit(dst)
    return dst


def test_a_good_bundle_loads(bundle_dir):
    b = load_bundle(bundle_dir)
    assert b.plan_sha256 == hashlib.sha256((bundle_dir / "plan.json").read_bytes()).hexdigest()
    assert b.model_name == "m" and b.inputs[0].name == "x" and b.inputs[0].shape == (1, 3, 16, 16)
    assert b.full_path.read_bytes() == (bundle_dir.parent / "m.onnx").read_bytes()
    assert b.cuts["edge-only"].tail is None and b.tail_path("edge-only") is None
    assert b.cuts["cloud-only"].head is None and b.head_path("cloud-only") is None
    assert [t.source for t in b.cuts["cloud-only"].tensors] == ["input"]
    for c in b.cuts.values():
        for p in (b.head_path(c.id), b.tail_path(c.id)):
            assert p is None or p.is_file()
        if c.kind != "edge-only":
            assert c.admissible_bits and c.admissible_bits[0] == 32
    levels = [r.bandwidth_mbps for r in b.plan_table]
    assert levels == [1.0, 10.0, 100.0]
    assert b.row_for_bandwidth(0.2) is b.plan_table[0]  # below every level: the lowest
    assert b.row_for_bandwidth(10.0) is b.plan_table[1]
    assert b.row_for_bandwidth(99.0) is b.plan_table[1]  # conservative: the level not above
    assert b.row_for_bandwidth(1e6) is b.plan_table[2]
    with pytest.raises(KeyError, match="no cut"):
        b.cut("nope")


def _expect(path: Path, *fragments: str):
    with pytest.raises(BundleError) as exc:
        load_bundle(path)
    msg = str(exc.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_files(bundle_dir, tmp_path):
    b = load_bundle(bundle_dir)
    interior = next(c for c in b.cuts.values() if c.kind == "interior")
    d = damaged(bundle_dir, tmp_path, edit=lambda p: (p / interior.tail).unlink())
    _expect(d, interior.tail, "missing", "tail.file")
    shutil.rmtree(d)
    d = damaged(bundle_dir, tmp_path, edit=lambda p: (p / "plan.json").unlink())
    _expect(d, "plan.json", "missing")
    _expect(tmp_path / "nowhere", "not a directory")


def test_wrong_hash(bundle_dir, tmp_path):
    b = load_bundle(bundle_dir)
    interior = next(c for c in b.cuts.values() if c.kind == "interior")

    def flip(p: Path):
        f = p / interior.head
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))

    d = damaged(bundle_dir, tmp_path, edit=flip)
    _expect(d, interior.head, "head.sha256", "does not match")
    shutil.rmtree(d)
    d = damaged(bundle_dir, tmp_path, edit=lambda p: (p / "full.onnx").write_bytes(b"not the model"))
    _expect(d, "full.onnx", "full.sha256")


def _cloud_only(doc: dict) -> dict:
    return next(c for c in doc["cuts"] if c["kind"] == "cloud-only")


@pytest.mark.parametrize("edit, fragments", [
    (lambda d: d.update(schema_version=2), ("schema_version", "upgrade")),
    (lambda d: d["model"].pop("sha256"), ("model.sha256", "missing")),
    (lambda d: _cloud_only(d)["tensors"][0].update(shape=["a"]), ("tensors[0].shape",)),
    (lambda d: _cloud_only(d)["tensors"][0].update(source="edge"), ("tensors[0].source",)),
    (lambda d: d["plan_table"][0].update(bits=5), ("plan_table[0].bits", "5")),
    (lambda d: d["plan_table"][0].update(cut="no-such-cut"), ("plan_table[0].cut", "no-such-cut")),
    (lambda d: d["plan_table"][1].update(period_ms="fast"), ("plan_table[1].period_ms", "number")),
    (lambda d: d["model"]["inputs"][0].update(dtype="complex7"), ("model.inputs[0].dtype",)),
    (lambda d: d.pop("cache"), ("cache", "missing")),
    (lambda d: d.update(cuts=[]), ("cuts", "empty")),
])
def test_bad_fields(bundle_dir, tmp_path, edit, fragments):
    d = damaged(bundle_dir, tmp_path, plan_edit=edit)
    _expect(d, "plan.json", *fragments)


def test_inadmissible_bits_in_a_row_are_refused(bundle_dir, tmp_path):
    def edit(doc):
        row = doc["plan_table"][0]
        cut = next(c for c in doc["cuts"] if c["id"] == row["cut"])
        for q in cut["quantization"]:
            q["admissible"] = q["bits"] == 32
        row["bits"] = 16 if row["bits"] == 32 else row["bits"]

    d = damaged(bundle_dir, tmp_path, plan_edit=edit)
    if json.loads((d / "plan.json").read_text())["plan_table"][0]["cut"] == "edge-only":
        pytest.skip("the lowest level runs edge-only here")
    _expect(d, "plan_table[0].bits", "not admissible")


def test_not_json(bundle_dir, tmp_path):
    d = damaged(bundle_dir, tmp_path, edit=lambda p: (p / "plan.json").write_text("{nope"))
    _expect(d, "plan.json", "not valid JSON")


