"""Can the SwiGLU multiply ride in the gate/up reduction? A probe for batch-1 decode with contraction-last
weights, where XLA fuses the gate and up row reductions into one kernel and multiplies silu(g) * u in a
second (1.7 us a layer on an H200, S12-5).

    PYTHONPATH=. python3 benchmarks/swiglu_reduce.py --out $OUT

For `llama-3-8b`'s gate/up (two [14336, 4096] bf16 weights, a stack of 8 layers so that no call finds its
weight in L2), the profiler's device time per layer and the kernels launched per layer of: `split`, the
library's path (two reductions, then the multiply); `variadic`, one `lax.reduce` over both products at once
(a variadic reduction whose two outputs share an index, so the multiply is an elementwise epilogue XLA may
fuse).
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
from jax import lax  # noqa: E402

from jaxinfer import ops  # noqa: E402
from jaxinfer.bench import measure_ceilings  # noqa: E402
from jaxinfer.bench.profile import kernel_breakdown  # noqa: E402

LAYERS, F, D = 8, 14336, 4096


def split(x, wg, wu):
    g, u = ops.gemv("k,nk->n", x, wg), ops.gemv("k,nk->n", x, wu)
    return (jax.nn.silu(g) * u).astype(x.dtype)


def variadic(x, wg, wu):
    xf = x.astype(jnp.float32)
    g, u = lax.reduce((wg.astype(jnp.float32) * xf, wu.astype(jnp.float32) * xf), (0.0, 0.0),
                      lambda a, b: (a[0] + b[0], a[1] + b[1]), (1,))
    return (jax.nn.silu(g) * u).astype(x.dtype)


def chain(form, wg, wu, x):
    def body(x, w):
        h = form(x, *w)
        return x + (h[0] * 0).astype(x.dtype), h[:1]

    return jax.lax.scan(body, x, (wg, wu), unroll=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    copy = measure_ceilings().copy_bytes_per_s
    wg = jax.random.normal(jax.random.key(0), (LAYERS, F, D), jnp.bfloat16)
    wu = jax.random.normal(jax.random.key(1), (LAYERS, F, D), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (D,), jnp.bfloat16) / 64
    rows, results = [], {}
    for name, form in (("split", split), ("variadic", variadic), ("split", split), ("variadic", variadic)):
        fn = jax.jit(lambda wg, wu, x, form=form: chain(form, wg, wu, x))
        results[name] = fn(wg, wu, x)[1]
        prof = kernel_breakdown(lambda: fn(wg, wu, x), calls=5)
        launches = sum(op["launches_per_call"] for op in prof["ops"]) / LAYERS
        row = {"form": name, "device_us_per_layer": prof["device_us_per_call"] / LAYERS,
               "launches_per_layer": launches, "us_at_copy": 2 * F * D * 2 / copy * 1e6,
               "top": [(op["hlo_op"], round(op["us_per_call"] / LAYERS, 2)) for op in prof["ops"][:4]]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    diff = float(jnp.max(jnp.abs(results["split"].astype(jnp.float32) - results["variadic"].astype(jnp.float32))))
    print(f"max |split - variadic| over the layers' first outputs: {diff:.3g}")
    (out / "swiglu_reduce.json").write_text(json.dumps({"copy_tb_s": copy / 1e12, "rows": rows, "max_diff": diff},
                                                       indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
