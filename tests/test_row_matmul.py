"""The fused one-row kernel (`pallas_kernels.row_matmul`) in interpret mode, and the model's use of it.

The kernel must equal a float64 product for every fusion it offers (several parts in one launch, the
input's RMSNorm, the residual add, the SwiGLU gate), read the right layer of a stacked weight, reject bad
input by name, and lower to Triton for the model's shapes; the model on contraction-last weights must
give the logits of the unfused path with the row kernel in every layer.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from jaxinfer import ops
from jaxinfer import quant as Q
from jaxinfer.bench import switched
from jaxinfer.quant.qarray import dequantize, quantize_array
from kernel_tools import cuda_lowering, pallas_call_name, pallas_call_names, pallas_calls, rel_err
from pallas_kernels.common import Partials
from pallas_kernels.row_matmul import row_matmuls, row_matmuls_reference

F64 = np.float64
QUANT = [("int8", None, False), ("int8", 32, False), ("fp8", None, False), ("int4", 32, False), ("int4", 64, True)]


def _norm64(x, g, eps):
    x = x.astype(F64)
    return g.astype(F64) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("widths", [(64,), (64, 16, 16), (48, 8)])
@pytest.mark.parametrize("norm", [False, True])
def test_parts_and_norm_equal_float64(widths, norm):
    rng = np.random.default_rng(len(widths) + norm)
    L, K = 3, 128
    x = rng.standard_normal((1, K)).astype(np.float32)
    ws = [rng.standard_normal((L, n, K)).astype(np.float32) for n in widths]
    g = (1 + 0.2 * rng.standard_normal((L, K))).astype(np.float32)
    layer = 2
    outs = row_matmuls(jnp.asarray(x), tuple(map(jnp.asarray, ws)), jnp.int32(layer), block_k=32,
                       norm_weight=jnp.asarray(g) if norm else None, eps=1e-5, interpret=True)
    xin = _norm64(x, g[layer], 1e-5) if norm else x.astype(F64)
    for out, w, n in zip(outs, ws, widths):
        assert out.shape == (1, n) and out.dtype == jnp.float32
        assert rel_err(out, xin @ w[layer].astype(F64).T) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_residual_and_swiglu(dtype):
    rng = np.random.default_rng(7)
    L, K, N = 2, 256, 32
    x = jnp.asarray(rng.standard_normal((1, K)), dtype)
    gate, up = (jnp.asarray(rng.standard_normal((L, N, K)) / 16, dtype) for _ in range(2))
    down = jnp.asarray(rng.standard_normal((L, K, N)) / 8, dtype)
    res = jnp.asarray(rng.standard_normal((1, K)), dtype)
    g = jnp.asarray(1 + 0.2 * rng.standard_normal((L, K)), dtype)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    (h,) = row_matmuls(x, (gate, up), jnp.int32(1), norm_weight=g, epilogue="swiglu", interpret=True)
    (ref_h,) = row_matmuls_reference(x, (gate, up), 1, norm_weight=g, epilogue="swiglu")
    xin = _norm64(np.asarray(x, np.float32), np.asarray(g[1], np.float32), 1e-6)
    gp = xin @ np.asarray(gate[1], F64).T
    want_h = gp / (1 + np.exp(-gp)) * (xin @ np.asarray(up[1], F64).T)
    assert h.shape == (1, N) and h.dtype == dtype
    assert rel_err(h, want_h) < tol and rel_err(h, ref_h) < tol / 4
    (y,) = row_matmuls(h, (down,), jnp.int32(0), epilogue="residual", residual=res, interpret=True)
    want_y = np.asarray(res, F64) + np.asarray(h, F64) @ np.asarray(down[0], F64).T
    assert y.dtype == dtype and rel_err(y, want_y) < tol


# int4's integer products with x's fixed point in three bytes (20 bits) or two (15, the default): errors against
# float64 without and with a 300x outlier
X_BYTES_TOLERANCES = {3: (1e-5, 1e-4), 2: (1e-4, 1e-3)}


def _tol(fmt):
    """Relative error against float64 of a product in `fmt` (int4: x's fixed point at the kernel's default bytes)."""
    from pallas_kernels import row_matmul as rm

    return X_BYTES_TOLERANCES[rm._X_BYTES][0] if fmt == "int4" else 1e-5


def _quantized(w, fmt, group, zero_point):
    """(values, scales, offsets) of `w [L, N, K]` made by the library's quantizer (contraction last), and
    its float64 dequantization by the library (independent of the kernel module)."""
    q = quantize_array(jnp.asarray(w), fmt, (-1,), group, zero_point=zero_point)
    return (q.values, q.scales, q.offsets), np.asarray(dequantize(q, jnp.float32), F64)


@pytest.mark.parametrize("fmt,group,zero_point", QUANT, ids=[f"{f}-g{g}{'-offsets' if z else ''}" for f, g, z in QUANT])
@pytest.mark.parametrize("norm", [False, True])
def test_quantized_parts_equal_float64(fmt, group, zero_point, norm):
    """q/k/v-like parts of every format in one launch against the float64 product with the dequantized
    weights; the norm fused in."""
    rng = np.random.default_rng(3)
    L, K, widths = 2, 256, (32, 8, 8)
    x = rng.standard_normal((1, K)).astype(np.float32)
    g = (1 + 0.2 * rng.standard_normal((L, K))).astype(np.float32)
    parts = [_quantized(rng.standard_normal((L, n, K)).astype(np.float32), fmt, group, zero_point) for n in widths]
    outs = row_matmuls(jnp.asarray(x), tuple(p[0] for p in parts), jnp.int32(1), fmt=fmt, group_size=group,
                       norm_weight=jnp.asarray(g) if norm else None, eps=1e-5, block_k=64, interpret=True)
    xin = _norm64(x, g[1], 1e-5) if norm else x.astype(F64)
    for out, (_, w64) in zip(outs, parts):
        assert rel_err(out, xin @ w64[1].T) < _tol(fmt)


@pytest.mark.parametrize("fmt,group,zero_point", QUANT[1:4:2], ids=["int8-g32", "int4-g32"])
def test_quantized_swiglu_and_residual(fmt, group, zero_point):
    rng = np.random.default_rng(4)
    L, K, N = 2, 128, 64
    x = rng.standard_normal((1, K)).astype(np.float32)
    (gq, g64), (uq, u64) = (_quantized(rng.standard_normal((L, N, K)).astype(np.float32), fmt, group, zero_point)
                            for _ in range(2))
    (h,) = row_matmuls(jnp.asarray(x), (gq, uq), jnp.int32(0), fmt=fmt, group_size=group, epilogue="swiglu",
                       interpret=True)
    gp, up = x.astype(F64) @ g64[0].T, x.astype(F64) @ u64[0].T
    assert rel_err(h, gp / (1 + np.exp(-gp)) * up) < _tol(fmt)
    dq, d64 = _quantized(rng.standard_normal((L, K, N)).astype(np.float32), fmt, group, zero_point)
    res = rng.standard_normal((1, K)).astype(np.float32)
    (y,) = row_matmuls(h, (dq,), jnp.int32(1), fmt=fmt, group_size=group, epilogue="residual",
                       residual=jnp.asarray(res), interpret=True)
    assert rel_err(y, res.astype(F64) + np.asarray(h, F64) @ d64[1].T) < _tol(fmt)


@pytest.mark.parametrize("x_bytes", [3, 2], ids=["x-20-bits", "x-15-bits"])
@pytest.mark.parametrize("prepared", [True, False], ids=["x-once-per-call", "x-in-every-program"])
@pytest.mark.parametrize("group,zero_point,norm", [(32, False, True), (64, True, False), (128, False, True)])
def test_int4_integer_dot_products(group, zero_point, norm, prepared, x_bytes):
    """int4 in one K step takes integer dot products (`DP4A`: x as a 20-bit fixed point in three bytes, or a
    15-bit one in two): q/k/v-like parts against the float64 product with the dequantized weights, also with an
    outlier 300x the typical |x| (the fixed point's precision is relative to the largest |x|), within
    `X_BYTES_TOLERANCES`; the same as the float path; an all-zero x gives zeros (the offsets' term included), a
    NaN or infinite x NaNs. x's fixed point made once per call (a scale per group) or in every program (one
    scale)."""
    from pallas_kernels import row_matmul as rm

    rng = np.random.default_rng(5)
    L, K, widths = 2, 512, (32, 16, 16)
    g = (1 + 0.2 * rng.standard_normal((L, K))).astype(np.float32)
    parts = [_quantized(rng.standard_normal((L, n, K)).astype(np.float32), "int4", group, zero_point) for n in widths]
    call = functools.partial(row_matmuls, weights=tuple(p[0] for p in parts), layer=jnp.int32(1), fmt="int4",
                             group_size=group, norm_weight=jnp.asarray(g) if norm else None, eps=1e-5, interpret=True)
    with switched(rm, {"DP4A_PREPARED_X": prepared, "_X_BYTES": x_bytes}):  # x made once per call, or in every program
        x = rng.standard_normal((1, K)).astype(np.float32)
        for outlier, tol in zip((None, 300.0), X_BYTES_TOLERANCES[x_bytes]):
            if outlier:
                x[0, 7] = outlier
            xin = _norm64(x, g[1], 1e-5) if norm else x.astype(F64)
            outs = call(jnp.asarray(x))
            for out, (_, w64) in zip(outs, parts):
                assert rel_err(out, xin @ w64[1].T) < tol
            with switched(rm, {"DP4A": False}):
                floats = call(jnp.asarray(x))
            for a, b in zip(outs, floats):
                assert rel_err(a, b) < tol
        for out in call(jnp.zeros((1, K), jnp.float32)):
            assert not np.asarray(out).any()
        for bad in (np.nan, np.inf):  # not turned into finite numbers by the fixed point
            x[0, 3] = bad
            for out in call(jnp.asarray(x)):
                assert np.isnan(np.asarray(out)).all()


def test_int4_norm_in_product():
    """`NORM_IN_PRODUCT`: x's normed preparation writes its groups' sums of squares instead of reading the whole row,
    and the product applies 1 / rms. A float32 x: the same products as the norm made in the preparation, within the
    fixed point's precision; a bfloat16 x (the model's): within bf16 rounding of those, since x is no longer rounded
    between the norm and its weight; both against the float64 product."""
    from pallas_kernels import row_matmul as rm

    rng = np.random.default_rng(9)
    L, K, widths, group = 2, 512, (32, 16), 128
    g = (1 + 0.2 * rng.standard_normal((L, K))).astype(np.float32)
    parts = [_quantized(rng.standard_normal((L, n, K)).astype(np.float32), "int4", group, False) for n in widths]
    call = functools.partial(row_matmuls, weights=tuple(p[0] for p in parts), layer=jnp.int32(1), fmt="int4",
                             group_size=group, norm_weight=jnp.asarray(g), eps=1e-5, interpret=True)
    x = (3 * rng.standard_normal((1, K))).astype(np.float32)
    want = [_norm64(x, g[1], 1e-5) @ w64[1].T for _, w64 in parts]
    for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)):
        xin = jnp.asarray(x, dtype)
        got = {}
        for in_product in (True, False):
            with switched(rm, {"NORM_IN_PRODUCT": in_product}):
                [prep] = [e for e in pallas_calls(jax.make_jaxpr(call)(xin).jaxpr) if "prepare" in pallas_call_name(e)]
                terms = prep.outvars[1].aval.shape
                assert terms == ((3 if in_product else 2), K // group)  # the group sums of squares beside the terms
                got[in_product] = call(xin)
        for a, b, w in zip(got[True], got[False], want):
            assert rel_err(a, b) < tol
            assert rel_err(a, w) < tol


@pytest.mark.parametrize("K,group,block_k,epilogue,zero_point", [(448, 32, None, "residual", False),
                                                                 (512, 64, 128, "swiglu", True),
                                                                 (256, 32, 64, "none", False)])
def test_int4_split_k(K, group, block_k, epilogue, zero_point):
    """int4 whose K takes more than one dp4a step (K / g not a power of two, as llama-3-8b's `down`: 14336 / 128 =
    7 x 16, or a `block_k` below K): programs split K, write float32 partials, and their sum is finished outside
    (the norm over the whole row, SwiGLU, the residual): against float64 with the dequantized weights, and equal
    to the float path's K loop (`DP4A_SPLIT_K = False`)."""
    from pallas_kernels import row_matmul as rm

    assert rm.dp4a_splits(K, "int4", group, block_k) > 1
    rng = np.random.default_rng(K + group)
    L = 2
    widths = {"residual": (32,), "swiglu": (16, 16), "none": (32, 16, 8)}[epilogue]
    norm = epilogue != "residual"
    x = rng.standard_normal((1, K)).astype(np.float32)
    g = (1 + 0.2 * rng.standard_normal((L, K))).astype(np.float32)
    res = rng.standard_normal((1, widths[0])).astype(np.float32)
    parts = [_quantized(rng.standard_normal((L, n, K)).astype(np.float32), "int4", group, zero_point) for n in widths]
    call = functools.partial(row_matmuls, jnp.asarray(x), tuple(p[0] for p in parts), jnp.int32(1), fmt="int4",
                             group_size=group, norm_weight=jnp.asarray(g) if norm else None, eps=1e-5,
                             epilogue=epilogue, residual=jnp.asarray(res) if epilogue == "residual" else None,
                             block_k=block_k, interpret=True)
    outs = call()
    with switched(rm, {"DP4A_SPLIT_K": False}):
        floats = call()
    xin = _norm64(x, g[1], 1e-5) if norm else x.astype(F64)
    want = [xin @ w64[1].T for _, w64 in parts]
    if epilogue == "residual":
        want = [res.astype(F64) + want[0]]
    elif epilogue == "swiglu":
        want = [want[0] / (1 + np.exp(-want[0])) * want[1]]
    assert len(outs) == len(want) == len(floats)
    for out, w, f in zip(outs, want, floats):
        assert out.shape == f.shape and out.dtype == f.dtype
        assert rel_err(out, w) < _tol("int4") and rel_err(out, f) < _tol("int4")


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.gpu)], ids=["interpret", "native"])
@pytest.mark.parametrize("group,merged_in_preparation", [(64, True), (32, False)], ids=["group-is-head", "group-32"])
def test_int4_takes_decode_attention_partials(group, merged_in_preparation, interpret):
    """x given as a decode attention's partials (`merge=False`: its key splits not merged, empty splits among them)
    gives what the merged x gives (bit for bit in interpret mode): with groups of one head, x's preparation merges
    them in its launch (`row_matmul_int4_prepare_x_merge`, no `combine_splits`); with smaller groups they are
    merged first. Against float64 of the float64 attention, and a sequence of length 0 gives zero attention (the
    offsets' term only)."""
    from pallas_kernels import decode_attention, decode_attention_reference

    rng = np.random.default_rng(group)
    N, KV, H, S, width = 4, 2, 64, 96, 48
    q = jnp.asarray(rng.standard_normal((1, N, H)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((1, S, KV, H)), jnp.bfloat16) for _ in range(2))
    (w,), (w64,) = zip(_quantized(rng.standard_normal((2, width, N * H)).astype(np.float32), "int4", group, True))
    res = jnp.asarray(rng.standard_normal((1, width)), jnp.bfloat16)
    call = functools.partial(row_matmuls, weights=(w,), layer=jnp.int32(1), fmt="int4", group_size=group,
                             epilogue="residual", residual=res, interpret=interpret)
    for length in (70, 0):
        lengths = jnp.asarray([length], jnp.int32)
        partials = decode_attention(q, k, v, lengths=lengths, num_splits=5, block_k=16, interpret=interpret,
                                    merge=False)
        merged = partials.merge(interpret=interpret)
        (got,) = call(partials)
        (want,) = call(merged.reshape(1, N * H))
        if interpret:
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        else:  # the two merges' sums over the splits may round apart by an ulp of float32 (then of bf16)
            assert rel_err(got, want) < 2e-3
        x64 = np.asarray(decode_attention_reference(q, k, v, lengths=lengths), F64).reshape(1, N * H)
        assert rel_err(got, np.asarray(res, F64) + x64 @ w64[1].T) < 1e-2  # x rounded to bf16 twice on the way
        names = pallas_call_names(jax.make_jaxpr(call)(partials).jaxpr)
        assert ("row_matmul_int4_prepare_x_merge" in names) == merged_in_preparation, names
        assert names.count("combine_splits") == (0 if merged_in_preparation else 1), names


def test_bad_inputs_are_named():
    x = jnp.ones((1, 64), jnp.float32)
    w = jnp.ones((2, 16, 64), jnp.float32)
    call = functools.partial(row_matmuls, interpret=True)
    with pytest.raises(ValueError, match="one row"):
        call(jnp.ones((2, 64)), (w,))
    with pytest.raises(ValueError, match="unknown epilogue"):
        call(x, (w,), epilogue="gelu")
    with pytest.raises(ValueError, match="two weights of equal width"):
        call(x, (w, w[:, :8]), epilogue="swiglu")
    with pytest.raises(ValueError, match="residual"):
        call(x, (w,), epilogue="residual", residual=jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="plain values must be .* of float32"):
        call(x, (w.astype(jnp.bfloat16),))
    with pytest.raises(ValueError, match="unknown format"):
        call(x, (w,), fmt="int2")
    with pytest.raises(ValueError, match="scales must have shape"):
        call(x, ((w.astype(jnp.int8), jnp.ones((2, 16, 2)), None),), fmt="int8")
    with pytest.raises(ValueError, match="offsets are for int4"):
        call(x, ((w.astype(jnp.int8), jnp.ones((2, 16, 1)), jnp.ones((2, 16, 1))),), fmt="int8")
    with pytest.raises(ValueError, match="norm_weight"):
        call(x, (w,), norm_weight=jnp.ones((2, 32)))
    with pytest.raises(ValueError, match="do not tile"):
        call(x, (w,), block_k=48)


def test_lowers_to_triton_for_the_model_shapes():
    """The Triton lowering (no GPU needed on jaxlib 0.10) of llama-3-8b's fused calls."""
    sds, bf16, i32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.int32
    cases = [
        ((sds((1, 4096), bf16), (sds((4, 4096, 4096), bf16), sds((4, 1024, 4096), bf16), sds((4, 1024, 4096), bf16))),
         "none", dict(norm_weight=sds((4, 4096), bf16))),
        ((sds((1, 4096), bf16), (sds((4, 14336, 4096), bf16), sds((4, 14336, 4096), bf16))),
         "swiglu", dict(norm_weight=sds((4, 4096), bf16))),
        ((sds((1, 14336), bf16), (sds((4, 4096, 14336), bf16),)), "residual", dict(residual=sds((1, 4096), bf16))),
    ]
    f32, f16 = jnp.float32, jnp.float16
    for fmt, group, w in (("int8", None, (sds((4, 2048, 4096), jnp.int8), sds((4, 2048, 1), f32), None)),
                          ("fp8", None, (sds((4, 2048, 4096), jnp.float8_e4m3fn), sds((4, 2048, 1), f32), None)),
                          ("int4", 128, (sds((4, 2048, 2048), jnp.uint8), sds((4, 2048, 32), f16), sds((4, 2048, 32), f16)))):
        cases.append(((sds((1, 4096), bf16), (w, w)), ("swiglu", fmt, group), dict(norm_weight=sds((4, 4096), bf16))))
    down4 = (sds((4, 4096, 7168), jnp.uint8), sds((4, 4096, 112), f16), None)  # K split across programs
    cases.append(((sds((1, 14336), bf16), (down4,)), ("residual", "int4", 128), dict(residual=sds((1, 4096), bf16))))
    o4 = (sds((4, 4096, 2048), jnp.uint8), sds((4, 4096, 32), f16), None)  # x: decode attention's partials
    attention = Partials(sds((1, 8, 33, 4, 128), f32), sds((1, 8, 33, 4), f32), sds((1, 8, 33, 4), f32), bf16)
    cases.append(((attention, (o4,)), ("residual", "int4", 128), dict(residual=sds((1, 4096), bf16))))
    for args, epilogue, kwargs in cases:
        epilogue, fmt, group = epilogue if isinstance(epilogue, tuple) else (epilogue, "plain", None)
        fn = functools.partial(row_matmuls, interpret=False, epilogue=epilogue, fmt=fmt, group_size=group)
        assert "triton" in cuda_lowering(fn, *args, layer=sds((), i32), **kwargs)


CONFIG = ji.ModelConfig(vocab_size=96, dim=64, ffn_dim=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32)


@pytest.mark.parametrize("recipe", [None, "int8", Q.Recipe("int4", 32, zero_point=True)], ids=["bf16", "int8", "int4-g32"])
def test_model_runs_the_fused_layers(monkeypatch, recipe):
    """One-row decode on contraction-last weights (bf16 or quantized after the transform): with the row
    path on (interpret mode standing in for the GPU) every layer runs three fused calls (norm + q/k/v, norm
    + SwiGLU, and o and down with their residual adds), the output head one more, and the logits equal
    the unfused XLA path's within bf16 rounding."""
    params = ji.contract_last(ji.init_params(CONFIG, jax.random.key(5, impl="rbg"), jnp.bfloat16))
    fmt = "plain"
    if recipe is not None:
        params = Q.quantize(params, recipe)
        fmt = Q.get_recipe(recipe).format
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, 6)))
    cache = ji.init_cache(CONFIG, 1, 16, jnp.bfloat16)
    _, cache = ji.forward(params, cache, tokens, config=CONFIG)
    want, _ = jax.jit(functools.partial(ji.forward, config=CONFIG))(params, cache, tokens[:, -1:])
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    monkeypatch.setattr(ops, "ROW_FORMATS", (fmt,))
    jaxpr = jax.make_jaxpr(functools.partial(ji.forward, config=CONFIG))(params, cache, tokens[:, -1:])
    names = [n for n in pallas_call_names(jaxpr.jaxpr) if n.startswith("row_matmul")]
    kernels = [n for n in names if "prepare_x" not in n]
    layer = [f"row_matmul_{fmt}_{k}" for k in ("none_norm", "residual", "swiglu_norm", "residual")]
    assert kernels == layer + [f"row_matmul_{fmt}_none"], kernels  # the output head last
    if fmt == "int4":  # integer products: x's fixed point made by a launch of its own before each
        preps = [f"row_matmul_int4_prepare_x{'_norm' if k.endswith('_norm') else ''}" for k in kernels]
        assert names == [n for pair in zip(preps, kernels) for n in pair], names
    else:
        assert names == kernels, names
    got, _ = jax.jit(functools.partial(ji.forward, config=CONFIG))(params, cache, tokens[:, -1:])
    got, want = np.asarray(got, F64), np.asarray(want, F64)
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max(), np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_model_merges_attention_splits_in_the_output_products_preparation(monkeypatch):
    """int4 groups of one head (head dim 32, groups of 32), decode on the GPU's kernels (interpret mode): the decode
    attention launch leaves its splits unmerged and the attention output product's preparation of x merges them
    (no `combine_splits` launch); logits equal the XLA path's within bf16 rounding, and the same as with the
    merge's own launch (`MERGE_IN_PREPARATION = False`) bit for bit."""
    from pallas_kernels import row_matmul as rm

    params = Q.quantize(ji.contract_last(ji.init_params(CONFIG, jax.random.key(6, impl="rbg"), jnp.bfloat16)),
                        Q.Recipe("int4", CONFIG.head_dim, zero_point=True))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, (1, 6)))
    cache = ji.init_cache(CONFIG, 1, 16, jnp.bfloat16)
    _, cache = ji.forward(params, cache, tokens[:, :-1], config=CONFIG)
    want, _ = jax.jit(functools.partial(ji.forward, config=CONFIG, impl="xla"))(params, cache, tokens[:, -1:])
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    monkeypatch.setattr(ops, "ROW_FORMATS", ("int4",))
    step = functools.partial(ji.forward, config=CONFIG, impl="auto")
    got = {}
    for merge_in_preparation in (True, False):
        with switched(rm, {"MERGE_IN_PREPARATION": merge_in_preparation}):
            names = pallas_call_names(jax.make_jaxpr(step)(params, cache, tokens[:, -1:]).jaxpr)
            assert names.count("decode_attention") == 1, names  # (the scan's body: once for every layer)
            merges = names.count("row_matmul_int4_prepare_x_merge"), names.count("combine_splits")
            assert merges == ((1, 0) if merge_in_preparation else (0, 1)), names
            got[merge_in_preparation] = np.asarray(jax.jit(step)(params, cache, tokens[:, -1:])[0], F64)
    np.testing.assert_array_equal(got[True], got[False])
    want = np.asarray(want, F64)
    assert np.abs(got[True] - want).max() < 0.02 * np.abs(want).max(), np.abs(got[True] - want).max()
    assert (got[True].argmax(-1) == want.argmax(-1)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,group,zero_point", [("plain", None, False)] + QUANT)
def test_native_kernel_equals_the_reference(fmt, group, zero_point):
    """Compiled for the GPU: llama-like shapes (q/k/v widths, K 1024 in one step or four) with the norm,
    bf16 activations, against the jnp reference that rounds where the kernel rounds."""
    rng = np.random.default_rng(11)
    L, K, widths = 2, 1024, (512, 128, 128)
    x = jnp.asarray(rng.standard_normal((1, K)), jnp.bfloat16)
    g = jnp.asarray(1 + 0.1 * rng.standard_normal((L, K)), jnp.bfloat16)
    ws = [rng.standard_normal((L, n, K)).astype(np.float32) / 32 for n in widths]
    parts = tuple(jnp.asarray(w, jnp.bfloat16) if fmt == "plain" else _quantized(w, fmt, group, zero_point)[0]
                  for w in ws)
    want = row_matmuls_reference(x, parts, 1, fmt=fmt, group_size=group, norm_weight=g)
    from pallas_kernels import row_matmul as rm

    # one K step; four (a loop, fp8's unrolled, int4's dp4a split); int4's x made in every program, not once per
    # call; int4's x in three bytes (two by default)
    for block_k, switches in ((None, {}), (256, {}), (None, {"DP4A_PREPARED_X": False}),
                              (256, {"DP4A_PREPARED_X": False}), (None, {"_X_BYTES": 3}), (256, {"_X_BYTES": 3})):
        with switched(rm, switches):
            got = row_matmuls(x, parts, jnp.int32(1), fmt=fmt, group_size=group, norm_weight=g, block_k=block_k,
                              interpret=False)
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,group,zero_point", QUANT[:2] + QUANT[3:])
@pytest.mark.parametrize("epilogue", ["none", "swiglu"])
def test_native_inline_ptx_decodes_exactly(fmt, group, zero_point, epilogue):
    """The inline-PTX code decoding (`code_decode`) is exact: float32 products equal the float64 product
    of the dequantized weights to float32 rounding (int4's integer products with x in three bytes, 20 bits: x's
    rounding is then below float32's for bf16 x), and they are bit for bit those of the jnp spelling of
    the same decoding (same sums in the same order), for 4 and 8 rows per program and K steps of 256 and
    the whole row."""
    from pallas_kernels import code_decode
    from pallas_kernels import row_matmul as rm

    rng = np.random.default_rng(12)
    L, K, N = 2, 2048, 256
    x = jnp.asarray(rng.standard_normal((1, K)), jnp.bfloat16)
    parts = [_quantized(rng.standard_normal((L, N, K)).astype(np.float32), fmt, group, zero_point) for _ in range(2)]
    for block_n, block_k in ((4, None), (8, 256)):
        call = functools.partial(row_matmuls, x, tuple(p[0] for p in parts), jnp.int32(1), fmt=fmt, group_size=group,
                                 epilogue=epilogue, out_dtype=jnp.float32, block_n=block_n, block_k=block_k,
                                 interpret=False)

        def native_equals_jnp():  # the native launch, bit for bit the jnp spelling's
            got = call()
            with switched(code_decode, {"INLINE_PTX": False}):  # traced afresh, restored after
                plain = call()
            for a, b in zip(got, plain):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            return got

        with switched(rm, {"_X_BYTES": 3}):
            got = native_equals_jnp()
        if epilogue == "none":
            for out, (_, w64) in zip(got, parts):
                assert rel_err(out, np.asarray(x, F64) @ w64[1].T) < 1e-6
        if fmt == "int4":  # x in two bytes (the default)
            native_equals_jnp()
