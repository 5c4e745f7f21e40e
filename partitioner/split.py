"""Split an ONNX model at a cut into head.onnx (edge) and tail.onnx (cloud), and prove the split right.

    types = tensor_types(model)
    s = split_model(model, nodes, "c3", "interior", edge_ids, cut_tensors, types)
    verify_split(model_bytes, s)          # tail(head(x)) == full(x) on random x, or SplitError

A part is extracted by two passes over the graph (nodes are topologically ordered in ONNX):
forward, which tensors the part *can* compute from what it is given (its inputs and initializers)
using only its own compute nodes and constant-like nodes; backward from its outputs, which of those
nodes it *needs*. Constant-like subgraphs (weights made by ConstantOfShape, ...) are therefore copied
into whichever side needs them, both sides if both do. A constant-like Shape/Size whose input lives
on the other side (a Shape of an edge-only activation, read in the tail) is replaced by its value,
known from the static shape. Anything else a part needs but cannot compute means the cut is not a
cut: SplitError naming the tensor.

Cut tensors are either produced by the head (source "head") or model inputs that the tail reads
and the edge forwards as they are (source "input"). Edge-only: head = full model, no tail;
cloud-only: no head, tail = full model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from partitioner.profile import random_feed, session

RTOL = 1e-5


class SplitError(ValueError):
    """A cut that does not split the model cleanly (or whose split does not compute the model)."""


@dataclass(frozen=True)
class TensorType:
    name: str
    dtype: str  # numpy name: float32, int64, ...
    shape: tuple[int, ...]  # -1 for a symbolic or unknown dimension

    @property
    def elements(self) -> int:
        return math.prod(max(d, 1) for d in self.shape)


@dataclass(frozen=True)
class Split:
    cut_id: str
    kind: str  # "edge-only" | "cloud-only" | "interior"
    head: onnx.ModelProto | None
    tail: onnx.ModelProto | None
    tensors: tuple[TensorType, ...]  # the cut tensors, in the order they are sent
    sources: tuple[str, ...]  # per cut tensor: "head" or "input"


# ---------------------------------------------------------------- types


def _np_dtype(elem_type: int) -> str:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:
        return "unknown"


def _from_value_info(vi: onnx.ValueInfoProto) -> TensorType | None:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return TensorType(vi.name, _np_dtype(t.elem_type), shape)


def tensor_types(model: onnx.ModelProto, fill: list[str] | None = None) -> dict[str, TensorType]:
    """dtype and shape of the graph's tensors from shape inference; the names in `fill` that
    inference leaves unknown are measured by running the model once on random inputs."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    g = inferred.graph
    types: dict[str, TensorType] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = _from_value_info(vi)
        if t is not None and t.dtype != "unknown":
            types.setdefault(vi.name, t)
    for init in g.initializer:
        types.setdefault(init.name, TensorType(init.name, _np_dtype(init.data_type), tuple(init.dims)))
    missing = [n for n in (fill or []) if n not in types or -1 in types[n].shape[1:]]
    if missing:
        types.update(runtime_types(model, missing))
    return types


def runtime_types(model: onnx.ModelProto, names: list[str]) -> dict[str, TensorType]:
    """Measure dtype and shape of tensors by exposing them as outputs of one random run."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    sess = session(m.SerializeToString(), optimization="disable", what="model (measuring tensor shapes)")
    outs = sess.run(names, random_feed(sess, np.random.default_rng(0)))
    return {n: TensorType(n, np.asarray(v).dtype.name, tuple(np.asarray(v).shape)) for n, v in zip(names, outs)}


def value_info(t: TensorType) -> onnx.ValueInfoProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
    dims = [d if d >= 0 else f"d{i}" for i, d in enumerate(t.shape)]
    return helper.make_tensor_value_info(t.name, elem, dims)


# ---------------------------------------------------------------- extraction


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs plus outer-scope names used inside its subgraphs."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            names += _outer_refs(g)
    return names


def _outer_refs(g: onnx.GraphProto) -> list[str]:
    defined = {i.name for i in g.input} | {i.name for i in g.initializer}
    refs = []
    for n in g.node:
        for i in node_inputs(n):
            if i not in defined:
                refs.append(i)
        defined.update(n.output)
    return refs


def _shape_value(node: onnx.NodeProto, t: TensorType | None) -> np.ndarray | None:
    """The value of a Shape/Size node from its input's static shape (None when not static)."""
    if t is None or any(d < 0 for d in t.shape):
        return None
    if node.op_type == "Size":
        return np.array(math.prod(t.shape), np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    rank = len(t.shape)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return np.array(t.shape[start:end], np.int64)


def extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str], allowed: set[int],
            constant: set[int], types: dict[str, TensorType], name: str,
            static: dict[str, TensorType] | None = None) -> onnx.ModelProto:
    """The part of `model` that computes `outputs` from `inputs` with the nodes in `allowed`
    (indices into model.graph.node) and any constant-like node (indices in `constant`).
    `static`: static shapes (batch fixed) for folding Shape/Size of the other side's tensors."""
    g = model.graph
    nodes = list(g.node)
    inits = {i.name: i for i in g.initializer}
    given = [i for i in inputs if i not in inits]
    obtainable = set(given) | set(inits) | {""}
    producer: dict[str, int] = {}
    folded: dict[str, np.ndarray] = {}
    for idx, n in enumerate(nodes):
        if idx not in allowed and idx not in constant:
            continue
        if all(i in obtainable for i in node_inputs(n)):
            for o in n.output:
                obtainable.add(o)
                producer[o] = idx
        elif idx in constant and n.op_type in ("Shape", "Size") and n.input:
            value = _shape_value(n, (static or types).get(n.input[0]))
            if value is not None:
                folded[n.output[0]] = value
                obtainable.add(n.output[0])

    needed_nodes: set[int] = set()
    needed_inputs: set[str] = set()
    used_inits: set[str] = set()
    stack = list(outputs)
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen or t == "":
            continue
        seen.add(t)
        if t in given:
            needed_inputs.add(t)
        elif t in folded:
            pass
        elif t in inits:
            used_inits.add(t)
        elif t in producer:
            idx = producer[t]
            if idx not in needed_nodes:
                needed_nodes.add(idx)
                stack.extend(node_inputs(nodes[idx]))
        else:
            raise SplitError(f"{name}: tensor '{t}' is needed but cannot be computed from "
                             f"{len(given)} input(s) with this side's nodes; the cut is not closed")

    graph = helper.make_graph(
        nodes=[nodes[i] for i in sorted(needed_nodes)],
        name=name,
        inputs=[value_info(types[i]) if i in types else onnx.ValueInfoProto(name=i)
                for i in inputs if i in needed_inputs],
        outputs=[value_info(types[o]) if o in types else onnx.ValueInfoProto(name=o) for o in outputs],
        initializer=[i for i in g.initializer if i.name in used_inits]
        + [numpy_helper.from_array(v, k) for k, v in folded.items() if k in seen],
    )
    if model.ir_version < 4:  # old IR: every initializer must also be listed as a graph input
        listed = {i.name for i in graph.input}
        for init in graph.initializer:
            if init.name not in listed:
                graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    keep = {vi.name for vi in g.value_info} & {o for i in needed_nodes for o in nodes[i].output}
    graph.value_info.extend(vi for vi in g.value_info if vi.name in keep and vi.name not in outputs)
    part = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="coach-plan",
                             doc_string=f"{name} (COACH split of {model.graph.name})")
    part.ir_version = model.ir_version
    part.functions.extend(model.functions)
    return part


def split_model(model: onnx.ModelProto, info, cut, types: dict[str, TensorType]) -> Split:
    """Head and tail of one cut. `info`: partitioner.graph.GraphInfo of `model`; `cut`: a
    partitioner.search.CutCandidate (id, kind, edge_nodes, tensors)."""
    model_inputs = list(info.inputs)
    model_outputs = list(info.outputs)
    sources = tuple("input" if t in model_inputs else "head" for t in cut.tensors)
    missing = [t for t in cut.tensors if t not in types]
    if missing:
        raise SplitError(f"cut {cut.id}: no dtype/shape for cut tensor(s) {', '.join(missing)}")
    tensors = tuple(types[t] for t in cut.tensors)
    if cut.kind == "edge-only":
        return Split(cut.id, cut.kind, model, None, (), ())
    if cut.kind == "cloud-only":
        return Split(cut.id, cut.kind, None, model, tensors, sources)
    static = {k: TensorType(k, t.dtype or "unknown", tuple(t.shape))
              for k, t in info.tensors.items()
              if t.shape is not None and all(d is not None for d in t.shape)}
    constant = {n.index for n in info.all_nodes if n.id in info.constant}
    edge = {n.index for n in info.all_nodes if n.id in cut.edge_nodes and n.id not in info.constant}
    cloud = {n.index for n in info.all_nodes if n.id not in cut.edge_nodes and n.id not in info.constant}
    head_outputs = [t for t, s in zip(cut.tensors, sources) if s == "head"]
    head = extract(model, model_inputs, head_outputs, edge, constant, types, f"{cut.id}/head", static)
    tail = extract(model, list(cut.tensors), model_outputs, cloud, constant, types, f"{cut.id}/tail", static)
    return Split(cut.id, cut.kind, head, tail, tensors, sources)


# ---------------------------------------------------------------- verification


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (NaNs must match; non-float tensors must be equal)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return math.inf
    if not np.issubdtype(want.dtype, np.floating):
        return 0.0 if np.array_equal(got, want) else math.inf
    g64, w64 = got.astype(np.float64), want.astype(np.float64)
    nan_g, nan_w = np.isnan(g64), np.isnan(w64)
    if (nan_g != nan_w).any():
        return math.inf
    ok = ~nan_w
    if not ok.any():
        return 0.0
    diff = np.abs(g64[ok] - w64[ok])
    if np.isinf(w64[ok]).any() and not np.array_equal(g64[ok][np.isinf(w64[ok])], w64[ok][np.isinf(w64[ok])]):
        return math.inf
    finite = np.isfinite(w64[ok])
    scale = float(np.max(np.abs(w64[ok][finite]))) if finite.any() else 0.0
    err = float(np.max(diff[finite])) if finite.any() else 0.0
    return err / scale if scale > 0 else err


def check_part(part: onnx.ModelProto, what: str, full_check: bool = True) -> bytes:
    """Serialized part after onnx.checker; SplitError if it fails. `full_check` adds strict shape
    inference (used when the whole model passes it too)."""
    try:
        onnx.checker.check_model(part, full_check=full_check)
    except Exception as exc:
        raise SplitError(f"{what}: fails onnx.checker: {' '.join(str(exc).split())[:200]}") from None
    return part.SerializeToString()


@functools.lru_cache(maxsize=8)
def passes_full_check(model: bytes) -> bool:
    """Does the whole model pass onnx.checker's full check? (Then its parts must too.)"""
    try:
        onnx.checker.check_model(onnx.load_model_from_string(model), full_check=True)
        return True
    except Exception:
        return False


def run_split(head_sess, tail_sess, feed: dict[str, np.ndarray], tensors: tuple[TensorType, ...],
              sources: tuple[str, ...], quantize=None) -> list[np.ndarray]:
    """Outputs of tail(head(feed)); `quantize(name, array) -> array` is applied to each cut tensor."""
    sent = {}
    if head_sess is not None:
        names = [o.name for o in head_sess.get_outputs()]
        head_feed = {i.name: feed[i.name] for i in head_sess.get_inputs()}
        sent.update(zip(names, head_sess.run(names, head_feed)))
    for t, s in zip(tensors, sources):
        if s == "input":
            sent[t.name] = feed[t.name]
    if quantize is not None:
        sent = {k: quantize(k, v) for k, v in sent.items()}
    return tail_sess.run(None, {i.name: sent[i.name] for i in tail_sess.get_inputs()})


def _exposing(model: bytes, names: list[str]) -> bytes:
    """The model with extra graph outputs for inner tensors."""
    m = onnx.load_model_from_string(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return m.SerializeToString()


def verify_split(full: bytes, split: Split, providers: list[str] | None = None, samples: int = 2,
                 rtol: float = RTOL, seed: int = 0) -> tuple[float, bytes | None, bytes | None]:
    """Check head/tail with onnx.checker, load them in onnxruntime and compare tail(head(x)) with
    full(x), and head(x) with the full model's cut tensors, on `samples` random inputs.
    Returns (worst relative error, head bytes, tail bytes)."""
    strict = passes_full_check(full)
    head = check_part(split.head, f"cut {split.cut_id} head", strict) if split.head is not None else None
    tail = check_part(split.tail, f"cut {split.cut_id} tail", strict) if split.tail is not None else None
    full_sess = session(full, providers, what="full model")
    head_sess = session(head, providers, what=f"cut {split.cut_id} head") if head else None
    tail_sess = session(tail, providers, what=f"cut {split.cut_id} tail") if tail else None
    # The cut tensors too, not only the outputs (a model whose outputs barely depend on the input,
    # like onnx's light models with constant weights, would hide a wrong head otherwise).
    inner = [t.name for t, s in zip(split.tensors, split.sources) if s == "head"] if head and tail else []
    probe = None
    if inner:
        probe = session(_exposing(full, inner), providers, optimization="disable", what="full model")
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(samples):
        feed = random_feed(full_sess, rng)
        want = full_sess.run(None, feed)
        if probe is not None:
            expected = dict(zip(inner, probe.run(inner, feed)))
            got_inner = dict(zip([o.name for o in head_sess.get_outputs()],
                                 head_sess.run(None, {i.name: feed[i.name] for i in head_sess.get_inputs()})))
            for name in inner:
                err = relative_error(got_inner[name], expected[name])
                worst = max(worst, err)
                if not err <= rtol:
                    raise SplitError(f"cut {split.cut_id}: head output '{name}' differs from the full "
                                     f"model's tensor (relative error {err:.2e} > {rtol:.0e})")
        if tail_sess is None:
            got = head_sess.run(None, {i.name: feed[i.name] for i in head_sess.get_inputs()})
        else:
            got = run_split(head_sess, tail_sess, feed, split.tensors, split.sources)
        if len(got) != len(want):
            raise SplitError(f"cut {split.cut_id}: the split returns {len(got)} outputs, the model {len(want)}")
        for k, (a, b) in enumerate(zip(got, want)):
            err = relative_error(a, b)
            worst = max(worst, err)
            if not err <= rtol:
                raise SplitError(f"cut {split.cut_id}: output {k} differs from the full model "
                                 f"(relative error {err:.2e} > {rtol:.0e})")
    return worst, head, tail
