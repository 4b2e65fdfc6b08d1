"""Quantized weights: the QArray type, `quantize` recipes, `ops.matmul` on quantized weights, bad inputs.

Round trips are checked against bounds derived in numpy float64 from each format's definition, and the
packed int4 layout against an independent numpy unpacking of the bytes.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from jaxinfer import ops
from jaxinfer import quant as Q
from jaxinfer.quant.qarray import dequantize

CONFIG = ji.ModelConfig(vocab_size=96, dim=64, ffn_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64)
TIED = CONFIG.replace(tie_embeddings=True)


def _init(config, seed):
    """Random weights; the rbg key compiles in a fraction of threefry's time (this suite is CPU-bound)."""
    return ji.init_params(config, jax.random.key(seed, impl="rbg"), jnp.float32)


@pytest.fixture(scope="module")
def params():
    return _init(CONFIG, 0)


def _w(shape, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * np.exp(rng.standard_normal(shape[-1:]))  # channel scales vary widely
    w[..., 0, 3] = 0.0  # one all-zero group / channel corner case handled below
    return jnp.asarray(w, dtype)


# ------------------------------------------------------------------------------------------------------
# Round trips against float64 bounds


def test_int8_per_channel_round_trip():
    w = _w((3, 64, 40))
    q = Q.quantize_array(w, "int8", reduce_axes=(-2,))
    assert q.values.dtype == jnp.int8 and q.values.shape == w.shape and q.scales.shape == (3, 1, 40)
    w64 = np.asarray(w, np.float64)
    amax = np.abs(w64).max(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(q.scales, np.float64), np.where(amax == 0, 1, amax / 127), rtol=1e-6)
    codes = np.asarray(q.values, np.int64)
    assert np.abs(codes).max() == 127  # each channel's largest element maps to +-127
    err = np.abs(np.asarray(dequantize(q), np.float64) - w64)
    assert (err <= 0.5 * np.asarray(q.scales, np.float64) * (1 + 1e-5) + 1e-12).all()
    # dequantize is exactly codes * scale
    np.testing.assert_allclose(np.asarray(dequantize(q)), codes * np.asarray(q.scales, np.float64), rtol=1e-6)


def _imp(w, axis):
    """The search's error weights (data-free): sqrt(group mean square + w^2)."""
    return np.sqrt((w * w).mean(axis=axis, keepdims=True) + w * w)


def test_fp8_per_channel_round_trip():
    import ml_dtypes

    w = _w((64, 48), 1)
    q = Q.quantize_array(w, "fp8", reduce_axes=(0,))
    assert q.values.dtype == jnp.float8_e4m3fn and q.scales.shape == (1, 48)
    w64 = np.asarray(w, np.float64)
    s = np.asarray(q.scales, np.float64)
    amax = np.maximum(np.abs(w64).max(0, keepdims=True), 1e-30)
    assert (s >= amax / 448 * (1 - 1e-6)).all() and (s <= amax / 224 * (1 + 1e-6)).all()  # one octave up
    deq = np.asarray(dequantize(q), np.float64)
    np.testing.assert_allclose(deq, np.asarray(q.values, np.float64) * s, rtol=1e-6)  # float32 product
    err = np.abs(deq - w64)
    # e4m3: 3 mantissa bits -> half an ulp is 2^-4 relative for normals; subnormal spacing is 2^-9 * scale
    assert (err <= (np.abs(w64) * 2.0**-4 + s * 2.0**-10) * (1 + 1e-5)).all()
    # the searched scale is no worse (by the weighted error it minimises) than plain amax/448
    plain_s = (amax / 448).astype(np.float32).astype(np.float64)
    plain = (w64 / plain_s).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * plain_s
    imp = _imp(w64, 0)
    ours, theirs = (imp * (deq - w64) ** 2).sum(0), (imp * (plain - w64) ** 2).sum(0)
    assert (ours <= theirs * (1 + 1e-5)).all() and (ours < theirs * 0.99).any()  # float32 sums inside


@pytest.mark.parametrize("group", [32, 64])
def test_int4_asymmetric_round_trip_and_layout(group):
    w = _w((5, 128, 24), 2)
    q = Q.quantize_array(w, "int4", reduce_axes=(-2,), group_size=group, zero_point=True)
    G = 128 // group
    assert q.values.dtype == jnp.uint8 and q.values.shape == (5, 64, 24)
    assert q.scales.shape == q.offsets.shape == (5, G, 24) and q.scales.dtype == jnp.float16
    assert q.shape == (5, 128, 24)
    # Independent unpacking: group i, byte j holds element i*g + j (low nibble) and i*g + g/2 + j (high).
    packed = np.asarray(q.values).reshape(5, G, group // 2, 24)
    codes = np.concatenate([packed & 15, packed >> 4], axis=2).astype(np.float64)  # [5, G, g, 24]
    s = np.asarray(q.scales, np.float64)[:, :, None]
    m = np.asarray(q.offsets, np.float64)[:, :, None]
    ref = codes * s + m  # [5, G, g, 24]
    np.testing.assert_allclose(np.asarray(dequantize(q), np.float64), ref.reshape(5, 128, 24), rtol=1e-6, atol=1e-7)
    assert codes.min() == 0 and codes.max() == 15
    # No worse than plain min/max quantization (float16 scale and offset), by the weighted error searched.
    wg = np.asarray(w, np.float64).reshape(5, G, group, 24)
    lo, hi = wg.min(2, keepdims=True), wg.max(2, keepdims=True)
    ps = ((hi - lo) / 15).astype(np.float16).astype(np.float64)
    pm = lo.astype(np.float16).astype(np.float64)
    plain = np.clip(np.round((wg - pm) / ps), 0, 15) * ps + pm
    imp = _imp(wg, 2)
    ours, theirs = (imp * (ref - wg) ** 2).sum(2), (imp * (plain - wg) ** 2).sum(2)
    assert (ours <= theirs * (1 + 1e-4) + 1e-12).all() and (ours < theirs * 0.99).mean() > 0.5
    assert np.linalg.norm(ref - wg) / np.linalg.norm(wg) < 0.1  # 16 levels: ~6-8 % relative


def test_int4_symmetric_round_trip():
    w = _w((64, 16), 3)
    q = Q.quantize_array(w, "int4", reduce_axes=(0,), group_size=32)
    assert q.offsets is None
    packed = np.asarray(q.values).reshape(2, 16, 16)
    codes = np.concatenate([packed & 15, packed >> 4], axis=1).astype(np.float64) - 8  # [2, 32, 16]
    d = np.asarray(q.scales, np.float64)[:, None, :]
    ref = codes * d
    np.testing.assert_allclose(np.asarray(dequantize(q), np.float64), ref.reshape(64, 16), rtol=1e-6, atol=1e-8)
    wg = np.asarray(w, np.float64).reshape(2, 32, 16)
    big = np.take_along_axis(wg, np.abs(wg).argmax(1)[:, None], 1)  # signed largest magnitude: GGUF Q4_0
    pd = (big / -8).astype(np.float16).astype(np.float64)
    plain = np.clip(np.round(wg / pd), -8, 7) * pd
    imp = _imp(wg, 1)
    ours, theirs = (imp * (ref - wg) ** 2).sum(1), (imp * (plain - wg) ** 2).sum(1)
    assert (ours <= theirs * (1 + 1e-4) + 1e-12).all() and (ours < theirs).any()
    assert np.linalg.norm(ref - wg) / np.linalg.norm(wg) < 0.12


def test_importance_weights_the_search():
    """Calibration: a channel marked important gets a smaller error than without the marking."""
    w = _w((64, 32), 8)
    act = np.ones((64, 1), np.float32)
    act[5] = 1e4
    plain = Q.quantize_array(w, "int4", (0,), 64, zero_point=True)
    marked = Q.quantize_array(w, "int4", (0,), 64, zero_point=True, importance=jnp.asarray(act))
    e = lambda q: np.abs(np.asarray(dequantize(q), np.float64) - np.asarray(w, np.float64))
    assert e(marked)[5].mean() < 0.7 * e(plain)[5].mean()


def test_bits_and_bytes():
    w = jnp.zeros((1024, 256), jnp.bfloat16)
    assert Q.bits_per_element(Q.quantize_array(w, "int8", (0,))) == pytest.approx(8 + 32 / 1024)
    assert Q.bits_per_element(Q.quantize_array(w, "int4", (0,), 64, zero_point=True)) == pytest.approx(4.5)
    q = Q.quantize_array(w, "int8", (0,))
    assert not np.isnan(np.asarray(dequantize(q), np.float32)).any()  # all-zero channels: scale 1, no NaN


# ------------------------------------------------------------------------------------------------------
# quantize on trees


@pytest.mark.parametrize("recipe", ["int8", "fp8", "int4-g32"])
def test_quantize_tree_and_abstract_tree_agree(params, recipe):
    qp = Q.quantize(params, recipe)
    for name in Q.LAYER_MATRICES:
        assert isinstance(qp["layers"][name], Q.QArray)
        assert qp["layers"][name].shape == params["layers"][name].shape
    assert isinstance(qp["lm_head"], Q.QArray) and not isinstance(qp["embed"], Q.QArray)
    assert qp["final_norm"] is params["final_norm"]
    abstract = Q.quantize(ji.abstract_params(CONFIG, jnp.float32), recipe)
    concrete = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), qp)
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    assert jax.tree.leaves(abstract) == jax.tree.leaves(concrete)
    # logical axis names: a tree of the same structure, one name per dimension of each child
    names = qp["layers"]["w_down"].axis_names()
    assert names.values == ("layers", "ffn", "embed")
    jax.tree.map(lambda a, n: None if len(a.shape) == len(n) else pytest.fail("axis names"),
                 qp["layers"]["w_down"], names, is_leaf=lambda x: isinstance(x, tuple))


def test_quantize_selects_by_path(params):
    qp = Q.quantize(params, Q.Recipe("int8", matrices=("w_gate", "w_up"), lm_head=False, embed=True))
    quantized = {k for k, v in qp["layers"].items() if isinstance(v, Q.QArray)}
    assert quantized == {"w_gate", "w_up"}
    assert isinstance(qp["embed"], Q.QArray) and not isinstance(qp["lm_head"], Q.QArray)
    assert qp["embed"].reduce_axes == (-1,) and qp["embed"].scales.shape == (CONFIG.vocab_size, 1)
    # a stacked leaf is quantized layer by layer with the same result as all at once
    whole = Q.quantize_array(params["layers"]["w_up"], "int8", (-2,), logical_axes=("layers", "embed", "ffn"))
    np.testing.assert_array_equal(np.asarray(whole.values), np.asarray(qp["layers"]["w_up"].values))


def test_bad_inputs(params):
    with pytest.raises(ValueError, match="unknown quantization recipe 'int3'"):
        Q.quantize(params, "int3")
    with pytest.raises(TypeError, match="preset name or a jaxinfer.quant.Recipe"):
        Q.quantize(params, 8)
    with pytest.raises(ValueError, match="unknown quantization format 'int2'"):
        Q.Recipe("int2")
    with pytest.raises(ValueError, match=r"group size 48 does not divide dimension 64 \(axis -3 of layers/k"):
        Q.quantize(params, Q.Recipe("int4", 48))
    with pytest.raises(ValueError, match="group size 128 does not divide dimension 64"):
        Q.quantize(params, "int4-g128")  # q/k/v/gate/up contract dim = 64, o's head_dim is 64
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize(Q.quantize(params, "int8"), "int8")
    with pytest.raises(ValueError, match="int4 needs a group size"):
        Q.Recipe("int4")
    with pytest.raises(ValueError, match="group size must be a positive even integer"):
        Q.Recipe("int4", 33)
    with pytest.raises(ValueError, match="unknown layer matrices"):
        Q.Recipe("int8", matrices=("q_proj",))
    with pytest.raises(ValueError, match="zero points are only supported for int4"):
        Q.Recipe("int8", zero_point=True)
    with pytest.raises(ValueError, match="unknown matmul impl"):
        ops.matmul("bd,df->bf", jnp.ones((1, 64)), Q.quantize_array(params["layers"]["w_up"][0], "int8", (0,)),
                   impl="cuda")


# ------------------------------------------------------------------------------------------------------
# ops.matmul / ops.embed


EQUATIONS = [  # (equation, x shape, w shape, reduce axes): every product the model makes
    ("btd,dnh->btnh", (2, 3, 64), (64, 4, 64), (0,)),
    ("btnh,nhd->btd", (2, 3, 4, 64), (4, 64, 64), (0, 1)),
    ("btf,fd->btd", (2, 3, 128), (128, 64), (0,)),
    ("btd,vd->btv", (2, 3, 64), (96, 64), (1,)),
]


@pytest.mark.parametrize("eq,xs,ws,axes", EQUATIONS)
@pytest.mark.parametrize("fmt,group", [("int8", None), ("fp8", None), ("int4", 32), ("int8", 32)])
def test_matmul_matches_float64_of_dequantized(eq, xs, ws, axes, fmt, group):
    x = _w(xs, 4)
    q = Q.quantize_array(_w(ws, 5), fmt, axes, group, zero_point=fmt == "int4")
    ref = np.einsum(eq, np.asarray(x, np.float64), np.asarray(dequantize(q), np.float64))
    out = ops.matmul(eq, x, q, out_dtype=jnp.float32)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    bf = ops.matmul(eq, x.astype(jnp.bfloat16), q)
    assert bf.dtype == jnp.bfloat16
    rel = np.linalg.norm(np.asarray(bf, np.float64) - ref) / np.linalg.norm(ref)
    assert rel < 1e-2


@pytest.mark.parametrize("fmt,group,zp", [("int8", None, False), ("fp8", None, False), ("int4", 32, True),
                                          ("int4", 64, False), ("int8", 32, False)])
def test_single_row_gemv_path(fmt, group, zp):
    """Batch-1 decode's path (`qgemv`: codes read in place, int4 bytes paired with their two activations)."""
    rng = np.random.default_rng(11)
    for eq, xs, ws, axes in EQUATIONS:
        x = jnp.asarray(rng.standard_normal((1, 1, *xs[2:])), jnp.float32)
        q = Q.quantize_array(jnp.asarray(rng.standard_normal(ws), jnp.float32), fmt, axes, group, zero_point=zp)
        if jax.default_backend() != "gpu":
            assert ops._choose("auto", ops._parse(eq, x, q), x, q) == "gemv"
        ref = np.einsum(eq, np.asarray(x, np.float64), np.asarray(dequantize(q), np.float64))
        out = np.asarray(ops.matmul(eq, x, q, jnp.float32, impl="gemv"), np.float64)
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max(), eq


@pytest.mark.parametrize("eq,xs,ws,axes", EQUATIONS)
def test_native_fp8_matmul_error_bound(eq, xs, ws, axes):
    """fp8 x fp8 (activations per token, weights per channel): relative error of a few e4m3 ulps."""
    x, w = _w(xs, 6), _w(ws, 7)
    q = Q.quantize_array(w, "fp8", axes)
    ref = np.einsum(eq, np.asarray(x, np.float64), np.asarray(w, np.float64))
    out = np.asarray(ops.matmul(eq, x, q, out_dtype=jnp.float32, impl="fp8"), np.float64)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 1e-3 < rel < 0.06, rel  # it does quantize the activations (not exact), within ~2 ulps of e4m3


def test_embed_rows(params):
    table = Q.quantize_array(params["embed"], "int4", (-1,), 32, zero_point=True)
    tokens = jnp.asarray([[3, 95, 0], [7, 7, 50]])
    rows = ops.embed(table, tokens)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(dequantize(table))[np.asarray(tokens)])
    np.testing.assert_array_equal(np.asarray(ops.embed(params["embed"], tokens)),
                                  np.asarray(params["embed"])[np.asarray(tokens)])


# ------------------------------------------------------------------------------------------------------
# The model on a quantized tree


_FORWARD = {}


def _logits(params, config, tokens):
    if config not in _FORWARD:  # one jit per config: the float tree and its dequantized copy share it
        _FORWARD[config] = jax.jit(lambda p, c, t: ji.forward(p, c, t, config=config)[0])
    cache = ji.init_cache(config, tokens.shape[0], 32, jnp.float32)
    return np.asarray(_FORWARD[config](params, cache, tokens), np.float64)


@pytest.mark.parametrize(
    "recipe,config,tol",
    [("int8", CONFIG, 0.02), ("int4-g32", CONFIG, 0.3), (Q.Recipe("fp8", embed=True), TIED, 0.08)],
    ids=["int8", "int4-g32", "fp8-tied-embed"],
)
def test_forward_on_quantized_tree(recipe, config, tol):
    params = _init(config, 1)
    qp = Q.quantize(params, recipe)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 7)))
    ref, deq, got = _logits(params, config, tokens), _logits(Q.dequantize_tree(qp), config, tokens), _logits(qp, config, tokens)
    # the quantized tree computes exactly what its dequantized float tree computes ...
    assert np.abs(got - deq).max() < 1e-4 * np.abs(deq).max()
    # ... which is close to the float model, by a margin that orders the formats
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert tol / 100 < rel < tol, rel  # something was quantized, and not too coarsely


def test_generate_on_quantized_tree(params):
    """Greedy generation on an int8 tree equals the argmax of the teacher-forced quantized forward."""
    qp = Q.quantize(params, "int8")
    prompts = [[1, 2, 3], [50, 6, 70]]
    out = ji.generate(ji.Model(config=CONFIG, params=qp), prompts, max_new_tokens=4).token_ids
    tokens = jnp.asarray([p + o for p, o in zip(prompts, out)])  # [2, 7]: the shape compiled above
    greedy = _logits(qp, CONFIG, tokens).argmax(-1)[:, 2:6]
    np.testing.assert_array_equal(np.asarray(out), greedy)


# ------------------------------------------------------------------------------------------------------
# Serialization


def test_save_and_load_round_trip(params, tmp_path):
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    tree = Q.quantize(bf, Q.Recipe("int4", 32, zero_point=True, matrices=("o", "w_down", "q", "k"), embed=True))
    tree["layers"] = {**tree["layers"], **{k: v for k, v in Q.quantize(bf, "fp8")["layers"].items() if k in ("q", "k")}}
    path = Q.save_quantized(tmp_path / "p.safetensors", tree, config=CONFIG, recipe="int4-g32")
    loaded, config = Q.load_quantized(path)
    assert config == CONFIG
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)  # static fields included
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(loaded)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))  # bit exact
    assert loaded["layers"]["q"].fmt == "fp8" and loaded["layers"]["o"].logical_axes == ("layers", "q_heads", "head_dim", "embed")
    abstract, _ = Q.load_quantized(path, abstract=True)
    assert jax.tree.structure(abstract) == jax.tree.structure(tree)
    assert all(isinstance(a, jax.ShapeDtypeStruct) and a.shape == b.shape and a.dtype == b.dtype
               for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(tree)))


def test_save_and_load_keep_the_layout_wrappers(params, tmp_path):
    """Trees in the command line's layouts (contract-last, quantized; contract-last with q/k/v packed) come back
    with their `ContractLast` / `Packed` leaves, not as dicts of their children."""
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    for tree in (Q.quantize(ji.contract_last(bf), "int8"), ji.contract_last(bf, pack_qkv=True)):
        loaded, _ = Q.load_quantized(Q.save_quantized(tmp_path / "l.safetensors", tree))
        assert jax.tree.structure(loaded) == jax.tree.structure(tree)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(loaded)):
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_load_errors(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not written by jaxinfer.quant.save_quantized"):
        Q.load_quantized(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="no parameter file"):
        Q.load_quantized(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------------------
# GGUF blocks straight into QArrays


def _q4_k_bytes(shape, rng):
    """Random Q4_K blocks for a [rows, cols] matrix (cols % 256 == 0), finite float16 super-scales."""
    n = shape[0] * shape[1] // 256
    blocks = rng.integers(0, 256, (n, 144), dtype=np.uint8)
    for start in (0, 2):
        blocks[:, start : start + 2] = rng.uniform(-0.05, 0.05, (n, 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(shape[0], -1)


def _load_both(path):
    """(float model, keep_quantized model) of a tokenizer-less GGUF file, through the loader's pieces."""
    from jaxinfer.checkpoint import gguf as g
    from jaxinfer.checkpoint.hf_names import assemble_params
    from jaxinfer.quant.gguf import assemble_gguf_quantized

    reader = g.open_gguf(path)
    hf = g.read_gguf_config(reader)
    config = ji.ModelConfig.from_hf(hf)
    plain = assemble_params(g.iter_gguf_tensors(reader, hf), config, jnp.float32)
    kept, _ = assemble_gguf_quantized(reader, hf, config, jnp.float32)
    return ji.Model(config=config, params=plain), ji.Model(config=config, params=kept)


def test_gguf_keep_quantized_is_exact(tmp_path):
    """A two-layer llama file mixing Q4_0, Q4_1, Q8_0, Q4_K, F16 and F32: keep_quantized gives QArrays
    whose dequantization equals the float loader's tensors exactly, and the same logits."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from test_gguf import _GGUF_NAMES, _tiny_model, llama_cpp_permute, write_gguf

    rng = np.random.default_rng(0)
    hf = {**_tiny_model(rng, bias=False, ffn=256)}
    second = _tiny_model(np.random.default_rng(1), bias=False, ffn=256)
    hf.update({k.replace("layers.0", "layers.1"): v for k, v in second.items() if ".layers.0." in k})
    names = {**_GGUF_NAMES, **{k.replace("layers.0", "layers.1"): v.replace("blk.0", "blk.1") for k, v in _GGUF_NAMES.items()}}
    encodings = {"q_proj": T.Q4_0, "k_proj": T.Q4_1, "v_proj": T.Q8_0, "o_proj": T.Q4_1, "gate_proj": T.F16,
                 "up_proj": T.Q4_0, "embed_tokens": T.Q8_0, "lm_head": T.Q4_1}
    tensors = {}
    for name, w in hf.items():
        if "q_proj" in name or "k_proj" in name:
            w = llama_cpp_permute(w, 4 if "q_proj" in name else 2)
        kind = next((t for k, t in encodings.items() if k in name), T.F32)
        if "down_proj" in name:  # Q4_K in layer 0, Q8_0 in layer 1: mixed, so this leaf stays float
            tensors[names[name]] = (_q4_k_bytes(w.shape, rng), T.Q4_K) if "layers.0" in name else \
                (gguf.quants.quantize(w, T.Q8_0), T.Q8_0)
        elif kind == T.F16:
            tensors[names[name]] = w.astype(np.float16)
        elif kind == T.F32:
            tensors[names[name]] = w
        else:
            tensors[names[name]] = (gguf.quants.quantize(w, kind), kind)
    path = write_gguf(tmp_path / "mixed.gguf", "llama", tensors, **{"{arch}.block_count": 2,
                                                                     "{arch}.feed_forward_length": 256})
    plain, kept = _load_both(path)
    L = kept.params["layers"]
    assert L["q"].fmt == "int4" and L["q"].offsets is None and L["q"].group_size == 32
    assert L["k"].fmt == "int4" and L["k"].offsets is not None and L["v"].fmt == "int8"
    assert isinstance(kept.params["embed"], Q.QArray) and isinstance(kept.params["lm_head"], Q.QArray)
    assert not isinstance(L["w_gate"], Q.QArray) and not isinstance(L["w_down"], Q.QArray)
    assert not isinstance(L["o"], Q.QArray)  # head_dim 16: its 32-blocks straddle heads
    deq = Q.dequantize_tree(kept.params)
    for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(deq)[0], jax.tree.leaves(plain.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(p))
    tokens = jnp.asarray([[1, 5, 9, 30, 2]])
    logits = lambda m: np.asarray(ji.forward(m.params, ji.init_cache(m.config, 1, 8, jnp.float32), tokens,
                                             config=m.config)[0])
    np.testing.assert_allclose(logits(kept), logits(plain), rtol=1e-4, atol=1e-4)
    # Q4_K alone (a one-layer file): kept as int4 with float32 scales and offsets, exactly
    one = {k: v for k, v in tensors.items() if not k.startswith("blk.1.")}
    path1 = write_gguf(tmp_path / "q4k.gguf", "llama", one, **{"{arch}.feed_forward_length": 256})
    p1, k1 = _load_both(path1)
    assert k1.params["layers"]["w_down"].fmt == "int4" and k1.params["layers"]["w_down"].scales.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(Q.dequantize(k1.params["layers"]["w_down"])),
                                  np.asarray(p1.params["layers"]["w_down"]))
    with pytest.raises(ValueError, match="keep_quantized applies to GGUF files"):
        ji.load("tiny", keep_quantized=True)


def test_cache_takes_the_compute_dtype_of_a_quantized_tree(params, monkeypatch):
    """The cache of a bf16 tree whose first leaf is a quantized embedding (float32 scales) is bf16."""
    gen = importlib.import_module("jaxinfer.generate")  # the package exports a function of that name

    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    qp = Q.quantize(bf, Q.Recipe("int8", None, embed=True, scale_dtype="float32"))
    assert jax.tree.leaves(qp)[0].dtype == jnp.float32  # what the cache dtype was once read from
    seen = []
    real = gen.init_cache_on
    monkeypatch.setattr(gen, "init_cache_on", lambda *a: seen.append(a[-1]) or real(*a))
    ji.generate(ji.Model(config=CONFIG, params=qp), [[1, 2, 3]], max_new_tokens=2)
    assert seen == [jnp.bfloat16]
