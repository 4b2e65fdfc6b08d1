"""Quantized KV cache: int8 / fp8 (e4m3) keys and values with a scale per token per kv head.

Stated tolerances (relative Frobenius error of the attention output against float64 attention over the
unquantized keys and values): int8 <= 1 %, fp8 <= 5 %; over the dequantized cache the XLA path is exact
to float32 rounding. References are numpy float64, written from the definitions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from jaxinfer.attention import attend
from jaxinfer.cache import QuantDenseView, QuantKVCache, quantize_kv

CONFIG = ji.ModelConfig(vocab_size=96, dim=64, ffn_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32)
FORMATS = [(jnp.int8, 0.01), (jnp.float8_e4m3fn, 0.05)]


def _np_attention(q, k, v, q_pos, kv_len, window=None):
    """float64 causal GQA attention: q [B,T,N,H], k/v [B,S,K,H]."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    out = np.zeros(q.shape)
    for b in range(B):
        for t in range(T):
            for n in range(N):
                kk = n // (N // K)
                allowed = (np.arange(S) <= q_pos[b, t]) & (np.arange(S) < kv_len[b])
                if window:
                    allowed &= q_pos[b, t] - np.arange(S) < window
                s = k[b, allowed, kk] @ q[b, t, n] / np.sqrt(H)
                p = np.exp(s - s.max())
                out[b, t, n] = (p / p.sum()) @ v[b, allowed, kk]
    return out


@pytest.mark.parametrize("dtype,_", FORMATS)
def test_quantize_kv_round_trip(dtype, _):
    x = np.random.default_rng(0).standard_normal((3, 5, 2, 32)) * np.exp(np.random.default_rng(1).standard_normal((3, 5, 2, 1)))
    codes, scale = quantize_kv(jnp.asarray(x, jnp.float32), dtype)
    assert codes.dtype == dtype and scale.shape == (3, 5, 2) and scale.dtype == jnp.float32
    s = np.asarray(scale, np.float64)[..., None]
    top = 127 if dtype == jnp.int8 else 448
    np.testing.assert_allclose(s[..., 0], np.abs(x).max(-1) / top, rtol=1e-6)
    err = np.abs(np.asarray(codes, np.float64) * s - x)
    bound = s / 2 if dtype == jnp.int8 else np.abs(x) * 2.0**-4 + s * 2.0**-10
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()


@pytest.mark.parametrize("dtype,tol", FORMATS)
@pytest.mark.parametrize("T", [1, 6])
def test_attention_over_quantized_cache(dtype, tol, T):
    rng = np.random.default_rng(T)
    B, S, N, K, H = 2, 24, 4, 2, 32
    q = rng.standard_normal((B, T, N, H))
    k, v = rng.standard_normal((B, S, K, H)), rng.standard_normal((B, S, K, H))
    kv_len = np.array([S, 15])
    q_pos = kv_len[:, None] - T + np.arange(T)[None]
    kc, ks = quantize_kv(jnp.asarray(k, jnp.float32), dtype)
    vc, vs = quantize_kv(jnp.asarray(v, jnp.float32), dtype)
    view = QuantDenseView(kc, vc, ks, vs)
    got = np.asarray(attend(jnp.asarray(q, jnp.float32), view, jnp.asarray(q_pos), jnp.asarray(kv_len), impl="auto"),
                     np.float64)
    # exact (to float32) against attention over the dequantized cache
    kd = np.asarray(kc, np.float64) * np.asarray(ks, np.float64)[..., None]
    vd = np.asarray(vc, np.float64) * np.asarray(vs, np.float64)[..., None]
    np.testing.assert_allclose(got, _np_attention(q, kd, vd, q_pos, kv_len), rtol=1e-4, atol=1e-5)
    # within the stated tolerance of attention over the float keys and values
    ref = _np_attention(q, k, v, q_pos, kv_len)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < tol, rel
    assert rel > tol / 1000  # it did quantize


@pytest.mark.parametrize("dtype,tol", FORMATS)
def test_model_with_quantized_cache(dtype, tol):
    """Prefill then decode through the model with an int8 / fp8 cache: logits close to a float cache;
    padded tokens are not written; generate takes cache_dtype."""
    params = ji.init_params(CONFIG, jax.random.key(0, impl="rbg"), jnp.float32)
    tokens = jnp.asarray([[5, 9, 2, 7, 1, 3], [4, 8, 6, 0, 0, 0]])
    lengths = jnp.asarray([6, 3])

    def run(cache):
        step = jax.jit(lambda c, t, l: ji.forward(params, c, t, l, config=CONFIG))
        logits1, cache = step(cache, tokens, lengths)
        logits2, cache = step(cache, jnp.asarray([[11], [12]]), jnp.asarray([1, 1]))
        return np.concatenate([np.asarray(logits1[0]), np.asarray(logits1[1, :3]), np.asarray(logits2[:, 0])]), cache

    ref, _ = run(ji.init_cache(CONFIG, 2, 16, jnp.float32))
    got, cache = run(ji.init_cache(CONFIG, 2, 16, dtype))
    assert isinstance(cache, QuantKVCache) and cache.k.dtype == dtype
    np.testing.assert_array_equal(np.asarray(cache.lengths), [7, 4])
    # sequence 1 had 3 prompt tokens + 1 decoded: position 4 onward never written (codes 0, scales 1)
    assert not np.asarray(cache.k[:, 1, 4:], np.float32).any() and (np.asarray(cache.k_scale[:, 1, 4:]) == 1).all()
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 1e-6 < rel < tol, rel
    out = ji.generate(ji.Model(config=CONFIG, params=params), [[1, 2, 3]], max_new_tokens=4, cache_dtype=dtype)
    assert len(out.token_ids[0]) == 4
