"""ONNX model -> cost DAG: the graph the planner cuts.

    info = analyze(model)                     # GraphInfo: nodes, tensors, constants, cost DAG
    cut_tensors(info, edge_nodes)             # what a cut sends
    single_tensor_cut_points(info)            # tensors every input-to-output path passes through
    g = cost_graph(info, edge_ms, cloud_ms)   # + per-node times on each device

Public API (kept stable for partitioner.profile / plan_cli):
    analyze(model, input_shapes=None) -> GraphInfo
    cut_tensors(info, edge_nodes) -> tuple[str, ...]
    cut_elements(info, tensors) -> int | None
    is_downset(info, edge_nodes) -> bool
    single_tensor_cut_points(info) -> list[str]
    cost_graph(info, edge_ms, cloud_ms, edge_overhead_ms=0.0, cloud_overhead_ms=0.0) -> CostGraph
    fold_static_shapes(model, info=None) -> onnx.ModelProto
    GraphInfo, Node, Tensor, CostGraph (frozen dataclasses; their dicts are not to be mutated)

Node ids: a node's name when it is non-empty and unique, else "<op>_<index>" (index in
model.graph.node; a suffix is added on a clash). Name the nodes of a copy with these ids before
profiling (GraphInfo.all_nodes is in model.graph.node order) so that profiles match.

Which nodes are *constant-like* (never cut, never sent; each side computes them itself):
- initializers (also when old IR lists them among graph.input) are constant tensors;
- a node is constant-like when every input it reads (its subgraphs' outer-scope references
  included) is constant: Constant, ConstantOfShape of an initializer, Unsqueeze of a weight, ...
  (a node with no inputs at all is constant-like, random generators included);
- Shape/Size of an activation whose shape is static is constant-like (the value is known; use
  fold_static_shapes before splitting so that no tail needs the activation itself).
The cost DAG holds the other nodes that are *live* (some output reaches a model output); dead
nodes are left out (a split drops them). Control-flow nodes (If/Loop/Scan) are atomic nodes whose
inputs include what their bodies read from the outer scope.

A cut is a down-set E of the cost DAG (the nodes run on the edge). It sends the tensors produced in
E (or model inputs) that a cost-DAG node outside E reads, plus the model outputs produced in E
unless E is everything. Edge-only sends nothing; cloud-only sends the model inputs.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

log = logging.getLogger(__name__)

CONTROL_FLOW = ("If", "Loop", "Scan")
SHAPE_OPS = ("Shape", "Size")


@dataclass(frozen=True)
class Node:
    id: str  # unique node id (see module doc)
    op: str  # op_type
    index: int  # position in model.graph.node
    inputs: tuple[str, ...]  # non-empty inputs, then outer-scope references of subgraphs
    outputs: tuple[str, ...]  # non-empty outputs
    domain: str = ""


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int | None, ...] | None  # None: rank unknown; None in a dim: size unknown
    dtype: str | None  # numpy dtype name ("float32"), None if unknown
    elements: int | None  # product of the shape, None if not static
    constant: bool  # known without running the model (weights, static shapes)


@dataclass(frozen=True)
class GraphInfo:
    all_nodes: tuple[Node, ...]  # every top-level node, in model.graph.node order
    order: tuple[str, ...]  # every node id, topological order
    constant: frozenset[str]  # ids of constant-like nodes
    tensors: dict[str, Tensor]  # every named value (inputs, initializers, node outputs)
    inputs: tuple[str, ...]  # real model inputs (initializers excluded)
    outputs: tuple[str, ...]  # model outputs
    compute: tuple[str, ...]  # cost-DAG nodes (not constant-like, live), topological order
    dead: frozenset[str]  # non-constant nodes whose outputs reach no model output
    producer: dict[str, str]  # non-constant tensor -> cost-DAG node producing it
    consumers: dict[str, tuple[str, ...]]  # non-constant tensor -> cost-DAG nodes reading it
    preds: dict[str, tuple[str, ...]]  # cost DAG: node -> nodes it reads from
    succs: dict[str, tuple[str, ...]]  # cost DAG: node -> nodes reading from it
    nodes_by_id: dict[str, Node] = field(repr=False, default_factory=dict)

    def node(self, node_id: str) -> Node:
        return self.nodes_by_id[node_id]

    def elements(self, tensor: str) -> int | None:
        t = self.tensors.get(tensor)
        return None if t is None else t.elements


@dataclass(frozen=True)
class CostGraph:
    info: GraphInfo
    edge_ms: dict[str, float]  # cost-DAG node -> time on the edge device
    cloud_ms: dict[str, float]  # cost-DAG node -> time in the cloud
    edge_overhead_ms: float = 0.0  # fixed cost of running any head on the edge (session call)
    cloud_overhead_ms: float = 0.0  # fixed cost of running any tail in the cloud

    @property
    def total_edge_ms(self) -> float:
        return sum(self.edge_ms[n] for n in self.info.compute)

    @property
    def total_cloud_ms(self) -> float:
        return sum(self.cloud_ms[n] for n in self.info.compute)


# ---------------------------------------------------------------- helpers


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads that it does not define itself (outer-scope references)."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    used: set[str] = set()
    for n in graph.node:
        defined.update(o for o in n.output if o)
        used.update(i for i in n.input if i)
        for sub in _subgraphs(n):
            used |= _outer_refs(sub)
    return used - defined


def _node_ids(model: onnx.ModelProto) -> list[str]:
    names = [n.name for n in model.graph.node]
    counts: dict[str, int] = {}
    for nm in names:
        counts[nm] = counts.get(nm, 0) + 1
    taken = {nm for nm in names if nm and counts[nm] == 1}
    ids = []
    for i, n in enumerate(model.graph.node):
        if n.name and counts[n.name] == 1:
            ids.append(n.name)
            continue
        base = f"{n.op_type}_{i}"
        cand, k = base, 1
        while cand in taken:
            cand, k = f"{base}_{k}", k + 1
        taken.add(cand)
        ids.append(cand)
    return ids


def _value_type(vi: onnx.ValueInfoProto) -> tuple[tuple[int | None, ...] | None, str | None]:
    tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if tt is None:
        return None, None
    dtype = None
    if tt.elem_type:
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        except (KeyError, TypeError, ValueError):
            dtype = None
    if not tt.HasField("shape"):
        return None, dtype
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    return dims, dtype


def _elements(shape: tuple[int | None, ...] | None) -> int | None:
    if shape is None or any(d is None or d < 0 for d in shape):
        return None
    return int(math.prod(shape))


def _with_fixed_inputs(model: onnx.ModelProto, real_inputs: list[str],
                       input_shapes: dict[str, tuple[int, ...]] | None) -> onnx.ModelProto:
    """A copy whose real inputs have a symbolic batch dim fixed to 1 (or the shapes given)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    real = set(real_inputs)
    for vi in m.graph.input:
        if vi.name not in real or not vi.type.HasField("tensor_type"):
            continue
        shape = vi.type.tensor_type.shape
        given = (input_shapes or {}).get(vi.name)
        if given is not None:
            shape.ClearField("dim")
            for d in given:
                shape.dim.add().dim_value = int(d)
            continue
        if len(shape.dim) and not shape.dim[0].HasField("dim_value"):
            shape.dim[0].dim_value = 1
    return m


# ---------------------------------------------------------------- analyze


def analyze(model: onnx.ModelProto,
            input_shapes: dict[str, tuple[int, ...]] | None = None) -> GraphInfo:
    """Analyze an ONNX model into nodes, tensors, constants and the cost DAG (see module doc).

    `input_shapes` fixes the shapes of real inputs (by name); without it a symbolic first (batch)
    dim is taken as 1 and other symbolic dims stay unknown (cuts through tensors of unknown size
    are then not offered by the search)."""
    g = model.graph
    init_names = {t.name for t in g.initializer} | {s.values.name for s in g.sparse_initializer}
    real_inputs = [i.name for i in g.input if i.name not in init_names]
    outputs = tuple(o.name for o in g.output)
    ids = _node_ids(model)

    nodes = []
    for i, (n, nid) in enumerate(zip(g.node, ids)):
        ins = [x for x in n.input if x]
        for sub in _subgraphs(n):
            ins += sorted(r for r in _outer_refs(sub) if r not in ins)
        nodes.append(Node(nid, n.op_type, i, tuple(ins), tuple(o for o in n.output if o), n.domain))
    by_id = {n.id: n for n in nodes}

    # Topological order (Kahn, ties by model position).
    produced_by: dict[str, int] = {}
    for n in nodes:
        for o in n.outputs:
            if o in produced_by:
                raise ValueError(f"tensor '{o}' is produced by two nodes "
                                 f"({nodes[produced_by[o]].id}, {n.id}); not a valid ONNX graph")
            produced_by[o] = n.index
    available = set(real_inputs) | init_names
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for n in nodes:
        deps = {produced_by[x] for x in n.inputs if x not in available and x in produced_by}
        missing = [x for x in n.inputs if x not in available and x not in produced_by]
        if missing:
            raise ValueError(f"node '{n.id}' ({n.op}) reads '{missing[0]}', which no node, input "
                             "or initializer defines; not a valid ONNX graph")
        waiting[n.index] = len(deps)
        for d in deps:
            readers.setdefault(d, []).append(n.index)
    heap = [n.index for n in nodes if waiting[n.index] == 0]
    heapq.heapify(heap)
    topo: list[int] = []
    while heap:
        i = heapq.heappop(heap)
        topo.append(i)
        for r in readers.get(i, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(heap, r)
    if len(topo) != len(nodes):
        stuck = [nodes[i].id for i in range(len(nodes)) if waiting[i] > 0]
        raise ValueError(f"the graph has a cycle through node(s) {', '.join(stuck[:5])}")

    # Shapes and dtypes.
    shaped = _with_fixed_inputs(model, real_inputs, input_shapes)
    try:
        shaped = shape_inference.infer_shapes(shaped)
    except Exception as exc:  # noqa: BLE001 - a model onnx cannot infer still gets analyzed
        log.warning("shape inference failed (%s); tensor sizes unknown", exc)
    vinfos = {}
    for vi in list(shaped.graph.input) + list(shaped.graph.value_info) + list(shaped.graph.output):
        vinfos.setdefault(vi.name, vi)
    types: dict[str, tuple] = {name: _value_type(vi) for name, vi in vinfos.items()}
    for t in g.initializer:
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name if t.data_type else None
        types[t.name] = (tuple(int(d) for d in t.dims), dt)

    # Constant-like nodes, in topological order.
    const_tensors = set(init_names)
    constant: set[str] = set()
    for i in topo:
        n = nodes[i]
        is_const = all(x in const_tensors for x in n.inputs)
        if not is_const and n.op in SHAPE_OPS and n.domain in ("", "ai.onnx") and n.inputs:
            shape = types.get(n.inputs[0], (None, None))[0]
            is_const = shape is not None and all(d is not None for d in shape)
        if is_const:
            constant.add(n.id)
            const_tensors.update(n.outputs)

    # Liveness: non-constant nodes from which a model output is reachable.
    out_set = set(outputs)
    live: set[str] = set()
    needed = set(out_set)
    for i in reversed(topo):
        n = nodes[i]
        if n.id in constant:
            continue
        if any(o in needed for o in n.outputs):
            live.add(n.id)
            needed.update(x for x in n.inputs if x not in const_tensors)
    dead = frozenset(n.id for n in nodes if n.id not in constant and n.id not in live)

    compute = tuple(nodes[i].id for i in topo if nodes[i].id in live)
    producer = {o: nid for nid in compute for o in by_id[nid].outputs}
    consumers: dict[str, list[str]] = {}
    preds: dict[str, list[str]] = {nid: [] for nid in compute}
    succs: dict[str, list[str]] = {nid: [] for nid in compute}
    for nid in compute:
        for x in by_id[nid].inputs:
            if x in const_tensors:
                continue
            if nid not in consumers.setdefault(x, []):
                consumers[x].append(nid)
            p = producer.get(x)
            if p is not None and p not in preds[nid]:
                preds[nid].append(p)
                succs[p].append(nid)

    tensors: dict[str, Tensor] = {}
    names = list(real_inputs) + sorted(init_names) + [o for i in topo for o in nodes[i].outputs]
    for name in names:
        shape, dtype = types.get(name, (None, None))
        tensors[name] = Tensor(name, shape, dtype, _elements(shape), name in const_tensors)

    return GraphInfo(
        all_nodes=tuple(nodes),
        order=tuple(nodes[i].id for i in topo),
        constant=frozenset(constant),
        tensors=tensors,
        inputs=tuple(real_inputs),
        outputs=outputs,
        compute=compute,
        dead=dead,
        producer=producer,
        consumers={k: tuple(v) for k, v in consumers.items()},
        preds={k: tuple(v) for k, v in preds.items()},
        succs={k: tuple(v) for k, v in succs.items()},
        nodes_by_id=by_id,
    )


# ---------------------------------------------------------------- cuts


def is_downset(info: GraphInfo, edge_nodes) -> bool:
    """True when `edge_nodes` are cost-DAG nodes closed under predecessors."""
    e = set(edge_nodes)
    if not e <= set(info.compute):
        return False
    return all(p in e for n in e for p in info.preds[n])


def cut_tensors(info: GraphInfo, edge_nodes) -> tuple[str, ...]:
    """Tensors a cut sends (see module doc), model inputs first, then in topological order."""
    e = set(edge_nodes)
    if len(e) == len(info.compute) and e == set(info.compute):
        return ()
    sent = []
    sources = list(info.inputs) + [o for n in info.compute if n in e for o in info.node(n).outputs]
    for t in sources:
        if t in sent or t not in info.consumers and t not in info.outputs:
            continue
        if any(c not in e for c in info.consumers.get(t, ())) or t in info.outputs:
            sent.append(t)
    return tuple(sent)


def cut_elements(info: GraphInfo, tensors) -> int | None:
    """Sum of the element counts of `tensors`; None when one of them has no static size."""
    total = 0
    for t in tensors:
        n = info.elements(t)
        if n is None:
            return None
        total += n
    return total


def single_tensor_cut_points(info: GraphInfo) -> list[str]:
    """Tensors every input-to-output path passes through, in topological order: the boundaries
    of the cost DAG's topological order where exactly one tensor is live (the sole model input
    and the sole model output count when there is one)."""
    pos = {n: i for i, n in enumerate(info.compute)}
    n = len(info.compute)
    last: dict[str, int] = {}
    first: dict[str, int] = {}
    for t, cons in info.consumers.items():
        last[t] = max(pos[c] for c in cons)
    for t in info.outputs:
        if t in info.producer or t in info.inputs:
            last[t] = n  # read "after the end"
    for t in last:
        first[t] = pos[info.producer[t]] if t in info.producer else -1
    # Live tensors at the boundary after position b (b = -1: before any node).
    starts: dict[int, list[str]] = {}
    for t, f in first.items():
        starts.setdefault(f, []).append(t)
    live: set[str] = set()
    points = []
    for b in range(-1, n):
        live.update(starts.get(b, ()))
        live = {t for t in live if last[t] > b}
        if len(live) == 1:
            points.append(next(iter(live)))
    return points


def cost_graph(info: GraphInfo, edge_ms: dict[str, float], cloud_ms: dict[str, float],
               edge_overhead_ms: float = 0.0, cloud_overhead_ms: float = 0.0) -> CostGraph:
    """Attach per-node times (ms) on each device. Nodes outside the cost DAG are ignored; a
    cost-DAG node missing from a profile is a ValueError naming it."""
    for side, times in (("edge", edge_ms), ("cloud", cloud_ms)):
        missing = [nid for nid in info.compute if nid not in times]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            shown = ", ".join(missing[:5]) + more
            raise ValueError(f"{side} profile has no time for {len(missing)} node(s): {shown}")
        bad = [nid for nid in info.compute if not (math.isfinite(times[nid]) and times[nid] >= 0)]
        if bad:
            raise ValueError(f"{side} profile has a negative or non-finite time for node "
                             f"'{bad[0]}'")
    overheads = (("edge_overhead_ms", edge_overhead_ms), ("cloud_overhead_ms", cloud_overhead_ms))
    for name, v in overheads:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    return CostGraph(
        info=info,
        edge_ms={nid: float(edge_ms[nid]) for nid in info.compute},
        cloud_ms={nid: float(cloud_ms[nid]) for nid in info.compute},
        edge_overhead_ms=float(edge_overhead_ms),
        cloud_overhead_ms=float(cloud_overhead_ms),
    )


# ---------------------------------------------------------------- folding for splits


def fold_static_shapes(model: onnx.ModelProto, info: GraphInfo | None = None) -> onnx.ModelProto:
    """A copy in which every constant-like Shape/Size of an activation is a Constant node (same
    output name, same node name), so that a head or tail extracted at a cut never needs the
    activation only for its shape."""
    info = info or analyze(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n, node in zip(info.all_nodes, m.graph.node):
        if n.op not in SHAPE_OPS or n.id not in info.constant or not n.inputs:
            continue
        src = info.tensors.get(n.inputs[0])
        if src is None or src.constant or src.shape is None:
            continue  # constant already (an initializer's shape): nothing to fold
        dims = np.array(src.shape, dtype=np.int64)
        if n.op == "Size":
            value = np.array(int(np.prod(dims)), dtype=np.int64)
        else:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            r = len(dims)
            start, end = int(attrs.get("start", 0)), int(attrs.get("end", r))
            start = min(max(start + r if start < 0 else start, 0), r)
            end = min(max(end + r if end < 0 else end, 0), r)
            value = dims[start:end]
        const = helper.make_node("Constant", [], [node.output[0]], name=node.name or n.id,
                                 value=numpy_helper.from_array(value, name=""))
        node.CopyFrom(const)
    return m
