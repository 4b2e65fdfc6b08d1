"""The memory planner: bytes by hand and against real allocations, and the early refusal's message."""

import jax.numpy as jnp
import pytest

from jaxinfer import memory
from jaxinfer.cache import init_cache
from jaxinfer.config import ModelConfig
from jaxinfer.params import abstract_params, param_bytes

TINY = ModelConfig.from_preset("tiny")
LLAMA8B = ModelConfig.from_preset("llama-3-8b")


def test_plan_matches_real_arrays():
    plan = memory.memory_plan(TINY, batch=3, max_len=40, dtype=jnp.bfloat16)
    assert plan.weights == param_bytes(abstract_params(TINY, jnp.bfloat16))
    cache = init_cache(TINY, 3, 40, jnp.bfloat16)
    assert plan.kv_cache == cache.k.nbytes + cache.v.nbytes + cache.lengths.nbytes
    assert plan.total == plan.weights + plan.kv_cache + plan.activations


def test_llama_8b_by_hand():
    plan = memory.memory_plan(LLAMA8B, batch=8, max_len=1024, dtype=jnp.bfloat16)
    assert plan.weights == 2 * 8_030_261_248  # Llama-3-8B's parameter count, bf16
    assert plan.kv_cache == 8 * 1024 * 2 * 32 * 8 * 128 * 2 + 4 * 8  # 128 KiB a token
    # Activations at a 1024-token prefill: f32 scores [8, 32, 1024, 1024] twice plus a bf16 cast dominate.
    assert 8 * 32 * 1024 * 1024 * 10 < plan.activations < 1.1 * 8 * 32 * 1024 * 1024 * 10


def test_quantized_plan_and_unknown_recipe():
    bf16 = memory.memory_plan(LLAMA8B, 1, 128).weights
    int4 = memory.memory_plan(LLAMA8B, 1, 128, quant="int4").weights
    assert 3.0 < bf16 / int4 < 4.0  # the embedding table stays bf16
    with pytest.raises(ValueError, match="unknown quantization recipe 'nf3'"):
        memory.memory_plan(LLAMA8B, 1, 128, quant="nf3")


def test_check_fits_refuses_with_the_numbers():
    plan = memory.memory_plan(LLAMA8B, 128, 8192)
    with pytest.raises(memory.DoesNotFit) as e:
        memory.check_fits(LLAMA8B, 128, 8192, available=80 * 10**9)
    msg = str(e.value)
    assert f"{plan.kv_cache / 1e9:.2f} GB" in msg and f"{plan.weights / 1e9:.2f} GB" in msg
    assert "80.00 GB are available" in msg and "batch=128" in msg and "max_len=8192" in msg
    # The cache alone (what init_cache checks, params already resident) can fit where all parts do not.
    assert memory.check_fits(LLAMA8B, 8, 8192, parts=("kv_cache",), available=10 * 10**9).kv_cache < 10**10
    with pytest.raises(memory.DoesNotFit, match=r"kv cache \d+\.\d\d GB, but"):
        memory.check_fits(LLAMA8B, 16, 8192, parts=("kv_cache",), available=10 * 10**9)


def test_check_fits_uses_the_device_and_passes_small_configs():
    free, where = memory.free_device_bytes()
    assert free is None or free > 0
    assert isinstance(where, str) and where
    plan = memory.check_fits(TINY, 1, 16)
    assert plan.total > 0


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="batch >= 1"):
        memory.memory_plan(TINY, 0, 16)
