"""Does a weight read from L2 make a decode product faster? A probe for overlapping the latency-bound
kernels of a decode step (attention, norms, all-reduces) with a prefetch of the next product's weight.

    PYTHONPATH=. python3 benchmarks/l2_prefetch.py --out $OUT

For each `llama-3-8b` batch-1 product (contraction-last bf16 rows, XLA's row reduction `ops.gemv`; a stack
of 8 layers so that calls do not find the previous layer's weight in L2) the profiler's device time per
layer of the product alone, and of the product right after a kernel that read its first `fraction` of rows
(a plain sum of those rows, chained into x so that it runs first): touch and product together. If the product gets faster by about the prefetched
bytes / copy bandwidth, a prefetch that runs beside a latency-bound kernel would save that much.
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

from jaxinfer import ops  # noqa: E402
from jaxinfer.bench import measure_ceilings  # noqa: E402
from jaxinfer.bench.profile import kernel_breakdown  # noqa: E402

LAYERS = 8
PRODUCTS = {"o": (4096, 4096), "qkv": (6144, 4096), "down": (4096, 14336), "gateup": (28672, 4096)}


def chain(w, x, fraction: float):
    """Every layer's product in turn, each after a touch of its first `fraction` of rows when > 0."""
    n = w.shape[1]
    rows = int(n * fraction)

    def body(x, wi):
        if rows:
            touched = jnp.sum(wi[:rows].astype(jnp.float32), axis=1)  # a row reduction over the prefix
            x = x + (touched[:1] * 0).astype(x.dtype)[0]
        y = ops.gemv("k,nk->n", x, wi)
        return x + (y[0] * 0).astype(x.dtype), None

    out, _ = jax.lax.scan(body, x, w, unroll=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fractions", default="0,0.1,0.25,0.5,1.0")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    copy = measure_ceilings().copy_bytes_per_s
    rows = []
    for name, (n, k) in PRODUCTS.items():
        w = jax.random.normal(jax.random.key(0), (LAYERS, n, k), jnp.bfloat16)
        x = jax.random.normal(jax.random.key(1), (k,), jnp.bfloat16)
        for f in (float(v) for v in args.fractions.split(",")):
            fn = jax.jit(lambda w, x, f=f: chain(w, x, f))
            prof = kernel_breakdown(lambda: fn(w, x), calls=5)  # touch + product per layer, device time
            row = {"product": name, "bytes": n * k * 2, "fraction": f,
                   "device_us_per_layer": prof["device_us_per_call"] / LAYERS, "cold_us_at_copy": n * k * 2 / copy * 1e6}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del w
    (out / "l2_prefetch.json").write_text(json.dumps({"copy_tb_s": copy / 1e12, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
