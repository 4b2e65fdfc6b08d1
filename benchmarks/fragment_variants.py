"""`fragment_matmul`'s variants on `llama-3-8b`'s four batched int4 products, timed with their XLA glue.

    PYTHONPATH=. python3 benchmarks/fragment_variants.py --out $OUT [--rows 16] [--no-offsets]

Each product (q/k/v and gate/up packed as the library packs them, o, down; int4 groups of 128, offsets) is
a stack of `LAYERS` layers read one layer a call. Variants: x's group sums for the offsets made by XLA
(`input`) or by the kernel's tensor cores (`wgmma`); the K splits' partials summed by XLA (`xla`) or added
into a zeroed output by TMA (`tma`). Each variant is first checked against the `input`/`xla` output of the
same inputs, then timed: `us` is the profiler's device time a product (every kernel the product launches,
memsets and glue included), `kernel_us` the kernel's alone. Results: <out>/fragment_variants.json; a table last.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.weight_kernel import LAYERS, chain_seconds  # noqa: E402
from pallas_kernels import fragment_matmul as fm  # noqa: E402

PRODUCTS = {"qkv": (4096, 6144), "o": (4096, 4096), "gateup": (4096, 28672), "down": (14336, 4096)}  # (K, N)
GROUP = 128


def stack(key, k, n, offsets):
    kv, ks, km = jax.random.split(key, 3)
    values = jax.random.randint(kv, (LAYERS, n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = (jax.random.uniform(ks, (LAYERS, n, k // GROUP), jnp.float32, 0.5, 1.5) / 64).astype(jnp.float16)
    mins = (-8 * scales.astype(jnp.float32) + jax.random.normal(km, scales.shape) / 256).astype(jnp.float16)
    return values, scales, (mins if offsets else None)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[16])
    p.add_argument("--products", nargs="+", default=list(PRODUCTS), choices=list(PRODUCTS))
    p.add_argument("--no-offsets", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = list(itertools.product(("input", "wgmma"), ("xla", "tma")))
    rows = []
    for name, m in itertools.product(args.products, args.rows):
        k, n = PRODUCTS[name]
        w = stack(jax.random.key(0), k, n, not args.no_offsets)
        x = (jax.random.normal(jax.random.key(1), (m, k), jnp.float32)).astype(jnp.bfloat16)
        ref = None
        for sums_from, combine in variants:
            def product(x, w, i, sums_from=sums_from, combine=combine):
                return fm.fragment_matmul(x, *w, i, group_size=GROUP, out_dtype=jnp.float32,
                                          sums_from=sums_from, combine=combine)
            y = jax.jit(product)(x, w, 3)
            ref = y if ref is None else ref
            err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
            ops = []
            wall, dev = chain_seconds(product, x, w, calls=32, reps=3, ops=ops)
            kernel_us = sum(o["us_per_call"] for o in ops
                            if any("fragment" in k or "mosaic" in k for k in o["kernels"])) / 32
            row = dict(product=name, rows=m, sums_from=sums_from, combine=combine, splits=fm.plan_splits(k, n),
                       us=dev * 1e6 if dev else None, kernel_us=kernel_us, wall_us=wall * 1e6, rel_err=err,
                       ops=[(o["hlo_op"], o["launches_per_call"] / 32, o["us_per_call"] / 32) for o in ops])
            rows.append(row)
            print(json.dumps({k2: v for k2, v in row.items() if k2 != "ops"}), flush=True)
            (out / "fragment_variants.json").write_text(json.dumps(rows, indent=1))
    print("\n| product | rows | splits | sums | combine | us | kernel us | rel err |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['product']} | {r['rows']} | {r['splits']} | {r['sums_from']} | {r['combine']} | "
              f"{r['us'] or float('nan'):.1f} | {r['kernel_us']:.1f} | {r['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
