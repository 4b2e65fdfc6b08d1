"""A residual add and the RMSNorm that follows it, for a few rows in one launch (Pallas, Triton lowering),
plus a plain-jnp reference. Knows nothing about models: arrays and static values.

Why: in a decode step a block's output joins the residual stream and the next block normalises the sum
right away. XLA makes that two kernels per norm (a reduction for the sum of squares, with the add fused
into it, then a pass scaling the row), since the scaling needs the reduction's result; with two norms a
layer that is four launches of ~1.8 us in a llama-3-8b step on an H200 (benchmarks/BENCHMARKS.md,
session 10). A row of a few thousand elements fits one program: it adds, sums the squares and writes both
the new residual and its normalised copy. Writing x's digits too, programs are (row, chunk of D), up to
CHUNKS a row, so that the launch spreads over the SMs: each reads its whole row for the statistics (the row's
other programs read it from L2) and writes its chunk (llama-3-8b batch 16 on an H200: 3.6 -> 3.1 us a launch;
without digits one program a row stays faster, 2.4 against 2.7 us; session 27).

Layout: x [R, D] (the residual stream, D a power of two), h [R, D] (the block's output, any float dtype),
weight [D] or stacked [L, D] with a layer index (read in place).
The arithmetic is the library's: h rounded to x's dtype and added in float32, rounded to x's dtype; the
mean of its squares in float32, x * rsqrt(mean + eps) rounded to x's dtype, times the weight, in the
promoted dtype of the two.

With `digits=(P, group, width)` the launch also writes the normalised rows as the fragment kernel's x
(`x_digits.py`: int8 digits [2 P, D], 1 / q [P], integer group sums [D / group, width]), so that a
fragment-ordered product after the norm needs no preparation launch of its own. Rows M..P-1 of those
outputs are left unwritten: the fragment kernel's output columns for them are dropped.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import is_pow2
from pallas_kernels.x_digits import row_scale, store_digits

_WARPS = 4  # 16 passes the native test but was not faster in the llama-3-8b step (H200, S10-10 / S11-1)
MAX_WIDTH = 16384  # one program holds the whole row
CHUNKS = 8  # programs a row at most when writing x's digits


def supports(width: int) -> bool:
  """Whether the kernel takes rows of this width (a Triton block is a power of two)."""
  return is_pow2(width) and 32 <= width <= MAX_WIDTH


def _chunk(width: int, group: int | None) -> int:
  """Columns a program writes: the row without digits (`group` None); else width / CHUNKS, whole digit groups, at
  least 32 (a power of two: width is one)."""
  return width if group is None else min(width, max(width // CHUNKS, 32, group))


def _kernel(layer_ref, x_ref, h_ref, w_ref, sum_ref, norm_ref, *digit_refs, eps: float, digits, chunk: int):
  f32 = jnp.float32
  r, c = pl.program_id(0), pl.program_id(1)
  row, width = pl.ds(r, 1), x_ref.shape[1]

  def added(cols):  # x + h over columns `cols`, in x's dtype
    x = x_ref[row, cols]
    return (x.astype(f32) + h_ref[row, cols].astype(x.dtype).astype(f32)).astype(x.dtype)

  def normed(s, cols):  # the norm of s over columns `cols`, given the row's inv_rms
    g = w_ref[pl.ds(layer_ref[0], 1), cols]  # [1, n] of the stacked [L, D]
    return (g.astype(f32) * (s.astype(f32) * inv_rms).astype(s.dtype).astype(f32)).astype(norm_ref.dtype)

  whole = pl.ds(0, width)
  s_row = added(whole)
  inv_rms = lax.rsqrt(jnp.sum(jnp.square(s_row.astype(f32))) / width + eps)
  one = chunk == width  # (a program a row: its chunk is the row)
  cols = whole if one else pl.ds(c * chunk, chunk)
  s = s_row if one else added(cols)
  sum_ref[row, cols] = s
  n = normed(s, cols)
  norm_ref[row, cols] = n
  if digits is not None:
    d_ref, inv_ref, sums_ref = digit_refs
    rows, group, _ = digits
    q = row_scale(jnp.max(jnp.abs((n if one else normed(s_row, whole)).astype(f32))))
    store_digits(d_ref, inv_ref, sums_ref, r, rows, n.astype(f32), q, c * chunk, group)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "digits"))
def add_rms_norm(x: jax.Array, h: jax.Array, weight: jax.Array, layer: jax.Array | int | None = None, *,
                 eps: float, interpret: bool | None = None, digits: tuple[int, int, int] | None = None):
  """(x + h, RMSNorm(x + h) * weight) for x and h [..., D]; weight [D], or layer `layer` of a stacked
  [L, D]. With `digits=(P, group, width)` a third element: the norm's (digits, inv_q, sums) as
  `x_digits` makes them for P rows (module docstring)."""
  width = x.shape[-1]
  if h.shape != x.shape:
    raise ValueError(f"h must be x's shape {x.shape}, got {h.shape}")
  if not supports(width):
    raise ValueError(f"add_rms_norm kernel needs a power-of-two width in [32, {MAX_WIDTH}], got {width}")
  stacked = weight if weight.ndim == 2 else weight[None]
  if stacked.ndim != 2 or stacked.shape[1] != width:
    raise ValueError(f"weight must be [{width}] or [L, {width}], got {weight.shape}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  rows = x.reshape(-1, width)
  chunk = _chunk(width, None if digits is None else digits[1])
  layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
  out_shape = [jax.ShapeDtypeStruct(rows.shape, x.dtype),
               jax.ShapeDtypeStruct(rows.shape, jnp.promote_types(weight.dtype, x.dtype))]
  if digits is not None:
    padded, group, sums_width = digits
    if not (rows.shape[0] <= padded <= sums_width and width % group == 0):
      raise ValueError(f"add_rms_norm: digits {digits} do not fit {rows.shape[0]} rows of width {width}")
    out_shape += [jax.ShapeDtypeStruct((2 * padded, width), jnp.int8), jax.ShapeDtypeStruct((padded,), jnp.float32),
                  jax.ShapeDtypeStruct((width // group, sums_width), jnp.float32)]
  outs = pl.pallas_call(
      functools.partial(_kernel, eps=float(eps), digits=digits, chunk=chunk),
      grid=(rows.shape[0], width // chunk),
      in_specs=[pl.no_block_spec] * 4,
      out_specs=[pl.no_block_spec] * len(out_shape),
      out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=_WARPS, num_stages=1),
      interpret=interpret,
      name="add_rms_norm",
  )(layer, rows, h.reshape(rows.shape), stacked)
  new_x, normed = outs[0].reshape(x.shape), outs[1].reshape(x.shape)
  return (new_x, normed) if digits is None else (new_x, normed, tuple(outs[2:]))


def add_rms_norm_reference(x, h, weight, layer=None, *, eps: float):
  """Plain jnp: the same arithmetic on whole arrays."""
  s = (x.astype(jnp.float32) + h.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)
  g = weight if weight.ndim == 1 else weight[0 if layer is None else layer]
  sf = s.astype(jnp.float32)
  return s, g * (sf * lax.rsqrt(jnp.mean(sf * sf, axis=-1, keepdims=True) + eps)).astype(s.dtype)
