"""`contract_last`: the weight matrices stored with their contracted axes last (XLA's row-reduction layout).

The transform must change nothing but the storage order: the model's logits on the transposed tree equal
those on the tree as stored, for one-row products (the `gemv` row reduction), several rows (einsum on the
rewritten equation) and the tied / untied heads; bad inputs are clear errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from jaxinfer import ops
from jaxinfer import quant as Q

CONFIG = ji.ModelConfig(vocab_size=96, dim=64, ffn_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        qkv_bias=True)
TIED = CONFIG.replace(tie_embeddings=True, qkv_bias=False)


def _params(config, seed=0):
    return ji.init_params(config, jax.random.key(seed, impl="rbg"), jnp.float32)


def test_stored_arrays_are_the_transposes():
    params = _params(CONFIG)
    t = ji.contract_last(params)
    layers, tl = params["layers"], t["layers"]
    expect = {"q": (0, 2, 3, 1), "k": (0, 2, 3, 1), "v": (0, 2, 3, 1), "o": (0, 3, 1, 2),
              "w_gate": (0, 2, 1), "w_up": (0, 2, 1), "w_down": (0, 2, 1)}
    for name, order in expect.items():
        assert isinstance(tl[name], ji.ContractLast)
        np.testing.assert_array_equal(np.asarray(tl[name].values), np.transpose(np.asarray(layers[name]), order))
        assert tl[name].shape == layers[name].shape  # the logical shape is kept
    np.testing.assert_array_equal(np.asarray(t["lm_head"].values), np.asarray(params["lm_head"]).T)
    for name in ("attn_norm", "mlp_norm", "q_bias"):  # vectors are left as they are
        assert t["layers"][name] is layers[name]
    assert t["embed"] is params["embed"] and t["final_norm"] is params["final_norm"]
    # the abstract tree gives the same stored shapes without computing anything
    abstract = ji.contract_last(ji.abstract_params(CONFIG, jnp.float32))
    assert jax.tree.map(lambda a: tuple(a.shape), abstract) == jax.tree.map(lambda a: tuple(a.shape), t)


def _logits(params, config, tokens, cache_len=16):
    cache = ji.init_cache(config, tokens.shape[0], cache_len, params["embed"].dtype)
    logits, cache = ji.forward(params, cache, tokens, config=config)
    step, _ = ji.forward(params, cache, tokens[:, -1:], config=config)  # one more token: one-row products at B=1
    return np.asarray(logits, np.float64), np.asarray(step, np.float64)


@pytest.mark.parametrize("config", [CONFIG, TIED], ids=["untied-bias", "tied"])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_equals_the_stored_layout(config, batch):
    params = _params(config, 1)
    tokens = jnp.asarray(np.random.default_rng(batch).integers(0, config.vocab_size, (batch, 5)))
    ref_prefill, ref_step = _logits(params, config, tokens)
    got_prefill, got_step = _logits(ji.contract_last(params), config, tokens)
    for got, ref in ((got_prefill, ref_prefill), (got_step, ref_step)):
        assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max(), np.abs(got - ref).max()


def _one_row_against_float64(seed, name, eq, w_shape):
    """Layer 1 of a random stacked weight `name`, made contract-last, times one random row through the
    `gemv` path: checked against float64; returns the compiled program's text."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = rng.standard_normal((1, 1, w_shape[1])).astype(np.float32)
    t = ji.contract_last({"layers": {name: jnp.asarray(w)}})["layers"][name]
    fn = jax.jit(lambda x, t, i: ops.matmul(eq, x, ops.LayerOf(t, i), impl="gemv"))
    want = np.einsum(eq, x.astype(np.float64), w[1].astype(np.float64))
    np.testing.assert_allclose(np.asarray(fn(x, t, 1), np.float64), want, rtol=1e-5, atol=1e-5)
    return fn.lower(x, t, 1).compile().as_text()


def test_one_row_product_is_a_row_reduction():
    """The one-row product of a contract-last weight reduces over the stored array's trailing axis (no
    transpose of the weight in the program), and equals the float64 product."""
    hlo = _one_row_against_float64(0, "q", "btd,dnh->btnh", (3, 64, 4, 16))  # [L, D, N, H] like q
    assert "transpose(" not in hlo
    assert "f32[64]{0} reduce(" in hlo and "dimensions={1}" in hlo  # [N*H, D] summed over its minor axis D


def test_long_rows_are_summed_in_chunks(monkeypatch):
    """Rows of at least `ROW_SPLIT_MIN_K` (down's 14336 in llama-3-8b) are summed in `ROW_SPLITS` chunks, then
    across them: the same product as float64, and the program holds the [N, ROW_SPLITS] partial sums."""
    monkeypatch.setattr(ops, "ROW_SPLIT_MIN_K", 512)
    hlo = _one_row_against_float64(1, "w_down", "btf,fd->btd", (2, 1024, 24))  # [L, F, D] like w_down
    assert f"f32[24,{ops.ROW_SPLITS}]" in hlo


@pytest.mark.parametrize("recipe", ["int8", Q.Recipe("int4", 16), Q.Recipe("int4", 16, zero_point=True), "fp8"],
                         ids=["int8", "int4-g16", "int4-g16-offsets", "fp8"])
def test_quantized_after_the_transform(recipe):
    """Quantizing a contract-last tree makes the same codes and scales as quantizing the tree as stored (the
    groups run along the same contracted axis), laid out in the stored order; the logits agree."""
    params = _params(CONFIG, 2)
    stored, last = Q.quantize(params, recipe), Q.quantize(ji.contract_last(params), recipe)
    for name in ("q", "o", "w_down"):
        t = last["layers"][name]
        assert isinstance(t, ji.ContractLast) and isinstance(t.values, Q.QArray)
        back = Q.dequantize_tree(t.values)  # stored order: [L, out..., in...]
        want = np.asarray(Q.dequantize_tree(stored["layers"][name]))
        order = {"q": (0, 2, 3, 1), "o": (0, 3, 1, 2), "w_down": (0, 2, 1)}[name]
        np.testing.assert_array_equal(np.asarray(back), np.transpose(want, order))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, 5)))
    for a, b in zip(_logits(stored, CONFIG, tokens), _logits(last, CONFIG, tokens)):
        assert np.abs(a - b).max() < 1e-4 * np.abs(a).max(), np.abs(a - b).max()


def test_bad_inputs():
    params = _params(CONFIG)
    t = ji.contract_last(params)
    with pytest.raises(ValueError, match="already in the contract-last layout"):
        ji.contract_last(t)
    with pytest.raises(ValueError, match="importance"):
        Q.quantize(t, "int8", importance={})
    with pytest.raises(ValueError, match=r"layers/\w+ is quantized \(int8\)"):
        ji.contract_last(Q.quantize(params, "int8"))
    bad = {**params, "layers": {**params["layers"], "w_up": params["layers"]["w_up"][0]}}
    with pytest.raises(ValueError, match="layers/w_up has shape"):
        ji.contract_last(bad)
    with pytest.raises(ValueError, match="does not fit the weight"):
        ops.matmul("btd,df->btf", jnp.ones((1, 1, 64)), t["layers"]["w_up"])  # still stacked: one axis too many


def test_bench_takes_the_layout():
    from jaxinfer.bench.runner import BenchSpec, build_params

    with pytest.raises(ValueError, match="unknown weight layout 'rows'"):
        BenchSpec(config=CONFIG, weight_layout="rows")
    params = build_params(CONFIG, jnp.float32, layout="contract-last")
    assert isinstance(params["layers"]["w_down"], ji.ContractLast) and isinstance(params["lm_head"], ji.ContractLast)
    assert "q" not in params["layers"] and isinstance(params["layers"]["qkv"].values, ji.ContractLast)  # float: packed
    quantized = build_params(CONFIG, jnp.float32, quant="int8", layout="contract-last")
    assert isinstance(quantized["layers"]["q"], ji.ContractLast) and "qkv" not in quantized["layers"]


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", [None, "int8"])
def test_contract_last_on_the_gpu(recipe):
    """On the GPU the contract-last tree runs XLA's row reductions (the stored tree the Pallas weight
    kernel): same greedy logits within bf16 rounding, batch 1 (one-row products) and 4."""
    config = CONFIG.replace(dim=256, ffn_dim=512, head_dim=64)
    params = ji.init_params(config, jax.random.key(3, impl="rbg"), jnp.bfloat16)
    last = ji.contract_last(params)
    if recipe:
        params, last = Q.quantize(params, recipe), Q.quantize(last, recipe)
    for batch in (1, 4):
        tokens = jnp.asarray(np.random.default_rng(batch).integers(0, config.vocab_size, (batch, 6)))
        for a, b in zip(_logits(params, config, tokens), _logits(last, config, tokens)):
            assert np.abs(a - b).max() < 0.03 * np.abs(a).max(), (batch, np.abs(a - b).max())
