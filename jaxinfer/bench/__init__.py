"""Measuring against the hardware: analytic costs, same-process ceilings, timing, reports.

`run_bench(BenchSpec(...))` returns a `BenchReport`; `report.markdown`, `report.write_json` and
`report.roofline_png` present it; `command.register` adds `jaxinfer bench` to the CLI. Nothing here
is imported by the model code.
"""

from .ceilings import DATASHEET, Ceilings, measure_ceilings
from .costs import StepCost, decode_cost, prefill_cost
from .measure import Timing, switched, switched_modules, time_calls
from .runner import BenchReport, BenchSpec, Measurement, run_bench

__all__ = [
    "DATASHEET",
    "BenchReport",
    "BenchSpec",
    "Ceilings",
    "Measurement",
    "StepCost",
    "Timing",
    "decode_cost",
    "measure_ceilings",
    "prefill_cost",
    "run_bench",
    "switched",
    "switched_modules",
    "time_calls",
]
