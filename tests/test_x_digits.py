"""x's fixed point for the fragment kernel's 8-bit products: the kernel against its jnp reference (interpret
mode on the CPU, natively on the GPU), and what the digits mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_tools import cuda_lowering
from pallas_kernels.x_digits import X_MAX, x_digits, x_digits_merged, x_digits_reference


def _x(m, k, seed=0):
    x = jax.random.normal(jax.random.key(seed), (m, k), jnp.float32) * 3
    return x.at[0, 5].set(-40.0).astype(jnp.bfloat16)  # one outlier: the row's scale follows it


@pytest.mark.parametrize("m,rows,k,group,width", [(1, 8, 4096, 128, 8), (5, 8, 14336, 128, 32),
                                                   (16, 16, 2048, 32, 16), (20, 32, 1024, 256, 32)])
def test_x_digits_matches_the_reference_and_rounds_within_its_bound(m, rows, k, group, width):
    x = _x(m, k, m)
    d, inv_q, sums = x_digits(x, rows=rows, group_size=group, width=width, interpret=True)
    dr, inv_r, sums_r = x_digits_reference(x, rows=rows, group_size=group)
    np.testing.assert_array_equal(np.asarray(d), np.asarray(dr))
    np.testing.assert_array_equal(np.asarray(inv_q), np.asarray(inv_r))
    np.testing.assert_array_equal(np.asarray(sums)[:, :rows], np.asarray(sums_r))
    t = np.asarray(d[:rows], np.int64) * 256 + np.asarray(d[rows:], np.int64)
    assert np.abs(t).max() <= X_MAX and np.all(t[m:] == 0)  # padded rows are zeros
    np.testing.assert_array_equal(np.asarray(sums)[:, :rows], t.reshape(rows, -1, group).sum(-1).T)
    xf = np.asarray(x, np.float64)
    err = np.abs(t[:m] * np.asarray(inv_q, np.float64)[:m, None] - xf)
    assert np.all(err <= 0.502 * np.abs(xf).max(axis=1, keepdims=True) / X_MAX)


@pytest.mark.parametrize("m,rows,k,group", [(16, 16, 14336, 128), (1, 8, 4096, 64)])
def test_x_digits_lowers_to_triton(m, rows, k, group):
    text = cuda_lowering(lambda x: x_digits(x, rows=rows, group_size=group, interpret=False),
                         jax.ShapeDtypeStruct((m, k), jnp.bfloat16))
    assert "triton" in text.lower()


@pytest.mark.parametrize("batch,kv_heads,splits,group,head_dim,rows", [(5, 8, 3, 4, 128, 8), (16, 2, 1, 2, 64, 16)])
def test_x_digits_of_attention_partials_are_those_of_the_merged_output(batch, kv_heads, splits, group, head_dim,
                                                                       rows):
    """`x_digits_merged` merges a split-K decode's partials as `combine_splits` does (an empty split weighs
    nothing) and prepares the result: each row rebuilt within the merge's bfloat16 rounding plus the fixed
    point's (interpret mode may keep the merge in float32: XLA elides the bfloat16 round trip), every |t| within
    X_MAX (the row's maximum and its digits come from two merges), sums those of the digits."""
    from pallas_kernels.common import M_INIT, combine_splits_reference

    ks = jax.random.split(jax.random.key(batch), 3)
    o = jax.random.normal(ks[0], (batch, kv_heads, splits, group, head_dim))
    m = 3 * jax.random.normal(ks[1], (batch, kv_heads, splits, group))
    l = 0.5 + jax.random.uniform(ks[2], (batch, kv_heads, splits, group))
    if splits > 2:  # the last split empty
        o, m, l = o.at[:, :, -1].set(0.0), m.at[:, :, -1].set(M_INIT), l.at[:, :, -1].set(0.0)
    d, inv_q, sums = x_digits_merged(o, m, l, jnp.bfloat16, rows=rows, group_size=128, interpret=True)
    want = np.asarray(combine_splits_reference(o, m, l, jnp.bfloat16).reshape(batch, -1), np.float64)
    t = np.asarray(d[:rows], np.int64) * 256 + np.asarray(d[rows:], np.int64)
    assert np.abs(t).max() <= X_MAX and np.all(t[batch:] == 0)
    err = np.abs(t[:batch] * np.asarray(inv_q, np.float64)[:batch, None] - want)
    assert np.all(err <= 2 ** -8 * np.abs(want) + 0.502 * np.abs(want).max(axis=1, keepdims=True) / X_MAX)
    np.testing.assert_array_equal(np.asarray(sums)[:, :rows], t.reshape(rows, -1, 128).sum(-1).T)
    with pytest.raises(ValueError, match="whole groups"):
        x_digits_merged(o, m, l, jnp.bfloat16, rows=rows, group_size=1024)


def test_x_digits_merged_lowers_to_triton():
    o = jax.ShapeDtypeStruct((16, 8, 2, 4, 128), jnp.float32)
    m = jax.ShapeDtypeStruct((16, 8, 2, 4), jnp.float32)
    text = cuda_lowering(lambda o, m, l: x_digits_merged(o, m, l, jnp.bfloat16, rows=16, group_size=128,
                                                         interpret=False), o, m, m)
    assert "triton" in text.lower()


def test_x_digits_errors_name_the_problem():
    with pytest.raises(ValueError, match="rows"):
        x_digits(jnp.ones((9, 256)), rows=8, group_size=128)
    with pytest.raises(ValueError, match="multiple of the group"):
        x_digits(jnp.ones((1, 96)), rows=8, group_size=64)


@pytest.mark.gpu
def test_x_digits_on_the_gpu_matches_the_reference():
    """Natively: the digits may differ from XLA's by one unit where x q rounds at a half (Triton's division);
    each row still reconstructs x within the bound."""
    x = _x(16, 14336)
    d, inv_q, sums = x_digits(x, rows=16, group_size=128)
    dr, inv_r, _ = x_digits_reference(x, rows=16, group_size=128)
    t = np.asarray(d[:16], np.int64) * 256 + np.asarray(d[16:], np.int64)
    tr = np.asarray(dr[:16], np.int64) * 256 + np.asarray(dr[16:], np.int64)
    assert np.abs(t - tr).max() <= 1
    np.testing.assert_allclose(np.asarray(inv_q), np.asarray(inv_r), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(sums), t.reshape(16, -1, 128).sum(-1).T)
