"""Prefill flash attention: Pallas kernel (Triton lowering), wrapper and plain-jnp reference.

The wrapper is also the one entry for prefill attention on the GPU: on Hopper it hands the shapes
that `flash_attention_mgpu` takes (bf16/fp16, head dim 64/128, no window or soft-cap) to that Mosaic
GPU kernel, which reaches the tensor cores' asynchronous products; everything else, and interpret
mode, runs the Triton kernel below.

Owns causal / sliding-window / soft-capped attention over a right-padded ragged batch with grouped
query heads. Knows nothing about models: it takes arrays and static ints.

Layout: q [B, T, N, H], k and v [B, S, K, H], G = N / K query heads per kv head. One program handles
`block_q` query tokens of one (batch, kv head): its q tile holds the G heads of those tokens as rows
([block_q * G, H], row r = token r // G, head r % G), so each K/V block is loaded once per group.
Key blocks that are fully masked (beyond the length, above the causal diagonal, outside the window)
are never visited; blocks that are fully valid skip the mask arithmetic.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import flash_attention_mgpu as mosaic
# Masking constants, the block logits and the online-softmax update are shared (common.py): a row
# whose keys are all masked ends with l == 0 and is written as zeros instead of NaN.
from pallas_kernels.common import (MASK_VALUE, block_logits, check_heads, check_launch,
                                   check_window_softcap, init_carry, is_pow2, next_pow2,
                                   online_softmax_update)

# Defaults per head dim: (rows of the q tile = block_q * G, block_k, num_warps, num_stages).
# Tuned on an H200 with B4 S4096 N32 K8 causal bf16 (see pallas_kernels/NOTES.md).
_DEFAULTS = {64: (128, 128, 4, 3), 128: (128, 128, 8, 3), 256: (64, 32, 4, 2)}
BACKENDS = ("auto", "triton", "mosaic")
# `auto` takes the Mosaic GPU kernel on Hopper (compute capability 9.0) for prompts of at least this
# many tokens; shorter ones are not worth a 128-token tile.
MOSAIC_MIN_QUERIES = 128
MOSAIC = True  # switch for benchmarks: False keeps `auto` on the Triton kernel


def _flash_kernel(
    kv_len_ref,  # [] int32
    q_off_ref,  # [] int32
    q_ref,  # [T, G, H]
    k_ref,  # [S, H] (strided view of one kv head)
    v_ref,  # [S, H]
    o_ref,  # [T, G, H]
    *,
    scale: float,
    causal: bool,
    window: int | None,
    softcap: float | None,
    block_q: int,
    block_k: int,
    num_q_blocks: int,
):
  seq_q, group, head_dim = q_ref.shape
  seq_k = k_ref.shape[0]
  rows = block_q * group
  # Reverse the q-block order: under a causal mask the last blocks have the most work, start them
  # first so the tail of the launch is short.
  qi = num_q_blocks - 1 - pl.program_id(0)
  t0 = qi * block_q
  kv_len = jnp.minimum(kv_len_ref[()], seq_k)
  q_off = q_off_ref[()]

  q_rows = pl.ds(t0, block_q)
  ragged_q = seq_q % block_q != 0
  if ragged_q:
    t_ok = (t0 + jnp.arange(block_q)) < seq_q
    q = pltriton.load(q_ref.at[q_rows, :, :], mask=t_ok[:, None, None], other=0)
  else:
    q = q_ref[q_rows, :, :]
  q = q.reshape(rows, head_dim)  # [M, H], M = block_q * G
  qpos = q_off + t0 + jnp.arange(rows, dtype=jnp.int32) // group  # [M] key position of each row
  qpos_min = q_off + t0
  qpos_max = q_off + t0 + block_q - 1

  def step(j, carry, *, masked: bool):
    start = j * block_k
    kpos = start + jnp.arange(block_k, dtype=jnp.int32)  # [bk]
    span = pl.ds(start, block_k)
    if masked:
      # Zero invalid rows so padding that holds NaN or stale values cannot leak through 0 * x.
      k_ok = (kpos < kv_len)[:, None]
      k = pltriton.load(k_ref.at[span, :], mask=k_ok, other=0)
      v = pltriton.load(v_ref.at[span, :], mask=k_ok, other=0)
    else:
      k = k_ref[span, :]
      v = v_ref[span, :]
    s = block_logits(q, k, scale=scale, softcap=softcap)  # [M, bk], base 2
    if masked:
      keep = kpos[None, :] < kv_len
      if causal:
        keep = keep & (kpos[None, :] <= qpos[:, None])
      if window is not None:
        keep = keep & (qpos[:, None] - kpos[None, :] < window)
      s = jnp.where(keep, s, MASK_VALUE)
    return online_softmax_update(s, v, carry)

  # Key-block ranges: [lo, hi) holds every block with a valid key for some row of the tile;
  # [lo_full, hi_full) the blocks valid for every row (no mask needed).
  hi = pl.cdiv(kv_len, block_k)
  hi_full = kv_len // block_k
  if causal:
    hi = jnp.minimum(hi, pl.cdiv(qpos_max + 1, block_k))
    hi_full = jnp.minimum(hi_full, (qpos_min + 1) // block_k)
  lo = jnp.int32(0)
  lo_full = jnp.int32(0)
  if window is not None:
    lo = jnp.maximum(qpos_min - window + 1, 0) // block_k
    lo_full = pl.cdiv(jnp.maximum(qpos_max - window + 1, 0), block_k)
  hi = jnp.maximum(hi, lo)
  lo_full = jnp.clip(lo_full, lo, hi)
  hi_full = jnp.clip(hi_full, lo_full, hi)

  carry = init_carry(rows, head_dim)
  masked_step = functools.partial(step, masked=True)
  carry = lax.fori_loop(lo, lo_full, masked_step, carry)
  carry = lax.fori_loop(lo_full, hi_full, functools.partial(step, masked=False), carry)
  acc, _, l = lax.fori_loop(hi_full, hi, masked_step, carry)

  out = acc / jnp.where(l > 0, l, 1.0)[:, None]  # rows with no valid key: acc == 0 -> zeros
  out = out.astype(o_ref.dtype).reshape(block_q, group, head_dim)
  if ragged_q:
    pltriton.store(o_ref.at[q_rows, :, :], out, mask=t_ok[:, None, None])
  else:
    o_ref[q_rows, :, :] = out


def _check_blocks(**blocks):
  for name, value in blocks.items():
    if value is not None and not is_pow2(value):
      raise ValueError(f"{name} must be a positive power of two, got {value}")


@functools.partial(
    jax.jit,
    static_argnames=("causal", "sliding_window", "softcap", "scale", "block_q", "block_k",
                     "num_warps", "num_stages", "backend", "interpret"),
)
def flash_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    kv_lengths: jax.Array,  # [B] int
    q_offsets: jax.Array | None = None,  # [B] int, key position of query 0
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:  # [B, T, N, H]
  """Prefill attention over a right-padded ragged batch.

  Query t of sequence b sits at key position q_offsets[b] + t; keys at positions >= kv_lengths[b]
  are invalid; `causal` keeps kpos <= qpos; `sliding_window` keeps qpos - kpos < sliding_window;
  `softcap` maps logits s to softcap * tanh(s / softcap) (after scaling). Rows with no valid key
  are zeros. block_q counts query tokens per program (the tile has block_q * G rows); None picks
  the per-head-dim defaults. `backend`: `triton`, `mosaic` (Hopper only; keys and values beyond
  kv_lengths must then be finite, see flash_attention_mgpu) or `auto`, which takes `mosaic` where it
  applies and no Triton block setting was given.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be rank 4 ([B,T,N,H], [B,S,K,H]); got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
  batch, seq_q, num_heads, head_dim = q.shape
  _, seq_k, num_kv_heads, _ = k.shape
  if k.shape[0] != batch:
    raise ValueError(f"k batch {k.shape[0]} != q batch {batch}")
  if k.shape[3] != head_dim:
    raise ValueError(f"k head dim {k.shape[3]} != q head dim {head_dim}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  check_heads(q.dtype, num_heads, num_kv_heads, head_dim)
  if kv_lengths.shape != (batch,):
    raise ValueError(f"kv_lengths must have shape ({batch},), got {kv_lengths.shape}")
  if q_offsets is not None and q_offsets.shape != (batch,):
    raise ValueError(f"q_offsets must have shape ({batch},), got {q_offsets.shape}")
  check_window_softcap(sliding_window, softcap)
  _check_blocks(block_q=block_q, block_k=block_k)
  check_launch(num_warps, num_stages)
  if _use_mosaic(backend, q, k, sliding_window, softcap, interpret,
                 triton_settings=(block_q, block_k, num_warps, num_stages)):
    return mosaic.flash_attention_mgpu(q, k, v, kv_lengths=kv_lengths, q_offsets=q_offsets,
                                       causal=causal, scale=scale)

  group = num_heads // num_kv_heads
  # The q tile must have a power-of-two row count: pad G to a power of two with zero heads.
  group_p = next_pow2(group)
  if group_p != group:
    q = q.reshape(batch, seq_q, num_kv_heads, group, head_dim)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, group_p - group), (0, 0)))
    q = q.reshape(batch, seq_q, num_kv_heads * group_p, head_dim)

  d_rows, d_block_k, d_warps, d_stages = _DEFAULTS[max(64, head_dim)]  # H 16, 32 use the H 64 row
  if block_q is None:
    block_q = max(1, d_rows // group_p)
  block_q = max(block_q, 16 // min(group_p, 16))  # dot operands need >= 16 rows
  block_q = min(block_q, max(next_pow2(seq_q), 16 // min(group_p, 16)))
  block_k = min(block_k or d_block_k, max(16, next_pow2(seq_k)))
  if block_k < 16:
    raise ValueError(f"block_k must be >= 16, got {block_k}")
  num_warps = num_warps or d_warps
  num_stages = num_stages or d_stages

  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  kv_lengths = kv_lengths.astype(jnp.int32)
  q_offsets = (jnp.zeros((batch,), jnp.int32) if q_offsets is None
               else q_offsets.astype(jnp.int32))
  num_q_blocks = pl.cdiv(seq_q, block_q)
  kernel = functools.partial(
      _flash_kernel, scale=scale, causal=causal, window=sliding_window, softcap=softcap,
      block_q=block_q, block_k=block_k, num_q_blocks=num_q_blocks)
  q_spec = pl.BlockSpec((None, seq_q, group_p, head_dim), lambda i, h, b: (b, 0, h, 0))
  kv_spec = pl.BlockSpec((None, seq_k, None, head_dim), lambda i, h, b: (b, 0, h, 0))
  scalar_spec = pl.BlockSpec((None,), lambda i, h, b: (b,))
  out = pl.pallas_call(
      kernel,
      grid=(num_q_blocks, num_kv_heads, batch),
      in_specs=[scalar_spec, scalar_spec, q_spec, kv_spec, kv_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="flash_attention",
  )(kv_lengths, q_offsets, q, k, v)
  if group_p != group:
    out = out.reshape(batch, seq_q, num_kv_heads, group_p, head_dim)[:, :, :, :group]
    out = out.reshape(batch, seq_q, num_heads, head_dim)
  return out


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (wgmma and TMA: compute capability 9.0)."""
  device = jax.devices()[0]
  return device.platform == "gpu" and getattr(device, "compute_capability", None) == "9.0"


def _use_mosaic(backend, q, k, sliding_window, softcap, interpret, *, triton_settings) -> bool:
  if backend not in BACKENDS:
    raise ValueError(f"unknown flash attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
  if backend == "triton":
    return False
  fits = mosaic.supports(q, k, sliding_window=sliding_window, softcap=softcap)
  if backend == "mosaic":
    if interpret:
      raise ValueError("backend='mosaic' has no interpret mode here: run flash_attention_mgpu with "
                       "interpret=True for Mosaic GPU's own interpreter")
    if jax.default_backend() == "gpu" and not on_hopper():
      raise ValueError("backend='mosaic' needs a Hopper GPU (compute capability 9.0: wgmma, TMA); "
                       f"this device is {jax.devices()[0].device_kind}")
    if not fits:
      raise ValueError(
          f"backend='mosaic' takes bf16/fp16 with head dim 64 or 128, no sliding window or soft-cap, "
          f"and a key length that is a multiple of {mosaic.DEFAULTS.get(q.shape[-1], (0, 128))[1]}; "
          f"got {q.dtype}, head dim {q.shape[-1]}, window {sliding_window}, softcap {softcap}, "
          f"key length {k.shape[1]}")
    return True
  return (fits and not interpret and MOSAIC and q.shape[1] >= MOSAIC_MIN_QUERIES
          and all(x is None for x in triton_settings) and on_hopper())


def flash_attention_reference(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    kv_lengths: jax.Array,  # [B]
    q_offsets: jax.Array | None = None,  # [B]
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> jax.Array:  # [B, T, N, H], float32
  """Dense float32 attention with an explicit [B, T, S] mask; rows with no valid key are zeros."""
  batch, seq_q, num_heads, head_dim = q.shape
  seq_k, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  qf = q.astype(jnp.float32).reshape(batch, seq_q, num_kv_heads, group, head_dim)
  logits = jnp.einsum("btkgh,bskh->bkgts", qf, k.astype(jnp.float32),
                      precision=lax.Precision.HIGHEST) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  offsets = jnp.zeros((batch,), jnp.int32) if q_offsets is None else q_offsets
  qpos = offsets[:, None, None] + jnp.arange(seq_q)[None, :, None]  # [B, T, 1]
  kpos = jnp.arange(seq_k)[None, None, :]  # [1, 1, S]
  valid = kpos < kv_lengths[:, None, None]  # [B, T, S]
  if causal:
    valid = valid & (kpos <= qpos)
  if sliding_window is not None:
    valid = valid & (qpos - kpos < sliding_window)
  valid = valid[:, None, None]  # [B, 1, 1, T, S]
  logits = jnp.where(valid, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.where(valid, jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0)), 0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denom > 0, denom, 1)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
  return out.reshape(batch, seq_q, num_heads, head_dim)
