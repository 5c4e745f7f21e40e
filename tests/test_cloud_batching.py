"""Unit tests of the cloud's pure parts: batching, request checks, request-id recovery, top-k."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from cloud.batching import MicroBatcher, concat, split
from cloud.handlers import Limits, RequestError, check_tensors, read_request_id, topk
from protos import codec
from protos.coach.v1 import coach_pb2 as pb


def test_concat_split_round_trip_and_refusals():
    rng = np.random.default_rng(1)
    items = [{"a": rng.standard_normal((r, 3)), "b": rng.standard_normal((r, 2, 2))} for r in (1, 3, 2)]
    feeds, rows = concat(items)
    assert rows == (1, 3, 2) and feeds["a"].shape == (6, 3) and feeds["b"].shape == (6, 2, 2)
    back = split({"y": feeds["a"] * 2}, rows)
    for it, out in zip(items, back):
        assert np.array_equal(out["y"], it["a"] * 2)
    with pytest.raises(ValueError, match="first dimension"):
        concat([{"a": np.zeros((2, 3)), "b": np.zeros((1, 3))}])
    with pytest.raises(ValueError, match="not a batch of 6"):
        split({"y": np.zeros((5, 1))}, rows)


def _run_batcher(coro_fn):
    pool = ThreadPoolExecutor(2)
    try:
        return asyncio.run(coro_fn(pool))
    finally:
        pool.shutdown()


def _gated_run(calls):
    """A run that records its batch and blocks while the gate is closed (a busy compute thread)."""
    gate = threading.Event()
    lock = threading.Lock()

    def run(items):
        with lock:
            calls.append(list(items))
        gate.wait(10)
        return [x * 10 for x in items]

    return run, gate


def test_microbatcher_runs_at_once_when_idle_and_batches_while_busy():
    calls = []
    run, gate = _gated_run(calls)

    async def go(pool):
        b = MicroBatcher(run, pool, max_batch=3, timeout_s=60.0, slots=1)
        first = asyncio.ensure_future(b.submit("k", 0))  # idle: runs at once, no wait for company
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(b.submit("k", i)) for i in (1, 2)]  # busy: they collect
        other = asyncio.ensure_future(b.submit("j", 9))  # another key: its own batch
        await asyncio.sleep(0.05)
        assert calls == [[0]]
        gate.set()  # the slot frees: the oldest open batch goes, then the next
        done = await asyncio.wait_for(asyncio.gather(first, *waiting, other), 5)  # (not the 60 s timer)
        gate.clear()
        full = [asyncio.ensure_future(b.submit("k", i)) for i in (3, 4, 5, 6)]  # busy with [3]: 4, 5, 6 fill
        await asyncio.sleep(0.05)
        assert calls[-2:] == [[3], [4, 5, 6]]  # max_batch launches even while the slot is busy
        gate.set()
        return done, await asyncio.wait_for(asyncio.gather(*full), 5)

    done, full = _run_batcher(go)
    assert done == [0, 10, 20, 90] and full == [30, 40, 50, 60]
    assert calls[:3] == [[0], [1, 2], [9]]


def test_run_now_takes_a_free_slot_only_and_hands_it_on_to_the_waiting_batch():
    """A lone request's whole job (decode and run) goes to the pool in one step, in a slot of its own;
    with the slot busy or a batch waiting it is refused (None), and its end frees the slot for the
    oldest waiting batch."""
    calls = []
    run, gate = _gated_run(calls)
    alone = threading.Event()

    def job(x):
        alone.wait(10)
        return x + 1

    async def go(pool):
        b = MicroBatcher(run, pool, max_batch=8, timeout_s=60.0, slots=1)
        first = b.run_now(job, 1)
        assert first is not None
        assert b.run_now(job, 2) is None  # the slot is taken
        waiting = [asyncio.ensure_future(b.submit("k", i)) for i in (3, 4)]  # they collect behind it
        await asyncio.sleep(0.05)
        assert calls == [] and b.waiting() == 2
        alone.set()
        assert await asyncio.wait_for(first, 5) == 2
        await asyncio.sleep(0.05)
        assert calls == [[3, 4]]  # the slot went to the waiting batch at once (not the 60 s timer)
        assert b.run_now(job, 5) is None  # busy again
        gate.set()
        res = await asyncio.wait_for(asyncio.gather(*waiting), 5)
        nxt = b.run_now(job, 6)  # idle again: runs at once
        return res, await asyncio.wait_for(nxt, 5)

    res, last = _run_batcher(go)
    assert res == [30, 40] and last == 7


def test_microbatcher_times_out_while_busy_and_never_batches_across_keys():
    calls = []
    run, gate = _gated_run(calls)

    async def go(pool):
        b = MicroBatcher(run, pool, max_batch=3, timeout_s=0.05, slots=1)
        busy = asyncio.ensure_future(b.submit("k", 0))
        late = [asyncio.ensure_future(b.submit("k", i)) for i in (7, 8)]  # 2 < 3: flushed by the timer
        mixed = [asyncio.ensure_future(b.submit("a", 1)), asyncio.ensure_future(b.submit("b", 2))]
        alone = [asyncio.ensure_future(b.submit("k", i, batchable=False)) for i in (4, 5)]
        await asyncio.sleep(0.3)  # the timers fired while the slot was still busy
        queued = sorted(len(c) for c in calls)
        gate.set()
        return queued, await asyncio.wait_for(asyncio.gather(busy, *late, *mixed, *alone), 5)

    queued, res = _run_batcher(go)
    assert res == [0, 70, 80, 10, 20, 40, 50]
    assert [7, 8] in calls and [1] in calls and [2] in calls  # keys never share a batch
    assert sorted(len(c) for c in calls) == [1, 1, 1, 1, 1, 2]
    assert len(queued) >= 2  # at least the first run and the timed-out [7, 8] had gone to the pool


def test_microbatcher_propagates_a_failed_run_to_each_request():
    def run(items):
        raise RuntimeError("boom")

    async def go(pool):
        b = MicroBatcher(run, pool, max_batch=2, timeout_s=0.01)
        return await asyncio.gather(b.submit("k", 1), b.submit("k", 2), return_exceptions=True)

    res = _run_batcher(go)
    assert all(isinstance(r, RuntimeError) for r in res)


def test_read_request_id_from_broken_bytes():
    req = pb.InferRequest(request_id=123456789012, model="m", cut_id="c1",
                          tensors=[codec.encode(np.ones((2, 2), np.float32), 8, name="h")])
    raw = req.SerializeToString()
    assert read_request_id(raw) == 123456789012
    assert read_request_id(raw[:-5]) == 123456789012  # truncated inside a tensor: the id came first
    assert read_request_id(b"") == 0 and read_request_id(b"\xff\xff\xff") == 0
    # The id after a model name, as a reordered serializer could put it.
    raw2 = pb.InferRequest(model="abc").SerializeToString() + pb.InferRequest(request_id=5).SerializeToString()
    assert read_request_id(raw2) == 5


@dataclass
class _Spec:
    name: str
    dtype: str
    shape: tuple


def _req(*tensors, cut="c1"):
    return pb.InferRequest(request_id=1, cut_id=cut, tensors=list(tensors))


def test_check_tensors_each_kind_of_mismatch():
    spec = [_Spec("h", "float32", (-1, 4, 2, 2))]
    ok = codec.encode(np.ones((3, 4, 2, 2), np.float32), 8, name="h")
    check_tensors(_req(ok), spec, Limits())  # batch dim -1 takes any size

    def code_of(req, limits=Limits()):
        with pytest.raises(RequestError) as e:
            check_tensors(req, spec, limits)
        return e.value.code, str(e.value)

    assert code_of(_req(codec.encode(np.ones((1, 4, 2, 3), np.float32), name="h")))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, msg = code_of(_req(codec.encode(np.ones((1, 4, 2, 2), np.int32), name="h")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "INT32" in msg and "float32" in msg
    code, msg = code_of(_req(codec.encode(np.ones((1, 4, 2, 2), np.float32), name="x")))
    assert "missing ['h']" in msg and "unexpected ['x']" in msg
    code, msg = code_of(_req(ok, ok))
    assert "sent twice" in msg
    huge = pb.Tensor(name="h", dtype=pb.FLOAT32, shape=[1 << 20, 4, 1 << 20, 2])
    code, msg = code_of(_req(huge))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "over the server's limit" in msg
    code, _ = code_of(_req(*[codec.encode(np.ones(1, np.float32), name=f"t{i}") for i in range(5)]), Limits(max_tensors=4))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_topk_softmax_order_and_non_finite():
    s = topk(np.array([[1.0, 3.0, 2.0, -1.0]]), 3)
    assert [c.index for c in s] == [1, 2, 0]
    p = np.exp([1.0, 3.0, 2.0, -1.0])
    p /= p.sum()
    assert s[0].score == pytest.approx(p[1], rel=1e-6)
    s = topk(np.array([np.nan, 1.0, np.inf]), 2)
    assert s[0].index == 1 and np.isfinite([c.score for c in s]).all()
    assert topk(np.zeros((1, 0)), 5) == []
