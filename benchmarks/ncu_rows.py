"""The quantized row kernels (`pallas_kernels/row_matmul.py`) launched twice each, for Nsight Compute.

    ncu --kernel-name regex:row_matmul --metrics <list> --csv python benchmarks/ncu_rows.py [fmt ...]

llama-3-8b shapes: gate+up (SwiGLU, norm fused) and down (residual) of int8 per row and int4 in groups of
128 with offsets, one layer of a two-layer stack each; the second launch of a kernel is the one to read.
The metrics used so far are listed in pallas_kernels/NOTES.md (row_matmul sections).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxinfer.quant import quantize_array  # noqa: E402
from pallas_kernels import row_matmul as rm  # noqa: E402

FORMATS = {"int8": (None, False), "int4": (128, True)}
L = 2


def main(formats):
    key = jax.random.key(0)
    for fmt in formats:
        group, zero_point = FORMATS[fmt]
        for name, k, n, epilogue in (("gateup", 4096, 14336, "swiglu"), ("down", 14336, 4096, "residual")):
            parts = 2 if epilogue == "swiglu" else 1
            ws = tuple((q.values, q.scales, q.offsets) for q in (
                quantize_array(jax.random.normal(jax.random.fold_in(key, j), (L, n, k), jnp.float32), fmt, (-1,),
                               group, zero_point=zero_point) for j in range(parts)))
            x = jax.random.normal(key, (1, k), jnp.bfloat16)
            extra = (dict(norm_weight=jnp.ones((L, k), jnp.bfloat16)) if epilogue == "swiglu"
                     else dict(residual=jnp.zeros((1, n), jnp.bfloat16)))
            for layer in range(2):
                jax.block_until_ready(rm.row_matmuls(x, ws, jnp.int32(layer), fmt=fmt, group_size=group,
                                                     epilogue=epilogue, **extra))
            print(fmt, name, "launched", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(FORMATS))
