"""partitioner.graph: ONNX -> cost DAG on onnx's nine light models and small hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.plan_bench import light_model_path, synthetic_times
from partitioner.graph import (
    analyze,
    cost_graph,
    cut_tensors,
    fold_static_shapes,
    is_downset,
    single_tensor_cut_points,
)
from partitioner.search import frontier, topological_cuts

LIGHT = ["light_bvlc_alexnet", "light_vgg19", "light_resnet50", "light_inception_v1",
         "light_inception_v2", "light_densenet121", "light_shufflenet", "light_squeezenet",
         "light_zfnet512"]


def _model(nodes, inputs, outputs, initializers=(), opset=17, value_info=()):
    g = helper.make_graph(nodes, "t", inputs, outputs, initializer=list(initializers),
                          value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8  # what every onnxruntime of the last years reads
    return m


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _ancestors(info, nid):
    out, stack = {nid}, [nid]
    while stack:
        for p in info.preds[stack.pop()]:
            if p not in out:
                out.add(p)
                stack.append(p)
    return out


# ---------------------------------------------------------------- the nine light models


@pytest.mark.parametrize("name", LIGHT)
def test_light_model(name):
    path = light_model_path(name)
    if not path.exists():
        pytest.skip(f"onnx light model missing: {path}")
    model = onnx.load(str(path))
    info = analyze(model)
    inits = {t.name for t in model.graph.initializer}
    assert len(info.all_nodes) == len(model.graph.node)
    assert [n.index for n in info.all_nodes] == list(range(len(model.graph.node)))
    assert len({n.id for n in info.all_nodes}) == len(info.all_nodes)
    assert len(info.inputs) == 1 and not set(info.inputs) & inits  # old IR lists weights as inputs
    assert info.tensors[info.inputs[0]].elements == 3 * 224 * 224
    made_by_cos = {o for n in info.all_nodes if n.op == "ConstantOfShape" for o in n.outputs}
    assert made_by_cos  # these models make their weights with ConstantOfShape
    assert all(n.id in info.constant for n in info.all_nodes if n.op == "ConstantOfShape")
    assert not set(info.compute) & info.constant
    assert {"Conv"} <= {info.node(n).op for n in info.compute}
    for nid in info.compute:  # every cost-DAG tensor has a known size, batch 1
        for o in info.node(nid).outputs:
            if o in info.consumers or o in info.outputs:
                assert info.tensors[o].elements, (nid, o)

    edge, cloud = synthetic_times(info)
    g = cost_graph(info, edge, cloud)
    cands, mode = frontier(g)
    assert mode in ("exact", "approximate")  # these CNNs are series-parallel
    never = inits | made_by_cos | {t for t, ti in info.tensors.items() if ti.constant}
    for c in cands + topological_cuts(g):
        assert not set(c.tensors) & never, c.tensors
        assert c.tensors == cut_tensors(info, c.edge_nodes)
        assert is_downset(info, c.edge_nodes)

    points = single_tensor_cut_points(info)
    assert points[0] == info.inputs[0] and points[-1] == info.outputs[0]
    interior = points[1:-1]
    assert len(interior) >= 5
    for t in interior:
        assert cut_tensors(info, _ancestors(info, info.producer[t])) == (t,)


# ---------------------------------------------------------------- hand-built graphs


def test_multiple_inputs_and_outputs():
    nodes = [
        helper.make_node("Relu", ["x1"], ["a"], name="ra"),
        helper.make_node("Relu", ["x2"], ["b"], name="rb"),
        helper.make_node("Add", ["a", "b"], ["c"], name="add"),
        helper.make_node("Relu", ["c"], ["y1"], name="ry"),
        helper.make_node("Sigmoid", ["a"], ["y2"], name="sy"),
    ]
    m = _model(nodes, [_f("x1", [1, 8]), _f("x2", [1, 8])], [_f("y1", [1, 8]), _f("y2", [1, 8])])
    info = analyze(m)
    assert info.inputs == ("x1", "x2") and info.outputs == ("y1", "y2")
    assert set(info.compute) == {"ra", "rb", "add", "ry", "sy"}
    assert cut_tensors(info, set()) == ("x1", "x2")  # cloud-only sends every input
    assert cut_tensors(info, set(info.compute)) == ()  # edge-only sends nothing
    assert cut_tensors(info, {"ra"}) == ("x2", "a")
    # A model output made on the edge is sent so that the cloud can return every output.
    assert cut_tensors(info, {"ra", "rb", "add", "ry"}) == ("a", "y1")
    assert not is_downset(info, {"add"})
    assert single_tensor_cut_points(info) == []  # two inputs, two outputs, two paths
    g = cost_graph(info, {n: 1.0 for n in info.compute}, {n: 0.1 for n in info.compute})
    cands, mode = frontier(g)
    assert mode == "exact"
    for c in cands:
        assert c.tensors == cut_tensors(info, c.edge_nodes)


def test_if_node_is_atomic_and_reads_outer_scope():
    then_g = helper.make_graph([helper.make_node("Relu", ["h"], ["t_out"])], "then", [],
                               [_f("t_out", [1, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e_out"])], "else", [],
                               [_f("e_out", [1, 4])])
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["h"], name="sig"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Relu", ["y"], ["z"], name="out"),
    ]
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    m = _model(nodes, [_f("x", [1, 4]), cond], [_f("z", [1, 4])])
    info = analyze(m)
    assert info.node("if").inputs == ("cond", "h")  # the outer-scope read counts as an input
    assert info.compute == ("sig", "if", "out")
    assert info.preds["if"] == ("sig",)
    assert cut_tensors(info, {"sig"}) == ("cond", "h")
    assert cut_tensors(info, {"sig", "if"}) == ("y",)
    # An If that reads only constants is constant-like.
    cnodes = [helper.make_node("Constant", [], ["k"], name="k",
                               value=numpy_helper.from_array(np.array(True))),
              helper.make_node("If", ["k"], ["h"], name="cif", then_branch=helper.make_graph(
                  [helper.make_node("Identity", ["w"], ["t2"])], "t", [], [_f("t2", [1, 4])]),
                  else_branch=helper.make_graph(
                  [helper.make_node("Neg", ["w"], ["e2"])], "e", [], [_f("e2", [1, 4])])),
              helper.make_node("Add", ["x", "h"], ["z"], name="add")]
    w = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    info2 = analyze(_model(cnodes, [_f("x", [1, 4])], [_f("z", [1, 4])], [w]))
    assert {"k", "cif"} <= info2.constant and info2.compute == ("add",)


def test_shape_of_static_activation_is_constant_and_folds():
    ort = pytest.importorskip("onnxruntime")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["s"], name="shape"),
        helper.make_node("Sigmoid", ["r"], ["q"], name="sig"),
        helper.make_node("Flatten", ["q"], ["f"], name="flat"),
        helper.make_node("Reshape", ["f", "s"], ["y"], name="reshape"),
    ]
    m = _model(nodes, [_f("x", [1, 2, 3, 4])], [_f("y", [1, 2, 3, 4])])
    info = analyze(m)
    assert "shape" in info.constant and info.tensors["s"].constant
    assert info.compute == ("relu", "sig", "flat", "reshape")
    assert info.consumers["r"] == ("sig",)  # the Shape node reads r for its shape only
    assert cut_tensors(info, {"relu"}) == ("r",)  # the shape is never sent
    assert cut_tensors(info, {"relu", "sig", "flat"}) == ("f",)
    folded = fold_static_shapes(m, info)
    assert [n.op_type for n in folded.graph.node][1] == "Constant"
    onnx.checker.check_model(folded)
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 4)).astype(np.float32)

    def run(mm):
        sess = ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    np.testing.assert_array_equal(run(m), run(folded))
    # With a symbolic (non-batch) dim the shape is not known: Shape stays a compute node.
    dyn = _model(nodes, [_f("x", ["N", 2, "H", 4])], [_f("y", ["N", 2, "H", 4])])
    dinfo = analyze(dyn)
    assert "shape" not in dinfo.constant and "shape" in dinfo.compute
    assert dinfo.tensors["x"].shape == (1, 2, None, 4)  # batch fixed to 1, H unknown
    assert analyze(dyn, input_shapes={"x": (1, 2, 3, 4)}).tensors["r"].elements == 24


def test_old_ir_initializers_and_constant_of_shape_are_constants():
    shape = numpy_helper.from_array(np.array([4, 4], np.int64), "w_shape")
    bias = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w"], name="",
                         value=numpy_helper.from_array(np.array([0.02], np.float32))),
        helper.make_node("Unsqueeze", ["b"], ["b2"], name="", axes=[0]),
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "b2"], ["y"], name="add"),
        helper.make_node("Relu", ["x"], ["dead"], name="dead"),  # read by nobody
    ]
    inputs = [_f("x", [1, 4]), helper.make_tensor_value_info("w_shape", TensorProto.INT64, [2]),
              _f("b", [4])]
    m = _model(nodes, inputs, [_f("y", [1, 4])], [shape, bias], opset=11)
    m.ir_version = 3
    info = analyze(m)
    assert info.inputs == ("x",)
    assert info.compute == ("mm", "add")
    assert info.dead == frozenset({"dead"})
    ids = [n.id for n in info.all_nodes]
    assert ids[:2] == ["ConstantOfShape_0", "Unsqueeze_1"] and len(set(ids)) == len(ids)
    assert set(ids[:2]) <= info.constant
    assert info.tensors["w"].shape == (4, 4) and info.tensors["w"].constant
    for e in ({"mm"}, set(), {"mm", "add"}):
        assert not {"w", "b", "b2", "w_shape"} & set(cut_tensors(info, e))
    assert cut_tensors(info, set()) == ("x",)
    assert cut_tensors(info, {"mm"}) == ("mm",)


def test_duplicate_and_empty_names_get_unique_ids():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="same"),
             helper.make_node("Relu", ["a"], ["b"], name="same"),
             helper.make_node("Relu", ["b"], ["c"], name=""),
             helper.make_node("Relu", ["c"], ["y"], name="Relu_2")]
    info = analyze(_model(nodes, [_f("x", [1, 4])], [_f("y", [1, 4])]))
    ids = [n.id for n in info.all_nodes]
    assert len(set(ids)) == 4 and ids[3] == "Relu_2"
    assert ids[0] == "Relu_0" and ids[2] != "Relu_2"


def test_cost_graph_names_missing_nodes():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["y"], name="second")]
    info = analyze(_model(nodes, [_f("x", [1, 4])], [_f("y", [1, 4])]))
    with pytest.raises(ValueError, match="second"):
        cost_graph(info, {"first": 1.0}, {"first": 1.0, "second": 1.0})
    with pytest.raises(ValueError, match="negative"):
        cost_graph(info, {"first": 1.0, "second": -1.0}, {"first": 1.0, "second": 1.0})
    g = cost_graph(info, {"first": 1.0, "second": 2.0, "extra": 5.0}, {"first": 0.5, "second": 0.5})
    assert g.total_edge_ms == 3.0 and g.total_cloud_ms == 1.0


def test_invalid_graph_is_a_clear_error():
    nodes = [helper.make_node("Relu", ["missing"], ["y"], name="r")]
    with pytest.raises(ValueError, match="missing"):
        analyze(_model(nodes, [_f("x", [1, 4])], [_f("y", [1, 4])]))
