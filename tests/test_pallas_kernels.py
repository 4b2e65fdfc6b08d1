"""Tests of pallas_kernels: each kernel against its float32 jnp reference, and each reference against a
float64 numpy loop written from the attention definition.

One class per kernel. Every test runs in interpret mode on the CPU and natively (marked `gpu`) when
jax's default backend is a GPU; the other variant is skipped. Inputs are fresh random normals per
test. Unwritten outputs are caught by poisoning: interpret mode fills fresh outputs with NaN, and on
the GPU a NaN buffer of the output's size is freed just before the call so the allocator hands its
memory to the kernel.
"""
from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.weight_matmul import weight_matmul, weight_matmuls
from pallas_kernels import (decode_attention, decode_attention_append, decode_attention_reference,
                            flash_attention, flash_attention_reference, paged_decode_attention,
                            paged_decode_attention_reference)
from pallas_kernels.rope_write import rope_write_reference
from pallas_kernels.common import M_INIT, combine_splits, combine_splits_reference
from kernel_tools import cuda_lowering, rel_err

ON_GPU = jax.default_backend() == "gpu"
MODES = [
    pytest.param(True, id="interpret",
                 marks=pytest.mark.skipif(ON_GPU, reason="interpret mode runs on the CPU suite")),
    pytest.param(False, id="native",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU")]),
]
# Relative-norm tolerances: float32 math lands far below 1e-4; bf16/f16 probabilities fed to the
# PV dot give ~2e-3.
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2, jnp.float16: 5e-3}
_SEEDS = iter(range(10**6))


def _dot_switches(monkeypatch, dot_dtype, interpret: bool = False):
  """The quantized decode's dot dtype and how int8 codes reach it (`decode_attention.codes_as`): None (q's dtype,
  converted), "float16", "ptx" (q's dtype by inline PTX), "float16 ptx", "words" / "words float16" (int8 values read
  as int32 words of four codes, `decode_attention.VALUE_WORDS`). The PTX runs natively only: interpreted,
  those cases would repeat the conversion's, so they skip."""
  if interpret and dot_dtype and "ptx" in dot_dtype:
    pytest.skip("inline PTX runs natively only (interpreted, the codes are converted)")
  module = sys.modules["pallas_kernels.decode_attention"]
  monkeypatch.setattr(module, "QUANT_DOT_DTYPE", "float16" if dot_dtype and "float16" in dot_dtype else None)
  monkeypatch.setattr(module, "CODES_BY_PTX", bool(dot_dtype and "ptx" in dot_dtype))
  monkeypatch.setattr(module, "VALUE_WORDS", {"words": "bfloat16", "words float16": "float16"}.get(dot_dtype))


def _rng():
  """A fresh generator per call, so that no two tests share inputs."""
  return np.random.default_rng([next(_SEEDS), 20261126])


def _normal(rng, shape, dtype, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _poison(shape, dtype):
  """On the GPU, leave NaN in the memory the next allocation of this size is likely to get."""
  if ON_GPU:
    junk = jnp.full(shape, jnp.nan, dtype)
    junk.block_until_ready()
    junk.delete()


def _check(out, ref, dtype, *, what=""):
  out = np.asarray(out, np.float32)
  assert not np.isnan(out).any(), f"{what}: NaN in output (unwritten or bad masking)"
  err = rel_err(out, ref)
  assert err < TOL[dtype], f"{what}: relative error {err:.2e} >= {TOL[dtype]:.0e}"


def _np_attention(q, k, v, allowed, scale, softcap):
  """float64 attention of one query row: q [H], k and v [S, H], allowed [S] bool."""
  if not allowed.any():
    return np.zeros_like(q)
  s = (k[allowed] @ q) * scale
  if softcap is not None:
    s = softcap * np.tanh(s / softcap)
  p = np.exp(s - s.max())
  return (p / p.sum()) @ v[allowed]


class TestFlashAttention:
  """Prefill: causal + q_offsets, sliding window, soft-cap, ragged right padding, GQA 1/4/6/8."""

  # (dtype, H, N, K, causal, sliding_window, softcap)
  CASES = [
      pytest.param(jnp.float32, 64, 4, 4, True, None, None, id="f32-h64-g1-causal"),
      pytest.param(jnp.bfloat16, 128, 8, 2, True, None, None, id="bf16-h128-g4-causal"),
      pytest.param(jnp.bfloat16, 64, 8, 1, True, 24, None, id="bf16-h64-g8-window"),
      pytest.param(jnp.float32, 64, 8, 2, True, None, 5.0, id="f32-h64-g4-softcap"),
      pytest.param(jnp.bfloat16, 64, 4, 1, False, None, None, id="bf16-h64-g4-noncausal"),
      pytest.param(jnp.float16, 64, 12, 2, True, 40, 20.0, id="f16-h64-g6-window-softcap"),
  ]

  @staticmethod
  def _shapes(interpret):
    # (B, T, S, blocks): T and S not multiples of the blocks, to exercise the edge tiles.
    if interpret:
      return 2, 40, 88, dict(block_q=8, block_k=16)
    return 3, 300, 700, {}

  def _inputs(self, rng, batch, seq_q, seq_k, num_heads, num_kv, head_dim, dtype, causal):
    q = _normal(rng, (batch, seq_q, num_heads, head_dim), dtype)
    k = _normal(rng, (batch, seq_k, num_kv, head_dim), dtype)
    v = _normal(rng, (batch, seq_k, num_kv, head_dim), dtype)
    # Ragged right padding: sequence 0 holds a single key, the last uses the whole cache.
    kv_lengths = rng.integers(seq_q, seq_k + 1, batch)
    kv_lengths[0], kv_lengths[-1] = 1, seq_k
    # Queries are the last T positions of each prompt (chunked prefill); clipped at 0.
    q_offsets = np.maximum(kv_lengths - seq_q, 0) if causal else np.zeros(batch, np.int64)
    return q, k, v, jnp.asarray(kv_lengths, jnp.int32), jnp.asarray(q_offsets, jnp.int32)

  @pytest.mark.parametrize("interpret", MODES)
  @pytest.mark.parametrize("dtype,head_dim,num_heads,num_kv,causal,window,softcap", CASES)
  def test_matches_reference(self, interpret, dtype, head_dim, num_heads, num_kv, causal,
                             window, softcap):
    rng = _rng()
    batch, seq_q, seq_k, blocks = self._shapes(interpret)
    q, k, v, kv_lengths, q_offsets = self._inputs(rng, batch, seq_q, seq_k, num_heads, num_kv,
                                                  head_dim, dtype, causal)
    kw = dict(kv_lengths=kv_lengths, q_offsets=q_offsets, causal=causal, sliding_window=window,
              softcap=softcap)
    _poison(q.shape, dtype)
    out = flash_attention(q, k, v, **kw, **blocks, interpret=interpret)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = flash_attention_reference(q, k, v, **kw)
    _check(out, ref, dtype, what="flash")

  @pytest.mark.parametrize("interpret", MODES)
  def test_padding_and_empty_rows(self, interpret):
    """NaN in the padding never leaks; rows whose window holds no valid key are exactly zero."""
    rng = _rng()
    batch, seq_q, seq_k, blocks = self._shapes(interpret)
    dtype, window = jnp.bfloat16, 8
    q, k, v, _, _ = self._inputs(rng, batch, seq_q, seq_k, 8, 2, 64, dtype, True)
    kv_lengths = jnp.asarray([5] + [seq_k // 2] * (batch - 1), jnp.int32)
    kw = dict(kv_lengths=kv_lengths, sliding_window=window)
    ref = flash_attention_reference(q, k, v, **kw)
    pad = jnp.arange(seq_k)[None, :, None, None] >= kv_lengths[:, None, None, None]
    k, v = jnp.where(pad, jnp.nan, k), jnp.where(pad, jnp.nan, v)
    out = flash_attention(q, k, v, **kw, **blocks, interpret=interpret)
    _check(out, ref, dtype, what="flash padding")
    # Sequence 0 (5 keys, window 8): queries at positions >= 5 + 8 - 1 see no key.
    assert np.all(np.asarray(out[0, 12:], np.float32) == 0.0)

  def test_reference_matches_numpy(self):
    rng = _rng()
    batch, seq_q, seq_k, num_heads, num_kv, head_dim = 2, 5, 9, 4, 2, 16
    q, k, v, kv_lengths, q_offsets = self._inputs(rng, batch, seq_q, seq_k, num_heads, num_kv,
                                                  head_dim, jnp.float32, True)
    kw = dict(kv_lengths=kv_lengths, q_offsets=q_offsets, sliding_window=3, softcap=2.0,
              scale=0.3)
    ref = flash_attention_reference(q, k, v, **kw)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    want = np.zeros(qn.shape)
    for b in range(batch):
      for t in range(seq_q):
        qpos = int(q_offsets[b]) + t
        kpos = np.arange(seq_k)
        allowed = (kpos < int(kv_lengths[b])) & (kpos <= qpos) & (qpos - kpos < 3)
        for n in range(num_heads):
          kh = n // (num_heads // num_kv)
          want[b, t, n] = _np_attention(qn[b, t, n], kn[b, :, kh], vn[b, :, kh], allowed, 0.3,
                                        2.0)
    assert rel_err(ref, want) < 1e-6

  def test_validation_names_the_argument(self):
    q = jnp.ones((1, 8, 4, 64), jnp.bfloat16)
    k = jnp.ones((1, 8, 3, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="kv heads"):
      flash_attention(q, k, k, kv_lengths=jnp.ones((1,), jnp.int32), interpret=True)
    k = jnp.ones((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="kv_lengths"):
      flash_attention(q, k, k, kv_lengths=jnp.ones((2,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="block_k"):
      flash_attention(q, k, k, kv_lengths=jnp.ones((1,), jnp.int32), block_k=48, interpret=True)


def _decode_inputs(rng, batch, seq_k, num_heads, num_kv, head_dim, dtype):
  q = _normal(rng, (batch, num_heads, head_dim), dtype)
  k = _normal(rng, (batch, seq_k, num_kv, head_dim), dtype)
  v = _normal(rng, (batch, seq_k, num_kv, head_dim), dtype)
  lengths = rng.integers(1, seq_k + 1, batch)
  lengths[0], lengths[-1] = 1, seq_k  # a single token, and a full cache
  return q, k, v, jnp.asarray(lengths, jnp.int32)


def _np_decode(q, k, v, lengths, window, softcap, scale):
  """float64 loop: q [B, N, H], k and v [B, S, K, H] dense."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, num_heads, _ = q.shape
  group = num_heads // k.shape[2]
  out = np.zeros(q.shape)
  kpos = np.arange(k.shape[1])
  for b in range(batch):
    qpos = int(lengths[b]) - 1
    allowed = kpos <= qpos
    if window is not None:
      allowed &= qpos - kpos < window
    for n in range(num_heads):
      out[b, n] = _np_attention(q[b, n], k[b, :, n // group], v[b, :, n // group], allowed,
                                scale, softcap)
  return out


# (dtype, H, N, K, sliding_window, softcap, num_splits)
DECODE_CASES = [
    pytest.param(jnp.float32, 64, 4, 4, None, None, None, id="f32-h64-g1"),
    pytest.param(jnp.bfloat16, 128, 8, 2, None, None, 3, id="bf16-h128-g4-3splits"),
    pytest.param(jnp.bfloat16, 64, 16, 2, 20, None, 2, id="bf16-h64-g8-window"),
    pytest.param(jnp.float32, 64, 8, 2, None, 5.0, 1, id="f32-h64-g4-softcap-1split"),
    pytest.param(jnp.bfloat16, 64, 14, 2, 33, 30.0, None, id="bf16-h64-g7-window-softcap"),
]


class TestDecodeAttention:
  """Split-K decode over a dense [B, S, K, H] cache."""

  @staticmethod
  def _shapes(interpret):
    if interpret:
      return 3, 100, dict(block_k=16)  # S not a multiple of block_k
    return 5, 3000, {}

  @pytest.mark.parametrize("interpret", MODES)
  @pytest.mark.parametrize("dtype,head_dim,num_heads,num_kv,window,softcap,num_splits",
                           DECODE_CASES)
  def test_matches_reference(self, interpret, dtype, head_dim, num_heads, num_kv, window,
                             softcap, num_splits):
    rng = _rng()
    batch, seq_k, blocks = self._shapes(interpret)
    q, k, v, lengths = _decode_inputs(rng, batch, seq_k, num_heads, num_kv, head_dim, dtype)
    kw = dict(lengths=lengths, sliding_window=window, softcap=softcap)
    _poison(q.shape, dtype)
    out = decode_attention(q, k, v, **kw, num_splits=num_splits, **blocks, interpret=interpret)
    assert out.shape == q.shape and out.dtype == q.dtype
    _check(out, decode_attention_reference(q, k, v, **kw), dtype, what="decode")

  @pytest.mark.parametrize("interpret", MODES)
  def test_padding_and_zero_length(self, interpret):
    """NaN beyond the length is never used; a length of 0 gives zeros."""
    rng = _rng()
    batch, seq_k, blocks = self._shapes(interpret)
    dtype = jnp.bfloat16
    q, k, v, lengths = _decode_inputs(rng, batch, seq_k, 8, 2, 64, dtype)
    lengths = lengths.at[1].set(0)
    ref = decode_attention_reference(q, k, v, lengths=lengths)
    pad = jnp.arange(seq_k)[None, :, None, None] >= lengths[:, None, None, None]
    k, v = jnp.where(pad, jnp.nan, k), jnp.where(pad, jnp.nan, v)
    out = decode_attention(q, k, v, lengths=lengths, num_splits=4, **blocks,
                           interpret=interpret)
    _check(out, ref, dtype, what="decode pad")
    assert np.all(np.asarray(out[1], np.float32) == 0.0)

  @pytest.mark.parametrize("interpret", MODES)
  def test_one_layer_of_a_stacked_cache(self, interpret):
    """With `layer`, the kernel reads that layer of a [L, B, S, K, H] cache in place; other layers
    hold NaN and are never touched."""
    rng = _rng()
    batch, seq_k, blocks = self._shapes(interpret)
    dtype = jnp.bfloat16
    q, k, v, lengths = _decode_inputs(rng, batch, seq_k, 8, 2, 64, dtype)
    nan = jnp.full_like(k, jnp.nan)
    ks, vs = jnp.stack([nan, k, nan]), jnp.stack([nan, v, nan])
    out = decode_attention(q, ks, vs, lengths=lengths, layer=jnp.int32(1), num_splits=2, **blocks,
                           interpret=interpret)
    _check(out, decode_attention_reference(q, k, v, lengths=lengths), dtype, what="decode stacked")

  @pytest.mark.parametrize("interpret", MODES)
  @pytest.mark.parametrize("code_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
  @pytest.mark.parametrize("stacked", [False, True], ids=["layer", "stacked"])
  @pytest.mark.parametrize("dot_dtype", [None, "float16", "ptx", "float16 ptx", "words", "words float16"])
  def test_quantized_cache(self, monkeypatch, interpret, code_dtype, stacked, dot_dtype):
    """int8 / fp8 codes with per-token scales, dequantized in the kernel, equal attention over the
    dequantized values (bf16 rounding of each dequantized tile is the only difference), the codes converted
    to q's dtype or to float16 for the dots."""
    from jaxinfer.cache import quantize_kv

    _dot_switches(monkeypatch, dot_dtype, interpret)
    jax.clear_caches()  # (jit caches do not see the switch)

    rng = _rng()
    batch, seq_k, blocks = self._shapes(interpret)
    q, k, v, lengths = _decode_inputs(rng, batch, seq_k, 8, 2, 64, jnp.bfloat16)
    (kc, ks), (vc, vs) = quantize_kv(k, code_dtype), quantize_kv(v, code_dtype)
    deq = lambda c, sc: c.astype(jnp.float32) * sc[..., None]  # noqa: E731
    ref = decode_attention_reference(q.astype(jnp.float32), deq(kc, ks), deq(vc, vs), lengths=lengths)
    if stacked:
      junk = lambda a: jnp.stack([jnp.zeros_like(a), a])  # noqa: E731  layer 0 is never read
      args, kw = (junk(kc), junk(vc)), dict(k_scale=junk(ks), v_scale=junk(vs), layer=jnp.int32(1))
    else:
      args, kw = (kc, vc), dict(k_scale=ks, v_scale=vs)
    out = decode_attention(q, *args, lengths=lengths, num_splits=2, **kw, **blocks, interpret=interpret)
    assert out.dtype == q.dtype
    _check(out, ref, jnp.bfloat16, what=f"decode {jnp.dtype(code_dtype).name}")
    with pytest.raises(ValueError, match="k_scale"):
      decode_attention(q, kc, vc, lengths=lengths, k_scale=ks[:, :1], v_scale=vs, interpret=True)

  def test_kv_go_straight_into_the_kernel(self):
    """No transposed (or any other) copy of K/V is made before the pallas_call."""
    q = jnp.ones((2, 8, 64), jnp.bfloat16)
    k = jnp.ones((2, 256, 2, 64), jnp.bfloat16)
    fn = functools.partial(decode_attention, lengths=jnp.array([3, 256], jnp.int32))
    jaxpr = jax.make_jaxpr(fn)(q, k, k).jaxpr
    while len(jaxpr.eqns) == 1 and "jaxpr" in jaxpr.eqns[0].params:  # unwrap the jit
      inner = jaxpr.eqns[0].params["jaxpr"]
      jaxpr = getattr(inner, "jaxpr", inner)
    call, _combine = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]  # two launches
    assert call.invars[-2] is jaxpr.invars[1] and call.invars[-1] is jaxpr.invars[2]

  def test_key_block_follows_the_walk(self):
    """Without a block_k the kernel takes 32-key blocks and 4 stages where each split walks few keys (batch 1
    over 8k keys: 33 splits of 248) and 128-key blocks with 2 stages where it walks many (batch 16: 3 splits
    of 2.7k), as measured on an H200 (pallas_kernels/NOTES.md, session 11); a chosen block_k keeps 2."""
    def launch(batch, **kw):
      q = jnp.ones((batch, 32, 128), jnp.bfloat16)
      k = jax.ShapeDtypeStruct((batch, 8192, 8, 128), jnp.bfloat16)
      fn = lambda q, k: decode_attention(q, k, k, lengths=jnp.ones((batch,), jnp.int32), **kw)  # noqa: E731
      eqns, todo = [], [jax.make_jaxpr(fn)(q, k).jaxpr]
      while todo:  # the pallas_calls inside the jit
        for e in todo.pop().eqns:
          eqns.append(e)
          todo += [getattr(p, "jaxpr", p) for p in e.params.values() if hasattr(getattr(p, "jaxpr", p), "eqns")]
      named = lambda e: str(getattr(e.params.get("name_and_src_info") or e.params.get("name"), "name",  # noqa: E731
                                    e.params.get("name_and_src_info") or e.params.get("name")))
      (call,) = [e for e in eqns if e.primitive.name == "pallas_call" and named(e) == "decode_attention"]
      return call.params["compiler_params"].num_stages, tuple(call.params["grid_mapping"].grid)

    assert launch(1) == (4, (1, 8, 33))
    assert launch(16) == (2, (16, 8, 3))
    assert launch(1, block_k=64)[0] == 2

  def test_reference_matches_numpy(self):
    rng = _rng()
    q, k, v, lengths = _decode_inputs(rng, 3, 11, 6, 2, 16, jnp.float32)
    kw = dict(sliding_window=4, softcap=3.0, scale=0.4)
    ref = decode_attention_reference(q, k, v, lengths=lengths, **kw)
    assert rel_err(ref, _np_decode(q, k, v, lengths, 4, 3.0, 0.4)) < 1e-6

  def test_validation_names_the_argument(self):
    q = jnp.ones((2, 8, 64), jnp.bfloat16)
    k = jnp.ones((2, 32, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="lengths"):
      decode_attention(q, k, k, lengths=jnp.ones((3,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="head dim"):
      decode_attention(q, k[..., :32], k[..., :32], lengths=jnp.ones((2,), jnp.int32),
                       interpret=True)
    with pytest.raises(ValueError, match="num_splits"):
      decode_attention(q, k, k, lengths=jnp.ones((2,), jnp.int32), num_splits=0,
                       interpret=True)


class TestDecodeAttentionAppend:
  """decode_attention_append: one new token per sequence rotated, written into a stacked cache and attended
  in one launch, against rope_write_reference followed by decode_attention_reference on the written layer."""

  @staticmethod
  def _inputs(rng, interpret, num_heads, num_kv, head_dim, dtype):
    if interpret:
      S, positions, lengths, blocks = 100, [0, 57, -1, 100], [1, 58, 40, 100], dict(block_k=16)
    else:
      S, positions, lengths, blocks = 3000, [0, 1234, -1, 3000, 2999], [1, 1235, 700, 3000, 3000], {}
    B, L = len(positions), 3
    q = _normal(rng, (B, num_heads, head_dim), dtype)
    k_new, v_new = (_normal(rng, (B, num_kv, head_dim), dtype) for _ in range(2))
    angles = rng.uniform(0, 100, (B, head_dim // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    trig = (jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32))
    caches = tuple(_normal(rng, (L, B, S, num_kv, head_dim), dtype) for _ in range(2))
    return (q, k_new, v_new, *trig, *caches), jnp.asarray(positions, jnp.int32), jnp.asarray(lengths, jnp.int32), blocks

  @pytest.mark.parametrize("interpret", MODES)
  @pytest.mark.parametrize("dtype,head_dim,num_heads,num_kv,window,softcap,num_splits", DECODE_CASES)
  def test_matches_rope_write_then_decode(self, interpret, dtype, head_dim, num_heads, num_kv, window, softcap,
                                          num_splits):
    """Positions at the start, inside and at the end of the cache; -1 and S (padded / finished sequences)
    write nothing and attend `lengths` cached keys. The cache rows from each written position on and the
    other layers hold NaN: read, they would show."""
    rng = _rng()
    args, positions, lengths, blocks = self._inputs(rng, interpret, num_heads, num_kv, head_dim, dtype)
    layer, S = 1, args[5].shape[2]
    q_rot, k_want, v_want = rope_write_reference(*args, layer=layer, positions=positions)
    kw = dict(lengths=lengths, sliding_window=window, softcap=softcap)
    want = decode_attention_reference(q_rot, k_want[layer], v_want[layer], **kw)
    rows = jnp.arange(S)[None, :, None, None]
    unread = (rows >= jnp.where(positions >= 0, positions, S)[:, None, None, None])[None]  # [1, B, S, 1, 1]
    unread = unread | (jnp.arange(3) != layer)[:, None, None, None, None]
    dirty = [jnp.where(unread, jnp.nan, c) for c in args[5:]]
    out, k_cache, v_cache = decode_attention_append(*args[:5], *dirty, layer=jnp.int32(layer), positions=positions,
                                                    num_splits=num_splits, **kw, **blocks, interpret=interpret)
    assert out.shape == q_rot.shape and out.dtype == dtype
    _check(out, want, dtype, what="decode append")
    written = jnp.zeros_like(unread).at[layer, jnp.arange(len(positions)), positions].set(True, mode="drop")
    for got, new, old in ((k_cache, k_want, args[5]), (v_cache, v_want, args[6])):
      np.testing.assert_allclose(np.asarray(got, np.float32),  # float32: a fused multiply-add may differ by an ulp
                                 np.asarray(jnp.where(written, new, jnp.where(unread, jnp.nan, old)), np.float32),
                                 **(dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=0, atol=0)))

  @pytest.mark.parametrize("interpret", MODES)
  @pytest.mark.parametrize("code_dtype", [jnp.int8, jnp.float8_e4m3fn])
  @pytest.mark.parametrize("window,softcap,num_splits,dot_dtype", [(None, None, 3, None), (20, 30.0, None, None),
                                                                   (None, None, 3, "float16"),
                                                                   (None, None, 3, "ptx"),
                                                                   (20, 30.0, None, "float16 ptx"),
                                                                   (None, None, 3, "words"),
                                                                   (20, 30.0, None, "words float16")])
  def test_quantized_cache_matches_rope_write_quantize_then_decode(self, monkeypatch, interpret, code_dtype, window,
                                                                   softcap, num_splits, dot_dtype):
    """An int8 / fp8 cache: the rotated new key and the new value quantized per token and kv head as the
    cache's own write quantizes them (`jaxinfer.cache.quantize_kv`), codes and scales stored, and the attention
    over the cache as it then holds them. Codes within one code (int8) or one fp8 step where x / scale sits
    within a rounding of a tie (the reference's division may differ from the kernel's in the last bit), and
    few of those; scales within float32 rounding; the output within bfloat16's tolerance."""
    from jaxinfer.cache import quantize_kv

    _dot_switches(monkeypatch, dot_dtype, interpret)
    jax.clear_caches()
    rng = _rng()
    args, positions, lengths, blocks = self._inputs(rng, interpret, 8, 2, 128, jnp.bfloat16)
    layer, (L, B, S, K, H) = 2, args[5].shape
    q_rot, k_rot, _ = rope_write_reference(*args, layer=layer, positions=positions)
    at = jnp.clip(positions, 0, S - 1)
    written = (positions >= 0) & (positions < S)
    new = [jnp.where(written[:, None, None], c[layer, jnp.arange(B), at], 0) for c in (k_rot, args[6])]
    (kc, ks), (vc, vs) = (quantize_kv(c, code_dtype) for c in args[5:7])
    want_codes = []
    for codes, scales, x in ((kc, ks, new[0]), (vc, vs, args[2])):
      c_new, s_new = quantize_kv(x, code_dtype)
      idx = (layer, jnp.where(written, jnp.arange(B), B), at)  # B: out of range, dropped
      want_codes.append((codes.at[idx].set(c_new, mode="drop"), scales.at[idx].set(s_new, mode="drop")))
    deq = [(c.astype(jnp.float32) * s[..., None])[layer] for c, s in want_codes]
    kw = dict(lengths=lengths, sliding_window=window, softcap=softcap)
    want = decode_attention_reference(q_rot, *deq, **kw)
    out, *got = decode_attention_append(*args[:5], kc, vc, layer=jnp.int32(layer), k_scale=ks, v_scale=vs,
                                        positions=positions, num_splits=num_splits, **kw, **blocks,
                                        interpret=interpret)
    _check(out, want, jnp.bfloat16, what="quantized decode append")
    (got_kc, got_vc, got_ks, got_vs) = got
    for g, (w, _) in zip((got_kc, got_vc), want_codes):
      w = np.asarray(w, np.float32)
      step = np.abs(np.asarray(g, np.float32) - w)
      assert (step <= np.maximum(1.0, np.abs(w) / 8)).all()  # one code (int8) or fp8 step (an eighth)
      assert (step > 0).sum() <= 0.02 * written.sum() * K * H
    for g, (_, w) in zip((got_ks, got_vs), want_codes):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)

  @pytest.mark.parametrize("interpret", MODES)
  def test_packed_heads_read_in_place(self, interpret):
    """q, k and v heads packed in one [B, N + 2K, H] array (k_new, v_new None): the unpacked call's results
    exactly, and the array goes into the kernel whole (no slices of it copied out)."""
    rng = _rng()
    args, positions, lengths, blocks = self._inputs(rng, interpret, 16, 2, 64, jnp.bfloat16)
    q, k_new, v_new, *rest = args
    kw = dict(layer=jnp.int32(2), positions=positions, lengths=lengths, num_splits=2, **blocks, interpret=interpret)
    want = decode_attention_append(*args, **kw)
    qkv = jnp.concatenate([q, k_new, v_new], axis=1)
    got = decode_attention_append(qkv, None, None, *rest, **kw)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    jaxpr = jax.make_jaxpr(lambda qkv: decode_attention_append(qkv, None, None, *rest, **kw))(qkv).jaxpr
    inner = jaxpr.eqns[0].params["jaxpr"].jaxpr  # inside the jit
    call = next(e for e in inner.eqns if e.primitive.name == "pallas_call")
    assert sum(v is inner.invars[0] for v in call.invars) == 3  # q, k_new and v_new: the packed array itself
    with pytest.raises(ValueError, match=r"packed q must be \[B, N \+ 2K, H\]"):
      decode_attention_append(qkv[:, :4], None, None, *rest, **kw)

  def test_validation_names_the_argument(self):
    rng = _rng()
    args, positions, lengths, _ = self._inputs(rng, True, 8, 2, 64, jnp.bfloat16)
    kw = dict(layer=0, positions=positions, lengths=lengths, interpret=True)
    q, k_new, v_new, cos, sin, kc, vc = args
    with pytest.raises(ValueError, match="k_new and v_new"):
      decode_attention_append(q, k_new[:, :1], v_new, cos, sin, kc, vc, **kw)
    with pytest.raises(ValueError, match="cos must be float32"):
      decode_attention_append(q, k_new, v_new, cos.astype(jnp.bfloat16), sin, kc, vc, **kw)
    with pytest.raises(ValueError, match="head dim H >= 32"):
      decode_attention_append(q[..., :16], k_new[..., :16], v_new[..., :16], cos[:, :16], sin[:, :16], kc[..., :16],
                              vc[..., :16], **kw)
    with pytest.raises(ValueError, match="stacked cache"):
      decode_attention_append(q, k_new, v_new, cos, sin, kc[0], vc[0], **kw)
    with pytest.raises(ValueError, match="positions"):
      decode_attention_append(q, k_new, v_new, cos, sin, kc, vc, **{**kw, "positions": positions[:2]})


class TestPagedDecodeAttention:
  """Split-K decode over a page pool addressed through a block table."""

  # (dtype, H, N, K, sliding_window, softcap, num_splits, page_size, pages_per_block)
  CASES = [
      pytest.param(jnp.float32, 64, 4, 4, None, None, None, 16, 2, id="f32-h64-g1-p16x2"),
      pytest.param(jnp.bfloat16, 128, 8, 2, None, None, 3, 32, 1, id="bf16-h128-g4-p32x1"),
      pytest.param(jnp.bfloat16, 64, 16, 2, 20, None, 2, 16, 4, id="bf16-h64-g8-window-p16x4"),
      pytest.param(jnp.float32, 64, 8, 2, None, 5.0, 1, 16, None, id="f32-h64-g4-softcap"),
      pytest.param(jnp.bfloat16, 64, 14, 2, 33, 30.0, None, 64, None,
                   id="bf16-h64-g7-window-softcap-p64"),
  ]

  @staticmethod
  def _max_pages(interpret, page_size):
    return max(2, 96 // page_size) if interpret else 4096 // page_size + 3

  @staticmethod
  def _pool(rng, batch, max_pages, page_size, num_kv, head_dim, dtype, lengths):
    """Random pool with shuffled page ids; table entries past each last page are garbage."""
    num_pool = batch * max_pages + 3
    k_pages = _normal(rng, (num_pool, page_size, num_kv, head_dim), dtype)
    v_pages = _normal(rng, (num_pool, page_size, num_kv, head_dim), dtype)
    table = rng.permutation(num_pool)[: batch * max_pages].reshape(batch, max_pages)
    used = -(-np.asarray(lengths) // page_size)
    table = np.where(np.arange(max_pages)[None, :] < used[:, None], table, 2**30)
    return k_pages, v_pages, jnp.asarray(table, jnp.int32)

  @pytest.mark.parametrize("interpret", MODES)
  @pytest.mark.parametrize("dtype,head_dim,num_heads,num_kv,window,softcap,num_splits,page_size,"
                           "pages_per_block", CASES)
  def test_matches_reference(self, interpret, dtype, head_dim, num_heads, num_kv, window,
                             softcap, num_splits, page_size, pages_per_block):
    rng = _rng()
    batch, max_pages = 3 if interpret else 5, self._max_pages(interpret, page_size)
    q = _normal(rng, (batch, num_heads, head_dim), dtype)
    lengths = rng.integers(1, max_pages * page_size + 1, batch)
    lengths[0], lengths[-1] = 1, max_pages * page_size
    k_pages, v_pages, table = self._pool(rng, batch, max_pages, page_size, num_kv, head_dim,
                                         dtype, lengths)
    kw = dict(block_table=table, lengths=jnp.asarray(lengths, jnp.int32),
              sliding_window=window, softcap=softcap)
    _poison(q.shape, dtype)
    out = paged_decode_attention(q, k_pages, v_pages, **kw, num_splits=num_splits,
                                 pages_per_block=pages_per_block, interpret=interpret)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = paged_decode_attention_reference(q, k_pages, v_pages, **kw)
    _check(out, ref, dtype, what="paged")

  @pytest.mark.parametrize("interpret", MODES)
  def test_agrees_with_dense_decode_and_ignores_stale_rows(self, interpret):
    """Same logical cache, paged and dense, agree; NaN in the unused rows of the last page and in
    unused pages is never read."""
    rng = _rng()
    batch, page_size = 3 if interpret else 5, 16
    max_pages = self._max_pages(interpret, page_size)
    dtype, num_kv, head_dim = jnp.bfloat16, 2, 64
    lengths = rng.integers(1, max_pages * page_size + 1, batch)
    lengths[0] = 1
    k_pages, v_pages, table = self._pool(rng, batch, max_pages, page_size, num_kv, head_dim,
                                         dtype, lengths)
    # Dense view of each sequence, then NaN everywhere in the pool that is not a valid position.
    pos = np.arange(max_pages * page_size)
    safe = np.clip(np.asarray(table), 0, k_pages.shape[0] - 1)
    page_of, row_of = safe[:, pos // page_size], pos % page_size
    k_dense, v_dense = k_pages[page_of, row_of], v_pages[page_of, row_of]  # [B, S, K, H]
    valid = pos[None, :] < lengths[:, None]
    live = np.zeros(k_pages.shape[:2], bool)
    live[page_of[valid], row_of[np.nonzero(valid)[1]]] = True
    k_pages = jnp.where(live[:, :, None, None], k_pages, jnp.nan)
    v_pages = jnp.where(live[:, :, None, None], v_pages, jnp.nan)
    q = _normal(rng, (batch, 8, head_dim), dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    out = paged_decode_attention(q, k_pages, v_pages, block_table=table, lengths=lengths,
                                 num_splits=2, pages_per_block=2, interpret=interpret)
    dense = decode_attention_reference(q, k_dense, v_dense, lengths=lengths)
    _check(out, dense, dtype, what="paged vs dense")

  def test_reference_matches_numpy(self):
    rng = _rng()
    batch, max_pages, page_size = 2, 3, 4
    lengths = np.array([5, 12])
    k_pages, v_pages, table = self._pool(rng, batch, max_pages, page_size, 2, 16, jnp.float32,
                                         lengths)
    q = _normal(rng, (batch, 4, 16), jnp.float32)
    kw = dict(sliding_window=6, softcap=3.0, scale=0.4)
    ref = paged_decode_attention_reference(q, k_pages, v_pages, block_table=table,
                                           lengths=jnp.asarray(lengths), **kw)
    pos = np.arange(max_pages * page_size)
    safe = np.clip(np.asarray(table), 0, k_pages.shape[0] - 1)
    k = np.asarray(k_pages)[safe[:, pos // page_size], pos % page_size]
    v = np.asarray(v_pages)[safe[:, pos // page_size], pos % page_size]
    assert rel_err(ref, _np_decode(q, k, v, lengths, 6, 3.0, 0.4)) < 1e-6

  def test_validation_names_the_argument(self):
    q = jnp.ones((2, 8, 64), jnp.bfloat16)
    pages = jnp.ones((10, 8, 2, 64), jnp.bfloat16)
    table = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="page_size"):
      paged_decode_attention(q, pages, pages, block_table=table,
                             lengths=jnp.ones((2,), jnp.int32), interpret=True)
    pages = jnp.ones((10, 16, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_table"):
      paged_decode_attention(q, pages, pages, block_table=table[:1],
                             lengths=jnp.ones((2,), jnp.int32), interpret=True)


class TestCombineSplits:
  """The one-launch merge of split-K partials against the same math in float64 numpy."""

  # G and splits off powers of two pad the tiles; H=256 makes chunks smaller than the splits, so the
  # kernel loops over chunks (the last one overhanging for 5 and 3 splits).
  CASES = ([pytest.param(g, s, 64, id=f"g{g}-s{s}") for g in (1, 4, 6, 8) for s in (1, 3, 16)]
           + [pytest.param(6, 5, 256, id="g6-s5-h256-chunked"),
              pytest.param(8, 16, 256, id="g8-s16-h256-chunked"),
              pytest.param(16, 3, 256, id="g16-s3-h256-chunked")])
  TOL = {jnp.float32: 1e-6, jnp.bfloat16: 5e-3}  # bf16: rounding of the output only

  @staticmethod
  def _partials(rng, batch, kv_heads, splits, group, head_dim):
    """Random (o, m, l) as a decode kernel writes them; about a third of the splits are empty and
    every split of the last (b, k) is."""
    shape = (batch, kv_heads, splits, group)
    m = rng.uniform(-30.0, 30.0, shape)  # base-2 maxima far apart: the weights matter
    l = rng.uniform(1.0, 20.0, shape)  # a split's max key contributes exp2(0) = 1
    o = rng.standard_normal(shape + (head_dim,)) * l[..., None]
    empty = rng.random(shape[:3]) < 0.3
    empty[-1, -1] = True
    m[empty], l[empty], o[empty] = M_INIT, 0.0, 0.0
    return o.astype(np.float32), m.astype(np.float32), l.astype(np.float32)

  @staticmethod
  def _np_combine(o, m, l):
    o, m, l = (np.asarray(x, np.float64) for x in (o, m, l))
    w = np.exp2(m - m.max(axis=2, keepdims=True))
    l_sum = (l * w).sum(axis=2)
    out = (o * w[..., None]).sum(axis=2) / np.where(l_sum > 0, l_sum, 1.0)[..., None]
    batch, kv_heads, group, head_dim = out.shape
    return out.reshape(batch, kv_heads * group, head_dim)

  @pytest.mark.parametrize("interpret", MODES)
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
  @pytest.mark.parametrize("group,splits,head_dim", CASES)
  def test_matches_reference(self, interpret, dtype, group, splits, head_dim):
    batch, kv_heads = 2, 3
    o, m, l = self._partials(_rng(), batch, kv_heads, splits, group, head_dim)
    want = self._np_combine(o, m, l)
    _poison((batch, kv_heads * group, head_dim), dtype)
    out = combine_splits(jnp.asarray(o), jnp.asarray(m), jnp.asarray(l), dtype, interpret=interpret)
    assert out.shape == want.shape and out.dtype == dtype
    out = np.asarray(out, np.float32)
    assert not np.isnan(out).any(), "NaN in output (unwritten or bad masking)"
    assert rel_err(out, want) < self.TOL[dtype]
    assert np.all(out[-1, -group:] == 0.0)  # the (b, k) with no valid key
    ref = combine_splits_reference(jnp.asarray(o), jnp.asarray(m), jnp.asarray(l), dtype)
    assert rel_err(ref, want) < self.TOL[dtype]


@pytest.mark.skipif(ON_GPU, reason="the native GPU tests compile these for real")
@pytest.mark.parametrize("dot_dtype", [None, "float16", "ptx", "float16 ptx", "words", "words float16"])
def test_kernels_lower_to_triton_on_the_cpu(monkeypatch, dot_dtype):
  """Cross-lowering for CUDA catches Triton lowering errors (tile sizes, dtypes) without a GPU; the quantized
  caches' decode with their codes converted to q's dtype or to float16 for the dots, by a conversion or by
  inline PTX (int8)."""
  _dot_switches(monkeypatch, dot_dtype)
  jax.clear_caches()
  sds = jax.ShapeDtypeStruct
  bf16, i32 = jnp.bfloat16, jnp.int32
  cases = [
      (functools.partial(flash_attention, sliding_window=64, softcap=30.0),
       (sds((2, 100, 28, 128), bf16), sds((2, 200, 4, 128), bf16), sds((2, 200, 4, 128), bf16)),
       dict(kv_lengths=sds((2,), i32))),
      (functools.partial(flash_attention, causal=False),
       (sds((1, 64, 8, 256), bf16), sds((1, 64, 8, 256), bf16), sds((1, 64, 8, 256), bf16)),
       dict(kv_lengths=sds((1,), i32))),
      (functools.partial(decode_attention, softcap=30.0, sliding_window=100),
       (sds((4, 32, 128), bf16), sds((4, 4096, 8, 128), bf16), sds((4, 4096, 8, 128), bf16)),
       dict(lengths=sds((4,), i32))),
      (paged_decode_attention,
       (sds((3, 28, 64), bf16), sds((50, 16, 4, 64), bf16), sds((50, 16, 4, 64), bf16)),
       dict(block_table=sds((3, 10), i32), lengths=sds((3,), i32))),
      (functools.partial(weight_matmul, fmt="plain", group_size=None, interpret=False),  # one layer of a stacked weight
       (sds((1, 4096), bf16), sds((4, 4096, 1024), bf16)), dict(layer=sds((), i32))),
      (functools.partial(weight_matmul, fmt="int4", group_size=64, interpret=False),
       (sds((48, 1024), bf16), sds((2, 512, 256), jnp.uint8), sds((2, 16, 256), jnp.float32),
        sds((2, 16, 256), jnp.float32)), dict(layer=sds((), i32))),
      (functools.partial(decode_attention, layer=3),  # one layer of a stacked cache
       (sds((2, 32, 128), bf16), sds((4, 2, 1024, 8, 128), bf16), sds((4, 2, 1024, 8, 128), bf16)),
       dict(lengths=sds((2,), i32))),
      (functools.partial(decode_attention, layer=1),  # int8 codes + scales, one layer of a stacked cache
       (sds((2, 32, 128), bf16), sds((2, 2, 1024, 8, 128), jnp.int8), sds((2, 2, 1024, 8, 128), jnp.int8)),
       dict(lengths=sds((2,), i32), k_scale=sds((2, 2, 1024, 8), jnp.float32),
            v_scale=sds((2, 2, 1024, 8), jnp.float32))),
      (decode_attention,  # fp8 codes (a masked fp8 load needs a float fill value)
       (sds((2, 32, 128), bf16), sds((2, 1000, 8, 128), jnp.float8_e4m3fn), sds((2, 1000, 8, 128), jnp.float8_e4m3fn)),
       dict(lengths=sds((2,), i32), k_scale=sds((2, 1000, 8), jnp.float32), v_scale=sds((2, 1000, 8), jnp.float32))),
      (functools.partial(decode_attention_append, interpret=False),  # llama-3-8b's decode step
       (sds((1, 32, 128), bf16), sds((1, 8, 128), bf16), sds((1, 8, 128), bf16), sds((1, 128), jnp.float32),
        sds((1, 128), jnp.float32), sds((32, 1, 1024, 8, 128), bf16), sds((32, 1, 1024, 8, 128), bf16)),
       dict(layer=sds((), i32), positions=sds((1,), i32), lengths=sds((1,), i32))),
      *((functools.partial(decode_attention_append, interpret=False),  # the step over an int8 / fp8 cache
         (sds((2, 32, 128), bf16), sds((2, 8, 128), bf16), sds((2, 8, 128), bf16), sds((2, 128), jnp.float32),
          sds((2, 128), jnp.float32), sds((4, 2, 1024, 8, 128), code), sds((4, 2, 1024, 8, 128), code)),
         dict(layer=sds((), i32), positions=sds((2,), i32), lengths=sds((2,), i32),
              k_scale=sds((4, 2, 1024, 8), jnp.float32), v_scale=sds((4, 2, 1024, 8), jnp.float32)))
        for code in (jnp.int8, jnp.float8_e4m3fn)),
      (functools.partial(weight_matmuls, fmt="plain", group_size=None, interpret=False),  # q, k, v at once
       (sds((1, 4096), bf16), (((sds((4, 4096, 4096), bf16), None, None), (sds((4, 4096, 1024), bf16), None, None),
                                (sds((4, 4096, 1024), bf16), None, None)))), dict(layer=sds((), i32))),
      (functools.partial(weight_matmul, fmt="int8", group_size=None, interpret=False),
       (sds((128, 512), bf16), sds((512, 256), jnp.int8), sds((1, 256), jnp.float32)), {}),
  ]
  f32 = jnp.float32
  combine = functools.partial(combine_splits, out_dtype=bf16, interpret=False)
  cases += [  # padded G and splits, chunk loop with an overhanging last chunk
      (combine, (sds((1, 8, 33, 6, 128), f32), sds((1, 8, 33, 6), f32), sds((1, 8, 33, 6), f32)), {}),
      (combine, (sds((2, 2, 3, 16, 256), f32), sds((2, 2, 3, 16), f32), sds((2, 2, 3, 16), f32)), {}),
  ]
  for fn, args, kwargs in cases:
    if dot_dtype is not None and "k_scale" not in kwargs:
      continue  # (the switches reach only the quantized caches' decode: the rest lower once, with None)
    text = cuda_lowering(fn, *args, **kwargs)
    assert "triton" in text
    if getattr(fn, "func", fn) in (decode_attention, decode_attention_append, paged_decode_attention):
      assert text.count("custom_call @__gpu$xla.gpu.triton") == 2  # split-K kernel + combine
    if getattr(fn, "func", fn) in (decode_attention, decode_attention_append) and "k_scale" in kwargs:
      int8 = args[1].dtype == jnp.int8 or args[-1].dtype == jnp.int8
      ptx = "ptx" in (dot_dtype or "") or dot_dtype == "words float16"  # int8 codes by inline PTX when asked
      assert ("prmt.b32" in text) == (int8 and ptx)
