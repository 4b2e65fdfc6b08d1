"""Probe (timing only, not used by the library): a few-row product over int8 codes on the tensor cores.

    PYTHONPATH=. python3 benchmarks/mma_probe.py --out $OUT

Question for issue 6: the row kernel (`pallas_kernels/row_matmul.py`) multiply-adds codes on the CUDA cores
and is issue-bound for int4 (pallas_kernels/NOTES.md, session 8). Triton keeps a decoded tile in registers
as the A operand of Hopper's wgmma (seen in the SASS of a captured module: codes copied to shared memory
by cp.async, loaded in the dot-operand layout, converted, then HGMMA with A in registers). So compute
out^T = W @ x^T with W [N, K] the codes decoded to float16 in registers and x^T [K, 16] (rows padded to
16) in shared memory. Decoding: Triton's own int8 -> bf16 conversion, or inline PTX (four codes -> two
f16x2 with one xor, two byte permutes and two packed subtracts). Printed: correctness against a float32
product, then device time per product for llama-3-8b's gate+up-sized [28672, 4096] and down [4096, 14336]
int8 weights (8 stacked copies, so the L2 cache does not hold them) against `row_matmuls` on the same codes.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402

from jaxinfer.bench import time_calls  # noqa: E402
from pallas_kernels.row_matmul import row_matmuls  # noqa: E402

M_PAD = 16
_INT8_TO_F16 = """{
.reg .b32 u, k;
xor.b32 u, $2, 0x80808080;
mov.b32 k, 0x64806480;
prmt.b32 $0, u, 0x64646464, 0x5140;
prmt.b32 $1, u, 0x64646464, 0x7362;
sub.f16x2 $0, $0, k;
sub.f16x2 $1, $1, k;
}"""


_INT8_PAIR_TO_F16 = """{
.reg .b32 u, k;
cvt.u32.u16 u, $1;
xor.b32 u, u, 0x8080;
mov.b32 k, 0x64806480;
prmt.b32 $0, u, 0x64646464, 0x5140;
sub.f16x2 $0, $0, k;
}"""


def _decode(w, how):
    if how == "ptx2":  # two codes per asm instance: the packing Triton's dot-operand layout already has
        [out] = pltriton.elementwise_inline_asm(_INT8_PAIR_TO_F16, args=[w], constraints="=r,h", pack=2,
                                                result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.float16)])
        return out
    if how == "ptx":
        [out] = pltriton.elementwise_inline_asm(_INT8_TO_F16, args=[w], constraints="=r,=r,r", pack=4,
                                                result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.float16)])
        return out
    return w.astype(jnp.float16)


def _kernel(w_ref, xt_ref, s_ref, o_ref, *, bk, how):
    k = w_ref.shape[1]

    def body(c, acc):
        wd = _decode(w_ref[:, pl.ds(c * bk, bk)], how)
        return acc + pltriton.dot(wd, xt_ref[pl.ds(c * bk, bk), :])

    acc = lax.fori_loop(0, k // bk, body, jnp.zeros((w_ref.shape[0], M_PAD), jnp.float32))
    o_ref[...] = acc * s_ref[...]


@functools.partial(jax.jit, static_argnames=("bn", "bk", "warps", "stages", "how"))
def mma_product(codes, scales, x, *, bn=64, bk=256, warps=4, stages=3, how="ptx"):
    """x [M <= 16, K] bf16 @ (codes [N, K] int8 * scales [N, 1]).T -> [M, N] float32."""
    n, k = codes.shape
    m = x.shape[0]
    xt = jnp.zeros((k, M_PAD), jnp.float16).at[:, :m].set(x.T.astype(jnp.float16))
    out = pl.pallas_call(
        functools.partial(_kernel, bk=bk, how=how), grid=(n // bn,),
        in_specs=[pl.BlockSpec((bn, k), lambda i: (i, 0)), pl.BlockSpec((k, M_PAD), lambda i: (0, 0)),
                  pl.BlockSpec((bn, 1), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((bn, M_PAD), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((n, M_PAD), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages), name=f"mma_probe_{how}",
    )(codes, xt, scales)
    return out[:, :m].T


def seconds_per_call(fn, stacks, x):
    """Median wall seconds per product over the stacked copies, all chained in one jit."""
    @jax.jit
    def run(x):
        acc = jnp.zeros((), jnp.float32)
        for codes, scales in stacks:
            acc = acc + fn(codes, scales, x).sum()
        return acc
    return time_calls(lambda: run(x), calls=1, samples=20, warmup=1).median / len(stacks)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    key = jax.random.key(0)
    for name, (n, k) in {"gateup": (28672, 4096), "down": (4096, 14336)}.items():
        stacks = [(jax.random.randint(jax.random.fold_in(key, i), (n, k), -127, 128, jnp.int32).astype(jnp.int8),
                   jax.random.uniform(jax.random.fold_in(key, 100 + i), (n, 1), jnp.float32, 0.001, 0.01))
                  for i in range(8)]
        nbytes = n * k + n * 4
        for m in (1, 16):
            x = jax.random.normal(jax.random.fold_in(key, 7), (m, k), jnp.bfloat16)
            want = np.asarray(x, np.float32) @ (np.asarray(stacks[0][0], np.float32) * np.asarray(stacks[0][1])).T
            cases = {f"mma-{how} bn{bn} bk{bk} w{w} s{s}": functools.partial(mma_product, bn=bn, bk=bk, warps=w,
                                                                              stages=s, how=how)
                     for how in ("ptx", "ptx2", "astype") for bn, bk, w, s in ((64, 256, 4, 3), (128, 256, 4, 3),
                                                                         (64, 512, 4, 3), (128, 128, 8, 4))}
            if m == 1:
                cases["row_matmuls"] = lambda c, s, x: row_matmuls(x, ((c, s, None),), fmt="int8")[0]
            for label, fn in cases.items():
                row = {"weight": name, "rows": m, "case": label}
                try:
                    got = np.asarray(fn(*stacks[0], x), np.float32)
                    row["rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                    t = seconds_per_call(fn, stacks, x)
                    row.update(us=round(t * 1e6, 2), tb_s=round(nbytes / t / 1e12, 3))
                except Exception as e:  # noqa: BLE001 - record and go on
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
                Path(args.out, "mma_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
