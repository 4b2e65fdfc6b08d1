"""int4 weights in the tensor cores' fragment order: the same bytes as a `QArray`, permuted for batched decode.

A contraction-last int4 `QArray` (values `[..., N, K/2]`, two codes a byte along K) stores each row's codes in
K order, which the batch-1 row kernel streams. The batched product on Hopper's tensor cores
(`pallas_kernels/fragment_matmul.py`) feeds the codes to wgmma as 8-bit integers from registers, and wants
each thread of a warpgroup to find the sixteen codes it feeds one 32-wide K step in two adjacent 32-bit words
whose low and high nibbles are its four A registers, so that widening them is a mask and a shift-and-mask a
word. `to_fragment_order` rewrites the bytes that way without changing any shape:

- values: in every block of 64 rows x 256 K (128 bytes a row), the block's 8192 bytes hold 8 steps x 128
  threads x 8 bytes in (step, thread, byte) order. Thread t = 32 w + 4 r + c's byte 4 j + e holds the codes of
  column 16 j + 4 c + e of its step, rows 16 w + r (low nibble) and 16 w + r + 8 (high nibble). Read
  row-major, a (64, 128)-byte tile of the stored array is exactly that block's bytes.
- scales and offsets (`[..., N, K/g]`): each 64-row block's `[64, K/g]` transposed in place, so that the same
  bytes viewed as `[..., N/64, K/g, 64]` give a group's 64 scales contiguously.

Shapes, dtypes, group sizes and the tree structure are those of the row-ordered array, so sizes, planning and
serialization see no difference; `QArray.order` says which bytes these are, and `codes` / `dequantize` read
both orders. Needs N a multiple of 64 and K of 256, with groups dividing 256. The row kernel and the Triton
weight kernel read row order only; the dispatch in `ops` sends fragment-ordered weights to the fragment
kernel on a GPU and to XLA's dequantized product elsewhere. Sharding the contracted axis (row-parallel tensor
parallelism) would cut through the permuted blocks and is refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROWS = 64  # rows of a block: wgmma's M
BLOCK_K = 256  # K elements of a block: 128 bytes a row, one TMA box of (64, 128) bytes
STEPS = BLOCK_K // 32  # wgmma k32 steps (8-bit operands) a block
ORDERS = ("rows", "fragments")
# The byte order's version, saved with fragment-ordered arrays (`serialize.py`): 1 fed 16-bit operands (eight
# codes of a k16 step a word), 2 the 8-bit ones above. Files of another version are refused, not misread.
LAYOUT_VERSION = 2


def check_fragment_shape(n: int, k: int, group_size: int | None, what: str = "weight") -> None:
    """Raise a ValueError naming the problem when an [N, K] int4 weight cannot take the fragment order."""
    if group_size is None or BLOCK_K % group_size or group_size % 32:
        raise ValueError(f"{what}: the fragment order needs int4 groups of 32, 64, 128 or 256, got {group_size}")
    if n % ROWS or k % BLOCK_K:
        raise ValueError(f"{what}: the fragment order needs N a multiple of {ROWS} and K of {BLOCK_K}, "
                         f"got N={n}, K={k}")


def pack_codes(u: jax.Array) -> jax.Array:
    """Codes `[..., N, K]` (uint8 in [0, 15]) -> fragment-ordered bytes `[..., N, K/2]`."""
    *lead, n, k = u.shape
    u = u.astype(jnp.uint8).reshape(*lead, n // ROWS, 4, 2, 8, k // BLOCK_K, STEPS, 2, 4, 4)
    nd = len(lead)
    b, w, h, r, kb, s, j, c, e = (nd + i for i in range(9))
    u = u.transpose(*range(nd), b, kb, s, w, r, c, j, e, h)
    blocks = (u[..., 0] | (u[..., 1] << 4)).reshape(*lead, n // ROWS, k // BLOCK_K, ROWS, BLOCK_K // 2)
    return blocks.swapaxes(-3, -2).reshape(*lead, n, k // 2)


def unpack_codes(values: jax.Array) -> jax.Array:
    """Inverse of `pack_codes`: fragment-ordered bytes `[..., N, K/2]` -> codes `[..., N, K]` (uint8)."""
    *lead, n, half = values.shape
    k = 2 * half
    blocks = values.reshape(*lead, n // ROWS, ROWS, k // BLOCK_K, BLOCK_K // 2).swapaxes(-3, -2)
    byte = blocks.reshape(*lead, n // ROWS, k // BLOCK_K, STEPS, 4, 8, 4, 2, 4)  # [..., b, kb, s, w, r, c, j, e]
    u = jnp.stack([byte & 0xF, byte >> 4], axis=-1)  # [..., b, kb, s, w, r, c, j, e, h]
    nd = len(lead)
    b, kb, s, w, r, c, j, e, h = (nd + i for i in range(9))
    u = u.transpose(*range(nd), b, w, h, r, kb, s, j, c, e)
    return u.reshape(*lead, n, k).astype(jnp.uint8)


def permute_group_params(a: jax.Array) -> jax.Array:
    """Scales or offsets `[..., N, G]` -> each 64-row block's `[64, G]` transposed in place."""
    *lead, n, g = a.shape
    return a.reshape(*lead, n // ROWS, ROWS, g).swapaxes(-1, -2).reshape(*lead, n, g)


def unpermute_group_params(a: jax.Array) -> jax.Array:
    """Inverse of `permute_group_params`."""
    *lead, n, g = a.shape
    return a.reshape(*lead, n // ROWS, g, ROWS).swapaxes(-1, -2).reshape(*lead, n, g)
