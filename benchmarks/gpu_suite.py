"""The one GPU run: GPU-marked tests, then the standard benchmark set, then the kernel benchmarks.

    PYTHONPATH=. python3 benchmarks/gpu_suite.py --out $OUT

1. `pytest -m gpu` in child processes (before this process touches the GPU; up to `--test-jobs` test files at
   once), log to <out>/pytest.log.
2. Ceilings (copy bandwidth, bf16 matmul) measured here, then `llama-3-8b` bf16 with the library's default
   (`--impl auto`: cuDNN prefill, Pallas decode attention; weights laid out as the command line loads them,
   `weight_layout.DEFAULT_LAYOUT`: XLA's row reductions for one row, the Pallas weight kernel for 2-128): a
   2048-token prefill at batch 1, and decode at batch 1, 8, 32, 128 with 1024 tokens of context, both
   per-step and with the fused on-device loop; batch 1 and 128 decode traced op by op. <out>/bench.json is
   rewritten after every case, so a run cut short keeps what it measured; then roofline.png,
   summary.md and the batch-1 decode step's compiled HLO (decode_b1_hlo.txt). Then the `VARIANTS`
   (`--variants`, batch 1 unless `--variant-batch`): the plain XLA path (XLA attention, traced op by op),
   the stored weight order (the Pallas weight kernel for one row too), int8 / fp8 / int4 (groups of 128 with
   offsets) quantized after `contract_last`, the steps with the rotation and cache write or the residual
   adds and norms as XLA ops, dense decode attention with 128-key blocks for every split length, the add +
   norm kernel at 16 warps, and prefill of 8k tokens by attention kernel, into the same files.
3. `benchmarks.kernel_bench.run_kernel_benchmarks(out)` if importable; its failure is recorded, not fatal.
Prints a short table last and ends with one JSON line. Variant comparisons of the decode path (weight kernel
on/off, XLA vs Pallas attention, quantized caches and weights): `benchmarks/weight_kernel.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from jaxinfer.weight_layout import DEFAULT_LAYOUT, LAYOUTS  # noqa: E402

SERIAL_TEST_FILES = ("test_bench.py",)  # measures the card's ceilings: runs after the others, alone


def _pytest(args: list[str], env: dict, timeout: float) -> tuple[str, int]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
        return proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return f"{out}{err}\nTIMED OUT after {timeout:.0f} s", -1


def run_gpu_tests(out: Path, timeout: int, paths=("tests",), jobs: int = 4, platform: str = "cuda") -> dict:
    """`pytest -m gpu` on the GPU in child processes, before this process touches the GPU: one collection
    pass finds the files with GPU tests, then up to `jobs` files run at once (sharing the GPU, memory not
    preallocated: the native tests are compile-bound), `SERIAL_TEST_FILES` alone after them. Logs go to
    <out>/pytest.log (all files, in order). Returns the summed counts and the worst exit code."""
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ, JAX_PLATFORMS=platform, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.time()
    deadline = t0 + timeout
    listing, _ = _pytest(["-m", "gpu", "--collect-only", *(str(ROOT / p) for p in paths)], env, timeout)
    files = sorted({line.split("::")[0] for line in listing.splitlines() if "::" in line})
    parallel = [f for f in files if Path(f).name not in SERIAL_TEST_FILES]
    serial = [f for f in files if Path(f).name in SERIAL_TEST_FILES]
    run_file = lambda f: (f, *_pytest(["-m", "gpu", "-rfE", f], env, deadline - time.time()))  # noqa: E731
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(run_file, parallel))
    results += [run_file(f) for f in serial]
    log = "".join(f"===== {f} (exit {code})\n{text}\n" for f, text, code in results)
    (out / "pytest.log").write_text(f"collected GPU tests in {len(files)} files\n{listing}\n{log}")
    counts: dict = {}
    for _, text, _ in results:
        tail = text.strip().splitlines()[-1:] or [""]
        for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", tail[0]):
            counts[k] = counts.get(k, 0) + int(n)
    failed = [line for _, text, _ in results for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    codes = [code for _, _, code in results]
    worst = next((c for c in codes if c not in (0, 5)), 0 if codes else 5)  # 5: no tests collected
    return {"exit_code": worst, "counts": counts, "files": len(files), "failed": failed[:20],
            "seconds": round(time.time() - t0, 1)}


def standard_spec(args):
    from jaxinfer.bench import BenchSpec
    from jaxinfer.config import ModelConfig

    return BenchSpec(
        config=ModelConfig.from_preset(args.preset), name=args.preset, dtype="bfloat16", impl=args.impl,
        weight_layout=args.weight_layout, batches=tuple(args.batch), prompt_lens=(args.prompt_len,),
        contexts=(args.context,),
        phases=("decode", "decode_fused"), steps=args.steps, samples=args.samples,
        gpu_hour_price=args.gpu_hour_price, profile_batches=tuple(args.profile_batch),
    )


# Variants timed after the standard set (batch 1 unless `--variant-batch`), each against the same ceilings:
# name -> (title, spec changes[, switches {module path: {NAME: value}} set while the variant runs
# (`jaxinfer.bench.switched_modules`)]).
VARIANTS = {
    # The plain XLA path (no Pallas anywhere): issue 4's batch-1 criterion, with its own op-by-op trace.
    "xla_path": ("The plain XLA path (attention `xla`, weights `contract_last`, no Pallas)",
                 dict(impl="xla", weight_layout="contract-last", profile_batches=(1,))),
    # The matrices in the stored (checkpoint) order: the Pallas weight kernel for one row too; traced op by op.
    "stored": ("Weights in the stored order (the Pallas weight kernel for one row too), default attention",
               dict(weight_layout="stored", profile_batches=(1,))),
    # Quantized after `contract_last`: one row takes the fused row kernel (`pallas_kernels/row_matmul.py`).
    **{f"{q.replace('-', '_')}_contract_last": (f"{q} weights quantized after `contract_last` (the fused row kernel)",
                                                 dict(quant=q, weight_layout="contract-last", profile_batches=()))
       for q in ("int8", "fp8", "int4")},
    # int4 in the tensor cores' fragment order (`weight_layout.fragment_order`): batched products on
    # `pallas_kernels/fragment_matmul.py`, one row too (no row kernel for this order).
    "int4_fragments": ("int4 weights quantized after `contract_last`, codes in the fragment order "
                       "(`fragment_matmul`, Mosaic GPU)",
                       dict(quant="int4", weight_layout="fragments", profile_batches=())),
    "int4_fragments_2stages": ("int4 in the fragment order, a 2-slot ring (`fragment_matmul.STAGES = 2`: ~35 KB a "
                               "CTA, five CTAs an SM where registers allow)",
                               dict(quant="int4", weight_layout="fragments", profile_batches=()),
                               {"pallas_kernels.fragment_matmul": {"STAGES": 2}}),
    # Weights and an int8 cache (per token and head scales) at once, beside the standard set's bf16 cache: a
    # datapoint, not issue 6's weight-only ratios.
    **{f"{name}_int8_kv": (f"{title}, int8 cache", dict(profile_batches=(), kv_dtype="int8", **changes))
       for name, title, changes in (("bf16", "bf16 weights", {}),
                                    ("int4_fragments", "int4 in the fragment order",
                                     dict(quant="int4", weight_layout="fragments")))},
    # The int8 cache's decode attention with larger key blocks for short walks (its keys are half as many bytes;
    # the switch is the bf16 cache's too, which these steps do not read).
    **{f"bf16_int8_kv_block{b}_{st}": (f"bf16 weights, int8 cache, {b}-key blocks in {st} stages for short walks",
                                       dict(profile_batches=(), kv_dtype="int8"),
                                       {"pallas_kernels.decode_attention": {"_SHORT_BLOCK_K": b, "_SHORT_STAGES": st}})
       for b, st in ((64, 4), (64, 2), (128, 2))},
    # More decode attention programs at once (`common.TARGET_PROGRAMS`, the splits' target): an int8 cache's
    # stages take half the shared memory, so twice as many programs fit an SM (session 30).
    **{f"{name}_programs{n}{'_3stages' if st else ''}": (
        f"{title}, decode attention splits towards {n} programs{', 3 stages for short walks' if st else ''}",
        dict(profile_batches=(), **changes),
        {"pallas_kernels.common": {"TARGET_PROGRAMS": n},
         **({"pallas_kernels.decode_attention": {"_SHORT_STAGES": st}} if st else {})})
       for name, title, changes in (("bf16", "bf16 weights and cache", {}),
                                    ("bf16_int8_kv", "bf16 weights, int8 cache", dict(kv_dtype="int8")))
       for n in (528, 792) for st in (None, 3)},
    # The int8 cache's values read as int32 words (`decode_attention.VALUE_WORDS`): decoded into bfloat16, or into
    # float16 by inline PTX with the codes scaled by their token's scale (built in session 30, not yet timed).
    **{f"{name}_words{'_f16' if f16 else ''}": (
        f"{title}, int8 cache, values read as words{' into float16' if f16 else ''}",
        dict(profile_batches=(), kv_dtype="int8", **changes),
        {"pallas_kernels.decode_attention": {"VALUE_WORDS": "float16" if f16 else "bfloat16"}})
       for name, title, changes in (("bf16_int8_kv", "bf16 weights", {}),
                                    ("int4_fragments_int8_kv", "int4 in the fragment order",
                                     dict(quant="int4", weight_layout="fragments")))
       for f16 in (False, True)},
    # Eight warps a decode attention program (`decode_attention._DEFAULT_WARPS`): the int8 cache's launch holds 168
    # registers a thread at four (three programs an SM), the bf16 cache's 126 (session 30).
    **{f"{name}_warps8": (f"{title}, eight warps a decode attention program", dict(profile_batches=(), **changes),
                          {"pallas_kernels.decode_attention": {"_DEFAULT_WARPS": 8}})
       for name, title, changes in (("bf16", "bf16 weights and cache", {}),
                                    ("bf16_int8_kv", "bf16 weights, int8 cache", dict(kv_dtype="int8")))},
    # The int8 cache's codes into the attention's dots by inline PTX (`decode_attention.CODES_BY_PTX`), as bfloat16
    # or float16.
    **{f"{name}_codes_ptx{'_f16' if f16 else ''}": (
        f"{title}, int8 cache, codes by inline PTX{' into float16 dots' if f16 else ''}",
        dict(profile_batches=(), kv_dtype="int8", **changes),
        {"pallas_kernels.decode_attention": {"CODES_BY_PTX": True, **({"QUANT_DOT_DTYPE": "float16"} if f16 else {})}})
       for name, title, changes in (("bf16_int8_kv", "bf16 weights", {}),
                                    ("int4_fragments_int8_kv", "int4 in the fragment order",
                                     dict(quant="int4", weight_layout="fragments")))
       for f16 in (False, True)},
    "bf16_int8_kv_f16_dots": ("bf16 weights, int8 cache, codes converted to float16 for the attention's dots "
                              "(`decode_attention.QUANT_DOT_DTYPE`)", dict(profile_batches=(), kv_dtype="int8"),
                              {"pallas_kernels.decode_attention": {"QUANT_DOT_DTYPE": "float16"}}),
    "int4_fragments_norm_without_digits": ("int4 in the fragment order, x's digits for q/k/v and gate/up made by "
                                           "launches of their own, not the add + norm (`ops.ADD_NORM_DIGITS` off)",
                                           dict(quant="int4", weight_layout="fragments", profile_batches=()),
                                           {"jaxinfer.ops": {"ADD_NORM_DIGITS": False}}),
    "int4_fragments_merge_digits": ("int4 in the fragment order, o's x prepared from the attention's unmerged "
                                    "splits (`ops.MERGE_DIGITS`)",
                                    dict(quant="int4", weight_layout="fragments", profile_batches=()),
                                    {"jaxinfer.ops": {"MERGE_DIGITS": True}}),
    # int4 row-kernel forms, each one switch of `pallas_kernels/row_matmul.py` away from the default
    **{f"int4_contract_last_{suffix}": (
        f"int4 weights quantized after `contract_last`, {what} (`row_matmul`: {switches})",
        dict(quant="int4", weight_layout="contract-last", profile_batches=()),
        {"pallas_kernels.row_matmul": switches})
       for suffix, what, switches in (
           ("floats", "the float path (codes decoded to float32) instead of integer dot products", {"DP4A": False}),
           ("16rows", "16 rows a dp4a program", {"_BLOCK_N_DP4A": 16}),
           ("16rows_8warps", "16 rows a dp4a program over 8 warps", {"_BLOCK_N_DP4A": 16, "_WARPS_DP4A": 8}),
           ("32rows_8warps", "32 rows a dp4a program over 8 warps", {"_BLOCK_N_DP4A": 32, "_WARPS_DP4A": 8}),
           ("x_in_kernel", "x's fixed point made in every program (session 17)", {"DP4A_PREPARED_X": False}),
           ("prepare_2warps", "x's preparation at 2 warps a program", {"_PREPARE_WARPS": 2}),
           ("prepare_4warps", "x's preparation at 4 warps a program", {"_PREPARE_WARPS": 4}),
           ("nosplit", "no K split: `down` (112 groups, not one power-of-two step) on the float path's K loop",
            {"DP4A_SPLIT_K": False}),
           ("x20", "x's fixed point in three bytes (20 bits) instead of two", {"_X_BYTES": 3}),
           ("merge_first", "decode attention's splits merged by `combine_splits` before o's preparation",
            {"MERGE_IN_PREPARATION": False}),
           ("norm_in_preparation", "x's normed preparation reading the whole row for the norm (before session 22)",
            {"NORM_IN_PRODUCT": False}),
           *((f"merge_{w}warps", f"o's preparation merging attention's splits at {w} warps a program",
              {"_PREPARE_PARTIALS_WARPS": w}) for w in (1, 2, 8)))},
    # int8 at 2-64 rows on the Triton weight kernel instead of the s8 tensor-core kernel (`ops.S8_KERNEL` off).
    "int8_contract_last_weight_kernel": ("int8 weights quantized after `contract_last`, batched products on the "
                                         "Triton weight kernel (`ops.S8_KERNEL = False`)",
                                         dict(quant="int8", weight_layout="contract-last", profile_batches=()),
                                         {"jaxinfer.ops": {"S8_KERNEL": False}}),
    # int8 at one row on the s8 kernel too (the row kernel declines int8): add + norm launches write x's digits.
    "int8_contract_last_s8_one_row": ("int8 weights quantized after `contract_last`, one row on the s8 kernel "
                                      "(`ops.ROW_FORMATS` without int8)",
                                      dict(quant="int8", weight_layout="contract-last", profile_batches=()),
                                      {"jaxinfer.ops": {"ROW_FORMATS": ("int4", "fp8")}}),
    # int8 with the norm's 1 / rms applied to x before the products, as before session 22 (`NORM_IN_PRODUCT`).
    "int8_contract_last_norm_first": ("int8 weights quantized after `contract_last`, x normalised before the products "
                                      "(`row_matmul.NORM_IN_PRODUCT = False`)",
                                      dict(quant="int8", weight_layout="contract-last", profile_batches=()),
                                      {"pallas_kernels.row_matmul": {"NORM_IN_PRODUCT": False}}),
    # The layer scan with more layers an iteration (`model.LAYER_UNROLL`; 32: no loop): fewer loop-control kernels.
    **{f"int4_contract_last_unroll{u}": (f"int4 weights quantized after `contract_last`, {u} layers an iteration of "
                                         "the layer scan", dict(quant="int4", weight_layout="contract-last",
                                                                profile_batches=()),
                                         {"jaxinfer.model": {"LAYER_UNROLL": u}}) for u in (8, 32)},
    # The same for the batched paths: bf16 (the standard set's path) and int4 in the fragment order (session 29:
    # the batched Mosaic steps idle once a scan iteration).
    **{f"{name}_unroll{u}": (f"{title}, {u} layers an iteration of the layer scan", dict(profile_batches=(), **changes),
                             {"jaxinfer.model": {"LAYER_UNROLL": u}})
       for name, title, changes in (("bf16", "bf16 weights (the standard set's path)", {}),
                                    ("int4_fragments", "int4 in the fragment order",
                                     dict(quant="int4", weight_layout="fragments")))
       for u in (8, 32)},
    # The decode step with the rotation and the cache write as XLA ops (no `rope_write`, no appending launch).
    "unfused_rope_write": ("Rotation and cache write as XLA ops (`attention.ROPE_WRITE_KERNEL = False`)",
                           dict(profile_batches=()), {"jaxinfer.attention": {"ROPE_WRITE_KERNEL": False}}),
    # The rotation and the cache write in their own launch (`rope_write`) before the decode attention's.
    "separate_rope_write": ("Rotation and cache write in `rope_write`'s own launch (`attention.APPEND_KERNEL = False`)",
                            dict(profile_batches=()), {"jaxinfer.attention": {"APPEND_KERNEL": False}}),
    # bf16 products on the fused row kernel too (norm, residual and SwiGLU fused; XLA's row reductions otherwise).
    "bf16_row_kernel": ("bf16 products on the fused row kernel (`ops.ROW_FORMATS` with plain weights)",
                        dict(profile_batches=()), {"jaxinfer.ops": {"ROW_FORMATS": ("int8", "int4", "fp8", "plain")}}),
    # The residual adds and norms as XLA ops (`pallas_kernels/add_rms_norm.py` off).
    "unfused_add_norm": ("Residual adds and norms as XLA ops (`ops.ADD_NORM_KERNEL = False`)",
                         dict(profile_batches=()), {"jaxinfer.ops": {"ADD_NORM_KERNEL": False}}),
    # Dense decode attention with 128-key blocks and 2 stages for short walks too (the default before session 11).
    "decode_long_blocks": ("Dense decode attention with 128-key blocks, 2 stages for every split length",
                           dict(profile_batches=()), {"pallas_kernels.decode_attention": {
                               "_SHORT_BLOCK_K": 128, "_SHORT_STAGES": 2}}),
    # Contraction-last float weights with q, k and v kept apart (three products, XLA fusing k and v only).
    "unpacked_qkv": ("q, k and v as three matrices (`packing.PACK_FLOAT_QKV = False`)", dict(profile_batches=()),
                     {"jaxinfer.packing": {"PACK_FLOAT_QKV": False}}),
    # The add + norm kernel at 16 warps per program instead of its default.
    "add_norm_16_warps": ("The add + norm kernel at 16 warps", dict(profile_batches=()),
                          {"pallas_kernels.add_rms_norm": {"_WARPS": 16}}),
    # The on-device decode loop at large batches (over `ops.SPLIT_KERNEL_MAX_ROWS` rows), with the layers split
    # once before the loop (the default, `model.split_for_loop`: XLA's GEMMs read them in place) and on the
    # stacked layers (the product kernel up to 128 rows, then GEMMs copying every layer's slice on every trip);
    # run both with e.g. `--variant-batch 96 128 256`.
    "loop_split": ("Decode loop, layers split once before the loop (the default)",
                   dict(phases=("decode_fused",), profile_batches=())),
    "loop_stacked": ("Decode loop on the stacked layers (`model.SPLIT_LAYERS = False`)",
                     dict(phases=("decode_fused",), profile_batches=()), {"jaxinfer.model": {"SPLIT_LAYERS": False}}),
    # Prefill of an 8k prompt by attention kernel (issue 5: Pallas at least 2x XLA attention): the library's
    # default (`auto`: cuDNN), `pallas` (on Hopper the Mosaic GPU kernel), `pallas` on the Triton kernel, XLA.
    **{f"prefill_8k{suffix}": (title, dict(phases=("prefill",), prompt_lens=(8192,), profile_batches=(), **changes),
                               *switches)
       for suffix, title, changes, switches in [
           ("", "Prefill 8192 tokens, default attention", {}, ()),
           ("_pallas", "Prefill 8192 tokens, Pallas attention", dict(impl="pallas"), ()),
           ("_triton", "Prefill 8192 tokens, Pallas attention on the Triton kernel (`flash_attention.MOSAIC = False`)",
            dict(impl="pallas"), ({"pallas_kernels.flash_attention": {"MOSAIC": False}},)),
           ("_xla", "Prefill 8192 tokens, XLA attention", dict(impl="xla"), ())]},
    # Prefill of a 4k prompt, bf16 against fp8 weights (issue 6: fp8 prefill at least 1.5x bf16; native fp8
    # products), in both weight orders.
    **{f"prefill_4k{suffix}": (title, dict(phases=("prefill",), prompt_lens=(4096,), profile_batches=(), **changes))
       for suffix, title, changes in [
           ("", "Prefill 4096 tokens, bf16", {}),
           ("_fp8", "Prefill 4096 tokens, fp8 weights (native fp8 products)", dict(quant="fp8")),
           ("_stored", "Prefill 4096 tokens, bf16, weights in the stored order", dict(weight_layout="stored")),
           ("_fp8_stored", "Prefill 4096 tokens, fp8 weights in the stored order",
            dict(quant="fp8", weight_layout="stored"))]},
}


def run_benchmarks(args, out: Path, summary: dict):
    import dataclasses

    from jaxinfer.bench import measure_ceilings, run_bench, switched_modules
    from jaxinfer.bench.command import check_spec_fits
    from jaxinfer.bench.report import markdown, roofline_png, to_json
    from jaxinfer.bench.runner import BenchReport, run_metadata

    spec = standard_spec(args)
    prefill_spec = dataclasses.replace(spec, batches=(1,), phases=("prefill",), profile_batches=())
    variant_specs = {  # (traced op by op only where the standard set is)
        name: dataclasses.replace(spec, batches=tuple(args.variant_batch), **{
            **changes, **({"profile_batches": tuple(args.variant_batch)} if args.variant_profile else
                          {} if spec.profile_batches else {"profile_batches": ()})})
        for name, (_, changes, *_) in VARIANTS.items() if name in args.variants}
    check_spec_fits(spec)
    check_spec_fits(prefill_spec)
    ceilings = measure_ceilings()
    print(f"ceilings: copy {ceilings.copy_bytes_per_s / 1e12:.3f} TB/s ({ceilings.copy_by_method}), "
          f"matmul {ceilings.matmul_flops_per_s / 1e12:.1f} TFLOP/s on {ceilings.device}", flush=True)
    results = []
    partial = BenchReport(spec=spec, ceilings=ceilings, results=results, meta=run_metadata())
    variants = {name: BenchReport(spec=v, ceilings=ceilings, results=[], meta=partial.meta)
                for name, v in variant_specs.items()}

    def save(m=None, into=None):
        if m is not None:
            (results if into is None else variants[into].results).append(m)
            tag = "" if into is None else f" ({into})"
            print(f"  {m.phase} B={m.batch} n={m.length}{tag}: {m.ms:.3f} ms, MBU {m.mbu:.3f}, MFU {m.mfu:.3f}", flush=True)
        doc = to_json(partial)
        doc.update({name: to_json(r) for name, r in variants.items() if r.results})
        (out / "bench.json").write_text(json.dumps(doc, indent=1, default=str))

    for s in (prefill_spec, spec):
        run_bench(s, ceilings=ceilings, progress=not args.no_progress, on_result=save)
    for name, v in variant_specs.items():
        with switched_modules(VARIANTS[name][2] if len(VARIANTS[name]) > 2 else {}):
            run_bench(v, ceilings=ceilings, progress=not args.no_progress, on_result=lambda m, name=name: save(m, into=name))
    for m in results:
        hlo = m.extras.get("breakdown", {}).pop("hlo_text", None)
        if hlo and m.phase == "decode" and m.batch == 1:
            (out / "decode_b1_hlo.txt").write_text(hlo)
    for r in variants.values():
        for m in r.results:
            m.extras.get("breakdown", {}).pop("hlo_text", None)
    save()
    roofline_png(partial, out / "roofline.png")
    table = markdown(partial)
    for name, r in variants.items():
        if r.results:
            table += f"\n\n{VARIANTS[name][0]}:\n\n" + markdown(r)
    (out / "summary.md").write_text(table + "\n")
    keys = ("phase", "batch", "length", "ms", "tokens_per_s", "mbu", "mfu", "measured_over_predicted")
    summary["bench"] = [{k: m.as_dict()[k] for k in keys} for m in results]
    for name, r in variants.items():
        summary[name] = [{k: m.as_dict()[k] for k in keys} for m in r.results]
    summary["ceilings"] = {"copy_tb_s": ceilings.copy_bytes_per_s / 1e12, "copy_method": ceilings.copy_method,
                           "matmul_tflop_s": ceilings.matmul_flops_per_s / 1e12, "device": ceilings.device}
    return partial, variants, table


def print_breakdowns(report, label="", top: int | None = 14):
    """Each profiled case's ops by device time per step, the `top` largest (None: all)."""
    for m in report.results:
        bd = m.extras.get("breakdown")
        if not bd or not bd.get("ops"):
            continue
        per = bd.get("steps_per_call", 1)
        print(f"\n{label}{m.phase} B={m.batch}: device busy {bd['device_us_per_call'] / per:.0f} us/step of "
              f"{m.seconds * 1e6:.0f} us/step measured")
        for r in bd["ops"][:top]:
            print(f"  {r['us_per_call'] / per:9.1f} us {r['fraction']:6.1%} x{r['launches_per_call'] / per:5.1f} "
                  f"{r['hlo_op'][:34]:34s} {r['op_name'][-70:]}")


def run_kernels(out: Path) -> dict:
    try:
        from benchmarks.kernel_bench import run_kernel_benchmarks
    except Exception as e:  # noqa: BLE001 - absent or broken: recorded, never fatal
        return {"ran": False, "error": f"import: {type(e).__name__}: {e}"}
    try:
        rows = run_kernel_benchmarks(str(out))
        return {"ran": True, "rows": len(rows)}
    except Exception as e:  # noqa: BLE001
        return {"ran": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for pytest.log, bench.json, roofline.png, summary.md")
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--impl", default="auto", help="attention impl of the standard set (auto: the library's default)")
    p.add_argument("--weight-layout", default=DEFAULT_LAYOUT, choices=LAYOUTS, help="weight order of the standard set")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--gpu-hour-price", type=float, default=None)
    p.add_argument("--profile-batch", type=int, nargs="*", default=[1, 128], help="decode batches traced per op")
    p.add_argument("--gemv-partials", type=int, default=None,
                   help="override jaxinfer.ops.GEMV_PARTIALS (split-K target of one-row products) for this run")
    p.add_argument("--variant-batch", type=int, nargs="+", default=[1], help="decode batches of the variants")
    p.add_argument("--variant-profile", action="store_true", help="trace every variant op by op")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="variants timed after the standard set (none: pass the flag alone)")
    p.add_argument("--tests-timeout", type=int, default=360,
                   help="seconds for the GPU tests (H200: test_pallas_kernels.py takes 259 s beside three other "
                        "files, and test_bench.py runs alone after them: 290 s was not enough in S10-6)")
    p.add_argument("--tests", nargs="+", default=["tests"], help="test paths for `pytest -m gpu`")
    p.add_argument("--test-jobs", type=int, default=4, help="test files run at once on the GPU")
    p.add_argument("--tests-platform", default="cuda", help=argparse.SUPPRESS)  # cpu: a dry run of the runner
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary: dict = {}
    if not args.skip_tests:
        summary["tests"] = run_gpu_tests(out, args.tests_timeout, args.tests, args.test_jobs, args.tests_platform)
        print(f"gpu tests: {summary['tests']}", flush=True)

    if args.gemv_partials is not None:
        from jaxinfer import ops

        ops.GEMV_PARTIALS = args.gemv_partials
        summary["gemv_partials"] = args.gemv_partials
    report, variants, table = None, {}, ""
    try:
        report, variants, table = run_benchmarks(args, out, summary)
    except Exception as e:  # noqa: BLE001 - still print what we have and the JSON line
        summary["bench_error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    if not args.skip_kernels:
        summary["kernels"] = run_kernels(out)
    summary["seconds"] = round(time.time() - t0, 1)
    if report is not None:
        summary["meta"] = report.meta
        print_breakdowns(report)
        for name, r in variants.items():
            print_breakdowns(r, f"{name}, ")
    print("\n" + table)
    print(json.dumps(summary, default=str))
    tests_ok = summary.get("tests", {}).get("exit_code", 0) in (0, 5)  # 5: no GPU tests collected
    return 0 if tests_ok and "bench_error" not in summary else 1


if __name__ == "__main__":
    sys.exit(main())
