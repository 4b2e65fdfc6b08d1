"""The fragment kernel (`pallas_kernels/fragment_matmul.py`) launched twice on one product, for Nsight Compute:
`llama-3-8b`'s gate+up (28672 x 4096, int4 in groups of 128 with offsets) at 16 rows, one layer of a two-layer
stack (random codes: the instruction stream does not depend on them).

    ncu --kernel-name regex:fragment --launch-skip 1 --launch-count 1 --section ... \
        python benchmarks/ncu_fragments.py [rows] [K N]

The second launch is the one to read (the first compiles). Findings: pallas_kernels/NOTES.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import fragment_matmul as fm  # noqa: E402

GROUP = 128


def main(rows=16, k=4096, n=28672):
    k1, k2 = jax.random.split(jax.random.key(0))
    values = jax.random.randint(k1, (2, n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = jnp.full((2, n, k // GROUP), 0.01, jnp.bfloat16)
    offsets = jnp.full((2, n, k // GROUP), -0.08, jnp.bfloat16)
    x = jax.random.normal(k2, (rows, k), jnp.bfloat16)
    for layer in range(2):
        jax.block_until_ready(fm.fragment_matmul(x, values, scales, offsets, jnp.int32(layer), group_size=GROUP))
    print("launched", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
