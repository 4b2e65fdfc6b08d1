"""Per-channel int8 products on the s8 tensor cores (`pallas_kernels/int8_matmul.py`): lowering and errors on the
CPU, the model's dispatch to it walked with a jnp stand-in, natively on the GPU against float64 and in the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from kernel_tools import cuda_lowering
from jaxinfer import ops

# N (head_dim x heads, dim, ffn_dim, vocab) multiples of 64, K (dim, heads x head_dim, ffn_dim) of 256.
CONFIG = ji.ModelConfig(vocab_size=256, dim=256, ffn_dim=512, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=64, max_seq_len=64)


def _codes(L, N, K, key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    values = jax.random.randint(k1, (L, N, K), -127, 128, jnp.int32).astype(jnp.int8)
    scales = 0.002 + 0.002 * jax.random.uniform(k2, (L, N, 1), jnp.float32)
    return values, scales


@pytest.mark.parametrize("rows,k,n", [(1, 4096, 28672), (16, 14336, 4096), (64, 2048, 384)])
def test_the_kernel_lowers_for_cuda_on_the_cpu(rows, k, n):
    """Mosaic GPU lowers the kernel (TMA boxes, the shared-memory A operand, the transposed store) while JAX lowers
    the call, GPU or not, with K split (few row blocks) and not."""
    from pallas_kernels import int8_matmul as im

    x = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16)
    values = jax.ShapeDtypeStruct((2, n, k), jnp.int8)
    scales = jax.ShapeDtypeStruct((2, n, 1), jnp.float32)
    text = cuda_lowering(lambda x, v, s, i: im.int8_matmul(x, v, s, i), x, values, scales,
                         jax.ShapeDtypeStruct((), jnp.int32))
    assert "mosaic_gpu" in text


def test_several_weights_lower_as_one_launch_on_the_cpu():
    """q/k/v-shaped parts (4096, 1024, 1024 rows) in one launch: each CTA branches to its part's weight."""
    from pallas_kernels import int8_matmul as im

    digits = jax.ShapeDtypeStruct((32, 4096), jnp.int8)
    inv_q = jax.ShapeDtypeStruct((16,), jnp.float32)
    weights = tuple((jax.ShapeDtypeStruct((2, n, 4096), jnp.int8), jax.ShapeDtypeStruct((2, n, 1), jnp.bfloat16))
                    for n in (4096, 1024, 1024))
    text = cuda_lowering(lambda d, q, w, i: im.int8_matmuls(d, q, w, i, rows=16), digits, inv_q, weights,
                         jax.ShapeDtypeStruct((), jnp.int32))
    assert text.count("mosaic_gpu") >= 1


def test_bad_operands_are_named():
    from pallas_kernels import int8_matmul as im

    values, scales = _codes(2, 128, 512)
    x, layer = jnp.ones((4, 512), jnp.bfloat16), jnp.int32(1)
    with pytest.raises(ValueError, match="int8 codes"):
        im.int8_matmul(x, values.astype(jnp.uint8), scales, layer)
    with pytest.raises(ValueError, match="with a layer index"):
        im.int8_matmul(x, values, scales)
    with pytest.raises(ValueError, match="N a multiple of 64"):
        im.int8_matmul(x, values[:, :96], scales[:, :96], layer)
    with pytest.raises(ValueError, match="1-64 rows"):
        im.int8_matmul(jnp.ones((65, 512), jnp.bfloat16), values, scales, layer)
    with pytest.raises(ValueError, match="per-channel scales"):
        im.int8_matmul(x, values, jnp.ones((2, 128, 4), jnp.float32), layer)


def _tree(dtype=jnp.bfloat16):
    return ji.quantize(ji.contract_last(ji.init_params(CONFIG, 0, dtype)), "int8")


def _decode(params, tokens):
    _, cache = ji.prefill(params, ji.init_cache(CONFIG, tokens.shape[0], 16, jnp.bfloat16), tokens, config=CONFIG)
    return np.asarray(ji.decode_step(params, cache, tokens[:, 0], config=CONFIG, impl="auto")[0], np.float32)


@pytest.mark.parametrize("digits_by_norm", [False, True])
def test_batched_int8_decode_reaches_the_s8_products(monkeypatch, digits_by_norm):
    """GPU dispatch walked in interpret mode: batch-4 decode on a per-channel int8 tree sends every layer product
    to the s8 kernel (replaced by a jnp stand-in: x rebuilt from its digits times the dequantized weights), q/k/v
    in one launch and gate/up in another, with x's digits written by the add + norm launches before them under
    `ops.ADD_NORM_DIGITS` (fewer `x_digits` launches than kernel launches) or by a launch each (as many).
    Logits: the XLA path's, to the digits' rounding."""
    from pallas_kernels import int8_matmul as im
    from pallas_kernels import x_digits as xd

    tree = _tree()
    tokens = np.random.default_rng(3).integers(0, CONFIG.vocab_size, (4, 6)).astype(np.int32)
    want = _decode(tree, tokens)
    calls = {"x_digits": 0, "launches": 0, "products": 0}
    own = xd.x_digits

    def x_digits(*a, **kw):
        calls["x_digits"] += 1
        return own(*a, **kw)

    def stand_in(digits, inv_q, weights, layer=None, *, rows, out_dtype):
        calls["launches"] += 1
        calls["products"] += len(weights)
        p = digits.shape[0] // 2
        x = (digits[:p].astype(jnp.float32) * 256 + digits[p:].astype(jnp.float32))[:rows] * inv_q[:rows, None]
        pick = (lambda a: a) if layer is None else (lambda a: a[layer])
        return tuple((x @ (pick(v).astype(jnp.float32) * pick(s).reshape(-1, 1)).T).astype(out_dtype)
                     for v, s in weights)

    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    monkeypatch.setattr(ops, "ADD_NORM_DIGITS", digits_by_norm)
    monkeypatch.setattr(ops, "_s8_kernel_applies", lambda spec, x, w: (
        w.fmt == "int8" and w.group_size is None and ops._contraction_last_product(spec, w) and spec.rows <= 64))
    monkeypatch.setattr(xd, "x_digits", x_digits)
    monkeypatch.setattr(im, "int8_matmuls", stand_in)
    jax.clear_caches()  # (decode_step's jit would reuse the trace above)
    got = _decode(tree, tokens)
    assert calls["launches"] >= 4 * CONFIG.num_layers  # q/k/v, o, gate/up, down a layer (prefill's too)
    assert calls["products"] >= calls["launches"] + 3 * CONFIG.num_layers  # q/k/v and gate/up each share one
    assert (calls["x_digits"] < calls["launches"]) == digits_by_norm
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


# -- natively on the GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 5, 16, 24, 40, 64])
def test_int8_kernel_matches_float64(rows):
    """Within 1e-5 of the float64 product of x's fixed point (the integer products are exact; the digits are joined
    in float32) and within 1e-4 of x's own (the fixed point rounds by 2^-16 of a row's largest |value|): one
    weight, and three weights of different heights in one launch."""
    from pallas_kernels import fragment_matmul as fm
    from pallas_kernels import int8_matmul as im
    from pallas_kernels.x_digits import x_digits_reference

    x = jax.random.normal(jax.random.key(7), (rows, 2048), jnp.float32).astype(jnp.bfloat16)
    mp = fm.padded_rows(rows)
    digits, inv_q, _ = x_digits_reference(x, rows=mp, group_size=128)
    d, q = np.asarray(digits, np.float64), np.asarray(inv_q, np.float64)
    x_fixed = (d[:rows] * 256 + d[mp:mp + rows]) * q[:rows, None]
    one = _codes(3, 384, 2048, key=rows)
    parts = [_codes(3, n, 2048, key=rows + n) for n in (256, 64, 128)]  # one launch, three weights
    got = [im.int8_matmul(x, *one, jnp.int32(2), out_dtype=jnp.float32),
           *im.int8_matmuls(digits, inv_q, tuple(parts), jnp.int32(2), rows=rows)]
    for out, (values, scales) in zip(got, [one, *parts]):
        w = np.asarray(values[2], np.float64) * np.asarray(scales[2], np.float64)
        for xs, tol in ((x_fixed, 1e-5), (np.asarray(x, np.float64), 1e-4)):
            want = xs @ w.T
            err = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
            assert err < tol, (err, tol, w.shape)


@pytest.mark.gpu
def test_int8_kernel_runs_the_model_on_the_gpu(monkeypatch):
    """Batch-4 prefill and decode on a per-channel int8 tree take the s8 kernel and give the logits of the same tree
    on the Triton weight kernel (`ops.S8_KERNEL` off)."""
    from pallas_kernels import int8_matmul as im

    tree = _tree()
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 12)).astype(np.int32)
    calls = []
    kernel = im.int8_matmuls
    monkeypatch.setattr(im, "int8_matmuls", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    monkeypatch.setattr(ops, "S8_KERNEL", False)
    jax.clear_caches()
    want = _decode(tree, tokens)
    assert not calls
    monkeypatch.setattr(ops, "S8_KERNEL", True)
    jax.clear_caches()
    got = _decode(tree, tokens)
    assert calls
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2
