"""Presenting a `BenchReport`: a markdown table for the terminal, a JSON file and a roofline PNG.

The roofline plots arithmetic intensity (FLOP per byte moved) against achieved FLOP/s, one point per
measured case, under the two roofs measured in the same process: copy bandwidth and matmul rate.
Knows nothing of how the numbers were measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .runner import BenchReport


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def markdown(report: BenchReport) -> str:
    """Header lines (card, ceilings) and one table row per case."""
    c, m, s = report.ceilings, report.meta, report.spec
    lines = [
        f"**{s.name}** {s.dtype}{' ' + s.quant if s.quant else ''}, attention `{s.impl}`"
        f"{'' if s.weight_layout == 'stored' else f', weights `{s.weight_layout}`'} on {m['device']} "
        f"(jax {m['jax']}, commit {m.get('commit') or '?'}, {m['date']})",
        f"ceilings measured in this run: copy {c.copy_bytes_per_s / 1e12:.3f} TB/s ({c.copy_method}), "
        f"bf16 matmul {c.matmul_flops_per_s / 1e12:.1f} TFLOP/s ({c.matmul_n}^3)",
        "",
        "| phase | batch | length | ms | predicted ms | meas/pred | tokens/s | TFLOP/s | GB/s | MFU | MBU | $/Mtok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report.results:
        lines.append(
            f"| {r.phase} | {r.batch} | {r.length} | {r.ms:.3f} | {r.predicted_seconds * 1e3:.3f} "
            f"| {r.seconds / r.predicted_seconds:.2f} | {r.tokens_per_s:.1f} | {r.flops_per_s / 1e12:.2f} "
            f"| {r.bytes_per_s / 1e9:.1f} | {r.mfu:.3f} | {r.mbu:.3f} | {_fmt(r.usd_per_mtok, '.3f')} |"
        )
    lines.append("")
    lines.append("length = prompt tokens (prefill) or cached context (decode); decode ms are per token step; "
                 "MBU = (weights + valid KV read) / time / copy bandwidth; MFU = FLOPs / time / matmul rate.")
    return "\n".join(lines)


def to_json(report: BenchReport, keep_hlo: bool = False) -> dict:
    """The report as plain JSON data; compiled HLO texts are dropped unless `keep_hlo`."""
    d = report.as_dict()
    if not keep_hlo:
        for r in d["results"]:
            if "breakdown" in r:
                r["breakdown"] = {k: v for k, v in r["breakdown"].items() if k != "hlo_text"}
    return d


def write_json(report: BenchReport, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(report), indent=1, default=_json_default))
    return path


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def roofline_png(report: BenchReport, path) -> Path:
    """Arithmetic intensity vs achieved FLOP/s with the measured bandwidth and compute roofs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = report.ceilings
    pts = [(r.cost.intensity, r.flops_per_s, r) for r in report.results]
    xs = [p[0] for p in pts] or [1.0]
    lo, hi = min(min(xs), c.ridge_intensity) / 4, max(max(xs), c.ridge_intensity) * 4
    grid = np.geomspace(lo, hi, 200)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    ax.plot(grid, np.minimum(c.matmul_flops_per_s, c.copy_bytes_per_s * grid), "k-", lw=2,
            label=f"roof: {c.copy_bytes_per_s / 1e12:.3g} TB/s copy, {c.matmul_flops_per_s / 1e12:.3g} TFLOP/s matmul")
    markers = {"prefill": "s", "decode": "o", "decode_fused": "^"}
    for phase, marker in markers.items():
        sel = [p for p in pts if p[2].phase == phase]
        if sel:
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=marker, s=50, label=phase, zorder=3)
        for x, y, r in sel:
            ax.annotate(f"B{r.batch} n{r.length}", (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(f"{report.spec.name} {report.spec.dtype} on {report.meta['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
