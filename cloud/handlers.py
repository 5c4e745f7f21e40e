"""Plain functions that turn raw request bytes into InferResponses: parse -> check -> decode -> run.

    received = Received(raw_bytes, time.time_ns(), time.perf_counter())
    item = prepare(received, registry.find, limits)    # Prepared, or an InferResponse with `error`
    responses = run_batch([item, ...], limits)          # one tail run for the batch, one answer each
    handle(request, registry.find, limits, ...)         # both steps for one parsed request

A `Model` is anything the server can run for a (model, plan_sha256) pair: the `echo` model below
(returns what it decoded, for round-trip checks) or a plan bundle's tails (cloud/tails.py).
Every check that can fail on a client's input runs before anything is allocated for the tensors,
and errors never escape: every request gets a response carrying its id (or, when the bytes are not
even a protobuf, the id read from them as far as they go).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import grpc
import numpy as np

from cloud import batching
from protos import codec
from protos.coach.v1 import coach_pb2 as pb

log = logging.getLogger(__name__)

DTYPE_CODES = {
    "float32": pb.FLOAT32, "float16": pb.FLOAT16, "float64": pb.FLOAT64, "int8": pb.INT8,
    "uint8": pb.UINT8, "int32": pb.INT32, "int64": pb.INT64, "bool": pb.BOOL,
}


class RequestError(Exception):
    """A request the server refuses; `code` is a grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Spec(Protocol):
    """What a cut expects from the edge (protos.bundle.TensorSpec has these fields)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


class Model(Protocol):
    name: str
    plan_sha256: str

    def spec(self, cut_id: str) -> Sequence[Spec] | None:
        """The tensors a request for `cut_id` must carry (None: anything); RequestError if unknown."""
        ...

    def batchable(self, cut_id: str) -> bool:
        """Whether requests for `cut_id` may be concatenated along axis 0 into one run."""
        ...

    def run(self, cut_id: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def describe(self) -> pb.BundleInfo: ...


@dataclass
class EchoModel:
    """Returns its inputs: what the edge sent, as the cloud decoded it."""

    name: str = "echo"
    plan_sha256: str = ""

    def spec(self, cut_id: str) -> None:
        return None

    def batchable(self, cut_id: str) -> bool:
        return False

    def run(self, cut_id: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(tensors)

    def describe(self) -> pb.BundleInfo:
        return pb.BundleInfo(model=self.name, plan_sha256=self.plan_sha256)


@dataclass(frozen=True)
class Limits:
    max_elements: int = 64 * 1024 * 1024  # per tensor, checked before any allocation
    max_tensors: int = 64  # per request
    default_top_k: int = 5
    max_top_k: int = 1000


@dataclass
class Received:
    """A request as it came off the wire: its bytes and when it arrived."""

    raw: bytes
    unix_ns: int = field(default_factory=time.time_ns)
    t: float = field(default_factory=time.perf_counter)  # perf_counter() at arrival


@dataclass
class Prepared:
    """A checked, decoded request waiting for its tail run."""

    request: pb.InferRequest
    model: Model
    tensors: dict[str, np.ndarray]
    received: Received
    bytes_received: int
    decode_ms: float

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys may share one run: same model, plan, cut, dtypes, and shapes but
        for the first (batch) dimension."""
        return (self.model.name, self.model.plan_sha256, self.request.cut_id,
                tuple((k, v.dtype.str, v.shape[1:], v.ndim) for k, v in sorted(self.tensors.items())))


# ---------------------------------------------------------------- parsing


def read_request_id(raw: bytes) -> int:
    """Field 1 (request_id) of a possibly malformed InferRequest, read as far as the bytes go; 0 if absent."""
    i, n, found = 0, len(raw), 0
    while i < n:
        key, i = _varint(raw, i)
        if key is None:
            break
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(raw, i)
            if value is None:
                break
            if number == 1:
                found = value & (2**64 - 1)
        elif wire == 2:
            length, i = _varint(raw, i)
            if length is None or i + length > n:
                break
            i += length
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            break
    return found


def _varint(raw: bytes, i: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while i < len(raw) and shift < 70:
        b = raw[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
    return None, i


def parse(raw: bytes) -> pb.InferRequest:
    try:
        return pb.InferRequest.FromString(raw)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request is not a valid coach.v1.InferRequest ({len(raw)} bytes: {exc}); "
                           "check that the client uses the coach.v1 protocol") from None


# ---------------------------------------------------------------- checks


def _dtype_name(code: int) -> str:
    try:
        return pb.DataType.Name(code)
    except ValueError:
        return str(code)


def check_tensors(request: pb.InferRequest, spec: Sequence[Spec] | None, limits: Limits) -> None:
    """Size limits first (RESOURCE_EXHAUSTED), then names, dtypes and shapes against the cut's spec
    (INVALID_ARGUMENT). Reads only the declared metadata, never the data."""
    if len(request.tensors) > limits.max_tensors:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{len(request.tensors)} tensors in one request, the limit is {limits.max_tensors}")
    for t in request.tensors:
        n = math.prod(int(d) for d in t.shape) if all(d >= 0 for d in t.shape) else 0
        if n > limits.max_elements or any(d > limits.max_elements for d in t.shape):  # [0, 2^62] too
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"tensor '{t.name}': shape {list(t.shape)} has {n} elements, over the server's "
                               f"limit of {limits.max_elements}; send a smaller cut or fewer samples per request")
    names = [t.name for t in request.tensors]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"tensor '{sorted(dup)[0]}' sent twice")
    if spec is None:
        return
    expected = {s.name: s for s in spec}
    missing = [n for n in expected if n not in names]
    extra = [n for n in names if n not in expected]
    if missing or extra:
        what = (f"missing {missing}" if missing else "") + ("; " if missing and extra else "") + \
               (f"unexpected {extra}" if extra else "")
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"cut '{request.cut_id}' takes tensors {list(expected)}: {what}")
    for t in request.tensors:
        s = expected[t.name]
        if t.dtype != DTYPE_CODES[s.dtype]:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"tensor '{t.name}': dtype {_dtype_name(t.dtype)}, cut '{request.cut_id}' expects {s.dtype}")
        shape = list(t.shape)
        if len(shape) != len(s.shape) or any(want != -1 and got != want for got, want in zip(shape, s.shape)):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"tensor '{t.name}': shape {shape}, cut '{request.cut_id}' expects "
                               f"{list(s.shape)} (-1: any size)")


def decode_tensors(request: pb.InferRequest, limits: Limits) -> dict[str, np.ndarray]:
    out = {}
    for t in request.tensors:
        if t.name in out:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"tensor '{t.name}' sent twice")
        try:
            with np.errstate(all="ignore"):  # huge scales overflow to inf: the tail sees what was sent
                out[t.name] = codec.decode(t, max_elements=limits.max_elements)
        except ValueError as exc:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if "over the limit" in str(exc) else grpc.StatusCode.INVALID_ARGUMENT
            raise RequestError(code, str(exc)) from None
    return out


# ---------------------------------------------------------------- the two steps


def one_line(message: str, limit: int = 500) -> str:
    """A message safe to answer and log: control characters escaped (names come from clients), bounded."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def error_response(request_id: int, exc: Exception, received: Received | None = None,
                   bytes_received: int = 0) -> pb.InferResponse:
    resp = pb.InferResponse(request_id=request_id)
    if received is not None:
        resp.timing.receive_unix_ns = received.unix_ns
        resp.timing.bytes_received = bytes_received or len(received.raw)
    if isinstance(exc, RequestError):
        resp.error.code = exc.code.value[0]
        resp.error.message = one_line(str(exc))
    else:  # a bug or a model failure: this request fails, the server goes on
        resp.error.code = grpc.StatusCode.INTERNAL.value[0]
        resp.error.message = one_line(f"internal error: {type(exc).__name__}: {exc}")
    return resp


def prepare(received: Received, find_model: Callable[[str, str], Model], limits: Limits,
            request: pb.InferRequest | None = None) -> Prepared | pb.InferResponse:
    """Parse (unless `request` is given), find the model, check and decode. An error answers at once."""
    t0 = time.perf_counter()
    request_id = 0
    try:
        if request is None:
            request_id = read_request_id(received.raw)
            request = parse(received.raw)
        request_id = request.request_id
        model = find_model(request.model, request.plan_sha256)
        nbytes = len(received.raw) if received.raw else request.ByteSize()
        if request.measure_only:  # a link probe: only its arrival matters
            return measured(request_id, received, nbytes)
        check_tensors(request, model.spec(request.cut_id), limits)
        tensors = decode_tensors(request, limits)
    except Exception as exc:
        if not isinstance(exc, RequestError):
            log.exception("request %d failed before its run", request_id)
        return error_response(request_id, exc, received)
    return Prepared(request, model, tensors, received, nbytes, (time.perf_counter() - t0) * 1e3)


def measured(request_id: int, received: Received, nbytes: int) -> pb.InferResponse:
    """The answer to a measure_only request: its arrival (time, bytes), nothing decoded or run."""
    resp = pb.InferResponse(request_id=request_id)
    resp.timing.receive_unix_ns = received.unix_ns
    resp.timing.bytes_received = nbytes
    return resp


def topk(logits: np.ndarray, k: int) -> list[pb.ClassScore]:
    """Softmax top-k of the first row of a model output (non-finite values score 0)."""
    if logits.size == 0 or k <= 0:
        return []
    with np.errstate(all="ignore"):
        v = np.asarray(logits, np.float64).reshape(logits.shape[0] if logits.ndim > 1 else 1, -1)[0]
        v = np.where(np.isfinite(v), v, -np.inf)
        if not np.isfinite(v).any():
            p = np.zeros_like(v)
        else:
            p = np.exp(v - v.max())
            p /= p.sum()
    k = min(k, v.size)
    idx = np.argpartition(-p, k - 1)[:k]
    idx = idx[np.argsort(-p[idx], kind="stable")]
    return [pb.ClassScore(index=int(i), score=float(p[i])) for i in idx]


def _answer(item: Prepared, outputs: dict[str, np.ndarray], started: float, compute_ms: float,
            batch_size: int, limits: Limits) -> pb.InferResponse:
    req = item.request
    resp = pb.InferResponse(request_id=req.request_id)
    tm = resp.timing
    tm.receive_unix_ns = item.received.unix_ns
    tm.bytes_received = item.bytes_received
    tm.decode_ms = item.decode_ms
    tm.queue_ms = max(0.0, (started - item.received.t) * 1e3 - item.decode_ms)
    tm.compute_ms = compute_ms
    tm.batch_size = batch_size
    first = next(iter(outputs.values()), None)
    if first is not None and first.ndim and np.issubdtype(first.dtype, np.number):
        resp.topk.extend(topk(first, min(req.top_k or limits.default_top_k, limits.max_top_k)))
    if req.return_outputs:
        resp.outputs.extend(codec.encode(v, 32, name=k) for k, v in outputs.items())
    return resp


def run_batch(items: list[Prepared], limits: Limits) -> list[pb.InferResponse]:
    """One tail run for requests that share a batch key (or one request); an answer for each."""
    started = time.perf_counter()
    model, cut = items[0].model, items[0].request.cut_id
    try:
        if len(items) == 1:
            results = [model.run(cut, items[0].tensors)]
        else:
            feeds, rows = batching.concat([it.tensors for it in items])
            results = batching.split(model.run(cut, feeds), rows)
    except Exception as exc:
        if not isinstance(exc, RequestError):
            log.exception("tail run of model %s cut %s failed (batch of %d)", model.name, cut, len(items))
        return [error_response(it.request.request_id, exc, it.received, it.bytes_received) for it in items]
    compute_ms = (time.perf_counter() - started) * 1e3 / len(items)
    answers = []
    for it, out in zip(items, results):
        try:
            answers.append(_answer(it, out, started, compute_ms, len(items), limits))
        except Exception as exc:
            log.exception("answer to request %d failed", it.request.request_id)
            answers.append(error_response(it.request.request_id, exc, it.received, it.bytes_received))
    return answers


def answer_alone(received: Received, find_model: Callable[[str, str], Model], limits: Limits) -> pb.InferResponse:
    """prepare and run_batch in one step, for a request that has nothing to be batched with."""
    item = prepare(received, find_model, limits)
    return item if isinstance(item, pb.InferResponse) else run_batch([item], limits)[0]


def handle(
    request: pb.InferRequest,
    find_model: Callable[[str, str], Model],
    limits: Limits,
    receive_unix_ns: int,
    bytes_received: int,
    received_at: float,
) -> pb.InferResponse:
    """Check, decode, run and answer one parsed request. `received_at` is time.perf_counter() at arrival."""
    received = Received(b"", receive_unix_ns, received_at)
    item = prepare(received, find_model, limits, request=request)
    if isinstance(item, pb.InferResponse):
        item.timing.bytes_received = bytes_received
        return item
    item.bytes_received = bytes_received
    return run_batch([item], limits)[0]
