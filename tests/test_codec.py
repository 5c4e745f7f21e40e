"""Property tests of protos.codec: error bounds per bit width and scheme, bit order, validation."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protos import codec
from protos.coach.v1 import coach_pb2 as pb

EPS = np.finfo(np.float32).eps
finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9), elements=finite)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _scale_like(t: pb.Tensor, x: np.ndarray) -> np.ndarray:
    s = np.asarray(t.quantization.scales, np.float64)
    if t.quantization.scheme == pb.PER_CHANNEL:
        shape = [1] * x.ndim
        shape[t.quantization.axis] = -1
        return s.reshape(shape)
    return s.reshape([1] * x.ndim)


@SETTINGS
@given(x=arrays, bits=st.sampled_from(codec.UAQ_BITS), per_channel=st.booleans(), data=st.data())
def test_uaq_round_trip_error_within_half_step(x, bits, per_channel, data):
    axis = data.draw(st.integers(0, x.ndim - 1)) if per_channel else None
    t = codec.encode(x, bits, axis=axis)
    y = codec.decode(t)
    assert y.dtype == np.float32 and y.shape == x.shape
    scale = _scale_like(t, x)
    levels = (1 << bits) - 1
    tol = scale / 2 + 4 * EPS * (np.abs(x) + scale * levels)
    assert (np.abs(y.astype(np.float64) - x) <= tol).all()
    assert len(t.data) == (x.size * bits + 7) // 8  # exactly `bits` bits per element
    assert (y[x == 0] == 0).all()  # zero is on the grid


@SETTINGS
@given(x=arrays)
def test_fp32_is_exact_and_fp16_within_rounding(x):
    assert np.array_equal(codec.decode(codec.encode(x, 32)), x)
    y = codec.decode(codec.encode(x, 16))
    assert y.dtype == np.float32
    assert (np.abs(y - x) <= np.abs(x) * 2.0**-11 + 2.0**-24).all()


@pytest.mark.parametrize("bits", [6, 4, 3, 2])
def test_packing_is_lsb_first_bit_stream(bits):
    """Independent oracle: numpy's own little-endian packbits of each code's low `bits` bits."""
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, 1000).astype(np.uint8)
    x = codes.astype(np.float32)  # range [0, max] with zero: zp = 0, scale ~ 1 -> codes survive
    x[0], x[1] = 0, (1 << bits) - 1
    codes[0], codes[1] = 0, (1 << bits) - 1
    t = codec.encode(x, bits)
    stream = np.unpackbits(codes[:, None], axis=1, count=bits, bitorder="little").reshape(-1)
    assert t.data == np.packbits(stream, bitorder="little").tobytes()


@pytest.mark.parametrize("compress", ["zstd", "lz4"])
@pytest.mark.parametrize("bits", [32, 16, 8, 3])
def test_lossless_stage_round_trips(compress, bits):
    x = np.maximum(np.random.default_rng(0).standard_normal((2, 16, 9, 9)), 0).astype(np.float32)
    plain, packed = codec.encode(x, bits), codec.encode(x, bits, compress=compress)
    assert np.array_equal(codec.decode(plain), codec.decode(packed))
    assert packed.compression != pb.COMPRESSION_NONE


def test_non_float_arrays_travel_raw():
    for arr in (np.arange(12, dtype=np.int64).reshape(3, 4), np.array([True, False]), np.arange(5, dtype=np.uint8)):
        y = codec.decode(codec.encode(arr, 32))
        assert y.dtype == arr.dtype and np.array_equal(y, arr)
    with pytest.raises(ValueError, match="floating-point"):
        codec.encode(np.arange(4), 8)


def test_encode_rejects_bad_arguments():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="bits=5"):
        codec.encode(x, 5)
    with pytest.raises(ValueError, match="axis"):
        codec.encode(x, 8, axis=2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.encode(np.array([1.0, np.nan], np.float32), 8)


def _valid(bits=4, axis=None):
    return codec.encode(np.random.default_rng(1).standard_normal((2, 3, 5)).astype(np.float32), bits, axis=axis, name="x")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: setattr(t, "data", t.data[:-1]), "bytes, expected"),
        (lambda t: setattr(t, "data", t.data + b"\0"), "bytes, expected"),
        (lambda t: setattr(t.quantization, "bits", 5), "bits=5"),
        (lambda t: setattr(t.quantization, "bits", 40), "bits=40"),
        (lambda t: t.quantization.scales.__setitem__(0, float("nan")), "finite"),
        (lambda t: t.quantization.scales.__setitem__(0, float("inf")), "finite"),
        (lambda t: t.quantization.scales.__setitem__(0, 0.0), "> 0"),
        (lambda t: t.quantization.zero_points.__setitem__(0, 99), "zero points"),
        (lambda t: t.quantization.scales.append(1.0), "scales"),
        (lambda t: setattr(t, "dtype", pb.DATA_TYPE_UNSPECIFIED), "dtype"),
        (lambda t: setattr(t, "dtype", pb.INT64), "float dtype"),
        (lambda t: t.shape.__setitem__(0, -2), "negative"),
        (lambda t: t.shape.__setitem__(0, 10**9), "over the limit"),
        (lambda t: setattr(t.quantization, "scheme", pb.QUANT_SCHEME_UNSPECIFIED), "scheme"),
        (lambda t: setattr(t, "compression", pb.ZSTD), "ZSTD"),
        (lambda t: setattr(t, "compression", 7), "compression"),
    ],
)
def test_decode_names_each_inconsistency(mutate, message):
    t = _valid()
    mutate(t)
    with pytest.raises(ValueError, match=message) as info:
        codec.decode(t)
    assert "tensor 'x'" in str(info.value)


def test_per_channel_axis_validated():
    t = _valid(axis=1)
    t.quantization.axis = 3
    with pytest.raises(ValueError, match="axis"):
        codec.decode(t)


def test_max_elements_is_checked_before_allocation():
    t = pb.Tensor(name="huge", dtype=pb.FLOAT32, shape=[1 << 20, 1 << 20])  # 4 TiB if allocated
    with pytest.raises(ValueError, match="over the limit"):
        codec.decode(t, max_elements=1 << 24)


tensor_fields = st.fixed_dictionaries({
    "dtype": st.integers(0, 10),
    "shape": st.lists(st.integers(-3, 40), max_size=5),
    "data": st.binary(max_size=300),
    "bits": st.sampled_from([0, 1, 2, 3, 4, 6, 8, 16, 32, 99]),
    "scheme": st.integers(0, 3),
    "axis": st.integers(-2, 5),
    "scales": st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=4),
    "zps": st.lists(st.integers(-5, 300), max_size=4),
    "compression": st.integers(0, 3),
})


@settings(max_examples=600, deadline=None)
@given(f=tensor_fields)
def test_decode_random_tensors_raises_only_value_error(f):
    t = pb.Tensor(name="r", dtype=f["dtype"], shape=f["shape"], data=f["data"], compression=f["compression"])
    if f["bits"]:
        q = t.quantization
        q.bits, q.scheme, q.axis = f["bits"], f["scheme"], f["axis"]
        q.scales.extend(f["scales"])
        q.zero_points.extend(f["zps"])
    try:
        y = codec.decode(t, max_elements=4096)
    except ValueError:
        return
    assert y.shape == tuple(f["shape"])


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=400), cut=st.integers(0, 400), bits=st.sampled_from(codec.SUPPORTED_BITS),
       compress=st.sampled_from([None, "zstd", "lz4"]))
def test_decode_random_or_truncated_bytes_raises_only_value_error(raw, cut, bits, compress):
    t = codec.encode(np.linspace(-3, 5, 120, dtype=np.float32).reshape(4, 30), bits, compress=compress)
    truncated = pb.Tensor()
    truncated.CopyFrom(t)
    truncated.data = t.data[: min(cut, len(t.data) - 1)]
    with pytest.raises(ValueError):
        codec.decode(truncated)
    try:
        parsed = pb.Tensor.FromString(raw)
    except Exception:  # not a protobuf message at all: rejected before the codec
        return
    try:
        codec.decode(parsed, max_elements=4096)
    except ValueError:
        pass


def test_zero_size_tensor_with_huge_dimension_is_refused():
    t = pb.Tensor(name="z", dtype=pb.FLOAT32, shape=[0, 1 << 62])
    with pytest.raises(ValueError, match="over the limit"):
        codec.decode(t)


def test_overflowing_scale_is_refused():
    t = _valid(bits=8)
    t.quantization.scales[0] = 3e38
    with pytest.raises(ValueError, match="overflow"):
        codec.decode(t)


def test_messages_stay_on_one_line_whatever_the_name():
    t = _valid()
    t.name = "evil\nFAKE LOG LINE"
    t.data = t.data[:-1]
    with pytest.raises(ValueError) as info:
        codec.decode(t)
    assert "\n" not in str(info.value)
