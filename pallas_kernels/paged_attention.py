"""Paged decode attention: split-K flash-decoding over a block-table KV cache (Pallas, Triton lowering).

Owns the paged kernel, its wrapper and a plain-jnp reference; shares the online-softmax step, split
ranges, partial outputs and split combine with decode_attention (common.py). Knows nothing about
models or page allocation.

Layout: q [B, N, H], k_pages and v_pages [P, page_size, K, H], block_table [B, max_pages] int32 of
page ids; logical position p of sequence b lives in page block_table[b, p // page_size] at row
p % page_size. Grid (batch, kv head, split) as in decode_attention; each step covers
`pages_per_block` pages: it looks up the page of every key (repeated table reads hit L1) and gathers
the [block_k, H] tile row by row from the pool viewed as [P * page_size, K, H] (a free reshape, no
copies). Gathering whole [pages, page_size, H] tiles instead ran 1.6x slower on an H200: the 3-D
tile and its reshape cost more than the per-key index arithmetic. Table entries past a sequence's
last page are never dereferenced, so they may hold anything.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import (
    MIN_DOT_ROWS, check_decode_args, default_num_splits, init_carry, is_pow2, load_q_tile,
    next_pow2, online_softmax_step, split_block_range, split_k_decode_call, store_partials)

# Keys per step and pipeline depth when pages_per_block / num_stages are None: page_size *
# pages_per_block == the keys (or one page). Batches whose sequences x kv heads give at least
# _WIDE_PROGRAMS programs before any split take 64-key steps and 3 stages: more gathered rows in flight
# per SM. H200, N32 K8 H128, page 16, against the dense kernel in the same run (kernel_bench.py --paged,
# session 7): B32 4k 143.6 us vs 161.6 with 128-key steps (dense 158.6), B64 4k 265.8 vs 303.9 (dense
# 268.3), B128 2k 270.6 vs 284.1 (dense 276.2); B16 ragged keeps 128-key steps: 95.4 vs 105.1 (dense 93.8).
_DEFAULT_BLOCK_K = 128
_DEFAULT_STAGES = 2
_WIDE_PROGRAMS = 256
_WIDE_BLOCK_K = 64
_WIDE_STAGES = 3
_DEFAULT_WARPS = 4


def _paged_kernel(
    len_ref,  # [] int32
    table_ref,  # [max_pages] int32
    q_ref,  # [G, H]
    k_ref,  # [P * page_size, H] (strided view of one kv head)
    v_ref,  # [P * page_size, H]
    o_ref,  # [G, H] float32, unnormalised
    m_ref,  # [G] float32
    l_ref,  # [G] float32
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
    pages_per_block: int,
    num_splits: int,
    page_size: int,
):
  group, head_dim = q_ref.shape
  max_pages = table_ref.shape[0]
  block_k = pages_per_block * page_size
  rows = max(MIN_DOT_ROWS, next_pow2(group))
  length = jnp.minimum(len_ref[()], max_pages * page_size)
  lo, hi = split_block_range(length, window, block_k, pl.program_id(2), num_splits)
  q = load_q_tile(q_ref, rows)  # [rows, H]

  def body(j, carry):
    kpos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
    keep = kpos < length
    if window is not None:
      keep = keep & (length - 1 - kpos < window)
    # One table entry per key (repeats hit L1); invalid keys read row 0 of page 0.
    page = pltriton.load(table_ref.at[kpos // page_size], mask=keep, other=0)
    key_rows = page * page_size + kpos % page_size  # [bk] rows of the [P * page_size, H] pool
    idx = (key_rows[:, None], jnp.arange(head_dim)[None, :])  # [bk, H] gather, H contiguous
    k = pltriton.load(k_ref.at[idx], mask=keep[:, None], other=0)
    v = pltriton.load(v_ref.at[idx], mask=keep[:, None], other=0)
    return online_softmax_step(q, k, v, keep[None, :], carry, scale=scale, softcap=softcap)

  carry = lax.fori_loop(lo, hi, body, init_carry(rows, head_dim))
  store_partials(o_ref, m_ref, l_ref, carry)


@functools.partial(
    jax.jit,
    static_argnames=("sliding_window", "softcap", "scale", "num_splits", "pages_per_block",
                     "num_warps", "num_stages", "interpret"),
)
def paged_decode_attention(
    q: jax.Array,  # [B, N, H]
    k_pages: jax.Array,  # [P, page_size, K, H]
    v_pages: jax.Array,  # [P, page_size, K, H]
    *,
    block_table: jax.Array,  # [B, max_pages] int32 page ids
    lengths: jax.Array,  # [B] int, valid positions (the current token included)
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    pages_per_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, N, H]
  """decode_attention over the logical sequences that block_table assembles from pages.

  Page ids in block_table[b, :cdiv(lengths[b], page_size)] must lie in [0, P); the rest are
  ignored. pages_per_block pages (a power of two) are processed per step.
  """
  if k_pages.ndim != 4:
    raise ValueError(f"k_pages must be [P, page_size, K, H], got shape {k_pages.shape}")
  check_decode_args(q, k_pages, v_pages, lengths, sliding_window=sliding_window, softcap=softcap,
                    num_splits=num_splits, block_k=None, num_warps=num_warps,
                    num_stages=num_stages, kv_name="_pages")
  batch, num_heads, head_dim = q.shape
  _, page_size, num_kv_heads, _ = k_pages.shape
  if not is_pow2(page_size) or page_size < 16:
    raise ValueError(f"page_size must be a power of two >= 16, got {page_size}")
  if block_table.ndim != 2 or block_table.shape[0] != batch:
    raise ValueError(f"block_table must be [B={batch}, max_pages], got {block_table.shape}")
  if not jnp.issubdtype(block_table.dtype, jnp.integer):
    raise ValueError(f"block_table must hold integer page ids, got {block_table.dtype}")
  if pages_per_block is not None and not is_pow2(pages_per_block):
    raise ValueError(f"pages_per_block must be a positive power of two, got {pages_per_block}")
  max_pages = block_table.shape[1]
  group = num_heads // num_kv_heads

  wide = batch * num_kv_heads >= _WIDE_PROGRAMS
  if pages_per_block is None:
    pages_per_block = max(1, (_WIDE_BLOCK_K if wide else _DEFAULT_BLOCK_K) // page_size)
  pages_per_block = min(pages_per_block, next_pow2(max_pages))
  block_k = pages_per_block * page_size
  num_splits = num_splits or default_num_splits(batch, num_kv_heads,
                                                pl.cdiv(max_pages * page_size, block_k))
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

  q = q.reshape(batch, num_kv_heads, group, head_dim)
  kernel = functools.partial(_paged_kernel, scale=scale, window=sliding_window, softcap=softcap,
                             pages_per_block=pages_per_block, num_splits=num_splits,
                             page_size=page_size)
  pool_rows = k_pages.shape[0] * page_size
  k_pages = k_pages.reshape(pool_rows, num_kv_heads, head_dim)  # free: merges P and page rows
  v_pages = v_pages.reshape(pool_rows, num_kv_heads, head_dim)
  pool_spec = pl.BlockSpec((pool_rows, None, head_dim), lambda b, h, s: (0, h, 0))
  run = split_k_decode_call(
      kernel,
      [
          pl.BlockSpec((None,), lambda b, h, s: (b,)),
          pl.BlockSpec((None, max_pages), lambda b, h, s: (b, 0)),
          pl.BlockSpec((None, None, group, head_dim), lambda b, h, s: (b, h, 0, 0)),
          pool_spec,
          pool_spec,
      ],
      batch=batch, num_kv_heads=num_kv_heads, num_splits=num_splits, group=group,
      head_dim=head_dim, out_dtype=q.dtype, num_warps=num_warps or _DEFAULT_WARPS,
      num_stages=num_stages or (_WIDE_STAGES if wide else _DEFAULT_STAGES), interpret=interpret,
      name="paged_decode_attention")
  return run(lengths.astype(jnp.int32), block_table.astype(jnp.int32), q, k_pages, v_pages)


def paged_decode_attention_reference(
    q: jax.Array,  # [B, N, H]
    k_pages: jax.Array,  # [P, page_size, K, H]
    v_pages: jax.Array,  # [P, page_size, K, H]
    *,
    block_table: jax.Array,  # [B, max_pages]
    lengths: jax.Array,  # [B]
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> jax.Array:  # [B, N, H], float32
  """Gathers each sequence's pages into a dense float32 cache, then a plain masked softmax."""
  batch, num_heads, head_dim = q.shape
  num_pool_pages, page_size, num_kv_heads, _ = k_pages.shape
  group = num_heads // num_kv_heads
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  seq = block_table.shape[1] * page_size
  pos = jnp.arange(seq)
  valid = pos[None, :] < lengths[:, None]  # [B, S]
  if sliding_window is not None:
    valid = valid & (pos[None, :] > lengths[:, None] - 1 - sliding_window)
  # Only pages that hold valid positions are looked up; others point at page 0.
  page_ids = jnp.where(pos[None, :] < lengths[:, None], block_table[:, pos // page_size], 0)
  page_ids = jnp.clip(page_ids, 0, num_pool_pages - 1)
  k = k_pages[page_ids, pos % page_size].astype(jnp.float32)  # [B, S, K, H]
  v = v_pages[page_ids, pos % page_size].astype(jnp.float32)
  v = jnp.where(valid[:, :, None, None], v, 0.0)
  qf = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)
  logits = jnp.einsum("bkgh,bskh->bkgs", qf, k, precision=lax.Precision.HIGHEST) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  mask = valid[:, None, None, :]
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0)), 0)
  denom = weights.sum(axis=-1, keepdims=True)
  probs = weights / jnp.where(denom > 0, denom, 1)
  out = jnp.einsum("bkgs,bskh->bkgh", probs, v, precision=lax.Precision.HIGHEST)
  return out.reshape(batch, num_heads, head_dim)
