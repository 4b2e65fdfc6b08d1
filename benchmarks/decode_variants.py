"""Timed variants of one decode step, to find where the XLA path loses bandwidth (notes: BENCHMARKS.md).

    PYTHONPATH=. python3 benchmarks/decode_variants.py --out $OUT

Every variant is jitted once and called per step (asynchronously, as the decode loop is) and reported as
ms/step and MBU against the copy bandwidth measured in the same process. Variants switch the library's
private choices (monkeypatched while tracing a fresh jit):
- `step[B,weights,attention]`: the whole step, weight products as `einsum` (dot), `gemv1` (multiply +
  reduce over the weight as stored, the first version), `gemv` (2-D view + split-K, the current one);
  attention as `einsum` or `reduce` (the current one for one query), or `reduce` with the value sum as
  a dot (`reduce-pvdot`), one column reduction per query head of a group (`reduce-pvgroups`) or bf16
  products (`reduce-pvbf16`) (run S5-6 timed these with the softmax divided after the sum; they now
  replace `attention._value_sum` and get the normalised probabilities);
- `weights[...]`: the seven weight products per layer and the head alone (no attention, no cache),
  batch 1, layers run with `lax.scan` over the stacked weights; `gemv-nosplit` is `gemv` without split-K;
- `sample[B]` vs `argmax[B]`: the sampler on [B, vocab] logits with greedy settings, as traced values.
A `:contract-last` suffix runs a variant on `weight_layout.contract_last(params)` (contraction trailing:
`gemv` becomes a row reduction); `:unstacked` (weights only) on a Python list of per-layer weights.
`--weights-only gemv gemv:contract-last ...` times just those weight variants.
`--only-steps 1:einsum:reduce ...` times just those steps. `--grid` instead times the library's own per-step and fused loops (batch 1 and 128) with one-query
attention as `reduce` or `einsum` and two split-K targets. `--sweep-partials P...` instead times
`weights[gemv@P]` for each split-K target P (ops.GEMV_PARTIALS), then the whole batch-1 step,
einsum/einsum against gemv@best/reduce.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxinfer import attention as attn  # noqa: E402
from jaxinfer import ops  # noqa: E402
from jaxinfer.bench import costs, measure_ceilings, time_calls  # noqa: E402
from jaxinfer.bench.runner import build_params, random_cache  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.model import forward, rms_norm  # noqa: E402
from jaxinfer.sampling import Sampling, sample, sequence_keys  # noqa: E402
from jaxinfer.weight_layout import contract_last  # noqa: E402

gen = importlib.import_module("jaxinfer.generate")


def einsum_mm(eq, x, w, out_dtype=None):
    eq, w = ops._stored_order(eq, w)  # a contract-last weight: the equation for its stored order
    out = jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return out.astype(out_dtype or x.dtype)


def gemv_mm(eq, x, w, out_dtype=None):
    eq, w = ops._stored_order(eq, w)
    return ops.gemv(eq, x, w).astype(out_dtype or x.dtype)


def layer_products(mm, p, x, eps):
    """The seven products of one layer on x [B, 1, D]; attention replaced by q itself (N*H == D)."""
    h = rms_norm(x, p["attn_norm"], eps)
    q = mm("btd,dnh->btnh", h, p["q"])
    k = mm("btd,dkh->btkh", h, p["k"])
    v = mm("btd,dkh->btkh", h, p["v"])
    q = q + (k.sum() + v.sum()).astype(q.dtype) * 0  # keep k and v alive
    x = x + mm("btnh,nhd->btd", q, p["o"])
    h = rms_norm(x, p["mlp_norm"], eps)
    g = mm("btd,df->btf", h, p["w_gate"])
    u = mm("btd,df->btf", h, p["w_up"])
    return x + mm("btf,fd->btd", jax.nn.silu(g) * u, p["w_down"])


def weight_products(mm, config, unstacked=False):
    """The layers' products with `lax.scan` over the stacked weights, or (`unstacked`) over a Python list
    of per-layer weights `params["layer_list"]` (no slicing of a stacked array at all), then the head."""
    eps = config.norm_eps

    @jax.jit
    def run(params, x):
        if unstacked:
            for p in params["layer_list"]:
                x = layer_products(mm, p, x, eps)
        else:
            x, _ = jax.lax.scan(lambda x, p: (layer_products(mm, p, x, eps), None), x, params["layers"])
        logits = mm("btd,dv->btv", rms_norm(x, params["final_norm"], eps), params["lm_head"], jnp.float32)
        return x, logits

    return run


# Ways to form the value sum of one-query attention, in place of `attention._value_sum(probs, v)`
# (`--only-steps 1:gemv:reduce-pvdot`, ...).
PV_VARIANTS = {
    "reduce-pvdot": lambda p, v: jnp.einsum("bskg,bskh->bkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32),
    "reduce-pvgroups": lambda p, v: jnp.stack(
        [jnp.sum(p[..., g, None] * v.astype(jnp.float32), axis=1) for g in range(p.shape[-1])], axis=2),
    "reduce-pvbf16": lambda p, v: jnp.sum((p.astype(v.dtype)[..., None] * v[:, :, :, None, :]).astype(jnp.float32), axis=1),
}


@contextlib.contextmanager
def choices(weights: str, attention: str = "reduce", partials: int | None = None):
    """Force the weight-product and one-query attention paths while a fresh jit traces. `weights`:
    `kernel` (the Pallas weight kernel, the default on a GPU), `einsum`, `gemv1`, `gemv-nosplit`, `gemv`."""
    saved = ops.gemv, ops.GEMV_PARTIALS, ops.PLAIN_KERNEL, attn._one_query, attn._value_sum
    ops.PLAIN_KERNEL = weights == "kernel"
    if partials is not None:
        ops.GEMV_PARTIALS = partials
    if weights == "einsum":
        ops.gemv = lambda eq, x, w: jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    elif weights == "gemv1":
        ops.gemv = ops._gemv_general
    elif weights == "gemv-nosplit":
        ops.GEMV_PARTIALS = 0
    if attention == "einsum":
        attn._one_query = lambda B, T: False
    elif attention == "reduce":
        attn._one_query = lambda B, T: T == 1
    elif attention in PV_VARIANTS:
        attn._one_query = lambda B, T: T == 1
        attn._value_sum = PV_VARIANTS[attention]
    try:
        yield
    finally:
        ops.gemv, ops.GEMV_PARTIALS, ops.PLAIN_KERNEL, attn._one_query, attn._value_sum = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--sweep-partials", type=int, nargs="*", default=[],
                    help="only sweep ops.GEMV_PARTIALS on the weight products, then time the step at the best")
    ap.add_argument("--grid", action="store_true",
                    help="only time the library's per-step and fused decode under attention x split-K choices")
    ap.add_argument("--loops", nargs="*", default=None, metavar="B:ATTENTION[:contract-last]",
                    help="only time the library's per-step and fused loops with XLA weight products, e.g. 1:einsum:contract-last")
    ap.add_argument("--hlo", action="store_true", help="--only-steps: also write each step's compiled HLO")
    ap.add_argument("--weights-only", nargs="*", default=None, metavar="MODE[:contract-last][:unstacked]",
                    help="only time the weight products alone, e.g. gemv gemv:contract-last einsum:unstacked")
    ap.add_argument("--only-steps", nargs="*", default=None, metavar="B:WEIGHTS:ATTENTION[:contract-last]",
                    help="only time these whole steps, e.g. 1:einsum:reduce 1:gemv:reduce 1:gemv:reduce:contract-last")
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
        print(f"{name:34s} {row['ms']:8.3f} ms  MBU {row['mbu']:.3f}  {row['gb_s']:7.1f} GB/s  "
              f"spread {row['spread']:.3f} {note}", flush=True)
        save_rows()

    def save_rows():
        (out / "variants.json").write_text(json.dumps({"device": ceilings.device, "ceilings": ceilings.as_dict(),
                                                       "variants": rows}, indent=1, default=str))

    def time_loops(spec, label, a_mode, partials=None):
        """The library's own jitted loops (per-step and fused) of `spec` under the forced choices; caches
        cleared first so every program is traced again with the patched functions."""
        from jaxinfer.bench import run_bench

        jax.clear_caches()
        with choices("gemv", a_mode, partials):
            report = run_bench(spec, ceilings=ceilings, progress=False)
        for m in report.results:
            rows.append({"variant": f"{m.phase}[B{m.batch},{label}]", "ms": m.ms, "mbu": m.mbu,
                         "spread": m.timing.spread})
            print(f"{rows[-1]['variant']:48s} {m.ms:8.3f} ms  MBU {m.mbu:.3f}", flush=True)
        save_rows()

    def time_step(batch, w_mode, a_mode, partials=None, layout="stored"):
        step_fn = jax.jit(functools.partial(forward, config=config, impl="xla"), donate_argnums=1)
        p = with_layout(layout)
        state = {"cache": random_cache(config, batch, args.context + args.steps, args.context, jnp.bfloat16),
                 "tok": jnp.ones((batch,), jnp.int32)}

        def step():
            logits, state["cache"] = step_fn(p, state["cache"], state["tok"][:, None])
            state["tok"] = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
            return state["tok"]

        def rewind():
            state["cache"] = state["cache"].replace(lengths=jnp.full((batch,), args.context, jnp.int32))

        with choices(w_mode, a_mode, partials):
            jax.block_until_ready(step())  # trace and compile under the forced choices
            if args.hlo:  # the compiled program, to name the fusions a profile lists
                text = step_fn.lower(p, state["cache"], state["tok"][:, None]).compile().as_text()
                (out / f"hlo_B{batch}_{w_mode}_{a_mode}_{layout}.txt").write_text(text)
        t = time_calls(step, calls=args.steps, samples=5, warmup=1, before_sample=rewind)
        cost = costs.decode_cost(config, batch, args.context + args.steps / 2, jnp.bfloat16)
        tag = (f"@{partials}" if partials else "") + ("" if layout == "stored" else f",{layout}")
        record(f"step[B{batch},{w_mode}{tag},{a_mode}]", t, cost.bytes)

    def with_layout(layout):
        if layout not in layouts:
            layouts[layout] = params if layout == "stored" else jax.block_until_ready(contract_last(params))
        return layouts[layout]

    def time_weights(mode, partials=None, layout="stored", unstacked=False):
        fn = weight_products(einsum_mm if mode == "einsum" else gemv_mm, config, unstacked)
        p = with_layout(layout)
        if unstacked:
            p = {**p, "layer_list": [jax.tree.map(lambda a: a[i], p["layers"]) for i in range(config.num_layers)]}
        st = {"x": jax.random.normal(jax.random.key(0), (1, 1, config.dim), jnp.bfloat16)}

        def call():
            st["x"], logits = fn(p, st["x"])
            return logits

        with choices(mode, partials=partials):
            jax.block_until_ready(call())
        tags = ("@" + str(partials) if partials else "") + ("" if layout == "stored" else f":{layout}") + (
            ":unstacked" if unstacked else "")
        record(f"weights[{mode}{tags}]", time_calls(call, calls=args.steps, samples=5, warmup=1), weights)
        return rows[-1]["ms"]

    layouts = {}
    if args.weights_only is not None:
        for item in args.weights_only:
            mode, *opts = item.split(":")
            time_weights(mode, layout="contract-last" if "contract-last" in opts else "stored",
                         unstacked="unstacked" in opts)
        return 0

    if args.grid or args.loops is not None:  # the library's loops with XLA weight products
        from jaxinfer.bench import BenchSpec

        loop_spec = functools.partial(BenchSpec, config=config, name=args.preset, contexts=(args.context,),
                                      phases=("decode", "decode_fused"), steps=args.steps, samples=3)
        if args.grid:  # attention x split-K choices
            grid = (("reduce", 1 << 17, (1, 128)), ("einsum", 1 << 17, (1, 128)), ("reduce", 1 << 14, (1,)))
            for a_mode, partials, batches in grid:
                time_loops(loop_spec(batches=batches), f"attn={a_mode},P={partials}", a_mode, partials)
        for item in args.loops or ():
            batch, a_mode, *layout = item.split(":")
            layout = layout[0] if layout else "stored"
            time_loops(loop_spec(batches=(int(batch),), weight_layout=layout), f"attn={a_mode},{layout}", a_mode)
        return 0

    if args.only_steps is not None:
        for item in args.only_steps:
            batch, w_mode, a_mode, *layout = item.split(":")
            time_step(int(batch), w_mode, a_mode, layout=layout[0] if layout else "stored")
        return 0

    if args.sweep_partials:
        time_weights("einsum")
        best = min(args.sweep_partials, key=lambda p: time_weights("gemv", p))
        print(json.dumps({"best_gemv_partials": best}))
        time_step(1, "einsum", "einsum")
        time_step(1, "gemv", "reduce", best)
        return 0

    for batch, w_mode, a_mode in ((1, "einsum", "einsum"), (1, "gemv1", "einsum"), (1, "gemv", "einsum"),
                                  (1, "gemv", "reduce"), (128, "einsum", "einsum"), (128, "einsum", "reduce")):
        time_step(batch, w_mode, a_mode)
    for mode in ("einsum", "gemv1", "gemv-nosplit", "gemv"):
        time_weights(mode)

    for batch in (1, 128):
        logits = jax.random.normal(jax.random.key(1), (batch, config.vocab_size), jnp.float32)
        keys, greedy = sequence_keys(0, batch), Sampling().for_batch(batch)
        for name, fn in (("sample", jax.jit(sample)), ("argmax", jax.jit(lambda lg, k, s: jnp.argmax(lg, -1)))):
            t = time_calls(lambda fn=fn: fn(logits, keys, greedy), calls=20, samples=5, warmup=2)
            record(f"{name}[B={batch}]", t, logits.nbytes, "bytes = the logits")

    print(json.dumps({"variants": {r["variant"]: round(r["ms"], 4) for r in rows}, "device": ceilings.device,
                      "copy_tb_s": ceilings.copy_bytes_per_s / 1e12}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
