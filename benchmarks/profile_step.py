"""Every op of one decode step, traced: `llama-3-8b` bf16 (the command line's default layout) at batch 1.

    PYTHONPATH=. python3 benchmarks/profile_step.py --out $OUT [--quant int8] [--batch 1] [--layout stored]

Prints each HLO op's device time and launches per step (all ops, not the top 25 of `jaxinfer bench`),
sorted by time (`gpu_suite.print_breakdowns`), and writes <out>/profile_step.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_suite import print_breakdowns  # noqa: E402
from jaxinfer.bench import runner  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.weight_layout import DEFAULT_LAYOUT, LAYOUTS  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--quant", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--layout", default=DEFAULT_LAYOUT, choices=LAYOUTS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner.PROFILE_TOP = 1000
    spec = runner.BenchSpec(config=ModelConfig.from_preset(args.preset), name=args.preset, quant=args.quant,
                            impl="auto", weight_layout=args.layout, batches=(args.batch,), contexts=(args.context,),
                            phases=("decode",), profile_batches=(args.batch,), samples=3)
    report = runner.run_bench(spec, progress=False)
    m = report.results[0]
    prof = m.extras["breakdown"]
    prof.pop("hlo_text", None)
    print_breakdowns(report, top=None)
    (out / "profile_step.json").write_text(json.dumps({"ms": m.ms, "profile": prof}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
