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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protos.coach.v1 import coach_pb2 as pb

SUPPORTED_BITS = (32, 16, 8, 6, 4, 3, 2)
UAQ_BITS = (8, 6, 4, 3, 2)
COMPRESSIONS = {None: pb.COMPRESSION_NONE, "none": pb.COMPRESSION_NONE, "zstd": pb.ZSTD, "lz4": pb.LZ4}
DEFAULT_MAX_ELEMENTS = 1 << 28  # 1 GiB of float32; servers pass their own, smaller limit
MAX_RANK = 16
MIN_SCALE = 1e-30
CHUNK = 1 << 17  # elements per chunk: 512 KiB of float32 (a multiple of 8: packing stays aligned)
LONG_ROW = 64  # per channel: rows (runs of one channel) this long are broadcast one value per row
BLOCK_MIN = 1024  # per channel, short rows: broadcast over blocks of at least this many elements

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


def _step(n: int) -> int:
    """Chunk length for `n` elements: CHUNK, or all of them at once when that is at most two chunks
    (such a tensor stays in cache anyway, and each chunk costs a dozen numpy calls)."""
    return n if 0 < n <= 2 * CHUNK else CHUNK


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


def _tensor_params(lo: float, hi: float, bits: int) -> tuple[np.float32, int]:
    """_affine_params for a single channel in Python floats (the same float64 steps, bit for bit):
    a dozen numpy calls on 1-element arrays would cost more than quantizing a small tensor."""
    levels = (1 << bits) - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = hi - lo
    safe_span = span if span > 0 else 1.0
    zp = round(levels * -lo / safe_span)  # half to even, as np.rint
    zp = min(max(zp, 1 if lo < 0 else 0), levels - 1 if hi > 0 else levels)
    s_lo = -lo / zp if zp > 0 else 0.0
    s_hi = hi / (levels - zp) if zp < levels else 0.0
    scale = max(s_lo, s_hi) * _SCALE_MARGIN
    scale = scale if scale > 0 else 1.0
    return np.float32(max(scale, MIN_SCALE)), zp


_SCALE_MARGIN = float(1 + 4 * np.finfo(np.float32).eps)
_F32_MAX = float(np.finfo(np.float32).max)


def _channel_range(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of v (pre, c, post) per channel. Short rows, many of them (channels last), are
    first reduced a block of rows at a time, so that each numpy inner loop is thousands long."""
    pre, c, post = v.shape
    k = 4 * BLOCK_MIN // (c * post)  # rows of (c, post) per block
    if post >= LONG_ROW or k < 2 or pre < 2 * k:  # plain reductions are fast enough
        return v.min(axis=(0, 2)), v.max(axis=(0, 2))
    whole = pre // k * k
    blocks = v[:whole].reshape(pre // k, k * c * post)
    rest = v[whole:]
    out = []
    for op in (np.minimum, np.maximum):
        r = op.reduce(op.reduce(blocks, axis=0).reshape(k, c, post), axis=(0, 2))
        out.append(op(r, op.reduce(rest, axis=(0, 2))) if rest.size else r)
    return out[0], out[1]


def _minmax(flat: np.ndarray) -> tuple[float, float]:
    """Min and max, a chunk at a time: the max pass reads what the min pass left in cache."""
    lo, hi = math.inf, -math.inf
    step = _step(flat.size)
    for s in range(0, flat.size, step):
        c = flat[s : s + step]
        lo = min(lo, float(np.minimum.reduce(c)))
        hi = max(hi, float(np.maximum.reduce(c)))
    return lo, hi


# ---------------------------------------------------------------- parameters, chunk by chunk
#
# Quantization computes x * inv + off and dequantization (q - zp) * scale, with one value of each
# per tensor or per channel. A layout serves them chunk by chunk as pieces (a, z, shape, values):
# flat positions [a, z) seen as an array of `shape`, and values that broadcast against it.

_Piece = tuple[int, int, tuple[int, ...], list]


@dataclass(frozen=True)
class _Layout:
    step: int  # chunk length: a multiple of 8 (so packed chunks start on a byte), or all of n
    pieces: Callable[[int, int], list[_Piece]]


def _per_tensor(values: list[np.ndarray], n: int) -> _Layout:
    """Scalars (0-d arrays): one piece per chunk."""
    return _Layout(_step(n), lambda s, e: [(s, e, (e - s,), values)])


def _per_channel(vecs: list[np.ndarray], c: int, post: int, n: int) -> _Layout:
    """Per-channel vectors for a tensor seen as (pre, c, post) (element i is in channel
    (i // post) % c), applied to blocks of `block` elements that share a layout of values:

    - long rows (post >= LONG_ROW): a block is a row of one channel; a chunk of whole rows is a
      (rows, post) array and each vector a (rows, 1) column;
    - short rows of a short period (c * post <= CHUNK / 8): a block is a whole number of periods,
      at least BLOCK_MIN elements; a chunk is a (blocks, block) array and each vector a (1, block)
      row;
    - anything else: a gather per chunk (slow, but rare: many channels of a few elements each).

    Chunks are whole blocks when a multiple of 8 blocks fits in CHUNK; else a chunk can start or
    end inside a block, and those partial blocks are pieces of their own. A vector whose values are
    all equal (the offsets of ReLU outputs: zero point 0 everywhere) is served as a scalar.
    """
    period = c * post
    if n == 0:
        return _Layout(CHUNK, lambda s, e: [])
    same = [np.array(v[0]) if (v == v[0]).all() else None for v in vecs]
    if post >= LONG_ROW:
        block = post

        def full(b0: int, b1: int) -> list:
            idx = np.arange(b0, b1) % c
            return [v[idx, None] if k is None else k for v, k in zip(vecs, same)]

        def part(b: int, lo: int, hi: int) -> list:
            return [v[b % c] for v in vecs]
    elif period <= CHUNK // 8:
        block = math.lcm(period, 8) * -(-BLOCK_MIN // math.lcm(period, 8))
        rows = [np.broadcast_to(v[:, None], (c, post)).reshape(1, -1) for v in vecs]
        rows = [np.tile(r, (1, block // period)) if k is None else k for r, k in zip(rows, same)]

        def full(b0: int, b1: int) -> list:
            return rows

        def part(b: int, lo: int, hi: int) -> list:
            return [r if r.ndim == 0 else r[0, lo:hi] for r in rows]
    else:
        def gather(s: int, e: int) -> list[_Piece]:
            idx = (np.arange(s, e) // post) % c
            return [(s, e, (e - s,), [v[idx] if k is None else k for v, k in zip(vecs, same)])]

        return _Layout(_step(n), gather)

    aligned = math.lcm(block, 8)
    step = _step(n)
    if aligned <= CHUNK and step < n:  # several chunks: make each one whole blocks
        step = CHUNK // aligned * aligned

    def pieces(s: int, e: int) -> list[_Piece]:
        b0, b1 = -(-s // block), e // block  # the whole blocks in [s, e)
        if b0 > b1:  # [s, e) lies inside one block
            return [(s, e, (e - s,), part(b1, s - b1 * block, e - b1 * block))]
        out = []
        if s < b0 * block:
            head = part(b0 - 1, s - (b0 - 1) * block, block)
            out.append((s, b0 * block, (b0 * block - s,), head))
        if b0 < b1:
            out.append((b0 * block, b1 * block, (b1 - b0, block), full(b0, b1)))
        if b1 * block < e:
            out.append((b1 * block, e, (e - b1 * block,), part(b1, 0, e - b1 * block)))
        return out

    return _Layout(step, pieces)


# ---------------------------------------------------------------- bit packing (LSB first)
#
# Codes are packed in whole groups of 8 (8 codes = `bits` bytes) with SWAR steps ("SIMD within a
# register"): the uint8 codes are viewed as uint16/32/64 lanes and each step is one contiguous numpy
# pass that merges the two halves of every lane (pack) or splits them (unpack). On a little-endian
# lane, byte k is bits 8k..8k+7, so merging codes to the bottom of a lane *is* the LSB-first stream.
# Constants are 0-d arrays (numpy's cheapest scalar operand) and every pass writes into a scratch
# buffer: a 200K-element tensor is a handful of passes, so per-call overhead counts.

_U16, _U32, _U64 = np.dtype("<u2"), np.dtype("<u4"), np.dtype("<u8")


def _k(dtype: np.dtype, value: int) -> np.ndarray:
    return np.array(value, dtype)


# Pack, one merge level: a lane holds a at bit 0 and b at bit `half`; make it a | b << width.
# 4 bits: (lane >> 4) | lane, whose low byte is c0 | c1 << 4.
_P4 = _k(_U16, 4)
# 2 bits: lane * (2^24 + 2^18 + 2^12 + 2^6) gathers the four codes of a uint32 lane into bits
# 24..31; the other partial products fall outside those bits and never overlap, so no carries.
_P2 = (_k(_U32, 1 << 24 | 1 << 18 | 1 << 12 | 1 << 6), _k(_U32, 24))
# 3 bits: (lane * (2^half + 2^width)) >> half, which needs 2 * width <= half (3 levels).
_P3 = [
    (dt, _k(dt, (1 << half) + (1 << width)), _k(dt, half))
    for dt, half, width in ((_U16, 8, 3), (_U32, 16, 6), (_U64, 32, 12))
]
# 6 bits: fields too wide for that, so lane - (lane >> half) * (2^half - 2^width) (2 levels).
_P6 = [
    (dt, _k(dt, half), _k(dt, (1 << half) - (1 << width)))
    for dt, half, width in ((_U16, 8, 6), (_U32, 16, 12))
]
_SHIFT24 = {_U32: _k(_U32, 24), _U64: _k(_U64, 24)}

# Unpack, one split level: a | b << width -> a | b << half.
# 4 bits: (lane | lane << 4) & 0x0F0F.
_U4 = (_k(_U16, 4), _k(_U16, 0x0F0F))
# 2 bits: lane * (1 + 2^12) copies the byte to bits 0 and 12 (disjoint, so no carries); masking
# keeps one nibble of each copy. Then the same with 1 + 2^6 on the nibbles.
_U2 = [
    (_k(_U32, 1 + (1 << 12)), _k(_U32, 0x000F000F)),
    (_k(_U32, 1 + (1 << 6)), _k(_U32, 0x03030303)),
]
# 6 and 3 bits: 24 -> 12 | 12 by masks and a shift (which also drops _load3's garbage byte);
# then lane + (lane & high fields) * (2^shift - 1), which moves the high fields up by `shift`.
_U6 = (_k(_U32, 0xFFF), _k(_U32, 0xFFF000), _k(_U32, 4), _k(_U32, 0x0FC00FC0), _k(_U32, 3))
_U3 = (
    _k(_U64, 0xFFF), _k(_U64, 0xFFF000), _k(_U64, 20),
    [(_k(_U64, 0x00000FC000000FC0), _k(_U64, (1 << 10) - 1)),  # 12 -> 6 | 6 << 16
     (_k(_U64, 0x0038003800380038), _k(_U64, (1 << 5) - 1))],  # 6 -> 3 | 3 << 8
)


def _pack(codes: np.ndarray, out: np.ndarray, bits: int, tmp: np.ndarray) -> None:
    """Pack uint8 `codes` (< 2^bits, length a multiple of 8; clobbered) into out[: len * bits / 8].

    For 6 and 3 bits, `out` needs one byte more, which is left as it was (see _store3). `tmp` is
    scratch, at least as long as `codes`.
    """
    n = codes.size
    if bits == 8:
        np.copyto(out[:n], codes)
    elif bits == 4:
        w, t = codes.view(_U16), tmp[:n].view(_U16)
        np.right_shift(w, _P4, out=t)
        np.bitwise_or(t, w, out=t)  # low byte: c0 | c1 << 4
        np.copyto(out[: n // 2], t, casting="unsafe")  # keep the low byte of each lane
    elif bits == 2:
        w = codes.view(_U32)
        np.multiply(w, _P2[0], out=w)
        np.right_shift(w, _P2[1], out=w)
        np.copyto(out[: n // 4], w, casting="unsafe")
    elif bits == 3:
        for dt, mul, half in _P3:
            w = codes.view(dt)
            np.multiply(w, mul, out=w)
            np.right_shift(w, half, out=w)
        _store3(codes.view(_U64), out, tmp[:n].view(_U64))  # 24 bits per uint64 lane
    elif bits == 6:
        for dt, half, mul in _P6:
            w, t = codes.view(dt), tmp[:n].view(dt)
            np.right_shift(w, half, out=t)
            np.multiply(t, mul, out=t)
            np.subtract(w, t, out=w)
        _store3(codes.view(_U32), out, tmp[:n].view(_U32))  # 24 bits per uint32 lane
    else:
        raise AssertionError(bits)


def _store3(w: np.ndarray, out: np.ndarray, t: np.ndarray) -> None:
    """Write the low 3 bytes of each lane of `w` to out[3j : 3j + 3], one 4-byte store per lane.

    The stores overlap by one byte, so lane j first gets lane j+1's low byte as its 4th byte: both
    stores to a shared byte then write the same value, in whatever order. The last lane's 4th byte
    lands on out[3m], which is put back afterwards.
    """
    m = w.size
    np.left_shift(w[1:], _SHIFT24[w.dtype], out=t[: m - 1])
    np.bitwise_or(w[:-1], t[: m - 1], out=w[:-1])
    spill = out[3 * m]
    np.copyto(np.ndarray((m,), _U32, buffer=out, strides=(3,)), w, casting="unsafe")
    out[3 * m] = spill


def _load3(src: np.ndarray, w: np.ndarray) -> None:
    """w[j] = src[3j : 3j + 3] as a little-endian integer, plus garbage in bits 24..31 (except in
    the last lane, which is read on its own so that nothing past src is touched)."""
    m = w.size
    np.copyto(w[:-1], np.ndarray((m - 1,), _U32, buffer=src, strides=(3,)), casting="unsafe")
    w[-1] = int.from_bytes(src[3 * m - 3 : 3 * m].tobytes(), "little")


def _unpack(packed: np.ndarray, codes: np.ndarray, bits: int, tmp: np.ndarray) -> None:
    """Inverse of _pack: `codes` (length a multiple of 8) from its len * bits / 8 packed bytes."""
    n = codes.size
    if bits == 8:
        np.copyto(codes, packed[:n])
    elif bits == 4:
        (sh, mask), w, t = _U4, codes.view(_U16), tmp[:n].view(_U16)
        np.copyto(w, packed[: n // 2])  # one packed byte per uint16 lane
        np.left_shift(w, sh, out=t)
        np.bitwise_or(w, t, out=w)
        np.bitwise_and(w, mask, out=w)
    elif bits == 2:
        w = codes.view(_U32)
        np.copyto(w, packed[: n // 4])  # one packed byte per uint32 lane
        for mul, mask in _U2:
            np.multiply(w, mul, out=w)
            np.bitwise_and(w, mask, out=w)
    elif bits == 6:
        lo, hi, sh, mid, mul = _U6
        w, t = codes.view(_U32), tmp[:n].view(_U32)
        _load3(packed, w)  # 4 codes per lane
        np.bitwise_and(w, hi, out=t)  # 24 bits -> 12 | 12 << 16 (and drops the garbage byte)
        np.bitwise_and(w, lo, out=w)
        np.left_shift(t, sh, out=t)
        np.bitwise_or(w, t, out=w)
        np.bitwise_and(w, mid, out=t)  # 12 -> 6 | 6 << 8
        np.multiply(t, mul, out=t)
        np.add(w, t, out=w)
    elif bits == 3:
        lo, hi, sh, levels = _U3
        w, t = codes.view(_U64), tmp[:n].view(_U64)
        _load3(packed, w)  # 8 codes per lane
        np.bitwise_and(w, hi, out=t)  # 24 -> 12 | 12 << 32
        np.bitwise_and(w, lo, out=w)
        np.left_shift(t, sh, out=t)
        np.bitwise_or(w, t, out=w)
        for mid, mul in levels:
            np.bitwise_and(w, mid, out=t)
            np.multiply(t, mul, out=t)
            np.add(w, t, out=w)
    else:
        raise AssertionError(bits)


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
        scale, zp = _tensor_params(lo, hi, bits)
        q.scheme = pb.PER_TENSOR
        q.scales.append(float(scale))
        q.zero_points.append(zp)
        values = [np.array(np.float32(1.0) / scale), np.array(zp + 0.5, np.float32)]
        layout = _per_tensor(values, flat.size)
    else:
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"tensor {t.name!r}: axis {axis} out of range for rank {x.ndim}")
        axis %= x.ndim
        pre = int(np.prod(x.shape[:axis]))
        c = x.shape[axis]
        post = int(np.prod(x.shape[axis + 1 :]))
        v = x.reshape(pre, c, post)
        if v.size:
            lo, hi = _channel_range(v)
        else:
            lo = hi = np.zeros(c, np.float32)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise ValueError(f"tensor {t.name!r}: contains NaN or Inf; cannot quantize")
        scale, zp = _affine_params(lo, hi, bits)
        q.scheme = pb.PER_CHANNEL
        q.axis = axis
        inv = (1.0 / scale.astype(np.float64)).astype(np.float32)
        off = (zp + 0.5).astype(np.float32)
        q.scales.extend(scale.tolist())
        q.zero_points.extend(zp.tolist())
        flat = x.reshape(-1)
        layout = _per_channel([inv, off], c, post, flat.size)
    return _quantize_pack(flat, layout, bits).tobytes()


def _quantize_pack(flat: np.ndarray, layout: _Layout, bits: int) -> np.ndarray:
    """codes = floor(x * inv + off) (x * inv + off >= 0 by the choice of scale), packed at `bits`;
    `layout` serves (inv, off)."""
    n = flat.size
    whole = -(-n // 8) * 8  # the last chunk is padded to whole groups of 8 codes
    out = np.empty(packed_nbytes(whole, bits) + 1, np.uint8)  # + 1: room for _store3's spill
    step = layout.step
    size = min(-(-step // 8) * 8, whole)
    buf = np.empty(size, np.float32)
    codes, tmp = (np.empty(size, np.uint8), np.empty(size, np.uint8)) if bits < 8 else (None, None)
    for s in range(0, n, step):
        e = min(n, s + step)
        m = e - s
        b = buf[:m]
        for a, z, shape, (inv, off) in layout.pieces(s, e):
            ba = b[a - s : z - s].reshape(shape)
            np.multiply(flat[a:z].reshape(shape), inv, out=ba)
            np.add(ba, off, out=ba)
        if bits == 8:  # codes are the bytes: cast straight into the output
            np.copyto(out[s:e], b, casting="unsafe")  # truncation = floor, as all are >= 0
            continue
        mp = -(-m // 8) * 8
        cd = codes[:mp]
        if mp > m:
            cd[m:] = 0
        np.copyto(cd[:m], b, casting="unsafe")
        ob = s * bits // 8
        _pack(cd, out[ob : ob + mp * bits // 8 + 1], bits, tmp)
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
    levels = (1 << bits) - 1
    if count <= 8:  # per tensor: Python floats (numpy calls on 1-element arrays cost ~10 us here)
        scales, zps = list(q.scales), list(q.zero_points)
        finite = all(math.isfinite(s) and s > 0 for s in scales)
        overflow = any(s * levels > _F32_MAX for s in scales)
        zps_ok = all(0 <= z <= levels for z in zps)
    else:
        scales = np.asarray(q.scales, np.float64)
        finite = bool(np.isfinite(scales).all() and (scales > 0).all())
        overflow = bool((scales * levels > _F32_MAX).any())
        zps = np.asarray(q.zero_points, np.int64)
        zps_ok = not ((zps < 0).any() or (zps > levels).any())
    if not finite:
        raise _fail(t, "scales must be finite and > 0")
    if overflow:
        raise _fail(t, "scales so large that dequantized values overflow float32")
    if not zps_ok:
        raise _fail(t, f"zero points must lie in [0, {levels}]")
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


def _unpack_dequantize(packed: np.ndarray, n: int, shape, q, bits: int) -> np.ndarray:
    """x = (q - zero_point) * scale, chunk by chunk (unpacking, the cast and the ops stay in cache).

    With zero point 0 (all ReLU outputs) it is a cast and a multiply. Below 8 bits q - zero_point
    fits int8, so the subtraction is done on the bytes. Same float32 results either way: q and
    zero_point are small integers, so q - zero_point is exact.
    """
    out = np.empty(n, np.float32)
    byte_zp = None
    if q.scheme == pb.PER_CHANNEL:
        scales = np.asarray(q.scales, np.float32)
        zps = np.asarray(q.zero_points, np.float32)
        has_zp = bool(zps.any())
        c, post = shape[q.axis], math.prod(shape[q.axis + 1 :])
        layout = _per_channel([scales, zps] if has_zp else [scales], c, post, n)
    else:
        zp = q.zero_points[0]
        has_zp = zp != 0
        layout = _per_tensor([np.array(q.scales[0], np.float32), np.array(zp, np.float32)], n)
        if has_zp and bits < 8:
            byte_zp = np.array(zp, np.uint8)
    step = layout.step
    size = -(-min(step, n) // 8) * 8
    codes, tmp = (np.empty(size, np.uint8), np.empty(size, np.uint8)) if bits < 8 else (None, None)
    for s in range(0, n, step):
        e = min(n, s + step)
        m = e - s
        if bits == 8:
            cd = packed[s:e]
        else:
            mp = -(-m // 8) * 8
            ob, nb = s * bits // 8, mp * bits // 8
            src = packed[ob : ob + nb]
            if src.size < nb:  # the last group's padding bytes are not on the wire
                src = np.concatenate([src, np.zeros(nb - src.size, np.uint8)])
            _unpack(src, codes[:mp], bits, tmp)
            cd = codes[:m]
        if byte_zp is not None:
            np.subtract(cd, byte_zp, out=cd)  # wraps to q - zero_point as int8
            np.copyto(out[s:e], cd.view(np.int8))
        else:
            np.copyto(out[s:e], cd)
        for a, z, piece_shape, vals in layout.pieces(s, e):
            o = out[a:z].reshape(piece_shape)
            if has_zp and byte_zp is None:
                np.subtract(o, vals[1], out=o)
            np.multiply(o, vals[0], out=o)
    return out.reshape(shape)
