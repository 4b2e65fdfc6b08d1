"""Probe: can XLA's row reduction read int8 codes at the bf16 rate if it loads them as 32-bit words?

    PYTHONPATH=. python3 benchmarks/int8_words_probe.py --out $OUT/words

XLA's reduction over `codes.astype(float32) * x` moves int8 rows slower than bf16 rows (BENCHMARKS.md,
session 6: the int8 step on XLA 4.750 ms against bf16's 4.468), and the Pallas row kernel reaches ~0.8 of copy
on gate+up and 0.58 on the small products. Here the codes are viewed as int32 words [N, K/4] (a free bitcast)
and each word's four signed bytes come out by two shifts, multiplied with x held planar ([4, K/4], byte j of
every word against x_j). For each `llama-3-8b` batch-1 product (8 stacked layers, so no layer finds its
weight in L2) the profiler's device time per layer: bf16 and the int8 codes through `ops.gemv` (the conversion
inside the fusion), int8 as words, and the library's int8 row kernel (`ops.matmul` on a quantized weight). Also checks the words' sums
against the conversion's. Prints one JSON line per row and a table last. Not used by the library.

S21-1 (BENCHMARKS.md session 21) ran an earlier spelling of the int8 conversion: a plain row reduction, without
`ops.gemv`'s chunks for `down`'s long rows. Caveat (seen in that run): the scan makes a `memcpy` of each layer's slice where the
product reads it through a bitcast (the words) or hands it to a kernel, so those rows' totals include the copy and
their reductions may read the freshly copied slice from L2; compare the reduction fusions' own times.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer import ops  # noqa: E402
from jaxinfer.quant.qarray import quantize_array  # noqa: E402

LAYERS = 8
PRODUCTS = {"o": (4096, 4096), "qkv": (6144, 4096), "down": (4096, 14336), "gateup": (28672, 4096)}


def words_gemv(codes, x, splits: int = 1):
    """sum_k codes[n, k] * x[k] with codes int8 [N, K] read as int32 words; float32 [N]."""
    n, k = codes.shape
    w = jax.lax.bitcast_convert_type(codes.reshape(n, k // 4, 4), jnp.int32)  # [N, K/4]
    xp = x.astype(jnp.float32).reshape(k // 4, 4).T  # [4, K/4]: x_j for byte j of each word
    terms = sum(((w << (24 - 8 * j)) >> 24).astype(jnp.float32) * xp[j] for j in range(4))  # [N, K/4]
    if splits == 1:
        return jnp.sum(terms, axis=1)
    r = jnp.sum(terms.reshape(n, splits, k // 4 // splits), axis=2)
    return jnp.sum(jax.lax.optimization_barrier(r), axis=1)


def xla_gemv(w, x):
    """The library's XLA row reduction (`ops.gemv`: float32 conversion in the fusion, long rows in chunks)."""
    return ops.gemv("k,nk->n", x, w)


def chain(product, ws, x):
    """Every layer's product in turn, the next x depending on the last output (nothing hoisted)."""
    def body(x, w):
        y = product(w, x)
        return x + (y[:1] * 0).astype(x.dtype)[0], None
    out, _ = jax.lax.scan(body, x, ws, unroll=True)
    return out


def main(argv=None) -> int:
    from jaxinfer.bench import measure_ceilings
    from jaxinfer.bench.profile import kernel_breakdown

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    copy = measure_ceilings().copy_bytes_per_s
    rows = []
    for name, (n, k) in PRODUCTS.items():
        wf = jax.random.normal(jax.random.key(0), (LAYERS, n, k), jnp.bfloat16)
        q = quantize_array(wf, "int8", (2,))  # per output row: the library's contraction-last int8
        codes = q.values
        x = jax.random.normal(jax.random.key(1), (k,), jnp.bfloat16)
        splits = ops.ROW_SPLITS if k >= ops.ROW_SPLIT_MIN_K else 1
        want = xla_gemv(codes[0], x)
        got = words_gemv(codes[0], x, splits)
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        variants = {
            "bf16_xla": (wf, xla_gemv, n * k * 2),
            "int8_convert_xla": (codes, xla_gemv, n * k),
            "int8_words_xla": (codes, lambda w, x: words_gemv(w, x, splits), n * k),
            "int8_row_kernel": (q, lambda w, x: ops.matmul("bk,nk->bn", x[None], w)[0], n * k),
        }
        for label, (ws, product, nbytes) in variants.items():
            fn = jax.jit(lambda ws, x, product=product: chain(product, ws, x))
            try:
                prof = kernel_breakdown(lambda: fn(ws, x), calls=5)
                us = prof["device_us_per_call"] / LAYERS
                row = {"product": name, "variant": label, "us_per_layer": round(us, 2),
                       "of_copy": round(nbytes / (us * 1e-6) / copy, 3), "words_rel_err": err,
                       "ops": [(o["hlo_op"], round(o["us_per_call"] / LAYERS, 2)) for o in prof["ops"][:4]]}
            except Exception as e:  # noqa: BLE001 - a failing variant is a result
                row = {"product": name, "variant": label, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del wf, q, codes
    (out / "int8_words_probe.json").write_text(json.dumps({"copy_tb_s": copy / 1e12, "rows": rows}, indent=1))
    print("| product | variant | us/layer | of copy |")
    for r in rows:
        print(f"| {r['product']} | {r['variant']} | {r.get('us_per_layer', '-')} | {r.get('of_copy', r.get('error', ''))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
