"""Token sampling: greedy, temperature, top-k, top-p (nucleus) and min-p, per sequence, on device.

`Sampling` holds the knobs. Temperature, top_p and min_p are traced values (scalars or `[B]` arrays), so
new values never recompile; `top_k` changes the candidate-pool shape and is static. Randomness comes from
explicit per-sequence PRNG keys. Knows nothing of the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Sampling:
    """Sampling settings. temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 disable each filter."""

    temperature: jax.Array | float = 0.0
    top_p: jax.Array | float = 1.0
    min_p: jax.Array | float = 0.0
    top_k: int = struct.field(pytree_node=False, default=0)

    def __post_init__(self):
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative int, got {self.top_k!r}")
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                bad = value < 0 or (name != "temperature" and value > 1) or (name == "top_p" and value == 0)
                if bad:
                    raise ValueError(f"invalid {name}={value!r}")

    def for_batch(self, batch: int) -> "Sampling":
        """Float32 `[batch]` arrays for every traced field, so every call has the same signature."""
        as_array = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (batch,))
        return self.replace(
            temperature=as_array(self.temperature), top_p=as_array(self.top_p), min_p=as_array(self.min_p)
        )


def sequence_keys(seed, batch: int) -> jax.Array:
    """One PRNG key per sequence from an int seed (`seed + i` for row i) or a per-sequence list of seeds."""
    seeds = jnp.asarray(seed, jnp.uint32)
    if seeds.ndim == 0:
        seeds = seeds + jnp.arange(batch, dtype=jnp.uint32)
    if seeds.shape != (batch,):
        raise ValueError(f"expected one seed or {batch} seeds, got shape {seeds.shape}")
    return jax.vmap(jax.random.key)(seeds)


def sample(logits, keys, sampling: Sampling):
    """Draw one token per row of `logits [B, V]` with `keys [B]`; returns int32 `[B]`.

    When every row is greedy the sort over the vocabulary is skipped at run time (`lax.cond`).
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = jnp.broadcast_to(jnp.asarray(sampling.temperature, jnp.float32), greedy.shape)
    return jax.lax.cond(
        jnp.any(temperature > 0), lambda: _draw(logits, keys, sampling, temperature, greedy), lambda: greedy
    )


def _draw(logits, keys, sampling: Sampling, temperature, greedy):
    top_p = jnp.broadcast_to(jnp.asarray(sampling.top_p, jnp.float32), greedy.shape)
    min_p = jnp.broadcast_to(jnp.asarray(sampling.min_p, jnp.float32), greedy.shape)

    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if sampling.top_k:
        values, ids = jax.lax.top_k(scaled, min(sampling.top_k, logits.shape[-1]))  # sorted descending
    else:
        ids = jnp.argsort(-scaled, axis=-1)
        values = jnp.take_along_axis(scaled, ids, axis=-1)
    probs = jax.nn.softmax(values, axis=-1)
    # Nucleus: keep a candidate while the mass before it is below top_p (the first is always kept).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    keep &= probs >= min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)
    choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, values, -jnp.inf))
    drawn = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
