"""The `jaxinfer bench` subcommand: argument parsing, the memory check, and writing the three reports.

`register(subparsers)` adds `bench` to an argparse subparsers object; `run(args)` does the work and
returns the `BenchReport`. `main(argv)` runs it standalone (`python -m jaxinfer.bench`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..attention import IMPLS
from ..cache import KV_CACHE_NAMES
from ..config import ModelConfig, list_presets
from ..memory import check_fits
from ..weight_layout import DEFAULT_LAYOUT, LAYOUTS
from .report import markdown, roofline_png, write_json
from .runner import DTYPES, PHASES, BenchSpec, run_bench


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--preset", default="tiny", help=f"model preset in configs/ ({', '.join(list_presets())})")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="parameter and cache dtype")
    p.add_argument("--quant", default=None, help="quantization recipe (needs jaxinfer.quant)")
    p.add_argument("--impl", default="auto", choices=IMPLS,
                   help="attention implementation (default auto: what prefill, decode_step and generate use)")
    p.add_argument("--weight-layout", default=DEFAULT_LAYOUT, choices=LAYOUTS,
                   help=f"contract-last: matrices stored contraction-last (`contract_last`): XLA's row reduction "
                        f"for one row, the weight kernel's transposed tiles for more (default {DEFAULT_LAYOUT}, as "
                        f"`generate` loads float weights)")
    p.add_argument("--kv-cache", default=None, choices=sorted(KV_CACHE_NAMES), help="quantized KV cache for decode")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (a sweep)")
    p.add_argument("--prompt-len", type=int, nargs="+", default=[128], help="prefill prompt lengths")
    p.add_argument("--context", type=int, nargs="+", default=[128], help="decode context lengths")
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed sample")
    p.add_argument("--samples", type=int, default=5, help="timed samples per case (the median is reported)")
    p.add_argument("--gpu-hour-price", type=float, default=None, help="USD per GPU-hour, for $/Mtok")
    p.add_argument("--profile-batch", type=int, nargs="*", default=[], help="decode batches to trace per op")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results", help="folder for bench.json and roofline.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` subcommand; `args.handler` (and `args.func`) is `run`."""
    p = subparsers.add_parser("bench", help="measure prefill/decode against this device's measured ceilings",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(handler=run, func=run)
    return p


def spec_from_args(args) -> BenchSpec:
    return BenchSpec(
        config=ModelConfig.from_preset(args.preset), name=args.preset, dtype=args.dtype, quant=args.quant,
        impl=args.impl, batches=tuple(args.batch), prompt_lens=tuple(args.prompt_len), contexts=tuple(args.context),
        phases=tuple(args.phases), steps=args.steps, samples=args.samples, gpu_hour_price=args.gpu_hour_price,
        seed=args.seed, profile_batches=tuple(args.profile_batch),
        kv_dtype=KV_CACHE_NAMES.get(getattr(args, "kv_cache", None)),
        weight_layout=getattr(args, "weight_layout", DEFAULT_LAYOUT),
    )


def check_spec_fits(spec: BenchSpec):
    """Refuse before any allocation when the largest case cannot fit: weights + cache + activations."""
    cases = spec.cases()
    batch = max(b for _, b, _ in cases)
    max_len = max(spec.max_len(phase, n) for phase, _, n in cases)
    prefill = max((n for phase, _, n in cases if phase == "prefill"), default=1)
    return check_fits(spec.config, batch, max_len, spec.jnp_dtype, spec.quant, prefill_len=prefill)


def run(args):
    """Run the sweep, print the markdown table, write `<out>/bench.json` and `<out>/roofline.png`."""
    spec = spec_from_args(args)
    check_spec_fits(spec)
    report = run_bench(spec, progress=not args.no_progress)
    out = Path(args.out)
    json_path = write_json(report, out / "bench.json")
    png_path = roofline_png(report, out / "roofline.png")
    print(markdown(report))
    print(f"\nwrote {json_path} and {png_path}")
    return report


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="jaxinfer bench", description=__doc__))
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
