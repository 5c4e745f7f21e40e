"""`coach bench fuzz --seconds N`: a long fuzzing run of the codec and the cloud's request handling.

Inputs are InferRequests built for the tiny bundle (bench.load_bench.write_tiny_bundle) and then
damaged: random dtypes, shapes (negative, huge), bit widths, NaN/Inf/negative scales, zero points,
axes, truncated or padded data, compression flags, duplicated or renamed tensors, unknown models,
plans and cuts; and at the byte level: flipped bytes, cut-short or random messages. Each input goes
through the same path the server uses (cloud.handlers.prepare + run_batch); every
`--server-every`-th through a real server over one stream; every input's tensors also straight into
protos.codec.decode. A crash is an exception escaping, an INTERNAL answer, a stream that dies, or a
codec error other than ValueError; a hang is an input slower than --hang-s. Writes
bench/results/fuzz.json. (atheris is not installed here; this is a structure-aware random fuzzer.)

The generators take a `Draw` (random choices), so tests/test_cloud_fuzz.py drives the very same
generators from hypothesis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from protos import codec
from protos.coach.v1 import coach_pb2 as pb

ALLOWED = {0, 3, 5, 8}  # OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED


class Draw(Protocol):
    def int(self, lo: int, hi: int) -> int: ...
    def choice(self, seq: Sequence): ...
    def bytes(self, n: int) -> bytes: ...


class RngDraw:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi, endpoint=True))

    def choice(self, seq: Sequence):
        return seq[int(self.rng.integers(len(seq)))]

    def bytes(self, n: int) -> bytes:
        return self.rng.bytes(n)


# ---------------------------------------------------------------- requests

SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -1.0, 1e-45, 1e38, 3.4e38, 1.0)


def _array(draw: Draw, shape) -> np.ndarray:
    rng = np.random.default_rng(draw.int(0, 2**32 - 1))
    x = rng.standard_normal(shape).astype(np.float32) * draw.choice((1e-6, 1.0, 1e4))
    if x.size and draw.int(0, 9) == 0:  # a few non-finite values
        x.reshape(-1)[draw.int(0, x.size - 1)] = draw.choice((math.nan, math.inf, -math.inf))
    return x


def _tensor(draw: Draw, name: str, shape) -> pb.Tensor:
    x = _array(draw, shape)
    bits = draw.choice(codec.SUPPORTED_BITS)
    axis = draw.choice((None, 0, 1)) if bits <= 8 and x.ndim > 1 else None
    compress = draw.choice((None, None, "zstd", "lz4"))
    try:
        return codec.encode(x, bits, axis=axis, compress=compress, name=name)
    except ValueError:  # NaN/Inf cannot be quantized: send it raw
        return codec.encode(x, 32, name=name)


def _mutate(draw: Draw, req: pb.InferRequest) -> None:
    """Apply one random damage to a request (in place)."""
    ts = req.tensors
    t = ts[draw.int(0, len(ts) - 1)] if len(ts) else None
    kind = draw.int(0, 19)
    if t is None or kind == 0:
        req.model = draw.choice(("tiny", "echo", "nope", "", "tiny\x00", "m\r\n" * 200))
        req.plan_sha256 = draw.choice(("", req.plan_sha256, "0" * 64, "zz"))
    elif kind == 1:
        req.cut_id = draw.choice(("c1", "cloud-only", "edge-only", "", "c9"))
    elif kind == 2:
        t.dtype = draw.int(0, 12)
    elif kind == 3:
        i = draw.int(0, max(0, len(t.shape) - 1))
        v = draw.choice((-1, 0, 1, 2, 7, 2**20, 2**31, 2**62, -(2**63)))
        if len(t.shape):
            t.shape[i] = v
        else:
            t.shape.append(v)
    elif kind == 4:
        t.shape.extend([draw.int(0, 3)] * draw.int(1, 20))  # rank up to 24
    elif kind == 5:
        del t.shape[:]
    elif kind == 6:
        t.quantization.bits = draw.choice((0, 1, 5, 7, 9, 12, 15, 17, 31, 32, 33, 64, 2**32 - 1))
    elif kind == 7 and len(t.quantization.scales):
        t.quantization.scales[draw.int(0, len(t.quantization.scales) - 1)] = draw.choice(SPECIAL_FLOATS)
    elif kind == 8:
        t.quantization.zero_points.append(draw.int(-(2**31), 2**31 - 1))
    elif kind == 9:
        t.quantization.axis = draw.int(-3, 9)
        t.quantization.scheme = draw.int(0, 4)
    elif kind == 10:
        t.data = t.data[: draw.int(0, len(t.data))]
    elif kind == 11:
        t.data = t.data + draw.bytes(draw.int(1, 64))
    elif kind == 12:
        t.compression = draw.int(0, 5)
    elif kind == 13:
        t.data = draw.bytes(draw.int(0, 256))
    elif kind == 14:
        ts.append(t)  # duplicate
    elif kind == 15:
        t.name = draw.choice(("x", "h", "logits", "", "h" * 300, "h\nINFO forged log line", "\x00\x1b[31m"))
    elif kind == 16:
        req.top_k = draw.choice((0, 1, 5, 1000, 2**32 - 1))
        req.return_outputs = bool(draw.int(0, 1))
    elif kind == 17:
        t.quantization.bit_order = draw.int(0, 7)
    elif kind == 18:
        del ts[:]
    else:
        del t.quantization.scales[:]


def random_request(draw: Draw, model_name: str, plan_sha256: str, request_id: int) -> pb.InferRequest:
    """A request for the tiny bundle (or echo) with 0..3 damages."""
    cut = draw.choice(("c1", "c1", "cloud-only", "echo"))
    batch = draw.int(1, 3)
    if cut == "echo":
        shape = tuple(draw.int(0, 5) for _ in range(draw.int(0, 4)))
        req = pb.InferRequest(model="echo", cut_id="any", tensors=[_tensor(draw, "t", shape)])
    elif cut == "c1":
        req = pb.InferRequest(model=model_name, plan_sha256=plan_sha256, cut_id="c1",
                              tensors=[_tensor(draw, "h", (batch, 8, 8, 8))])
    else:
        req = pb.InferRequest(model=model_name, plan_sha256=plan_sha256, cut_id="cloud-only",
                              tensors=[_tensor(draw, "x", (batch, 3, 8, 8))])
    req.request_id = request_id
    req.top_k = draw.choice((0, 3))
    req.return_outputs = bool(draw.int(0, 1))
    for _ in range(draw.choice((0, 1, 1, 2, 3))):
        _mutate(draw, req)
    return req


def damage_bytes(draw: Draw, raw: bytes) -> bytes:
    """Byte-level damage to a serialized request: flips, cuts, splices, or noise."""
    kind = draw.int(0, 4)
    if kind == 0 and raw:
        b = bytearray(raw)
        for _ in range(draw.int(1, 8)):
            b[draw.int(0, len(b) - 1)] = draw.int(0, 255)
        return bytes(b)
    if kind == 1:
        return raw[: draw.int(0, len(raw))]
    if kind == 2:
        i = draw.int(0, len(raw))
        return raw[:i] + draw.bytes(draw.int(1, 32)) + raw[i:]
    if kind == 3:
        return draw.bytes(draw.int(0, 512))
    return raw


def random_input(draw: Draw, model_name: str, plan_sha256: str, request_id: int) -> bytes:
    raw = random_request(draw, model_name, plan_sha256, request_id).SerializeToString()
    return damage_bytes(draw, raw) if draw.int(0, 3) == 0 else raw


# ---------------------------------------------------------------- checks


def check_handling(raw: bytes, registry, limits) -> int:
    """Run one input through the server's handling; return its answer's code; raise on a crash."""
    from cloud.handlers import Prepared, Received, prepare, read_request_id, run_batch

    item = prepare(Received(raw), registry.find, limits)
    resp = run_batch([item], limits)[0] if isinstance(item, Prepared) else item
    if resp.error.code not in ALLOWED:
        raise AssertionError(f"answer with code {resp.error.code}: {resp.error.message}")
    if not resp.error.message.isprintable() or len(resp.error.message) > 500:
        raise AssertionError(f"answer's message is not one bounded line: {resp.error.message[:200]!r}")
    try:
        expected_id = pb.InferRequest.FromString(raw).request_id
    except Exception:
        expected_id = read_request_id(raw)
    if resp.request_id != expected_id:
        raise AssertionError(f"answer carries id {resp.request_id}, request had {expected_id}")
    return resp.error.code


def check_codec(raw: bytes) -> str:
    """Decode every tensor of a (parsable) input with the codec: an array or a ValueError, nothing else."""
    try:
        req = pb.InferRequest.FromString(raw)
    except Exception:
        return "unparsable"
    out = "ok"
    for t in req.tensors:
        try:
            with np.errstate(all="ignore"):
                codec.decode(t, max_elements=1 << 22)
        except ValueError:
            out = "refused"
    return out


def setup(workdir: Path):
    """The tiny bundle's model and the echo model in a registry, with the server's default-ish limits."""
    from bench.load_bench import write_tiny_bundle
    from cloud.handlers import EchoModel, Limits
    from cloud.server import ModelRegistry
    from cloud.tails import Runtime, load_model

    model = load_model(write_tiny_bundle(workdir / "tiny"), Runtime(("CPUExecutionProvider",), 1))
    return model, ModelRegistry([model, EchoModel()]), Limits(max_elements=1 << 22)


async def through_server(model, registry_models, raws: list[bytes]) -> list[pb.InferResponse]:
    """Send raw inputs over one stream of a real server; every one must be answered, the stream must end OK."""
    import grpc

    from cloud.handlers import Limits
    from cloud.server import ServerConfig, serve

    running = await serve(registry_models, ServerConfig(limits=Limits(max_elements=1 << 22)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            raw = ch.stream_stream("/coach.v1.CollaborativeInference/Stream",
                                   request_serializer=lambda b: b, response_deserializer=pb.InferResponse.FromString)
            out = [r async for r in raw(iter(raws))]
    finally:
        await running.shutdown(grace_s=1)
    if len(out) != len(raws):
        raise AssertionError(f"{len(raws)} inputs, {len(out)} answers")
    bad = [r for r in out if r.error.code not in ALLOWED]
    if bad:
        raise AssertionError(f"answer with code {bad[0].error.code}: {bad[0].error.message}")
    return out


# ---------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    p.add_argument("--server-every", type=int, default=20, help="send every Nth input through a real server")
    p.add_argument("--hang-s", type=float, default=5.0, help="an input slower than this counts as a hang")
    p.add_argument("--out", type=Path, default=Path("bench/results/fuzz.json"))


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    seed = args.seed if args.seed is not None else time.time_ns() % 2**32
    draw = RngDraw(np.random.default_rng(seed))
    codes: Counter = Counter()
    codec_outcomes: Counter = Counter()
    crashes: list[dict] = []
    hangs = 0
    slowest = 0.0
    server_inputs = 0
    pending_server: list[bytes] = []
    with tempfile.TemporaryDirectory() as tmp:
        model, registry, limits = setup(Path(tmp))
        models = list(registry)
        t_end = time.perf_counter() + args.seconds
        n = 0
        while time.perf_counter() < t_end:
            raw = random_input(draw, model.name, model.plan_sha256, n)
            n += 1
            t0 = time.perf_counter()
            try:
                codes[check_handling(raw, registry, limits)] += 1
                codec_outcomes[check_codec(raw)] += 1
            except Exception as exc:
                crashes.append({"input_hex": raw[:4096].hex(), "error": f"{type(exc).__name__}: {exc}"})
            dt = time.perf_counter() - t0
            slowest = max(slowest, dt)
            hangs += dt > args.hang_s
            if args.server_every > 0 and n % args.server_every == 0:
                pending_server.append(raw)
            if len(pending_server) >= 200 or (pending_server and time.perf_counter() >= t_end):
                try:
                    asyncio.run(through_server(model, models, pending_server))
                except Exception as exc:
                    crashes.append({"input_hex": "(server batch)", "error": f"{type(exc).__name__}: {exc}"})
                server_inputs += len(pending_server)
                pending_server = []
    names = {0: "OK", 3: "INVALID_ARGUMENT", 5: "NOT_FOUND", 8: "RESOURCE_EXHAUSTED"}
    result = {"seed": seed, "seconds": args.seconds, "inputs": n, "server_inputs": server_inputs,
              "answers": {names.get(k, str(k)): v for k, v in sorted(codes.items())},
              "codec": dict(codec_outcomes), "crashes": len(crashes), "crash_samples": crashes[:20],
              "hangs": hangs, "slowest_input_s": slowest, "atheris": False}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    os.replace(tmp_out, args.out)

    table = Table(title=f"coach bench fuzz: {n} inputs in {args.seconds:g} s (seed {seed})")
    table.add_column("outcome")
    table.add_column("count", justify="right")
    for k, v in result["answers"].items():
        table.add_row(f"answered {k}", str(v))
    for k, v in sorted(codec_outcomes.items()):
        table.add_row(f"codec {k}", str(v))
    table.add_row("through a real server", str(server_inputs))
    table.add_row("crashes", str(len(crashes)))
    table.add_row("hangs (> %g s)" % args.hang_s, str(hangs))
    table.add_row("slowest input (ms)", f"{slowest * 1e3:.1f}")
    Console().print(table)
    print(f"wrote {args.out}")
    return 0
