"""The Mosaic GPU prefill kernel (`pallas_kernels/flash_attention_mgpu.py`) and how `flash_attention`
chooses it.

On the CPU the kernel runs under Mosaic GPU's own interpreter, which simulates its three warpgroups,
their barriers and the TMA copies (and fails a run where a barrier phase goes unobserved); the two
tensor-core products are computed in jnp there, so the wgmma calls themselves are checked by the CUDA
lowering test here and by the native tests on a GPU. References: `flash_attention_reference` (float32)
and, for the reference itself, test_pallas_kernels.py's float64 loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_tools import cuda_lowering, rel_err
from pallas_kernels import flash_attention, flash_attention_reference
from pallas_kernels.flash_attention import on_hopper
from pallas_kernels.flash_attention_mgpu import flash_attention_mgpu, supports

ON_GPU = jax.default_backend() == "gpu"
HOPPER = ON_GPU and on_hopper()


def _inputs(seed, batch, seq_q, seq_k, num_heads, num_kv, head_dim, dtype=jnp.bfloat16):
  rng = np.random.default_rng([seed, 20261127])
  q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in
             [(batch, seq_q, num_heads, head_dim)] + [(batch, seq_k, num_kv, head_dim)] * 2)
  return q, k, v


# (causal, pingpong, query heads, kv heads): the turn-taking of the two compute warpgroups is a
# protocol of its own, run with and without it. GQA 2, 4, 1 and 8.
@pytest.mark.skipif(ON_GPU, reason="interpret mode runs in the CPU suite")
@pytest.mark.parametrize("causal,pingpong,num_heads,num_kv",
                         [(True, True, 2, 1), (False, False, 4, 1), (True, True, 2, 2), (True, False, 8, 1)],
                         ids=["causal-turns-g2", "full-noturns-g4", "causal-turns-g1", "causal-noturns-g8"])
def test_interpreted_kernel_matches_reference(causal, pingpong, num_heads, num_kv):
  """Ragged lengths (one sequence empty), queries after a prefix, T not a multiple of the tile, more
  key blocks than ring slots: every warpgroup's barrier sequence is exercised."""
  q, k, v = _inputs(1 + causal, 3, 200, 384, num_heads, num_kv, 64)
  kv_lengths = jnp.asarray([384, 0, 131], jnp.int32)
  q_offsets = jnp.asarray([184, 0, 0] if causal else [0, 0, 0], jnp.int32)
  kw = dict(kv_lengths=kv_lengths, q_offsets=q_offsets, causal=causal)
  out = flash_attention_mgpu(q, k, v, **kw, pingpong=pingpong, interpret=True)
  ref = flash_attention_reference(q, k, v, **kw)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert rel_err(out, ref) < 1e-2
  assert np.all(np.asarray(out[1], np.float32) == 0.0), "a sequence with no key must give zeros"


def test_supports_names_the_shapes_it_takes():
  q, k, _ = _inputs(3, 1, 256, 256, 2, 1, 64)
  assert supports(q, k)
  assert not supports(q, k, sliding_window=16)
  assert not supports(q, k, softcap=30.0)
  assert not supports(q.astype(jnp.float32), k.astype(jnp.float32))
  assert not supports(q, k[:, :200])  # key length not a multiple of the key block
  q256, k256, _ = _inputs(3, 1, 256, 256, 2, 1, 256)
  assert not supports(q256, k256)


def test_backend_choice_errors_name_the_problem():
  q, k, v = _inputs(4, 1, 256, 256, 2, 1, 64)
  lengths = jnp.full((1,), 256, jnp.int32)
  with pytest.raises(ValueError, match="unknown flash attention backend 'cutlass'"):
    flash_attention(q, k, v, kv_lengths=lengths, backend="cutlass", interpret=True)
  with pytest.raises(ValueError, match="window 16"):
    flash_attention(q, k, v, kv_lengths=lengths, sliding_window=16, backend="mosaic")
  with pytest.raises(ValueError, match="no interpret mode"):
    flash_attention(q, k, v, kv_lengths=lengths, backend="mosaic", interpret=True)
  with pytest.raises(ValueError, match="multiples of 64"):
    flash_attention_mgpu(q, k, v, kv_lengths=lengths, block_q=48, interpret=True)


def test_mosaic_backend_on_a_gpu_other_than_hopper_is_refused(monkeypatch):
  import importlib

  module = importlib.import_module("pallas_kernels.flash_attention")  # the package exports the function
  monkeypatch.setattr(module.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(module, "on_hopper", lambda: False)
  q, k, v = _inputs(8, 1, 256, 256, 2, 1, 64)
  with pytest.raises(ValueError, match="needs a Hopper GPU"):
    flash_attention(q, k, v, kv_lengths=jnp.full((1,), 256, jnp.int32), backend="mosaic")


def test_mosaic_backend_lowers_for_cuda():
  """The whole kernel, wgmma and TMA included, lowers to a Mosaic GPU call (caught on the CPU)."""
  q, k, v = _inputs(5, 1, 256, 256, 4, 1, 128)
  lengths = jnp.full((1,), 256, jnp.int32)
  text = cuda_lowering(lambda q, k, v, n: flash_attention(q, k, v, kv_lengths=n, backend="mosaic"),
                       q, k, v, lengths)
  assert "mosaic_gpu" in text and "flash_attention_mgpu" in text
  text = cuda_lowering(lambda q, k, v, n: flash_attention(q, k, v, kv_lengths=n, backend="triton"),
                       q, k, v, lengths)
  assert "flash_attention_mgpu" not in text


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("head_dim,num_heads,num_kv,causal", [(128, 8, 2, True), (64, 4, 4, True), (128, 8, 1, False)])
def test_native_kernel_matches_reference(head_dim, num_heads, num_kv, causal):
  q, k, v = _inputs(6 + head_dim, 3, 320, 512, num_heads, num_kv, head_dim)
  kv_lengths = jnp.asarray([512, 259, 0], jnp.int32)
  q_offsets = jnp.asarray([192, 0, 0] if causal else [0, 0, 0], jnp.int32)
  kw = dict(kv_lengths=kv_lengths, q_offsets=q_offsets, causal=causal)
  ref = flash_attention_reference(q, k, v, **kw)
  for pingpong in (True, False):
    out = flash_attention_mgpu(q, k, v, **kw, pingpong=pingpong)
    err = rel_err(out, ref)
    assert err < 1e-2, f"pingpong={pingpong}: relative error {err:.2e}"
    assert np.all(np.asarray(out[2], np.float32) == 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
def test_auto_takes_mosaic_on_hopper_and_triton_where_it_does_not_apply():
  q, k, v = _inputs(7, 1, 256, 256, 4, 1, 128)
  lengths = jnp.full((1,), 256, jnp.int32)

  def lowered(**kw):
    return jax.jit(lambda q, k, v, n: flash_attention(q, k, v, kv_lengths=n, **kw)).lower(q, k, v, lengths).as_text()

  assert "flash_attention_mgpu" in lowered()
  assert "flash_attention_mgpu" not in lowered(sliding_window=64)
  assert "flash_attention_mgpu" not in lowered(block_q=32)  # a Triton setting asks for Triton
  out = flash_attention(q, k, v, kv_lengths=lengths)
  assert rel_err(out, flash_attention_reference(q, k, v, kv_lengths=lengths)) < 1e-2


MODEL = dict(vocab_size=1000, dim=256, ffn_dim=512, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=128,
             max_seq_len=512)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
def test_model_prefill_on_the_mosaic_kernel_matches_xla():
  """impl="pallas" prefill of a prompt >= MOSAIC_MIN_QUERIES tokens into a cache of a multiple of 128
  slots runs the Mosaic kernel (a 40-token prompt the Triton one), with the XLA path's logits."""
  import jaxinfer as ji
  from jaxinfer.generate import _prefill

  config = ji.ModelConfig(**MODEL)
  params = ji.init_params(config, 0, jnp.bfloat16)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, config.vocab_size, (2, 160)).astype(np.int32)
  lengths = np.array([160, 97], np.int32)

  def logits(impl):
    cache = ji.init_cache(config, 2, 256, jnp.bfloat16)
    out, _ = ji.prefill(params, cache, tokens, lengths, config=config, impl=impl)
    return np.asarray(out, np.float32)

  ref, got = logits("xla"), logits("pallas")
  assert rel_err(got, ref) < 2e-2

  def lowered(prompt_len):
    cache = ji.init_cache(config, 2, 256, jnp.bfloat16)
    step = jax.jit(lambda p, c, t, n: _prefill(p, c, t, n, config=config, impl="pallas"))
    return step.lower(params, cache, tokens[:, :prompt_len], jnp.asarray(lengths).clip(max=prompt_len)).as_text()

  assert "flash_attention_mgpu" in lowered(160)
  assert "flash_attention_mgpu" not in lowered(40)
