"""The weight-streaming kernel (pallas_kernels/weight_matmul.py) on one GPU: block-size sweeps and the
model's decode step with and without it, every number against the copy bandwidth of the same run.

    PYTHONPATH=. python3 benchmarks/weight_kernel.py --out $OUT [--parts sweep,rows,step]

- `sweep`: batch-1 products with the layer weights of `llama-3-8b` (q, k/v, gate/up, down), each weight
  stacked `[L, K, N]` and read one layer per call as the layer scan does, over block_n x splits x warps x
  stages; next to XLA's paths on the same stacked weight: a dot on the dynamic slice (`dot-slice`), the
  multiply + reduce `ops.gemv` (`gemv`), and a dot on an unstacked weight (`dot-whole`, no slice at all).
- `rows`: the kernel's defaults at 1-128 rows against the dot on the slice.
- `step`: the library's decode step (per-step and fused loops, `jaxinfer.bench`) at batch 1-128 with
  `ops.PLAIN_KERNEL` on and off, XLA and Pallas attention.
Timing: `calls` products chained inside one jit (each output feeds the next input), median of `reps`
runs over `calls`. Results: <out>/weight_kernel.json, rewritten after each row; a table last.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxinfer import ops  # noqa: E402
from jaxinfer.bench import measure_ceilings  # noqa: E402
from pallas_kernels import weight_matmul as wm  # noqa: E402

SHAPES = {"q": (4096, 4096), "kv": (4096, 1024), "gate": (4096, 14336), "down": (14336, 4096)}
LAYERS = 8  # stacked layers per weight (enough to defeat the L2 cache: >= 64 MB per weight stack)


def chain_seconds(product, x, w, *, calls=32, reps=5) -> float:
    """Seconds per call of `product(x, w, layer) -> [M, N]`, calls chained through the output."""
    K = x.shape[1]

    @jax.jit
    def run(x, w):
        def body(i, x):
            y = product(x, w, i % LAYERS)
            y = y[:, :K] if y.shape[1] >= K else jnp.tile(y, (1, K // y.shape[1]))
            return y.astype(x.dtype)

        return jax.lax.fori_loop(0, calls, body, x)

    jax.block_until_ready(run(x, w))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x, w))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / calls


def kernel_product(**cfg):
    return lambda x, w, i: wm.weight_matmul(x, w, None, None, i, fmt="plain", group_size=None, **cfg)


XLA_PRODUCTS = {
    "dot-slice": lambda x, w, i: jnp.dot(x, w[i], preferred_element_type=jnp.float32),
    "gemv": lambda x, w, i: ops.gemv("mk,kn->mn", x, w[i]),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="sweep,rows,step")
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds; no new row starts after this")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    parts = args.parts.split(",")
    ceilings = measure_ceilings()
    copy = ceilings.copy_bytes_per_s
    report = {"device": ceilings.device, "ceilings": ceilings.as_dict(), "rows": []}
    print(f"{ceilings.device}: copy {copy / 1e12:.3f} TB/s", flush=True)

    def save():
        (out / "weight_kernel.json").write_text(json.dumps(report, indent=1, default=str))

    def add(row):
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()

    def over_budget():
        return time.time() - t_start > args.budget

    key = jax.random.key(0)
    stacks = {name: jax.random.normal(key, (LAYERS, k, n), jnp.bfloat16) for name, (k, n) in SHAPES.items()}

    def product_row(part, name, M, label, product):
        w = stacks[name]
        k, n = SHAPES[name]
        x = jax.random.normal(jax.random.key(1), (M, k), jnp.bfloat16)
        try:
            s = chain_seconds(product, x, w)
            add({"part": part, "weight": name, "rows": M, "variant": label, "us": round(s * 1e6, 2),
                 "tb_s": round(k * n * 2 / s / 1e12, 3), "of_copy": round(k * n * 2 / s / copy, 3)})
        except Exception as e:  # a configuration that does not compile must not stop the sweep
            add({"part": part, "weight": name, "rows": M, "variant": label, "error": f"{type(e).__name__}: {str(e)[:200]}"})

    if "sweep" in parts:
        for name, (k, n) in SHAPES.items():
            if over_budget():
                break
            for label, product in XLA_PRODUCTS.items():
                product_row("sweep", name, 1, label, product)
            whole = lambda x, w, i: jnp.dot(x, w[0], preferred_element_type=jnp.float32)  # noqa: E731
            product_row("sweep", name, 1, "dot-whole", whole)
            bn0, s0, _ = wm.plan(k, n, "plain", None)
            product_row("sweep", name, 1, f"kernel default bn{bn0} s{s0}", kernel_product())
            for bn, sf, warps, stages in itertools.product((64, 128, 256), (0.5, 1, 2), (4, 8), (3, 4)):
                splits = max(1, int(s0 * sf))
                if n % bn or k % splits or (bn, sf, warps, stages) == (bn0, 1, 4, 3):
                    continue
                product_row("sweep", name, 1, f"kernel bn{bn} s{splits} w{warps} st{stages}",
                            kernel_product(block_n=bn, num_splits=splits, num_warps=warps, num_stages=stages))

    if "rows" in parts:
        for name, M in itertools.product(("gate", "down"), (8, 16, 32, 64, 128)):
            if over_budget():
                break
            product_row("rows", name, M, "dot-slice", XLA_PRODUCTS["dot-slice"])
            product_row("rows", name, M, "kernel", kernel_product())
            product_row("rows", name, M, "kernel w8", kernel_product(num_warps=8))

    if "step" in parts:
        from jaxinfer.bench import BenchSpec, run_bench
        from jaxinfer.config import ModelConfig

        config = ModelConfig.from_preset(args.preset)
        for impl, kernel, batches in (("xla", False, (1, 8, 32, 64, 128)), ("xla", True, (1, 8, 32, 64, 128)),
                                      ("pallas", True, (1, 16, 64))):
            if over_budget():
                break
            jax.clear_caches()  # the switch is read when a step is traced
            ops.PLAIN_KERNEL = kernel
            ops.KERNEL_MAX_ROWS = 128
            spec = BenchSpec(config=config, name=args.preset, dtype="bfloat16", impl=impl, batches=batches,
                             contexts=(args.context,), phases=("decode", "decode_fused"), steps=16, samples=3)
            try:
                res = run_bench(spec, ceilings=ceilings, progress=False)
                for m in res.results:
                    add({"part": "step", "impl": impl, "kernel": kernel, "phase": m.phase, "batch": m.batch,
                         "ms": round(m.ms, 3), "mbu": round(m.mbu, 3)})
            except Exception as e:
                add({"part": "step", "impl": impl, "kernel": kernel, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        ops.PLAIN_KERNEL, ops.KERNEL_MAX_ROWS = True, 64

    print(f"\n{ceilings.device}, copy {copy / 1e12:.3f} TB/s")
    best = {}
    for r in report["rows"]:
        if r["part"] in ("sweep", "rows") and "us" in r:
            k = (r["weight"], r["rows"], r["variant"].split()[0])
            if k not in best or r["us"] < best[k]["us"]:
                best[k] = r
    for (w, M, v), r in sorted(best.items()):
        print(f"{w:5s} M={M:<4d} {r['variant']:34s} {r['us']:9.2f} us {r['tb_s']:6.3f} TB/s {r['of_copy']:.3f}")
    for r in report["rows"]:
        if r["part"] == "step":
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
