"""The fused rotary-embedding + cache-write kernel (`pallas_kernels.rope_write`) in interpret mode, and the
model's use of it for one-token decode steps.

The kernel must rotate q and k as a float64 rotation does (to the dtype's rounding), store the rotated key
and the value at each sequence's position of the chosen layer and touch nothing else (positions outside the
cache write nothing), reject bad input by name, and lower to Triton; the model must run it once per layer
and give the logits and cache of the XLA ops it replaces, or, where the Pallas decode attention runs too,
do the same work inside that launch (`decode_attention_append`, tested against this kernel's reference in
test_pallas_kernels.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from jaxinfer import attention, ops
from kernel_tools import cuda_lowering, equations, pallas_call_names, rel_err
from pallas_kernels.rope_write import rope_write, rope_write_reference


def _inputs(rng, L, B, S, K, G, H, dtype):
    q = jnp.asarray(rng.standard_normal((B, K * G, H)), dtype)
    k = jnp.asarray(rng.standard_normal((B, K, H)), dtype)
    v = jnp.asarray(rng.standard_normal((B, K, H)), dtype)
    angles = rng.uniform(0, 100, (B, H // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    kc = jnp.asarray(rng.standard_normal((L, B, S, K, H)), dtype)
    vc = jnp.asarray(rng.standard_normal((L, B, S, K, H)), dtype)
    return q, k, v, jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32), kc, vc


def _rotate64(x, cos, sin):
    """x [B, heads, H] rotated in float64: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.asarray(cos, np.float64)[:, None] + rotated * np.asarray(sin, np.float64)[:, None]


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_rotates_and_writes_like_float64(group, dtype):
    rng = np.random.default_rng(group)
    L, B, S, K, H, layer = 3, 4, 16, 2, 32, 1
    q, k, v, cos, sin, kc, vc = _inputs(rng, L, B, S, K, group, H, dtype)
    positions = jnp.asarray([5, S, 0, -1], jnp.int32)  # S and -1: outside the cache, nothing written
    q_rot, k_out, v_out = rope_write(q, k, v, cos, sin, kc, vc, layer=layer, positions=positions, interpret=True)
    tol = 1e-6 if dtype == jnp.float32 else 2.0**-7
    want_q = _rotate64(q, cos, sin)
    assert q_rot.dtype == dtype and np.abs(np.asarray(q_rot, np.float64) - want_q).max() <= tol * np.abs(want_q).max()
    want_k = _rotate64(k, cos, sin)
    kc_np, vc_np = np.array(kc), np.array(vc)
    k_np, v_np = np.asarray(k_out), np.asarray(v_out)
    for b, p in enumerate(np.asarray(positions)):
        if 0 <= p < S:
            got = np.asarray(k_np[layer, b, p], np.float64)
            assert np.abs(got - want_k[b]).max() <= tol * np.abs(want_k[b]).max()
            assert (v_np[layer, b, p] == np.asarray(v[b])).all()
            kc_np[layer, b, p], vc_np[layer, b, p] = k_np[layer, b, p], v_np[layer, b, p]
    assert (k_np == kc_np).all() and (v_np == vc_np).all()  # nothing else touched


def test_equals_the_jnp_reference():
    rng = np.random.default_rng(3)
    args = _inputs(rng, 2, 3, 8, 2, 4, 64, jnp.bfloat16)
    positions = jnp.asarray([7, 0, 3], jnp.int32)
    got = rope_write(*args, layer=jnp.int32(1), positions=positions, interpret=True)
    want = rope_write_reference(*args, layer=1, positions=positions)
    for a, b in zip(got, want):
        assert a.shape == b.shape and (np.asarray(a, np.float32) == np.asarray(b, np.float32)).all()


def test_bad_inputs_are_named():
    rng = np.random.default_rng(0)
    q, k, v, cos, sin, kc, vc = _inputs(rng, 2, 2, 8, 2, 4, 32, jnp.bfloat16)
    pos = jnp.zeros((2,), jnp.int32)
    call = functools.partial(rope_write, layer=0, positions=pos, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        call(q[:, :6], k, v, cos, sin, kc, vc)  # 3 query heads per kv head
    with pytest.raises(ValueError, match="cos must be float32"):
        call(q, k, v, cos.astype(jnp.bfloat16), sin, kc, vc)
    with pytest.raises(ValueError, match="caches must be"):
        call(q, k, v, cos, sin, kc[:, :1], vc[:, :1])
    with pytest.raises(ValueError, match="floating dtype"):
        call(q, k, v, cos, sin, kc.astype(jnp.int8), vc.astype(jnp.int8))
    with pytest.raises(ValueError, match="positions must be integer"):
        rope_write(q, k, v, cos, sin, kc, vc, layer=0, positions=pos.astype(jnp.float32), interpret=True)


def test_lowers_to_triton_for_llama_shapes():
    """The Triton lowering (no GPU needed on jaxlib 0.10) of llama-3-8b's call: 32 q heads, 8 kv heads."""
    sds, bf16, f32, i32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32, jnp.int32
    cache = sds((32, 1, 1024, 8, 128), bf16)
    args = (sds((1, 32, 128), bf16), sds((1, 8, 128), bf16), sds((1, 8, 128), bf16), sds((1, 128), f32),
            sds((1, 128), f32), cache, cache)
    fn = functools.partial(rope_write, interpret=False)
    assert "triton" in cuda_lowering(fn, *args, layer=sds((), i32), positions=sds((1,), i32))


CONFIG = ji.ModelConfig(vocab_size=96, dim=64, ffn_dim=128, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=32)


def test_model_decode_step_uses_one_launch_per_layer(monkeypatch):
    """A one-token step (one sequence continuing, one padded) with the kernel path on (interpret mode
    standing in for the GPU): one `rope_write` per layer, and the logits and cache of the XLA ops."""
    params = ji.init_params(CONFIG, jax.random.key(2, impl="rbg"), jnp.bfloat16)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 5)))
    cache = ji.init_cache(CONFIG, 2, 8, jnp.bfloat16)
    _, cache = ji.forward(params, cache, tokens, config=CONFIG)
    step = functools.partial(ji.forward, config=CONFIG, impl="auto")
    lengths = jnp.asarray([1, 0], jnp.int32)
    want_logits, want_cache = jax.jit(step)(params, cache, tokens[:, -1:], lengths)
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    monkeypatch.setattr(ops, "ADD_NORM_KERNEL", False)  # the norms as the XLA ops too (test_add_rms_norm.py)
    monkeypatch.setattr(attention, "APPEND_KERNEL", False)  # the rotation apart from the attention (below)
    step = functools.partial(ji.forward, config=CONFIG, impl="auto")  # a new function: traced afresh
    jaxpr = jax.make_jaxpr(step)(params, cache, tokens[:, -1:], lengths)
    assert pallas_call_names(jaxpr.jaxpr) == ["rope_write"]  # inside the layer scan's body: once per layer
    got_logits, got_cache = jax.jit(step)(params, cache, tokens[:, -1:], lengths)
    np.testing.assert_array_equal(np.asarray(got_logits), np.asarray(want_logits))
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _decode_step_both_ways(monkeypatch, cache_dtype, seed):
    """A one-token step (one sequence continuing, one padded) after a prefill, by the XLA path and with the GPU's
    kernels on (interpret mode standing in): (jaxpr of the kernel step, (logits, cache) of each)."""
    params = ji.init_params(CONFIG, jax.random.key(seed, impl="rbg"), jnp.bfloat16)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (2, 6)))
    cache = ji.init_cache(CONFIG, 2, 8, cache_dtype)
    _, cache = ji.forward(params, cache, tokens[:, :5], jnp.asarray([5, 3], jnp.int32), config=CONFIG)
    args = (params, cache, tokens[:, -1:], jnp.asarray([1, 0], jnp.int32))  # the second sequence padded
    want = jax.jit(functools.partial(ji.forward, config=CONFIG, impl="xla"))(*args)
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    monkeypatch.setattr(ops, "ADD_NORM_KERNEL", False)
    step = functools.partial(ji.forward, config=CONFIG, impl="auto")
    return jax.make_jaxpr(step)(*args), jax.jit(step)(*args), want


def test_model_decode_step_attends_in_the_same_launch(monkeypatch):
    """With the decode attention kernel on as well (interpret mode for the GPU's kernels), the rotation and the
    write ride in its launch (`decode_attention_append`: the split kernel and the combine, once per layer): the
    XLA ops' first cache layer exactly (later layers see attention outputs rounded differently), the rest and
    the logits to bf16 attention's rounding."""
    jaxpr, (got_logits, got_cache), (want_logits, want_cache) = _decode_step_both_ways(monkeypatch, jnp.bfloat16, 3)
    assert pallas_call_names(jaxpr.jaxpr) == ["decode_attention", "combine_splits"]
    assert rel_err(got_logits, want_logits) < 1e-2
    np.testing.assert_array_equal(np.asarray(got_cache.lengths), np.asarray(want_cache.lengths))
    for got, want in ((got_cache.k, want_cache.k), (got_cache.v, want_cache.v)):
        np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))
        assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("cache_dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_model_decode_step_on_a_quantized_cache_attends_in_the_same_launch(monkeypatch, cache_dtype):
    """An int8 / fp8 cache takes the same launch (interpret mode for the GPU's kernels), which quantizes the new
    key and value as the cache's `write` does: the XLA path's first cache layer to one code where x / scale
    sits at a tie (the two divisions may differ in the last bit), its scales, and the logits to bf16
    attention's rounding."""
    jaxpr, (got_logits, got_cache), (want_logits, want_cache) = _decode_step_both_ways(monkeypatch, cache_dtype, 4)
    assert pallas_call_names(jaxpr.jaxpr) == ["decode_attention", "combine_splits"]  # no XLA write either
    assert not any(e.primitive.name == "scatter" for e in equations(jaxpr.jaxpr))
    assert rel_err(got_logits, want_logits) < 1e-2
    for got, want in ((got_cache.k, want_cache.k), (got_cache.v, want_cache.v)):
        got, want = np.asarray(got[0], np.float32), np.asarray(want[0], np.float32)
        assert (np.abs(got - want) <= np.maximum(1.0, np.abs(want) / 8)).all()
    for got, want in ((got_cache.k_scale, want_cache.k_scale), (got_cache.v_scale, want_cache.v_scale)):
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6)
        assert rel_err(got, want) < 1e-2


@pytest.mark.gpu
def test_native_kernel_equals_the_reference():
    """Compiled for the GPU with llama-3-8b's heads, inside a jit that donates the caches."""
    rng = np.random.default_rng(5)
    args = _inputs(rng, 4, 3, 64, 8, 4, 128, jnp.bfloat16)
    positions = jnp.asarray([63, 0, 64], jnp.int32)
    want = rope_write_reference(*args, layer=2, positions=positions)
    call = jax.jit(functools.partial(rope_write, positions=positions, interpret=False), donate_argnums=(5, 6))
    got = call(*args, layer=jnp.int32(2))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
