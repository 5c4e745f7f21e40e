"""Tensor codec: numpy array <-> `coach.v1.Tensor` (raw, float16, or UAQ bit-packed, then lossless).

    encode(array, bits, axis=None, compress=None) -> Tensor
    decode(tensor, max_elements=...) -> numpy.ndarray

bits = 32 sends the raw little-endian elements (floats as float32, other dtypes as they are);
bits = 16 sends float16; bits in {8, 6, 4, 3, 2} sends uniform affine quantization codes
q = round(x / scale) + zero_point in [0, 2^bits - 1], per tensor or per channel (`axis`), packed at
exactly `bits` bits each, least significant bit first (see BitOrder in coach.proto). The range always
includes 0, so 0.0 (ReLU outputs) is exact. Every dequantized element is within scale/2 of the input.

`decode` validates everything against the declared dtype and shape before it allocates anything
and raises ValueError with a one-line message on any inconsistency. Work is done in cache-sized
chunks so that the several numpy passes of quantization stay in L2 instead of streaming from memory.
"""

from __future__ import annotations

import math

import numpy as np

from protos.coach.v1 import coach_pb2 as pb

SUPPORTED_BITS = (32, 16, 8, 6, 4, 3, 2)
UAQ_BITS = (8, 6, 4, 3, 2)
COMPRESSIONS = {None: pb.COMPRESSION_NONE, "none": pb.COMPRESSION_NONE, "zstd": pb.ZSTD, "lz4": pb.LZ4}
DEFAULT_MAX_ELEMENTS = 1 << 28  # 1 GiB of float32; servers pass their own, smaller limit
MAX_RANK = 16
MIN_SCALE = 1e-30
CHUNK = 1 << 16  # elements per chunk: 256 KiB of float32 (a multiple of 8, so packing stays aligned)

_DTYPES = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.INT8: np.dtype("i1"),
    pb.UINT8: np.dtype("u1"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
    pb.BOOL: np.dtype("?"),
}
_ENUM_OF = {dt.newbyteorder("="): code for code, dt in _DTYPES.items()}
_FLOAT_CODES = (pb.FLOAT32, pb.FLOAT16, pb.FLOAT64)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of `n` elements sent at `bits` (before the lossless stage)."""
    return 4 * n if bits == 32 else (2 * n if bits == 16 else (n * bits + 7) // 8)


# ---------------------------------------------------------------- quantization parameters


def _affine_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point per channel so that [min(lo,0), max(hi,0)] fits the grid.

    The zero point is chosen first, then the scale is the smallest one for which both ends still
    map inside [0, levels]; so x / scale + zero_point never leaves that range and no clipping pass
    is needed.
    """
    levels = (1 << bits) - 1
    lo = np.minimum(lo.astype(np.float64), 0.0)
    hi = np.maximum(hi.astype(np.float64), 0.0)
    span = hi - lo
    safe_span = np.where(span > 0, span, 1.0)
    # Negative values need zp >= 1, positive ones zp <= levels - 1.
    zp = np.clip(np.rint(levels * -lo / safe_span), np.where(lo < 0, 1, 0), np.where(hi > 0, levels - 1, levels))
    with np.errstate(divide="ignore", invalid="ignore"):
        s_lo = np.where(zp > 0, -lo / zp, 0.0)
        s_hi = np.where(zp < levels, hi / (levels - zp), 0.0)
    scale = np.maximum(s_lo, s_hi) * (1 + 4 * np.finfo(np.float32).eps)
    scale = np.where(scale > 0, scale, 1.0)  # an all-zero tensor: any scale will do
    # A subnormal scale would make 1/scale overflow float32; ranges that small quantize to 0 anyway.
    scale = np.maximum(scale, MIN_SCALE)
    return scale.astype(np.float32), zp.astype(np.int32)


def _minmax(flat: np.ndarray) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    for s in range(0, flat.size, CHUNK):
        c = flat[s : s + CHUNK]
        lo = min(lo, float(c.min()))
        hi = max(hi, float(c.max()))
    return lo, hi


# ---------------------------------------------------------------- bit packing (LSB first)


def _pack_plan(bits: int) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Codes per group, bytes per group, and (code k, byte j, shift s) for each code's low part."""
    group = 8 // math.gcd(bits, 8)  # codes per group of whole bytes
    nbytes = group * bits // 8
    return group, nbytes, [(k, (k * bits) // 8, (k * bits) % 8) for k in range(group)]


def _pack_into(codes: np.ndarray, out: np.ndarray, bits: int) -> None:
    """Pack uint8 `codes` (length a multiple of the group) into `out` bytes."""
    if bits == 8:
        out[:] = codes
        return
    group, nbytes, plan = _pack_plan(bits)
    c = codes.reshape(-1, group)
    o = out.reshape(-1, nbytes)
    o[...] = 0
    tmp = np.empty(c.shape[0], np.uint8)
    for k, j, s in plan:
        np.left_shift(c[:, k], s, out=tmp)  # wraps mod 256: keeps the bits that land in byte j
        o[:, j] |= tmp
        if s + bits > 8:  # the code spills into the next byte
            np.right_shift(c[:, k], 8 - s, out=tmp)
            o[:, j + 1] |= tmp


def _unpack_into(packed: np.ndarray, codes: np.ndarray, bits: int) -> None:
    """Inverse of _pack_into."""
    if bits == 8:
        codes[:] = packed
        return
    group, nbytes, plan = _pack_plan(bits)
    p = packed.reshape(-1, nbytes)
    c = codes.reshape(-1, group)
    mask = np.uint8((1 << bits) - 1)
    tmp = np.empty(c.shape[0], np.uint8)
    for k, j, s in plan:
        if s + bits == 8:  # the code is the top of byte j: the shift alone isolates it
            np.right_shift(p[:, j], s, out=c[:, k])
            continue
        if s == 0:
            np.bitwise_and(p[:, j], mask, out=c[:, k])
            continue
        np.right_shift(p[:, j], s, out=c[:, k])
        if s + bits > 8:  # the code's high bits are in the next byte
            np.left_shift(p[:, j + 1], 8 - s, out=tmp)
            c[:, k] |= tmp
        c[:, k] &= mask


# ---------------------------------------------------------------- encode


def encode(
    array: np.ndarray,
    bits: int = 32,
    axis: int | None = None,
    compress: str | None = None,
    name: str = "",
) -> pb.Tensor:
    """Encode `array` as a Tensor at `bits` (see module doc). `axis`: per-channel quantization."""
    x = np.asarray(array)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"tensor {name!r}: bits={bits} is not one of {SUPPORTED_BITS}")
    if compress not in COMPRESSIONS:
        raise ValueError(f"tensor {name!r}: compress={compress!r} is not one of none, zstd, lz4")
    is_float = np.issubdtype(x.dtype, np.floating)
    if x.dtype.newbyteorder("=") not in _ENUM_OF and not is_float:
        raise ValueError(f"tensor {name!r}: dtype {x.dtype} cannot be sent")
    t = pb.Tensor(name=name, shape=x.shape)
    if bits == 32:
        raw = np.ascontiguousarray(x, dtype=np.float32 if is_float else x.dtype.newbyteorder("<"))
        t.dtype = _ENUM_OF[raw.dtype.newbyteorder("=")]
        data = raw.tobytes()
    else:
        if not is_float:
            raise ValueError(f"tensor {name!r}: {bits}-bit quantization needs a floating-point array, got {x.dtype}")
        t.dtype = _ENUM_OF.get(x.dtype.newbyteorder("="), pb.FLOAT32)
        if bits == 16:
            t.quantization.bits = 16
            data = np.ascontiguousarray(x, dtype="<f2").tobytes()
        else:
            data = _encode_uaq(x, bits, axis, t)
    if COMPRESSIONS[compress] != pb.COMPRESSION_NONE:
        t.compression = COMPRESSIONS[compress]
        data = _compress(data, t.compression)
    t.data = data
    return t


def _encode_uaq(x: np.ndarray, bits: int, axis: int | None, t: pb.Tensor) -> bytes:
    q = t.quantization
    q.bits = bits
    q.bit_order = pb.LSB_FIRST
    x = np.ascontiguousarray(x, dtype=np.float32)
    if axis is None:
        flat = x.reshape(-1)
        lo, hi = _minmax(flat) if flat.size else (0.0, 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"tensor {t.name!r}: contains NaN or Inf; cannot quantize")
        scale, zp = _affine_params(np.array([lo]), np.array([hi]), bits)
        q.scheme = pb.PER_TENSOR
        inv = np.full(1, 1.0 / scale[0], np.float32)
        off = np.full(1, zp[0] + 0.5, np.float32)
        out = _quantize_pack(flat, inv, off, bits, channel_view=None)
    else:
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"tensor {t.name!r}: axis {axis} out of range for rank {x.ndim}")
        axis %= x.ndim
        pre = int(np.prod(x.shape[:axis]))
        c = x.shape[axis]
        post = int(np.prod(x.shape[axis + 1 :]))
        v = x.reshape(pre, c, post)
        if v.size:
            lo, hi = v.min(axis=(0, 2)), v.max(axis=(0, 2))
        else:
            lo = hi = np.zeros(c, np.float32)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise ValueError(f"tensor {t.name!r}: contains NaN or Inf; cannot quantize")
        scale, zp = _affine_params(lo, hi, bits)
        q.scheme = pb.PER_CHANNEL
        q.axis = axis
        inv = (1.0 / scale.astype(np.float64)).astype(np.float32)
        off = (zp + 0.5).astype(np.float32)
        out = _quantize_pack(x.reshape(-1), inv, off, bits, channel_view=(pre, c, post))
    q.scales.extend(scale.tolist())
    q.zero_points.extend(zp.tolist())
    return out.tobytes()


def _channel_params(s: int, e: int, vec: np.ndarray, cv: tuple[int, int, int]) -> np.ndarray:
    """Per-element values of a per-channel vector for flat positions [s, e)."""
    _, c, post = cv
    idx = (np.arange(s, e) // post) % c
    return vec[idx]


def _quantize_pack(flat, inv, off, bits, channel_view) -> np.ndarray:
    n = flat.size
    # Room for whole packing groups at the end; the padding is sliced off on return.
    out = np.empty(packed_nbytes(-(-n // 8) * 8, bits), np.uint8)
    buf = np.empty(CHUNK, np.float32)
    codes = np.empty(CHUNK, np.uint8)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        m = e - s
        b = buf[:m]
        if channel_view is None:
            np.multiply(flat[s:e], inv[0], out=b)
            np.add(b, off[0], out=b)
        else:
            np.multiply(flat[s:e], _channel_params(s, e, inv, channel_view), out=b)
            np.add(b, _channel_params(s, e, off, channel_view), out=b)
        if bits == 8:  # codes are the bytes: cast straight into the output
            np.copyto(out[s:e], b, casting="unsafe")  # floor(x/scale + zp + 0.5), all >= 0
            continue
        mp = -(-m // 8) * 8  # pad the last chunk to whole packing groups
        cd = codes[:mp]
        cd[m:] = 0
        np.copyto(cd[:m], b, casting="unsafe")
        ob = s * bits // 8
        _pack_into(cd, out[ob : ob + mp * bits // 8], bits)
    return out[: packed_nbytes(n, bits)]


def _compress(data: bytes, kind: int) -> bytes:
    if kind == pb.ZSTD:
        import zstandard

        return zstandard.ZstdCompressor(level=1, write_content_size=True).compress(data)
    import lz4.frame

    return lz4.frame.compress(data, store_size=True)


# ---------------------------------------------------------------- decode


def _fail(t: pb.Tensor, msg: str) -> ValueError:
    return ValueError(f"tensor {t.name!r}: {msg}")  # repr: a client's name can't break the line


def decode(tensor: pb.Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """Decode a Tensor into a new array, validating it first (ValueError on any inconsistency)."""
    t = tensor
    if t.dtype not in _DTYPES:
        raise _fail(t, f"unknown or unspecified dtype {t.dtype}; expected one of {sorted(_DTYPES)}")
    shape = tuple(int(d) for d in t.shape)
    if len(shape) > MAX_RANK:
        raise _fail(t, f"rank {len(shape)} exceeds the limit {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise _fail(t, f"negative dimension in shape {list(shape)}")
    n = math.prod(shape)
    if n > max_elements or any(d > max_elements for d in shape):
        raise _fail(t, f"shape {list(shape)} has {n} elements, over the limit of {max_elements}")
    bits = t.quantization.bits if t.HasField("quantization") else 0
    out_dtype = _DTYPES[t.dtype]
    if bits == 0:
        expected = n * out_dtype.itemsize
    elif bits in (16,) + UAQ_BITS:
        if t.dtype not in _FLOAT_CODES:
            raise _fail(t, f"{bits}-bit data must decode to a float dtype, not {pb.DataType.Name(t.dtype)}")
        expected = packed_nbytes(n, bits)
    else:
        raise _fail(t, f"bits={bits} is not one of 16, 8, 6, 4, 3, 2 (or absent for raw)")
    if bits in UAQ_BITS:
        _check_uaq_params(t, shape, bits)
    data = _decompress(t, expected)
    if len(data) != expected:
        raise _fail(t, f"data has {len(data)} bytes, expected {expected} for shape {list(shape)} at {bits or 'raw'} bits")
    if bits == 0:
        return np.frombuffer(data, out_dtype).reshape(shape).astype(out_dtype.newbyteorder("="))
    if bits == 16:
        return np.frombuffer(data, "<f2").reshape(shape).astype(out_dtype.newbyteorder("="))
    res = _unpack_dequantize(np.frombuffer(data, np.uint8), n, shape, t.quantization, bits)
    return res if out_dtype == np.float32 else res.astype(out_dtype.newbyteorder("="))


def _check_uaq_params(t: pb.Tensor, shape: tuple[int, ...], bits: int) -> None:
    q = t.quantization
    if q.scheme == pb.PER_TENSOR:
        count = 1
    elif q.scheme == pb.PER_CHANNEL:
        if not 0 <= q.axis < len(shape):
            raise _fail(t, f"per-channel axis {q.axis} out of range for shape {list(shape)}")
        count = shape[q.axis]
    else:
        raise _fail(t, f"quantization scheme {q.scheme} is neither PER_TENSOR nor PER_CHANNEL")
    if len(q.scales) != count or len(q.zero_points) != count:
        raise _fail(t, f"{len(q.scales)} scales and {len(q.zero_points)} zero points, expected {count}")
    scales = np.asarray(q.scales, np.float64)
    if count and not (np.isfinite(scales).all() and (scales > 0).all()):
        raise _fail(t, "scales must be finite and > 0")
    if count and (scales * ((1 << bits) - 1) > np.finfo(np.float32).max).any():
        raise _fail(t, "scales so large that dequantized values overflow float32")
    zps = np.asarray(q.zero_points, np.int64)
    if count and ((zps < 0).any() or (zps > (1 << bits) - 1).any()):
        raise _fail(t, f"zero points must lie in [0, {(1 << bits) - 1}]")
    if q.bit_order not in (pb.BIT_ORDER_UNSPECIFIED, pb.LSB_FIRST):
        raise _fail(t, f"unknown bit order {q.bit_order}")


def _decompress(t: pb.Tensor, expected: int) -> bytes:
    if t.compression == pb.COMPRESSION_NONE:
        return t.data
    try:
        if t.compression == pb.ZSTD:
            import zstandard

            size = zstandard.frame_content_size(t.data)
            if size != expected:
                raise _fail(t, f"zstd frame declares {size} bytes, expected {expected}")
            return zstandard.ZstdDecompressor().decompress(t.data, max_output_size=expected)
        if t.compression == pb.LZ4:
            import lz4.frame

            size = lz4.frame.get_frame_info(t.data).get("content_size")
            if size != expected:
                raise _fail(t, f"lz4 frame declares {size} bytes, expected {expected}")
            return lz4.frame.decompress(t.data)
    except ValueError:
        raise
    except Exception as exc:  # zstandard.ZstdError, lz4's RuntimeError: corrupt frames
        raise _fail(t, f"corrupt {pb.Compression.Name(t.compression)} data: {exc}") from None
    raise _fail(t, f"unknown compression {t.compression}")


def _unpack_dequantize(packed, n, shape, q, bits) -> np.ndarray:
    """x = (q - zero_point) * scale, chunk by chunk (the cast and both ops stay in cache)."""
    out = np.empty(n, np.float32)
    codes = np.empty(CHUNK, np.uint8)
    scales = np.asarray(q.scales, np.float32)
    zps = np.asarray(q.zero_points, np.float32)
    cv = None
    if q.scheme == pb.PER_CHANNEL:
        cv = (0, shape[q.axis], math.prod(shape[q.axis + 1 :]))
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        m = e - s
        if bits == 8:
            cd = packed[s:e]
        else:
            mp = -(-m // 8) * 8
            ob = s * bits // 8
            src = packed[ob : ob + mp * bits // 8]
            if src.size < mp * bits // 8:  # the last group's padding bytes are not on the wire
                src = np.concatenate([src, np.zeros(mp * bits // 8 - src.size, np.uint8)])
            cd = codes[:mp]
            _unpack_into(src, cd, bits)
        o = out[s:e]
        np.copyto(o, cd[:m])
        if cv is None:
            np.subtract(o, zps[0], out=o)
            np.multiply(o, scales[0], out=o)
        else:
            np.subtract(o, _channel_params(s, e, zps, cv), out=o)
            np.multiply(o, _channel_params(s, e, scales, cv), out=o)
    return out.reshape(shape)
