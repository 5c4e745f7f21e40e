"""`coach plan MODEL.onnx --out DIR`: cuts and bit widths per bandwidth level, written as a plan bundle.

Steps: read the model -> device profiles (given, or measured here) -> cost DAG -> Pareto frontier of
cuts (partitioner.search) -> per bandwidth level the best (cut, bits) with accuracy measured lazily
on the calibration set (partitioner.accuracy) -> the five baselines on the same profiles ->
split every cut the bundle keeps, verify it (tail(head(x)) == full(x)), time it here -> write the
bundle atomically (partitioner.bundle_writer) and print the plan table. With calibration data and a
class-score output, the semantic cache's offline half runs too (`_Planner.cache_section`): label
centers of pooled cut features per interior cut (centers.npz) and margin thresholds calibrated on
a held-out split (plan.json `cache`).

Every user mistake (bad file, bad flag, mismatching calibration or profile) is one line, exit 2,
and leaves --out untouched.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coach_runtime.errors import UserError

log = logging.getLogger(__name__)

ALL_BITS = (32, 16, 8, 6, 4, 3, 2)
DEFAULT_LEVELS_MBPS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
PACKET_BITS = 1500 * 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the ONNX model to plan")
    p.add_argument("--out", help="bundle directory to write (default: ./<model-name>.bundle)")
    p.add_argument("--model-name", help="model name in the bundle (default: the file name)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    g = p.add_argument_group("devices")
    g.add_argument("--edge-profile", help="profile JSON of the edge device (coach profile); default: measure here")
    g.add_argument("--cloud-profile", help="profile JSON of the cloud device; default: measure here")
    g.add_argument("--edge-slowdown", default="1", metavar="F",
                   help="multiply edge times by F (a profile measured here standing for a slower board)")
    g.add_argument("--providers", help="onnxruntime providers for measuring here, comma-separated")
    g.add_argument("--runs", default="10", metavar="N", help="timed runs per measurement (default 10)")
    a = p.add_argument_group("accuracy")
    a.add_argument("--calibration", metavar="FILE.npz",
                   help="calibration inputs keyed by input name (first axis: samples), optional 'label'")
    a.add_argument("--bits", metavar="B[,B...]",
                   help="bit widths to consider, from 32,16,8,6,4,3,2 (default: all with --calibration, "
                        "else 32,16)")
    a.add_argument("--accuracy-budget", default="0.5", metavar="PP",
                   help="allowed top-1 agreement drop in percentage points (default 0.5)")
    c = p.add_argument_group("semantic cache (needs --calibration)")
    c.add_argument("--cache-precision", default="0.99", metavar="P",
                   help="target precision of cache answers against the full model's (default 0.99)")
    c.add_argument("--cache-calibration", metavar="FILE.npz",
                   help="build the cache's centers and thresholds from these inputs (same format as "
                        "--calibration) instead: e.g. inputs like the deployment's, where --calibration "
                        "holds a domain the model was not trained on to measure the accuracy drop")
    c.add_argument("--cache-held-out", default="0.5", metavar="F",
                   help="fraction of calibration samples held out to calibrate thresholds (default 0.5)")
    c.add_argument("--cache-grids", default="1,2,4", metavar="G[,G...]",
                   help="pooling grids to try per cut (1: global average; G: a GxG grid of averages), the one "
                        "with the most hits at the target precision on the build split is kept (default 1,2,4)")
    c.add_argument("--no-cache", action="store_true", help="build no semantic cache")
    n = p.add_argument_group("network and objective")
    n.add_argument("--bandwidth", metavar="MBPS[,MBPS...]", help="bandwidth levels in Mbit/s")
    n.add_argument("--trace", metavar="FILE", help="mahimahi uplink trace: levels at its percentiles")
    n.add_argument("--levels", default="7", metavar="N", help="levels taken from --trace (default 7)")
    n.add_argument("--trace-window-ms", default="1000", metavar="MS",
                   help="window over which --trace capacity is averaged (default 1000)")
    n.add_argument("--rate", metavar="HZ", help="input rate: minimise latency subject to period <= 1/rate")
    n.add_argument("--link-overhead-ms", default="0", metavar="MS", help="fixed cost per message (default 0)")
    v = p.add_argument_group("checks")
    v.add_argument("--verify-samples", default="2", metavar="N",
                   help="random inputs each split is verified on (default 2)")
    v.add_argument("--no-timing", action="store_true", help="do not time the extracted heads and tails here")
    v.add_argument("--seed", default="0", help="seed of the random inputs")


# ---------------------------------------------------------------- flags


def _number(value: str | None, flag: str, kind=float, minimum: float | None = None,
            positive: bool = False):
    if value is None:
        return None
    try:
        x = kind(value)
    except ValueError:
        raise UserError(f"{flag} {value!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(x) or (positive and not x > 0) or (minimum is not None and x < minimum):
        bound = "> 0" if positive else f">= {minimum}"
        raise UserError(f"{flag} {value!r}: must be {bound}")
    return x


def parse_bits(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        bits = sorted({int(b) for b in text.split(",") if b.strip()}, reverse=True)
    except ValueError:
        raise UserError(f"--bits {text!r}: expected comma-separated integers from {ALL_BITS}") from None
    bad = [b for b in bits if b not in ALL_BITS]
    if bad or not bits:
        raise UserError(f"--bits {text!r}: each width must be one of {', '.join(map(str, ALL_BITS))}")
    return bits


def parse_bandwidths(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        if part.strip():
            out.append(_number(part.strip(), "--bandwidth", positive=True))
    if not out:
        raise UserError("--bandwidth: give at least one level in Mbit/s, e.g. --bandwidth 2,8,20")
    return sorted(set(out))


def trace_levels(path: str | Path, levels: int, window_ms: float) -> tuple[list[float], list[float]]:
    """Bandwidth levels (Mbit/s) at evenly spaced percentiles (5..95) of a mahimahi trace's capacity
    averaged over windows. Returns (levels, percentiles)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such trace file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the trace ({exc})") from None
    stamps = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            t = int(line)
        except ValueError:
            raise UserError(f"{path}:{lineno}: {line[:30]!r} is not a millisecond timestamp; "
                            "a mahimahi trace has one integer per line") from None
        if t < 0 or (stamps and t < stamps[-1]):
            raise UserError(f"{path}:{lineno}: timestamps must be >= 0 and non-decreasing")
        stamps.append(t)
    if not stamps or stamps[-1] <= 0:
        raise UserError(f"{path}: an empty trace (need timestamps spanning > 0 ms)")
    duration = stamps[-1]
    window = min(window_ms, duration)
    nwin = max(1, int(duration // window))
    counts = np.bincount(np.minimum(np.asarray(stamps) // window, nwin - 1).astype(np.int64), minlength=nwin)
    mbps = counts * PACKET_BITS / (window * 1e3)
    pct = list(np.linspace(5, 95, levels)) if levels > 1 else [50.0]
    values = np.percentile(mbps, pct)
    out, used = [], []
    for p_, v in zip(pct, values):
        v = round(float(v), 3)
        if v > 0 and v not in out:
            out.append(v)
            used.append(round(float(p_), 1))
    if not out:
        raise UserError(f"{path}: capacity is zero in most windows; use --bandwidth instead")
    return out, used


# ---------------------------------------------------------------- the plan


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), transient=True)


def _profiles(args, path: Path, sha: str, runs: int, slowdown: float):
    """(edge profile, cloud profile): loaded, or measured here once and reused."""
    from partitioner.profile import ProfileError, load_profile, profile_model

    loaded = {}
    for side in ("edge", "cloud"):
        f = getattr(args, f"{side}_profile")
        if f:
            try:
                loaded[side] = load_profile(f, expect_sha256=sha)
            except ProfileError as exc:
                raise UserError(str(exc)) from None
    if len(loaded) < 2:
        providers = [x for x in (args.providers or "").split(",") if x] or None
        with _progress() as prog:
            task = prog.add_task(f"profiling {path.name} here", total=1)
            here = profile_model(path, providers=providers, runs=runs, warmup=2,
                                 progress=lambda d, t: prog.update(task, completed=d, total=t))
        loaded.setdefault("edge", here)
        loaded.setdefault("cloud", here)
    edge = loaded["edge"]
    if slowdown != 1.0:
        edge = edge.scaled(slowdown, f"{edge.device.get('name', 'edge')} x{slowdown:g}")
    return edge, loaded["cloud"]


def _baselines(g, link, accuracy_drop, budget, oracle, cands):
    from partitioner.baselines import baselines

    return baselines(g, link, accuracy_drop, budget, oracle=oracle, cands=cands)


def _method_key(name: str) -> str:
    k = name.lower().replace("_", "-")
    return "jalad" if k.startswith("jalad") else k


@dataclass
class Options:
    path: Path
    out: Path
    name: str
    budget: float
    slowdown: float
    runs: int
    rate: float | None
    overhead: float
    verify_samples: int
    seed: int
    bits: list[int] | None
    levels: list[float]
    level_source: str
    cache: bool = True
    cache_precision: float = 0.99
    cache_held_out: float = 0.5
    cache_grids: tuple[int, ...] = (1, 2, 4)


def parse_options(args) -> Options:
    """Every flag checked before any work is done (UserError on the first bad one)."""
    path = Path(args.model)
    if args.bandwidth and args.trace:
        raise UserError("give either --bandwidth or --trace, not both")
    if args.trace:
        nlev = _number(args.levels, "--levels", int, minimum=1)
        window = _number(args.trace_window_ms, "--trace-window-ms", positive=True)
        levels, pcts = trace_levels(args.trace, nlev, window)
        level_source = f"trace {Path(args.trace).name} (percentiles {', '.join(f'{p:g}' for p in pcts)})"
    elif args.bandwidth:
        levels, level_source = parse_bandwidths(args.bandwidth), "--bandwidth"
    else:
        levels, level_source = list(DEFAULT_LEVELS_MBPS), "default levels"
    name = args.model_name or path.name.rsplit(".", 1)[0]
    precision = _number(args.cache_precision, "--cache-precision", positive=True)
    if precision > 1:
        raise UserError(f"--cache-precision {args.cache_precision!r}: a precision in (0, 1], e.g. 0.99")
    held_out = _number(args.cache_held_out, "--cache-held-out", positive=True)
    if held_out >= 1:
        raise UserError(f"--cache-held-out {args.cache_held_out!r}: a fraction in (0, 1), e.g. 0.5")
    grids = parse_grids(args.cache_grids)
    return Options(
        path=path,
        out=Path(args.out) if args.out else Path(f"{name}.bundle"),
        name=name,
        budget=_number(args.accuracy_budget, "--accuracy-budget", minimum=0.0),
        slowdown=_number(args.edge_slowdown, "--edge-slowdown", positive=True),
        runs=_number(args.runs, "--runs", int, minimum=1),
        rate=_number(args.rate, "--rate", positive=True),
        overhead=_number(args.link_overhead_ms, "--link-overhead-ms", minimum=0.0),
        verify_samples=_number(args.verify_samples, "--verify-samples", int, minimum=1),
        seed=_number(args.seed, "--seed", int, minimum=0),
        bits=parse_bits(args.bits),
        levels=levels,
        level_source=level_source,
        cache=not args.no_cache,
        cache_precision=precision,
        cache_held_out=held_out,
        cache_grids=grids,
    )


def parse_grids(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4): the pooling grids the semantic cache may use (UserError if not)."""
    try:
        grids = tuple(sorted({int(x) for x in str(text).split(",") if x.strip()}))
    except ValueError:
        grids = ()
    if not grids or any(g < 1 or g > 16 for g in grids):
        raise UserError(f"--cache-grids {text!r}: whole numbers from 1 to 16, e.g. 1,2,4")
    return grids


def run(args) -> int:
    from partitioner.accuracy import load_calibration
    from partitioner.bundle_writer import check_target, write_bundle
    from partitioner.graph import analyze, cost_graph
    from partitioner.profile import ProfileError, node_times, read_model
    from partitioner.search import frontier, topological_cuts
    from partitioner.split import TensorType, tensor_types

    opt = parse_options(args)
    check_target(opt.out.absolute(), args.force)

    # -- model, profiles, cost DAG, candidates
    data, model = read_model(opt.path)
    sha = hashlib.sha256(data).hexdigest()
    try:
        info = analyze(model)
    except ValueError as exc:
        raise UserError(f"{opt.path}: {exc}") from None
    if not info.compute:
        raise UserError(f"{opt.path}: every node is constant-like; there is nothing to place")
    types = tensor_types(model)
    for t, ti in info.tensors.items():  # fill gaps from the graph analysis (batch fixed to 1)
        if t not in types and ti.dtype and ti.shape is not None and None not in ti.shape:
            types[t] = TensorType(t, ti.dtype, tuple(ti.shape))
    calibration = cache_calibration = None
    if args.calibration:  # checked before the (long) profiling
        calibration = load_calibration(args.calibration, {i: types[i] for i in info.inputs})
    if args.cache_calibration:
        if calibration is None:
            raise UserError("--cache-calibration needs --calibration (the accuracy drop is measured on it)")
        cache_calibration = load_calibration(args.cache_calibration, {i: types[i] for i in info.inputs})
    edge_prof, cloud_prof = _profiles(args, opt.path, sha, opt.runs, opt.slowdown)
    outputs_of = {n.id: n.outputs for n in info.all_nodes}
    try:
        edge_ms = node_times(edge_prof, list(info.compute), outputs_of, args.edge_profile or "edge profile")
        cloud_ms = node_times(cloud_prof, list(info.compute), outputs_of, args.cloud_profile or "cloud profile")
    except ProfileError as exc:
        raise UserError(str(exc)) from None
    g = cost_graph(info, edge_ms, cloud_ms)

    notes: list[str] = []
    cands, mode = frontier(g)
    ends = {c.kind: c for c in topological_cuts(g) if c.kind != "interior"}
    for kind in ("edge-only", "cloud-only"):
        if kind in ends and all(c.kind != kind for c in cands):
            cands.append(ends[kind])
    if mode == "topological-fallback":
        notes.append("the graph is not series-parallel everywhere: cuts searched along topological "
                     "orders in those regions (not proven optimal)")
    elif mode != "exact":
        notes.append(f"search mode {mode}: a region's frontier was thinned to a fine grid "
                     "(near-optimal, not proven optimal)")

    planner = _Planner(opt, data, model, info, g, types, notes, calibration, args.no_timing, cache_calibration)
    planner.files["full.onnx"] = data
    with _progress() as prog:
        planner.prog = prog
        rows, base, kept = planner.search(cands, ends)
        plan_rows, base_rows = planner.row_docs(rows, base)  # measures the rows' drops first
        cut_docs = planner.cut_docs(rows, base, kept)
        cache = planner.cache_section(kept, cut_docs)

    doc = planner.document(sha, edge_prof, cloud_prof, mode, cut_docs, plan_rows, base_rows, cache)
    written = write_bundle(opt.out, doc, planner.files, force=args.force)
    _print_table(doc, written)
    return 0


class _Planner:
    """The search -> verify -> describe steps of one `coach plan` run (state shared between them)."""

    def __init__(self, opt: Options, data: bytes, model, info, g, types, notes: list[str],
                 calibration, no_timing: bool, cache_calibration=None):
        from partitioner.accuracy import AccuracyMeter
        from partitioner.search import AccuracyOracle

        self.opt, self.data, self.model, self.info, self.g, self.types = opt, data, model, info, g, types
        self.notes = notes
        self.no_timing = no_timing
        self.files: dict[str, bytes] = {}
        self.splits: dict[str, object] = {}
        self.verified: dict[str, float] = {}
        self.prog = None
        self.input_types = {i: types[i] for i in info.inputs}
        self.calibration = calibration
        self.cache_calibration = cache_calibration  # None: the cache is built from `calibration`
        self._cache_meter = None
        self.meter = None
        if calibration is not None:
            self.bits = opt.bits or list(ALL_BITS)
            self.meter = AccuracyMeter(data, self.calibration, self.make_split, progress=self._measured)
            self.accuracy_drop = self.meter
            self.accuracy_mode = f"measured on {self.calibration.samples} calibration samples"
        elif opt.bits is not None:
            self.bits = opt.bits
            self.accuracy_drop = lambda cut, b: 0.0  # the user's --bits, taken as admissible
            self.accuracy_mode = "not measured (no --calibration): the --bits widths are taken as admissible"
            notes.append("no --calibration: accuracy not measured; the widths given by --bits are assumed admissible")
        else:
            self.bits = [32, 16]
            self.accuracy_drop = None
            self.accuracy_mode = "not measured (no --calibration): only 32-bit and float16 offered"
            print("coach plan: no --calibration, so accuracy cannot be measured: offering only 32-bit and "
                  "float16 (pass --calibration FILE.npz, or --bits to choose widths yourself)")
        self.oracle = AccuracyOracle(self.accuracy_drop or (lambda c, b: None), opt.budget, self.bits)
        self.search_seconds = 0.0
        self.candidates = 0
        self._acc_task = None
        self.cache_status = "none"

    def _measured(self, text: str) -> None:
        if self.prog is not None:
            if self._acc_task is None:
                self._acc_task = self.prog.add_task("accuracy measurements", total=None)
            self.prog.update(self._acc_task, advance=1, description=f"accuracy: {text}")

    def make_split(self, cut):
        from partitioner.split import split_model

        if cut.id not in self.splits:
            self.splits[cut.id] = split_model(self.model, self.info, cut, self.types)
        return self.splits[cut.id]

    def search(self, cands, ends):
        """Plan table and baselines; every cut they use is split and verified (a COACH candidate
        that fails verification is dropped and the search redone)."""
        from partitioner.search import Link, plan_table
        from partitioner.split import SplitError, verify_split

        opt = self.opt
        t0 = time.perf_counter()
        while True:
            rows = plan_table(cands, self.bits, opt.levels, self.accuracy_drop, opt.budget, opt.rate,
                              opt.overhead, oracle=self.oracle)
            base: dict[str, list] = {}
            for bw in opt.levels:
                for method, ch in _baselines(self.g, Link(bw, opt.overhead), self.accuracy_drop, opt.budget,
                                             self.oracle, cands).items():
                    if ch is not None:
                        base.setdefault(_method_key(method), []).append((bw, ch))
            base_cuts = [ch.cut for lst in base.values() for _, ch in lst]
            kept = {}
            for cut in [r.cut for r in rows] + base_cuts + list(ends.values()):
                kept.setdefault(cut.id, cut)
            todo = [c for c in kept.values() if c.id not in self.verified]
            task = self.prog.add_task("verifying cuts", total=len(todo)) if self.prog and todo else None
            failed = set()
            for cut in todo:
                try:
                    err, head, tail = verify_split(self.data, self.make_split(cut), samples=opt.verify_samples,
                                                   seed=opt.seed)
                except SplitError as exc:
                    log.warning("dropping cut %s: %s", cut.id, exc)
                    self.notes.append(f"cut {cut.id} dropped: {exc}")
                    failed.add(cut.id)
                    continue
                finally:
                    if task is not None:
                        self.prog.advance(task)
                self.verified[cut.id] = err
                if head is not None and cut.kind != "edge-only":  # edge-only's head is full.onnx
                    self.files[f"cuts/{cut.id}/head.onnx"] = head
                if tail is not None and cut.kind != "cloud-only":  # cloud-only's tail is full.onnx
                    self.files[f"cuts/{cut.id}/tail.onnx"] = tail
            if task is not None:
                self.prog.remove_task(task)
            if not failed:
                break
            if failed & {c.id for c in list(ends.values()) + base_cuts}:
                raise RuntimeError(f"internal error: a baseline's cut failed verification: {self.notes[-1]}")
            cands = [c for c in cands if c.id not in failed]
        self.search_seconds = time.perf_counter() - t0
        self.candidates = len(cands)
        if not any(c.kind == "interior" for c in cands):
            reason = ("the model has one compute node" if len(self.info.compute) < 2 else
                      "every interior cut sends a tensor of unknown size or failed verification")
            msg = f"no valid interior cut ({reason}): only edge-only and cloud-only are offered"
            self.notes.append(msg)
            print(f"coach plan: {msg}")
        return rows, base, kept

    def _drop(self, cut, bits: int, measure: bool):
        """Drop for the document: measured when calibration data exists, else null (0 for 32 bits)."""
        if bits == 32 or cut.kind == "edge-only":
            return 0.0
        if self.meter is None:
            return None
        return self.oracle.measure(cut, bits) if measure else self.oracle.drop(cut, bits)

    def row_docs(self, rows, base) -> tuple[list[dict], dict[str, list[dict]]]:
        from partitioner.search import payload_bytes

        def row_doc(bw: float, cut, b: int, st) -> dict:
            return {"bandwidth_mbps": bw, "cut": cut.id, "bits": b, "edge_ms": st.edge_ms,
                    "transfer_ms": st.transfer_ms, "cloud_ms": st.cloud_ms, "latency_ms": st.latency_ms,
                    "period_ms": st.period_ms, "bubble_ratio": st.bubble_ratio,
                    "bytes": 0 if cut.kind == "edge-only" else payload_bytes(cut.elements, b),
                    "accuracy_drop": self._drop(cut, b, measure=True)}

        plan_rows = [dict(row_doc(r.bandwidth_mbps, r.cut, r.bits, r.times), meets_rate=r.meets_rate)
                     for r in rows]
        base_rows = {m: [row_doc(bw, ch.cut, ch.bits, ch.times) for bw, ch in lst] for m, lst in base.items()}
        return plan_rows, base_rows

    def cut_docs(self, rows, base, kept) -> list[dict]:
        """Per kept cut: tensors, files, quantization table (admissibility by the shared oracle),
        predicted and (here) measured stage times."""
        from partitioner.accuracy import quant_axis
        from partitioner.bundle_writer import file_ref
        from partitioner.profile import time_model
        from partitioner.search import payload_bytes

        used_bits: dict[str, set[int]] = {}
        pairs = [(r.cut, r.bits) for r in rows] + [(ch.cut, ch.bits) for lst in base.values() for _, ch in lst]
        for cut, b in pairs:
            used_bits.setdefault(cut.id, set()).add(b)
        timing_runs = min(self.opt.runs, 10)
        task = self.prog.add_task("quantization tables, timing", total=len(kept)) if self.prog else None
        docs = []
        for cid, cut in kept.items():
            split = self.make_split(cut)
            quant = []
            if cut.kind != "edge-only":
                for b in sorted(set(self.bits) | used_bits.get(cid, set()), reverse=True):
                    ok = self.oracle.admissible(cut, b)
                    entry = {"bits": b, "bytes": payload_bytes(cut.elements, b),
                             "accuracy_drop": self._drop(cut, b, measure=False), "admissible": bool(ok)}
                    if self.meter is not None and (cid, b) in self.meter.label_accuracy:
                        entry["label_accuracy"] = self.meter.label_accuracy[(cid, b)]
                    quant.append(entry)
            head_file = "full.onnx" if cut.kind == "edge-only" else f"cuts/{cid}/head.onnx"
            tail_file = "full.onnx" if cut.kind == "cloud-only" else f"cuts/{cid}/tail.onnx"
            validation = {"max_relative_error": self.verified[cid], "samples": self.opt.verify_samples}
            has_head, has_tail = cut.kind != "cloud-only", cut.kind != "edge-only"
            if not self.no_timing:
                for side, has, f in (("head", has_head, head_file), ("tail", has_tail, tail_file)):
                    if has:
                        validation[f"{side}_ms"] = time_model(self.files[f], runs=timing_runs,
                                                              what=f"cut {cid} {side}")
            doc = {
                "id": cid,
                "kind": cut.kind,
                "edge_nodes": len(cut.edge_nodes),
                "elements": cut.elements,
                "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "source": s,
                             "quant_axis": quant_axis(t)} for t, s in zip(split.tensors, split.sources)],
                "predicted": {"edge_ms": cut.edge_ms, "cloud_ms": cut.cloud_ms},
                "quantization": quant,
                "validation": validation,
            }
            if has_head:
                doc["head"] = file_ref(head_file, self.files[head_file])
            if has_tail:
                doc["tail"] = file_ref(tail_file, self.files[tail_file])
            docs.append(doc)
            if task is not None:
                self.prog.advance(task)
        return docs

    def cache_section(self, kept: dict, cut_docs: list[dict]) -> dict | None:
        """The semantic cache's offline half: for each interior cut, pooled cut features of the
        calibration inputs (protos.semantic.pool, as the edge computes them, at the grid that
        choose_grid picks on the build split), label centers from the build split, thresholds on
        the held-out split (partitioner.semantic_cache). Puts centers.npz in
        self.files and returns plan.json's `cache` section; None (reason in self.cache_status) when
        there is no cache to build."""
        from partitioner.bundle_writer import file_ref
        from partitioner.semantic_cache import build_centers, calibrate, choose_grid, split_held_out
        from protos.bundle import POOLING
        from protos.semantic import pool

        opt, meter = self.opt, self.cache_meter()
        cal = meter.cal if meter is not None else None  # the inputs the cache is built from
        interior = [c for c in kept.values() if c.kind == "interior"]
        why = None
        if not opt.cache:
            why = "disabled by --no-cache"
        elif meter is None:
            why = "no --calibration (centers and thresholds are built from calibration inputs)"
        elif not interior:
            why = "no interior cut in this bundle (the cache compares a head's cut tensors)"
        if why is None:
            ref = np.asarray(meter.reference, np.int64)
            k = class_count(meter.output_shape)
            build, held = split_held_out(cal.samples, opt.cache_held_out, opt.seed)
            if k is None:
                why = (f"the model's first output has shape {list(meter.output_shape or ())} per sample, "
                       "not a class-score vector")
            elif len(build) == 0 or len(held) == 0:
                why = (f"{cal.samples} calibration sample(s) are too few to split into build and held-out "
                       f"parts (--cache-held-out {opt.cache_held_out:g})")
        if why is not None:
            self.cache_status = f"none: {why}"
            return None

        normal = {d["id"]: min(q["bits"] for q in d["quantization"] if q["admissible"])
                  for d in cut_docs if d["kind"] == "interior"}
        labels = cal.labels.astype(np.int64) if cal.labels is not None else None
        task = self.prog.add_task("semantic cache", total=len(interior)) if self.prog else None
        arrays: dict[str, np.ndarray] = {}
        entries: dict[str, dict] = {}
        for cut in interior:
            split, sent = meter.cut_tensors(cut)
            by_grid = {g: np.stack([pool([d[t.name] for t in split.tensors], g)[0] for d in sent])
                       for g in opt.cache_grids}
            if not all(np.isfinite(f).all() for f in by_grid.values()):
                self.notes.append(f"semantic cache: cut {cut.id} skipped (non-finite cut features)")
                continue
            build_labels = None if labels is None else labels[build]
            grid = choose_grid({g: f[build] for g, f in by_grid.items()}, ref[build], build_labels, k,
                               opt.cache_precision, opt.seed)
            feats = by_grid[grid.grid]
            centers = build_centers(feats[build], ref[build], build_labels, k)
            nb = normal[cut.id]
            normal_agree = meter.agreement(cut, nb)[held]
            lower = {b: meter.agreement(cut, b)[held] for b in self.bits if b < nb}
            # the band may spend what the normal bits leave of the budget (their drop on all samples of
            # the accuracy calibration)
            left = max(0.0, opt.budget - (self.meter(cut, nb) or 0.0))
            if centers.valid.any():
                th = calibrate(feats[held], ref[held], centers, opt.cache_precision, lower or None,
                               normal_agree, left).to_json()
            else:  # the full model got every build sample wrong: no center to compare with
                th = {"hit": None, "band": None, "band_bits": None, "precision": None, "hit_rate": 0.0,
                      "band_rate": 0.0, "band_drop": None}
            has_hit, has_band = th["hit"] is not None, th["band_bits"] is not None
            arrays[f"{cut.id}.centers"] = centers.centers.astype(np.float32)
            arrays[f"{cut.id}.valid"] = centers.valid.astype(bool)
            entries[cut.id] = {
                "hit": th["hit"], "band": float(th["band"]) if has_band else None,
                "band_bits": th["band_bits"] if has_band else None,
                "precision": th["precision"] if has_hit else None, "hit_rate": th["hit_rate"],
                "band_rate": th["band_rate"], "band_drop": th["band_drop"] if has_band else None,
                "held_out": int(len(held)), "num_classes": int(k), "dim": int(feats.shape[1]),
                "normal_bits": nb, "centers_from": int(centers.counts.sum()),
                "classes_with_center": int(centers.valid.sum()), "grid": grid.grid,
                "grid_hit_rates": {str(g): round(r, 4) for g, r in grid.hit_rate.items()}}
            if task is not None:
                self.prog.advance(task)
        if task is not None:
            self.prog.remove_task(task)
        if not entries:
            self.cache_status = "none: no interior cut gave finite cut features"
            return None
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.files["centers.npz"] = buf.getvalue()
        built = ("correct answers of the full model" if labels is not None else "the full model's answers")
        self.cache_status = (f"built for {len(entries)} cut(s): centers from {len(build)} calibration samples "
                             f"({built}), thresholds on {len(held)} held-out samples (seed {opt.seed}) for "
                             f"precision {opt.cache_precision:g} against the full model")
        return {**file_ref("centers.npz", self.files["centers.npz"]), "pooling": POOLING,
                "target_precision": opt.cache_precision, "held_out_fraction": opt.cache_held_out,
                "split_seed": opt.seed, "labels": labels is not None, "cuts": entries,
                "calibration": {"file": Path(cal.source).name, "sha256": cal.sha256, "samples": cal.samples}}

    def cache_meter(self):
        """The meter the cache is built with: the accuracy meter, or one over --cache-calibration."""
        from partitioner.accuracy import AccuracyMeter

        if self.cache_calibration is None or self.meter is None:
            return self.meter
        if self._cache_meter is None:
            self._cache_meter = AccuracyMeter(self.data, self.cache_calibration, self.make_split)
        return self._cache_meter

    def document(self, sha, edge_prof, cloud_prof, mode, cut_docs, plan_rows, base_rows,
                 cache: dict | None = None) -> dict:
        from coach_runtime.cli import version
        from partitioner.bundle_writer import file_ref
        from partitioner.split import TensorType

        opt, info, cal = self.opt, self.info, self.calibration
        outputs = {o: self.types.get(o) or TensorType(o, "float32", ()) for o in info.outputs}
        return {
            "schema_version": 1,
            "generator": f"coach {version()}",
            "created_unix": int(time.time()),
            "model": {"name": opt.name, "sha256": sha, "source": opt.path.name,
                      "inputs": [_spec(self.input_types[i]) for i in info.inputs],
                      "outputs": [_spec(outputs[o]) for o in info.outputs]},
            "full": file_ref("full.onnx", self.data),
            "objective": {
                "rate_hz": opt.rate, "accuracy_budget": opt.budget, "bits_options": self.bits,
                "accuracy": self.accuracy_mode, "link_overhead_ms": opt.overhead, "search_mode": mode,
                "candidates": self.candidates, "accuracy_evaluations": self.oracle.calls,
                "bandwidth_source": opt.level_source, "bandwidth_levels_mbps": opt.levels,
                "search_seconds": round(self.search_seconds, 3),
                "calibration": None if cal is None else {
                    "file": Path(cal.source).name, "sha256": cal.sha256, "samples": cal.samples,
                    "labels": cal.labels is not None, "fp32_label_accuracy": self.meter.fp32_label_accuracy},
                "semantic_cache": self.cache_status,
            },
            "cuts": cut_docs,
            "plan_table": plan_rows,
            "baselines": base_rows,
            "cache": cache,
            "profiles": {"edge": edge_prof.to_json(), "cloud": cloud_prof.to_json()},
            "notes": self.notes,
        }


def class_count(shape: tuple[int, ...] | None) -> int | None:
    """K when a per-sample output of this shape is a class-score vector ([1, K], [K], [1, K, 1, 1]:
    one axis longer than 1, K >= 2), else None."""
    if shape is None:
        return None
    long = [d for d in shape if d != 1]
    return long[0] if len(long) == 1 and long[0] >= 2 else None


def _spec(t) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def _print_table(doc: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from partitioner.report import methods_at

    short = {"coach": "COACH", "edge-only": "edge", "cloud-only": "cloud", "neurosurgeon": "NS",
             "dads": "DADS", "jalad": "JALAD"}
    table = Table(title=f"{doc['model']['name']}: period / latency in ms (NS: Neurosurgeon)")
    table.add_column("Mbit/s", justify="right")
    table.add_column("COACH cut")
    table.add_column("bits", justify="right")
    methods = [m for m, _ in methods_at(doc, 0)]
    for m in methods:
        table.add_column(short.get(m, m), justify="right")
    for level, row in enumerate(doc["plan_table"]):
        cells = {m: f"{r['period_ms']:.1f}/{r['latency_ms']:.1f}" for m, r in methods_at(doc, level)}
        table.add_row(f"{row['bandwidth_mbps']:g}", row["cut"].removeprefix("cut-"), str(row["bits"]),
                      *[cells.get(m, "-") for m in methods])
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(f"bundle written to {out} ({len(doc['cuts'])} cuts)")
