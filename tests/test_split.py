"""Splitting at cuts: tail(head(x)) == full(x) on light ONNX models and on small hand-made graphs
(two inputs and two outputs, a Shape of an edge-only activation read in the tail), every cut."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from partitioner.graph import analyze, cost_graph
from partitioner.search import enumerate_downsets, frontier, topological_cuts
from partitioner.split import SplitError, relative_error, split_model, tensor_types, verify_split

LIGHT = Path(onnx.__file__).parent / "backend/test/data/light"


def _init(rng, name, *shape):
    return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)


def two_by_two() -> onnx.ModelProto:
    """Inputs a, b; outputs y (late) and z (early, from the edge side). The tail reshapes with a
    Shape of `ha`, an activation that only the edge may have."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["a", "wa"], ["ha0"], name="mm_a"),
        helper.make_node("Relu", ["ha0"], ["ha"], name="relu_a"),
        helper.make_node("MatMul", ["b", "wb"], ["hb"], name="mm_b"),
        helper.make_node("Tanh", ["hb"], ["tb"], name="tanh_b"),
        helper.make_node("Add", ["ha", "tb"], ["s"], name="add"),
        helper.make_node("Shape", ["ha"], ["ha_shape"], name="shape_of_ha"),
        helper.make_node("Flatten", ["s"], ["flat"], name="flatten"),
        helper.make_node("Reshape", ["flat", "ha_shape"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "wo"], ["y0"], name="mm_out"),
        helper.make_node("Softmax", ["y0"], ["y"], name="softmax", axis=-1),
        helper.make_node("Mul", ["ha", "two"], ["z"], name="double_a"),
    ]
    graph = helper.make_graph(
        nodes, "two_by_two",
        [helper.make_tensor_value_info("a", f, [1, 6]), helper.make_tensor_value_info("b", f, [1, 5])],
        [helper.make_tensor_value_info("y", f, [1, 4]), helper.make_tensor_value_info("z", f, [1, 8])],
        [_init(rng, "wa", 6, 8), _init(rng, "wb", 5, 8), _init(rng, "wo", 8, 4),
         numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _cost(info):
    return cost_graph(info, {n: 1.0 for n in info.compute}, {n: 0.5 for n in info.compute})


def test_every_cut_of_a_two_input_two_output_model():
    model = two_by_two()
    data = model.SerializeToString()
    info = analyze(model)
    assert "shape_of_ha" in info.constant  # a Shape of a static tensor: known without running
    types = tensor_types(model)
    cuts = enumerate_downsets(_cost(info))
    kinds = {c.kind for c in cuts}
    assert kinds == {"edge-only", "cloud-only", "interior"} and len(cuts) > 10
    shape_folded = 0
    for cut in cuts:
        split = split_model(model, info, cut, types)
        err, head, tail = verify_split(data, split, samples=2)
        assert err <= 1e-5
        if split.tail is not None and cut.kind == "interior":
            tail_ops = {n.op_type for n in split.tail.graph.node}
            if "reshape" not in cut.edge_nodes and "relu_a" in cut.edge_nodes and "ha" not in cut.tensors:
                # the tail reshapes by ha's shape without having ha: the Shape became a constant
                assert "Shape" not in tail_ops
                assert "ha_shape" in {i.name for i in split.tail.graph.initializer}
                shape_folded += 1
        if cut.kind == "interior":
            # model inputs the tail reads travel as they are ("input"), the rest come from the head
            for t, s in zip(split.tensors, split.sources):
                assert (s == "input") == (t.name in ("a", "b"))
            head_outs = [o.name for o in split.head.graph.output]
            assert head_outs == [t.name for t, s in zip(split.tensors, split.sources) if s == "head"]
            assert [o.name for o in split.tail.graph.output] == ["y", "z"]
    assert shape_folded > 0


def test_verification_catches_a_wrong_tail():
    model = two_by_two()
    info = analyze(model)
    types = tensor_types(model)
    cut = next(c for c in enumerate_downsets(_cost(info)) if c.kind == "interior" and "mm_out" not in c.edge_nodes)
    split = split_model(model, info, cut, types)
    for init in split.tail.graph.initializer:
        if init.name == "wo":
            w = numpy_helper.to_array(init).copy()
            w[0, 0] += 0.5
            init.CopyFrom(numpy_helper.from_array(w, "wo"))
    with pytest.raises(SplitError, match="differs from the full model"):
        verify_split(model.SerializeToString(), split)

    # a wrong head is caught at the cut tensors themselves
    split = split_model(model, info, cut, types)
    head_inits = {i.name: i for i in split.head.graph.initializer}
    name = next(n for n in ("wa", "wb") if n in head_inits)
    w = numpy_helper.to_array(head_inits[name]).copy()
    w *= 1.01
    head_inits[name].CopyFrom(numpy_helper.from_array(w, name))
    with pytest.raises(SplitError, match="head output"):
        verify_split(model.SerializeToString(), split)


def test_a_cut_that_is_not_closed_is_refused():
    model = two_by_two()
    info = analyze(model)
    types = tensor_types(model)
    good = next(c for c in enumerate_downsets(_cost(info)) if c.kind == "interior" and len(c.edge_nodes) >= 2)
    from dataclasses import replace

    bad = replace(good, tensors=good.tensors[1:] if len(good.tensors) > 1 else ("a",))
    with pytest.raises(SplitError):
        s = split_model(model, info, bad, types)
        verify_split(model.SerializeToString(), s)


def test_relative_error():
    a = np.array([1.0, -2.0, 4.0], np.float32)
    assert relative_error(a, a) == 0
    assert relative_error(a + np.float32(4e-4), a) == pytest.approx(1e-4, rel=1e-2)
    assert relative_error(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])) == 0
    assert relative_error(np.array([np.nan, 1.0]), np.array([0.0, 1.0])) == np.inf
    assert relative_error(np.array([1, 2]), np.array([1, 3])) == np.inf
    assert relative_error(a[:2], a) == np.inf


@pytest.mark.parametrize("name", ["light_squeezenet", "light_inception_v1", "light_resnet50"])
def test_light_models_cuts_verify(name):
    path = LIGHT / f"{name}.onnx"
    if not path.exists():
        pytest.skip("onnx light models not installed")
    data = path.read_bytes()
    model = onnx.load_model_from_string(data)
    info = analyze(model)
    types = tensor_types(model)
    g = _cost(info)
    cands, _ = frontier(g)
    chain = topological_cuts(g)
    picked = [c for c in cands if c.kind == "interior"][:: max(1, len(cands) // 3)][:3]
    picked += [chain[len(chain) // 2]]  # a chain cut too (Neurosurgeon's kind)
    for cut in picked:
        split = split_model(model, info, cut, types)
        err, head, tail = verify_split(data, split, samples=1)
        assert err <= 1e-5
        h, t = onnx.load_model_from_string(head), onnx.load_model_from_string(tail)
        # initializers (weights made by ConstantOfShape) are constants: never sent
        assert not set(cut.tensors) & {i.name for i in model.graph.initializer}
        assert {i.name for i in t.graph.input if i.name not in {x.name for x in t.graph.initializer}} == set(cut.tensors)
        assert len(h.graph.node) + len(t.graph.node) >= len(info.compute)


def test_control_flow_node_reads_outer_scope_across_the_cut():
    """An If whose branches read an activation from the outer scope: that activation is a cut
    tensor when the If runs in the cloud."""
    f = TensorProto.FLOAT
    then_g = helper.make_graph([helper.make_node("Mul", ["h", "h"], ["o_then"])], "then", [],
                               [helper.make_tensor_value_info("o_then", f, [1, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["o_else"])], "else", [],
                               [helper.make_tensor_value_info("o_else", f, [1, 4])])
    nodes = [helper.make_node("Tanh", ["x"], ["h"], name="tanh"),
             helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["y0"], name="branch", then_branch=then_g, else_branch=else_g),
             helper.make_node("Relu", ["y0"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "cf", [helper.make_tensor_value_info("x", f, [1, 4])],
                          [helper.make_tensor_value_info("y", f, [1, 4])],
                          [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    info = analyze(model)
    types = tensor_types(model)
    seen_h_sent = False
    for cut in enumerate_downsets(_cost(info)):
        split = split_model(model, info, cut, types)
        err, _, _ = verify_split(data, split, samples=3, seed=1)
        assert err <= 1e-5
        if "tanh" in cut.edge_nodes and "branch" not in cut.edge_nodes:
            assert "h" in cut.tensors  # read inside the If's branches
            seen_h_sent = True
    assert seen_h_sent
