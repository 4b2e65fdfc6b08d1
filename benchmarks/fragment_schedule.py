"""Probe: the fragment kernel's work schedule. K split over CTAs by a power of two (session 24's kernel, a copy in
`fragment_splits_old.py` for this run only) against the stream-K schedule (`plan_work`: every resident CTA the same
number of (block, step) items), over ring stages, CTAs an SM and items a CTA.

    PYTHONPATH=. python3 benchmarks/fragment_schedule.py --out $OUT/sched [--rows 16] [--variants 3,4,4 ...]

First checks the stream-K kernel against a float64 product where the items do not line up with the blocks; then
times each layer product of `llama-3-8b` (int4, groups of 128, offsets; 8 stacked layers) chained 32 deep
(`weight_kernel.chain_seconds`: the profiler's device time a product). A table last."""
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

from benchmarks import fragment_splits_old as old  # noqa: E402
from benchmarks.weight_kernel import LAYERS, chain_seconds  # noqa: E402
from jaxinfer.bench import measure_ceilings  # noqa: E402
from pallas_kernels import fragment_matmul as fm  # noqa: E402

PRODUCTS = {"gateup": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144), "o": (4096, 4096)}
GROUP = 128


def weights(k, n, key=1):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    g = k // GROUP
    values = jax.random.randint(k1, (LAYERS, n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = (0.01 * jax.random.uniform(k2, (LAYERS, n, g), jnp.float32, 0.5, 1.5)).astype(jnp.bfloat16)
    offsets = (-0.08 * jax.random.uniform(k3, (LAYERS, n, g), jnp.float32, 0.5, 1.5)).astype(jnp.bfloat16)
    return values, scales, offsets


def configured(stages, per_sm, min_items, contiguous=False):
    """fragment_matmul traced with these module settings (the un-jitted function, so every chain traces anew)."""
    def product(x, w, i):
        saved = fm.STAGES, fm.MAX_CTAS_PER_SM, fm.MIN_ITEMS, fm.CONTIGUOUS_BLOCKS
        fm.STAGES, fm.MAX_CTAS_PER_SM, fm.MIN_ITEMS, fm.CONTIGUOUS_BLOCKS = stages, per_sm, min_items, contiguous
        try:
            return fm.fragment_matmul.__wrapped__(x, *w, i, group_size=GROUP, out_dtype=jnp.float32)
        finally:
            fm.STAGES, fm.MAX_CTAS_PER_SM, fm.MIN_ITEMS, fm.CONTIGUOUS_BLOCKS = saved
    return product


def check(log):
    """Stream-K against float64 on the layer of a stack, at CTA counts whose items cut blocks mid-way."""
    from jaxinfer.quant.qarray import dequantize, quantize_array, to_fragment_order, to_row_order

    L, N, K = 3, 384, 2048
    w = jax.random.normal(jax.random.key(3), (L, N, K), jnp.float32)
    q = to_fragment_order(quantize_array(w, "int4", (-1,), GROUP, zero_point=True))
    want_w = np.asarray(dequantize(to_row_order(q), jnp.float32), np.float64)[2]
    saved = fm.resident_ctas
    for rows in (1, 16, 40):
        x = jax.random.normal(jax.random.key(rows), (rows, K), jnp.float32).astype(jnp.bfloat16)
        want = np.asarray(x, np.float64) @ want_w.T
        for ctas in (5, 7, 13, 48):
            fm.resident_ctas = lambda *a, c=ctas, **k: c
            try:
                got = jax.jit(lambda x: fm.fragment_matmul.__wrapped__(
                    x, q.values, q.scales, q.offsets, jnp.int32(2), group_size=GROUP, out_dtype=jnp.float32))(x)
            finally:
                fm.resident_ctas = saved
            err = float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))
            plan = fm.plan_work(K, N, ctas)
            log.append({"rows": rows, "ctas": ctas, "items": plan.items, "slots": len(plan.used), "err": err})
            print(f"check rows {rows} ctas {ctas} items {plan.items} slots {len(plan.used)}: err {err:.2e}",
                  flush=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[16])
    p.add_argument("--products", nargs="+", default=list(PRODUCTS))
    p.add_argument("--variants", nargs="+", default=["3,3,4", "3,4,4", "2,4,4", "4,2,4", "3,3,2"],
                   help="stages,ctas_per_sm,min_items[,contiguous] of the stream-K kernel (contiguous 1: each block's codes "
                        "contiguous, timing only)")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--calls", type=int, default=32)
    p.add_argument("--no-baseline", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "checks": [], "rows": []}
    if not args.skip_check:
        check(log["checks"])
    copy = measure_ceilings().copy_bytes_per_s
    log["copy_tb_s"] = copy / 1e12
    print(f"copy {copy / 1e12:.3f} TB/s, SMs {fm._sm_count()}", flush=True)
    for name in args.products:
        k, n = PRODUCTS[name]
        w = weights(k, n)
        nbytes = (w[0].nbytes + w[1].nbytes + w[2].nbytes) / LAYERS
        for m in args.rows:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            cases = {} if args.no_baseline else {"splits (s24)": lambda x, w, i: old.fragment_matmul.__wrapped__(
                x, *w, i, group_size=GROUP, out_dtype=jnp.float32)}
            for v in args.variants:
                st, cps, mi, *cont = (int(t) for t in v.split(","))
                contiguous = bool(cont and cont[0])
                cases[f"stream st{st} cps{cps} min{mi}" + (" contig" if contiguous else "")] = configured(
                    st, cps, mi, contiguous)
            for label, product in cases.items():
                try:
                    ops = []
                    wall, dev = chain_seconds(product, x, w, calls=args.calls, ops=ops)
                    row = {"product": name, "rows": m, "case": label, "us": dev * 1e6, "wall_us": wall * 1e6,
                           "of_copy": nbytes / dev / copy,
                           "ops": sorted(ops, key=lambda o: -o.get("us", 0))[:4]}
                except Exception as e:  # noqa: BLE001
                    row = {"product": name, "rows": m, "case": label, "error": repr(e)[:400]}
                log["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "ops"}), flush=True)
                (out / "schedule.json").write_text(json.dumps(log, indent=1))
    print("\nproduct rows case                          us    of copy")
    for r in log["rows"]:
        if "us" in r:
            print(f"{r['product']:7s} {r['rows']:4d} {r['case']:28s} {r['us']:7.2f} {r['of_copy']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
