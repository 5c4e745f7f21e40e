"""A plan bundle's tails as ONNX Runtime sessions: pick providers, open, warm up, run.

    runtime = Runtime(providers=choose_providers(None), intra_op_threads=2)
    model = load_model("out/bundle", runtime, max_batch=8)   # BundleError, or TailError naming the file
    model.run("c3", {"h": array})                              # {output name: array}, model output order

Every cut with a cloud side gets a session: its tail.onnx, or full.onnx for a cloud-only cut without
one. Each session is warmed up before the server reports SERVING. Providers are tried best first
(TensorRT, CUDA, CPU unless told otherwise); a provider that fails to open or to run the warm-up is
dropped with a warning and the next one is tried. A tail whose inputs and outputs all have a
symbolic first dimension, and that returns a batch of 2 for a batch of 2 in its warm-up, runs
micro-batches; any other runs its requests one by one (logged at startup).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from cloud.handlers import DTYPE_CODES, RequestError
from protos.bundle import Bundle, CutSpec, load_bundle
from protos.coach.v1 import coach_pb2 as pb

log = logging.getLogger(__name__)

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
           "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider",
           "rocm": "ROCMExecutionProvider", "openvino": "OpenVINOExecutionProvider",
           "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider"}
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32,
             "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


class TailError(ValueError):
    """A tail that cannot be served; the message names the file."""


def choose_providers(requested: list[str] | None, available: list[str] | None = None) -> list[str]:
    """Providers to try, best first: `requested` (short or full names) or the preferred available ones."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if not requested:
        return [p for p in PREFERENCE if p in available] or ["CPUExecutionProvider"]
    out = []
    for name in requested:
        full = ALIASES.get(name.strip().lower(), name.strip())
        if full not in available:
            short = ", ".join(sorted(k for k, v in ALIASES.items() if v in available and len(k) > 3) or available)
            raise ValueError(f"provider '{name}' is not available in this onnxruntime; available: {short}")
        if full not in out:
            out.append(full)
    return out


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


@dataclass(frozen=True)
class Runtime:
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 1
    spin: bool = False  # let idle ORT threads spin (lower latency, burns cores)


def _symbolic(d) -> bool:
    return not isinstance(d, int) or d < 0


def _warm_feeds(session, batch: int) -> dict[str, np.ndarray]:
    feeds = {}
    for i in session.get_inputs():
        shape = [batch if k == 0 and _symbolic(d) else (1 if _symbolic(d) else d) for k, d in enumerate(i.shape)]
        feeds[i.name] = np.zeros(shape, ORT_TYPES.get(i.type, np.float32))
    return feeds


def open_session(path: Path, runtime: Runtime):
    """An InferenceSession on the best provider that opens and runs a warm-up; TailError if none does."""
    import onnxruntime as ort

    providers = list(runtime.providers)
    last = None
    while providers:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = runtime.intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        if not runtime.spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            session.run(None, _warm_feeds(session, 1))
            return session
        except Exception as exc:  # a provider that cannot build or run this graph
            last = exc
            if len(providers) == 1:
                break
            log.warning("%s: provider %s failed its warm-up (%s); dropping it", path, providers[0],
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            providers = providers[1:]
    raise TailError(f"{path}: cannot run on any of {list(runtime.providers)}: {last}")


def _batch_check(session) -> bool:
    """Symbolic first dims everywhere and a batch of 2 in gives a batch of 2 out."""
    ins, outs = session.get_inputs(), session.get_outputs()
    if not all(i.shape and _symbolic(i.shape[0]) for i in ins):
        return False
    if not all(o.shape is None or not o.shape or _symbolic(o.shape[0]) for o in outs):
        return False
    try:
        return all(r.ndim and r.shape[0] == 2 for r in session.run(None, _warm_feeds(session, 2)))
    except Exception:
        return False


@dataclass
class Tail:
    """One cut's cloud side."""

    cut: CutSpec
    path: Path
    session: object
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    batchable: bool


@dataclass
class BundleModel:
    """A loaded bundle: implements cloud.handlers.Model."""

    bundle: Bundle
    tails: dict[str, Tail] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.bundle.model_name

    @property
    def plan_sha256(self) -> str:
        return self.bundle.plan_sha256

    def _tail(self, cut_id: str) -> Tail:
        t = self.tails.get(cut_id)
        if t is None:
            if cut_id in self.bundle.cuts:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"cut '{cut_id}' of model '{self.name}' runs entirely on the edge; nothing to run here")
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model '{self.name}' has no cut '{cut_id}'; cuts served: {', '.join(self.tails)}")
        return t

    def spec(self, cut_id: str):
        return self._tail(cut_id).cut.tensors

    def batchable(self, cut_id: str) -> bool:
        return self._tail(cut_id).batchable

    def run(self, cut_id: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t = self._tail(cut_id)
        results = t.session.run(list(t.output_names), {k: tensors[k] for k in t.input_names})
        produced = dict(zip(t.output_names, results))
        # A model output computed on the edge travels as a cut tensor: pass it through.
        out = {}
        for o in self.bundle.outputs:
            if o.name in produced:
                out[o.name] = produced.pop(o.name)
            elif o.name in tensors:
                out[o.name] = tensors[o.name]
        out.update(produced)
        return out

    def describe(self) -> pb.BundleInfo:
        def spec(s):
            return pb.TensorSpec(name=s.name, dtype=DTYPE_CODES[s.dtype], shape=list(s.shape))

        info = pb.BundleInfo(model=self.name, plan_sha256=self.plan_sha256)
        info.inputs.extend(spec(s) for s in self.bundle.inputs)
        info.outputs.extend(spec(s) for s in self.bundle.outputs)
        for cid, t in self.tails.items():
            info.cuts.add(id=cid, tensors=[spec(s) for s in t.cut.tensors])
        return info


def load_model(path: str | Path, runtime: Runtime) -> BundleModel:
    """Load and verify a bundle (sha256 of every file), open and warm up every tail."""
    bundle = load_bundle(path)
    model = BundleModel(bundle)
    for cid, cut in bundle.cuts.items():
        if cut.kind == "edge-only":
            continue
        file = bundle.tail_path(cid) if cut.tail else bundle.full_path
        session = open_session(file, runtime)
        inputs = tuple(i.name for i in session.get_inputs())
        sent = {s.name: s for s in cut.tensors}
        for i in session.get_inputs():
            s = sent.get(i.name)
            if s is None:
                raise TailError(f"{file}: input '{i.name}' is not a tensor of cut '{cid}' in plan.json "
                                f"({', '.join(sent)}); re-run coach plan")
            if ORT_TYPES.get(i.type) is not None and np.dtype(ORT_TYPES[i.type]) != np.dtype(s.dtype):
                raise TailError(f"{file}: input '{i.name}' is {i.type} but plan.json says {s.dtype}; re-run coach plan")
        batchable = _batch_check(session)
        if not batchable:
            log.info("model %s cut %s: the tail has a fixed batch dimension; its requests run one by one",
                     bundle.model_name, cid)
        model.tails[cid] = Tail(cut, file, session, inputs, tuple(o.name for o in session.get_outputs()), batchable)
        log.info("model %s cut %s: %s on %s", bundle.model_name, cid, file.name, session.get_providers()[0])
    if not model.tails:
        raise TailError(f"{bundle.path}: no cut has a cloud side (only edge-only); nothing to serve")
    return model
