"""The one matmul entry: every weight product in the model goes through `matmul`.

Takes a plain array weight today; the quantization work adds quantized-array weights here (dequantize
or a fused kernel), so that `model.py` never branches on weight format.
"""

from __future__ import annotations

import jax.numpy as jnp


def matmul(eq: str, x, w, out_dtype=None):
    """`einsum(eq, x, w)` accumulated in float32, returned in `out_dtype` (default: the activation dtype)."""
    out = jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return out.astype(out_dtype or x.dtype)
