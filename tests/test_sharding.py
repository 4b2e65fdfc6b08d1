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
from jaxinfer import params as params_lib
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


# ----------------------------------------------------------------------------------------------------
# Tensor and data parallel runs equal one device


CFG2 = CFG.replace(num_kv_heads=2, vocab_size=500)
PROMPTS = [[5, 9, 2, 7, 1, 3], [4, 4, 8], [11, 3, 2, 9, 9, 1, 6, 2, 7, 3, 5], [2]]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def padded(prompts, width=None):
    """Right-padded tokens `[B, width or the longest]` and lengths `[B]` of token-id prompts."""
    tokens = np.zeros((len(prompts), width or max(map(len, prompts))), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, np.asarray([len(p) for p in prompts], np.int32)


def paged_cache(cfg, prompts, page_size=8):
    """An empty float32 paged cache (16 pages per row) with pages reserved for each prompt and one more token."""
    B = len(prompts)
    cache = ji.init_paged_cache(cfg, B, num_pages=B * 16, page_size=page_size, max_pages_per_seq=16, dtype=jnp.float32)
    alloc = ji.PageAllocator(B * 16)
    for i, p in enumerate(prompts):
        cache = alloc.reserve(cache, i, len(p) + 1)
    return cache


def _steps(params, cfg, prompts=PROMPTS, cache_dtype=jnp.float32):
    """Prefill the prompts, then one decode step; logits of both and the final cache (the shapes
    `generate` uses, so its prefill is the same compiled program)."""
    tokens, lengths = padded(prompts)
    cache = sh.init_cache_on(sh.mesh_of(params), cfg, len(prompts), 128, cache_dtype)
    first, cache = ji.prefill(params, cache, tokens, lengths, config=cfg, impl="auto")
    second, cache = ji.decode_step(params, cache, jnp.argmax(first, -1), config=cfg, impl="auto")
    return np.asarray(first), np.asarray(second), cache


def random_params(cfg, seed=1):
    """Random float32 parameters made with numpy (no compile): matrices N(0, 1/fan_in), norms near 1."""
    rng = np.random.default_rng(seed)

    def leaf(spec):
        x = rng.standard_normal(spec.shape)
        if spec.kind == "norm":
            x = 1 + 0.1 * x
        elif spec.kind == "bias":
            x = 0.1 * x
        elif spec.kind == "matrix":
            x = x / np.sqrt(params_lib._fan_in(spec))
        return x.astype(np.float32)

    return jax.tree.map(leaf, ji.param_specs(cfg), is_leaf=params_lib.is_spec)


_REFERENCE = {}


def _reference(cfg):
    """Single-device parameters, logits and greedy tokens (computed once per config)."""
    if cfg not in _REFERENCE:
        params = jax.device_put(random_params(cfg), jax.devices()[0])
        first, second, _ = _steps(params, cfg)
        tokens = ji.generate(ji.Model(config=cfg, params=params), PROMPTS, max_new_tokens=6, impl="auto").token_ids
        _REFERENCE[cfg] = (params, first, second, tokens)
    return _REFERENCE[cfg]


@needs_devices
@pytest.mark.parametrize(
    "data,tensor,cfg",
    [
        (4, 2, CFG2),  # TP2 x DP4: kv heads and vocab split
        (1, 8, CFG2),  # TP8: 2 kv heads replicated, vocab 500 replicated
        (8, 1, CFG2),  # DP8
    ],
    ids=["dp4-tp2", "tp8-kv-vocab-replicated", "dp8"],
)
def test_tensor_data_parallel_equals_one_device(data, tensor, cfg):
    params1, first1, second1, tokens1 = _reference(cfg)
    mesh = sh.make_mesh(data=data, tensor=tensor)
    params = sh.shard_params(params1, cfg, mesh)
    B = len(PROMPTS)
    prompts = PROMPTS * (data // B) if data > B else PROMPTS  # DP8 needs a batch of 8: the prompts twice
    first, second, cache = _steps(params, cfg, prompts)
    first, second = first[:B], second[:B]
    assert _rel(first, first1) < 1e-5 and _rel(second, second1) < 1e-5, (_rel(first, first1), _rel(second, second1))
    np.testing.assert_array_equal(first.argmax(-1), first1.argmax(-1))
    np.testing.assert_array_equal(second.argmax(-1), second1.argmax(-1))
    # The cache stayed sharded by the rules through both donated jitted steps.
    want = sh.cache_shardings(cfg, mesh, batch=cache.batch)
    assert cache.k.sharding.is_equivalent_to(want.k, 5), (cache.k.sharding, want.k)
    kv_local = cfg.num_kv_heads // tensor if cfg.num_kv_heads % tensor == 0 else cfg.num_kv_heads
    assert {s.data.shape[1:4:2] for s in cache.k.addressable_shards} == {(cache.batch // data, kv_local)}
    if data > B:
        return  # generate at batch 4 on data=8 keeps the batch whole: nothing that dp4-tp2 does not cover
    tokens = ji.generate(ji.Model(config=cfg, params=params), PROMPTS, max_new_tokens=6, impl="auto").token_ids
    assert tokens == tokens1


@needs_devices
def test_quantized_params_shard_by_their_logical_axes():
    """`QArray` leaves: values, scales and offsets each split on tensor where their axis allows (int4
    grouped, planned on the abstract tree); int8 quantized straight into its 2x2x2 shards equals one
    device's int8 tree, and gives its logits (through the pipeline)."""
    from jaxinfer import quant

    mesh = sh.make_mesh(data=2, tensor=4)
    abstract = quant.quantize(ji.abstract_params(CFG, jnp.float32), quant.Recipe("int4", 16, zero_point=True))
    down = sh.tree_shardings(abstract, CFG, mesh)["layers"]["w_down"]  # [L, F, D]: F the group axis
    for child in (down.values, down.scales, down.offsets):
        assert _same_spec(child.spec, P("pipeline", "tensor", None)), child

    params1 = jax.device_put(random_params(CFG), jax.devices()[0])
    q1 = quant.quantize(params1, "int8")
    mesh = sh.make_mesh(data=2, pipeline=2, tensor=2)
    qs = sh.quantize_params(sh.shard_params(params1, CFG, mesh), "int8", CFG, mesh)  # quantized in its shards
    for a, b in zip(jax.tree.leaves(qs), jax.tree.leaves(q1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sh.shard_params(q1, CFG, mesh)["layers"]["o"].values.sharding == qs["layers"]["o"].values.sharding
    down = qs["layers"]["w_down"]
    assert _same_spec(down.values.sharding.spec, P("pipeline", "tensor", None))
    assert _same_spec(down.scales.sharding.spec, P("pipeline", None, None))  # per channel: size-1 F axis
    assert {s.data.shape for s in down.values.addressable_shards} == {(1, 64, 64)}
    assert _same_spec(qs["layers"]["q"].values.sharding.spec, P("pipeline", None, "tensor", None))
    first1, second1, _ = _steps(q1, CFG)
    first, second, _ = _steps(qs, CFG)
    assert _rel(first, first1) < 1e-5 and _rel(second, second1) < 1e-5


@needs_devices
def test_contract_last_params_shard_and_run_per_shard():
    """`contract_last` leaves shard by their stored order's logical axes (q stored [L, N, H, D]: heads on
    tensor) and tensor=4 x data=2 gives one device's logits for the same contract-last tree."""
    from jaxinfer import tensor_parallel

    params1 = ji.contract_last(jax.device_put(random_params(CFG), jax.devices()[0]))
    first1, second1, _ = _steps(params1, CFG)
    mesh = sh.make_mesh(data=2, tensor=4)
    params = sh.shard_params(params1, CFG, mesh)
    q = params["layers"]["q"].values  # [L, N, H, D]
    assert _same_spec(q.sharding.spec, P("pipeline", "tensor", None, None)), q.sharding.spec
    assert {s.data.shape for s in q.addressable_shards} == {(CFG.num_layers, CFG.num_heads // 4, 16, 64)}
    with jax.set_mesh(mesh):
        assert tensor_parallel.applies(CFG, params)
    first, second, _ = _steps(params, CFG)
    assert _rel(first, first1) < 1e-5 and _rel(second, second1) < 1e-5, (_rel(first, first1), _rel(second, second1))


@needs_devices
def test_qkv_packed_per_shard_runs_per_shard():
    """`pack_qkv(shards=4)`: the packed axis holds one block per tensor shard, each that shard's q heads then
    its k and v heads, so each device gets one packed matrix of its own heads; tensor=4 x data=2 gives one
    device's logits. Packed for another degree, the rules refuse the tree."""
    from jaxinfer import tensor_parallel
    from jaxinfer.packing import pack_qkv

    params1 = ji.contract_last(jax.device_put(random_params(CFG), jax.devices()[0]))
    first1, second1, _ = _steps(params1, CFG)
    mesh = sh.make_mesh(data=2, tensor=4)
    packed = pack_qkv(params1, shards=4)
    stored = np.asarray(packed["layers"]["qkv"].values.values)  # [L, 4 blocks x (2 q + 1 k + 1 v heads), H, D]
    q, k, v = (np.asarray(params1["layers"][n].values) for n in "qkv")
    np.testing.assert_array_equal(stored[:, 4:8], np.concatenate([q[:, 2:4], k[:, 1:2], v[:, 1:2]], axis=1))
    params = sh.shard_params(packed, CFG, mesh)
    shards = params["layers"]["qkv"].values.values.addressable_shards
    assert {s.data.shape for s in shards} == {(CFG.num_layers, 4, 16, 64)}
    with jax.set_mesh(mesh):
        assert tensor_parallel.applies(CFG, params)
    first, second, _ = _steps(params, CFG)
    assert _rel(first, first1) < 1e-5 and _rel(second, second1) < 1e-5, (_rel(first, first1), _rel(second, second1))
    with pytest.raises(ValueError, match="pack with shards=4"):
        sh.shard_params(pack_qkv(params1, shards=2), CFG, mesh)


@needs_devices
def test_quantized_tensor_parallel_equals_one_device():
    """Quantized layers per shard (tensor=4 x data=2) give one device's logits; int4 groups that a shard
    would cut in half (the rules replicate those scales) keep XLA's partitioner, with the same result."""
    from jaxinfer import quant, tensor_parallel

    params1 = jax.device_put(random_params(CFG), jax.devices()[0])
    mesh = sh.make_mesh(data=2, tensor=4)
    for recipe, per_shard in (("int8", True), (quant.Recipe("int4", 16, zero_point=True), True),
                              (quant.Recipe("int4", 64, matrices=("w_down",)), False)):
        q1 = quant.quantize(params1, recipe)
        first1, second1, _ = _steps(q1, CFG)
        qs = sh.shard_params(q1, CFG, mesh)
        with jax.set_mesh(mesh):
            assert tensor_parallel.applies(CFG, qs) == per_shard, recipe
        first, second, _ = _steps(qs, CFG)
        assert _rel(first, first1) < 1e-5 and _rel(second, second1) < 1e-5, (recipe, _rel(first, first1))


@needs_devices
def test_paged_cache_tensor_parallel_equals_one_device():
    """A paged cache with tensor=2 runs the layers per shard; with data=4 x tensor=2 the rows are split on
    data, the shared page pool is not, so XLA's partitioner keeps the replicas equal. Both give one
    device's logits."""
    from jaxinfer import tensor_parallel

    params1 = jax.device_put(random_params(CFG2), jax.devices()[0])

    def run(params, mesh):
        cache = paged_cache(CFG2, PROMPTS)
        if mesh is not None:
            cache = sh.shard_cache(cache, CFG2, mesh)
            with jax.set_mesh(mesh):
                assert tensor_parallel.applies(CFG2, params, cache) == (mesh.shape["data"] == 1)
        tokens, lengths = padded(PROMPTS)
        first, cache = ji.prefill(params, cache, tokens, lengths, config=CFG2, impl="auto")
        second, cache = ji.decode_step(params, cache, jnp.argmax(first, -1), config=CFG2, impl="auto")
        return np.asarray(first), np.asarray(second)

    ref = run(params1, None)
    for data in (1, 4):
        mesh = sh.make_mesh(data=data, tensor=2, devices=jax.devices()[: 2 * data])
        first, second = run(sh.shard_params(params1, CFG2, mesh), mesh)
        assert _rel(first, ref[0]) < 1e-5 and _rel(second, ref[1]) < 1e-5, data


# ----------------------------------------------------------------------------------------------------
# Kernels per shard


@needs_devices
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["kv-split", "kv-replicated"])
def test_kernel_runs_per_shard_inside_shard_map(num_kv_heads):
    """`attention.per_shard` hands each device its batch rows and heads; with 2 kv heads on tensor=4 each
    shard gets the one kv head its 2 query heads use. The Pallas decode kernel runs in interpret mode."""
    import pallas_kernels as pk

    from jaxinfer import attention
    from jaxinfer.cache import DenseView

    mesh = sh.make_mesh(data=2, tensor=4)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 1, 8, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((4, 32, num_kv_heads, 64)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([5, 32, 17, 1], jnp.int32)
    seen = []

    def kernel(q, view, q_positions, kv_lengths, window):
        seen.append((q.shape, view.k.shape))
        out = pk.decode_attention(q[:, 0], view.k, view.v, lengths=kv_lengths, interpret=True)
        return out[:, None]

    run = jax.jit(lambda q, k, v, pos, n: attention.per_shard(kernel, q, DenseView(k, v), pos, n, None))
    with jax.set_mesh(mesh):
        out = run(q, k, v, (lengths - 1)[:, None], lengths)
    assert seen == [((2, 1, 2, 64), (2, 32, 1, 64))]
    expected = attention.xla_attention(q, k, v, (lengths - 1)[:, None], lengths)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


@needs_devices
def test_tensor_parallel_layers_run_the_weight_kernel_per_shard(monkeypatch):
    """With tensor=4 (x data=2) the layers run inside one shard_map: the weight kernel (forced, interpret
    mode) sees each device's heads and ffn slice, the row-parallel partial sums are added over `tensor`,
    and prefill + decode logits equal one device's XLA run. kv heads fewer than the degree, or a
    pipeline, keep XLA's partitioner."""
    from jaxinfer import ops, tensor_parallel

    params1, first1, second1, _ = _reference(CFG)
    real_choose, real_launch = ops._choose, ops._pallas_matmuls
    launches = []
    monkeypatch.setattr(ops, "_choose", lambda impl, spec, x, w, stacked=False: real_choose(
        "pallas" if stacked and ops.whole_arrays() else impl, spec, x, w, stacked=stacked))
    monkeypatch.setattr(ops, "_pallas_matmuls", lambda x, products, layer: launches.append(
        [tuple(w.shape) for _, w in products]) or real_launch(x, products, layer))
    mesh = sh.make_mesh(data=2, tensor=4)
    params = sh.shard_params(params1, CFG, mesh)
    first, second, _ = _steps(params, CFG)
    assert _rel(first, first1) < 1e-5 and _rel(second, second1) < 1e-5, (_rel(first, first1), _rel(second, second1))
    L, D, H, F = CFG.num_layers, CFG.dim, CFG.head_dim, CFG.ffn_dim
    qkv = [(L, D, 2, H), (L, D, 1, H), (L, D, 1, H)]  # 8 query and 4 kv heads over 4 shards
    assert launches == [qkv, [(L, 2, H, D)], [(L, D, F // 4)] * 2, [(L, F // 4, D)]] * 2, launches
    with jax.set_mesh(mesh):
        assert tensor_parallel.applies(CFG, params)
        kv2 = CFG.replace(num_kv_heads=2)  # kv heads replicated on tensor=4
        assert not tensor_parallel.applies(kv2, ji.abstract_params(kv2))
    with jax.set_mesh(sh.make_mesh(pipeline=2, tensor=4)):
        assert not tensor_parallel.applies(CFG, params)
    monkeypatch.setattr(tensor_parallel, "ENABLED", False)
    launches.clear()
    jax.clear_caches()
    off_first, _, _ = _steps(params, CFG)  # XLA's partitioner: the kernel stays off under split axes
    assert launches == [] and _rel(off_first, first1) < 1e-5


@needs_devices
def test_tensor_parallel_residual_add_and_norm_in_one_kernel(monkeypatch):
    """Where the one-launch residual add + norm applies (the GPU's decode path; here forced, interpret
    mode), each shard's row-parallel sums are added over `tensor` before the kernel adds the residual and
    normalises: prefill + decode logits equal one device's, with two kernels per layer in the program."""
    from jaxinfer import ops

    params1, first1, second1, _ = _reference(CFG)
    monkeypatch.setattr(ops, "_add_norm_kernel_applies", lambda x, weight=None: ops.whole_arrays())
    calls = []
    real = ops.add_rms_norm
    monkeypatch.setattr(ops, "add_rms_norm", lambda *a: calls.append(a[1].shape) or real(*a))
    jax.clear_caches()  # earlier tests compiled these steps without the kernel
    params = sh.shard_params(params1, CFG, sh.make_mesh(data=2, tensor=4))
    first, second, _ = _steps(params, CFG)
    jax.clear_caches()  # and later ones must not reuse programs traced with it
    assert _rel(first, first1) < 1e-5 and _rel(second, second1) < 1e-5, (_rel(first, first1), _rel(second, second1))
    B, D = len(PROMPTS) // 2, CFG.dim  # each shard's rows (data=2) and the whole residual width
    # traced once per program (the layer scan's body): after attention and after the MLP, in prefill and decode
    assert len(calls) == 4 and all(c[0] == B and c[-1] == D for c in calls) and calls[2:] == [(B, 1, D)] * 2, calls


# ----------------------------------------------------------------------------------------------------
# Loading checkpoints straight into shards


def _hf_tensors(params, cfg):
    """Our parameter tree written back under Hugging Face names and layouts."""
    D, N, K, H = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    lay = {k: np.asarray(v) for k, v in params["layers"].items()}
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]), "model.norm.weight": np.asarray(params["final_norm"])}
    if "lm_head" in params:
        out["lm_head.weight"] = np.asarray(params["lm_head"]).T
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = lay["attn_norm"][i]
        out[pre + "post_attention_layernorm.weight"] = lay["mlp_norm"][i]
        out[pre + "self_attn.q_proj.weight"] = lay["q"][i].reshape(D, N * H).T
        out[pre + "self_attn.k_proj.weight"] = lay["k"][i].reshape(D, K * H).T
        out[pre + "self_attn.v_proj.weight"] = lay["v"][i].reshape(D, K * H).T
        out[pre + "self_attn.o_proj.weight"] = lay["o"][i].reshape(N * H, D).T
        for p in ("q", "k", "v"):
            if f"{p}_bias" in lay:
                out[pre + f"self_attn.{p}_proj.bias"] = lay[f"{p}_bias"][i].reshape(-1)
        out[pre + "mlp.gate_proj.weight"] = lay["w_gate"][i].T
        out[pre + "mlp.up_proj.weight"] = lay["w_up"][i].T
        out[pre + "mlp.down_proj.weight"] = lay["w_down"][i].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _assert_placed(params, expected, cfg, mesh):
    want = sh.param_shardings(cfg, mesh)
    for (path, leaf), target, ref in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(want), jax.tree.leaves(expected)
    ):
        assert leaf.sharding.is_equivalent_to(target, leaf.ndim), (jax.tree_util.keystr(path), leaf.sharding)
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref), err_msg=jax.tree_util.keystr(path))


@needs_devices
def test_load_safetensors_into_shards(tmp_path):
    import json

    from safetensors.numpy import save_file

    params = random_params(CFG)
    save_file(_hf_tensors(params, CFG), str(tmp_path / "model.safetensors"))
    hf_config = {
        "model_type": "qwen2", "vocab_size": CFG.vocab_size, "hidden_size": CFG.dim, "intermediate_size": CFG.ffn_dim,
        "num_hidden_layers": CFG.num_layers, "num_attention_heads": CFG.num_heads,
        "num_key_value_heads": CFG.num_kv_heads, "head_dim": CFG.head_dim, "rms_norm_eps": CFG.norm_eps, "rope_theta": CFG.rope_theta,
        "max_position_embeddings": CFG.max_seq_len, "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    mesh = sh.make_mesh(data=2, tensor=4)
    model = ji.load(tmp_path, mesh=mesh)
    assert model.config.replace(model_type="llama") == CFG
    _assert_placed(model.params, params, CFG, mesh)


@needs_devices
def test_gguf_tensors_assemble_into_shards(tmp_path):
    """The GGUF path: tensors read back from a tiny file (one Q8_0 weight) assemble straight into shards."""
    from test_gguf import _GGUF_NAMES, _tiny_model, llama_cpp_permute, write_gguf

    import gguf
    from gguf import GGMLQuantizationType as T

    from jaxinfer.checkpoint import gguf as g
    from jaxinfer.checkpoint.hf_names import assemble_params

    hf = _tiny_model(np.random.default_rng(0), bias=False)
    tensors = {_GGUF_NAMES[n]: llama_cpp_permute(w, 4 if "q_proj" in n else 2) if ("q_proj" in n or "k_proj" in n) else w
               for n, w in hf.items()}
    tensors["blk.0.ffn_up.weight"] = (gguf.quants.quantize(hf["model.layers.0.mlp.up_proj.weight"], T.Q8_0), T.Q8_0)
    reader = g.open_gguf(write_gguf(tmp_path / "tiny.gguf", "llama", tensors))
    hf_config = g.read_gguf_config(reader)
    cfg = ji.ModelConfig.from_hf(hf_config)
    whole = assemble_params(g.iter_gguf_tensors(reader, hf_config), cfg, jnp.float32)
    mesh = sh.make_mesh(data=2, tensor=4)  # 2 kv heads on tensor=4: replicated
    sharded = assemble_params(
        g.iter_gguf_tensors(reader, hf_config), cfg, jnp.float32, shardings=sh.param_shardings(cfg, mesh)
    )
    _assert_placed(sharded, whole, cfg, mesh)
    assert {s.data.shape for s in sharded["layers"]["w_up"].addressable_shards} == {(1, 64, 24)}


# ----------------------------------------------------------------------------------------------------
# Disaggregated prefill / decode


@needs_devices
def test_disaggregated_prefill_and_decode_equal_one_device():
    """Prefill with tensor=4 on devices 0-3, the cache moved to data=2 x tensor=2 on devices 4-7, decode
    there: one device's tokens; the cache arrives in the decode mesh's shardings."""
    from jaxinfer import disagg

    params1, _, _, tokens1 = _reference(CFG2)
    model = ji.Model(config=CFG2, params=params1)
    a, b = disagg.split_devices(4, 4)
    dm = disagg.disaggregate(model, sh.make_mesh(tensor=4, devices=a), sh.make_mesh(data=2, tensor=2, devices=b))
    assert set(dm.decode.params["layers"]["q"].sharding.device_set) == set(b)
    result, times = disagg.generate(dm, PROMPTS, max_new_tokens=6, impl="auto")
    assert result.token_ids == tokens1
    assert times.prefill_s > 0 and times.transfer_s > 0 and times.decode_s > 0
    # Two layers x (k and v) of [4, 128, 2, 16] float32, plus 4 int32 lengths.
    assert times.transfer_bytes == 2 * 2 * 4 * 128 * 2 * 16 * 4 + 4 * 4

    cache = sh.init_cache(CFG2, 4, 128, dm.prefill_mesh, dtype=jnp.float32)
    moved = disagg.transfer(cache, CFG2, dm.decode_mesh)
    assert set(moved.k.sharding.device_set) == set(b)
    assert moved.k.sharding.is_equivalent_to(sh.cache_shardings(CFG2, dm.decode_mesh, batch=4).k, 5)
    cost = disagg.transfer_cost(cache, CFG2, dm.decode_mesh, repeats=2)
    assert cost["bytes"] == times.transfer_bytes and cost["median_s"] > 0 and cost["gbps"] > 0
    with pytest.raises(ValueError, match="share 4 device"):
        disagg.disaggregate(model, dm.prefill_mesh, sh.make_mesh(tensor=4, devices=a))
    with pytest.raises(ValueError, match="cannot split 8 device"):
        disagg.split_devices(4, 5)
