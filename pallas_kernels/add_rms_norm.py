"""A residual add and the RMSNorm that follows it, for a few rows in one launch (Pallas, Triton lowering),
plus a plain-jnp reference. Knows nothing about models: arrays and static values.

Why: in a decode step a block's output joins the residual stream and the next block normalises the sum
right away. XLA makes that two kernels per norm (a reduction for the sum of squares, with the add fused
into it, then a pass scaling the row), since the scaling needs the reduction's result; with two norms a
layer that is four launches of ~1.8 us in a llama-3-8b step on an H200 (benchmarks/BENCHMARKS.md,
session 10). A row of a few thousand elements fits one program: it adds, sums the squares and writes both
the new residual and its normalised copy.

Layout: x [R, D] (the residual stream, D a power of two), h [R, D] (the block's output, any float dtype),
weight [D] or stacked [L, D] with a layer index (read in place). With `h_inv_q` [P], h is instead a split-K
product's float32 partials [S, P, D] (the fragment kernel's output), formed here as `fragment_matmul.split_sum`
forms it in x's dtype: the sum's own launch (an XLA loop fusion, ~1.4 us a product) is spared.
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
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import is_pow2, load_split_sum
from pallas_kernels.x_digits import row_scale, store_digits

_WARPS = 4  # 16 passes the native test but was not faster in the llama-3-8b step (H200, S10-10 / S11-1)
MAX_WIDTH = 16384  # one program holds the whole row


def supports(width: int) -> bool:
  """Whether the kernel takes rows of this width (a Triton block is a power of two)."""
  return is_pow2(width) and 32 <= width <= MAX_WIDTH


def _kernel(layer_ref, x_ref, h_ref, *refs, eps: float, digits, split: bool):
  f32 = jnp.float32
  hinv_ref, w_ref, sum_ref, norm_ref, *digit_refs = refs if split else (None,) + refs
  x = x_ref[...]  # [1, D]
  if split:
    h = load_split_sum(h_ref, hinv_ref, pl.program_id(0), pl.ds(0, x.shape[1]), x.dtype)
  else:
    h = h_ref[...].astype(x.dtype).astype(f32)  # [1, D]
  s = (x.astype(f32) + h).astype(x.dtype)
  sum_ref[...] = s
  sf = s.astype(f32)
  inv_rms = lax.rsqrt(jnp.sum(sf * sf) / s.shape[1] + eps)
  g = w_ref[pl.ds(layer_ref[0], 1), :]  # [1, D] of the stacked [L, D]
  normed = (g.astype(f32) * (sf * inv_rms).astype(s.dtype).astype(f32)).astype(norm_ref.dtype)
  norm_ref[...] = normed
  if digits is not None:
    d_ref, inv_ref, sums_ref = digit_refs
    rows, group, _ = digits
    r = pl.program_id(0)
    nf = normed.astype(f32)
    q = row_scale(jnp.max(jnp.abs(nf)))
    inv_ref[pl.ds(r, 1)] = jnp.full((1,), 1.0, f32) / q
    store_digits(d_ref, sums_ref, r, rows, nf, q, 0, group)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "digits"))
def add_rms_norm(x: jax.Array, h: jax.Array, weight: jax.Array, layer: jax.Array | int | None = None, *,
                 eps: float, interpret: bool | None = None, digits: tuple[int, int, int] | None = None,
                 h_inv_q: jax.Array | None = None):
  """(x + h, RMSNorm(x + h) * weight) for x and h [..., D]; weight [D], or layer `layer` of a stacked
  [L, D]. With `digits=(P, group, width)` a third element: the norm's (digits, inv_q, sums) as
  `x_digits` makes them for P rows. With `h_inv_q` [P], h is split-K partials [S, P, D] (module docstring)."""
  width = x.shape[-1]
  n_rows = math.prod(x.shape[:-1])
  if h_inv_q is not None:
    if not (h.ndim == 3 and h.shape[1:] == (h_inv_q.shape[0], width) and h.shape[1] >= n_rows
            and h.dtype == jnp.float32):
      raise ValueError(f"h as split partials must be float32 [S, P >= {n_rows}, {width}] with h_inv_q [P], got "
                       f"{h.dtype} {h.shape} and {h_inv_q.shape}")
  elif h.shape != x.shape:
    raise ValueError(f"h must be x's shape {x.shape}, got {h.shape}")
  if not supports(width):
    raise ValueError(f"add_rms_norm kernel needs a power-of-two width in [32, {MAX_WIDTH}], got {width}")
  stacked = weight if weight.ndim == 2 else weight[None]
  if stacked.ndim != 2 or stacked.shape[1] != width:
    raise ValueError(f"weight must be [{width}] or [L, {width}], got {weight.shape}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  rows = x.reshape(-1, width)
  row = pl.BlockSpec((1, width), lambda r: (r, 0))
  layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
  out_shape = [jax.ShapeDtypeStruct(rows.shape, x.dtype),
               jax.ShapeDtypeStruct(rows.shape, jnp.promote_types(weight.dtype, x.dtype))]
  if digits is not None:
    padded, group, sums_width = digits
    if not (rows.shape[0] <= padded <= sums_width and width % group == 0):
      raise ValueError(f"add_rms_norm: digits {digits} do not fit {rows.shape[0]} rows of width {width}")
    out_shape += [jax.ShapeDtypeStruct((2 * padded, width), jnp.int8), jax.ShapeDtypeStruct((padded,), jnp.float32),
                  jax.ShapeDtypeStruct((width // group, sums_width), jnp.float32)]
  split = h_inv_q is not None
  h_args = [h, h_inv_q] if split else [h.reshape(rows.shape)]
  outs = pl.pallas_call(
      functools.partial(_kernel, eps=float(eps), digits=digits, split=split),
      grid=(rows.shape[0],),
      in_specs=[pl.no_block_spec, row] + ([pl.no_block_spec] * 2 if split else [row]) + [pl.no_block_spec],
      out_specs=[row, row] + [pl.no_block_spec] * (len(out_shape) - 2),
      out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=_WARPS, num_stages=1),
      interpret=interpret,
      name="add_rms_norm",
  )(layer, rows, *h_args, stacked)
  new_x, normed = outs[0].reshape(x.shape), outs[1].reshape(x.shape)
  return (new_x, normed) if digits is None else (new_x, normed, tuple(outs[2:]))


def add_rms_norm_reference(x, h, weight, layer=None, *, eps: float):
  """Plain jnp: the same arithmetic on whole arrays."""
  s = (x.astype(jnp.float32) + h.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)
  g = weight if weight.ndim == 1 else weight[0 if layer is None else layer]
  sf = s.astype(jnp.float32)
  return s, g * (sf * lax.rsqrt(jnp.mean(sf * sf, axis=-1, keepdims=True) + eps)).astype(s.dtype)
