"""Load and validate a plan bundle (the directory `coach plan` writes; `coach edge`/`coach cloud` read).

    bundle = load_bundle("out/bundle")        # raises BundleError naming the file and the field
    bundle.plan_sha256                        # sha256 of plan.json's bytes (InferRequest.plan_sha256)
    cut = bundle.cuts["c3"]                   # CutSpec: cut tensors, head/tail files, quantization
    bundle.head_path("c3"), bundle.tail_path("c3"), bundle.full_path
    row = bundle.row_for_bandwidth(5.0)       # PlanRow: which cut and bits at 5 Mbit/s
    spec = bundle.cache_for("c3")             # CacheSpec (centers, valid, hit, band, band_bits) or None

Layout (docs/plan-bundle.md has the full schema):

    plan.json            schema_version, model, objective, cuts, plan_table, baselines, cache, profiles
    full.onnx            the unmodified model (fallback)
    cuts/<id>/head.onnx  runs on the edge (absent for cloud-only)
    cuts/<id>/tail.onnx  runs in the cloud (absent for edge-only)
    centers.npz          semantic-cache centers per cut (only when plan.json's cache is not null)
    report.md, pipeline.png

Validation on load: schema version, required fields and their types, every file named in plan.json
present with the sha256 it declares, plan rows naming known cuts and admissible bit widths, the
semantic-cache section and the shapes of its centers.
This module is shared by edge, cloud and partitioner and imports only json, hashlib and numpy.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protos.semantic import pool

SCHEMA_VERSION = 1
PLAN_FILE = "plan.json"
BITS = (32, 16, 8, 6, 4, 3, 2)
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int32", "int64", "bool")
CUT_KINDS = ("edge-only", "cloud-only", "interior")
SOURCES = ("head", "input")
# protos.semantic.pool: version 1 is the global average; version 2 adds a per-cut `grid` (GxG cell averages)
POOLING = "gap-l2/2"
POOLINGS = ("gap-l2/1", POOLING)  # what this coach reads


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and the field."""


# ---------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class TensorSpec:
    """A graph tensor: name, dtype, shape (-1 for a symbolic dimension).

    For cut tensors: `source` is "head" (an output of head.onnx) or "input" (a model input the edge
    forwards as is), and `quant_axis` the channel axis the planner quantized along (None: per tensor).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str = "head"
    quant_axis: int | None = None

    @property
    def elements(self) -> int:
        return math.prod(max(d, 1) for d in self.shape)


@dataclass(frozen=True)
class QuantEntry:
    """One bit width of a cut: payload bytes, measured accuracy drop (percentage points; None when
    not measured), and whether the planner admits it under the accuracy budget."""

    bits: int
    bytes: int
    accuracy_drop: float | None
    admissible: bool


@dataclass(frozen=True)
class CutSpec:
    """A cut the bundle carries: what the edge runs and sends, what the cloud runs."""

    id: str
    kind: str  # "edge-only" | "cloud-only" | "interior"
    tensors: tuple[TensorSpec, ...]  # what crosses the link, in this order
    head: str | None  # path relative to the bundle, None for cloud-only
    head_sha256: str | None
    tail: str | None  # None for edge-only
    tail_sha256: str | None
    edge_ms: float  # predicted head time on the edge device
    cloud_ms: float  # predicted tail time on the cloud device
    quantization: tuple[QuantEntry, ...]
    edge_nodes: int = 0

    @property
    def admissible_bits(self) -> tuple[int, ...]:
        """Bit widths the planner admits for this cut, highest first."""
        return tuple(sorted((q.bits for q in self.quantization if q.admissible), reverse=True))

    @property
    def min_bits(self) -> int | None:
        bits = self.admissible_bits
        return bits[-1] if bits else None

    def bytes_at(self, bits: int) -> int:
        for q in self.quantization:
            if q.bits == bits:
                return q.bytes
        raise KeyError(f"cut {self.id}: no quantization entry for {bits} bits")


@dataclass(frozen=True)
class PlanRow:
    """The plan at one bandwidth level (also used for the baselines' plans)."""

    bandwidth_mbps: float
    cut: str
    bits: int
    edge_ms: float
    transfer_ms: float
    cloud_ms: float
    latency_ms: float
    period_ms: float
    bubble_ratio: float
    bytes: int
    accuracy_drop: float | None


@dataclass(frozen=True)
class CacheSpec:
    """The semantic cache of one cut: label centers of pooled cut features (protos.semantic) and
    margin thresholds calibrated offline. margin >= hit: answer from the cache; band <= margin < hit:
    send at band_bits; else send as usual. hit None: no threshold reached the target precision."""

    cut_id: str
    centers: np.ndarray  # (K, D) float32, L2-normalised rows (zero rows where not valid); read-only
    valid: np.ndarray  # (K,) bool: classes that have a center; read-only
    hit: float | None
    band: float | None  # None: no band
    band_bits: int | None
    target_precision: float
    precision: float | None  # of cache answers on the held-out split (None: no hit threshold)
    hit_rate: float
    band_rate: float
    band_drop: float | None
    held_out: int
    pooling: str = POOLING
    grid: int = 1  # protos.semantic.pool's grid (1: global average)

    @property
    def num_classes(self) -> int:
        return int(self.centers.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centers.shape[1])


@dataclass(frozen=True)
class Bundle:
    path: Path
    plan_sha256: str
    schema_version: int
    model_name: str
    model_sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cuts: dict[str, CutSpec]
    plan_table: tuple[PlanRow, ...]  # sorted by bandwidth, ascending
    baselines: dict[str, tuple[PlanRow, ...]]  # method -> one row per plan-table level
    rate_hz: float | None
    accuracy_budget: float
    cache: dict | None  # plan.json's cache section as written (None: no semantic cache)
    raw: dict = field(repr=False)  # the whole plan.json, for fields this loader does not model
    caches: dict[str, CacheSpec] = field(default_factory=dict, repr=False)  # cut id -> its cache

    def cache_for(self, cut_id: str) -> CacheSpec | None:
        """The semantic cache of a cut (None: the bundle has none for it)."""
        return self.caches.get(cut_id)

    @property
    def full_path(self) -> Path:
        return self.path / self.raw["full"]["file"]

    def cut(self, cut_id: str) -> CutSpec:
        try:
            return self.cuts[cut_id]
        except KeyError:
            raise KeyError(f"bundle {self.path}: no cut '{cut_id}'; cuts: {', '.join(self.cuts)}") from None

    def head_path(self, cut_id: str) -> Path | None:
        c = self.cut(cut_id)
        return None if c.head is None else self.path / c.head

    def tail_path(self, cut_id: str) -> Path | None:
        c = self.cut(cut_id)
        return None if c.tail is None else self.path / c.tail

    def row_for_bandwidth(self, mbps: float) -> PlanRow:
        """The row of the highest level not above `mbps` (the lowest level below all of them)."""
        rows = self.plan_table
        best = rows[0]
        for r in rows:
            if r.bandwidth_mbps <= mbps:
                best = r
        return best

    def file_path(self, relpath: str) -> Path:
        return self.path / relpath

    def load_npz(self, relpath: str) -> dict[str, np.ndarray]:
        """Arrays of an .npz file of the bundle (e.g. the cache's centers), without pickle."""
        with np.load(self.path / relpath, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


# ---------------------------------------------------------------- helpers


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Reader:
    """Typed access to plan.json fields; every failure names the file and the dotted field."""

    def __init__(self, file: Path):
        self.file = file

    def fail(self, where: str, msg: str) -> BundleError:
        return BundleError(f"{self.file}: field '{where}': {msg}")

    def get(self, obj: dict, key: str, where: str, types, optional: bool = False) -> Any:
        path = f"{where}.{key}" if where else key
        if not isinstance(obj, dict):
            raise self.fail(where or "(top level)", "expected an object")
        if key not in obj:
            if optional:
                return None
            raise self.fail(path, "missing")
        v = obj[key]
        if v is None and optional:
            return None
        if isinstance(v, bool) and bool not in _as_tuple(types):
            raise self.fail(path, f"expected {_type_names(types)}, got a boolean")
        if not isinstance(v, types):
            raise self.fail(path, f"expected {_type_names(types)}, got {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise self.fail(path, "must be a finite number")
        return v

    def number(self, obj: dict, key: str, where: str, optional: bool = False, minimum: float = 0.0):
        v = self.get(obj, key, where, (int, float), optional)
        if v is not None and v < minimum:
            raise self.fail(f"{where}.{key}", f"must be >= {minimum}, got {v}")
        return None if v is None else float(v)


def _as_tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _type_names(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
             bool: "a boolean"}
    return " or ".join(names.get(t, t.__name__) for t in _as_tuple(types))


def _tensor(r: _Reader, obj: dict, where: str, cut_tensor: bool) -> TensorSpec:
    name = r.get(obj, "name", where, str)
    if not name:
        raise r.fail(f"{where}.name", "must not be empty")
    dtype = r.get(obj, "dtype", where, str)
    if dtype not in DTYPES:
        raise r.fail(f"{where}.dtype", f"'{dtype}' is not one of {', '.join(DTYPES)}")
    shape = r.get(obj, "shape", where, list)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape):
        raise r.fail(f"{where}.shape", f"expected a list of integers >= -1, got {shape}")
    source, axis = "head", None
    if cut_tensor:
        source = r.get(obj, "source", where, str)
        if source not in SOURCES:
            raise r.fail(f"{where}.source", f"'{source}' is not one of {', '.join(SOURCES)}")
        axis = r.get(obj, "quant_axis", where, int, optional=True)
        if axis is not None and not 0 <= axis < max(len(shape), 1):
            raise r.fail(f"{where}.quant_axis", f"{axis} out of range for shape {shape}")
    return TensorSpec(name, dtype, tuple(shape), source, axis)


def _file_ref(r: _Reader, root: Path, obj: dict, key: str, where: str,
              optional: bool) -> tuple[str | None, str | None]:
    ref = r.get(obj, key, where, dict, optional=optional)
    if ref is None:
        return None, None
    w = f"{where}.{key}" if where else key
    rel = r.get(ref, "file", w, str)
    digest = r.get(ref, "sha256", w, str)
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise r.fail(f"{w}.file", f"'{rel}' must be a path inside the bundle")
    full = root / p
    if not full.is_file():
        raise BundleError(f"{full}: file named in {r.file} field '{w}.file' is missing")
    actual = sha256_file(full)
    if actual != digest.lower():
        raise BundleError(
            f"{full}: sha256 {actual[:12]}... does not match {r.file} field '{w}.sha256' "
            f"({digest[:12]}...); the bundle was modified or copied incompletely, re-run coach plan"
        )
    return rel, actual


def _row(r: _Reader, obj: dict, where: str) -> PlanRow:
    bits = r.get(obj, "bits", where, int)
    if bits not in BITS:
        raise r.fail(f"{where}.bits", f"{bits} is not one of {BITS}")
    drop = r.number(obj, "accuracy_drop", where, optional=True, minimum=-100.0)
    return PlanRow(
        bandwidth_mbps=r.number(obj, "bandwidth_mbps", where),
        cut=r.get(obj, "cut", where, str),
        bits=bits,
        edge_ms=r.number(obj, "edge_ms", where),
        transfer_ms=r.number(obj, "transfer_ms", where),
        cloud_ms=r.number(obj, "cloud_ms", where),
        latency_ms=r.number(obj, "latency_ms", where),
        period_ms=r.number(obj, "period_ms", where),
        bubble_ratio=r.number(obj, "bubble_ratio", where, minimum=-1e-9),
        bytes=int(r.number(obj, "bytes", where)),
        accuracy_drop=drop,
    )


def _cut(r: _Reader, root: Path, obj: dict, where: str) -> CutSpec:
    cid = r.get(obj, "id", where, str)
    kind = r.get(obj, "kind", where, str)
    if kind not in CUT_KINDS:
        raise r.fail(f"{where}.kind", f"'{kind}' is not one of {', '.join(CUT_KINDS)}")
    head, head_sha = _file_ref(r, root, obj, "head", where, optional=kind == "cloud-only")
    tail, tail_sha = _file_ref(r, root, obj, "tail", where, optional=kind == "edge-only")
    if kind == "cloud-only" and head is not None:
        raise r.fail(f"{where}.head", "a cloud-only cut has no head")
    if kind == "edge-only" and tail is not None:
        raise r.fail(f"{where}.tail", "an edge-only cut has no tail")
    tensors = tuple(
        _tensor(r, t, f"{where}.tensors[{i}]", cut_tensor=True)
        for i, t in enumerate(r.get(obj, "tensors", where, list))
    )
    if kind == "edge-only" and tensors:
        raise r.fail(f"{where}.tensors", "an edge-only cut sends nothing")
    if kind != "edge-only" and not tensors:
        raise r.fail(f"{where}.tensors", "must name at least one tensor")
    if kind == "cloud-only" and any(t.source != "input" for t in tensors):
        raise r.fail(f"{where}.tensors", "a cloud-only cut sends model inputs only (source 'input')")
    quant = []
    for i, q in enumerate(r.get(obj, "quantization", where, list)):
        w = f"{where}.quantization[{i}]"
        bits = r.get(q, "bits", w, int)
        if bits not in BITS:
            raise r.fail(f"{w}.bits", f"{bits} is not one of {BITS}")
        quant.append(QuantEntry(
            bits=bits,
            bytes=int(r.number(q, "bytes", w)),
            accuracy_drop=r.number(q, "accuracy_drop", w, optional=True, minimum=-100.0),
            admissible=r.get(q, "admissible", w, bool),
        ))
    if kind != "edge-only" and not any(q.admissible for q in quant):
        raise r.fail(f"{where}.quantization", "no admissible bit width")
    predicted = r.get(obj, "predicted", where, dict)
    return CutSpec(
        id=cid,
        kind=kind,
        tensors=tensors,
        head=head,
        head_sha256=head_sha,
        tail=tail,
        tail_sha256=tail_sha,
        edge_ms=r.number(predicted, "edge_ms", f"{where}.predicted"),
        cloud_ms=r.number(predicted, "cloud_ms", f"{where}.predicted"),
        quantization=tuple(quant),
        edge_nodes=int(r.number(obj, "edge_nodes", where, optional=True) or 0),
    )


def _fraction(r: _Reader, obj: dict, key: str, where: str, optional: bool = False) -> float | None:
    v = r.number(obj, key, where, optional=optional)
    if v is not None and v > 1.0:
        raise r.fail(f"{where}.{key}", f"must be a fraction in [0, 1], got {v}")
    return v


def _count(r: _Reader, obj: dict, key: str, where: str) -> int:
    v = r.get(obj, key, where, int)
    if v < 1:
        raise r.fail(f"{where}.{key}", f"must be >= 1, got {v}")
    return v


def _pooled_dim(tensors: tuple[TensorSpec, ...], grid: int) -> int | None:
    """How many features protos.semantic.pool makes of these cut tensors at `grid` (None: a symbolic
    dimension, so only the edge's first input can tell)."""
    shapes = [(1,) + tuple(t.shape[1:]) for t in tensors]
    if any(x <= 0 for shape in shapes for x in shape):
        return None
    return int(pool([np.zeros(shape, np.float32) for shape in shapes], grid).shape[1])


def _cache(r: _Reader, root: Path, cache: Any, cuts: dict[str, CutSpec]) -> dict[str, CacheSpec]:
    """Validate plan.json's `cache` section and the centers file it names; the cache per cut."""
    if not isinstance(cache, dict):
        raise r.fail("cache", "expected an object or null")
    rel, _ = _file_ref(r, root, {"cache": cache}, "cache", "", optional=False)
    pooling = r.get(cache, "pooling", "cache", str)
    if pooling not in POOLINGS:
        raise r.fail("cache.pooling", f"'{pooling}' is not supported (this coach pools {' or '.join(POOLINGS)}); "
                                      "upgrade coach or re-run coach plan")
    target = r.number(cache, "target_precision", "cache")
    if not 0.0 < target <= 1.0:
        raise r.fail("cache.target_precision", f"must be in (0, 1], got {target}")
    entries = r.get(cache, "cuts", "cache", dict)
    npz = root / rel
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # not a zip, an object array, ...
        raise BundleError(f"{npz}: not a readable .npz of arrays ({' '.join(str(exc).split())[:120]}); "
                          "re-run coach plan") from None
    out = {}
    for cid, e in entries.items():
        w = f"cache.cuts.{cid}"
        if cid not in cuts:
            raise r.fail(w, f"'{cid}' is not one of the bundle's cuts")
        if cuts[cid].kind != "interior":
            raise r.fail(w, f"cut '{cid}' is {cuts[cid].kind}: only an interior cut's head has cut features")
        k, d = (_count(r, e, key, w) for key in ("num_classes", "dim"))
        hit = r.number(e, "hit", w, optional=True)
        band = r.number(e, "band", w, optional=True)
        band_bits = r.get(e, "band_bits", w, int, optional=True)
        for key, v in (("hit", hit), ("band", band)):
            if v is not None and v > 2.0:
                raise r.fail(f"{w}.{key}", f"a margin threshold lies in [0, 2], got {v}")
        if (band is None) != (band_bits is None):
            raise r.fail(f"{w}.band_bits", "band and band_bits must both be set or both be null")
        if band_bits is not None and band_bits not in BITS:
            raise r.fail(f"{w}.band_bits", f"{band_bits} is not one of {BITS}")
        if band is not None and hit is not None and band > hit:
            raise r.fail(f"{w}.band", f"{band} is above the hit threshold {hit}")
        held_out = _count(r, e, "held_out", w)
        grid = _count(r, e, "grid", w) if pooling != "gap-l2/1" and "grid" in e else 1
        if grid > 16:
            raise r.fail(f"{w}.grid", f"a pooling grid from 1 to 16, got {grid}")
        pooled = _pooled_dim(cuts[cid].tensors, grid)
        if pooled is not None and pooled != d:
            raise r.fail(f"{w}.dim", f"{d}, but the cut tensors pooled at grid {grid} give {pooled} features")
        spec = {"centers": ((k, d), np.float32), "valid": ((k,), np.bool_)}
        got = {}
        for name, (shape, dtype) in spec.items():
            key = f"{cid}.{name}"
            if key not in arrays:
                raise BundleError(f"{npz}: no array '{key}' (named by {r.file} field '{w}')")
            a = arrays[key]
            if a.shape != shape or a.dtype != dtype:
                raise BundleError(f"{npz}: array '{key}' is {a.dtype} {list(a.shape)}; {r.file} field "
                                  f"'{w}' needs {np.dtype(dtype).name} {list(shape)} (num_classes, dim)")
            a.setflags(write=False)
            got[name] = a
        if not np.isfinite(got["centers"]).all():
            raise BundleError(f"{npz}: array '{cid}.centers' holds non-finite values")
        out[cid] = CacheSpec(
            cut_id=cid, centers=got["centers"], valid=got["valid"], hit=hit, band=band, band_bits=band_bits,
            target_precision=target, precision=_fraction(r, e, "precision", w, optional=True),
            hit_rate=_fraction(r, e, "hit_rate", w), band_rate=_fraction(r, e, "band_rate", w),
            band_drop=r.number(e, "band_drop", w, optional=True, minimum=-100.0), held_out=held_out,
            pooling=pooling, grid=grid)
    return out


# ---------------------------------------------------------------- load


def load_bundle(path: str | Path) -> Bundle:
    """Read and validate a bundle directory; BundleError (a ValueError) on anything wrong."""
    root = Path(path)
    file = root / PLAN_FILE
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory; pass the bundle directory that coach plan wrote")
    if not file.is_file():
        raise BundleError(f"{file}: missing; {root} is not a plan bundle (run coach plan)")
    data = file.read_bytes()
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{file}: not valid JSON ({exc})") from None
    r = _Reader(file)
    if not isinstance(doc, dict):
        raise r.fail("(top level)", "expected an object")
    version = r.get(doc, "schema_version", "", int)
    if version != SCHEMA_VERSION:
        hint = "upgrade coach" if version > SCHEMA_VERSION else "re-run coach plan"
        raise r.fail("schema_version", f"{version} is not supported (this coach reads {SCHEMA_VERSION}); {hint}")

    model = r.get(doc, "model", "", dict)
    name = r.get(model, "name", "model", str)
    model_sha = r.get(model, "sha256", "model", str)
    inputs = tuple(_tensor(r, t, f"model.inputs[{i}]", False)
                   for i, t in enumerate(r.get(model, "inputs", "model", list)))
    outputs = tuple(_tensor(r, t, f"model.outputs[{i}]", False)
                    for i, t in enumerate(r.get(model, "outputs", "model", list)))
    if not inputs or not outputs:
        raise r.fail("model.inputs" if not inputs else "model.outputs", "must not be empty")
    _, full_sha = _file_ref(r, root, doc, "full", "", optional=False)
    if full_sha != model_sha.lower():
        raise r.fail("full.sha256", "full.onnx is not the model named in model.sha256")

    objective = r.get(doc, "objective", "", dict)
    rate = r.number(objective, "rate_hz", "objective", optional=True)
    budget = r.number(objective, "accuracy_budget", "objective")

    cuts: dict[str, CutSpec] = {}
    for i, c in enumerate(r.get(doc, "cuts", "", list)):
        spec = _cut(r, root, c, f"cuts[{i}]")
        if spec.id in cuts:
            raise r.fail(f"cuts[{i}].id", f"duplicate cut id '{spec.id}'")
        cuts[spec.id] = spec
    if not cuts:
        raise r.fail("cuts", "must not be empty")

    def check_row(row: PlanRow, where: str) -> None:
        if row.cut not in cuts:
            raise r.fail(f"{where}.cut", f"'{row.cut}' is not one of the bundle's cuts")
        c = cuts[row.cut]
        if c.kind != "edge-only" and row.bits not in c.admissible_bits:
            raise r.fail(f"{where}.bits",
                         f"{row.bits} is not admissible for cut '{row.cut}' ({c.admissible_bits})")

    rows = []
    for i, obj in enumerate(r.get(doc, "plan_table", "", list)):
        row = _row(r, obj, f"plan_table[{i}]")
        check_row(row, f"plan_table[{i}]")
        rows.append(row)
    if not rows:
        raise r.fail("plan_table", "must not be empty")
    rows.sort(key=lambda x: x.bandwidth_mbps)

    baselines: dict[str, tuple[PlanRow, ...]] = {}
    for method, lst in r.get(doc, "baselines", "", dict).items():
        if not isinstance(lst, list):
            raise r.fail(f"baselines.{method}", "expected a list")
        brows = []
        for i, obj in enumerate(lst):
            row = _row(r, obj, f"baselines.{method}[{i}]")
            check_row(row, f"baselines.{method}[{i}]")
            brows.append(row)
        baselines[method] = tuple(brows)

    if "cache" not in doc:
        raise r.fail("cache", "missing (null when there is no semantic cache)")
    cache = doc["cache"]
    caches = _cache(r, root, cache, cuts) if cache is not None else {}

    return Bundle(
        path=root,
        plan_sha256=hashlib.sha256(data).hexdigest(),
        schema_version=version,
        model_name=name,
        model_sha256=model_sha.lower(),
        inputs=inputs,
        outputs=outputs,
        cuts=cuts,
        plan_table=tuple(rows),
        baselines=baselines,
        rate_hz=rate,
        accuracy_budget=budget,
        cache=cache,
        raw=doc,
        caches=caches,
    )
