"""The residual add + RMSNorm kernel (`pallas_kernels.add_rms_norm`) in interpret mode, and the model's use
of it in decode steps.

The kernel must give the sum and the norm a float64 computation gives (to the dtype's rounding) and equal
its jnp reference, with the norm weight plain or one layer of a stack; reject bad input by name; lower to
Triton. The model must run it twice per layer where
`ops.residual_norm_fuses` (the GPU's decode path, interpret mode standing in), leave the quantized row
kernel's own fusions alone, and give the logits of the XLA ops it replaces.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from jaxinfer import ops
from kernel_tools import cuda_lowering, pallas_call_names, rel_err
from pallas_kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference

EPS = 1e-5


def _inputs(seed, rows, width, dtype, layers=3):
    rng = np.random.default_rng([seed, 20261127])
    x = jnp.asarray(4 * rng.standard_normal((rows, 1, width)), dtype)
    h = jnp.asarray(rng.standard_normal((rows, 1, width)), jnp.float32)
    w = jnp.asarray(1 + 0.2 * rng.standard_normal((layers, width)), dtype)
    return x, h, w


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_adds_and_normalises_like_float64(dtype):
    x, h, w = _inputs(1, 5, 256, dtype)
    got_sum, got_norm = add_rms_norm(x, h, w, 2, eps=EPS, interpret=True)
    s64 = np.asarray(x, np.float64) + np.asarray(h, np.float64)
    n64 = s64 / np.sqrt(np.mean(s64 * s64, axis=-1, keepdims=True) + EPS) * np.asarray(w[2], np.float64)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    assert got_sum.dtype == dtype and got_norm.dtype == dtype
    assert rel_err(got_sum, s64) < tol and rel_err(got_norm, n64) < tol
    want_sum, want_norm = add_rms_norm_reference(x, h, w, 2, eps=EPS)  # same arithmetic (rsqrt may differ)
    for got, want in ((got_sum, want_sum), (got_norm, want_norm)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=1e-5 if dtype == jnp.float32 else 1e-2, atol=1e-5)


def test_a_plain_weight_and_the_layer_index():
    x, h, w = _inputs(2, 3, 128, jnp.bfloat16)
    for layer in range(3):
        a = add_rms_norm(x, h, w, jnp.int32(layer), eps=EPS, interpret=True)[1]
        b = add_rms_norm(x, h, w[layer], eps=EPS, interpret=True)[1]
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert not np.array_equal(np.asarray(add_rms_norm(x, h, w, 0, eps=EPS, interpret=True)[1], np.float32),
                              np.asarray(add_rms_norm(x, h, w, 1, eps=EPS, interpret=True)[1], np.float32))


def test_bad_inputs_are_named():
    x, h, w = _inputs(3, 2, 96, jnp.bfloat16)
    with pytest.raises(ValueError, match="power-of-two width"):
        add_rms_norm(x, h, w, eps=EPS, interpret=True)
    x, h, w = _inputs(3, 2, 128, jnp.bfloat16)
    with pytest.raises(ValueError, match="h must be x's shape"):
        add_rms_norm(x, h[:1], w, eps=EPS, interpret=True)
    with pytest.raises(ValueError, match=r"weight must be \[128\] or \[L, 128\]"):
        add_rms_norm(x, h, w[:, :64], eps=EPS, interpret=True)


def test_matmul_norm_needs_the_residual():
    x, h, w = _inputs(5, 1, 64, jnp.float32)
    with pytest.raises(ValueError, match="norm= normalises residual \\+ product, so it needs residual="):
        ops.matmul("btd,de->bte", x, jnp.ones((64, 64)), norm=(w[0], EPS))
    got_x, got_norm = ops.matmul("btd,de->bte", x, jnp.eye(64), residual=x, norm=(w[0], EPS))
    np.testing.assert_allclose(np.asarray(got_x), 2 * np.asarray(x), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_norm), np.asarray(ops.rms_norm(2 * x, w[0], EPS)), rtol=1e-5)


def test_lowers_to_triton_for_llama_shapes():
    x, h, w = _inputs(4, 1, 4096, jnp.bfloat16, layers=32)
    text = cuda_lowering(functools.partial(add_rms_norm, eps=EPS, interpret=False), x, h, w, jnp.int32(7))
    assert "add_rms_norm" in text


CONFIG = ji.ModelConfig(vocab_size=96, dim=64, ffn_dim=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)


def _step(params, cache, tokens):
    return jax.jit(functools.partial(ji.forward, config=CONFIG))(params, cache, tokens)


@pytest.mark.parametrize("layout,batch", [("stored", 2), ("contract-last", 1)])
def test_model_decode_step_fuses_each_residual_add_with_its_norm(monkeypatch, layout, batch):
    params = ji.init_params(CONFIG, jax.random.key(4, impl="rbg"), jnp.bfloat16)
    if layout == "contract-last":
        params = ji.contract_last(params)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, CONFIG.vocab_size, (batch, 6)))
    cache = ji.init_cache(CONFIG, batch, 8, jnp.bfloat16)
    _, cache = ji.forward(params, cache, tokens[:, :5], config=CONFIG)
    want, _ = _step(params, cache, tokens[:, 5:])
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    jaxpr = jax.make_jaxpr(functools.partial(ji.forward, config=CONFIG))(params, cache, tokens[:, 5:])
    names = [n for n in pallas_call_names(jaxpr.jaxpr) if n == "add_rms_norm"]
    assert names == ["add_rms_norm"] * 2, names  # in the layer scan's body: after attention and after the MLP
    got, _ = _step(params, cache, tokens[:, 5:])
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max(), np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_quantized_rows_keep_the_row_kernels_fusions(monkeypatch):
    """One row on the fused row kernel adds the residual in its epilogue and normalises in the next
    product's prologue: no add_rms_norm launches there."""
    params = ji.quantize(ji.contract_last(ji.init_params(CONFIG, jax.random.key(5, impl="rbg"), jnp.bfloat16)),
                         "int8")
    cache = ji.init_cache(CONFIG, 1, 8, jnp.bfloat16)
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    jaxpr = jax.make_jaxpr(functools.partial(ji.forward, config=CONFIG))(params, cache, jnp.ones((1, 1), jnp.int32))
    names = pallas_call_names(jaxpr.jaxpr)
    assert "add_rms_norm" not in names and any(n.startswith("row_matmul") for n in names), names


@pytest.mark.gpu
@pytest.mark.parametrize("warps", [4, 16])
def test_native_kernel_equals_the_reference(monkeypatch, warps):
    from pallas_kernels import add_rms_norm as module

    monkeypatch.setattr(module, "_WARPS", warps)
    jax.clear_caches()  # the warp count is read when the kernel is traced
    x, h, w = _inputs(6, 16, 4096, jnp.bfloat16, layers=32)
    got = jax.jit(functools.partial(add_rms_norm, eps=EPS, interpret=False))(x, h, w, jnp.int32(9))
    want = add_rms_norm_reference(x, h, w, 9, eps=EPS)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))
    assert rel_err(got[1], want[1]) < 1e-2


@pytest.mark.parametrize("rows,padded,group,width", [(5, 8, 128, 32), (16, 16, 64, 16)])
def test_the_norm_written_as_the_fragment_kernels_x(rows, padded, group, width):
    """With `digits`, the launch also writes the normed rows' digits, 1 / q and group sums exactly as
    `x_digits` makes them from the normed output (rows past M left to the caller)."""
    from pallas_kernels.x_digits import x_digits_reference

    x, h, w = _inputs(3, rows, 1024, jnp.bfloat16)
    s, normed, (d, inv_q, sums) = add_rms_norm(x, h, w, 1, eps=EPS, interpret=True, digits=(padded, group, width))
    s_plain, normed_plain = add_rms_norm(x, h, w, 1, eps=EPS, interpret=True)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_plain))
    np.testing.assert_array_equal(np.asarray(normed), np.asarray(normed_plain))
    dr, inv_r, sums_r = x_digits_reference(normed.reshape(rows, -1), rows=padded, group_size=group)
    np.testing.assert_array_equal(np.asarray(d[:rows]), np.asarray(dr[:rows]))
    np.testing.assert_array_equal(np.asarray(d[padded:padded + rows]), np.asarray(dr[padded:padded + rows]))
    np.testing.assert_array_equal(np.asarray(inv_q[:rows]), np.asarray(inv_r[:rows]))
    np.testing.assert_array_equal(np.asarray(sums)[:, :rows], np.asarray(sums_r)[:, :rows])
    with pytest.raises(ValueError, match="do not fit"):
        add_rms_norm(x, h, w, 1, eps=EPS, interpret=True, digits=(4, group, width))


def test_the_norm_with_digits_lowers_to_triton():
    x = jax.ShapeDtypeStruct((16, 1, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4, 4096), jnp.bfloat16)
    text = cuda_lowering(lambda x, h, w: add_rms_norm(x, h, w, 2, eps=EPS, interpret=False, digits=(16, 128, 16)),
                         x, x, w)
    assert "triton" in text.lower()


@pytest.mark.gpu
def test_the_norm_written_as_digits_on_the_gpu():
    """Natively, the (row, chunk) programs' digits are those `x_digits` makes from the normed output, up to one
    unit of t where x q rounds at a half (Triton's division in either launch); 1 / q within float32's rounding."""
    from pallas_kernels.x_digits import x_digits

    x, h, w = _inputs(5, 16, 4096, jnp.bfloat16, layers=4)
    s, normed, (d, inv_q, sums) = jax.jit(functools.partial(add_rms_norm, eps=EPS, digits=(16, 128, 16)))(
        x, h, w, jnp.int32(2))
    dr, inv_r, sums_r = x_digits(normed.reshape(16, -1), rows=16, group_size=128, width=16)
    t = np.asarray(d[:16], np.int64) * 256 + np.asarray(d[16:], np.int64)
    tr = np.asarray(dr[:16], np.int64) * 256 + np.asarray(dr[16:], np.int64)
    assert np.abs(t - tr).max() <= 1
    np.testing.assert_allclose(np.asarray(inv_q), np.asarray(inv_r), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(sums), t.reshape(16, -1, 128).sum(-1).T)
