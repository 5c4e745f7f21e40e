"""Per-node times of an ONNX model on this device, measured with onnxruntime's profiler.

    prof = profile_model("model.onnx", device_name="jetson-orin", providers=["CPUExecutionProvider"])
    save_profile(prof, "edge.json");  prof = load_profile("edge.json", expect_sha256=sha)
    edge_ms = node_times(prof, info)          # {node id: ms} for partitioner.graph's cost graph

How (docs/profile-format.md has the JSON schema):
1. Two sessions run the same random input, each `warmup` times unrecorded then `runs` times with
   onnxruntime profiling on; a node's time is the median over the runs of its kernel time.
   - the *unfused* session (graph optimizations off) runs every original node as its own kernel;
   - the *optimized* session (`optimization`, default "all", what the runtime uses) runs the graph
     onnxruntime really executes, with fused nodes (Conv+BN+Relu -> FusedConv) and layout changes.
2. Optimized kernels are mapped back to original nodes by clusters: an optimized node joins the
   original node that produced a tensor it outputs (or whose id it is named after, or `<t>_nchwc`
   for a tensor t); an original node whose outputs vanished (fused away) joins its consumers; an
   optimized node standing for no original tensor (layout reorders) joins its consumers.
3. A cluster's optimized time is spread over its original compute nodes in proportion to their
   unfused times (evenly when those are all zero). So per-node times sum to what the device really
   spends, and a node inside a fusion still gets its fair share. Constant-like nodes (weights made by
   ConstantOfShape, Shape of a static tensor, ...) get 0: onnxruntime folds them.
4. Whole-segment times (median `model_run` of both sessions) are kept to validate the per-node sums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from coach_runtime.errors import UserError

log = logging.getLogger(__name__)

SCHEMA = "coach.profile"
SCHEMA_VERSION = 1
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

# onnxruntime's profiler names element types like C++ does; the profile uses numpy names.
_ORT_TYPES = {"float": "float32", "double": "float64", "float16": "float16", "int8": "int8",
              "uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32",
              "uint32": "uint32", "int64": "int64", "uint64": "uint64", "bool": "bool"}


class ProfileError(ValueError):
    """A profile file that cannot be used (wrong schema, wrong model, missing nodes)."""


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class NodeProfile:
    """One original graph node: its time on the device (ms) and how it was measured."""

    op: str
    ms: float
    outputs: tuple[str, ...] = ()
    constant: bool = False  # constant-like: folded by onnxruntime, time 0
    unfused_ms: float | None = None  # its own kernel time with graph optimizations off
    cluster: str | None = None  # the optimized kernel(s) it was fused into, when fused
    provider: str = ""


@dataclass(frozen=True)
class Profile:
    model_name: str
    model_sha256: str
    device: dict  # name, providers, host, onnxruntime version, threads
    settings: dict  # runs, warmup, optimization, fusion split rule
    nodes: dict[str, NodeProfile]  # node id (as partitioner.graph names it) -> time
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> {dtype, shape, bytes}
    segments: dict[str, float] = field(default_factory=dict)  # whole-model times, ms
    schema_version: int = SCHEMA_VERSION

    @property
    def node_sum_ms(self) -> float:
        return sum(n.ms for n in self.nodes.values())

    def scaled(self, factor: float, device_name: str | None = None) -> "Profile":
        """Every time multiplied by `factor` (e.g. a desktop profile standing for a slower board)."""
        if not factor > 0:
            raise ValueError(f"scale factor must be > 0, got {factor}")
        nodes = {k: replace(n, ms=n.ms * factor,
                            unfused_ms=None if n.unfused_ms is None else n.unfused_ms * factor)
                 for k, n in self.nodes.items()}
        device = dict(self.device)
        device["scaled_from"] = self.device.get("name", "")
        device["scale"] = factor * float(self.device.get("scale", 1.0))
        if device_name:
            device["name"] = device_name
        segs = {k: v * factor for k, v in self.segments.items()}
        return replace(self, nodes=nodes, device=device, segments=segs)

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "schema_version": self.schema_version,
            "model": {"name": self.model_name, "sha256": self.model_sha256},
            "device": self.device,
            "settings": self.settings,
            "segments": self.segments,
            "nodes": {
                k: {"op": n.op, "ms": n.ms, "outputs": list(n.outputs), "constant": n.constant,
                    "unfused_ms": n.unfused_ms, "cluster": n.cluster, "provider": n.provider}
                for k, n in self.nodes.items()
            },
            "tensors": self.tensors,
        }

    @classmethod
    def from_json(cls, doc: dict, source: str = "profile") -> "Profile":
        def fail(field_name: str, msg: str) -> ProfileError:
            return ProfileError(f"{source}: field '{field_name}': {msg}")

        if not isinstance(doc, dict):
            raise fail("(top level)", "expected a JSON object")
        if doc.get("schema") != SCHEMA:
            raise fail("schema", f"expected '{SCHEMA}', got {doc.get('schema')!r}; not a coach profile")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise fail("schema_version", f"{version!r} is not supported (this coach reads {SCHEMA_VERSION})")
        model = doc.get("model")
        if not isinstance(model, dict) or not isinstance(model.get("sha256"), str):
            raise fail("model.sha256", "missing; a profile names the model it measured by its sha256")
        nodes_doc = doc.get("nodes")
        if not isinstance(nodes_doc, dict) or not nodes_doc:
            raise fail("nodes", "expected a non-empty object of node id -> {op, ms}")
        nodes = {}
        for k, v in nodes_doc.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):  # shorthand: id -> ms
                v = {"ms": v}
            if not isinstance(v, dict):
                raise fail(f"nodes.{k}", "expected an object or a number of milliseconds")
            ms = v.get("ms")
            if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms < 0:
                raise fail(f"nodes.{k}.ms", f"expected a finite number >= 0, got {ms!r}")
            outs = v.get("outputs") or []
            if not isinstance(outs, list) or not all(isinstance(o, str) for o in outs):
                raise fail(f"nodes.{k}.outputs", "expected a list of tensor names")
            unf = v.get("unfused_ms")
            nodes[k] = NodeProfile(
                op=str(v.get("op", "")), ms=float(ms), outputs=tuple(outs),
                constant=bool(v.get("constant", False)),
                unfused_ms=None if unf is None else float(unf),
                cluster=v.get("cluster"), provider=str(v.get("provider", "")),
            )
        for key in ("device", "settings", "segments", "tensors"):
            if not isinstance(doc.get(key, {}), dict):
                raise fail(key, "expected an object")
        return cls(
            model_name=str(model.get("name", "")),
            model_sha256=model["sha256"].lower(),
            device=dict(doc.get("device", {})),
            settings=dict(doc.get("settings", {})),
            nodes=nodes,
            tensors=dict(doc.get("tensors", {})),
            segments={k: float(v) for k, v in doc.get("segments", {}).items() if isinstance(v, (int, float))},
            schema_version=version,
        )


def save_profile(profile: Profile, path: str | Path) -> None:
    """Write the profile JSON atomically (temp file beside it, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(profile.to_json(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_profile(path: str | Path, expect_sha256: str | None = None) -> Profile:
    """Read and validate a profile; with `expect_sha256`, refuse one measured on another model."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{path}: not a JSON profile ({exc})") from None
    prof = Profile.from_json(doc, str(path))
    if expect_sha256 and prof.model_sha256 != expect_sha256.lower():
        raise ProfileError(
            f"{path}: profile is for model sha256 {prof.model_sha256[:12]}..., not this model "
            f"({expect_sha256[:12]}...); profile this model with coach profile"
        )
    return prof


def node_times(profile: Profile, node_ids: list[str], outputs_of: dict[str, tuple[str, ...]],
               source: str = "profile") -> dict[str, float]:
    """{node id: ms} for the given graph nodes. A profile entry matches a node by id, else by the
    node's first output tensor (so a foreign profile keyed by output names works too)."""
    by_output = {}
    for k, n in profile.nodes.items():
        for o in n.outputs[:1] or (k,):
            by_output.setdefault(o, n.ms)
    out, missing = {}, []
    for nid in node_ids:
        n = profile.nodes.get(nid)
        if n is not None:
            out[nid] = n.ms
            continue
        first = (outputs_of.get(nid) or ("",))[0]
        if first in by_output:
            out[nid] = by_output[first]
        else:
            missing.append(nid)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ProfileError(f"{source}: no time for {len(missing)} node(s): {shown}; re-profile this model")
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- onnxruntime helpers


def _ort():
    import onnxruntime as ort

    return ort


def check_providers(providers: list[str] | None) -> list[str]:
    """The providers to use (default: CPU), each one available in this onnxruntime."""
    ort = _ort()
    available = ort.get_available_providers()
    if not providers:
        return ["CPUExecutionProvider"]
    bad = [p for p in providers if p not in available]
    if bad:
        raise UserError(f"execution provider {', '.join(bad)} is not available in this onnxruntime "
                        f"(available: {', '.join(available)}); pick from those with --providers")
    return list(providers)


def session(model: bytes | str, providers: list[str] | None = None, optimization: str = "all",
            threads: int = 0, profile_prefix: str | None = None, optimized_path: str | None = None,
            what: str = "model"):
    """An onnxruntime InferenceSession; a model the providers cannot run is a UserError."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    try:
        return ort.InferenceSession(model, so, providers=check_providers(providers))
    except UserError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, NotImplemented, ...)
        raise UserError(_ort_message(str(exc), what, providers or ["CPUExecutionProvider"])) from None


def _ort_message(msg: str, what: str, providers: list[str]) -> str:
    """One line for an onnxruntime load failure, naming the operator when there is one."""
    msg = " ".join(msg.split())
    where = ", ".join(providers)
    m = re.search(r"implementation for (\S+?)\((\d+)\) node with name '([^']*)'", msg)
    if m:
        return (f"{what}: operator {m.group(1)} (opset {m.group(2)}, node '{m.group(3)}') cannot run on "
                f"{where}; pick other --providers or change the model")
    m = re.search(r"(\S+) is not a registered function/op", msg)
    if m:
        return (f"{what}: operator {m.group(1)} is not known to onnxruntime on {where}; "
                "pick other --providers or change the model")
    return f"{what}: onnxruntime cannot load it: {msg[-240:]}"


_NP_OF_ORT = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(int16)": np.int16}


def random_feed(sess, rng: np.random.Generator, batch: int = 1) -> dict[str, np.ndarray]:
    """Random inputs for a session: floats ~ N(0,1), integers 0, booleans False; symbolic dims -> 1
    (the first one -> `batch`)."""
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else (batch if k == 0 else 1)
                 for k, d in enumerate(i.shape)]
        dtype = _NP_OF_ORT.get(i.type)
        if dtype is None:
            raise UserError(f"model input '{i.name}' has type {i.type}; only tensors of numbers are supported")
        if np.issubdtype(dtype, np.floating):
            feed[i.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[i.name] = np.zeros(shape, dtype)
    return feed


# ---------------------------------------------------------------- measuring


@dataclass
class _Measured:
    node_ms: dict[str, float]  # optimized node name -> median ms per run
    run_ms: float  # median whole-model time
    shapes: dict[str, tuple[str, list[int]]]  # tensor -> (dtype, shape), from the profiler
    providers: dict[str, str]
    optimized: onnx.ModelProto | None


def _measure(model_bytes: bytes, providers: list[str], optimization: str, runs: int, warmup: int,
             threads: int, seed: int, tick: Callable[[], None], names_of: dict[str, list[str]] | None = None,
             what: str = "model") -> _Measured:
    with tempfile.TemporaryDirectory(prefix="coach-profile-") as tmp:
        opt_path = os.path.join(tmp, "optimized.onnx") if optimization != "disable" else None
        try:
            sess = session(model_bytes, providers, optimization, threads, os.path.join(tmp, "ort"),
                           opt_path, what)
        except UserError:
            if opt_path is None:
                raise
            # Some providers compile nodes and cannot save the optimized graph: map coarsely then.
            opt_path = None
            sess = session(model_bytes, providers, optimization, threads, os.path.join(tmp, "ort"), what=what)
        feed = random_feed(sess, np.random.default_rng(seed))
        for _ in range(warmup + runs):
            sess.run(None, feed)
            tick()
        trace = sess.end_profiling()
        events = json.loads(Path(trace).read_text())
        optimized = None
        if opt_path and os.path.exists(opt_path):
            optimized = onnx.load(opt_path, load_external_data=False)

    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[warmup:]
    per_run = [defaultdict(float) for _ in windows]
    shapes: dict[str, tuple[str, list[int]]] = {}
    provs: dict[str, str] = {}
    starts = [w[0] for w in windows]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        k = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if k < 0 or e["ts"] > windows[k][1]:
            continue  # a warm-up run
        per_run[k][name] += e["dur"] / 1000.0
        args = e.get("args", {})
        provs.setdefault(name, args.get("provider", ""))
        if names_of is not None and name in names_of and name not in shapes:
            for out, ts in zip(names_of[name], args.get("output_type_shape", [])):
                if isinstance(ts, dict) and len(ts) == 1:
                    (t, shp), = ts.items()
                    shapes[out] = (_ORT_TYPES.get(t, t), list(shp))
    names = set().union(*per_run) if per_run else set()
    node_ms = {n: statistics.median(r.get(n, 0.0) for r in per_run) for n in names}
    run_ms = statistics.median((b - a) / 1000.0 for a, b in windows) if windows else 0.0
    return _Measured(node_ms, run_ms, shapes, provs, optimized)


def time_model(model: bytes, providers: list[str] | None = None, runs: int = 10, warmup: int = 2,
               optimization: str = "all", threads: int = 0, seed: int = 0, what: str = "model",
               tick: Callable[[], None] | None = None) -> float:
    """Median wall time (ms) of one session.run on random inputs, profiling off."""
    sess = session(model, providers, optimization, threads, what=what)
    feed = random_feed(sess, np.random.default_rng(seed))
    times = []
    for k in range(warmup + runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        if k >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        if tick:
            tick()
    return statistics.median(times)


# ---------------------------------------------------------------- fused kernels -> original nodes


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _subgraph_node_names(node: onnx.NodeProto) -> list[str]:
    names = []
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                names.append(n.name)
                names += _subgraph_node_names(n)
    return names


def map_fused_times(nodes: list[tuple[str, str, list[str], list[str], bool]],
                    unfused_ms: dict[str, float], optimized: onnx.ModelProto | None,
                    optimized_ms: dict[str, float]) -> tuple[dict[str, float], dict[str, str], float]:
    """Spread optimized kernel times over original nodes (see the module doc, step 2-3).

    nodes: (id, op, inputs, outputs, constant) of the original graph in topological order.
    Returns ({id: ms}, {id: cluster label} for nodes fused with others, unattributed ms).
    """
    compute = [n for n in nodes if not n[4]]
    producer = {o: n[0] for n in compute for o in n[3]}
    consumers: dict[str, list[str]] = defaultdict(list)
    for n in compute:
        for i in n[2]:
            if i in producer:
                consumers[producer[i]].append(n[0])
    uf = _UnionFind()
    ids = {n[0] for n in compute}
    for n in compute:
        uf.find("o:" + n[0])

    if optimized is None:  # no optimized graph to look at: one cluster, a uniform rescale
        for n in compute:
            uf.union("o:" + compute[0][0], "o:" + n[0])
        if compute:
            for name in optimized_ms:
                uf.union("o:" + compute[0][0], "g:" + name)
    else:
        onodes = list(optimized.graph.node)
        alias = {}  # subgraph node name -> its top-level control-flow node
        for g in onodes:
            for s in _subgraph_node_names(g):
                alias[s] = g.name
        oproducer = {o: g.name for g in onodes for o in g.output}
        oconsumers: dict[str, list[str]] = defaultdict(list)
        for g in onodes:
            for i in g.input:
                if i in oproducer:
                    oconsumers[oproducer[i]].append(g.name)
        represented = set()
        for g in onodes:
            uf.find("g:" + g.name)
            stands_for = [producer[o] for o in g.output if o in producer]
            if g.name.endswith("_nchwc") and g.name[: -len("_nchwc")] in producer:
                stands_for.append(producer[g.name[: -len("_nchwc")]])
            if g.name in ids:
                stands_for.append(g.name)
            for nid in stands_for:
                uf.union("g:" + g.name, "o:" + nid)
                represented.add(nid)
            if not stands_for:  # a layout reorder or a helper kernel: belongs with its consumers
                for other in oconsumers.get(g.name) or [oproducer[i] for i in g.input if i in oproducer]:
                    uf.union("g:" + g.name, "g:" + other)
        for name in optimized_ms:
            if name in alias:
                uf.union("g:" + name, "g:" + alias[name])
        for n in compute:
            if n[0] not in represented:  # fused away into its consumer(s)
                for c in consumers.get(n[0], []):
                    uf.union("o:" + n[0], "o:" + c)

    cluster_opt: dict[str, float] = defaultdict(float)
    for name, ms in optimized_ms.items():
        cluster_opt[uf.find("g:" + name)] += ms
    members: dict[str, list[str]] = defaultdict(list)
    for n in compute:
        members[uf.find("o:" + n[0])].append(n[0])
    out = {n[0]: 0.0 for n in nodes}
    label = {}
    for root, mids in members.items():
        total = cluster_opt.get(root, 0.0)
        base = sum(unfused_ms.get(m, 0.0) for m in mids)
        for m in mids:
            out[m] = total * (unfused_ms.get(m, 0.0) / base if base > 0 else 1.0 / len(mids))
            if len(mids) > 1:
                label[m] = root[2:]
    unattributed = sum(ms for root, ms in cluster_opt.items() if root not in members)
    return out, label, unattributed


# ---------------------------------------------------------------- the whole thing


def graph_nodes(model: onnx.ModelProto) -> list[tuple[str, str, list[str], list[str], bool]]:
    """(id, op, inputs, outputs, constant-like) of every top-level node, ids as partitioner.graph
    names them."""
    from partitioner.graph import analyze

    return nodes_of(analyze(model))


def nodes_of(info) -> list[tuple[str, str, list[str], list[str], bool]]:
    """(id, op, inputs, outputs, constant-like) from a partitioner.graph.GraphInfo."""
    return [(n.id, n.op, list(n.inputs), list(n.outputs), n.id in info.constant)
            for n in info.all_nodes]


def profile_model(path: str | Path, device_name: str = "", providers: list[str] | None = None,
                  runs: int = 20, warmup: int = 3, optimization: str = "all", threads: int = 0,
                  seed: int = 0, progress: Callable[[int, int], None] | None = None) -> Profile:
    """Measure `path` on this machine (see the module doc). `progress(done, total)` after each run."""
    path = Path(path)
    if runs < 1 or warmup < 0:
        raise UserError(f"--runs must be >= 1 and --warmup >= 0 (got {runs}, {warmup})")
    if optimization not in OPTIMIZATION_LEVELS:
        raise UserError(f"--optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}")
    data, model = read_model(path)
    providers = check_providers(providers)
    nodes = graph_nodes(model)
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for node, (nid, *_rest) in zip(named.graph.node, nodes):
        node.name = nid  # so the profiler's event names are our node ids
    named_bytes = named.SerializeToString()
    total = (2 if optimization == "disable" else 3) * (warmup + runs)
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    outputs_of = {n[0]: n[3] for n in nodes}
    activations = {o for n in nodes if not n[4] for o in n[3]}
    unfused = _measure(named_bytes, providers, "disable", runs, warmup, threads, seed, tick, outputs_of,
                       str(path))
    if optimization == "disable":
        fused = unfused
        times = {n[0]: (0.0 if n[4] else unfused.node_ms.get(n[0], 0.0)) for n in nodes}
        labels, unattributed = {}, 0.0
    else:
        fused = _measure(named_bytes, providers, optimization, runs, warmup, threads, seed, tick, what=str(path))
        times, labels, unattributed = map_fused_times(nodes, unfused.node_ms, fused.optimized, fused.node_ms)
    clean_ms = time_model(named_bytes, providers, runs, warmup, optimization, threads, seed, str(path), tick)

    out_nodes = {
        nid: NodeProfile(op=op, ms=times.get(nid, 0.0), outputs=tuple(outs), constant=const,
                         unfused_ms=None if const else unfused.node_ms.get(nid, 0.0),
                         cluster=labels.get(nid), provider=unfused.providers.get(nid, ""))
        for nid, op, _ins, outs, const in nodes
    }
    tensors = {}
    for name, (dtype, shape) in unfused.shapes.items():
        if name not in activations:
            continue
        itemsize = np.dtype(dtype).itemsize if dtype in _ORT_TYPES.values() else 0
        tensors[name] = {"dtype": dtype, "shape": shape, "bytes": int(math.prod(shape)) * itemsize}
    import onnxruntime as ort

    return Profile(
        model_name=path.stem,
        model_sha256=sha256_bytes(data),
        device={"name": device_name or platform.node() or "unknown", "providers": providers,
                "host": f"{platform.system()} {platform.machine()}", "processor": platform.processor(),
                "onnxruntime": ort.__version__, "threads": threads},
        settings={"runs": runs, "warmup": warmup, "optimization": optimization, "seed": seed,
                  "statistic": "median", "fusion_split": "proportional-to-unfused",
                  "exact_mapping": fused.optimized is not None or optimization == "disable"},
        nodes=out_nodes,
        tensors=tensors,
        segments={"full_ms": clean_ms, "full_profiled_ms": fused.run_ms, "full_unfused_ms": unfused.run_ms,
                  "node_sum_ms": sum(times.values()), "unattributed_ms": unattributed},
    )


def read_model(path: str | Path) -> tuple[bytes, onnx.ModelProto]:
    """The file's bytes and the parsed model; anything that is not an ONNX model is a UserError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; pass an .onnx model") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory; pass an .onnx model file") from None
    try:
        model = onnx.load_model_from_string(data)
        if not model.graph.node:
            raise ValueError("the graph has no nodes")
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError, ...
        msg = " ".join(str(exc).split())[:200]
        raise UserError(f"{path}: not a valid ONNX model ({msg or type(exc).__name__})") from None
    return data, model
