"""Ending a client-streaming call early without losing its status.

A grpc.aio client whose request write fails after the server's status arrived reports
INTERNAL "Internal error from Core" instead of that status (grpc/grpc#36066, ~3% of refused
streams here). So before refusing a stream the server reads, unparsed and dropped, what the
client already sent: a bounded time and number of messages, so a refused client cannot hold
the stream open. Then it ends the call with the status set.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

DRAIN_S = 0.5  # read what was sent for at most this long ...
DRAIN_MESSAGES = 64  # ... or this many messages


async def _drain(requests, limit: int) -> None:
    n = 0
    async for _ in requests:
        n += 1
        if n >= limit:
            return


async def refuse_stream(requests, context, code: grpc.StatusCode, message: str) -> None:
    """Read (bounded) and drop the pending requests, then set `code` and `message` on the call.
    The caller returns right after; the client sees exactly this status."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(_drain(requests, DRAIN_MESSAGES), DRAIN_S)
    context.set_code(code)
    context.set_details(message)
