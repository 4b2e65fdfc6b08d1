"""Pieces the Pallas (Triton lowering) attention kernels share. Kernels, wrappers and references
live in their own files; the jnp references use none of this.

- Online softmax (flash_attention, decode_attention, paged_attention): the masking constants, the
  base-2 logits of one key block and the running (acc, m, l) update.
- Split-K decode (decode_attention, paged_attention): split ranges, the padded q tile, the
  unnormalised (o, m, l) partials (kernel-side store, pallas_call outputs) and their combine, and
  the argument checks of the two decode wrappers.
- Argument checks every wrapper makes (dtype, head layout, window/soft-cap, warps/stages).

The kernel-side pieces branch only on static Python arguments (softcap, tile rows), never on traced
values, and trace to the ops the kernels traced before they were shared.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Masked logits take MASK_VALUE; the running max starts at M_INIT, which is finite and far above
# MASK_VALUE, so exp2(MASK_VALUE - m) is exactly 0 even for a row whose keys are all masked: such a
# row (or an empty split) ends with l == 0, acc == 0 and is written as zeros instead of NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
M_INIT = -1e30
LOG2E = math.log2(math.e)
MIN_DOT_ROWS = 16  # Triton dots need every dimension >= 16
# Splits are chosen so that batch * kv_heads * splits reaches about this many programs (two waves
# of a 132-SM H100/H200), but no split gets fewer than MIN_BLOCKS_PER_SPLIT key blocks of the cache.
# 1: in the model (stacked cache, one layer per call, H200) a split of one 128-key block won at batch 1:
# context 1k 10.0 us per call with 9 splits vs 25.2 us with the 2 that a minimum of 4 blocks gave, 4k 17.6
# vs 22.5 us; the minimum only binds for short caches (see pallas_kernels/NOTES.md).
TARGET_PROGRAMS = 264
MIN_BLOCKS_PER_SPLIT = 1


def next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


# ---- argument checks (wrappers) ------------------------------------------------------------------


def check_heads(dtype, num_heads: int, num_kv_heads: int, head_dim: int):
  """The dtype and head layout every kernel supports."""
  if dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ValueError(f"q dtype must be bfloat16, float16 or float32, got {dtype}")
  if num_heads % num_kv_heads:
    raise ValueError(f"query heads N={num_heads} must be a multiple of kv heads K={num_kv_heads}")
  if not is_pow2(head_dim) or not 16 <= head_dim <= 256:
    raise ValueError(f"head dim H must be a power of two in [16, 256], got {head_dim}")


def check_window_softcap(sliding_window: int | None, softcap: float | None):
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
  if softcap is not None and softcap <= 0:
    raise ValueError(f"softcap must be > 0, got {softcap}")


def check_launch(num_warps: int | None, num_stages: int | None):
  if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
    raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps}")
  if num_stages is not None and num_stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {num_stages}")


# ---- online softmax ------------------------------------------------------------------------------


def _dot_precision(dtype):
  # float32 inputs get true float32 dots (Pallas-Triton maps DEFAULT on f32 to TF32).
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def block_logits(q, k, *, scale: float, softcap: float | None, key_scale=None):
  """q [M, H], k [bk, H] -> float32 logits [M, bk] in base 2 (times log2 e), scaled and soft-capped.
  q and k may also be tuples of column parts ([M, h_i] and [bk, h_i], the head dim cut in pieces): the
  logits are then the sum of the parts' dots. `key_scale` [bk] (float32): k holds quantization codes and
  key j is k[j] * key_scale[j].

  The caller masks them (jnp.where(keep, s, MASK_VALUE)) before online_softmax_update.
  """
  q_parts, k_parts = (q, k) if isinstance(q, tuple) else ((q,), (k,))
  s = None
  for qi, ki in zip(q_parts, k_parts):
    si = lax.dot_general(qi, ki, (((1,), (1,)), ((), ())), precision=_dot_precision(qi.dtype),
                         preferred_element_type=jnp.float32)  # [M, bk]
    s = si if s is None else s + si
  if key_scale is not None:
    s = s * key_scale[None, :]
  return scale_logits(s, scale=scale, softcap=softcap)


def scale_logits(s, *, scale: float, softcap: float | None):
  """Raw float32 logits -> base 2 (times log2 e), scaled and soft-capped."""
  if softcap is None:
    return s * (scale * LOG2E)  # work in base 2: exp(x) = exp2(x * log2 e)
  return jnp.tanh(s * (scale / softcap)) * (softcap * LOG2E)


def rotate_halves(x1, x2, c1, c2, s1, s2):
  """The halves of x rotated by the half-split rotary embedding (pairs (i, i + H/2): x * cos +
  rotate_half(x) * sin, rotate_half(x) = (-x2, x1)), from float32 halves of x, cos and sin (broadcasting).
  Halves, since the Triton lowering cannot slice or join register tensors: kernels read them from refs."""
  return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


def online_softmax_update(s, v, carry, value_scale=None):
  """Folds base-2 logits s [M, bk] and v [bk, H] into carry (acc [M, H], m [M], l [M]).
  `value_scale` [bk] (float32): v holds quantization codes and value j is v[j] * value_scale[j]; the
  scale goes onto the probabilities (p * scale) @ codes, so the codes enter the dot as they are.

  m is the base-2 running max; the caller zeroes masked V rows so 0 * NaN cannot occur.
  """
  acc, m, l = carry
  m_new = jnp.maximum(m, s.max(axis=1))
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - m_new[:, None])
  l = l * alpha + p.sum(axis=1)
  if value_scale is not None:
    p = p * value_scale[None, :]
  if isinstance(acc, tuple):  # column groups (`init_carry(..., groups=)`): v's matching groups, a dot each
    return tuple(a * alpha[:, None] + _pv(p, vi) for a, vi in zip(acc, v)), m_new, l
  return acc * alpha[:, None] + _pv(p, v), m_new, l


def _pv(p, v):
  """p [M, bk] @ v [bk, H] in float32, p rounded to v's dtype."""
  return lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=_dot_precision(v.dtype),
                         preferred_element_type=jnp.float32)


def online_softmax_fold_key(s, v, carry):
  """Folds one key into carry: its base-2 logits s [M] (MASK_VALUE: it weighs nothing) and value v [H].
  Elementwise, no dot (a dot needs 16 keys)."""
  acc, m, l = carry
  m_new = jnp.maximum(m, s)
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - m_new)
  fold = lambda a, vi: a * alpha[:, None] + p[:, None] * vi.astype(jnp.float32)[None, :]  # noqa: E731
  acc = tuple(map(fold, acc, v)) if isinstance(acc, tuple) else fold(acc, v)  # (column groups: v's too)
  return acc, m_new, l * alpha + p


def online_softmax_step(q, k, v, keep, carry, *, scale: float, softcap: float | None, key_scale=None,
                        value_scale=None):
  """One flash step: q [M, H], k and v [bk, H], keep [1 or M, bk] -> new (acc [M, H], m [M], l [M]).
  With `key_scale`/`value_scale` [bk], k and v are quantization codes (in q's dtype) and their scales."""
  s = block_logits(q, k, scale=scale, softcap=softcap, key_scale=key_scale)
  s = jnp.where(keep, s, MASK_VALUE)
  return online_softmax_update(s, v, carry, value_scale)


def init_carry(rows: int, head_dim: int, groups: int | None = None):
  """An empty (acc, m, l). With `groups`, acc is a tuple of that many [rows, head_dim / groups] column groups,
  group g holding the columns g, g + groups, g + 2 groups, ... (values read as words of `groups` codes: each byte
  position its own dot; `store_partials` writes them back in column order)."""
  acc = (jnp.zeros((rows, head_dim), jnp.float32) if groups is None
         else tuple(jnp.zeros((rows, head_dim // groups), jnp.float32) for _ in range(groups)))
  return acc, jnp.full((rows,), M_INIT, jnp.float32), jnp.zeros((rows,), jnp.float32)


# ---- split-K decode ------------------------------------------------------------------------------


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


def codes_f32(u, zero: int):
  """Unsigned integer codes u (uint8) minus `zero` as float32, exactly, without a conversion instruction
  (int-to-float conversions run at a fraction of the FMA rate): u set into the mantissa of 2^23 (float bits
  0x4B000000 | u) minus 2^23 + zero."""
  return lax.bitcast_convert_type(u.astype(jnp.uint32) | 0x4B000000, jnp.float32) - float(2**23 + zero)


def dequantize_codes(values, scales=None, offsets=None, *, fmt: str, group_size: int | None):
  """float32 W [N, K] of one layer's codes stored contraction-last (values [N, K(/2)], scales / offsets
  [N, K/g or 1]; int4 packed GGUF-style within each group along K), for the kernels' references."""
  f32 = jnp.float32
  if fmt == "plain":
    return values.astype(f32)
  N = values.shape[0]
  if fmt == "int4":
    h = group_size // 2
    p = values.reshape(N, -1, h)
    codes = jnp.concatenate([p & 0x0F, p >> 4], axis=2).astype(f32)  # [N, K/g, g]
    if offsets is None:
      codes = codes - 8.0
  else:
    codes = values.astype(f32).reshape(N, -1, group_size or values.shape[1])
  w = codes * scales.astype(f32)[:, :, None]
  if offsets is not None:
    w = w + offsets.astype(f32)[:, :, None]
  return w.reshape(N, -1)


def load_q_tile(q_ref, rows: int, cols=slice(None)):
  """Loads the [G, H] query block (its columns `cols`) as a [rows, .] tile, rows >= 16 padded with zeros."""
  group = q_ref.shape[0]
  if rows == group:
    return q_ref[:, cols]
  ok = jnp.arange(rows) < group
  return pltriton.load(q_ref.at[pl.ds(0, rows), cols], mask=ok[:, None], other=0)


def store_partials(o_ref, m_ref, l_ref, carry, interpret: bool = False):
  """Writes the real G rows of an unnormalised partial (acc, m, l); acc's column groups (`init_carry`) to their
  columns."""
  acc, m, l = carry
  parts = acc if isinstance(acc, tuple) else (acc,)  # column groups (`init_carry`): column stride len(parts)
  if len(parts) > 1 and interpret:  # (the interpreter takes no strided slices: interleaved as a value)
    parts = (jnp.stack(parts, axis=-1).reshape(parts[0].shape[0], -1),)
  group, rows, width = o_ref.shape[0], parts[0].shape[0], parts[0].shape[1]
  cols = [slice(None)] if len(parts) == 1 else [pl.ds(g, width, stride=len(parts)) for g in range(len(parts))]
  if rows == group:
    for c, a in zip(cols, parts):
      o_ref[:, c] = a
    m_ref[...] = m
    l_ref[...] = l
    return
  ok = jnp.arange(rows) < group
  for c, a in zip(cols, parts):
    pltriton.store(o_ref.at[pl.ds(0, rows), c], a, mask=ok[:, None])
  pltriton.store(m_ref.at[pl.ds(0, rows)], m, mask=ok)
  pltriton.store(l_ref.at[pl.ds(0, rows)], l, mask=ok)


def combine_splits_reference(o, m, l, out_dtype):
  """Merges per-split partials: o [B, K, splits, G, H], m and l [B, K, splits, G] -> [B, K*G, H].

  Plain jnp (XLA turns it into 2-3 small launches); combine_splits is the one-launch kernel.
  """
  m_max = m.max(axis=2, keepdims=True)
  w = jnp.exp2(m - m_max)  # empty splits (m == M_INIT, l == 0) weigh nothing
  l_sum = (l * w).sum(axis=2)  # [B, K, G]
  o_sum = (o * w[..., None]).sum(axis=2)  # [B, K, G, H]
  out = o_sum / jnp.where(l_sum > 0, l_sum, 1.0)[..., None]  # no valid key -> zeros
  batch, kv_heads, group, head_dim = out.shape
  return out.reshape(batch, kv_heads * group, head_dim).astype(out_dtype)


# Most float32 elements of one [splits, G, H] chunk of o the combine holds at once: 64 registers a
# thread at 4 warps, so B=1 (33 splits) needs few loop steps and nothing spills.
_COMBINE_TILE = 8192
_COMBINE_WARPS = 4


def _combine_kernel(o_ref, m_ref, l_ref, out_ref, *, chunk: int):
  """One (batch, kv head): o [splits, G, H], m and l [splits, G] -> out [G, H].

  Tiles are padded to powers of two (G to `rows`, splits to multiples of `chunk`); padded entries
  load as empty splits (m = M_INIT, l = o = 0), which weigh nothing. m_max comes from all splits at
  once (a [splits, G] tile is small), then o is summed `chunk` splits at a time.
  """
  splits, group, head_dim = o_ref.shape
  rows = next_pow2(group)
  g_ok = jnp.arange(rows) < group
  g_pad = rows != group

  def load(ref, start, size, other):
    # [size, rows(, H)] of splits [start, start + size); masked only where the tile overhangs.
    idx = (pl.ds(start, size), pl.ds(0, rows)) + (slice(None),) * (len(ref.shape) - 2)
    # a traced start is a multiple of `size` below `splits`
    fits = start + size <= splits if isinstance(start, int) else splits % size == 0
    if fits and not g_pad:
      return ref[idx]
    ok = ((start + jnp.arange(size)) < splits)[:, None] & g_ok[None, :]
    if len(ref.shape) == 3:
      ok = ok[:, :, None]
    return pltriton.load(ref.at[idx], mask=ok, other=other)

  m_max = load(m_ref, 0, next_pow2(splits), M_INIT).max(axis=0)  # [rows]

  def add_chunk(start, carry):
    acc, l_sum = carry
    w = jnp.exp2(load(m_ref, start, chunk, M_INIT) - m_max[None, :])  # [chunk, rows]
    l_sum = l_sum + (load(l_ref, start, chunk, 0.0) * w).sum(axis=0)
    acc = acc + (load(o_ref, start, chunk, 0.0) * w[:, :, None]).sum(axis=0)
    return acc, l_sum

  carry = (jnp.zeros((rows, head_dim), jnp.float32), jnp.zeros((rows,), jnp.float32))
  num_chunks = pl.cdiv(splits, chunk)
  if num_chunks == 1:
    acc, l_sum = add_chunk(0, carry)
  else:
    acc, l_sum = lax.fori_loop(0, num_chunks, lambda c, cr: add_chunk(c * chunk, cr), carry)
  out = (acc / jnp.where(l_sum > 0, l_sum, 1.0)[:, None]).astype(out_ref.dtype)  # no key -> zeros
  if g_pad:
    pltriton.store(out_ref.at[pl.ds(0, rows), :], out, mask=g_ok[:, None])
  else:
    out_ref[...] = out


def combine_splits(o, m, l, out_dtype, *, interpret: bool | None = None):
  """combine_splits_reference as one pallas_call over grid (B, K): one launch instead of XLA's 2-3.

  Also used for one split (then it is o / l), so every decode call is exactly two launches.
  interpret=None interprets unless the default backend is a GPU.
  """
  batch, kv_heads, splits, group, head_dim = o.shape
  if m.shape != o.shape[:4] or l.shape != o.shape[:4]:
    raise ValueError(f"m and l must be {o.shape[:4]}, got {m.shape} and {l.shape}")
  if not is_pow2(head_dim):
    raise ValueError(f"head dim H must be a power of two, got {head_dim}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  fit = max(1, _COMBINE_TILE // (next_pow2(group) * head_dim))  # splits a chunk may hold
  chunk = min(next_pow2(splits), 1 << (fit.bit_length() - 1))
  part = lambda *tail: pl.BlockSpec((None, None) + tail, lambda b, h: (b, h) + (0,) * len(tail))  # noqa: E731
  out = pl.pallas_call(
      functools.partial(_combine_kernel, chunk=chunk),
      grid=(batch, kv_heads),
      in_specs=[part(splits, group, head_dim), part(splits, group), part(splits, group)],
      out_specs=part(group, head_dim),
      out_shape=jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), out_dtype),
      compiler_params=pltriton.CompilerParams(num_warps=_COMBINE_WARPS, num_stages=1),
      interpret=interpret,
      name="combine_splits",
  )(o.astype(jnp.float32), m.astype(jnp.float32), l.astype(jnp.float32))
  return out.reshape(batch, kv_heads * group, head_dim)  # free: G heads of a kv head are adjacent


@functools.partial(jax.tree_util.register_dataclass, data_fields=["o", "m", "l"], meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class Partials:
  """A split-K decode call's output before its splits are merged: o [B, K, splits, G, H], m and l [B, K, splits, G]
  float32 (as `store_partials` writes them) and the dtype the merge rounds to. `merge()` is `combine_splits`; a
  consumer may merge them inside its own launch instead (`row_matmul`'s int4 preparation of x)."""
  o: jax.Array
  m: jax.Array
  l: jax.Array
  dtype: Any

  @property
  def shape(self):  # of the merged output [B, K * G, H]
    batch, kv_heads, _, group, head_dim = self.o.shape
    return (batch, kv_heads * group, head_dim)

  def merge(self, *, interpret: bool | None = None):
    return combine_splits(self.o, self.m, self.l, self.dtype, interpret=interpret)


def split_k_decode_call(kernel, in_specs, *, batch: int, num_kv_heads: int, num_splits: int,
                        group: int, head_dim: int, out_dtype, num_warps: int, num_stages: int,
                        interpret: bool, name: str, extra_outputs=(), input_output_aliases=None,
                        merge: bool = True):
  """pallas_call of a split-K decode kernel over grid (batch, kv head, split), then the combine
  kernel: two launches per call (`merge=False`: one, returning the `Partials`).

  The kernel's outputs are one split's unnormalised partial: o [G, H], m [G], l [G] (float32, as
  store_partials writes them), then `extra_outputs` ((spec, shape) pairs, e.g. a cache the kernel
  writes in place through `input_output_aliases`). Returns a function of the kernel's inputs giving
  [B, K*G, H] (or `Partials`), or that and the extra outputs.
  """
  part_shape = (batch, num_kv_heads, num_splits, group)
  call = pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, num_splits),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, None, None, group, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, group), lambda b, h, s: (b, h, s, 0)),
          pl.BlockSpec((None, None, None, group), lambda b, h, s: (b, h, s, 0)),
          *(spec for spec, _ in extra_outputs),
      ],
      out_shape=[
          jax.ShapeDtypeStruct(part_shape + (head_dim,), jnp.float32),
          jax.ShapeDtypeStruct(part_shape, jnp.float32),
          jax.ShapeDtypeStruct(part_shape, jnp.float32),
          *(shape for _, shape in extra_outputs),
      ],
      input_output_aliases=input_output_aliases or {},
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=name,
  )

  def run(*args):
    o, m, l, *extras = call(*args)
    out = Partials(o, m, l, out_dtype)
    if merge:
      out = out.merge(interpret=interpret)
    return (out, *extras) if extras else out

  return run


def check_rotary_inputs(cos, sin, positions, batch: int, head_dim: int):
  """One decode token per sequence's rotation tables and cache positions (`rope_write`,
  `decode_attention_append`): cos and sin float32 [B, H], positions integer [B]."""
  for name, t in (("cos", cos), ("sin", sin)):
    if t.shape != (batch, head_dim) or t.dtype != jnp.float32:
      raise ValueError(f"{name} must be float32 [B={batch}, H={head_dim}], got {t.dtype} {t.shape}")
  if positions.shape != (batch,) or not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"positions must be integer [B={batch}], got {positions.dtype} {positions.shape}")


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
  check_heads(q.dtype, num_heads, num_kv_heads, head_dim)
  if lengths.shape != (batch,):
    raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
  check_window_softcap(sliding_window, softcap)
  if num_splits is not None and num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}")
  if block_k is not None and (not is_pow2(block_k) or block_k < 16):
    raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
  check_launch(num_warps, num_stages)
