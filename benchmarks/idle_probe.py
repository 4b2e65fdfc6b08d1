"""Probe: where the batched decode step's device sits idle, by the kernel pair around each gap.

Question (session 28): decode steps whose products run on Mosaic GPU kernels (`fragment_matmul`, `int8_matmul`)
measure 100-130 us a step more wall time than device time at batch 16, the Triton paths ~20. Which launches
do the gaps sit before? Each case traces `--steps` per-step decode calls (`jaxinfer.bench`'s loop) and reports
`bench.profile.idle_report` with the Mosaic kernels marked.

    PYTHONPATH=. python benchmarks/idle_probe.py --out DIR [--batch 16] [--cases bf16 int4_fragments int8]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from jaxinfer.bench import runner  # noqa: E402
from jaxinfer.bench.profile import device_events, idle_report  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402

CASES = {"bf16": (None, "contract-last"), "int4_fragments": ("int4", "fragments"), "int8": ("int8", "contract-last")}


def decode_case(name: str, batch: int, context: int, steps: int):
    """(call, rewind) of `llama-3-8b`'s per-step decode call (`jaxinfer.bench`'s loop) for case `name`."""
    quant, layout = CASES[name]
    spec = runner.BenchSpec(config=ModelConfig.from_preset("llama-3-8b"), impl="auto", batches=(batch,),
                            contexts=(context,), phases=("decode",), quant=quant, weight_layout=layout, steps=steps)
    params = runner.build_params(spec.config, spec.jnp_dtype, quant=quant, layout=layout)
    call, rewind, _, _, _ = runner._decode_call(params, spec, batch, context)
    return call, rewind


def probe_parser(default_cases) -> argparse.ArgumentParser:
    """The decode probes' common options: --out, --batch, --context, --steps, --cases."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cases", nargs="+", default=list(default_cases), choices=list(CASES))
    return p


def start_log(args) -> tuple[Path, dict]:
    """The output folder (made) and the log's head: the device and jax version, no cases yet."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "cases": {}}


def main(argv=None):
    args = probe_parser(CASES).parse_args(argv)
    out, log = start_log(args)
    for name in args.cases:
        call, rewind = decode_case(name, args.batch, args.context, args.steps)
        planes = device_events(call, calls=args.steps, before=rewind) or {}
        events = max(planes.values(), key=len) if planes else []
        report = idle_report(events, lambda ev: "mosaic" in ev.name, top=12)
        per_step = {k: v / args.steps for k, v in report.items() if k.endswith("_us")}
        log["cases"][name] = dict(report=report, per_step_us=per_step)
        print(f"{name}: per step {json.dumps({k: round(v, 1) for k, v in per_step.items()})}", flush=True)
        for row in report.get("largest_gaps_by_pair", []):
            print(f"   {row['idle_us'] / args.steps:7.2f} us/step  {row['prev'][:50]} -> {row['next'][:50]}", flush=True)
        del call
    (out / "idle_probe.json").write_text(json.dumps(log, indent=1, default=str))


if __name__ == "__main__":
    main()
