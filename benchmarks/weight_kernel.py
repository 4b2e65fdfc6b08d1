"""The weight-streaming kernel (pallas_kernels/weight_matmul.py) on one GPU: block-size sweeps and the
model's decode step with and without it, every number against the copy bandwidth of the same run.

    PYTHONPATH=. python3 benchmarks/weight_kernel.py --out $OUT [--parts sweep,rows,step]

- `sweep`: batch-1 products with the layer weights of `llama-3-8b` (q, k/v, gate/up, down), each weight
  stacked `[L, K, N]` and read one layer per call as the layer scan does, over block_n x splits x warps x
  stages; next to XLA's paths on the same stacked weight: a dot on the dynamic slice (`dot-slice`), the
  multiply + reduce `ops.gemv` (`gemv`), and a dot on an unstacked weight (`dot-whole`, no slice at all).
- `rows`: the same sweep at 8-64 rows against the dot on the slice. `qkv` and `gateup` are a layer's
  products sharing one input in one launch (`weight_matmuls`).
- `maxrows`: the decode step at batch 96 and 128 with `ops.KERNEL_MAX_ROWS` 64 (dot on the copied slice) and 128.
- `kvq`: the decode step (`auto`) at batch 16 and 64, context 4096, over a bf16, int8 and fp8 KV cache.
- `splits`: the decode step (`auto`) at batch 1-32, context 1k and 4k, with the decode attention's
  minimum split length (`pallas_kernels.common.MIN_BLOCKS_PER_SPLIT`) 4 and 1.
- `codes`: gate+up and down in int8 / int4 (g128, offsets) / fp8 at one row: the dot (`wm.ONE_ROW_FMA` off)
  against multiply-adds on the CUDA cores, default blocks and a few step / warp choices.
- `unroll`: the decode step (`auto`, the default layout, batch 1 and 8, context 1k) with 4, 8, 16 and all 32
  layers per iteration of the layer scan (`model.LAYER_UNROLL`), 4 again last.
- `row`: the fused one-row kernel (`pallas_kernels/row_matmul.py`) on contraction-last `[L, N, K]` stacks:
  q/k/v (+ the norm), gate/up with SwiGLU (+ the norm), o and down with the residual add, each against
  XLA's row reductions (`ops.gemv`) doing the same work unfused; block sweeps; then the decode step at
  batch 1 with contraction-last weights, `ops.ROW_KERNEL` on and off, and the stored layout.
- `rowq`: the same kernel on quantized gate+up and down stacks (int8, int4-g128 with offsets, fp8), swept.
- `ptx`: the row kernel's variants (`ROW_VARIANTS`: int8 / int4 codes decoded by inline PTX or by jnp,
  `pallas_kernels/code_decode.py`; the head on XLA; rows per program; unrolled loops; bf16 on the kernel)
  on its quantized products, then in the batch-1 decode step in bf16 / int8 / int4 / fp8; `--tag` labels
  the rows (to compare two copies of the code in one run), `--ptx-variants`, `--rowq-names`,
  `--rowq-sweep`, `--ptx-quants`, `--ptx-profile`, `--no-steps` choose what runs.
- `xlarows`: XLA's row reductions of one row on contraction-last bf16 stacks: q/k/v as three matrices or
  one, o and down with each row split into chunks, gate/up for reference; then the batch-1 decode step
  with long rows split or not and the residual adds + norms in one launch (`ops.ADD_NORM_KERNEL`) or
  not, with full profiles.
- `step`: the library's decode step (per-step and fused loops, `jaxinfer.bench`) at batch 1-128 with
  `ops.PLAIN_KERNEL` on and off, XLA and Pallas attention.
Timing: `calls` products chained inside one jit (each output feeds the next input); `us` is the profiler's
device time per product (kernels only, the chaining slice included), `wall_us` the median wall time. Results: <out>/weight_kernel.json, rewritten after each row; a table last.
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
from jaxinfer.bench import measure_ceilings, switched, switched_modules  # noqa: E402
from jaxinfer.bench.profile import kernel_breakdown  # noqa: E402
from jaxinfer.weight_layout import DEFAULT_LAYOUT  # noqa: E402
from pallas_kernels import weight_matmul as wm  # noqa: E402

SHAPES = {"q": (4096, 4096), "kv": (4096, 1024), "gate": (4096, 14336), "down": (14336, 4096)}
FUSED = {"qkv": ("q", "kv", "kv"), "gateup": ("gate", "gate")}  # products sharing x, one launch
LAYERS = 8  # stacked layers per weight (enough to defeat the L2 cache: >= 64 MB per weight stack)


def chain_seconds(product, x, w, *, calls=32, reps=5, ops: list | None = None) -> tuple[float, float | None]:
    """(wall, device) seconds per call of `product(x, w, layer) -> [M, N]`, `calls` chained through the
    output in one jit (a Python loop: no device loop between calls). Wall: median of `reps` runs over
    calls; device: the profiler's kernel time per call (the product's kernels plus the small chaining
    slice), free of launch gaps. `ops`, when given, receives the profiler's per-op rows (us per chain)."""
    K = x.shape[1]

    @jax.jit
    def run(x, w):
        for c in range(calls):
            y = product(x, w, c % LAYERS)
            x = jnp.tile(y, (1, -(-K // y.shape[1])))[:, :K].astype(x.dtype)
        return x

    jax.block_until_ready(run(x, w))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x, w))
        times.append(time.perf_counter() - t0)
    breakdown = kernel_breakdown(lambda: run(x, w), calls=2)
    if ops is not None:
        ops.extend(breakdown.get("ops", []))
    device = breakdown.get("device_us_per_call")
    return statistics.median(times) / calls, (device * 1e-6 / calls if device else None)


def first_kept(outs):
    """The first of several product outputs (it feeds the chain), the others kept alive by a one-element
    add so that XLA does not drop them."""
    y = outs[0]
    for o in outs[1:]:
        y = y.at[:, :1].add(o[:, :1])
    return y


def kernel_product(**cfg):
    return lambda x, w, i: wm.weight_matmul(x, w, None, None, i, fmt="plain", group_size=None, **cfg)


def fused_product(parts, **cfg):
    """The products of `parts` (names in SHAPES, stacked weights passed as a tuple) in one launch; the
    first output feeds the chain."""
    return lambda x, ws, i: wm.weight_matmuls(x, tuple((w, None, None) for w in ws), i, fmt="plain",
                                              group_size=None, **cfg)[0]


XLA_PRODUCTS = {
    "dot-slice": lambda x, w, i: jnp.dot(x, jax.lax.dynamic_index_in_dim(w, jnp.int32(i), 0, False),
                                         preferred_element_type=jnp.float32),
    "gemv": lambda x, w, i: ops.gemv("mk,kn->mn", x, jax.lax.dynamic_index_in_dim(w, jnp.int32(i), 0, False)),
}


ROW_GROUPS = {  # name: (K, widths, epilogue, norm); the weights of one layer, stored [N, K]
    "qkv": (4096, (4096, 1024, 1024), "none", True),
    "gateup": (4096, (14336, 14336), "swiglu", True),
    "o": (4096, (4096,), "residual", False),
    "down": (14336, (4096,), "residual", False),
}


# (block_n, block_k, warps, stages) tried beside the default; the first sweep (bn 4-16, bk 256-1024, 4/8 warps,
# 1 stage) found bn 4 bk 1024 4 warps best in every group
ROW_SWEEP = [(bn, bk, w, st) for bn in (2, 4) for bk in (1024, 2048, 4096) for w in (4, 8) for st in (1, 3)
             if (bn, bk, w, st) != (4, 1024, 4, 1)]


def row_part(args, add, over_budget, decode_rows, copy):
    """`--parts row`: the fused one-row kernel against XLA's unfused row reductions, then the decode step."""
    from pallas_kernels import row_matmul as rm

    for layout, row_kernel in (("contract-last", True), ("contract-last", False), ("stored", True)):
        if not over_budget():
            decode_rows("rowstep", {"layout": layout, "row_kernel": row_kernel}, {"ROW_KERNEL": row_kernel}, impl="auto",
                        weight_layout=layout, batches=(1,), phases=("decode", "decode_fused"), profile_batches=(1,))

    def unfused(epilogue, norm):  # what the model runs without the kernel: XLA's row reductions + glue
        def product(x, ws, i, g=None, res=None):
            if norm:
                x = ops.rms_norm(x, g[i], 1e-5)
            outs = [ops.gemv("mk,nk->mn", x, jax.lax.dynamic_index_in_dim(w, jnp.int32(i), 0, False)).astype(x.dtype)
                    for w in ws]
            if epilogue == "swiglu":
                return [jax.nn.silu(outs[0]) * outs[1]]
            if epilogue == "residual":
                return [res + outs[0]]
            return outs
        return product

    def fused(epilogue, norm, **cfg):
        def product(x, ws, i, g=None, res=None):
            return rm.row_matmuls(x, ws, jnp.int32(i), norm_weight=g if norm else None, eps=1e-5, epilogue=epilogue,
                                  residual=res if epilogue == "residual" else None, **cfg)
        return product

    key = jax.random.key(3)
    for name, (k, widths, epilogue, norm) in ROW_GROUPS.items():
        ws = tuple(jax.random.normal(jax.random.fold_in(key, j), (LAYERS, n, k), jnp.bfloat16) for j, n in enumerate(widths))
        g = 1 + 0.1 * jax.random.normal(jax.random.fold_in(key, 9), (LAYERS, k), jnp.bfloat16)
        res = jax.random.normal(jax.random.fold_in(key, 10), (1, widths[0]), jnp.bfloat16)
        x = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
        nbytes = sum(n * k * 2 for n in widths)

        def chained(product):
            return lambda x, ws, i: first_kept(product(x, ws, i, g, res))

        variants = {"xla unfused": unfused(epilogue, norm), "kernel": fused(epilogue, norm)}
        for bn, bk, warps, stages in ROW_SWEEP:
            if k % bk == 0:
                variants[f"kernel bn{bn} bk{bk} w{warps} st{stages}"] = fused(
                    epilogue, norm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
        for label, product in variants.items():
            if over_budget():
                return
            row = {"part": "row", "weight": name, "rows": 1, "variant": label}
            try:
                wall, dev = chain_seconds(chained(product), x, ws)
                t = dev or wall
                add({**row, "us": round(t * 1e6, 2), "wall_us": round(wall * 1e6, 2),
                     "tb_s": round(nbytes / t / 1e12, 3), "of_copy": round(nbytes / t / copy, 3)})
            except Exception as e:
                add({**row, "error": f"{type(e).__name__}: {str(e)[:300]}"})


def xla_rows_part(add, over_budget, decode_rows, copy, products_=True):
    """`--parts xlarows`: how XLA's row reductions (`ops.gemv` on contraction-last `[L, N, K]` stacks, bf16)
    stream each layer product of one row: q/k/v as three products against one stored `[6144, K]` matrix;
    o and down with the row split into `s` chunks summed in a second pass (more, shorter rows); gate/up as
    the reference. Then the batch-1 decode step (contraction-last) with every op of its profile listed."""
    from jaxinfer.bench import runner

    key = jax.random.key(5)

    def stack(j, n, k):
        return jax.random.normal(jax.random.fold_in(key, j), (LAYERS, n, k), jnp.bfloat16)

    def products(x, ws, i):  # `ops.gemv` of each weight, sharing x
        return first_kept([ops.gemv("mk,nk->mn", x, jax.lax.dynamic_index_in_dim(w, jnp.int32(i), 0, False))
                           for w in ws])

    q, kv, gate = (4096, 4096), (1024, 4096), (14336, 4096)
    cases = [("qkv", "three products", (q, kv, kv), 1), ("qkv", "one [6144, 4096] matrix", ((6144, 4096),), 1),
             ("gateup", "two products", (gate, gate), 1)]
    cases += [("o", f"row split {s}", (q,), s) for s in (1, 2, 4)]
    cases += [("down", f"row split {s}", ((4096, 14336),), s) for s in (1, 2, 4, 7, 14)]
    for name, label, shapes, splits in cases if products_ else ():
        if over_budget():
            return
        ws = tuple(stack(j, n, k) for j, (n, k) in enumerate(shapes))
        x = jax.random.normal(jax.random.key(1), (1, shapes[0][1]), jnp.bfloat16)
        nbytes = sum(n * k * 2 for n, k in shapes)
        row = {"part": "xlarows", "weight": name, "variant": label}
        try:  # each row summed whole or in `splits` chunks (`ops.ROW_SPLITS`)
            with switched(ops, {"ROW_SPLIT_MIN_K": 1 if splits > 1 else 1 << 30, "ROW_SPLITS": splits}):
                wall, dev = chain_seconds(products, x, ws)
            t = dev or wall
            add({**row, "us": round(t * 1e6, 2), "wall_us": round(wall * 1e6, 2),
                 "of_copy": round(nbytes / t / copy, 3)})
        except Exception as e:
            add({**row, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        del ws
    # each residual add + norm in one launch or XLA's two (rows of 8192+ split: measured in S10-3..S10-5)
    # (layout, ops switches, warps of the add + norm kernel)
    cases = [("contract-last", {"ADD_NORM_KERNEL": False}, None)]
    cases += [("contract-last", {"ADD_NORM_KERNEL": True}, warps) for warps in (4, 8, 16)]
    cases += [("stored", {"ADD_NORM_KERNEL": fused}, None) for fused in (False, True)]
    for layout, knobs, warps in cases:
        if not over_budget():
            kernel = {"pallas_kernels.add_rms_norm": {"_WARPS": warps}} if warps else {}
            with switched(runner, {"PROFILE_TOP": 200}), switched_modules(kernel):
                decode_rows("xlarows_step", {"layout": layout, **{k.lower(): v for k, v in knobs.items()},
                                             "add_norm_warps": warps}, knobs,
                            impl="auto", weight_layout=layout, batches=(1,), phases=("decode", "decode_fused"),
                            profile_batches=(1,))


ROWQ_SWEEP = [(2, 4096, 4), (4, 2048, 4), (8, 4096, 4), (4, 4096, 8), (4, 1024, 4)]  # (block_n, block_k,
# warps) beside the default (4, 4096, 4); a first sweep (run S6-3) also had bn 2-8 x bk 512-4096 x 4/8 warps


ROW_VARIANTS = {  # label: {module path: switches}; "ptx" is the library's default
    "ptx": {},
    "jnp": {"pallas_kernels.code_decode": {"INLINE_PTX": False}},
    "head-xla": {"jaxinfer.ops": {"ROW_HEAD": False}},  # the output head on XLA's path
    "bn4": {"pallas_kernels.row_matmul": {"_BLOCK_N_ONE_STEP": 4}},  # 4 rows per program throughout
    "unrolled": {"pallas_kernels.row_matmul": {"_UNROLLED_FORMATS": ("int8", "int4", "fp8")}},  # K loops unrolled
    # bf16 weights on the row kernel too (by default XLA's row reductions take them), 4 or 8 rows per program
    "plain-row": {"jaxinfer.ops": {"ROW_FORMATS": ("int8", "int4", "fp8", "plain")}},
    "plain-row-bn8": {"jaxinfer.ops": {"ROW_FORMATS": ("int8", "int4", "fp8", "plain")},
                      "pallas_kernels.row_matmul": {"_ONE_STEP_FORMATS": ("int8", "int4", "fp8", "plain")}},
}


def ptx_part(add, over_budget, decode_rows, copy, tag, variants, sweep, steps=True, profile=False, quants=None,
             names=("gateup", "down")):
    """`--parts ptx`: the row kernel's `ROW_VARIANTS` (codes decoded by inline PTX or by jnp, the output
    head on XLA, rows per program, unrolled K loops, bf16 on the kernel), each on the quantized products
    `names` of ROW_GROUPS (default block choices and `sweep`), then in the batch-1 decode step over
    contraction-last weights in bf16, int8, int4 and fp8 (`quants`)."""
    for label in variants:
        with switched_modules(ROW_VARIANTS[label]):
            row_quant_part(add, over_budget, copy, formats=("int8", "int4", "fp8"), sweep=sweep,
                           fields={"code": label, "tag": tag}, names=names)
    for quant in (quants or (None, "int8", "int4", "fp8")) if steps else ():
        for label in variants:
            if not over_budget():
                with switched_modules(ROW_VARIANTS[label]):
                    decode_rows("ptx_step", {"quant": quant or "bf16", "code": label, "tag": tag}, impl="auto",
                                quant=quant, weight_layout="contract-last", batches=(1,), phases=("decode",),
                                profile_batches=(1,) if profile else ())


def row_quant_part(add, over_budget, copy, formats=("int8", "int4", "fp8"), sweep=None, fields=None,
                   names=("gateup", "down")):
    """`--parts rowq`: the fused row kernel on quantized contraction-last stacks of ROW_GROUPS (default
    gate+up with SwiGLU and down with the residual; no norm): int8 per row, int4 in groups of 128 with
    offsets, fp8 per row; a block sweep each."""
    sweep = ROWQ_SWEEP if sweep is None else sweep
    from jaxinfer.quant import quantize_array
    from pallas_kernels import row_matmul as rm

    key = jax.random.key(4)
    for fmt, group, zp in (c for c in (("int8", None, False), ("int4", 128, True), ("fp8", None, False)) if c[0] in formats):
        for name in names:
            k, widths, epilogue, _ = ROW_GROUPS[name]
            qs = [quantize_array(jax.random.normal(jax.random.fold_in(key, j), (LAYERS, n, k), jnp.float32), fmt, (-1,),
                                 group, zero_point=zp) for j, n in enumerate(widths)]
            ws = tuple((q.values, q.scales, q.offsets) for q in qs)
            nbytes = sum(a.nbytes for w in ws for a in w if a is not None) // LAYERS
            x = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
            res = jnp.zeros((1, widths[0]), jnp.bfloat16)
            for cfg in [None] + sweep:
                if over_budget():
                    return
                opts = {} if cfg is None else dict(block_n=cfg[0], block_k=cfg[1], num_warps=cfg[2])
                label = "default" if cfg is None else f"bn{cfg[0]} bk{cfg[1]} w{cfg[2]}"
                prod = lambda x, w, i, o=opts: rm.row_matmuls(  # noqa: E731
                    x, w, jnp.int32(i), fmt=fmt, group_size=group, epilogue=epilogue,
                    residual=res if epilogue == "residual" else None, **o)[0]
                row = {"part": "rowq", "weight": f"{name}-{fmt}", "rows": 1, "variant": label, **(fields or {})}
                try:
                    wall, dev = chain_seconds(prod, x, ws)
                    t = dev or wall
                    add({**row, "us": round(t * 1e6, 2), "tb_s": round(nbytes / t / 1e12, 3),
                         "of_copy": round(nbytes / t / copy, 3)})
                except Exception as e:
                    add({**row, "error": f"{type(e).__name__}: {str(e)[:300]}"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="sweep,rows,step")
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds; no new row starts after this")
    ap.add_argument("--tag", default="", help="a label on every `ptx` row (to tell two copies of the code apart)")
    ap.add_argument("--rowq-sweep", default="8x2048x4,4x1024x4",
                    help="`ptx`: block_n x block_k x warps configurations beside the default, comma-separated")
    ap.add_argument("--rowq-names", default="gateup,down", help="`ptx`: which ROW_GROUPS products")
    ap.add_argument("--no-steps", action="store_true", help="`ptx`: products only, no decode steps")
    ap.add_argument("--no-products", action="store_true", help="`xlarows`: the decode steps only")
    ap.add_argument("--ptx-profile", action="store_true", help="`ptx`: trace the decode steps op by op")
    ap.add_argument("--ptx-quants", default="", help="`ptx`: decode steps of these (bf16,int8,int4,fp8; default all)")
    ap.add_argument("--ptx-variants", default=",".join(ROW_VARIANTS), help="`ptx`: which of ROW_VARIANTS")
    ap.add_argument("--hlo", action="store_true", help="also write each profiled decode step's compiled HLO")
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

    def decode_rows(part, fields, knobs=None, module=ops, **spec):
        """The library's decode step (`jaxinfer.bench`) for `spec` (BenchSpec fields beyond the preset),
        with `module` (default `ops`) switches `knobs` set while it is traced; one row per case, or the error."""
        from jaxinfer.bench import BenchSpec, run_bench
        from jaxinfer.config import ModelConfig

        spec = {"contexts": (args.context,), "phases": ("decode",), **spec}
        try:
            bench = BenchSpec(config=ModelConfig.from_preset(args.preset), name=args.preset, dtype="bfloat16",
                              steps=16, samples=3, **spec)
            with switched(module, knobs or {}):
                results = run_bench(bench, ceilings=ceilings, progress=False).results
            for m in results:
                row = {"part": part, **fields, "phase": m.phase, "batch": m.batch, "context": m.length,
                       "ms": round(m.ms, 3), "mbu": round(m.mbu, 3)}
                prof = m.extras.get("breakdown")
                if prof:  # device time per op of one call (per-step: one step; fused: steps_per_call)
                    if args.hlo:  # one file per profiled row: many files, and the device returns a limited count
                        tag = "_".join(f"{k}{v}" for k, v in fields.items())
                        (out / f"{part}_{tag}_{m.phase}_b{m.batch}_hlo.txt").write_text(prof.get("hlo_text", ""))
                    row["profile"] = {"device_us_per_call": prof.get("device_us_per_call"),
                                      "steps_per_call": prof.get("steps_per_call"), "ops": prof.get("ops", [])}
                add(row)
        except Exception as e:  # one failing case must not lose the others
            add({"part": part, **fields, "error": f"{type(e).__name__}: {str(e)[:300]}"})

    if "splits" in parts:  # decode attention: the old minimum of 4 key blocks per split vs 1
        from pallas_kernels import common

        for min_blocks in (4, 1):
            if not over_budget():
                decode_rows("splits", {"min_blocks_per_split": min_blocks}, {"MIN_BLOCKS_PER_SPLIT": min_blocks},
                            module=common, impl="auto", batches=(1, 8, 32), contexts=(1024, 4096),
                            phases=("decode",), profile_batches=(1,))

    if "unroll" in parts:  # layers per iteration of the layer scan (the loop's own kernels per layer)
        from jaxinfer import model

        for unroll in (4, 8, 16, 32, 4):  # the default twice (first and last: the spread between calls)
            if not over_budget():
                decode_rows("unroll", {"layer_unroll": unroll}, {"LAYER_UNROLL": unroll}, module=model, impl="auto",
                            weight_layout=DEFAULT_LAYOUT, batches=(1, 8), contexts=(1024,),
                            phases=("decode", "decode_fused"))

    if "xlarows" in parts:
        xla_rows_part(add, over_budget, decode_rows, copy, products_=not args.no_products)

    if "maxrows" in parts:  # batch 96 / 128 decode: the weight kernel (up to 128 rows) vs the dot on a copied slice
        for max_rows in (64, 128):
            if not over_budget():
                decode_rows("maxrows", {"kernel_max_rows": max_rows}, {"KERNEL_MAX_ROWS": max_rows}, impl="auto",
                            batches=(96, 128))

    if "kvq" in parts:  # the decode step over a bf16 vs int8 / fp8 KV cache (read by the Pallas kernel)
        for kv in (None, "int8", "float8_e4m3fn"):
            if not over_budget():
                decode_rows("kvq", {"kv": kv or "bf16"}, impl="auto", kv_dtype=kv, batches=(16, 64), contexts=(4096,))

    if "row" in parts:
        row_part(args, add, over_budget, decode_rows, copy)
    if "rowq" in parts:
        row_quant_part(add, over_budget, copy)
    if "ptx" in parts:
        sweep = [tuple(int(v) for v in c.split("x")) for c in args.rowq_sweep.split(",") if c]
        quants = [None if q == "bf16" else q for q in args.ptx_quants.split(",")] if args.ptx_quants else None
        ptx_part(add, over_budget, decode_rows, copy, args.tag, args.ptx_variants.split(","), sweep, not args.no_steps,
                 args.ptx_profile, quants, [n for n in args.rowq_names.split(",") if n])

    if "step" in parts:
        for impl, kernel, batches in (("auto", True, (1, 8, 16, 32, 64, 128)), ("xla", True, (1, 8, 64)),
                                      ("xla", False, (1, 8))):
            if not over_budget():
                decode_rows("step", {"impl": impl, "kernel": kernel}, {"PLAIN_KERNEL": kernel}, impl=impl,
                            batches=batches, phases=("decode", "decode_fused"),
                            profile_batches=(1,) if impl == "auto" else ())

    if {"sweep", "rows", "qsweep", "codes"} & set(parts):  # stacked weights for the product timings only
        key = jax.random.key(0)
        stacks = {name: jax.random.normal(key, (LAYERS, k, n), jnp.bfloat16) for name, (k, n) in SHAPES.items()}
        # a second copy for a part repeated in a fused product (k and v, gate and up): distinct bytes to read
        again = {name: jax.random.normal(jax.random.key(2), (LAYERS, *SHAPES[name]), jnp.bfloat16)
                 for name in ("kv", "gate")}

    def weight_bytes(name):
        return sum(SHAPES[n][0] * SHAPES[n][1] * 2 for n in FUSED.get(name, (name,)))

    def product_row(part, name, M, label, product):
        parts_ = FUSED.get(name)
        w = tuple(again[n] if n in parts_[:j] else stacks[n] for j, n in enumerate(parts_)) if parts_ else stacks[name]
        k = SHAPES[parts_[0] if parts_ else name][0]
        x = jax.random.normal(jax.random.key(1), (M, k), jnp.bfloat16)
        nbytes = weight_bytes(name)
        try:
            wall, dev = chain_seconds(product, x, w)
            s = dev or wall
            add({"part": part, "weight": name, "rows": M, "variant": label, "us": round(s * 1e6, 2),
                 "wall_us": round(wall * 1e6, 2), "tb_s": round(nbytes / s / 1e12, 3),
                 "of_copy": round(nbytes / s / copy, 3)})
        except Exception as e:  # a configuration that does not compile must not stop the sweep
            add({"part": part, "weight": name, "rows": M, "variant": label, "error": f"{type(e).__name__}: {str(e)[:200]}"})

    def sweep(name, M):
        parts_ = FUSED.get(name)
        k = SHAPES[parts_[0] if parts_ else name][0]
        n = sum(SHAPES[p][1] for p in parts_) if parts_ else SHAPES[name][1]
        make = (lambda **c: fused_product(parts_, **c)) if parts_ else kernel_product
        bn0, s0, _ = wm.plan(k, n, "plain", None, M)
        product_row("sweep", name, M, f"kernel default bn{bn0} s{s0}", make())
        seen = {(bn0, s0, 4, 3)}
        for bn, sf, warps, stages in itertools.product((64, 128, 256), (0.5, 1, 2), (4, 8), (3, 4)):
            splits = max(1, int(s0 * sf))
            if (warps == 8 and sf != 1) or k % splits or (bn, splits, warps, stages) in seen:
                continue
            seen.add((bn, splits, warps, stages))
            product_row("sweep", name, M, f"kernel bn{bn} s{splits} w{warps} st{stages}",
                        make(block_n=bn, num_splits=splits, num_warps=warps, num_stages=stages))

    if "sweep" in parts:
        for name in ("qkv", "gateup", "down", "q", "kv", "gate"):
            if over_budget():
                break
            if name in SHAPES:
                for label, product in XLA_PRODUCTS.items():
                    product_row("sweep", name, 1, label, product)
            sweep(name, 1)

    QFORMATS = {"int8": ("int8", None, False), "int4": ("int4", 128, True), "fp8": ("fp8", None, False)}

    def quantized_products(fmt_name):
        """(name, stacked quantized weights, bytes per layer, K, N) for gate+up and down in `fmt_name`."""
        from jaxinfer.quant import quantize_array

        fmt, group, zp = QFORMATS[fmt_name]
        qs = {}
        for name in ("gate", "down"):
            for key, src in ((name, stacks[name]), (name + "2", again.get(name))):
                if src is not None:
                    q = quantize_array(src.astype(jnp.float32), fmt, (1,), group, zero_point=zp)
                    qs[key] = (q.values, q.scales.reshape(LAYERS, -1, SHAPES[name][1]), q.offsets)
        for name, parts_ in (("gateup", ("gate", "gate2")), ("down", ("down",))):
            ws = tuple(qs[p] for p in parts_)
            nbytes = sum(a.nbytes for w in ws for a in w if a is not None) // LAYERS
            base = "gate" if name == "gateup" else "down"
            yield name, ws, nbytes, SHAPES[base][0], SHAPES[base][1] * len(parts_)

    if "codes" in parts:  # one row: the dot vs multiply-adds on the CUDA cores (wm.ONE_ROW_FMA), default blocks
        for fmt_name in ("int8", "int4", "fp8"):
            fmt, group, _ = QFORMATS[fmt_name]
            fma = {"ONE_ROW_FMA": (fmt,)}
            variants = {"dot": ({"ONE_ROW_FMA": ()}, {}), "fma": (fma, {}), "fma w8": (fma, {"num_warps": 8})}
            if group is None:
                variants.update({"fma step32": (fma, {"step": 32}), "fma step64": (fma, {"step": 64})})
            for name, ws, nbytes, k, n in quantized_products(fmt_name):
                x = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
                for label, (switches, opts) in variants.items():
                    if over_budget():
                        continue
                    prod = lambda x, w, i, o=opts: wm.weight_matmuls(x, w, i, fmt=fmt, group_size=group, **o)[0]  # noqa: E731
                    row = {"part": "codes", "weight": f"{name}-{fmt_name}", "rows": 1, "variant": label}
                    try:
                        with switched(wm, switches):
                            wall, dev = chain_seconds(prod, x, ws)
                        t = dev or wall
                        add({**row, "us": round(t * 1e6, 2), "wall_us": round(wall * 1e6, 2),
                             "tb_s": round(nbytes / t / 1e12, 3), "of_copy": round(nbytes / t / copy, 3)})
                    except Exception as e:
                        add({**row, "error": f"{type(e).__name__}: {str(e)[:200]}"})

    if "qsweep" in parts:  # quantized formats: block sweeps on gate+up and down, 1 and 16 rows
        for fmt_name in ("int8", "int4"):
            fmt, group, _ = QFORMATS[fmt_name]
            for name, ws, nbytes, k, n in quantized_products(fmt_name):
                for M in (1, 16):
                    bn0, s0, _ = wm.plan(k, n, fmt, group, M)
                    seen = set()
                    for bn, sf, warps, stages, step in itertools.product(
                            (128, 256), (0.5, 1, 2), (4, 8), (3, 5), (None, 256) if group is None else (None,)):
                        splits = max(1, int(s0 * sf))
                        if over_budget() or (warps == 8 and (sf != 1 or stages != 3)) or k % splits:
                            continue
                        cfg = (bn, splits, warps, stages, step)
                        if cfg in seen:
                            continue
                        seen.add(cfg)
                        label = f"{fmt_name} bn{bn} s{splits} w{warps} st{stages}" + (f" step{step}" if step else "")
                        prod = lambda x, w, i, c=cfg: wm.weight_matmuls(  # noqa: E731
                            x, w, i, fmt=fmt, group_size=group, block_n=c[0], num_splits=c[1], num_warps=c[2],
                            num_stages=c[3], step=c[4])[0]
                        x = jax.random.normal(jax.random.key(1), (M, k), jnp.bfloat16)
                        try:
                            wall, dev = chain_seconds(prod, x, ws)
                            t = dev or wall
                            add({"part": "qsweep", "weight": f"{name}-{fmt_name}", "rows": M, "variant": label,
                                 "default": (bn, splits) == (bn0, s0) and warps == 4 and stages == 3 and not step,
                                 "us": round(t * 1e6, 2), "tb_s": round(nbytes / t / 1e12, 3),
                                 "of_copy": round(nbytes / t / copy, 3)})
                        except Exception as e:
                            add({"part": "qsweep", "weight": f"{name}-{fmt_name}", "rows": M, "variant": label,
                                 "error": f"{type(e).__name__}: {str(e)[:160]}"})

    if "rows" in parts:
        for M in (8, 16, 32, 64):
            for name in ("gateup", "down"):
                if over_budget():
                    break
                if name in SHAPES:
                    product_row("rows", name, M, "dot-slice", XLA_PRODUCTS["dot-slice"])
                sweep(name, M)

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
        if r["part"] in ("row", "rowq") and "us" in r:
            print(f"row {r['weight']:7s} {r['variant']:26s} {r['us']:9.2f} us {r['tb_s']:6.3f} TB/s {r['of_copy']:.3f}")
        if r["part"] == "rowstep" and "ms" in r:
            print(f"step {r['layout']:13s} row_kernel={r['row_kernel']!s:5s} {r['phase']:12s} b{r['batch']} "
                  f"{r['ms']:.3f} ms MBU {r['mbu']:.3f}")
    for r in report["rows"]:
        if r["part"] == "codes" and "us" in r:
            print(f"{r['weight']:12s} M={r['rows']:<3d} {r['variant']:10s} {r['us']:9.2f} us {r['tb_s']:6.3f} TB/s {r['of_copy']:.3f}")
        elif r["part"] in ("step", "unroll"):
            print({k: v for k, v in r.items() if k != "profile"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
