"""Rotary position embedding (half-split layout: pairs (i, i + H/2)): the per-step tables and the rotation.

Shared by the model (tables once per step) and `attention.rotate_and_write` (the rotation, or the kernel that
fuses it with the cache write). Knows nothing of caches or kernels.
"""

from __future__ import annotations

import jax.numpy as jnp

from .config import ModelConfig, rope_inv_freq


def rope_tables(config: ModelConfig, positions):
    """cos, sin `[B, T, H]` for integer `positions [B, T]` (half-split layout: pairs (i, i + H/2))."""
    inv_freq = jnp.asarray(rope_inv_freq(config), jnp.float32)  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate `x [B, T, heads, H]`; computed in float32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
