"""Offline SASS (no GPU) of a decode attention's probabilities-times-values loop over an int8 value tile, two ways:

- `tile`: the codes loaded as an int8 [keys, H] tile and converted for the dot, as `decode_attention` does now;
- `words`: the same bytes read as int32 words [keys, H / 4] (four adjacent columns a word), each byte position
  decoded into its own column group [keys, H / 4] with its own dot and accumulator (the output's columns stored with
  a stride of 4).

Question (session 30): Nsight Compute found the int8 cache's launch gathering the value tile byte by byte into the
dot's operand (`LDS.U8`: the keys, the dot's contraction, sit rows apart). Does a word view avoid that without a
new cache format? Offline counts (Triton 3.8, sm_90): `tile` 408 instructions, 70 registers, 32 `LDS.U8`, 40 `PRMT`,
75 `LOP3`; `words` 304, 56 registers, no byte loads (the decoded groups reach the dot through shared memory and
`LDSM`), but 32 int-to-bfloat16 conversions (`I2F`, a quarter of the ALU rate); `words-bits` (the bytes made floats
by their bits) 344, no conversion instruction. Not timed: the lead for the int8 cache's attention (NOTES.md).

    python benchmarks/pv_sass.py
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402

from sass_count import capture_modules, sass_counts  # noqa: E402

KEYS, H, BLOCK, ROWS = 1024, 128, 32, 16  # keys walked, head dim, key block, query rows (padded group)
WARPS, STAGES = 4, 4


def _dot(p, v):
    return lax.dot_general(p, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def tile_kernel(p_ref, v_ref, o_ref):
    p = p_ref[...]

    def body(j, acc):
        return acc + _dot(p, v_ref[pl.ds(j * BLOCK, BLOCK), :].astype(jnp.bfloat16))
    o_ref[...] = lax.fori_loop(0, KEYS // BLOCK, body, jnp.zeros((ROWS, H), jnp.float32))


def words_kernel(p_ref, w_ref, o_ref):
    p = p_ref[...]

    def body(j, accs):
        w = w_ref[pl.ds(j * BLOCK, BLOCK), :]  # int32 [BLOCK, H / 4]
        return tuple(acc + _dot(p, lax.shift_right_arithmetic(lax.shift_left(w, 24 - 8 * b), 24).astype(jnp.bfloat16))
                     for b, acc in enumerate(accs))  # byte b of each word, sign-extended: columns 4 i + b
    accs = lax.fori_loop(0, KEYS // BLOCK, body, tuple(jnp.zeros((ROWS, H // 4), jnp.float32) for _ in range(4)))
    for b, acc in enumerate(accs):
        o_ref[:, pl.ds(b, H // 4, stride=4)] = acc


def words_bits_kernel(p_ref, w_ref, o_ref):
    """`words` with each byte made a float without a conversion instruction: the byte, sign bit flipped, set into the
    mantissa of 2^23 (one logic op after the shift), 2^23 + 128 taken off, rounded to bfloat16 (exact)."""
    p = p_ref[...]

    def body(j, accs):
        w = w_ref[pl.ds(j * BLOCK, BLOCK), :]
        out = []
        for b, acc in enumerate(accs):
            u = (lax.shift_right_logical(w, 8 * b) & 0xFF) ^ 0x4B000080
            v = (lax.bitcast_convert_type(u, jnp.float32) - float(2**23 + 128)).astype(jnp.bfloat16)
            out.append(acc + _dot(p, v))
        return tuple(out)
    accs = lax.fori_loop(0, KEYS // BLOCK, body, tuple(jnp.zeros((ROWS, H // 4), jnp.float32) for _ in range(4)))
    for b, acc in enumerate(accs):
        o_ref[:, pl.ds(b, H // 4, stride=4)] = acc


def counts(kernel, v):
    call = lambda p, v: pl.pallas_call(  # noqa: E731
        kernel, grid=(1,), in_specs=[pl.no_block_spec] * 2, out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((ROWS, H), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=WARPS, num_stages=STAGES))(p, v)
    (module,) = capture_modules(call, jax.ShapeDtypeStruct((ROWS, BLOCK), jnp.bfloat16), v)
    return sass_counts(module, WARPS, STAGES)


def main():
    for name, kernel, v in (("tile", tile_kernel, jax.ShapeDtypeStruct((KEYS, H), jnp.int8)),
                            ("words", words_kernel, jax.ShapeDtypeStruct((KEYS, H // 4), jnp.int32)),
                            ("words-bits", words_bits_kernel, jax.ShapeDtypeStruct((KEYS, H // 4), jnp.int32))):
        c = counts(kernel, v)
        top = ", ".join(f"{op} {n}" for op, n in c["ops"].most_common(10))
        print(f"{name}: {c['resources']}, {c['instructions']} instructions; {top}", flush=True)


if __name__ == "__main__":
    main()
