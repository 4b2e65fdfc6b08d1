"""x as two signed bytes a value, for the fragment kernel's 8-bit tensor-core products (Pallas, Triton lowering),
plus a plain-jnp reference.

The fragment kernel (`fragment_matmul.py`) multiplies int4 codes as 8-bit integers, so x must be integers too:
each row a 16-bit fixed point t = round(x q) with q = 32639 / max |x| (so that hi = (t + 128) >> 8 and
lo = t - 256 hi are both in [-128, 127]), stored as `digits [2 P, K]` int8 (the P rows' high bytes, then their
low bytes: wgmma's N = 2 P columns), `inv_q [P]` (1 / q, applied to the product's output) and x's integer group
sums `sums [G, width]` (float32, exact: |sum| < 2^24 for groups up to 256), which take the codes' zero point
and offsets back. Rows M..P-1 (padding up to wgmma's N) are zeros.

Rounding: |t / q - x| <= 0.5 / q = max |x| / 65278 for every element of a row (bfloat16 rounds each element to
2^-9 of itself); t * inv_q adds float32's rounding of 1 / q, 2^-24 of |t|.

Why one kernel: XLA makes the same arithmetic three launches (the row maximum, the digits, the sums: a
reduction cannot feed an elementwise pass in the same fusion), ~4 us a product against the kernel's one.
Programs: (row, chunk of K), up to CHUNKS a row, so that a call spreads over the SMs; each reads its whole row
once for the maximum (one masked load of the row padded to a power of two; the row's other programs read it
from L2) and writes its chunk's digits and group sums. One program a row walking K took 7.7 us at K = 14336
and 16 rows on an H200 (S26-2).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import M_INIT, is_pow2, next_pow2

X_MAX = 127 * 256 + 127  # the largest |t|: hi = (t + 128) >> 8 and lo = t - 256 hi stay signed bytes
_WARPS = 4
CHUNKS = 8  # programs a row at most


def _chunk(k: int, group: int) -> int:
    """K elements a program writes: a power of two dividing K (a Triton block), K / CHUNKS or more."""
    c = k & -k
    while c // 2 >= group and k // c < CHUNKS and k % (c // 2) == 0 and k // (c // 2) <= CHUNKS:
        c //= 2
    if c < group:
        raise ValueError(f"x_digits: K={k} must be a multiple of the group ({group}) in power-of-two chunks")
    return c


def row_scale(amax):
    """q = X_MAX / max |x|; 1 for a row of zeros (padding)."""
    return jnp.where(amax > 0, X_MAX / jnp.where(amax > 0, amax, 1.0), 1.0)


def _fixed(xf, q):
    """t = round(x q) (half up), hi, lo. t is clamped to +-X_MAX: where a value is computed twice (the merged
    attention output: once for the row's maximum, once for the digits) a last-bit difference must not wrap a
    digit."""
    t = jnp.clip(jnp.floor(xf * q + 0.5), -X_MAX, X_MAX).astype(jnp.int32)
    hi = (t + 128) >> 8
    return t, hi, t - 256 * hi


def store_digits(d_ref, inv_ref, sums_ref, row, rows: int, values, q, start, group: int):
    """Inside a Triton kernel: the digits of `values` (float32 [1, n], x row `row` from column `start`, scaled by
    the row's q) into rows `row` (high bytes) and `rows + row` (low bytes) of d_ref [2 rows, K], their group sums
    into column `row` of sums_ref [K / group, width], and (by the program holding column 0) 1 / q into
    inv_ref [rows]. Shared with `add_rms_norm`, which makes them from its normed rows."""

    @pl.when(start == 0)
    def _():
        inv_ref[pl.ds(row, 1)] = jnp.full((1,), 1.0, jnp.float32) / q

    n = values.shape[1]
    t, hi, lo = _fixed(values, q)
    d_ref[pl.ds(row, 1), pl.ds(start, n)] = hi.astype(jnp.int8)
    d_ref[pl.ds(rows + row, 1), pl.ds(start, n)] = lo.astype(jnp.int8)
    sums = jnp.sum(t.reshape(n // group, group), axis=1).astype(jnp.float32)
    sums_ref[pl.ds(start // group, n // group), pl.ds(row, 1)] = sums[:, None]


def _kernel(x_ref, d_ref, inv_ref, sums_ref, *, m, rows, k, chunk, group):
    f32 = jnp.float32
    r, c = pl.program_id(0), pl.program_id(1)
    keep = (r < m).astype(f32)  # padded rows: zeros
    src = jnp.minimum(r, m - 1)
    width = next_pow2(k)
    cols = jnp.arange(width)
    row = pltriton.load(x_ref.at[pl.ds(src, 1), pl.ds(0, width)], mask=(cols < k)[None, :], other=0)
    q = row_scale(jnp.max(jnp.abs(row.astype(f32))) * keep)
    part = x_ref[pl.ds(src, 1), pl.ds(c * chunk, chunk)].astype(f32) * keep
    store_digits(d_ref, inv_ref, sums_ref, r, rows, part, q, c * chunk, group)


@functools.partial(jax.jit, static_argnames=("rows", "group_size", "width", "interpret"))
def x_digits(x: jax.Array, *, rows: int, group_size: int, width: int | None = None,
             interpret: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [M, K] -> (digits [2 rows, K] int8, inv_q [rows] float32, sums [K / group_size, width] float32) for
    rows >= M; sums' columns from `rows` to `width` are left unwritten (the fragment kernel's padding)."""
    m, k = x.shape
    width = rows if width is None else width
    if not 1 <= m <= rows <= width:
        raise ValueError(f"x_digits: need 1 <= M ({m}) <= rows ({rows}) <= width ({width})")
    chunk = _chunk(k, group_size)
    kernel = functools.partial(_kernel, m=m, rows=rows, k=k, chunk=chunk, group=group_size)
    return _digits_call(kernel, (rows, k // chunk), 1, rows, k, group_size, width, interpret, "x_digits")(x)


def _digits_call(kernel, grid, n_inputs: int, rows: int, k: int, group: int, width: int, interpret, name: str):
    """The pallas_call of a launch writing x's digits [2 rows, k], 1 / q [rows] and sums [k / group, width]."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.no_block_spec] * n_inputs,
        out_specs=[pl.no_block_spec] * 3,
        out_shape=[jax.ShapeDtypeStruct((2 * rows, k), jnp.int8), jax.ShapeDtypeStruct((rows,), jnp.float32),
                   jax.ShapeDtypeStruct((k // group, width), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=_WARPS, num_stages=1),
        interpret=interpret,
        name=name,
    )


def merged_supports(o_shape, group_size: int) -> bool:
    """Whether `x_digits_merged` takes attention partials o of this shape [B, K, splits, G, H] for groups of
    `group_size`: each kv head's G x H outputs whole groups, K, G and H powers of two."""
    _, kv_heads, _, group, head_dim = o_shape
    return (group * head_dim) % group_size == 0 and all(map(is_pow2, (kv_heads, group, head_dim)))


def _merged(o_ref, m_ref, l_ref, row, heads, dtype):
    """Row `row`'s attention output for kv heads `heads` (a pl.ds), its key splits merged as `combine_splits`
    merges them and rounded to `dtype`: float32 [1, kv heads x G x H]. Splits padded to a power of two load as
    empty (m = M_INIT, l = o = 0), which weigh nothing."""
    _, _, splits, group, head_dim = o_ref.shape
    padded = next_pow2(splits)
    shape = (heads.size, padded, group)
    ok = jnp.broadcast_to((jnp.arange(padded) < splits)[None, :, None], shape)
    span = pl.ds(0, padded)
    m = pltriton.load(m_ref.at[row, heads, span, :], mask=ok, other=M_INIT)  # [k, S, G]
    w = jnp.exp2(m - jnp.max(m, axis=1, keepdims=True))
    l_sum = jnp.sum(pltriton.load(l_ref.at[row, heads, span, :], mask=ok, other=0.0) * w, axis=1)  # [k, G]
    o = pltriton.load(o_ref.at[row, heads, span, :, :], mask=jnp.broadcast_to(ok[..., None], shape + (head_dim,)),
                      other=0.0)  # [k, S, G, H]
    out = jnp.sum(o * w[..., None], axis=1) / jnp.where(l_sum > 0, l_sum, 1.0)[..., None]  # no key -> zeros
    return out.astype(dtype).astype(jnp.float32).reshape(1, -1)


def _merge_kernel(o_ref, m_ref, l_ref, d_ref, inv_ref, sums_ref, *, rows, group, dtype):
    batch, kv_heads, _, g, head_dim = o_ref.shape
    r, c = pl.program_id(0), pl.program_id(1)
    keep = (r < batch).astype(jnp.float32)  # padded rows: zeros
    src = jnp.minimum(r, batch - 1)
    q = row_scale(jnp.max(jnp.abs(_merged(o_ref, m_ref, l_ref, src, pl.ds(0, kv_heads), dtype))) * keep)
    part = _merged(o_ref, m_ref, l_ref, src, pl.ds(c, 1), dtype) * keep
    store_digits(d_ref, inv_ref, sums_ref, r, rows, part, q, c * g * head_dim, group)


@functools.partial(jax.jit, static_argnames=("dtype", "rows", "group_size", "width", "interpret"))
def x_digits_merged(o: jax.Array, m: jax.Array, l: jax.Array, dtype, *, rows: int, group_size: int,
                    width: int | None = None, interpret: bool | None = None):
    """`x_digits` of a split-K decode attention's output given as its partials (`common.Partials`: o [B, K,
    splits, G, H], m and l [B, K, splits, G]): each row merged as `combine_splits` merges it (rounded to `dtype`)
    and flattened to [K G H], in the same launch, so that the merge needs no launch of its own. One program a
    (row, kv head); each merges its whole row once more for the row's maximum."""
    batch, kv_heads, splits, group, head_dim = o.shape
    width = rows if width is None else width
    k = kv_heads * group * head_dim
    if m.shape != o.shape[:4] or l.shape != o.shape[:4]:
        raise ValueError(f"x_digits_merged: m and l must be {o.shape[:4]}, got {m.shape} and {l.shape}")
    if not 1 <= batch <= rows <= width:
        raise ValueError(f"x_digits_merged: need 1 <= B ({batch}) <= rows ({rows}) <= width ({width})")
    if not merged_supports(o.shape, group_size):
        raise ValueError(f"x_digits_merged: a kv head's {group} x {head_dim} outputs must be whole groups of "
                         f"{group_size}, with K, G and H powers of two")
    kernel = functools.partial(_merge_kernel, rows=rows, group=group_size, dtype=dtype)
    return _digits_call(kernel, (rows, kv_heads), 3, rows, k, group_size, width, interpret, "x_digits_merged")(o, m, l)


def x_digits_reference(x: jax.Array, *, rows: int, group_size: int):
    """Plain jnp: the same arithmetic on whole arrays (sums without padding columns)."""
    m, k = x.shape
    xf = jnp.pad(x.astype(jnp.float32), ((0, rows - m), (0, 0)))
    q = row_scale(jnp.max(jnp.abs(xf), axis=1, keepdims=True))
    t, hi, lo = _fixed(xf, q)
    sums = jnp.sum(t.reshape(rows, k // group_size, group_size), axis=-1).astype(jnp.float32).T
    return jnp.concatenate([hi, lo]).astype(jnp.int8), (1.0 / q)[:, 0], sums
