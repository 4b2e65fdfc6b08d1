"""Analytic FLOP and byte counts of one prefill call or one decode step, from the model config alone.

This is the roofline model the benchmark reports against: FLOPs are the weight products (2 per
multiply-add) plus attention with causality (a query attends only to keys at or before it); bytes are the
fewest a step must move: every weight streamed once (as the quantization recipe stores it), the valid KV
cache read once, the new KV written once. Elementwise work (norms, rope, softmax) is left out on purpose: it is a few percent of the FLOPs
and fuses into neighbours. Knows nothing of devices, timing or jit.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ..config import ModelConfig
from ..memory import leaf_bytes
from ..params import LAYER_MATRICES, is_spec, param_specs


def dtype_bytes(dtype) -> int:
    return int(np.dtype(dtype).itemsize)


@dataclasses.dataclass(frozen=True)
class StepCost:
    """What one call must compute and move. `bytes` is what MBU divides by (reads: weights + valid KV)."""

    matmul_flops: float
    attention_flops: float
    weight_bytes: float
    kv_read_bytes: float
    kv_write_bytes: float
    tokens: int  # tokens processed (prefill) or generated (decode) by the call

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.attention_flops

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_read_bytes

    @property
    def min_bytes(self) -> float:
        """Every byte the step must touch: reads plus the new KV written."""
        return self.bytes + self.kv_write_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte of `min_bytes`."""
        return self.flops / self.min_bytes

    def predict_seconds(self, flops_per_s: float, bytes_per_s: float) -> float:
        """Roofline time: the larger of compute time and memory time (they overlap at best)."""
        return max(self.flops / flops_per_s, self.min_bytes / bytes_per_s)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(flops=self.flops, bytes=self.bytes, min_bytes=self.min_bytes, intensity=self.intensity)
        return d


def layer_matrix_elements(config: ModelConfig) -> int:
    """Elements of one layer's weight matrices (q, k, v, o, gate, up, down): each does one MAC per token."""
    specs = param_specs(config)["layers"]
    return sum(int(np.prod(specs[name].shape[1:])) for name in LAYER_MATRICES)


def head_elements(config: ModelConfig) -> int:
    return config.dim * config.vocab_size


def streamed_weight_bytes(config: ModelConfig, dtype, quant: str | None = None, rows: int = 1) -> float:
    """Bytes of weights one step reads: every leaf as stored (quantized by `quant`), except the embedding
    table, read only at the `rows` gathered rows unless it is tied to the head (then read whole)."""
    leaves = leaf_bytes(config, dtype, quant)
    embed = leaves.pop("embed")
    return float(sum(leaves.values()) + (embed if config.tie_embeddings else rows * embed / config.vocab_size))


def kv_bytes_per_token(config: ModelConfig, dtype) -> int:
    """Bytes of keys plus values one token occupies in the cache, over all layers (a one-byte int8 / fp8
    cache also stores a float32 scale per token per kv head)."""
    per_head = config.head_dim * dtype_bytes(dtype) + (4 if dtype_bytes(dtype) == 1 else 0)
    return 2 * config.num_layers * config.num_kv_heads * per_head


def attention_flops(config: ModelConfig, batch: int, q_len: int, kv_before: int) -> float:
    """QK^T and PV FLOPs of `q_len` new queries after `kv_before` cached tokens, causal, all layers.

    Query i sees `kv_before + i + 1` keys (itself included); each key costs 2 FLOPs per head dim for the
    score and 2 for the weighted value, per query head.
    """
    keys_seen = q_len * kv_before + q_len * (q_len + 1) / 2
    per_key = 4 * config.num_heads * config.head_dim
    return float(batch * config.num_layers * per_key * keys_seen)


def prefill_cost(config: ModelConfig, batch: int, prompt_len: int, dtype, quant: str | None = None,
                 cache_dtype=None) -> StepCost:
    """One prefill call of `batch` prompts of `prompt_len` tokens into an empty cache; logits at the last."""
    cache_dtype = cache_dtype or dtype
    tokens = batch * prompt_len
    return StepCost(
        matmul_flops=2.0 * (tokens * config.num_layers * layer_matrix_elements(config) + batch * head_elements(config)),
        attention_flops=attention_flops(config, batch, prompt_len, 0),
        weight_bytes=streamed_weight_bytes(config, dtype, quant, rows=tokens),
        kv_read_bytes=0.0,  # the prompt's own keys are produced, not read from memory, by an ideal kernel
        kv_write_bytes=float(tokens * kv_bytes_per_token(config, cache_dtype)),
        tokens=tokens,
    )


def decode_cost(config: ModelConfig, batch: int, context: float, dtype, quant: str | None = None,
                cache_dtype=None) -> StepCost:
    """One decode step of `batch` sequences that already hold `context` tokens each.

    The new token's keys/values are written, then attention reads `context + 1` positions per sequence.
    `context` may be fractional: the mean over a timed run of steps.
    """
    cache_dtype = cache_dtype or dtype
    per_token = kv_bytes_per_token(config, cache_dtype)
    return StepCost(
        matmul_flops=2.0 * batch * (config.num_layers * layer_matrix_elements(config) + head_elements(config)),
        attention_flops=attention_flops(config, batch, 1, context),
        weight_bytes=streamed_weight_bytes(config, dtype, quant, rows=batch),
        kv_read_bytes=float(batch * (context + 1) * per_token),
        kv_write_bytes=float(batch * per_token),
        tokens=batch,
    )


def parameter_count(config: ModelConfig) -> int:
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(param_specs(config), is_leaf=is_spec))
