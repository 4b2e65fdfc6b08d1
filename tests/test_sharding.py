"""Meshes, sharding rules, sharded creation/loading, and tensor + data parallel runs equal to one device.

Tests marked `needs_devices` run in a subprocess with 8 simulated CPU devices (`test_in_8_device_process`
starts it), so the rest of the suite keeps its single default device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxinfer as ji
from jaxinfer import sharding as sh

from multidevice import needs_devices, rerun_with_devices

# Tiny, but with every axis divisible by 4 and q/k/v biases so that every kind of leaf is placed.
CFG = ji.ModelConfig.from_preset("tiny").replace(
    num_heads=8, num_kv_heads=4, head_dim=16, dim=64, ffn_dim=128, vocab_size=512, qkv_bias=True
)


def test_in_8_device_process():
    rerun_with_devices(__file__)


# ----------------------------------------------------------------------------------------------------
# Bad inputs (any device count)


def test_mesh_size_must_equal_device_count():
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"= {n + 1} devices, but {n} device"):
        sh.make_mesh(data=n + 1)
    with pytest.raises(ValueError, match="mesh size must equal the device count"):
        sh.make_mesh(data=2, tensor=n)
    with pytest.raises(ValueError, match="tensor must be a positive int"):
        sh.make_mesh(tensor=0)
    assert sh.make_mesh(data=n).shape == {"data": n, "pipeline": 1, "tensor": 1}


def test_rules_reject_collisions_and_unknown_axes():
    with pytest.raises(ValueError, match="collision: logical axes 'vocab' and 'embed'"):
        sh.ShardingRules(embed="tensor")  # embed [V, D] would put tensor twice
    with pytest.raises(ValueError, match="collision.*'layers'.*'batch'|collision.*'batch'.*'layers'"):
        sh.ShardingRules(layers="data")  # the cache [L, B, ...] would put data twice
    with pytest.raises(ValueError, match="collision"):
        sh.ShardingRules.from_mapping({"ffn": ("tensor", "data")})  # w_gate fine, but mlp input batch is data
    with pytest.raises(ValueError, match="unknown logical axis"):
        sh.ShardingRules.from_mapping({"heads": "tensor"})
    ok = sh.ShardingRules.from_mapping({"embed": "tensor", "vocab": None, "q_heads": None, "kv_heads": None, "ffn": None})
    assert ok.spec(("layers", "embed", "ffn")) == P("pipeline", "tensor", None)


# ----------------------------------------------------------------------------------------------------
# Rules against a real mesh


EXPECTED_TP4 = {  # data=2, tensor=4 with the default rules: written out by hand, not computed by the rules
    "embed": P("tensor", None),
    "final_norm": P(None),
    "lm_head": P(None, "tensor"),
    "layers": {
        "attn_norm": P("pipeline", None),
        "mlp_norm": P("pipeline", None),
        "q": P("pipeline", None, "tensor", None),
        "k": P("pipeline", None, "tensor", None),
        "v": P("pipeline", None, "tensor", None),
        "o": P("pipeline", "tensor", None, None),
        "q_bias": P("pipeline", "tensor", None),
        "k_bias": P("pipeline", "tensor", None),
        "v_bias": P("pipeline", "tensor", None),
        "w_gate": P("pipeline", None, "tensor"),
        "w_up": P("pipeline", None, "tensor"),
        "w_down": P("pipeline", "tensor", None),
    },
}


def _same_spec(a: P, b: P) -> bool:
    pad = lambda s, n: tuple(s) + (None,) * (n - len(s))
    n = max(len(a), len(b))
    return pad(a, n) == pad(b, n)


def _shard_shape(shape, spec, mesh):
    out = []
    for i, d in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        out.append(d // math.prod(mesh.shape[a] for a in axes))
    return tuple(out)


@needs_devices
def test_sharded_init_follows_rules_and_equals_single_device():
    mesh = sh.make_mesh(data=2, tensor=4)
    params = sh.init_params(CFG, mesh, key=3, dtype=jnp.float32)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    expected = dict(jax.tree_util.tree_flatten_with_path(EXPECTED_TP4, is_leaf=lambda x: isinstance(x, P))[0])
    assert len(flat) == len(expected)
    for path, leaf in flat:
        spec = leaf.sharding.spec
        assert _same_spec(spec, expected[path]), (jax.tree_util.keystr(path), spec)
        assert leaf.sharding.mesh is mesh
        want = _shard_shape(leaf.shape, expected[path], mesh)
        assert {s.data.shape for s in leaf.addressable_shards} == {want}, jax.tree_util.keystr(path)
    # The values are those of the single-device initialiser (up to the last bit of a fused scale).
    single = ji.init_params(CFG, 3, jnp.float32)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


@needs_devices
def test_kv_heads_fewer_than_tensor_degree_are_replicated():
    mesh = sh.make_mesh(tensor=8)
    cfg = CFG.replace(num_kv_heads=2, vocab_size=500)  # 8 % 2 == 0: replicate kv; 500 % 8 != 0: replicate vocab
    shardings = sh.param_shardings(cfg, mesh)
    assert _same_spec(shardings["layers"]["k"].spec, P("pipeline", None, None, None))
    assert _same_spec(shardings["layers"]["q"].spec, P("pipeline", None, "tensor", None))
    assert _same_spec(shardings["embed"].spec, P(None, None))
    cache = sh.cache_shardings(cfg, mesh, batch=4)
    assert _same_spec(cache.k.spec, P("pipeline", "data", None, None, None))
    with pytest.raises(ValueError, match="neither divides num_kv_heads=3"):
        sh.param_shardings(CFG.replace(num_heads=24, num_kv_heads=3), mesh)


@needs_devices
def test_bad_degrees_are_clear_errors():
    with pytest.raises(ValueError, match="tensor degree 8 .* does not divide num_heads=4"):
        sh.param_shardings(CFG.replace(num_heads=4, num_kv_heads=4), sh.make_mesh(tensor=8))
    with pytest.raises(ValueError, match="tensor degree 8 .* does not divide ffn_dim=100"):
        sh.param_shardings(CFG.replace(ffn_dim=100), sh.make_mesh(tensor=8))
    with pytest.raises(ValueError, match="pipeline degree 4 .* does not divide num_layers=2"):
        sh.init_params(CFG, sh.make_mesh(data=2, pipeline=4))
    with pytest.raises(ValueError, match="batch 3 is not divisible by the data degree 2"):
        sh.init_cache(CFG, 3, 16, sh.make_mesh(data=2, tensor=4))
    with pytest.raises(ValueError, match="names mesh axis 'expert'"):
        sh.param_shardings(CFG, sh.make_mesh(tensor=8), {"ffn": "expert"})


@needs_devices
def test_sharded_cache_and_shard_params():
    mesh = sh.make_mesh(data=2, tensor=4)
    cache = sh.init_cache(CFG, 4, 32, mesh, dtype=jnp.float32)
    assert _same_spec(cache.k.sharding.spec, P("pipeline", "data", None, "tensor", None))
    assert _same_spec(cache.lengths.sharding.spec, P("data"))
    assert {s.data.shape for s in cache.v.addressable_shards} == {(2, 2, 32, 1, 16)}
    host = jax.tree.map(np.asarray, ji.init_params(CFG, 0, jnp.float32))
    placed = sh.shard_params(host, CFG, mesh, {"ffn": None})
    assert _same_spec(placed["layers"]["w_up"].sharding.spec, P("pipeline", None, None))
    assert _same_spec(placed["layers"]["q"].sharding.spec, P("pipeline", None, "tensor", None))
    np.testing.assert_array_equal(np.asarray(placed["layers"]["q"]), host["layers"]["q"])
    with pytest.raises(ValueError, match="does not match"):
        sh.shard_params({"embed": host["embed"]}, CFG, mesh)
