"""The XLA attention paths against a float64 numpy reference written from the definition.

One query per sequence takes `_decode_attention` (multiply + reduce over the cache as it lies) from
`REDUCE_MIN_BATCH` to `REDUCE_MAX_BATCH` rows, the einsum path otherwise; both must give softmax(q k^T /
sqrt(H)) v over each sequence's valid, causal (and windowed) positions.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import attention


def _reference(q, k, v, q_pos, kv_len, window):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for t in range(T):
            for n in range(N):
                kh = n // (N // K)
                s = np.arange(S)
                ok = (s <= q_pos[b, t]) & (s < kv_len[b])
                if window:
                    ok &= q_pos[b, t] - s < window
                logits = k[b, :, kh] @ q[b, t, n] / np.sqrt(H)
                p = np.where(ok, np.exp(logits - logits[ok].max()), 0.0)
                out[b, t, n] = (p / p.sum()) @ v[b, :, kh]
    return out


@pytest.mark.parametrize("batch", [1, 3, attention.REDUCE_MAX_BATCH + 1])
@pytest.mark.parametrize("window", [None, 5])
def test_one_query_attention_matches_float64(batch, window):
    assert attention._one_query(batch, 1) == (batch == 3)  # both paths are covered
    rng = np.random.default_rng(batch)
    N, K, H, S = 8, 2, 16, 24
    q = rng.standard_normal((batch, 1, N, H))
    k, v = rng.standard_normal((2, batch, S, K, H))
    kv_len = rng.integers(1, S + 1, batch)
    kv_len[-1] = S  # one full row; the others padded after their length
    q_pos = (kv_len - 1)[:, None]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    got = attention.xla_attention(f32(q), f32(k), f32(v), jnp.asarray(q_pos), jnp.asarray(kv_len), sliding_window=window)
    want = _reference(q, k, v, q_pos, kv_len, window)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-5)
