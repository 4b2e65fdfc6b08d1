"""The decode-shaped weight matmul kernel (pallas_kernels/weight_matmul.py: plain and quantized weights, one
layer of a stacked weight read in place) against float64 numpy, in interpret
mode on the CPU and natively on the GPU (marked `gpu`), and `ops.matmul`'s kernel path on model equations.

The numpy reference unpacks the codes itself (not through jaxinfer.quant), so a shared packing mistake
cannot hide. Outputs are float32; tolerances cover the bf16 activations' products accumulated in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import ops
from jaxinfer import quant as Q
from jaxinfer.bench import switched
from pallas_kernels import weight_matmul as wm

ON_GPU = jax.default_backend() == "gpu"
MODES = [
    pytest.param(True, id="interpret", marks=pytest.mark.skipif(ON_GPU, reason="interpret mode runs on the CPU suite")),
    pytest.param(False, id="native", marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU")]),
]


def _np_weight(values, scales, offsets, fmt, group):
    """float64 W [K, N] from the stored arrays, decoded from the format's definition."""
    v = np.asarray(values)
    s = np.asarray(scales, np.float64)
    if fmt == "int4":
        half = group // 2
        K2, N = v.shape
        p = v.reshape(K2 // half, half, N)
        codes = np.concatenate([p & 15, p >> 4], axis=1).reshape(2 * K2, N).astype(np.float64)
        if offsets is None:
            codes -= 8
    else:
        codes = v.astype(np.float64)
    K = codes.shape[0]
    rows = np.arange(K) // (group or K)
    w = codes * s[rows]
    if offsets is not None:
        w = w + np.asarray(offsets, np.float64)[rows]
    return w


CASES = [  # (M, K, N, fmt, group, zero_point, layers): layers > 1 reads the last layer of a stacked weight
    (1, 1024, 128, "int4", 64, True, 1),  # 4 splits of K
    (5, 512, 192, "int4", 32, False, 3),
    (16, 256, 256, "int4", 128, True, 1),
    (1, 1024, 256, "int8", None, False, 2),
    (1, 768, 64, "fp8", None, False, 1),  # one row of fp8: multiply-adds on the CUDA cores, no dot
    (33, 512, 128, "int8", 64, False, 1),
    (3, 768, 64, "fp8", None, False, 1),  # K = 3 * 256: three splits of a power of two
    (1, 1024, 384, "plain", None, False, 3),
    (7, 256, 128, "plain", None, False, 1),
    (100, 512, 128, "plain", None, False, 2),  # more rows than a 64-row tile: narrower column blocks
]


def _case_weight(rng, K, N, fmt, group, zp, layers):
    """Stored arrays (values, scales, offsets) with a leading layer axis when layers > 1."""
    shape = (layers, K, N) if layers > 1 else (K, N)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    if fmt == "plain":
        return w.astype(jnp.bfloat16), None, None
    q = Q.quantize_array(w, fmt, (len(shape) - 2,), group, zero_point=zp)
    lead = shape[:-2]
    return q.values, q.scales.reshape(*lead, -1, N), q.offsets


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("M,K,N,fmt,group,zp,layers", CASES,
                         ids=[f"{c[3]}-g{c[4]}-m{c[0]}-l{c[6]}" for c in CASES])
def test_kernel_matches_float64(interpret, M, K, N, fmt, group, zp, layers):
    rng = np.random.default_rng(K + N + M)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    values, scales, offsets = _case_weight(rng, K, N, fmt, group, zp, layers)
    layer = jnp.int32(layers - 1) if layers > 1 else None
    assert wm.supports(M, K, N, fmt, group)
    out = wm.weight_matmul(x, values, scales, offsets, layer, fmt=fmt, group_size=group, interpret=interpret)
    assert out.dtype == jnp.float32
    pick = (lambda a: None if a is None else a[layers - 1]) if layers > 1 else (lambda a: a)
    if fmt == "plain":
        w64 = np.asarray(pick(values), np.float64)
    else:
        w64 = _np_weight(pick(values), pick(scales), pick(offsets), fmt, group)
    ref = np.asarray(x, np.float64) @ w64
    out = np.asarray(out, np.float64)
    assert out.shape == ref.shape and not np.isnan(out).any()
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err  # bf16 x and codes are exact in the dot; float32 accumulation only
    # the jnp reference agrees with numpy too
    jref = wm.weight_matmul_reference(x, values, scales, offsets, layer, fmt=fmt, group_size=group)
    assert np.abs(np.asarray(jref, np.float64) - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("fmt,group", [("plain", None), ("int4", 32), ("int8", None)])
def test_several_weights_in_one_launch(interpret, fmt, group):
    """weight_matmuls: weights of different widths sharing x (a layer's q/k/v) give each weight's product."""
    rng = np.random.default_rng(3)
    M, K, L = 2, 512, 3
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    weights = [_case_weight(rng, K, n, fmt, group, fmt == "int4", L) for n in (256, 64, 64)]
    outs = wm.weight_matmuls(x, tuple(weights), jnp.int32(1), fmt=fmt, group_size=group, interpret=interpret)
    assert len(outs) == 3
    for (values, scales, offsets), out in zip(weights, outs):
        if fmt == "plain":
            w64 = np.asarray(values[1], np.float64)
        else:
            w64 = _np_weight(values[1], scales[1], None if offsets is None else offsets[1], fmt, group)
        ref = np.asarray(x, np.float64) @ w64
        assert out.shape == ref.shape
        assert np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("M", [1, 7, 100])
def test_transposed_plain_weights(interpret, M):
    """Plain weights stored [L, N, K] (contraction last, `weight_layout.contract_last`): each tile enters
    the dot transposed; several widths in one launch, one layer of a stacked weight."""
    rng = np.random.default_rng(M)
    K, L = 512, 3
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    weights = [(jnp.asarray(rng.standard_normal((L, n, K)), jnp.bfloat16), None, None) for n in (256, 64, 64)]
    outs = wm.weight_matmuls(x, tuple(weights), jnp.int32(2), fmt="plain", group_size=None, transposed=True,
                             interpret=interpret)
    for (values, _, _), out in zip(weights, outs):
        ref = np.asarray(x, np.float64) @ np.asarray(values[2], np.float64).T
        assert out.shape == ref.shape
        assert np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max() < 1e-5
    jref = wm.weight_matmul_reference(x, *weights[0], jnp.int32(2), fmt="plain", group_size=None, transposed=True)
    np.testing.assert_allclose(np.asarray(jref), np.asarray(outs[0]), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="do not match x"):
        wm.weight_matmul(x, weights[0][0], fmt="plain", group_size=None, interpret=interpret)  # [N, K] as [K, N]


TRANSPOSED_QUANT = [("int8", None, False), ("int8", 64, False), ("int4", 32, False), ("int4", 64, True),
                    ("fp8", None, False)]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("fmt,group,zp", TRANSPOSED_QUANT, ids=[f"{f}-g{g}-zp{z}" for f, g, z in TRANSPOSED_QUANT])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_transposed_quantized_weights(interpret, fmt, group, zp, M):
    """Quantized weights stored [L, N, K(/2)] with scales [L, N, K/g or 1] (`quantize(contract_last(...))`):
    the codes' tiles enter the dot transposed, scales per group or per output column; several widths in one
    launch, one layer of a stacked weight; against float64 over the dequantized weights."""
    rng = np.random.default_rng(M + (group or 0))
    K, L = 512, 3
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    qs = [Q.quantize_array(jnp.asarray(rng.standard_normal((L, n, K)), jnp.float32), fmt, (2,), group, zero_point=zp)
          for n in (256, 64, 64)]
    weights = tuple((q.values, q.scales, q.offsets) for q in qs)
    outs = wm.weight_matmuls(x, weights, jnp.int32(2), fmt=fmt, group_size=group, transposed=True,
                             interpret=interpret)
    for q, out in zip(qs, outs):
        ref = np.asarray(x, np.float64) @ np.asarray(Q.dequantize(q), np.float64)[2].T
        assert out.shape == ref.shape and not np.isnan(np.asarray(out)).any()
        assert np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max() < 1e-5
    jref = wm.weight_matmul_reference(x, *weights[0], jnp.int32(2), fmt=fmt, group_size=group, transposed=True)
    np.testing.assert_allclose(np.asarray(jref), np.asarray(outs[0]), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("tiling", [(128, 4, 1), (64, 2, 4), (32, 1, 8)], ids=lambda t: "bn%d-w%d-waves%d" % t)
def test_int4_dot_tilings_give_the_same_product(interpret, tiling, monkeypatch):
    """Each column block / warps / waves the int4 dot may be given (`DOT_TILING`) takes that block, splits K
    as the waves ask, and computes the same product (contraction-last codes with offsets: x's group sums
    enter from outside the kernel)."""
    monkeypatch.setitem(wm.DOT_TILING, "int4", tiling)
    jax.clear_caches()  # the tiling is read when weight_matmuls is traced
    block, _, waves = tiling
    # llama-3-8b's gate + up at 16 rows: the fewest splits of K that give `waves` times TARGET_PROGRAMS programs
    bn, splits, _ = wm.plan(4096, 28672, "int4", 128, 16)
    assert bn == block and splits * (28672 // bn) >= wm.TARGET_PROGRAMS * waves
    assert splits == 1 or splits // 2 * (28672 // bn) < wm.TARGET_PROGRAMS * waves
    rng = np.random.default_rng(block)
    M, K, N, g = 5, 1024, 128, 32
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    q = Q.quantize_array(jnp.asarray(rng.standard_normal((2, N, K)), jnp.float32), "int4", (2,), g, zero_point=True)
    out = wm.weight_matmul(x, q.values, q.scales, q.offsets, jnp.int32(1), fmt="int4", group_size=g,
                           transposed=True, interpret=interpret)
    ref = np.asarray(x, np.float64) @ np.asarray(Q.dequantize(q), np.float64)[1].T
    assert np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max() < 1e-5
    jax.clear_caches()


def test_batched_quantized_contract_last_takes_the_kernel(monkeypatch):
    """A few rows over `quantize(contract_last(...))` weights take the weight kernel's transposed tiles (one
    launch for q/k/v), not XLA's dequantize + dot (which dequantized every weight per step: llama-3-8b int8
    batch 16 11.6 ms against 4.6 stored on an H200, S12-9); a single row keeps the row kernel."""
    rng = np.random.default_rng(9)
    L, i = 2, 1
    x = jnp.asarray(rng.standard_normal((4, 1, 128)), jnp.bfloat16)
    ws = [jnp.asarray(rng.standard_normal((L, 128, n, 32)), jnp.float32) for n in (4, 2, 2)]
    from jaxinfer.weight_layout import contract_last

    layers = Q.quantize(contract_last({"layers": {"q": ws[0], "k": ws[1], "v": ws[2]}}), "int8")["layers"]
    eqs = ["btd,dnh->btnh", "btd,dkh->btkh", "btd,dkh->btkh"]
    idx = jnp.int32(i)
    products = [(eq, ops.LayerOf(layers[n], idx)) for eq, n in zip(eqs, ("q", "k", "v"))]
    one = jax.eval_shape(lambda: jax.tree.map(lambda a: a[0], layers["q"].values))  # one layer, stored order
    assert ops._kernel_supports(ops._parse("btd,nhd->btnh", x, one), x, one)
    launches = []
    real = ops._pallas_matmuls
    monkeypatch.setattr(ops, "_pallas_matmuls", lambda *a: launches.append(len(a[1])) or real(*a))
    outs = ops.matmuls(x, *products, out_dtype=jnp.float32, impl="pallas")
    assert launches == [3]
    for n, out in zip(("q", "k", "v"), outs):
        deq = np.asarray(Q.dequantize(layers[n].values), np.float64)[i]  # [heads, H, D]: the stored order
        ref = np.einsum("btd,nhd->btnh", np.asarray(x, np.float64), deq)
        assert np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max() < 1e-5


ONE_ROW = [("int8", None, False), ("int8", 64, False), ("int4", 32, False), ("int4", 64, True), ("fp8", None, False)]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("fmt,group,zp", ONE_ROW, ids=[f"{c[0]}-g{c[1]}-zp{int(c[2])}" for c in ONE_ROW])
@pytest.mark.parametrize("fma", [True, False], ids=["cuda-cores", "dot"])
def test_one_row_on_cuda_cores_and_as_a_dot(interpret, fmt, group, zp, fma):
    """One row of x runs either as multiply-adds on the CUDA cores (codes made float32 from their bits) or
    as a 16-row dot, per format (`wm.ONE_ROW_FMA`); both ways are exact up to float32 accumulation."""
    rng = np.random.default_rng(11)
    K, N = 512, 128
    x = jnp.asarray(rng.standard_normal((1, K)) * 4, jnp.bfloat16)
    values, scales, offsets = _case_weight(rng, K, N, fmt, group, zp, 2)
    with switched(wm, {"ONE_ROW_FMA": (fmt,) if fma else ()}):  # traced afresh, restored after
        out = wm.weight_matmul(x, values, scales, offsets, jnp.int32(1), fmt=fmt, group_size=group,
                               interpret=interpret)
    w64 = _np_weight(values[1], scales[1], None if offsets is None else offsets[1], fmt, group)
    ref = np.asarray(x, np.float64) @ w64
    assert np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max() < 1e-5


def test_supports_and_bad_inputs():
    assert not wm.supports(129, 1024, 128, "int8", None)  # more rows than decode
    assert not wm.supports(1, 1024, 128, "plain", 32)  # plain weights have no groups
    assert not wm.supports(1, 1024, 128, "int4", None)  # int4 needs groups
    assert not wm.supports(1, 1024, 128, "int4", 48)  # not a power of two
    assert not wm.supports(1, 1024, 120, "int8", None)  # N not a multiple of 16
    assert not wm.supports(1, 3 * 5 * 7, 128, "int8", None)  # no power-of-two split of K
    x = jnp.ones((2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="unknown format"):
        wm.weight_matmul(x, jnp.zeros((256, 128), jnp.int8), jnp.ones((1, 128)), fmt="int2", group_size=None)
    with pytest.raises(ValueError, match="scales have shape"):
        wm.weight_matmul(x, jnp.zeros((256, 128), jnp.int8), jnp.ones((2, 128)), fmt="int8", group_size=None)
    with pytest.raises(ValueError, match="activations' dtype"):
        wm.weight_matmul(x, jnp.zeros((256, 128), jnp.float32), fmt="plain", group_size=None)
    with pytest.raises(ValueError, match="take no scales"):
        wm.weight_matmul(x, jnp.zeros((256, 128), jnp.bfloat16), jnp.ones((1, 128)), fmt="plain", group_size=None)


@pytest.mark.parametrize("interpret", MODES)
def test_ops_kernel_path_on_model_equations(interpret):
    """ops.matmul(impl="pallas") flattens q/o/down weights to the kernel's [K, N] view correctly."""
    rng = np.random.default_rng(7)
    cases = [("btd,dnh->btnh", (2, 1, 256), (256, 4, 64), (0,), "int4", 64),
             ("btnh,nhd->btd", (3, 1, 4, 64), (4, 64, 128), (0, 1), "int4", 32),
             ("btnh,nhd->btd", (1, 1, 4, 64), (4, 64, 128), (0, 1), "int8", None),
             ("btf,fd->btd", (4, 1, 512), (512, 64), (0,), "fp8", None)]
    for eq, xs, ws, axes, fmt, group in cases:
        x = jnp.asarray(rng.standard_normal(xs), jnp.bfloat16)
        q = Q.quantize_array(jnp.asarray(rng.standard_normal(ws), jnp.float32), fmt, axes, group, zero_point=fmt == "int4")
        spec = ops._parse(eq, x, q)
        assert ops._choose("pallas", spec, x, q) == "pallas", eq
        out = np.asarray(ops.matmul(eq, x, q, jnp.float32, impl="pallas"), np.float64)
        ref = np.einsum(eq, np.asarray(x, np.float64), np.asarray(Q.dequantize(q), np.float64))
        assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5, eq


@pytest.mark.parametrize("interpret", MODES)
def test_ops_kernel_reads_one_layer_of_a_stacked_weight(interpret):
    """ops.matmul on `LayerOf(stacked, i)` (how the layer scan passes weights) gives layer i's product,
    plain and quantized, through the kernel and through the fallback that slices first."""
    rng = np.random.default_rng(11)
    L, i = 3, 2
    x = jnp.asarray(rng.standard_normal((2, 1, 4, 64)), jnp.bfloat16)  # "btnh" with N*H = 256
    w = jnp.asarray(rng.standard_normal((L, 4, 64, 128)), jnp.float32)
    ref = np.einsum("btnh,nhd->btd", np.asarray(x, np.float64), np.asarray(w[i].astype(jnp.bfloat16), np.float64))
    for weight in (w.astype(jnp.bfloat16), Q.quantize_array(w, "int8", (1, 2), None)):
        one = ops.LayerOf(weight, jnp.int32(i))
        ref_w = ref if not isinstance(weight, Q.QArray) else np.einsum(
            "btnh,nhd->btd", np.asarray(x, np.float64), np.asarray(Q.dequantize(one.take()), np.float64))
        spec = ops._parse("btnh,nhd->btd", x, one.shape_view())
        assert ops._choose("pallas", spec, x, one.shape_view(), stacked=True) == "pallas"
        for impl in ("pallas", "xla"):
            out = np.asarray(ops.matmul("btnh,nhd->btd", x, one, jnp.float32, impl=impl), np.float64)
            assert np.abs(out - ref_w).max() / np.abs(ref_w).max() < 1e-5, (impl, type(weight))


@pytest.mark.parametrize("interpret", MODES)
def test_ops_matmuls_share_one_launch(interpret, monkeypatch):
    """ops.matmuls on a layer's q/k/v (LayerOf) launches the kernel once and equals one matmul each;
    mixed formats fall back to one matmul per product."""
    rng = np.random.default_rng(5)
    L, i = 2, 1
    x = jnp.asarray(rng.standard_normal((3, 1, 128)), jnp.bfloat16)
    ws = [jnp.asarray(rng.standard_normal((L, 128, n, 32)), jnp.bfloat16) for n in (4, 2, 2)]
    eqs = ["btd,dnh->btnh", "btd,dkh->btkh", "btd,dkh->btkh"]
    launches = []
    real = ops._pallas_matmuls
    monkeypatch.setattr(ops, "_pallas_matmuls", lambda *a: launches.append(len(a[1])) or real(*a))
    idx = jnp.int32(i)
    products = [(eq, ops.LayerOf(w, idx)) for eq, w in zip(eqs, ws)]
    outs = ops.matmuls(x, *products, out_dtype=jnp.float32, impl="pallas")
    assert launches == [3]
    for (eq, w), out in zip(zip(eqs, ws), outs):
        ref = np.einsum(eq, np.asarray(x, np.float64), np.asarray(w[i], np.float64))
        assert np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max() < 1e-5
    # The same weights contract-last: one launch of the transposed kernel, the same products; on the GPU
    # (`auto`) a single row stays on XLA's row reduction instead.
    from jaxinfer.weight_layout import contract_last

    last = contract_last({"layers": {"q": ws[0], "k": ws[1], "v": ws[2]}})["layers"]
    launches.clear()
    products = [(eq, ops.LayerOf(last[n], idx)) for eq, n in zip(eqs, ("q", "k", "v"))]
    again = ops.matmuls(x, *products, out_dtype=jnp.float32, impl="pallas")
    assert launches == [3]
    for a, b in zip(outs, again):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-4)
    one_row = ops._parse("btd,nhd->btnh", x[:1], last["q"].values[0])
    assert ops._choose("auto", one_row, x[:1], last["q"].values[0], stacked=True) == "gemv"
    launches.clear()
    q8 = Q.quantize_array(ws[1].astype(jnp.float32), "int8", (1,), None)
    mixed = [products[0], (eqs[1], ops.LayerOf(q8, idx))]
    outs = ops.matmuls(x, *mixed, out_dtype=jnp.float32, impl="pallas")
    assert launches == [1, 1]
    ref = np.einsum(eqs[1], np.asarray(x, np.float64), np.asarray(Q.dequantize(ops.LayerOf(q8, idx).take()), np.float64))
    assert np.abs(np.asarray(outs[1], np.float64) - ref).max() / np.abs(ref).max() < 1e-5
