"""Packed q/k/v (`jaxinfer.packing`): each layer's q, k and v stored as one matrix and multiplied as one.

The packed tree must give the unpacked tree's logits and tokens (float32, prefill and decode, both layouts);
`ops.matmuls` must make one product of the three parts and `attention.rotate_write_attend` hand that
product whole to the decode kernel (interpret mode standing in for the GPU); quantizing, sharding or packing
a packed tree again must fail with a message naming the problem, as must a tree packed per tensor shard
(`shards=`) run whole.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from jaxinfer import ops, sharding
from jaxinfer.packing import Packed, pack_qkv
from kernel_tools import pallas_call_name, pallas_call_names, pallas_calls, rel_err

CONFIG = ji.ModelConfig(vocab_size=96, dim=64, ffn_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32)


def _run(params, tokens, dtype=jnp.float32, impl="xla"):
    """Prefill all but the last token, then decode it: (prefill logits, decode logits, cache)."""
    cache = ji.init_cache(CONFIG, tokens.shape[0], 8, dtype)
    first, cache = jax.jit(functools.partial(ji.forward, config=CONFIG))(params, cache, tokens[:, :-1])
    step = functools.partial(ji.forward, config=CONFIG, impl=impl)
    last, cache = jax.jit(step)(params, cache, tokens[:, -1:])
    return first, last, cache


@pytest.mark.parametrize("layout", ["stored", "contract-last"])
def test_packed_tree_gives_the_unpacked_logits(layout):
    params = ji.init_params(CONFIG, jax.random.key(1, impl="rbg"), jnp.float32)
    if layout == "contract-last":
        params = ji.contract_last(params)
    packed = pack_qkv(params)
    leaf = packed["layers"]["qkv"]
    assert isinstance(leaf, Packed) and not {"q", "k", "v"} & set(packed["layers"])
    assert leaf.shape[:1] == (CONFIG.num_layers,) and leaf.parts == (("q", 4), ("k", 2), ("v", 2))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 6)))
    for got, want in zip(_run(packed, tokens)[:2], _run(params, tokens)[:2]):
        assert rel_err(got, want) < 1e-5
        assert (np.asarray(got).argmax(-1) == np.asarray(want).argmax(-1)).all()
    abstract = pack_qkv(jax.eval_shape(lambda: params))  # shapes only
    assert abstract["layers"]["qkv"].shape == leaf.shape


def test_the_three_products_are_one():
    """`ops.matmuls` over the parts: one reduction (gemv, one row) for all three, cut into `ops.Sliced`."""
    params = pack_qkv(ji.contract_last(ji.init_params(CONFIG, jax.random.key(2, impl="rbg"), jnp.bfloat16)))
    x = jnp.ones((1, 1, CONFIG.dim), jnp.bfloat16)

    def qkv(layers):
        from jaxinfer.model import layer_view

        p = layer_view(layers, jnp.int32(1))
        return ops.matmuls(x, ("btd,dnh->btnh", p["q"]), ("btd,dkh->btkh", p["k"]), ("btd,dkh->btkh", p["v"]))

    out = qkv(params["layers"])
    assert all(isinstance(t, ops.Sliced) and t.whole is out[0].whole for t in out)
    assert [t.shape for t in out] == [(1, 1, 4, 32), (1, 1, 2, 32), (1, 1, 2, 32)]
    jaxpr = jax.make_jaxpr(lambda layers: tuple(t.value() for t in qkv(layers)))(params["layers"])
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns].count("reduce_sum") == 1


def test_decode_kernel_reads_the_packed_product(monkeypatch):
    """A one-token bf16 step with the GPU's kernels (interpret mode): the decode attention launch takes the
    packed product whole, once for q, k and v; logits and cache as the XLA path's to bf16 rounding."""
    params = ji.init_params(CONFIG, jax.random.key(3, impl="rbg"), jnp.bfloat16)
    packed = ji.contract_last(params, pack_qkv=True)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CONFIG.vocab_size, (2, 6)))
    *_, want_last, want_cache = _run(params, tokens, jnp.bfloat16)
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    monkeypatch.setattr(ops, "ADD_NORM_KERNEL", False)
    cache = ji.init_cache(CONFIG, 2, 8, jnp.bfloat16)
    _, cache = ji.forward(packed, cache, tokens[:, :-1], config=CONFIG)
    step = functools.partial(ji.forward, config=CONFIG, impl="auto")
    jaxpr = jax.make_jaxpr(step)(packed, cache, tokens[:, -1:])
    assert pallas_call_names(jaxpr.jaxpr) == ["decode_attention", "combine_splits"]
    (call,) = [e for e in pallas_calls(jaxpr.jaxpr) if pallas_call_name(e) == "decode_attention"]
    whole = [v for v in call.invars if tuple(v.aval.shape) == (2, 8, 32)]  # [B, N + 2K, H]
    assert len(whole) == 3 and whole[0] is whole[1] is whole[2]
    got_last, got_cache = jax.jit(step)(packed, cache, tokens[:, -1:])
    assert rel_err(got_last, want_last) < 1e-2
    np.testing.assert_array_equal(np.asarray(got_cache.lengths), np.asarray(want_cache.lengths))


def test_packed_trees_refuse_what_would_split_or_change_them():
    params = ji.init_params(CONFIG, jax.random.key(4, impl="rbg"), jnp.bfloat16)
    packed = pack_qkv(params)
    with pytest.raises(ValueError, match="already has q, k and v packed"):
        pack_qkv(packed)
    with pytest.raises(ValueError, match="quantize the unpacked tree"):
        ji.quantize(packed, "int8")
    with pytest.raises(ValueError, match="packing q, k and v takes float weights"):
        pack_qkv(ji.quantize(params, "int8"))
    with pytest.raises(ValueError, match="missing layers/k"):
        pack_qkv({"layers": {"q": params["layers"]["q"]}})
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="needs contraction-last weights"):
        sharding.tree_shardings(packed, CONFIG, mesh)
    with pytest.raises(ValueError, match="lays out contraction-last weights"):
        pack_qkv(params, shards=2)
    last = ji.contract_last(params)
    with pytest.raises(ValueError, match="4 shards do not divide the heads of k=2, v=2"):
        pack_qkv(last, shards=4)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, CONFIG.vocab_size, (1, 4)))
    with pytest.raises(ValueError, match="run it on a mesh with tensor=2"):  # laid out for 2 shards, run on one
        _run(pack_qkv(last, shards=2), tokens)
