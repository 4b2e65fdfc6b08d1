"""Decode attention (one query token per sequence): split-K flash-decoding in Pallas (Triton lowering).

Owns the dense-cache decode kernel, its wrapper and a plain-jnp reference. The online-softmax step,
split ranges, partial outputs and split combine it shares with the paged kernel live in common.py.
Knows nothing about models.

Layout: q [B, N, H], k and v [B, S, K, H], G = N / K. The grid is (batch, kv head, split): every
program reads a contiguous share of one sequence's valid key blocks for one kv head, with the G query
heads of that kv head as rows of one tile (padded to 16 rows for the Triton dot), so each K/V byte is
read once and batch 1 still fills the GPU. Blocks at or beyond the sequence's length are never read.
K/V are read in place through strided views: no transposed copies. Each split writes an unnormalised
partial (acc, m, l); a second small kernel (`common.combine_splits`) merges the splits, or (`merge=False`) the
partials are returned for their consumer to merge (`row_matmul`'s int4 preparation of x does, in its own launch).

`decode_attention_append` is the same launch for a model's decode step: it also rotates q and the new
key and writes the new key and value into the stacked cache, the work of `rope_write`'s launch.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import code_decode
from pallas_kernels.common import (
    MASK_VALUE, MIN_DOT_ROWS, check_decode_args, check_rotary_inputs, default_num_splits, init_carry, load_q_tile,
    next_pow2, online_softmax_fold_key, online_softmax_step, rotate_halves, scale_logits, split_block_range,
    split_k_decode_call, store_partials)

# Defaults tuned on an H200, N32 K8 H128 bf16 (see NOTES.md): (key block, stages) by how many keys one split
# walks. Short walks take small blocks (more programs in flight per SM; the model's stacked call, us per call,
# 128 / 2 against 32 / 4: context 1k B1 14.0 / 11.1, B32 48.4 / 44.7, B128 146.4 / 143.3); long walks keep
# large ones (B16 over 8k ragged keys, 3 splits of ~2.7k: 97.5 us with 128 / 2, 110.7 with 32 / 4).
_LONG_WALK = 2048  # keys per split from which the large block applies
_LONG_BLOCK_K, _LONG_STAGES = 128, 2  # (the stages also for a block_k the caller chose)
_SHORT_BLOCK_K, _SHORT_STAGES = 32, 4
QUANT_DOT_DTYPE = None  # the dtype (name) codes are converted to for the dots (None: q's; "float16": off, since
# small value scales put the probabilities times the scales under float16's normal range)
VALUE_WORDS = None  # int8 caches: values read as int32 words of four codes, not byte by byte, decoded into this
# dtype (name) for their dot: "bfloat16" (`code_decode.word_codes`), or "float16" (`word_codes_f16`, the codes
# scaled by their token's scale in float16 so that the probabilities stay unscaled)
CODES_BY_PTX = False  # int8 codes into the dots' dtype by inline PTX (`code_decode`) instead of a conversion: off,
# level into bfloat16, 5 % faster into float16 (`codes_as`)
_DEFAULT_WARPS = 4


def _decode_kernel(
    len_ref,  # [] int32
    q_ref,  # [G, H]
    *refs,  # appending: position [] int32, cos [H], sin [H] float32, new k and v [H]; then
    # stacked: layer [1] int32, k and v [L, B, S, K, H] whole; else k, v [S, H] (one kv head's view)
    # quantized: then k and v scales ([L, B, S, K] whole, or [S]); then o [G, H] float32 unnormalised,
    # m [G] float32 base-2 running max, l [G] float32 denominator; appending: then the written caches
    # (quantized: codes k, v, then scales k, v)
    scale: float,
    window: int | None,
    softcap: float | None,
    block_k: int,
    num_splits: int,
    stacked: bool,
    quantized: bool,
    append: bool,
    native: bool = False,
    words: str | None = None,
    interpret: bool = False,
):
  f32 = jnp.float32
  if append:
    pos_ref, cos_ref, sin_ref, k_new_ref, v_new_ref, *refs = refs
  if stacked:
    layer_ref, *refs = refs
    layer, b, h = layer_ref[0], pl.program_id(0), pl.program_id(1)
    kv_at = lambda ref, span, cols=slice(None): ref.at[layer, b, span, h, cols]  # noqa: E731  in place
    scale_at = lambda ref, span: ref.at[layer, b, span, h]  # noqa: E731
  else:
    kv_at = lambda ref, span, cols=slice(None): ref.at[span, cols]  # noqa: E731
    scale_at = lambda ref, span: ref.at[span]  # noqa: E731
  if quantized:
    k_ref, v_ref, ks_ref, vs_ref, o_ref, m_ref, l_ref, *written = refs
    if append:
      k_out, v_out, ks_out, vs_out = written
  elif append:
    k_ref, v_ref, o_ref, m_ref, l_ref, k_out, v_out = refs
  else:
    k_ref, v_ref, o_ref, m_ref, l_ref = refs
  seq_k = k_ref.shape[2 if stacked else 0]
  group, head_dim = q_ref.shape
  rows = max(MIN_DOT_ROWS, next_pow2(group))
  length = jnp.minimum(len_ref[()], seq_k)  # keys read from the cache; the query sits at length - 1
  if append:  # q and the new key rotated here; the cache holds the keys before the new one's position
    halves = pl.ds(0, head_dim // 2), pl.ds(head_dim // 2, head_dim // 2)
    trig = [r[c].astype(f32) for r in (cos_ref, sin_ref) for c in halves]  # c1, c2, s1, s2
    q = rotate_halves(*(load_q_tile(q_ref, rows, c).astype(f32) for c in halves), *(t[None, :] for t in trig))
    q = tuple(x.astype(q_ref.dtype) for x in q)  # rounded as the separate rotation rounds it
    pos = pos_ref[()]
    new = (pos >= 0) & (pos < seq_k)  # outside the cache: nothing written, as rope_write
    query_at = jnp.where(new, pos, length - 1)
    length = jnp.where(new, pos, length)
  else:
    q = load_q_tile(q_ref, rows)  # [rows, H]
    query_at = length - 1
  if quantized and QUANT_DOT_DTYPE is not None:
    dot_dtype = jnp.dtype(QUANT_DOT_DTYPE)
    q = tuple(x.astype(dot_dtype) for x in q) if append else q.astype(dot_dtype)
  lo, hi = split_block_range(length, window, block_k, pl.program_id(2), num_splits)
  zero = 0.0 if jnp.issubdtype(k_ref.dtype, jnp.floating) else 0  # Triton cannot cast an int to fp8

  def body(j, carry):
    start = j * block_k
    kpos = start + jnp.arange(block_k, dtype=jnp.int32)
    keep = kpos < length
    if window is not None:
      keep = keep & (query_at - kpos < window)
    span = pl.ds(start, block_k)
    load = lambda ref, cols=slice(None): pltriton.load(kv_at(ref, span, cols), mask=keep[:, None], other=zero)  # noqa: E731
    k = tuple(load(k_ref, c) for c in halves) if append else load(k_ref)  # [bk, H] (or its halves)
    v = load(v_ref)
    if quantized:  # int8 / fp8 codes enter the dots as they are (exact in bf16); the per-token scales
      # go onto the logits and the probabilities: no dequantized copy, no per-element rescaling
      ks = pltriton.load(scale_at(ks_ref, span), mask=keep, other=0)  # [bk] float32
      vs = pltriton.load(scale_at(vs_ref, span), mask=keep, other=0)
      dtype = (q[0] if append else q).dtype
      k = tuple(codes_as(x, dtype, native) for x in k) if append else codes_as(k, dtype, native)
      if words == "float16":
        scales = vs.astype(jnp.float16)[:, None]
        v, vs = tuple(code_decode.word_codes_f16(v, g, native) * scales for g in range(WORD)), None
      elif words:
        v = tuple(code_decode.word_codes(v, g, dtype) for g in range(WORD))
      else:
        v = codes_as(v, dtype, native)
      return online_softmax_step(q, k, v, keep[None, :], carry, scale=scale, softcap=softcap, key_scale=ks,
                                 value_scale=vs)
    return online_softmax_step(q, k, v, keep[None, :], carry, scale=scale, softcap=softcap)

  carry = lax.fori_loop(lo, hi, body, init_carry(rows, head_dim, WORD if words else None))
  if append:  # the last split takes the new key into its partial and stores it with its value
    mine = new & (pl.program_id(2) == num_splits - 1)
    k_new = [x.astype(q_ref.dtype) for x in rotate_halves(*(k_new_ref[c].astype(f32) for c in halves), *trig)]
    # the value in parts: the accumulator's column groups when read as words, else one
    v_new = [_column_group(v_new_ref, g, interpret) for g in range(WORD)] if words else [v_new_ref[...]]
    if quantized:  # stored as codes and a scale, and attended as the cache will hold it (k's codes: v's dtype)
      k_new, k_scale = _quantize_token(k_new, k_out.dtype)
      v_new, v_scale = _quantize_token(v_new, k_out.dtype)
    s_new = sum((qi.astype(f32) * ki.astype(f32)[None, :]).sum(axis=1) for qi, ki in zip(q, k_new))  # [rows]
    if quantized:
      s_new = s_new * k_scale
    s_new = jnp.where(mine, scale_logits(s_new, scale=scale, softcap=softcap), MASK_VALUE)
    folded = [c * v_scale for c in v_new] if quantized else v_new
    carry = online_softmax_fold_key(s_new, tuple(folded) if words else folded[0], carry)

    @pl.when(mine)
    def _():
      for c, x in zip(halves, k_new):
        k_out[layer, b, pos, h, c] = x.astype(k_out.dtype)
      v_out[layer, b, pos, h, :] = _words_of(v_new) if words else v_new[0].astype(v_out.dtype)
      if quantized:
        ks_out[layer, b, pos, h] = k_scale
        vs_out[layer, b, pos, h] = v_scale

  store_partials(o_ref, m_ref, l_ref, carry, interpret=interpret)


WORD = 4  # int8 codes a 32-bit word


def _column_group(ref, g: int, interpret: bool):
  """Columns g, g + WORD, g + 2 WORD, ... of a [H] ref (a strided load; the interpreter takes none, so there a
  reshape)."""
  if interpret:
    return ref[...].reshape(-1, WORD)[:, g]
  return ref[pl.ds(g, ref.shape[0] // WORD, stride=WORD)]


def _words_of(codes):
  """int32 words from WORD column groups of int8 code values (float32 [n] each, group g the word's byte g)."""
  word = None
  for g, c in enumerate(codes):
    byte = lax.shift_left(c.astype(jnp.int32) & 0xFF, 8 * g)
    word = byte if word is None else word | byte
  return word


def codes_as(codes, dtype, native: bool):
  """Cache codes in the dots' dtype. With `CODES_BY_PTX` (and `native`: compiled, inline PTX on), int8 codes by
  `code_decode`'s permutes into the mantissa, two codes a register, instead of an int-to-float conversion per code.
  Measured (H200, session 30): the int8 cache's launch is issue-bound, but mostly on gathering the value tile's bytes
  into the dot operand, which Triton does before any spelling of the decode; into float16 649 against 683 us a step
  at batch 16, into bfloat16 level."""
  if CODES_BY_PTX and native and codes.dtype == jnp.int8 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    decode = code_decode.int8_codes_bf16 if jnp.dtype(dtype) == jnp.bfloat16 else code_decode.int8_codes_f16
    return decode(codes, native)
  return codes.astype(dtype)


def _quantize_token(parts, dtype):
  """One vector's float32 parts (the head dim in pieces) -> (its codes in `dtype`, as float32 per part, and
  its scale): absmax over the whole vector, codes = x / scale clipped to the code range and rounded as
  `jaxinfer.cache.quantize_kv` rounds them (to the nearest, ties to even: Triton lowers no round, so floor and
  a tie test; fp8 by its conversion)."""
  f32 = jnp.float32
  top = float(jnp.iinfo(dtype).max if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype).max)
  xs = [x.astype(f32) for x in parts]
  amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in xs])
  scale = jnp.where(amax > 0, amax / top, 1.0)
  codes = []
  for x in xs:
    y = jnp.clip(x / scale, -top, top)
    if jnp.issubdtype(dtype, jnp.integer):
      r = jnp.floor(y + 0.5)  # exact for |y| <= 127
      y = jnp.where((r - y == 0.5) & (r - 2.0 * jnp.floor(r * 0.5) != 0), r - 1.0, r)
    else:
      y = y.astype(dtype).astype(f32)
    codes.append(y)
  return codes, scale


_jit_with_static_options = functools.partial(  # the launch options of both entry points are static
    jax.jit, static_argnames=("sliding_window", "softcap", "scale", "num_splits", "block_k", "num_warps",
                              "num_stages", "interpret", "merge"))


def supports_append(head_dim: int) -> bool:
  """Whether `decode_attention_append` takes this head dim (its logits are two dots over the halves)."""
  return head_dim >= 2 * MIN_DOT_ROWS


def _check_append(q, k_new, v_new, cos, sin, k_cache, positions):
  """The new token's arrays that `decode_attention_append` takes, or a ValueError naming the problem."""
  B, N, H = q.shape
  K = k_cache.shape[3]
  if k_new.shape != (B, K, H) or v_new.shape != (B, K, H):
    raise ValueError(f"k_new and v_new must be [B={B}, K={K}, H={H}], got {k_new.shape} and {v_new.shape}")
  if not (k_new.dtype == v_new.dtype == q.dtype):
    raise ValueError(f"q, k_new, v_new must share a dtype, got {q.dtype}, {k_new.dtype}, {v_new.dtype}")
  if not supports_append(H):
    raise ValueError(f"appending needs head dim H >= {2 * MIN_DOT_ROWS} (two dots of H/2), got {H}")
  check_rotary_inputs(cos, sin, positions, B, H)


@_jit_with_static_options
def decode_attention(
    q: jax.Array,  # [B, N, H]
    k: jax.Array,  # [B, S, K, H], or [L, B, S, K, H] with `layer`
    v: jax.Array,  # like k
    *,
    lengths: jax.Array,  # [B] int, valid cache entries (the current token included)
    layer: jax.Array | int | None = None,  # which layer of a stacked cache (int32 scalar)
    k_scale: jax.Array | None = None,  # int8 / fp8 k and v: float32 scales [(L,) B, S, K], key = k * scale
    v_scale: jax.Array | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    merge: bool = True,
) -> jax.Array:  # [B, N, H]
  """Attention of one query per sequence (at position lengths[b] - 1) over its cache.

  Keys at positions >= lengths[b] are never read; `sliding_window` keeps the last sliding_window
  keys; `softcap` maps logits s to softcap * tanh(s / softcap). A length of 0 gives zeros.
  num_splits=None picks enough splits to fill the GPU. With `layer`, k and v are a whole stacked cache
  `[L, B, S, K, H]` and the kernel reads that layer in place (a sliced layer would reach it as a copy).
  With `k_scale`/`v_scale`, k and v are int8 / fp8 codes: the dots take the codes, the scales multiply
  the logits and the probabilities. `merge=False` returns the splits' `common.Partials` (one launch).
  """
  return _launch(q, k, v, lengths=lengths, layer=layer, k_scale=k_scale, v_scale=v_scale, append=None,
                 sliding_window=sliding_window, softcap=softcap, scale=scale, num_splits=num_splits,
                 block_k=block_k, num_warps=num_warps, num_stages=num_stages, interpret=interpret, merge=merge)


@_jit_with_static_options
def decode_attention_append(
    q: jax.Array,  # [B, N, H], not yet rotated; or q, k and v heads packed [B, N + 2K, H]
    k_new: jax.Array | None,  # [B, K, H], not yet rotated (None: in q)
    v_new: jax.Array | None,  # [B, K, H] (None: in q)
    cos: jax.Array,  # [B, H] float32 (the half-split rotation's tables at each sequence's position)
    sin: jax.Array,  # [B, H] float32
    k_cache: jax.Array,  # [L, B, S, K, H]
    v_cache: jax.Array,  # [L, B, S, K, H]
    *,
    layer: jax.Array | int,
    k_scale: jax.Array | None = None,  # int8 / fp8 caches: float32 scales [L, B, S, K], key = k * scale
    v_scale: jax.Array | None = None,
    positions: jax.Array,  # [B] int: where the new token goes; outside [0, S): not written, not attended
    lengths: jax.Array,  # [B] int: keys attended, the new one counted (read for sequences not written)
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    merge: bool = True,
) -> tuple:  # out [B, N, H], k_cache, v_cache (quantized: then k_scale, v_scale)
  """One decode token per sequence in one launch (plus the combine): q and k_new rotated (as
  `rope_write`), the rotated key and v_new stored at `[layer, b, positions[b]]` of the stacked caches,
  and the attention of the rotated query over the cache's keys before that position and the new key.
  With `k_scale`/`v_scale` the caches hold int8 / fp8 codes: the new key and value are quantized as
  `jaxinfer.cache.quantize_kv` does (absmax per token and kv head), stored with their scales, and attended
  as stored.

  Why: at batch 1 the separate `rope_write` launch cost ~2.2 us a layer (benchmarks/BENCHMARKS.md), and
  its work is a few hundred bytes that this kernel's programs can do on the side: each rotates its q rows
  (so the logits are two dots over the head dim's halves) and the last split of each (sequence, kv head)
  folds the new key into its partial and writes it (no program reads that row: the others stop before it).
  A sequence whose position is outside the cache (padded, finished) attends `lengths` keys of the cache.
  With k_new and v_new None, q holds the query heads, then the new key's, then the value's (one product of
  the three weights packed together, `jaxinfer.packing`): each is read in place, no slices copied out.
  Donate or drop the caches passed in: the returned ones share their buffers. `merge=False` returns the
  splits' `common.Partials` instead of out (one launch; their consumer merges them, e.g. inside its own).
  """
  if k_cache.ndim != 5:
    raise ValueError(f"k_cache must be a stacked cache [L, B, S, K, H], got shape {k_cache.shape}")
  packed = k_new is None and v_new is None
  if packed:
    K = k_cache.shape[3]
    if q.ndim != 3 or q.shape[1] <= 2 * K:
      raise ValueError(f"packed q must be [B, N + 2K, H] with K={K} kv heads after N query heads, got {q.shape}")
    B, NKK, H = q.shape
    shapes = [jax.ShapeDtypeStruct((B, n, H), q.dtype) for n in (NKK - 2 * K, K, K)]  # the three, for checks
    _check_append(*shapes, cos, sin, k_cache, positions)
    k_new = v_new = q  # read through their own block specs
  else:
    _check_append(q, k_new, v_new, cos, sin, k_cache, positions)
  return _launch(q, k_cache, v_cache, lengths=lengths, layer=layer, k_scale=k_scale, v_scale=v_scale,
                 append=(positions.astype(jnp.int32), cos, sin, k_new, v_new), packed=packed,
                 sliding_window=sliding_window,
                 softcap=softcap, scale=scale, num_splits=num_splits, block_k=block_k, num_warps=num_warps,
                 num_stages=num_stages, interpret=interpret, merge=merge)


def _launch(q, k, v, *, lengths, layer, k_scale, v_scale, append, sliding_window, softcap, scale, num_splits,
            block_k, num_warps, num_stages, interpret, packed=False, merge=True):
  """Checks, tiling and the pallas_call shared by `decode_attention` and `decode_attention_append` (`packed`:
  q is [B, N + 2K, H] and holds the new keys and values too)."""
  qkv = q
  if packed:
    q = jax.ShapeDtypeStruct((q.shape[0], q.shape[1] - 2 * k.shape[-2], q.shape[2]), q.dtype)
  stacked = layer is not None
  if k.ndim != (5 if stacked else 4):
    raise ValueError(f"k must be {'[L, B, S, K, H] with a layer' if stacked else '[B, S, K, H]'}, got shape {k.shape}")
  whole_k, whole_v = k, v
  if stacked:
    k, v = k[0], v[0]  # shapes for the checks; the kernel reads whole_k / whole_v
  quantized = k_scale is not None or v_scale is not None
  if quantized:
    if k.dtype not in (jnp.int8, jnp.float8_e4m3fn) or v.dtype != k.dtype:
      raise ValueError(f"a quantized cache holds int8 or float8_e4m3fn codes, got {k.dtype} and {v.dtype}")
    want = whole_k.shape[:-1]
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
      if sc is None or sc.shape != want or sc.dtype != jnp.float32:
        raise ValueError(f"{name} must be float32 of shape {want} (one scale per token per kv head), got "
                         f"{None if sc is None else (sc.shape, sc.dtype)}")
    k = v = jax.ShapeDtypeStruct(k.shape, q.dtype)  # the checks below see the dequantized dtype
  check_decode_args(q, k, v, lengths, sliding_window=sliding_window, softcap=softcap,
                    num_splits=num_splits, block_k=block_k, num_warps=num_warps,
                    num_stages=num_stages, kv_name="")
  batch, num_heads, head_dim = q.shape
  _, seq_k, num_kv_heads, _ = k.shape
  if k.shape[0] != batch:
    raise ValueError(f"k batch {k.shape[0]} != q batch {batch}")
  group = num_heads // num_kv_heads

  if block_k is None:  # by the keys one split walks (splits as many as fill the GPU, see above)
    walk = seq_k / (num_splits or default_num_splits(batch, num_kv_heads, seq_k))
    block_k, default_stages = ((_LONG_BLOCK_K, _LONG_STAGES) if walk >= _LONG_WALK
                               else (_SHORT_BLOCK_K, _SHORT_STAGES))
  else:
    default_stages = _LONG_STAGES
  block_k = min(block_k, max(16, next_pow2(seq_k)))
  num_splits = num_splits or default_num_splits(batch, num_kv_heads, pl.cdiv(seq_k, block_k))
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

  words = VALUE_WORDS if quantized and whole_v.dtype == jnp.int8 and head_dim % (WORD * 16) == 0 else None
  if words:  # values read (and the new one written) as int32 words of WORD codes: a bitcast view, no copy
    whole_v = lax.bitcast_convert_type(whole_v.reshape(*whole_v.shape[:-1], head_dim // WORD, WORD), jnp.int32)
  kernel = functools.partial(_decode_kernel, scale=scale, window=sliding_window, softcap=softcap,
                             block_k=block_k, num_splits=num_splits, stacked=stacked, quantized=quantized,
                             append=append is not None, native=not interpret and code_decode.INLINE_PTX,
                             words=words, interpret=interpret)
  # q as [B, K, G, H] (a free reshape: the heads of a kv head are adjacent), or the packed [B, N + 2K, H]
  q_spec = pl.BlockSpec((None, group, head_dim), lambda b, h, s: (b, h, 0))  # heads [h G, h G + G)
  q_arg = qkv
  if not packed:
    q_spec = pl.BlockSpec((None, None, group, head_dim), lambda b, h, s: (b, h, 0, 0))
    q_arg = qkv.reshape(batch, num_kv_heads, group, head_dim)
  specs = [pl.BlockSpec((None,), lambda b, h, s: (b,)), q_spec]
  args, extra_outputs, aliases = (), (), None
  if append is not None:
    per_seq = pl.BlockSpec((None, head_dim), lambda b, h, s: (b, 0))
    per_head = lambda first: pl.BlockSpec((None, None, head_dim), lambda b, h, s: (b, first + h, 0))  # noqa: E731
    new_k, new_v = (num_heads, num_heads + num_kv_heads) if packed else (0, 0)  # where their heads start
    specs += [pl.BlockSpec((None,), lambda b, h, s: (b,)), per_seq, per_seq, per_head(new_k), per_head(new_v)]
    args = append
    first_cache = len(specs) + 1  # after the layer
    written = (whole_k, whole_v, k_scale, v_scale) if quantized else (whole_k, whole_v)
    extra_outputs = tuple((pl.no_block_spec, x) for x in written)
    aliases = {first_cache + i: 3 + i for i in range(len(written))}  # outputs: o, m, l, then the caches
  scales = (k_scale, v_scale) if quantized else ()
  if stacked:
    specs += [pl.no_block_spec] * (3 + len(scales))
    args += (jnp.asarray(layer, jnp.int32).reshape(1), whole_k, whole_v, *scales)
  else:
    specs += [pl.BlockSpec((None, seq_k, None, x.shape[-1]), lambda b, h, s: (b, 0, h, 0))
              for x in (whole_k, whole_v)]  # (the values' last dim: H / WORD words when read as words)
    specs += [pl.BlockSpec((None, seq_k, None), lambda b, h, s: (b, 0, h))] * len(scales)
    args += (whole_k, whole_v, *scales)
  run = split_k_decode_call(
      kernel,
      specs,
      batch=batch, num_kv_heads=num_kv_heads, num_splits=num_splits, group=group,
      head_dim=head_dim, out_dtype=q.dtype, num_warps=num_warps or _DEFAULT_WARPS,
      num_stages=num_stages or default_stages, interpret=interpret, name="decode_attention",
      extra_outputs=extra_outputs, input_output_aliases=aliases, merge=merge)
  out = run(lengths.astype(jnp.int32), q_arg, *args)
  if words and append is not None:  # the written values back to int8 codes (a bitcast view)
    out = (*out[:2], lax.bitcast_convert_type(out[2], jnp.int8).reshape(*out[2].shape[:-1], head_dim), *out[3:])
  return out


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
