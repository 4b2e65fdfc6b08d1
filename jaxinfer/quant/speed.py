"""The quantization speed check on a GPU: every ratio against bf16 measured in the same process.

    PYTHONPATH=. python3 -m jaxinfer.quant.speed --out $OUT [--budget 330]

1. `pytest -m gpu tests/test_weight_matmul.py` in a child process (the kernels natively), log kept.
2. `llama-3-8b` random bf16 weights, quantized on the device per recipe; decode per step (the library's
   jitted `decode_step`, greedy feedback, context 1024) at batch 1 and 16 for bf16 / int8 / int4, then
   path variants (the Pallas kernel at batch 1, XLA at batch 16) to show what each path is worth.
3. Prefill of 4096 tokens, bf16 vs fp8 (native fp8 matmuls), cuDNN attention for both.
Cases run in priority order until the time budget is spent; `<out>/quant_speed.json` is rewritten after
each. Prints a table and ends with one JSON line. Uses the bench runner's timing (`jaxinfer.bench`).

Measured on one NVIDIA H200 (jax 0.11.2, 2026-11-26; llama-3-8b random weights, decode context 1024,
ms per step, each ratio against bf16 in the same run; run 1 at commit 22042d3, run 2 = 22042d3 + the int4
`qgemv` and bf16-out fp8 dots, run 3 at 4c0e44a (session 2): every decode product of 1-64 rows through the
Pallas kernel reading the layer in place, bf16 included (raw: benchmarks/results/2026-11-26-h200-s2/);
"int4" = groups of 128 with offsets):
| case | run 1 | run 2 | run 3 | target |
| --- | --- | --- | --- | --- |
| batch 1, bf16 (XLA attention) | 6.393 | 6.380 | 5.487 | |
| batch 1, int8 | 5.839 (1.09x, dequantize in gemv) | 6.366 (1.00x, codes + output scale) | 4.918 (1.12x, kernel) | 1.8x |
| batch 1, int4 | 10.348 (0.62x, gemv over dequantized) | 5.464 (1.17x, `qgemv`) | 6.085 (0.90x, kernel); 5.212 (1.05x, qgemv) | 3.0x |
| batch 1, int4-g64 | - | 5.789 (1.10x) | 7.331 (0.75x, kernel) | |
| batch 1, fp8 | 5.761 (1.11x, dequantize in gemv) | 5.158 (1.24x, codes + output scale) | 5.469 (1.00x, kernel) | |
| batch 16, bf16 / int4 / int8 (Pallas attention) | - | 13.51 / 10.56 (1.28x) / 10.48 (1.29x) | 5.453 / 6.092 (0.90x) / 4.873 (1.12x) | 2.0x |
| prefill 4096, bf16 / fp8 (cuDNN attention) | 113.4 / 85.3 (1.33x) | 111.8 / 78.3 (1.43x) | 113.0 / 75.6 (1.49x) | 1.5x |
Run 3's bf16 baseline is itself 1.2-2.5x faster than before (the kernel removed the per-layer weight copies),
so the quantized formats gained in milliseconds but lost in ratio: through the kernel they are limited by
dequantizing each tile before the dot, not by bytes (pallas_kernels/NOTES.md). With `impl="auto"` in the
same session (run S2-6): bf16 4.951, int8 4.369 (1.13x), fp8 4.898 (1.01x), int4 5.539 (0.89x) ms.
Run 4 (session 4, `impl="auto"` throughout, raw benchmarks/results/2026-11-26-h200-s4/): fp8 codes now enter the
dot as float16 and a single row of fp8 runs as CUDA-core multiply-adds (`weight_matmul.ONE_ROW_FMA`): batch 1
bf16 4.802, int8 4.358 (1.10x), int4 5.505 (0.87x), fp8 **3.698 (1.30x)**; batch 16 int8 1.13x, int4 0.89x;
prefill 4096 fp8 1.46-1.50x. The same multiply-adds for int8 / int4 were slower (4.779 / 5.722).
None of the decode speed targets is met; quality is (tests/test_quant_quality.py).
Session 13 (`--contract-last [--kernel-variants]`, raw benchmarks/results/2026-11-27-h200-s13/): batch 16 on
contraction-last trees, int4 5.89 -> 3.82-3.83 ms (0.88x -> 1.36x bf16: codes by inline PTX, x's group sums
outside the kernel, smaller programs four to an SM), int8 3.77-3.84 (1.36-1.38x); batch 1 unchanged (row kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_kernel_tests(out: Path, timeout: int) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE",
           str(ROOT / "tests" / "test_weight_matmul.py")]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        log = f"{e.stdout or ''}{e.stderr or ''}\nTIMED OUT after {timeout} s"
    (out / "kernel_tests.log").write_text(log)
    tail = [line for line in log.splitlines() if line.strip()][-3:]
    return {"seconds": round(time.time() - t0, 1), "tail": tail}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.quant.speed")
    p.add_argument("--out", default="quant_speed")
    p.add_argument("--budget", type=float, default=330.0, help="seconds; no new case starts after this")
    p.add_argument("--tests-timeout", type=int, default=120)
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--int4", default="int4", help="the int4 recipe (preset name)")
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--kernel-variants", action="store_true",
                   help="with --contract-last: first batch-16 int4 / int8 under the weight kernel's tilings "
                        "(column block, warps, waves of programs)")
    p.add_argument("--contract-last", action="store_true",
                   help="instead: batch-1 decode with contract-last trees (bf16: XLA's row reduction; quantized: the "
                        "fused row kernel) against the stored trees on the Pallas weight kernel")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    report: dict = {"results": [], "skipped": []}
    if not args.skip_tests:
        report["kernel_tests"] = run_kernel_tests(out, args.tests_timeout)
        print("kernel tests:", report["kernel_tests"], flush=True)

    import jax
    import jax.numpy as jnp

    from .. import ops
    from ..bench import runner, switched
    from ..config import ModelConfig
    from ..weight_layout import contract_last
    from . import get_recipe, quantize

    dev = jax.devices()[0]
    report["device"] = f"{dev.device_kind} ({jax.__version__})"
    config = ModelConfig.from_preset(args.preset)
    report["preset"] = args.preset
    spec = lambda quant, impl="xla": runner.BenchSpec(config=config, name=args.preset, dtype="bfloat16",
                                                     quant=quant, impl=impl, steps=args.steps,
                                                     samples=args.samples)
    trees = {"bf16": runner.build_params(config, jnp.bfloat16, 0)}
    jax.block_until_ready(trees["bf16"])

    def tree(name):
        """`bf16`, a recipe, or `cl:<either>` (quantized after `contract_last`). One quantized tree is kept
        at a time beside the two bf16 ones (all of them at once outgrow an 80 GB card: S12-13 on an H100)."""
        if name not in trees:
            for old in [k for k in trees if k not in ("bf16", "cl:bf16")]:
                del trees[old]
            t0 = time.time()
            if name == "cl:bf16":
                trees[name] = jax.block_until_ready(contract_last(trees["bf16"]))
            elif name.startswith("cl:"):
                trees[name] = jax.block_until_ready(quantize(tree("cl:bf16"), name[3:]))
            else:
                trees[name] = jax.block_until_ready(quantize(trees["bf16"], name))
            report.setdefault("quantize_s", {})[name] = round(time.time() - t0, 1)
        return trees[name]

    def save():
        (out / "quant_speed.json").write_text(json.dumps(report, indent=1))

    from pallas_kernels import code_decode
    from pallas_kernels import weight_matmul as wm

    def case(label, recipe, phase, batch, length, kernel_rows=(1, 128), impl="xla", warps=None, fp8_narrow=True,
             kernel=None, ops_knobs=None, ptx=True):
        if time.time() - t_start > args.budget:
            report["skipped"].append(label)
            print("skipped (budget):", label, flush=True)
            return
        t0 = time.time()
        try:
            params = tree(recipe)
            plain = recipe.removeprefix("cl:")
            s = spec(None if plain == "bf16" else plain, impl)
            # Module knobs are read when a step is traced: each case traces its own path.
            with switched(ops, {"QUANT_KERNEL_MIN_ROWS": kernel_rows[0], "KERNEL_MAX_ROWS": kernel_rows[1],
                                "FP8_OUT_NARROW": fp8_narrow, **(ops_knobs or {})}), \
                    switched(wm, {"_WARPS": warps or 4, **(kernel or {})}), switched(code_decode, {"INLINE_PTX": ptx}):
                if phase == "prefill":
                    timing, seconds, _, _ = runner._time_prefill(params, s, batch, length)
                else:
                    timing, seconds, _, _ = runner._time_decode(params, s, "decode", batch, length)
            row = {"case": label, "recipe": recipe, "phase": phase, "batch": batch, "length": length, "impl": impl,
                   "ms": round(seconds * 1e3, 3), "tokens_per_s": round(batch * (length if phase == "prefill" else 1)
                                                                        / seconds, 1),
                   "spread": round(timing.spread, 3), "wall_s": round(time.time() - t0, 1)}
        except Exception as e:  # one failing case must not lose the others
            row = {"case": label, "error": f"{type(e).__name__}: {str(e)[:400]}", "wall_s": round(time.time() - t0, 1)}
        report["results"].append(row)
        print(row, flush=True)
        save()

    int4 = args.int4
    ctx = args.context
    case("decode b1 bf16", "bf16", "decode", 1, ctx, impl="auto")
    if args.contract_last:  # quantized after `contract_last`: one row takes the fused row kernel (ops.ROW_FORMATS)
        case("decode b1 bf16 (contract-last)", "cl:bf16", "decode", 1, ctx, impl="auto")
        if args.kernel_variants:
            tilings = {"128 columns, 4 warps, 1 wave": (128, 4, 1), "128 columns, 4 warps, 2 waves": (128, 4, 2),
                       "64 columns, 2 warps, 4 waves": (64, 2, 4), "64 columns, 2 warps, 6 waves": (64, 2, 6)}
            knobs = {label: {"DOT_TILING": {"int4": t, "int8": t}} for label, t in tilings.items()}
            case("decode b16 bf16 (contract-last)", "cl:bf16", "decode", 16, ctx, impl="auto")
            for recipe in (int4, "int8"):
                case(f"decode b16 {recipe} (contract-last)", f"cl:{recipe}", "decode", 16, ctx, impl="auto")
                for label, knob in knobs.items():
                    case(f"decode b16 {recipe} (contract-last, {label})", f"cl:{recipe}", "decode", 16, ctx,
                         impl="auto", kernel=knob)
        # batch 16: the weight kernel's dot operands decoded by inline PTX against the lowering's own
        for recipe in ("bf16", "int8", int4):
            case(f"decode b16 {recipe} (contract-last)", f"cl:{recipe}", "decode", 16, ctx, impl="auto")
            if recipe != "bf16":
                case(f"decode b16 {recipe} (contract-last, jnp codes)", f"cl:{recipe}", "decode", 16, ctx,
                     impl="auto", ptx=False)
                case(f"decode b1 {recipe} (contract-last, weight kernel)", f"cl:{recipe}", "decode", 1, ctx,
                     impl="auto", ops_knobs={"ROW_KERNEL": False})
        for recipe in ("int8", int4, "int4-g64", "fp8"):
            case(f"decode b1 {recipe} (contract-last)", f"cl:{recipe}", "decode", 1, ctx, impl="auto")
        for recipe in ("int8", int4, "fp8"):
            case(f"decode b1 {recipe} (kernel, stored)", recipe, "decode", 1, ctx, impl="auto")
        for recipe in ("bf16", "int8", int4):  # batch 16 on the stored trees
            case(f"decode b16 {recipe} (stored)", recipe, "decode", 16, ctx, impl="auto")
    else:  # the Pallas kernel paths and their variants
        for recipe in ("int8", int4, "fp8"):
            case(f"decode b1 {recipe} (kernel)", recipe, "decode", 1, ctx, impl="auto")
            fmt = get_recipe(recipe).format  # the other way of a one-row product
            other, label = ((), "dot") if fmt in wm.ONE_ROW_FMA else ((fmt,), "CUDA-core multiply-adds")
            case(f"decode b1 {recipe} (kernel, {label})", recipe, "decode", 1, ctx, impl="auto", kernel={"ONE_ROW_FMA": other})
        case("decode b16 bf16", "bf16", "decode", 16, ctx, impl="auto")
        case(f"decode b16 {int4} (kernel)", int4, "decode", 16, ctx, impl="auto")
        case("decode b16 int8 (kernel)", "int8", "decode", 16, ctx, impl="auto")
        case(f"prefill {args.prefill} bf16 (cudnn)", "bf16", "prefill", 1, args.prefill, impl="cudnn")
        case(f"prefill {args.prefill} fp8 (cudnn)", "fp8", "prefill", 1, args.prefill, impl="cudnn")
        case("decode b1 int4-g64 (kernel)", "int4-g64", "decode", 1, ctx, impl="auto")
        case(f"decode b1 {int4} (gemv)", int4, "decode", 1, ctx, kernel_rows=(2, 128), impl="auto")
        case(f"decode b16 {int4} (xla dequant+dot)", int4, "decode", 16, ctx, kernel_rows=(2, 0), impl="auto")

    bases = {name: {(r["phase"], r["batch"], r["impl"]): r["ms"] for r in report["results"]
                    if r.get("recipe") == name and "ms" in r} for name in ("bf16", "cl:bf16")}
    print(f"\n{report['device']}")
    for r in report["results"]:
        if "ms" in r:
            key = (r["phase"], r["batch"], r["impl"])
            speed = "  ".join(f"{b[key] / r['ms']:.2f}x {name}" for name, b in bases.items() if key in b)
            print(f"{r['case']:52s} {r['ms']:9.3f} ms {r['tokens_per_s']:10.1f} tok/s  {speed}")
        else:
            print(f"{r['case']:52s} {r.get('error')}")
    report["total_s"] = round(time.time() - t_start, 1)
    save()
    print(json.dumps({"device": report["device"], "results": [{k: r.get(k) for k in ("case", "ms", "error")}
                                                            for r in report["results"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
