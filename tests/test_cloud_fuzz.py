"""Hypothesis fuzzing of the codec and the cloud's request handling: > 5,000 random inputs in all
(2,000 damaged requests through the server's handling path and the codec, 1,700 arbitrary Tensor
messages into the codec, 1,000 arbitrary byte strings as requests, 300 through a real server), with
zero crashes (no escaping exception, no INTERNAL answer, no dead stream) and no hangs (pytest-timeout).
The request generators are bench/fuzz_bench.py's, driven here by hypothesis."""

import asyncio
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_bench import ALLOWED, check_codec, check_handling, random_input, setup, through_server
from protos import codec
from protos.coach.v1 import coach_pb2 as pb

COUNTS = {}
def fuzz(n):
    return settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))


class HypDraw:
    """bench.fuzz_bench.Draw over hypothesis' st.data()."""

    _cache: dict = {}  # building strategies is slow; reuse them

    def __init__(self, data):
        self.data = data

    def _strategy(self, key, make):
        s = self._cache.get(key)
        if s is None:
            s = self._cache[key] = make()
        return s

    def int(self, lo, hi):
        return self.data.draw(self._strategy(("i", lo, hi), lambda: st.integers(lo, hi)))

    def choice(self, seq):
        seq = tuple(seq)
        return self.data.draw(self._strategy(("c", seq), lambda: st.sampled_from(seq)))

    def bytes(self, n):
        return self.data.draw(self._strategy(("b", n), lambda: st.binary(min_size=n, max_size=n)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return setup(Path(tmp_path_factory.mktemp("fuzz")))


def _count(name):
    COUNTS[name] = COUNTS.get(name, 0) + 1


def test_damaged_requests_through_handling_and_codec(env):
    model, registry, limits = env
    seen = set()

    @fuzz(2000)
    @given(st.data())
    def run(data):
        raw = random_input(HypDraw(data), model.name, model.plan_sha256, data.draw(st.integers(0, 2**64 - 1)))
        seen.add(check_handling(raw, registry, limits))
        check_codec(raw)
        _count("handling")

    run()
    assert seen >= {0, 3}  # both answers and refusals were exercised
    assert seen <= ALLOWED


_tensors = st.builds(
    pb.Tensor,
    name=st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), max_size=8),  # the codec quotes names verbatim; the server escapes them (handlers.one_line)
    dtype=st.integers(0, 10),
    shape=st.lists(st.one_of(st.integers(-2, 6), st.sampled_from([2**31, 2**62])), max_size=6),
    data=st.binary(max_size=300),
    quantization=st.builds(
        pb.Quantization, bits=st.sampled_from([0, 1, 2, 3, 4, 5, 6, 8, 9, 16, 32]), scheme=st.integers(0, 3),
        axis=st.integers(-2, 6), scales=st.lists(st.floats(width=32), max_size=4),
        zero_points=st.lists(st.integers(-300, 300), max_size=4), bit_order=st.integers(0, 2)),
    compression=st.integers(0, 3),
)


@fuzz(1700)
@given(_tensors)
def test_codec_decode_of_arbitrary_tensors_returns_or_raises_value_error(t):
    try:
        with np.errstate(all="ignore"):
            x = codec.decode(t, max_elements=1 << 20)
    except ValueError as exc:  # the contract: a one-line ValueError, nothing else
        assert "\n" not in str(exc)
    else:
        assert list(x.shape) == list(t.shape) and x.size <= 1 << 20
    _count("codec")


def test_arbitrary_bytes_as_requests(env):
    model, registry, limits = env
    prefix = pb.InferRequest(request_id=3, model=model.name, cut_id="c1").SerializeToString()

    @fuzz(1000)
    @given(st.binary(max_size=400), st.booleans())
    def run(raw, with_prefix):
        check_handling(prefix + raw if with_prefix else raw, registry, limits)
        _count("bytes")

    run()


def test_damaged_requests_through_a_real_server(env):
    model, registry, limits = env

    @fuzz(10)
    @given(st.data())
    def run(data):
        draw = HypDraw(data)
        raws = [random_input(draw, model.name, model.plan_sha256, i) for i in range(30)]
        out = asyncio.run(through_server(model, list(registry), raws))
        for raw, resp in zip(raws, out):
            try:
                rid = pb.InferRequest.FromString(raw).request_id
            except Exception:
                continue
            assert resp.request_id == rid  # answers in request order
        for _ in raws:
            _count("server")

    run()


def test_total_fuzz_inputs_at_least_5000():
    total = sum(COUNTS.values())
    if not {"handling", "codec", "bytes", "server"} <= set(COUNTS):
        pytest.skip("run with the other fuzz tests of this file to count the total")
    assert COUNTS["server"] >= 300
    assert total >= 5000, COUNTS
