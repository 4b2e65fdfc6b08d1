"""Memory planning: how many bytes a configuration needs on the device, and an early, clear refusal.

`memory_plan(config, batch, max_len, dtype, quant)` counts weights (as `jaxinfer.quant` would store them
under the recipe `quant`, computed on the abstract tree), the dense KV cache and an estimate of
peak activations (the XLA attention path materialises float32 scores for a whole prefill chunk, which
dominates at long prompts). `check_fits` compares the parts you name against the device's free memory
and raises `DoesNotFit` naming every number before anything is allocated. Knows nothing of jit or kernels.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .params import abstract_params

PARTS = ("weights", "kv_cache", "activations")
GB = 1e9


class DoesNotFit(MemoryError, ValueError):
    """A configuration needs more device memory than is free (a ValueError too: a bad argument, caught
    wherever bad arguments are, e.g. the CLI's error message)."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes needed on one device, by part."""

    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def need(self, parts=PARTS) -> int:
        return sum(getattr(self, p) for p in parts)

    def describe(self, parts=PARTS) -> str:
        terms = " + ".join(f"{p.replace('_', ' ')} {getattr(self, p) / GB:.2f} GB" for p in parts)
        return f"{terms} = {self.need(parts) / GB:.2f} GB" if len(parts) > 1 else terms


def leaf_bytes(config: ModelConfig, dtype=jnp.bfloat16, quant: str | None = None) -> dict[str, int]:
    """Bytes of every parameter leaf ("layers/q", "embed", ...) as stored: in `dtype`, or as the quantization
    recipe `quant` stores it (codes, scales and offsets), computed on the abstract tree (no memory)."""
    tree = abstract_params(config, dtype)
    is_q = lambda x: False  # noqa: E731
    if quant is not None:
        from .quant import is_qarray, quantize  # the recipe decides which leaves, their format and scales

        tree, is_q = quantize(tree, quant), is_qarray
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_q):
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        out[key] = int(leaf.nbytes) if is_q(leaf) else int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return out


def weight_bytes(config: ModelConfig, dtype=jnp.bfloat16, quant: str | None = None) -> int:
    """Resident parameter bytes, quantized as `quant` stores them."""
    return sum(leaf_bytes(config, dtype, quant).values())


def kv_cache_bytes(config: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> int:
    """The dense cache `[L, B, S, K, H]` for keys and values, plus lengths."""
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * np.dtype(dtype).itemsize
    return int(batch * max_len * per_token + 4 * batch)


def activation_bytes(config: ModelConfig, batch: int, q_len: int, kv_len: int, dtype=jnp.bfloat16) -> int:
    """Peak live activations of one layer for `q_len` queries over `kv_len` keys (an upper estimate).

    Residual stream twice, q/k/v, float32 scores and probabilities plus their cast (XLA attention path),
    or the SwiGLU intermediates, whichever is larger, plus float32 last-token logits.
    """
    c, item = config, np.dtype(dtype).itemsize
    tokens = batch * q_len
    residual = 2 * tokens * c.dim * item
    qkv = tokens * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim * item
    scores = batch * c.num_heads * q_len * kv_len * (4 + 4 + item)
    mlp = 3 * tokens * c.ffn_dim * item
    logits = batch * c.vocab_size * 4
    return int(residual + max(qkv + scores, mlp) + logits)


def memory_plan(config: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, quant: str | None = None,
                *, prefill_len: int | None = None, cache_dtype=None) -> MemoryPlan:
    """Bytes for weights, KV cache and peak activations of serving `batch` sequences of up to `max_len`.

    Activations assume the worst prefill: one chunk of `prefill_len` (default `max_len`) tokens.
    """
    if batch < 1 or max_len < 1:
        raise ValueError(f"memory_plan needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
    chunk = min(prefill_len or max_len, max_len)
    return MemoryPlan(
        weights=weight_bytes(config, dtype, quant),
        kv_cache=kv_cache_bytes(config, batch, max_len, cache_dtype or dtype),
        activations=activation_bytes(config, batch, chunk, max_len, dtype),
    )


def free_device_bytes(device=None) -> tuple[int | None, str]:
    """(free bytes, description) of `device` (default: the first); host RAM for the CPU; None if unknown."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    except jax.errors.JaxRuntimeError:  # e.g. another process's device: its memory is not ours to read
        stats = None
    if stats and "bytes_limit" in stats:
        limit, used = int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
        return limit - used, f"{device.device_kind} has {(limit - used) / GB:.2f} GB free of {limit / GB:.2f} GB"
    if device.platform == "cpu":
        try:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None, "host memory unknown"
        return int(free), f"the host has {free / GB:.2f} GB of RAM available"
    return None, f"{device.device_kind} reports no memory size"


def check_fits(config: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, quant: str | None = None, *,
               parts=PARTS, device=None, available: int | None = None, prefill_len: int | None = None,
               cache_dtype=None) -> MemoryPlan:
    """Raise `DoesNotFit` if the named `parts` of the plan exceed free memory; else return the plan.

    `available` overrides the device's free bytes. Where the free memory is unknown nothing is refused.
    """
    plan = memory_plan(config, batch, max_len, dtype, quant, prefill_len=prefill_len, cache_dtype=cache_dtype)
    if available is None:
        available, where = free_device_bytes(device)
    else:
        where = f"{available / GB:.2f} GB are available"
    if available is not None and plan.need(parts) > available:
        raise DoesNotFit(
            f"batch={batch}, max_len={max_len}, dtype={np.dtype(dtype).name}"
            f"{', quant=' + quant if quant else ''} does not fit: it needs {plan.describe(parts)}, "
            f"but {where}. Lower the batch or max_len, or quantize."
        )
    return plan
