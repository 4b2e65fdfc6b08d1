"""On the GPU: every attention implementation gives the model the same logits as the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji

CONFIG = ji.ModelConfig(vocab_size=1000, dim=256, ffn_dim=512, num_layers=2, num_heads=8, num_kv_heads=2,
                        head_dim=64, max_seq_len=512)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas", "cudnn", "auto"])
def test_prefill_then_decode_matches_xla(impl):
    params = ji.init_params(CONFIG, 0, jnp.bfloat16)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (3, 40)).astype(np.int32)
    lengths = np.array([40, 17, 29], np.int32)

    def run(impl, cache_dtype=jnp.bfloat16):
        cache = ji.init_cache(CONFIG, 3, 128, cache_dtype)
        logits, cache = ji.prefill(params, cache, tokens, lengths, config=CONFIG, impl=impl)
        out = [np.asarray(logits)]
        for t in range(6):
            logits, cache = ji.decode_step(params, cache, tokens[:, t], config=CONFIG, impl=impl)
            out.append(np.asarray(logits))
        return np.stack(out)

    ref, got = run("xla"), run(impl)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 2e-2, err
    # The chunk after a prefix (cuDNN's continuing branch, flash kernel with q offsets) as well.
    model = ji.Model(config=CONFIG, params=params)
    a = ji.generate(model, [list(tokens[0, :9]), list(tokens[1, :30])], max_new_tokens=8, impl="xla").token_ids
    b = ji.generate(model, [list(tokens[0, :9]), list(tokens[1, :30])], max_new_tokens=8, impl=impl).token_ids
    assert sum(x == y for r, s in zip(a, b) for x, y in zip(r, s)) >= 12  # bf16 ties may flip a late token
    # An int8 cache: decode through the Pallas kernel (codes dequantized in registers) vs the XLA path.
    if impl != "cudnn":
        ref8, got8 = run("xla", jnp.int8), run(impl, jnp.int8)
        err8 = np.linalg.norm(got8 - ref8) / np.linalg.norm(ref8)
        assert err8 < 2e-2, err8


def _prefill_then_decode(params, mesh, config, tokens, steps=4, max_len=64):
    """Float32 logits of a bf16-cache prefill of `tokens` [B, T] on `mesh` (None: one device), then of
    `steps` decode steps fed tokens[:, t], stacked [steps + 1, B, V]."""
    from jaxinfer import sharding as sh

    cache = sh.init_cache_on(mesh, config, tokens.shape[0], max_len, jnp.bfloat16)
    logits, cache = ji.prefill(params, cache, tokens, config=config, impl="auto")
    out = [np.asarray(logits, np.float32)]
    for t in range(steps):
        logits, cache = ji.decode_step(params, cache, tokens[:, t], config=config, impl="auto")
        out.append(np.asarray(logits, np.float32))
    return np.stack(out)


@pytest.mark.gpu
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_layers_run_the_kernels_per_shard(monkeypatch):
    """tensor=2: the layers run per shard (weight kernel on each device's heads and ffn slice, one psum per
    row-parallel product; the embedding looked up per shard) and prefill + decode logits equal one GPU's
    within bf16 rounding."""
    from jaxinfer import ops
    from jaxinfer import sharding as sh

    config = CONFIG.replace(num_kv_heads=4)
    params = ji.init_params(config, 0, jnp.bfloat16)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 24)).astype(np.int32)
    launches = []
    real = ops._pallas_matmuls
    monkeypatch.setattr(ops, "_pallas_matmuls", lambda x, products, layer: launches.append(
        [tuple(w.shape) for _, w in products]) or real(x, products, layer))

    ref = _prefill_then_decode(params, None, config, tokens)
    mesh = sh.make_mesh(tensor=2, devices=jax.devices()[:2])
    launches.clear()
    got = _prefill_then_decode(sh.shard_params(params, config, mesh), mesh, config, tokens)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 2e-2, err
    L, D, H = config.num_layers, config.dim, config.head_dim
    assert [(L, D, 4, H), (L, D, 2, H), (L, D, 2, H)] in launches, launches  # q/k/v: half the heads each
    assert [(L, config.ffn_dim // 2, D)] in launches, launches


@pytest.mark.gpu
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_with_qkv_packed_per_shard():
    """tensor=2 on contraction-last weights with q/k/v packed per shard (`pack_qkv(shards=2)`), through the
    GPU's kernels: prefill + decode logits equal one GPU's unpacked run within bf16 rounding."""
    from jaxinfer import sharding as sh
    from jaxinfer.packing import pack_qkv

    config = CONFIG.replace(num_kv_heads=4)
    params = ji.contract_last(ji.init_params(config, 0, jnp.bfloat16))
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 24)).astype(np.int32)

    ref = _prefill_then_decode(params, None, config, tokens)
    mesh = sh.make_mesh(tensor=2, devices=jax.devices()[:2])
    got = _prefill_then_decode(sh.shard_params(pack_qkv(params, shards=2), config, mesh), mesh, config, tokens)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 2e-2, err


@pytest.mark.gpu
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 GPUs")
def test_pipeline_prefill_with_layers_split_equals_one_gpu(monkeypatch):
    """pipeline=2 (two layers a stage): a prefill whose micro-batches have more than
    `ops.SPLIT_KERNEL_MAX_ROWS` rows runs each stage's layers sliced once (stacks of one), decode steps the
    stacked layers; prefill + decode logits equal one GPU's within bf16 rounding."""
    from jaxinfer import model
    from jaxinfer import sharding as sh

    config = CONFIG.replace(num_layers=4)
    params = ji.contract_last(ji.init_params(config, 0, jnp.bfloat16))
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (4, 96)).astype(np.int32)
    ref = _prefill_then_decode(params, None, config, tokens, max_len=128)
    seen = []
    layers = model.decoder_layers
    monkeypatch.setattr(model, "decoder_layers",
                        lambda lp, *a, **k: seen.append("split" if isinstance(lp, tuple) else
                                                        jax.tree.leaves(lp["w_down"])[0].shape[0]) or layers(lp, *a, **k))
    mesh = sh.make_mesh(pipeline=2, devices=jax.devices()[:2])
    got = _prefill_then_decode(sh.shard_params(params, config, mesh), mesh, config, tokens, max_len=128)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 2e-2, err
    assert "split" in seen and 2 in seen, seen  # prefill (2 rows x 96 > 64): split; decode: the stack


_ONE_SHOT_PROBE = """
import sys, jax, jax.numpy as jnp, numpy as np, jaxinfer as ji
from jaxinfer import sharding as sh
config = ji.ModelConfig(vocab_size=1000, dim=256, ffn_dim=512, num_layers=2, num_heads=8, num_kv_heads=4,
                        head_dim=64, max_seq_len=512)
gen = sys.modules["jaxinfer.generate"]
mesh = sh.make_mesh(tensor=2, devices=jax.devices()[:2])
params = sh.shard_params(ji.init_params(config, 0, jnp.bfloat16), config, mesh)
cache = sh.init_cache_on(mesh, config, 1, 64, jnp.bfloat16)
with jax.set_mesh(mesh):
    text = gen._decode.lower(params, cache, jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool),
                             config=config, impl="auto").compile().as_text()
print("ALL_REDUCE" if "all-reduce" in text else "NO_ALL_REDUCE", "ONE_SHOT" if "ONE_SHOT" in text else "NCCL")
"""


@pytest.mark.gpu
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 GPUs")
def test_sharded_decode_step_sums_through_nccl_unless_the_user_asks_otherwise():
    """`jaxinfer.xla_flags`: a TP2 decode step's sums compile as plain all-reduces (NCCL); the control, a
    process whose XLA_FLAGS asks for XLA's one-shot kernel, gets that kernel (so the marker is real)."""
    import os
    import subprocess
    import sys

    def probe(flags):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(XLA_FLAGS=flags, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        out = subprocess.run([sys.executable, "-c", _ONE_SHOT_PROBE], env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.strip().splitlines()[-1]

    assert probe("") == "ALL_REDUCE NCCL"
    assert probe("--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true") == "ALL_REDUCE ONE_SHOT"
