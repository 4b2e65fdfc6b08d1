"""Probe: how much faster are the fragment kernel's products when their int4 codes are already in L2?

Question (session 30): at batch 16 the fragment kernel reads `llama-3-8b`'s small products well under the copy
bandwidth (q/k/v and o ~0.5 against gate+up's 0.74), and between products the glue launches (split sums, add +
norm, x's digits; ~4-5 us each time) leave the memory idle: would asking the next product's codes into L2 during
that time pay? Each pair of products (first -> second, as the layer runs them) is chained through its outputs over
the 8 stacked layers, with glue between them like the model's (an XLA cast, the add + norm launch, x's digits);
`hot` reads layer 0 every time, so codes that fit stay in L2: the most a prefetch could give. (S30-1 also timed
the prefetch itself, each CTA asking its share of the next product's codes into L2 by TMA after its pipeline:
slower; that kernel change was not kept. Findings: benchmarks/BENCHMARKS.md, session 30.)

    PYTHONPATH=. python benchmarks/l2_probe.py --out DIR [--rows 16] [--pairs qkv-o o-gateup]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer.bench.profile import kernel_breakdown  # noqa: E402
from pallas_kernels import fragment_matmul as fm  # noqa: E402
from pallas_kernels.add_rms_norm import add_rms_norm  # noqa: E402

SHAPES = {"gateup": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144), "o": (4096, 4096)}  # (K, N)
PAIRS = ("qkv-o", "o-gateup")  # (down's K = 14336 is no width of the add + norm kernel: a power of two)
LAYERS, GROUP, CALLS = 8, 128, 16
VARIANTS = ("cold", "hot")


def _weights(k, n, key):
    k1, k2 = jax.random.split(jax.random.key(key))
    values = jax.random.randint(k1, (LAYERS, n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = (0.002 + 0.002 * jax.random.uniform(k2, (LAYERS, n, k // GROUP))).astype(jnp.bfloat16)
    return values, scales, (-8 * scales).astype(jnp.bfloat16)


def _glue(y, k, norm):
    """y [M, N] float -> the next product's x [M, k] bf16, through the add + norm launch (as the model's)."""
    x = jnp.tile(y, (1, -(-k // y.shape[1])))[:, :k].astype(jnp.bfloat16)
    return add_rms_norm(x, x, norm[:k], eps=1e-5)[1]


def chain(first, second, rows, variant):
    (k1, n1), (k2, n2) = SHAPES[first], SHAPES[second]
    w1, w2 = _weights(k1, n1, 1), _weights(k2, n2, 2)
    norm = jnp.ones((max(k1, k2),), jnp.bfloat16)

    @jax.jit
    def run(x, w1, w2):
        for c in range(CALLS):
            layer = jnp.int32(0 if variant == "hot" else c % LAYERS)
            x2 = _glue(fm.fragment_matmul(x, *w1, layer, group_size=GROUP), k2, norm)
            x = _glue(fm.fragment_matmul(x2, *w2, layer, group_size=GROUP), k1, norm)
        return x

    x = jax.random.normal(jax.random.key(3), (rows, k1), jnp.bfloat16)
    out = jax.block_until_ready(run(x, w1, w2))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x, w1, w2))
        times.append(time.perf_counter() - t0)
    b = kernel_breakdown(lambda: run(x, w1, w2), calls=2)
    ops = b.get("ops", [])
    kern = sum(o["us_per_call"] for o in ops if any(k.startswith("fragment") for k in o["kernels"]))
    return dict(pair=f"{first}-{second}", variant=variant, rows=rows, wall_us=statistics.median(times) / CALLS * 1e6,
                device_us=(b.get("device_us_per_call") or 0) / CALLS, kernel_us=kern / CALLS,
                finite=bool(np.isfinite(np.asarray(out, np.float32)).all()), ops=ops)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[16])
    p.add_argument("--pairs", nargs="+", default=list(PAIRS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
    for pair in args.pairs:
        first, second = pair.split("-")
        for rows in args.rows:
            for variant in args.variants:
                try:
                    r = chain(first, second, rows, variant)
                except Exception as e:  # noqa: BLE001 (recorded, the others go on)
                    print(f"{pair} rows {rows} {variant}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                log["rows"].append(r)
                print(f"{pair:12s} rows {rows:3d} {variant:14s} wall {r['wall_us']:6.1f} us  device "
                      f"{r['device_us']:6.1f}  fragment kernels {r['kernel_us']:6.1f}", flush=True)
                (out / "l2_probe.json").write_text(json.dumps(log, indent=1, default=str))
    print("\n| pair | rows | variant | wall us | device us | kernels us |\n| --- | ---: | --- | ---: | ---: | ---: |")
    for r in log["rows"]:
        print(f"| {r['pair']} | {r['rows']} | {r['variant']} | {r['wall_us']:.1f} | {r['device_us']:.1f} | "
              f"{r['kernel_us']:.1f} |")
    return 0 if all(r["finite"] for r in log["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
