"""Plain functions that turn one InferRequest into one InferResponse.

A `Model` is anything the server can run for a (model, plan_sha256) pair. The foundation ships the
`echo` model (decodes the tensors and returns them, for round-trip checks); plan bundles add their
tails (cloud/tails.py). Errors never escape: every request gets a response with its id.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import grpc
import numpy as np

from protos import codec
from protos.coach.v1 import coach_pb2 as pb

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the server refuses; `code` is a grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Model(Protocol):
    name: str
    plan_sha256: str

    def run(self, cut_id: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class EchoModel:
    """Returns its inputs: what the edge sent, as the cloud decoded it."""

    name: str = "echo"
    plan_sha256: str = ""

    def run(self, cut_id: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(tensors)


@dataclass(frozen=True)
class Limits:
    max_elements: int = 64 * 1024 * 1024  # per tensor, checked before any allocation
    default_top_k: int = 5


def topk(logits: np.ndarray, k: int) -> list[pb.ClassScore]:
    """Softmax top-k of the first row of a model output."""
    v = np.asarray(logits, np.float64).reshape(logits.shape[0] if logits.ndim > 1 else 1, -1)[0]
    if v.size == 0:
        return []
    p = np.exp(v - v.max())
    p /= p.sum()
    k = min(k, v.size)
    idx = np.argpartition(-p, k - 1)[:k]
    idx = idx[np.argsort(-p[idx], kind="stable")]
    return [pb.ClassScore(index=int(i), score=float(p[i])) for i in idx]


def decode_tensors(request: pb.InferRequest, limits: Limits) -> dict[str, np.ndarray]:
    out = {}
    for t in request.tensors:
        if t.name in out:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"tensor '{t.name}' sent twice")
        try:
            out[t.name] = codec.decode(t, max_elements=limits.max_elements)
        except ValueError as exc:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if "over the limit" in str(exc) else grpc.StatusCode.INVALID_ARGUMENT
            raise RequestError(code, str(exc)) from None
    return out


def handle(
    request: pb.InferRequest,
    find_model: Callable[[str, str], Model],
    limits: Limits,
    receive_unix_ns: int,
    bytes_received: int,
    received_at: float,
) -> pb.InferResponse:
    """Decode, run, answer. `received_at` is time.perf_counter() when the request arrived."""
    resp = pb.InferResponse(request_id=request.request_id)
    timing = resp.timing
    timing.receive_unix_ns = receive_unix_ns
    timing.bytes_received = bytes_received
    timing.batch_size = 1
    t0 = time.perf_counter()
    timing.queue_ms = (t0 - received_at) * 1e3
    try:
        model = find_model(request.model, request.plan_sha256)
        tensors = decode_tensors(request, limits)
        t1 = time.perf_counter()
        timing.decode_ms = (t1 - t0) * 1e3
        outputs = model.run(request.cut_id, tensors)
        timing.compute_ms = (time.perf_counter() - t1) * 1e3
        first = next(iter(outputs.values()), None)
        if first is not None and np.issubdtype(first.dtype, np.number):
            resp.topk.extend(topk(first, request.top_k or limits.default_top_k))
        if request.return_outputs:
            resp.outputs.extend(codec.encode(v, 32, name=k) for k, v in outputs.items())
    except RequestError as exc:
        resp.error.code = exc.code.value[0]
        resp.error.message = str(exc)
    except Exception as exc:  # a bug or a model failure: this request fails, the server goes on
        log.exception("request %d failed", request.request_id)
        resp.error.code = grpc.StatusCode.INTERNAL.value[0]
        resp.error.message = f"internal error: {type(exc).__name__}: {exc}"
    return resp
