"""Profiles: measured per-node times (every original node named, constants 0, fused kernels mapped
back), the versioned JSON schema, foreign profiles, model hash checks, and `coach profile`."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from coach_runtime.cli import main
from partitioner.graph import analyze
from partitioner.profile import (SCHEMA, SCHEMA_VERSION, NodeProfile, Profile, ProfileError, load_profile,
                                 map_fused_times, node_times, nodes_of, profile_model, save_profile)

LIGHT = Path(onnx.__file__).parent / "backend/test/data/light"


def conv_model() -> onnx.ModelProto:
    """Conv+BN+Relu blocks (onnxruntime fuses them), a weight made by ConstantOfShape (constant-like),
    and unnamed nodes."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("ConstantOfShape", ["w2_shape"], ["w2"],
                         value=numpy_helper.from_array(np.array([0.01], np.float32))),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(rng.normal(size=(16, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.array([8, 16, 3, 3], np.int64), "w2_shape")]
    inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in
              (("s", rng.uniform(0.5, 1.5, 16)), ("b", rng.normal(size=16)), ("m", rng.normal(size=16)),
               ("v", rng.uniform(0.5, 1.5, 16)))]
    g = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", f, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("y", f, [1, 8, 1, 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    d = tmp_path_factory.mktemp("prof")
    model = conv_model()
    (d / "convs.onnx").write_bytes(model.SerializeToString())
    calls = []
    prof = profile_model(d / "convs.onnx", device_name="test-box", runs=3, warmup=1,
                         progress=lambda done, total: calls.append((done, total)))
    return d, model, prof, calls


def test_every_node_has_a_time_and_constants_are_zero(measured):
    _, model, prof, calls = measured
    info = analyze(model)
    assert set(prof.nodes) == {n.id for n in info.all_nodes}
    for nid, n in prof.nodes.items():
        assert n.ms >= 0 and np.isfinite(n.ms)
        if nid in info.constant:
            assert n.constant and n.ms == 0.0
    compute = [prof.nodes[n] for n in info.compute]
    assert sum(n.ms for n in compute) > 0
    assert all(n.unfused_ms is not None and n.unfused_ms > 0 for n in compute)
    assert prof.segments["node_sum_ms"] == pytest.approx(prof.node_sum_ms)
    assert prof.segments["full_ms"] > 0 and prof.segments["full_unfused_ms"] > 0
    # Conv+BN+Relu run as one fused kernel: they share a cluster label
    c = {prof.nodes[n].cluster for n in info.compute if prof.nodes[n].op in ("Conv", "BatchNormalization", "Relu")}
    assert c - {None}, "expected onnxruntime to fuse Conv/BN/Relu"
    assert calls[-1][0] == calls[-1][1] and len(calls) == calls[-1][1]
    # activation shapes from the run
    conv_out = prof.tensors[info.node(info.compute[0]).outputs[0]]
    assert conv_out["shape"] == [1, 16, 32, 32] and conv_out["bytes"] == 16 * 32 * 32 * 4


def test_schema_roundtrip_and_hash_check(measured, tmp_path):
    d, model, prof, _ = measured
    save_profile(prof, tmp_path / "p.json")
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["schema"] == SCHEMA and doc["schema_version"] == SCHEMA_VERSION
    assert doc["device"]["name"] == "test-box" and len(doc["model"]["sha256"]) == 64
    back = load_profile(tmp_path / "p.json", expect_sha256=prof.model_sha256)
    assert back == prof
    with pytest.raises(ProfileError, match="not this model"):
        load_profile(tmp_path / "p.json", expect_sha256="0" * 64)
    doc["schema_version"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="schema_version"):
        load_profile(tmp_path / "bad.json")
    doc["schema_version"] = 1
    next(iter(doc["nodes"].values()))["ms"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=r"nodes\..*\.ms"):
        load_profile(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ProfileError, match="not a JSON profile"):
        load_profile(tmp_path / "bad.json")


def test_foreign_profile_by_output_names(measured, tmp_path):
    _, model, prof, _ = measured
    info = analyze(model)
    outputs_of = {n.id: n.outputs for n in info.all_nodes}
    # A hand-written profile keyed by each node's first output tensor, shorthand "name: ms".
    foreign = {outputs_of[n][0]: float(i + 1) for i, n in enumerate(info.compute)}
    (tmp_path / "f.json").write_text(json.dumps({"schema": SCHEMA, "schema_version": 1,
                                                 "model": {"sha256": prof.model_sha256}, "nodes": foreign}))
    p = load_profile(tmp_path / "f.json", expect_sha256=prof.model_sha256)
    times = node_times(p, list(info.compute), outputs_of)
    assert times == {n: float(i + 1) for i, n in enumerate(info.compute)}
    short = Profile("m", prof.model_sha256, {}, {}, {info.compute[0]: NodeProfile("Conv", 1.0)})
    with pytest.raises(ProfileError, match="no time for"):
        node_times(short, list(info.compute), outputs_of)


def test_scaled_profile():
    p = Profile("m", "a" * 64, {"name": "desk"}, {}, {"n": NodeProfile("Conv", 2.0, unfused_ms=3.0)},
                segments={"full_ms": 5.0})
    s = p.scaled(3.0, "jetson")
    assert s.nodes["n"].ms == 6.0 and s.nodes["n"].unfused_ms == 9.0 and s.segments["full_ms"] == 15.0
    assert s.device == {"name": "jetson", "scaled_from": "desk", "scale": 3.0}


def test_fused_time_is_spread_in_proportion_to_unfused_times():
    # original: conv -> bn -> relu -> pool ; optimized: FusedConv(conv+bn+relu) -> pool (renamed tensor)
    nodes = [("conv", "Conv", ["x", "w"], ["c"], False), ("bn", "BatchNormalization", ["c"], ["n"], False),
             ("relu", "Relu", ["n"], ["r"], False), ("pool", "MaxPool", ["r"], ["p"], False),
             ("wgen", "ConstantOfShape", ["s"], ["w"], True)]
    g = helper.make_graph([helper.make_node("FusedConv", ["x", "w"], ["r"], name="conv", domain="com.microsoft"),
                           helper.make_node("ReorderInput", ["r"], ["tmp"], name="reorder"),
                           helper.make_node("MaxPool", ["tmp"], ["p"], name="pool")], "opt", [], [])
    opt = helper.make_model(g)
    times, labels, unattributed = map_fused_times(
        nodes, {"conv": 6.0, "bn": 1.0, "relu": 1.0, "pool": 2.0},
        opt, {"conv": 4.0, "reorder": 0.5, "pool": 1.0})
    assert times["conv"] == pytest.approx(3.0) and times["bn"] == pytest.approx(0.5)
    assert times["relu"] == pytest.approx(0.5)
    assert times["pool"] == pytest.approx(1.5)  # the reorder kernel belongs to its consumer
    assert times["wgen"] == 0.0 and unattributed == 0.0
    assert labels["conv"] == labels["bn"] == labels["relu"] and "pool" not in labels
    # without an optimized graph: one cluster, a uniform rescale of the unfused times
    times, _, _ = map_fused_times(nodes, {"conv": 6.0, "bn": 1.0, "relu": 1.0, "pool": 2.0}, None, {"k": 5.0})
    assert sum(times.values()) == pytest.approx(5.0) and times["conv"] == pytest.approx(3.0)


def test_light_model_fusions_map_back():
    path = LIGHT / "light_resnet50.onnx"
    if not path.exists():
        pytest.skip("onnx light models not installed")
    prof = profile_model(path, runs=1, warmup=0)
    info = analyze(onnx.load(path))
    assert all(prof.nodes[n].constant for n in info.constant)
    assert sum(1 for n in info.compute if prof.nodes[n].ms > 0) >= 0.9 * len(info.compute)
    assert node_times(prof, list(info.compute), {n.id: n.outputs for n in info.all_nodes})


def test_coach_profile_cli(measured, tmp_path, capsys):
    d, model, _, _ = measured
    out = tmp_path / "edge.json"
    assert main(["profile", str(d / "convs.onnx"), "--out", str(out), "--runs", "2", "--warmup", "0",
                 "--device-name", "bench"]) == 0
    p = load_profile(out)
    assert p.device["name"] == "bench" and p.settings["runs"] == 2
    assert nodes_of(analyze(model))[0][0] in p.nodes
    capsys.readouterr()
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01junk")
    for argv in (["profile", str(tmp_path / "junk.onnx"), "--out", str(tmp_path / "x.json")],
                 ["profile", str(d / "convs.onnx"), "--out", str(tmp_path / "x.json"), "--runs", "0"],
                 ["profile", str(d / "convs.onnx"), "--out", str(tmp_path / "x.json"), "--providers", "NopeProvider"],
                 ["profile", str(d / "convs.onnx"), "--out", str(tmp_path / "no/dir/x.json")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("coach: error: "), err
        assert not (tmp_path / "x.json").exists()
