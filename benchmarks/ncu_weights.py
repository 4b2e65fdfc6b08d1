"""The weight kernel's batched products (`pallas_kernels/weight_matmul.py`) launched twice each, for Nsight
Compute: gate+up of `llama-3-8b` (two [14336, 4096] weights, contraction-last, one launch) at 16 rows, per
format (bf16; int8 per row; int4 in groups of 128 with offsets), one layer of a two-layer stack.

    ncu --kernel-name regex:weight_matmul --launch-skip 1 --launch-count 1 --section ... \
        python benchmarks/ncu_weights.py [fmt ...]

The second launch of a kernel is the one to read (the first compiles). Findings: pallas_kernels/NOTES.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxinfer.quant import quantize_array  # noqa: E402
from pallas_kernels import weight_matmul as wm  # noqa: E402

FORMATS = {"plain": (None, False), "int8": (None, False), "int4": (128, True)}
L, ROWS, K, N = 2, 16, 4096, 14336


def main(formats):
    key = jax.random.key(0)
    x = jax.random.normal(key, (ROWS, K), jnp.bfloat16)
    for fmt in formats:
        group, zero_point = FORMATS[fmt]
        ws = []
        for j in range(2):
            w = jax.random.normal(jax.random.fold_in(key, j), (L, N, K), jnp.float32)
            if fmt == "plain":
                ws.append((w.astype(jnp.bfloat16), None, None))
            else:
                q = quantize_array(w, fmt, (-1,), group, zero_point=zero_point)
                ws.append((q.values, q.scales.reshape(L, N, -1), q.offsets))
        for layer in range(2):
            jax.block_until_ready(wm.weight_matmuls(x, tuple(ws), jnp.int32(layer), fmt=fmt, group_size=group,
                                                    transposed=True))
        print(fmt, "launched", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(FORMATS))
