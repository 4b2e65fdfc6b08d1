"""Decode attention (one query token per sequence): split-K flash-decoding in Pallas (Triton lowering).

Owns the dense-cache decode kernel, its wrapper and a plain-jnp reference, plus the pieces the paged
kernel shares (online-softmax step, split ranges, split combine). Knows nothing about models.

Layout: q [B, N, H], k and v [B, S, K, H], G = N / K. The grid is (batch, kv head, split): every
program reads a contiguous share of one sequence's valid key blocks for one kv head, with the G query
heads of that kv head as rows of one tile (padded to 16 rows for the Triton dot), so each K/V byte is
read once and batch 1 still fills the GPU. Blocks at or beyond the sequence's length are never read.
K/V are read in place through strided views: no transposed copies. Each split writes an unnormalised
partial (acc, m, l); a small jnp reduction combines the splits.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Masked logits take MASK_VALUE; the running max starts at M_INIT (finite, far above MASK_VALUE), so
# masked keys contribute exactly 0 and an empty split ends with l == 0, acc == 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
M_INIT = -1e30
LOG2E = math.log2(math.e)
MIN_DOT_ROWS = 16  # Triton dots need every dimension >= 16
# Splits are chosen so that batch * kv_heads * splits reaches about this many programs (two waves
# of a 132-SM H100/H200), but no split gets fewer than MIN_BLOCKS_PER_SPLIT key blocks of the cache:
# short loops pay the pipeline prologue and a larger combine (see pallas_kernels/NOTES.md).
TARGET_PROGRAMS = 264
MIN_BLOCKS_PER_SPLIT = 4

# Defaults tuned on an H200 with B1..64, caches of 4k-8k, N32 K8 H128 bf16 (see NOTES.md).
_DEFAULT_BLOCK_K = 128
_DEFAULT_WARPS = 4
_DEFAULT_STAGES = 2


def next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def default_num_splits(batch: int, num_kv_heads: int, max_blocks: int) -> int:
  """Enough splits that batch * kv_heads * splits fills the GPU, each with enough blocks to stream."""
  return int(max(1, min(pl.cdiv(TARGET_PROGRAMS, batch * num_kv_heads),
                        max_blocks // MIN_BLOCKS_PER_SPLIT)))


def split_block_range(length, window: int | None, block_k: int, split, num_splits: int):
  """Key blocks [lo, hi) of this split: the valid blocks of the sequence, cut into equal shares.

  Shares are computed from the actual length, so short sequences still use every split.
  """
  first = jnp.int32(0) if window is None else jnp.maximum(length - window, 0) // block_k
  end = pl.cdiv(length, block_k)
  per_split = pl.cdiv(jnp.maximum(end - first, 0), num_splits)
  lo = first + split * per_split
  hi = jnp.minimum(lo + per_split, end)
  return lo, jnp.maximum(hi, lo)


def online_softmax_step(q, k, v, keep, carry, *, scale: float, softcap: float | None):
  """One flash step: q [M, H], k and v [bk, H], keep [1 or M, bk] -> new (acc [M, H], m [M], l [M]).

  m is kept in base 2 (logits times log2 e); the caller zeroes masked V rows so 0 * NaN cannot occur.
  """
  acc, m, l = carry
  # float32 inputs get true float32 dots (Triton's default for f32 is TF32).
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32)  # [M, bk]
  if softcap is None:
    s = s * (scale * LOG2E)
  else:
    s = jnp.tanh(s * (scale / softcap)) * (softcap * LOG2E)
  s = jnp.where(keep, s, MASK_VALUE)
  m_new = jnp.maximum(m, s.max(axis=1))
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - m_new[:, None])
  l = l * alpha + p.sum(axis=1)
  pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                       preferred_element_type=jnp.float32)  # [M, H]
  return acc * alpha[:, None] + pv, m_new, l


def init_carry(rows: int, head_dim: int):
  return (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), M_INIT, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def load_q_tile(q_ref, rows: int):
  """Loads the [G, H] query block as a [rows, H] tile, rows >= 16 padded with zeros."""
  group = q_ref.shape[0]
  if rows == group:
    return q_ref[...]
  ok = jnp.arange(rows) < group
  return pltriton.load(q_ref.at[pl.ds(0, rows), :], mask=ok[:, None], other=0)


def store_partials(o_ref, m_ref, l_ref, carry):
  """Writes the real G rows of an unnormalised partial (acc, m, l)."""
  acc, m, l = carry
  group, rows = o_ref.shape[0], acc.shape[0]
  if rows == group:
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l
    return
  ok = jnp.arange(rows) < group
  pltriton.store(o_ref.at[pl.ds(0, rows), :], acc, mask=ok[:, None])
  pltriton.store(m_ref.at[pl.ds(0, rows)], m, mask=ok)
  pltriton.store(l_ref.at[pl.ds(0, rows)], l, mask=ok)


def combine_splits(o, m, l, out_dtype):
  """Merges per-split partials: o [B, K, splits, G, H], m and l [B, K, splits, G] -> [B, K*G, H]."""
  m_max = m.max(axis=2, keepdims=True)
  w = jnp.exp2(m - m_max)  # empty splits (m == M_INIT, l == 0) weigh nothing
  l_sum = (l * w).sum(axis=2)  # [B, K, G]
  o_sum = (o * w[..., None]).sum(axis=2)  # [B, K, G, H]
  out = o_sum / jnp.where(l_sum > 0, l_sum, 1.0)[..., None]  # no valid key -> zeros
  batch, kv_heads, group, head_dim = out.shape
  return out.reshape(batch, kv_heads * group, head_dim).astype(out_dtype)


def check_decode_args(q, k_like, v_like, lengths, *, sliding_window, softcap, num_splits,
                      block_k, num_warps, num_stages, kv_name: str):
  """Validation shared by the dense and paged wrappers; k_like is [..., K, H]."""
  if q.ndim != 3:
    raise ValueError(f"q must be [B, N, H], got shape {q.shape}")
  if k_like.shape != v_like.shape:
    raise ValueError(f"k{kv_name} and v{kv_name} must have the same shape, got "
                     f"{k_like.shape} and {v_like.shape}")
  batch, num_heads, head_dim = q.shape
  num_kv_heads = k_like.shape[-2]
  if k_like.shape[-1] != head_dim:
    raise ValueError(f"k{kv_name} head dim {k_like.shape[-1]} != q head dim {head_dim}")
  if not (q.dtype == k_like.dtype == v_like.dtype):
    raise ValueError(f"q, k{kv_name}, v{kv_name} must share a dtype, got {q.dtype}, "
                     f"{k_like.dtype}, {v_like.dtype}")
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ValueError(f"q dtype must be bfloat16, float16 or float32, got {q.dtype}")
  if num_heads % num_kv_heads:
    raise ValueError(f"query heads N={num_heads} must be a multiple of kv heads K={num_kv_heads}")
  if not is_pow2(head_dim) or not 16 <= head_dim <= 256:
    raise ValueError(f"head dim H must be a power of two in [16, 256], got {head_dim}")
  if lengths.shape != (batch,):
    raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
  if softcap is not None and softcap <= 0:
    raise ValueError(f"softcap must be > 0, got {softcap}")
  if num_splits is not None and num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}")
  if block_k is not None and (not is_pow2(block_k) or block_k < 16):
    raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
  if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
    raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps}")
  if num_stages is not None and num_stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {num_stages}")


def _decode_kernel(
    len_ref,  # [] int32
    q_ref,  # [G, H]
    k_ref,  # [S, H] (strided view of one kv head)
    v_ref,  # [S, H]
    o_ref,  # [G, H] float32, unnormalised
    m_ref,  # [G] float32, base-2 running max
    l_ref,  # [G] float32, softmax denominator
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
    block_k: int,
    num_splits: int,
):
  group, head_dim = q_ref.shape
  seq_k = k_ref.shape[0]
  rows = max(MIN_DOT_ROWS, next_pow2(group))
  length = jnp.minimum(len_ref[()], seq_k)
  lo, hi = split_block_range(length, window, block_k, pl.program_id(2), num_splits)
  q = load_q_tile(q_ref, rows)  # [rows, H]

  def body(j, carry):
    start = j * block_k
    kpos = start + jnp.arange(block_k, dtype=jnp.int32)
    keep = kpos < length
    if window is not None:
      keep = keep & (length - 1 - kpos < window)  # the query sits at position length - 1
    span = pl.ds(start, block_k)
    k = pltriton.load(k_ref.at[span, :], mask=keep[:, None], other=0)  # [bk, H]
    v = pltriton.load(v_ref.at[span, :], mask=keep[:, None], other=0)
    return online_softmax_step(q, k, v, keep[None, :], carry, scale=scale, softcap=softcap)

  carry = lax.fori_loop(lo, hi, body, init_carry(rows, head_dim))
  store_partials(o_ref, m_ref, l_ref, carry)


@functools.partial(
    jax.jit,
    static_argnames=("sliding_window", "softcap", "scale", "num_splits", "block_k", "num_warps",
                     "num_stages", "interpret"),
)
def decode_attention(
    q: jax.Array,  # [B, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    lengths: jax.Array,  # [B] int, valid cache entries (the current token included)
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, N, H]
  """Attention of one query per sequence (at position lengths[b] - 1) over its cache.

  Keys at positions >= lengths[b] are never read; `sliding_window` keeps the last sliding_window
  keys; `softcap` maps logits s to softcap * tanh(s / softcap). A length of 0 gives zeros.
  num_splits=None picks enough splits to fill the GPU.
  """
  if k.ndim != 4:
    raise ValueError(f"k must be [B, S, K, H], got shape {k.shape}")
  check_decode_args(q, k, v, lengths, sliding_window=sliding_window, softcap=softcap,
                    num_splits=num_splits, block_k=block_k, num_warps=num_warps,
                    num_stages=num_stages, kv_name="")
  batch, num_heads, head_dim = q.shape
  _, seq_k, num_kv_heads, _ = k.shape
  if k.shape[0] != batch:
    raise ValueError(f"k batch {k.shape[0]} != q batch {batch}")
  group = num_heads // num_kv_heads

  block_k = min(block_k or _DEFAULT_BLOCK_K, max(16, next_pow2(seq_k)))
  num_splits = num_splits or default_num_splits(batch, num_kv_heads, pl.cdiv(seq_k, block_k))
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

  q = q.reshape(batch, num_kv_heads, group, head_dim)  # free: heads of a kv head are adjacent
  kernel = functools.partial(_decode_kernel, scale=scale, window=sliding_window, softcap=softcap,
                             block_k=block_k, num_splits=num_splits)
  part_shape = (batch, num_kv_heads, num_splits, group)
  o, m, l = pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, num_splits),
      in_specs=[
          pl.BlockSpec((None,), lambda b, h, s: (b,)),
          pl.BlockSpec((None, None, group, head_dim), lambda b, h, s: (b, h, 0, 0)),
          pl.BlockSpec((None, seq_k, None, head_dim), lambda b, h, s: (b, 0, h, 0)),
          pl.BlockSpec((None, seq_k, None, head_dim), lambda b, h, s: (b, 0, h, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, group, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, group), lambda b, h, s: (b, h, s, 0)),
          pl.BlockSpec((None, None, None, group), lambda b, h, s: (b, h, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct(part_shape + (head_dim,), jnp.float32),
          jax.ShapeDtypeStruct(part_shape, jnp.float32),
          jax.ShapeDtypeStruct(part_shape, jnp.float32),
      ],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps or _DEFAULT_WARPS,
                                              num_stages=num_stages or _DEFAULT_STAGES),
      interpret=interpret,
      name="decode_attention",
  )(lengths.astype(jnp.int32), q, k, v)
  return combine_splits(o, m, l, q.dtype)


def decode_attention_reference(
    q: jax.Array,  # [B, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    lengths: jax.Array,  # [B]
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> jax.Array:  # [B, N, H], float32
  """Dense float32 softmax over the valid cache positions of each sequence."""
  batch, num_heads, head_dim = q.shape
  seq_k, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  qf = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)
  logits = jnp.einsum("bkgh,bskh->bkgs", qf, k.astype(jnp.float32),
                      precision=lax.Precision.HIGHEST) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  pos = jnp.arange(seq_k)[None, :]
  valid = pos < lengths[:, None]  # [B, S]
  if sliding_window is not None:
    valid = valid & (pos > lengths[:, None] - 1 - sliding_window)
  valid = valid[:, None, None, :]
  logits = jnp.where(valid, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.where(valid, jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0)), 0)
  denom = weights.sum(axis=-1, keepdims=True)
  probs = weights / jnp.where(denom > 0, denom, 1)
  out = jnp.einsum("bkgs,bskh->bkgh", probs, v.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
  return out.reshape(batch, num_heads, head_dim)
