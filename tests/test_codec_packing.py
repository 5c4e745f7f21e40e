"""The codec's bit packing and (de)quantization against simple reference implementations.

The fast paths (SWAR packing on wide lanes, overlapping 3-byte stores, chunking, per-channel
windows, the per-tensor parameter shortcut) must give the very bytes and floats that the plain
formulas give: codes packed LSB first, codes = floor(x * inv + zp + 0.5), x = (q - zp) * scale.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import codec
from protos.coach.v1 import coach_pb2 as pb

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    # small_chunks patches module constants that every example shares: function scope is fine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SUB_BYTE = (6, 4, 3, 2)
BIG = float(np.float32(1e30))


def ref_pack(codes: np.ndarray, bits: int) -> bytes:
    """Code i at stream bits [i*bits, (i+1)*bits), stream bit k = bit k % 8 of byte k // 8."""
    acc = 0
    for i, c in enumerate(codes.tolist()):
        acc |= c << (i * bits)
    return acc.to_bytes((len(codes) * bits + 7) // 8, "little")


def ref_pack_np(codes: np.ndarray, bits: int) -> bytes:  # the same, fast enough for long inputs
    stream = np.unpackbits(codes[:, None], axis=1, count=bits, bitorder="little").reshape(-1)
    return np.packbits(stream, bitorder="little").tobytes()


def ref_unpack(data: bytes, n: int, bits: int) -> np.ndarray:
    acc = int.from_bytes(data, "little")
    return np.array([(acc >> (i * bits)) & ((1 << bits) - 1) for i in range(n)], np.uint8)


def ref_unpack_np(data: bytes, n: int, bits: int) -> np.ndarray:
    stream = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[: n * bits]
    return np.packbits(stream.reshape(n, bits), axis=1, bitorder="little").reshape(n)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 elements, so that short arrays cross many chunk boundaries and take every
    per-channel path (long rows, short periods, gather; whole and partial blocks)."""
    monkeypatch.setattr(codec, "CHUNK", 64)
    monkeypatch.setattr(codec, "LONG_ROW", 16)
    monkeypatch.setattr(codec, "BLOCK_MIN", 16)


# ---------------------------------------------------------------- packing kernels


@pytest.mark.parametrize("bits", SUB_BYTE + (8,))
def test_pack_and_unpack_every_group_length(bits):
    rng = np.random.default_rng(bits)
    for n in (8, 16, 24, 64, 8 * 37, 8 * 1001):
        codes = rng.integers(0, 1 << bits, n).astype(np.uint8)
        codes[:8] = (1 << bits) - 1  # all ones: any bit that leaks into a neighbour shows
        out = np.full(n * bits // 8 + 1, 0xA5, np.uint8)
        tmp = np.empty(n, np.uint8)
        codec._pack(codes.copy(), out, bits, tmp)
        assert out[:-1].tobytes() == ref_pack(codes, bits)
        assert out[-1] == 0xA5  # the spare byte is left as it was
        back = np.empty(n, np.uint8)
        codec._unpack(out[:-1], back, bits, tmp)
        assert np.array_equal(back, codes)


@SETTINGS
@given(data=st.data(), bits=st.sampled_from(SUB_BYTE))
def test_unpack_ignores_nothing_and_invents_nothing(data, bits):
    """Random wire bytes (any bit pattern) unpack to exactly the reference codes."""
    groups = data.draw(st.integers(1, 40))
    raw = data.draw(st.binary(min_size=groups * bits, max_size=groups * bits))
    codes = np.empty(groups * 8, np.uint8)
    codec._unpack(np.frombuffer(raw, np.uint8), codes, bits, np.empty(groups * 8, np.uint8))
    assert np.array_equal(codes, ref_unpack(raw, groups * 8, bits))


# ---------------------------------------------------------------- encode, byte for byte


def _expected_codes(x: np.ndarray, t: pb.Tensor) -> np.ndarray:
    """floor(x * inv + zp + 0.5) in float32, computed in one go from the tensor's own parameters."""
    q = t.quantization
    scale = np.asarray(q.scales, np.float32)
    zp = np.asarray(q.zero_points, np.float32)
    if q.scheme == pb.PER_TENSOR:
        inv = (np.float32(1.0) / scale).reshape(1)
        shape = (1,) * x.ndim
    else:
        inv = (1.0 / scale.astype(np.float64)).astype(np.float32)
        shape = [1] * x.ndim
        shape[q.axis] = -1
    y = x.astype(np.float32) * inv.reshape(shape) + (zp + np.float32(0.5)).reshape(shape)
    return y.astype(np.uint8).reshape(-1)


def _check_encode(x: np.ndarray, bits: int, axis=None) -> None:
    t = codec.encode(x, bits, axis=axis)
    codes = _expected_codes(x, t)
    assert codes.max(initial=0) < 1 << bits
    pack = ref_pack if x.size <= 2000 else ref_pack_np
    assert t.data == pack(codes, bits)


@pytest.mark.parametrize("bits", SUB_BYTE + (8,))
def test_encode_odd_lengths_match_reference(bits):
    rng = np.random.default_rng(100 + bits)
    for n in list(range(1, 42)) + [255, 1001]:
        _check_encode(rng.standard_normal(n).astype(np.float32), bits)
        _check_encode(np.maximum(rng.standard_normal(n), 0).astype(np.float32), bits)


@pytest.mark.parametrize("bits", SUB_BYTE + (8,))
def test_encode_across_real_chunks_matches_reference(bits):
    """Longer than two chunks, and not a whole number of chunks or of packing groups."""
    n = 2 * codec.CHUNK + 8 * 1000 + 5
    x = np.random.default_rng(bits).standard_normal(n).astype(np.float32)
    _check_encode(x, bits)


@pytest.mark.parametrize(
    "shape", [(3, 5, 40000), (2, 16, 8193), (2, 8, 20001), (300000, 3), (1, 300000)]
)
def test_per_channel_across_real_chunks_matches_reference(shape):
    """Each per-channel path at full size: long rows (chunks of whole rows; rows too long for
    that), a short period, and the gather; encode and decode."""
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    _check_encode(x, 4, axis=1)
    t = _raw_tensor(rng, 3, shape, axis=1)
    assert _same_floats(codec.decode(t), _expected_values(t, unpack=ref_unpack_np))


@SETTINGS
@given(data=st.data(), bits=st.sampled_from(SUB_BYTE + (8,)))
def test_encode_matches_reference_in_small_chunks(small_chunks, data, bits):
    """Many chunk boundaries, per tensor and per channel (every kind of per-channel window)."""
    shape = tuple(data.draw(st.lists(st.integers(1, 70), min_size=1, max_size=3)))
    seed = data.draw(st.integers(0, 2**32 - 1))
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if data.draw(st.booleans()):
        x = np.maximum(x, 0)
    axis = data.draw(st.one_of(st.none(), st.integers(0, len(shape) - 1)))
    _check_encode(x, bits, axis)


# ---------------------------------------------------------------- decode, bit for bit


def _raw_tensor(rng, bits: int, shape, axis=None) -> pb.Tensor:
    """A tensor with random codes (and random padding bits), scales and zero points."""
    t = pb.Tensor(shape=shape, dtype=pb.FLOAT32)
    q = t.quantization
    q.bits, q.bit_order = bits, pb.LSB_FIRST
    count = 1 if axis is None else shape[axis]
    if axis is None:
        q.scheme = pb.PER_TENSOR
    else:
        q.scheme, q.axis = pb.PER_CHANNEL, axis
    q.scales.extend((rng.random(count) * 3 + 1e-3).tolist())
    zps = rng.integers(0, 1 << bits, count)
    zps[rng.random(count) < 0.3] = 0  # the zero-point-0 shortcut, and mixtures
    q.zero_points.extend(zps.tolist())
    n = int(np.prod(shape))
    t.data = rng.integers(0, 256, (n * bits + 7) // 8).astype(np.uint8).tobytes()
    return t


def _expected_values(t: pb.Tensor, unpack=ref_unpack) -> np.ndarray:
    q = t.quantization
    shape = tuple(t.shape)
    n = int(np.prod(shape))
    codes = unpack(t.data, n, q.bits) if q.bits < 8 else np.frombuffer(t.data, np.uint8)
    codes = codes.astype(np.float32).reshape(shape)
    scale = np.asarray(q.scales, np.float32)
    zp = np.asarray(q.zero_points, np.float32)
    if q.scheme == pb.PER_CHANNEL:
        bshape = [1] * len(shape)
        bshape[q.axis] = -1
        scale, zp = scale.reshape(bshape), zp.reshape(bshape)
    return (codes - zp) * scale


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("bits", SUB_BYTE + (8,))
def test_decode_matches_reference(bits):
    rng = np.random.default_rng(bits)
    for shape, axis in [((1,), None), ((13,), None), ((5, 7), None), ((5, 7), 1), ((2, 3, 11), 0),
                        ((3, 4, 5), 1), ((4, 9), None)]:
        for _ in range(3):
            t = _raw_tensor(rng, bits, shape, axis)
            assert _same_floats(codec.decode(t), _expected_values(t))


@SETTINGS
@given(data=st.data(), bits=st.sampled_from(SUB_BYTE + (8,)))
def test_decode_matches_reference_in_small_chunks(small_chunks, data, bits):
    shape = tuple(data.draw(st.lists(st.integers(1, 60), min_size=1, max_size=3)))
    axis = data.draw(st.one_of(st.none(), st.integers(0, len(shape) - 1)))
    t = _raw_tensor(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))), bits, shape, axis)
    assert _same_floats(codec.decode(t), _expected_values(t))


# ---------------------------------------------------------------- per-tensor parameters


@SETTINGS
@given(
    lo=st.one_of(st.floats(-BIG, 0, width=32), st.sampled_from([0.0, -0.0, -1e-38, -1e-45, -3.0])),
    hi=st.one_of(st.floats(0, BIG, width=32), st.sampled_from([0.0, 1e-38, 1e-45, 3.0, 255.0])),
    bits=st.sampled_from(codec.UAQ_BITS),
)
def test_tensor_params_equal_the_vector_version(lo, hi, bits):
    scale, zp = codec._tensor_params(lo, hi, bits)
    scales, zps = codec._affine_params(np.array([lo]), np.array([hi]), bits)
    assert scale.dtype == np.float32 and scale.tobytes() == scales[0].tobytes()
    assert zp == int(zps[0])


def test_zero_point_shortcut_rounds_like_the_plain_formula():
    """ReLU data (zp = 0) and data with negatives both hit exact .5 ties the same way."""
    for bits in SUB_BYTE + (8,):
        levels = (1 << bits) - 1
        x = np.arange(0, levels + 0.5, 0.5, dtype=np.float32)  # every half step: ties everywhere
        _check_encode(x, bits)
        _check_encode(np.concatenate([-x[::-1], x]), bits)


@pytest.mark.parametrize("bits", codec.UAQ_BITS)
def test_tensor_params_round_zero_point_ties_to_even(bits):
    """levels * -lo / span exactly k + 0.5: numpy's rint goes to the even neighbour, so must we."""
    levels = (1 << bits) - 1
    for k in (0, 1, 2, levels // 2 - 1):
        lo, hi = -(k + 0.5), levels - (k + 0.5)
        scale, zp = codec._tensor_params(lo, hi, bits)
        scales, zps = codec._affine_params(np.array([lo]), np.array([hi]), bits)
        assert (scale.tobytes(), zp) == (scales[0].tobytes(), int(zps[0]))


@pytest.mark.parametrize("shape", [(3000, 7, 1), (901, 3, 5), (5, 7, 1), (1, 9, 3), (64, 64, 1)])
def test_channel_range_equals_plain_min_max(shape):
    v = np.random.default_rng(shape[0]).standard_normal(shape).astype(np.float32)
    lo, hi = codec._channel_range(v)
    assert np.array_equal(lo, v.min(axis=(0, 2))) and np.array_equal(hi, v.max(axis=(0, 2)))
    v[-1, 1, -1] = np.nan  # NaN still shows, so encode can refuse it
    assert np.isnan(codec._channel_range(v)[0][1]) and np.isnan(codec._channel_range(v)[1][1])


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5, 2), (2, 0, 70)])
def test_empty_tensors_round_trip_at_every_axis(shape):
    x = np.zeros(shape, np.float32)
    for bits in SUB_BYTE + (8,):
        for axis in [None, *range(len(shape))]:
            t = codec.encode(x, bits, axis=axis)
            assert t.data == b"" and codec.decode(t).shape == shape
