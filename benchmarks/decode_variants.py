"""Timed variants of one batch-1 decode step, to find where the XLA path loses bandwidth.

    PYTHONPATH=. python3 benchmarks/decode_variants.py --out $OUT

Each variant is jitted once and called per step (asynchronously, as the decode loop is), and reported
as ms/step and MBU against the copy bandwidth measured in the same process:
- `decode_step`: the library's step (for reference);
- `matmuls_scan`: only the seven weight products per layer and the head, layers run with `lax.scan` over
  the stacked weights (no attention, no cache): the weight-streaming floor of the scanned model;
- `matmuls_unrolled`: the same with a Python loop over static layer indices;
- `matmuls_split`: the same over per-layer copies of the weights (no slicing at all): XLA's GEMV floor.
The bytes for every variant are the step's weights (plus the valid KV for `decode_step`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxinfer import ops  # noqa: E402
from jaxinfer.bench import costs, measure_ceilings, time_calls  # noqa: E402
from jaxinfer.bench.runner import build_params, random_cache  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.model import rms_norm  # noqa: E402

gen = importlib.import_module("jaxinfer.generate")


def layer_matmuls(p, x, eps):
    """The seven products of one layer on x [B, 1, D]; attention replaced by q itself (N*H == D here)."""
    h = rms_norm(x, p["attn_norm"], eps)
    q = ops.matmul("btd,dnh->btnh", h, p["q"])
    k = ops.matmul("btd,dkh->btkh", h, p["k"])
    v = ops.matmul("btd,dkh->btkh", h, p["v"])
    q = q + (k.sum() + v.sum()).astype(q.dtype) * 0  # keep k and v alive
    x = x + ops.matmul("btnh,nhd->btd", q, p["o"])
    h = rms_norm(x, p["mlp_norm"], eps)
    g = ops.matmul("btd,df->btf", h, p["w_gate"])
    u = ops.matmul("btd,df->btf", h, p["w_up"])
    return x + ops.matmul("btf,fd->btd", jax.nn.silu(g) * u, p["w_down"])


def head(params, x, eps):
    return ops.matmul("btd,dv->btv", rms_norm(x, params["final_norm"], eps), params["lm_head"], out_dtype=jnp.float32)


def make_variants(config: ModelConfig):
    eps = config.norm_eps

    @jax.jit
    def matmuls_scan(params, x):
        x, _ = jax.lax.scan(lambda x, p: (layer_matmuls(p, x, eps), None), x, params["layers"])
        return x, head(params, x, eps)

    @jax.jit
    def matmuls_unrolled(params, x):
        for i in range(config.num_layers):
            x = layer_matmuls(jax.tree.map(lambda a: a[i], params["layers"]), x, eps)
        return x, head(params, x, eps)

    @jax.jit
    def matmuls_split(split, params, x):
        for p in split:
            x = layer_matmuls(p, x, eps)
        return x, head(params, x, eps)

    return matmuls_scan, matmuls_unrolled, matmuls_split


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config = ModelConfig.from_preset(args.preset)
    ceilings = measure_ceilings()
    params = build_params(config, jnp.bfloat16)
    weights = costs.streamed_weight_bytes(config, jnp.bfloat16)
    rows = []

    def record(name, timing, nbytes, note=""):
        row = {"variant": name, "ms": timing.median * 1e3, "spread": timing.spread,
               "mbu": nbytes / timing.median / ceilings.copy_bytes_per_s, "gb_s": nbytes / timing.median / 1e9,
               "note": note}
        rows.append(row)
        print(f"{name:22s} {row['ms']:8.3f} ms  MBU {row['mbu']:.3f}  {row['gb_s']:7.1f} GB/s  {note}", flush=True)

    # The library's step, per-step jit, greedy feedback, as the bench measures it.
    cache = random_cache(config, 1, args.context + args.steps, args.context, jnp.bfloat16)
    state = {"cache": cache, "tok": jnp.ones((1,), jnp.int32)}

    def step():
        logits, state["cache"] = gen.decode_step(params, state["cache"], state["tok"], config=config, impl="xla")
        state["tok"] = jnp.argmax(logits, -1).astype(jnp.int32)
        return state["tok"]

    def rewind():
        state["cache"] = state["cache"].replace(lengths=jnp.full((1,), args.context, jnp.int32))

    t = time_calls(step, calls=args.steps, samples=5, warmup=2, before_sample=rewind)
    record("decode_step", t, costs.decode_cost(config, 1, args.context + args.steps / 2, jnp.bfloat16).bytes)
    del state, cache

    scan, unrolled, split_fn = make_variants(config)
    x0 = jax.random.normal(jax.random.key(0), (1, 1, config.dim), jnp.bfloat16)
    for name, fn in (("matmuls_scan", scan), ("matmuls_unrolled", unrolled)):
        st = {"x": x0}

        def call(fn=fn, st=st):
            st["x"], logits = fn(params, st["x"])
            return logits

        record(name, time_calls(call, calls=args.steps, samples=5, warmup=2), weights)

    split = [jax.tree.map(lambda a: a[i].copy(), params["layers"]) for i in range(config.num_layers)]
    jax.block_until_ready(split)
    st = {"x": x0}

    def call_split():
        st["x"], logits = split_fn(split, params, st["x"])
        return logits

    record("matmuls_split", time_calls(call_split, calls=args.steps, samples=5, warmup=2), weights)
    result = {"device": ceilings.device, "ceilings": ceilings.as_dict(), "variants": rows}
    (out / "variants.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({"variants": {r["variant"]: round(r["mbu"], 3) for r in rows}, "device": ceilings.device,
                      "copy_tb_s": ceilings.copy_bytes_per_s / 1e12}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
