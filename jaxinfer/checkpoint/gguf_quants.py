"""Numpy decoders for the GGUF tensor encodings jaxinfer reads: F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q4_K, Q5_K and Q6_K.

Every decoder works on a whole array of blocks at once (no Python loop over blocks). `dequantize`
turns a tensor's raw bytes into float32; `split_blocks` hands back the integer values and the
per-block scales (and minimums) of the simple 32-element formats undecoded, so that a caller can keep
weights quantized. The block layouts are ggml's (`ggml-common.h`); the float32 arithmetic is done in
the reference order (scale the sub-block scale first, then the integer), so results match the
`gguf` package's decoders bit for bit.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256  # elements in a K-quant super-block

# Decode about this many input bytes at a time, so temporaries stay small next to the output.
_CHUNK_BYTES = 4 << 20


class BlockQuant(NamedTuple):
    """A tensor of 32-element blocks, still quantized: `dequantized = values * scale (+ offset)`.

    values: the integers in element order, shape (*rows, n_blocks, 32); int8 for Q8_0 (-128..127)
        and Q4_0 (-8..7, the stored nibble minus 8), uint8 for Q4_1 (0..15).
    scale: float16, shape (*rows, n_blocks), exactly as stored.
    offset: float16 block minimum for Q4_1 (added after scaling), None for Q8_0 and Q4_0.
    """

    values: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 stored at byte `start` of every block, as float32 of shape (n_blocks, 1)."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """ggml's 4-bit packing: byte j holds element j in its low nibble and element j + len in its high."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


# ---------------------------------------------------------------------------------------------------
# The 32-element formats (splittable)


def _split_q8_0(blocks):  # f16 d | int8 q[32]
    return blocks[:, 2:].view(np.int8), _f16(blocks, 0), None


def _split_q4_0(blocks):  # f16 d | u8 qs[16]
    return _nibbles(blocks[:, 2:]).view(np.int8) - np.int8(8), _f16(blocks, 0), None


def _split_q4_1(blocks):  # f16 d | f16 m | u8 qs[16]
    return _nibbles(blocks[:, 4:]), _f16(blocks, 0), _f16(blocks, 2)


_SPLITTERS: dict[GGMLQuantizationType, Callable] = {
    GGMLQuantizationType.Q8_0: _split_q8_0,
    GGMLQuantizationType.Q4_0: _split_q4_0,
    GGMLQuantizationType.Q4_1: _split_q4_1,
}


def _decode_split(split: Callable) -> Callable[[np.ndarray], np.ndarray]:
    def decode(blocks: np.ndarray) -> np.ndarray:
        values, scale, offset = split(blocks)
        out = scale * values.astype(np.float32)
        return out if offset is None else out + offset

    return decode


# ---------------------------------------------------------------------------------------------------
# K-quants: 256-element super-blocks of 16- or 32-element sub-blocks with 6- or 8-bit scales


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit mins, as float32 (n, 8).

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for
    the mins; bytes 8-11 the low 4 bits of scale 4-7 (low nibble) and min 4-7 (high nibble).
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 128 bytes -> (n, 8, 32): each 32 bytes hold sub-block 2j (low) and 2j+1 (high)."""
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)


def _decode_q4_k(blocks):  # f16 d | f16 dmin | u8 scales[12] | u8 qs[128]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    q = _k_low_nibbles(blocks[:, 16:144]).astype(np.float32)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1, QK_K)


def _decode_q5_k(blocks):  # f16 d | f16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    # Bit s of qh[l] is the fifth bit of element l of sub-block s.
    high = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (_k_low_nibbles(blocks[:, 48:176]) | (high << 4)).astype(np.float32)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1, QK_K)


def _decode_q6_k(blocks):  # u8 ql[128] | u8 qh[64] | int8 scales[16] | f16 d
    # Each half of 128 elements is four rows of 32: row k takes its low 4 bits from ql[32 * (k % 2):]
    # (low nibble for k < 2, high for k >= 2) and its top 2 bits from bits 2k..2k+1 of qh.
    ql = blocks[:, 0:128].reshape(-1, 2, 1, 2, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    q = ((low | (high << 4)).view(np.int8) - np.int8(32)).astype(np.float32).reshape(-1, 16, 16)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    return ((_f16(blocks, 208) * scales)[:, :, None] * q).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------------------------
# Plain floats (one "block" is one element)


def _decode_f32(blocks):
    return blocks.view(np.float32).copy()


def _decode_f16(blocks):
    return blocks.view(np.float16).astype(np.float32)


def _decode_bf16(blocks):
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


_DECODERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLQuantizationType.F32: _decode_f32,
    GGMLQuantizationType.F16: _decode_f16,
    GGMLQuantizationType.BF16: _decode_bf16,
    **{t: _decode_split(split) for t, split in _SPLITTERS.items()},
    GGMLQuantizationType.Q4_K: _decode_q4_k,
    GGMLQuantizationType.Q5_K: _decode_q5_k,
    GGMLQuantizationType.Q6_K: _decode_q6_k,
}

SUPPORTED_TYPES: tuple[str, ...] = tuple(t.name for t in _DECODERS)


# ---------------------------------------------------------------------------------------------------
# Public entry points


def ggml_type_of(ggml_type: GGMLQuantizationType | int | str, name: str | None = None) -> GGMLQuantizationType:
    """The supported GGMLQuantizationType for an enum, id or name; ValueError naming it otherwise."""
    try:
        if isinstance(ggml_type, str):
            qtype = GGMLQuantizationType[ggml_type]
        else:
            qtype = GGMLQuantizationType(int(ggml_type))
        label = qtype.name
    except (KeyError, ValueError):
        qtype, label = None, f"id {ggml_type!r}" if not isinstance(ggml_type, str) else repr(ggml_type)
    if qtype not in _DECODERS:
        subject = f"GGUF tensor {name!r} has type {label}" if name else f"GGUF tensor type {label}"
        raise ValueError(
            f"{subject}, which jaxinfer does not support; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    return qtype


def _as_blocks(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], name: str | None):
    """View `raw` (any dtype, any shape) as uint8 blocks (n_blocks, bytes_per_block), size-checked."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    label = f"GGUF tensor {name!r}" if name else "GGUF tensor"
    n_elements = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % block_size:
        raise ValueError(
            f"{label}: innermost dimension {shape[-1]} is not a multiple of the {qtype.name} block "
            f"size {block_size}"
        )
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    n_blocks = n_elements // block_size
    if data.size != n_blocks * type_size:
        raise ValueError(
            f"{label}: {qtype.name} data for shape {tuple(shape)} should be {n_blocks * type_size} bytes, "
            f"got {data.size} (truncated or corrupt file?)"
        )
    return data.reshape(n_blocks, type_size)


def dequantize(
    raw: np.ndarray, ggml_type: GGMLQuantizationType | int | str, shape, name: str | None = None
) -> np.ndarray:
    """Decode one tensor's raw data to a new float32 array of `shape`.

    `shape` is the numpy (row-major) shape, i.e. the GGUF dims reversed; blocks run along its last
    axis. `raw` may be the uint8 bytes or a typed view of them (as `GGUFReader` gives F32/F16 data).
    `name` only makes error messages say which tensor failed.
    """
    qtype = ggml_type_of(ggml_type, name)
    shape = tuple(int(d) for d in shape)
    blocks = _as_blocks(raw, qtype, shape, name)
    decode = _DECODERS[qtype]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    out = np.empty((blocks.shape[0], block_size), dtype=np.float32)
    step = max(1, _CHUNK_BYTES // type_size)
    for start in range(0, blocks.shape[0], step):  # bounded temporaries; each chunk is vectorised
        out[start : start + step] = decode(blocks[start : start + step]).reshape(-1, block_size)
    return out.reshape(shape)


def split_blocks(
    raw: np.ndarray, ggml_type: GGMLQuantizationType | int | str, shape, name: str | None = None
) -> BlockQuant:
    """Q8_0/Q4_0/Q4_1 data as (integer values, float16 scale, float16 offset or None), not decoded.

    Shapes follow `shape` (numpy order): values (*shape[:-1], shape[-1] // 32, 32), scales without the
    last axis. The values are unpacked to one per byte; the scales are the stored float16 bits.
    """
    qtype = ggml_type_of(ggml_type, name)
    if qtype not in _SPLITTERS:
        raise ValueError(
            f"split_blocks handles {', '.join(t.name for t in _SPLITTERS)}, not {qtype.name}"
            + (f" (tensor {name!r})" if name else "")
        )
    shape = tuple(int(d) for d in shape)
    blocks = _as_blocks(raw, qtype, shape, name)
    values, scale, offset = _SPLITTERS[qtype](blocks)
    grid = (*shape[:-1], shape[-1] // 32)
    as_f16 = lambda x: x.astype(np.float16).reshape(grid)  # float16 -> float32 -> float16 is exact
    return BlockQuant(
        values=np.ascontiguousarray(values).reshape(*grid, 32),
        scale=as_f16(scale),
        offset=None if offset is None else as_f16(offset),
    )
