"""Dynamic micro-batching: requests for the same (bundle, cut, shapes) from any stream share one run.

    feeds, rows = concat([tensors_a, tensors_b])       # along axis 0; rows = (rows of a, rows of b)
    outs_a, outs_b = split(model_outputs, rows)

    batcher = MicroBatcher(run, pool, max_batch=8, timeout_s=0.002, slots=1)
    response = await batcher.submit(key, item, batchable=True)

Batching is opportunistic: while fewer than `slots` runs are going (the compute threads), a request
runs at once with whatever else is waiting, so a lone stream never waits for company. While all
slots are busy, requests of a key collect into a batch; it runs when a slot frees (the oldest open
batch first), when it holds `max_batch` requests, or when `timeout_s` has passed since it opened
(then it queues in the pool), whichever comes first. Keys whose tail cannot take a batch (a fixed
batch dimension) run each request at once. Runs go to a thread pool, off the event loop.
`run_now` is the lone request's short way: with a slot free and no batch waiting there is nothing to
wait for, so the caller's whole job (decode and run) goes to the pool in one step.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Any, Callable, Hashable

import numpy as np

log = logging.getLogger(__name__)


def concat(items: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """Concatenate each tensor of several requests along axis 0; also return each request's rows."""
    rows = tuple(int(next(iter(d.values())).shape[0]) for d in items)
    for d, r in zip(items, rows):
        if any(v.ndim == 0 or v.shape[0] != r for v in d.values()):
            raise ValueError("cannot batch: the tensors of one request differ in their first dimension")
    return {k: np.concatenate([d[k] for d in items], axis=0) for k in items[0]}, rows


def split(outputs: dict[str, np.ndarray], rows: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    """Inverse of concat for the outputs of a batched run."""
    total = sum(rows)
    for k, v in outputs.items():
        if v.ndim == 0 or v.shape[0] != total:
            raise ValueError(f"output '{k}' has shape {list(v.shape)}, not a batch of {total}; cannot split")
    bounds = np.cumsum((0,) + rows)
    return [{k: v[bounds[i]:bounds[i + 1]] for k, v in outputs.items()} for i in range(len(rows))]


class MicroBatcher:
    """Collects items per key on the event loop and runs `run(items) -> results` in `pool`."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], pool: Executor, max_batch: int = 8,
                 timeout_s: float = 0.002, on_batch: Callable[[int], None] | None = None, slots: int = 1):
        self.run = run
        self.pool = pool
        self.max_batch = max(1, max_batch)
        self.timeout_s = max(0.0, timeout_s)
        self.on_batch = on_batch
        self.slots = max(1, slots)  # runs that can go at the same time (the pool's threads)
        self._running = 0
        self._open: dict[Hashable, list[tuple[Any, asyncio.Future]]] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}

    async def submit(self, key: Hashable, item: Any, batchable: bool = True) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not batchable or self.max_batch == 1:
            self._launch([(item, fut)])
            return await fut
        batch = self._open.setdefault(key, [])
        batch.append((item, fut))
        if len(batch) >= self.max_batch or self._running < self.slots:
            self._flush(key)
        elif len(batch) == 1:
            self._timers[key] = loop.call_later(self.timeout_s, self._flush, key)
        return await fut

    def run_now(self, fn: Callable[..., Any], *args) -> asyncio.Future | None:
        """Run fn(*args) in the pool in a slot of its own if a slot is free and no batch is waiting;
        else None (submit, and wait for company or a slot)."""
        if self._open or self._running >= self.slots:
            return None
        self._running += 1
        job = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        job.add_done_callback(lambda _: self._release())
        return job

    def _release(self) -> None:
        """A run ended: its slot goes to the oldest waiting batch."""
        self._running -= 1
        if self._open and self._running < self.slots:
            self._flush(next(iter(self._open)))

    def waiting(self) -> int:
        """Requests in open batches (waiting for a free slot, company or the timeout)."""
        return sum(len(b) for b in self._open.values())

    def _flush(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        batch = self._open.pop(key, None)
        if batch:
            self._launch(batch)

    def _launch(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(batch))
        items = [item for item, _ in batch]
        self._running += 1
        job = asyncio.get_running_loop().run_in_executor(self.pool, self.run, items)

        def done(job: asyncio.Future) -> None:
            self._release()
            exc = None if job.cancelled() else job.exception()
            results = None if exc is not None or job.cancelled() else job.result()
            for i, (_, fut) in enumerate(batch):
                if fut.done():  # the waiting request was cancelled (its stream went away)
                    continue
                if results is not None:
                    fut.set_result(results[i])
                else:
                    fut.set_exception(exc or asyncio.CancelledError())

        job.add_done_callback(done)
