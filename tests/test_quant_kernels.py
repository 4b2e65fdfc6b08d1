"""The fused dequantize-matmul kernel (pallas_kernels/quant_matmul.py) against float64 numpy, in interpret
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
from pallas_kernels import quant_matmul as qm

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


CASES = [  # (M, K, N, fmt, group, zero_point)
    (1, 1024, 128, "int4", 64, True),  # 4 splits of K
    (5, 512, 192, "int4", 32, False),
    (16, 256, 256, "int4", 128, True),
    (1, 1024, 256, "int8", None, False),
    (33, 512, 128, "int8", 64, False),
    (3, 768, 64, "fp8", None, False),  # K = 3 * 256: three splits of a power of two
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("M,K,N,fmt,group,zp", CASES, ids=[f"{c[3]}-g{c[4]}-m{c[0]}" for c in CASES])
def test_kernel_matches_float64(interpret, M, K, N, fmt, group, zp):
    rng = np.random.default_rng(K + N + M)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    q = Q.quantize_array(jnp.asarray(rng.standard_normal((K, N)), jnp.float32), fmt, (0,), group, zero_point=zp)
    scales = q.scales.reshape(-1, N)
    assert qm.supports(M, K, N, fmt, group)
    out = qm.quant_matmul(x, q.values, scales, q.offsets, fmt=fmt, group_size=group, interpret=interpret)
    assert out.shape == (M, N) and out.dtype == jnp.float32
    ref = np.asarray(x, np.float64) @ _np_weight(q.values, scales, q.offsets, fmt, group)
    out = np.asarray(out, np.float64)
    assert not np.isnan(out).any()
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err  # bf16 x and codes are exact in the dot; float32 accumulation only
    # the jnp reference agrees with numpy too
    jref = qm.quant_matmul_reference(x, q.values, scales, q.offsets, fmt=fmt, group_size=group)
    assert np.abs(np.asarray(jref, np.float64) - ref).max() / np.abs(ref).max() < 1e-5


def test_supports_and_bad_inputs():
    assert not qm.supports(65, 1024, 128, "int8", None)  # more rows than decode
    assert not qm.supports(1, 1024, 128, "int4", None)  # int4 needs groups
    assert not qm.supports(1, 1024, 128, "int4", 48)  # not a power of two
    assert not qm.supports(1, 1024, 120, "int8", None)  # N not a multiple of 16
    assert not qm.supports(1, 3 * 5 * 7, 128, "int8", None)  # no power-of-two split of K
    x = jnp.ones((2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="unknown format"):
        qm.quant_matmul(x, jnp.zeros((256, 128), jnp.int8), jnp.ones((1, 128)), fmt="int2", group_size=None)
    with pytest.raises(ValueError, match="scales have shape"):
        qm.quant_matmul(x, jnp.zeros((256, 128), jnp.int8), jnp.ones((2, 128)), fmt="int8", group_size=None)


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
