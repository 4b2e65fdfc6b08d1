"""The model's decode attention launch (`decode_attention_append`: rotation, cache write and attention in one) at
`llama-3-8b`'s batch-16 shapes, context 1024, on a bf16 and an int8 cache, each launched twice, for Nsight Compute:

    ncu --clock-control none --kernel-name regex:decode_attention --section ... \
        python benchmarks/ncu_decode.py [bf16] [int8] [ptx] [f16]

`ptx` / `f16` switch the int8 cache's codes to inline PTX (`decode_attention.CODES_BY_PTX`) / float16 dots
(`QUANT_DOT_DTYPE`).

Question (session 30): the int8 cache's launch takes ~21 us a layer for half the bf16 cache's bytes (~22 us): what
holds it? Findings: pallas_kernels/NOTES.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxinfer.cache import quantize_kv  # noqa: E402
from pallas_kernels import decode_attention_append  # noqa: E402

B, N, K, H, S, LENGTH, LAYERS = 16, 32, 8, 128, 1152, 1024, 2


def main(formats=("bf16", "int8")):
    keys = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(keys[0], (B, N, H), jnp.bfloat16)
    k_new, v_new = (jax.random.normal(kk, (B, K, H), jnp.bfloat16) for kk in keys[1:3])
    angle = jnp.linspace(0, 3, B * H).reshape(B, H)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    k, v = (jax.random.normal(kk, (LAYERS, B, S, K, H), jnp.bfloat16) for kk in keys[3:5])
    positions = jnp.full((B,), LENGTH - 1, jnp.int32)
    for fmt in formats:
        kw = {}
        if fmt == "int8":
            (kc, ks), (vc, vs) = quantize_kv(k, jnp.int8), quantize_kv(v, jnp.int8)
            caches, kw = (kc, vc), dict(k_scale=ks, v_scale=vs)
        else:
            caches = (k, v)
        for _ in range(2):
            out = decode_attention_append(q, k_new, v_new, cos, sin, *caches, layer=jnp.int32(1), positions=positions,
                                          lengths=positions + 1, **kw)
            jax.block_until_ready(out)
        print("launched", fmt, flush=True)


if __name__ == "__main__":
    attention = sys.modules["pallas_kernels.decode_attention"]
    attention.CODES_BY_PTX = "ptx" in sys.argv[1:]
    attention.QUANT_DOT_DTYPE = "float16" if "f16" in sys.argv[1:] else None
    main(*([[a for a in sys.argv[1:] if a in ("bf16", "int8")] or ["bf16", "int8"]]))
