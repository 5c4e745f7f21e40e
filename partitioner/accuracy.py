"""Measured accuracy drop of sending a cut's tensors at b bits: head -> quantize -> dequantize -> tail.

    cal = load_calibration("calib.npz", input_types)    # arrays keyed by input name, + optional "label"
    meter = AccuracyMeter(full_bytes, cal, make_split)    # make_split(cut) -> split.Split
    meter(cut, 8)       # percentage points of top-1 disagreement with the fp32 model; memoised
    meter.agreement(cut, 8)   # per sample: does the 8-bit split agree with the fp32 model? (bool array)
    meter.cut_tensors(cut)    # (split, per-sample fp32 cut tensors) as the edge would send them

The drop is 100 * (1 - agreement), where agreement is the fraction of calibration samples whose
top-1 class (argmax of the model's first output, flattened per sample) through the quantized split
equals the fp32 full model's. Quantization is protos.codec's: decode(encode(x, bits, axis)), with
`axis` = 1 (channels) for float tensors of rank >= 3 and per tensor otherwise; non-float tensors
are sent raw. The search calls the meter lazily (partitioner.search.choose), so only (cut, bits)
pairs that could still win are ever run; each pair runs once.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from coach_runtime.errors import UserError
from partitioner.profile import session
from partitioner.split import Split, TensorType
from protos.codec import decode, encode

log = logging.getLogger(__name__)

LABEL_KEY = "label"


@dataclass(frozen=True)
class Calibration:
    inputs: dict[str, np.ndarray]  # input name -> array, first axis = samples
    labels: np.ndarray | None
    samples: int
    source: str
    sha256: str
    batched: dict[str, bool]  # True: a sample is arr[i:i+1] (the model has a batch dim of 1)

    def feed(self, i: int) -> dict[str, np.ndarray]:
        return {k: (v[i : i + 1] if self.batched[k] else v[i]) for k, v in self.inputs.items()}


def load_calibration(path: str | Path, inputs: dict[str, TensorType]) -> Calibration:
    """Read an .npz of calibration inputs; every mismatch with the model is a one-line UserError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise UserError(f"{path}: no such calibration file") from None
    except Exception as exc:  # not a zip, a pickled object array, ...
        raise UserError(f"{path}: not a readable .npz of arrays ({' '.join(str(exc).split())[:120]})") from None
    labels = arrays.pop(LABEL_KEY, None)
    missing = [n for n in inputs if n not in arrays]
    if missing:
        raise UserError(f"{path}: no array for model input(s) {', '.join(missing)} "
                        f"(has {', '.join(sorted(arrays)) or 'nothing'}); key arrays by input name")
    extra = [k for k in arrays if k not in inputs]
    if extra:
        raise UserError(f"{path}: array(s) {', '.join(extra)} are not model inputs "
                        f"({', '.join(inputs)}) nor '{LABEL_KEY}'")
    counts = {k: a.shape[0] if a.ndim else 0 for k, a in arrays.items()}
    n = min(counts.values())
    if n == 0 or len(set(counts.values())) != 1:
        raise UserError(f"{path}: calibration arrays need the same number (>= 1) of samples on their "
                        f"first axis, got {counts}")
    batched, out = {}, {}
    for name, t in inputs.items():
        a = arrays[name]
        want = t.shape
        if _matches(a.shape[1:], want):
            batched[name] = False
        elif len(want) >= 1 and want[0] in (1, -1) and _matches(a.shape[1:], want[1:]):
            batched[name] = True
        else:
            raise UserError(f"{path}: array '{name}' has shape {list(a.shape)}; expected "
                            f"[samples, {', '.join(map(str, want))}] (-1: any) for model input '{name}'")
        if np.issubdtype(np.dtype(t.dtype), np.floating) != np.issubdtype(a.dtype, np.floating):
            raise UserError(f"{path}: array '{name}' is {a.dtype}, model input '{name}' is {t.dtype}")
        out[name] = a.astype(t.dtype, copy=False)
    if labels is not None:
        labels = np.asarray(labels).reshape(labels.shape[0], -1)[:, 0] if labels.ndim else labels
        if labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{path}: '{LABEL_KEY}' must hold {n} integer class labels, "
                            f"got shape {list(labels.shape)} of {labels.dtype}")
    return Calibration(out, labels, n, str(path), hashlib.sha256(raw).hexdigest(), batched)


def _matches(shape: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return len(shape) == len(want) and all(w < 0 or s == w for s, w in zip(shape, want))


def quant_axis(t: TensorType) -> int | None:
    """The axis a cut tensor is quantized along: channels (1) for rank >= 3, else per tensor."""
    return 1 if len(t.shape) >= 3 and np.issubdtype(np.dtype(t.dtype), np.floating) else None


def quantize(x: np.ndarray, bits: int, axis: int | None) -> np.ndarray:
    """What the cloud sees after the wire: decode(encode(x, bits, axis)) (raw for non-floats)."""
    if bits == 32 or not np.issubdtype(x.dtype, np.floating):
        return x
    return decode(encode(x, bits, axis=axis)).astype(x.dtype, copy=False)


def top1(outputs: list[np.ndarray]) -> int:
    return int(np.argmax(np.asarray(outputs[0]).reshape(-1)))


class AccuracyMeter:
    """accuracy_drop(cut, bits) for partitioner.search, memoised; counts what it runs."""

    def __init__(self, full: bytes, calibration: Calibration, make_split: Callable[[object], Split],
                 providers: list[str] | None = None, cache_cuts: int = 2,
                 progress: Callable[[str], None] | None = None, batch: int = 32):
        self.full = full
        self.cal = calibration
        self.make_split = make_split
        self.providers = providers
        self.cache_cuts = cache_cuts
        self.batch = batch  # head runs per onnxruntime call, where the head takes a batch axis
        self.progress = progress
        self.measured: dict[tuple[str, int], float] = {}
        self.label_accuracy: dict[tuple[str, int], float] = {}
        self.calls = 0  # measurements actually run (memo misses)
        self._agree: dict[tuple[str, int], np.ndarray] = {}  # per-sample agreement with the fp32 model
        self._sent: OrderedDict[str, tuple[Split, object, list[dict[str, np.ndarray]]]] = OrderedDict()
        self._reference: list[int] | None = None
        self.output_shape: tuple[int, ...] | None = None  # of the first output, one sample
        self.fp32_label_accuracy: float | None = None

    @property
    def reference(self) -> list[int]:
        """The fp32 full model's top-1 per calibration sample."""
        if self._reference is None:
            sess = session(self.full, self.providers, what="full model")
            ref = []
            for i in range(self.cal.samples):
                out = sess.run(None, self.cal.feed(i))
                self.output_shape = tuple(np.asarray(out[0]).shape)
                ref.append(top1(out))
            self._reference = ref
            if self.cal.labels is not None:
                self.fp32_label_accuracy = 100.0 * float(np.mean(np.asarray(self._reference) == self.cal.labels))
        return self._reference

    def _prepare(self, cut) -> tuple[Split, object, list[dict[str, np.ndarray]]]:
        """Split, tail session and every sample's cut tensors (fp32) for one cut, LRU-cached."""
        key = cut.id
        if key in self._sent:
            self._sent.move_to_end(key)
            return self._sent[key]
        split = self.make_split(cut)
        head = None
        if split.head is not None:
            head = session(split.head.SerializeToString(), self.providers, what=f"cut {cut.id} head")
        tail = session(split.tail.SerializeToString(), self.providers, what=f"cut {cut.id} tail")
        outs = self._head_outputs(head) if head is not None else [{} for _ in range(self.cal.samples)]
        sent = []
        for i, d in enumerate(outs):
            feed = self.cal.feed(i)
            for t, s in zip(split.tensors, split.sources):
                if s == "input":
                    d[t.name] = feed[t.name]
            sent.append(d)
        self._sent[key] = (split, tail, sent)
        while len(self._sent) > self.cache_cuts:
            self._sent.popitem(last=False)
        return self._sent[key]

    def _head_outputs(self, head) -> list[dict[str, np.ndarray]]:
        """Every sample's head outputs by name, each as a batch of one. Runs `batch` samples at a
        time when every head input has a free batch axis (and the outputs keep it), else one by one."""
        names = [o.name for o in head.get_outputs()]
        inputs = [x.name for x in head.get_inputs()]
        n, batch = self.cal.samples, self.batch
        free = all(self.cal.batched.get(x.name) and x.shape and not isinstance(x.shape[0], int)
                   for x in head.get_inputs())
        if free and batch > 1 and n > 1:
            out: list[dict[str, np.ndarray]] = []
            for lo in range(0, n, batch):
                hi = min(lo + batch, n)
                got = head.run(names, {k: self.cal.inputs[k][lo:hi] for k in inputs})
                if any(np.ndim(a) == 0 or np.shape(a)[0] != hi - lo for a in got):
                    log.info("head outputs do not keep the batch axis: running samples one by one")
                    break
                out += [{k: a[j : j + 1] for k, a in zip(names, got)} for j in range(hi - lo)]
            else:
                return out
        return [dict(zip(names, head.run(names, {k: self.cal.feed(i)[k] for k in inputs}))) for i in range(n)]

    def cut_tensors(self, cut) -> tuple[Split, list[dict[str, np.ndarray]]]:
        """The split and, per calibration sample, its fp32 cut tensors by name (head outputs and
        forwarded inputs, as the edge holds them before encoding). Not for edge-only cuts."""
        split, _, sent = self._prepare(cut)
        return split, sent

    def agreement(self, cut, bits: int) -> np.ndarray:
        """Per calibration sample: does head -> b-bit quantization -> tail give the fp32 full
        model's top-1? (bool array; all True at 32 bits and for edge-only, as the drop is 0 there.)"""
        if bits == 32 or cut.kind == "edge-only":
            return np.ones(self.cal.samples, bool)
        self(cut, bits)
        return self._agree[(cut.id, bits)].copy()

    def __call__(self, cut, bits: int) -> float | None:
        if bits == 32 or cut.kind == "edge-only":
            return 0.0
        key = (cut.id, bits)
        if key in self.measured:
            return self.measured[key]
        ref = self.reference
        split, tail, sent = self._prepare(cut)
        axes = {t.name: quant_axis(t) for t in split.tensors}
        preds = np.empty(self.cal.samples, np.int64)
        for i, d in enumerate(sent):
            q = {k: quantize(v, bits, axes.get(k)) for k, v in d.items()}
            preds[i] = top1(tail.run(None, {x.name: q[x.name] for x in tail.get_inputs()}))
        agree = preds == np.asarray(ref)
        drop = 100.0 * (1.0 - int(agree.sum()) / self.cal.samples)
        self._agree[key] = agree
        self.measured[key] = drop
        if self.cal.labels is not None:
            correct = int((preds == self.cal.labels.astype(np.int64)).sum())
            self.label_accuracy[key] = 100.0 * correct / self.cal.samples
        self.calls += 1
        if self.progress:
            self.progress(f"cut {cut.id} at {bits} bits: drop {drop:.2f} pp")
        log.info("accuracy: cut %s at %d bits: drop %.2f pp", cut.id, bits, drop)
        return drop
