"""One decode token's rotary embedding and cache write in one launch (Pallas, Triton lowering), plus a
plain-jnp reference. Knows nothing about models: arrays and static values.

Why: at batch 1 a decode layer's rotation of q and k and the writes of k and v into the stacked cache were
about six small XLA kernels of 1.3-2.2 us each (multiplies, a concatenate, select + dynamic-update-slice
pairs), ~0.25 ms of a 4.7 ms llama-3-8b step on an H200 (benchmarks/BENCHMARKS.md, session 7). Here one
program per (sequence, kv head) rotates that kv head's G query heads and its key, and stores the rotated
key and the value at the sequence's position of the stacked cache, which the call returns in place
(`input_output_aliases`: only the written rows are touched).

Layout: q [B, N, H], k and v [B, K, H] (one token per sequence), cos and sin [B, H] float32 (the
half-split rotation: pairs (i, i + H/2), out = x * cos + rotate_half(x) * sin, in float32, rounded to x's
dtype), caches [L, B, S, K, H] with a layer index, positions [B] int32. A position outside [0, S) writes
nothing (padded or finished sequences pass one past the end), as the model's `mode="drop"` scatter does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import check_rotary_inputs, is_pow2, rotate_halves

_WARPS = 1  # a program moves a few hundred bytes: one warp is plenty


def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
  """Whether the kernel takes these head counts (Triton tiles need powers of two)."""
  return (num_kv_heads > 0 and num_heads % num_kv_heads == 0 and is_pow2(num_heads // num_kv_heads)
          and is_pow2(head_dim) and head_dim >= 16)


def _kernel(pos_ref, layer_ref, q_ref, k_ref, v_ref, cos_ref, sin_ref, _k_in, _v_in, q_out, k_cache, v_cache,
            *, half: int):
  """Program (b, h): q rows [G, H], k and v [H] of kv head h of sequence b. Halves are read from the refs
  (register tensors cannot be sliced in the Triton lowering)."""
  f32 = jnp.float32
  b, h = pl.program_id(0), pl.program_id(1)
  lo, hi = pl.ds(0, half), pl.ds(half, half)
  trig = [r[s].astype(f32) for r in (cos_ref, sin_ref) for s in (lo, hi)]  # c1, c2, s1, s2
  q1, q2 = rotate_halves(q_ref[:, lo].astype(f32), q_ref[:, hi].astype(f32), *(t[None, :] for t in trig))
  q_out[:, lo] = q1.astype(q_out.dtype)
  q_out[:, hi] = q2.astype(q_out.dtype)
  k1, k2 = rotate_halves(k_ref[lo].astype(f32), k_ref[hi].astype(f32), *trig)
  v = v_ref[...]
  layer, pos = layer_ref[0], pos_ref[()]

  @pl.when((pos >= 0) & (pos < k_cache.shape[2]))
  def _():
    k_cache[layer, b, pos, h, lo] = k1.astype(k_cache.dtype)
    k_cache[layer, b, pos, h, hi] = k2.astype(k_cache.dtype)
    v_cache[layer, b, pos, h, :] = v.astype(v_cache.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def rope_write(q, k, v, cos, sin, k_cache, v_cache, *, layer, positions, interpret: bool | None = None):
  """(rotated q [B, N, H], k_cache, v_cache with rotated k and v stored at [layer, b, positions[b]]).

  Donate or drop the caches passed in: the returned ones share their buffers."""
  if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape:
    raise ValueError(f"q must be [B, N, H] and k, v [B, K, H], got {q.shape}, {k.shape}, {v.shape}")
  B, N, H = q.shape
  K = k.shape[1]
  if k.shape[0] != B or k.shape[2] != H or not supports(N, K, H):
    raise ValueError(f"heads N={N}, K={K}, H={H} (batch {B} vs {k.shape[0]}): need H a power of two >= 16, "
                     f"N / K a power of two and k [B, K, H]")
  if k_cache.ndim != 5 or k_cache.shape[1:] != (B, k_cache.shape[2], K, H) or v_cache.shape != k_cache.shape:
    raise ValueError(f"caches must be [L, B={B}, S, K={K}, H={H}], got {k_cache.shape} and {v_cache.shape}")
  if k_cache.dtype != v_cache.dtype or not jnp.issubdtype(k_cache.dtype, jnp.floating):
    raise ValueError(f"caches must share one floating dtype, got {k_cache.dtype} and {v_cache.dtype}")
  check_rotary_inputs(cos, sin, positions, B, H)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  G = N // K
  kernel = functools.partial(_kernel, half=H // 2)
  per_head = pl.BlockSpec((None, None, H), lambda b, h: (b, h, 0))
  per_seq = pl.BlockSpec((None, H), lambda b, h: (b, 0))
  q_spec = pl.BlockSpec((None, None, G, H), lambda b, h: (b, h, 0, 0))
  q_rot, k_cache, v_cache = pl.pallas_call(
      kernel,
      grid=(B, K),
      in_specs=[pl.BlockSpec((None,), lambda b, h: (b,)), pl.no_block_spec, q_spec, per_head, per_head, per_seq,
                per_seq, pl.no_block_spec, pl.no_block_spec],
      out_specs=[q_spec, pl.no_block_spec, pl.no_block_spec],
      out_shape=[jax.ShapeDtypeStruct((B, K, G, H), q.dtype), k_cache, v_cache],
      input_output_aliases={7: 1, 8: 2},
      compiler_params=pltriton.CompilerParams(num_warps=_WARPS, num_stages=1),
      interpret=interpret,
      name="rope_write",
  )(positions.astype(jnp.int32), jnp.asarray(layer, jnp.int32).reshape(1), q.reshape(B, K, G, H), k, v, cos, sin,
    k_cache, v_cache)
  return q_rot.reshape(B, N, H), k_cache, v_cache


def rope_write_reference(q, k, v, cos, sin, k_cache, v_cache, *, layer, positions):
  """The same in plain jnp: the rotation in float32, a dropping scatter of the rows."""
  half = q.shape[-1] // 2

  def rotate(x, c, s):  # x [heads, H], c and s [H]
    xf = x.astype(jnp.float32)
    x1, x2, c1, c2, s1, s2 = xf[..., :half], xf[..., half:], c[:half], c[half:], s[:half], s[half:]
    x1, x2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    return jnp.concatenate([x1, x2], axis=-1).astype(x.dtype)

  q_rot = jax.vmap(rotate)(q, cos, sin)
  k_rot = jax.vmap(rotate)(k, cos, sin)
  S = k_cache.shape[2]
  pos = jnp.where((positions >= 0) & (positions < S), positions, S)
  b = jnp.arange(q.shape[0])
  k_cache = k_cache.at[layer, b, pos].set(k_rot.astype(k_cache.dtype), mode="drop")
  v_cache = v_cache.at[layer, b, pos].set(v.astype(v_cache.dtype), mode="drop")
  return q_rot, k_cache, v_cache
