"""Pipeline parallelism (layers on `pipeline`, micro-batches passed stage to stage with ppermute), alone
and combined with tensor and data parallelism, against one device. Runs in an 8-device subprocess."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import needs_devices, rerun_with_devices
from test_sharding import PROMPTS, _rel, _same_spec, _steps, paged_cache, padded, random_params

import jaxinfer as ji
from jaxinfer import memory, model, ops, pipeline
from jaxinfer import sharding as sh

# Four layers so that pipeline=4 gives one layer per stage; 2 kv heads (replicated on tensor=4).
CFG = ji.ModelConfig.from_preset("tiny").replace(num_layers=4, num_heads=8, num_kv_heads=2, head_dim=16, qkv_bias=True)


def test_in_8_device_process():
    rerun_with_devices(__file__)


_REF = {}


def _reference():
    if not _REF:
        params = jax.device_put(random_params(CFG), jax.devices()[0])
        first, second, _ = _steps(params, CFG)
        tokens = ji.generate(ji.Model(config=CFG, params=params), PROMPTS, max_new_tokens=6, impl="auto").token_ids
        _REF.update(params=params, first=first, second=second, tokens=tokens)
    return _REF


@needs_devices
def test_pipeline_tensor_data_2x2x2_equals_one_device():
    ref = _reference()
    mesh = sh.make_mesh(data=2, pipeline=2, tensor=2)
    params = sh.shard_params(ref["params"], CFG, mesh)
    q = params["layers"]["q"]
    assert _same_spec(q.sharding.spec, jax.sharding.PartitionSpec("pipeline", None, "tensor", None))
    assert {s.data.shape for s in q.addressable_shards} == {(2, CFG.dim, 4, CFG.head_dim)}
    first, second, cache = _steps(params, CFG)  # prefill + decode through the pipeline (forward dispatches)
    assert _rel(first, ref["first"]) < 1e-5 and _rel(second, ref["second"]) < 1e-5
    np.testing.assert_array_equal(second.argmax(-1), ref["second"].argmax(-1))
    assert cache.k.sharding.is_equivalent_to(sh.cache_shardings(CFG, mesh, batch=4).k, 5), cache.k.sharding
    np.testing.assert_array_equal(np.asarray(cache.lengths), [len(p) + 1 for p in PROMPTS])
    tokens = ji.generate(ji.Model(config=CFG, params=params), PROMPTS, max_new_tokens=6, impl="auto").token_ids
    assert tokens == ref["tokens"]


@needs_devices
def test_pipeline_tensor_data_with_int8_cache_equals_one_device():
    """A quantized (int8) cache through pipeline x tensor x data: codes and scales sharded like k/v, the
    same logits as one device with the same cache."""
    ref = _reference()
    first1, second1, _ = _steps(ref["params"], CFG, cache_dtype=jnp.int8)
    mesh = sh.make_mesh(data=2, pipeline=2, tensor=2)
    params = sh.shard_params(ref["params"], CFG, mesh)
    first, second, cache = _steps(params, CFG, cache_dtype=jnp.int8)
    assert cache.k.dtype == jnp.int8 and cache.k_scale.shape == cache.k.shape[:-1]
    assert cache.k_scale.sharding.spec[:2] == ("pipeline", "data"), cache.k_scale.sharding
    assert _rel(first, first1) < 1e-5 and _rel(second, second1) < 1e-5
    assert _rel(second, ref["second"]) < 5e-2  # and close to the float cache


def _hlo_ops(compiled_text: str, op: str) -> int:
    return len(re.findall(rf"= \S+ {op}(-start)?\(", compiled_text))


@needs_devices
@pytest.mark.parametrize("microbatches,stages,gemm_rows,room", [
    (4, 4, False, True), (1, 4, False, True), (2, 2, True, True), (1, 2, True, True), (2, 2, True, False)])
def test_pipeline_microbatches_flow_stage_to_stage(microbatches, stages, gemm_rows, room, monkeypatch):
    """pipeline=4 or 2 x tensor=2 (one or two layers per stage): micro-batches give one device's logits;
    the compiled program passes activations with collective-permute and gathers no weights. With
    `gemm_rows` the micro-batches count as GEMM-sized (more than `ops.SPLIT_KERNEL_MAX_ROWS` rows), so each
    stage slices its layers once, before the ticks, and runs them one at a time, unless the device has no
    room for that copy (`room` False: 1 KB free)."""
    ref = _reference()
    if gemm_rows:
        monkeypatch.setattr(ops, "SPLIT_KERNEL_MAX_ROWS", 0)
    seen = []
    layers = model.decoder_layers
    monkeypatch.setattr(model, "decoder_layers",
                        lambda lp, *a, **k: seen.append("split" if isinstance(lp, tuple) else lp["w_down"].shape[0])
                        or layers(lp, *a, **k))
    mesh = sh.make_mesh(pipeline=stages, tensor=2, devices=jax.devices()[: 2 * stages])
    params = sh.shard_params(ref["params"], CFG, mesh)
    assert {s.data.shape[0] for s in params["layers"]["w_down"].addressable_shards} == {4 // stages}
    B, T = len(PROMPTS), 16
    tokens, lengths = padded(PROMPTS, T)

    @jax.jit
    def prefill(params, cache, tokens, lengths):
        return pipeline.forward(
            params, cache, tokens, lengths, config=CFG, last_only=True, microbatches=microbatches, mesh=mesh
        )

    cache = sh.init_cache(CFG, B, 128, mesh, dtype=jnp.float32)
    if not room:  # for the trace below
        monkeypatch.setattr(memory, "free_device_bytes", lambda device=None: (1024, "1 KB free"))
    compiled = prefill.lower(params, cache, tokens, lengths).compile().as_text()
    assert _hlo_ops(compiled, "collective-permute") >= 1
    assert _hlo_ops(compiled, "all-gather") == 0
    logits, cache = prefill(params, cache, tokens, lengths)
    assert _rel(logits, ref["first"]) < 1e-5
    assert cache.k.sharding.is_equivalent_to(sh.cache_shardings(CFG, mesh, batch=B).k, 5)
    # layers per call of decoder_layers; a split tree comes as a tuple, each stack of one layer after it
    assert set(seen) == ({"split", 1} if gemm_rows and room else {4 // stages})


@needs_devices
def test_pipeline_with_paged_cache_equals_dense_one_device():
    """A paged cache through the pipeline (pipeline=4, tensor=2): micro-batches use their block-table rows."""
    ref = _reference()
    mesh = sh.make_mesh(pipeline=4, tensor=2)
    params = sh.shard_params(ref["params"], CFG, mesh)
    cache = sh.shard_cache(paged_cache(CFG, PROMPTS), CFG, mesh)
    assert _same_spec(cache.k_pages.sharding.spec, jax.sharding.PartitionSpec("pipeline", None, None, "tensor", None))
    tokens, lengths = padded(PROMPTS)
    first, cache = ji.prefill(params, cache, tokens, lengths, config=CFG, impl="auto")
    second, cache = ji.decode_step(params, cache, jnp.argmax(first, -1), config=CFG, impl="auto")
    assert _rel(first, ref["first"]) < 1e-5 and _rel(second, ref["second"]) < 1e-5


@needs_devices
@pytest.mark.parametrize("stages,microbatches", [(4, 4), (2, 4)])
def test_decode_loop_keeps_microbatches_in_flight(stages, microbatches):
    """pipeline.decode_loop (micro-batches of different steps in flight, each new token passed from the last
    stage back to the first) generates one device's greedy tokens and leaves the same cache."""
    ref, steps = _reference(), 5
    tokens, lengths = padded(PROMPTS)
    cache = sh.init_cache_on(None, CFG, len(PROMPTS), 128, jnp.float32)
    logits, cache = ji.prefill(ref["params"], cache, tokens, lengths, config=CFG, impl="auto")
    first = jnp.argmax(logits, -1).astype(jnp.int32)
    mesh = sh.make_mesh(pipeline=stages, devices=jax.devices()[:stages])
    staged = sh.shard_cache(jax.tree.map(jnp.copy, cache), CFG, mesh)
    want, tok = [], first
    for _ in range(steps):  # one device, one decode step at a time
        step_logits, cache = ji.decode_step(ref["params"], cache, tok, config=CFG, impl="auto")
        tok = jnp.argmax(step_logits, -1).astype(jnp.int32)
        want.append(np.asarray(tok))
    loop = jax.jit(lambda p, c, t: pipeline.decode_loop(p, c, t, steps, config=CFG, microbatches=microbatches, mesh=mesh))
    got, staged = loop(sh.shard_params(ref["params"], CFG, mesh), staged, np.asarray(first))
    np.testing.assert_array_equal(np.asarray(got), np.stack(want, axis=1))
    np.testing.assert_array_equal(np.asarray(staged.lengths), np.asarray(cache.lengths))
    assert _rel(staged.k, cache.k) < 1e-5 and _rel(staged.v, cache.v) < 1e-5


def test_default_microbatches():
    """Decode: one micro-batch per stage (or the largest divisor below); prefill: more, while each keeps
    `PREFILL_ROWS` tokens, up to 8 per stage."""
    assert pipeline.default_microbatches(64, 1, 4) == 4
    assert pipeline.default_microbatches(6, 1, 4) == 3
    assert pipeline.default_microbatches(64, 512, 4) == 32  # 2 x 512 rows each
    assert pipeline.default_microbatches(64, 2048, 4) == 32  # capped at 8 per stage
    assert pipeline.default_microbatches(64, 128, 4) == 8  # 8 x 128 rows each
    assert pipeline.default_microbatches(4, 16, 4) == 4  # too few rows to split further than the stages


@needs_devices
def test_pipeline_bad_inputs():
    mesh = sh.make_mesh(pipeline=8)
    with pytest.raises(ValueError, match="pipeline degree 8 .* does not divide num_layers=4"):
        sh.param_shardings(CFG, mesh)
    mesh = sh.make_mesh(pipeline=4, tensor=2)
    params = sh.shard_params(random_params(CFG), CFG, mesh)
    cache = sh.init_cache(CFG, 4, 16, mesh, dtype=jnp.float32)
    with pytest.raises(ValueError, match="not divisible into 3 micro-batches"):
        pipeline.forward(params, cache, jnp.ones((4, 1), jnp.int32), config=CFG, microbatches=3, mesh=mesh)
    with pytest.raises(ValueError, match="needs a mesh with a 'pipeline' axis"):
        pipeline.forward(params, cache, jnp.ones((4, 1), jnp.int32), config=CFG)
    with pytest.raises(NotImplementedError, match="pipeline-only mesh"):
        pipeline.decode_loop(params, cache, jnp.ones((4,), jnp.int32), 2, config=CFG, mesh=mesh)
    mesh = sh.make_mesh(pipeline=4, devices=jax.devices()[:4])
    params = sh.shard_params(random_params(CFG), CFG, mesh)
    cache = sh.init_cache(CFG, 4, 16, mesh, dtype=jnp.float32)
    with pytest.raises(ValueError, match="at least 4 micro-batches"):
        pipeline.decode_loop(params, cache, jnp.ones((4,), jnp.int32), 2, config=CFG, microbatches=2, mesh=mesh)
