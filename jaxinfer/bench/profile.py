"""Where device time goes: a jax.profiler trace of a few calls, summed per XLA op, named from the HLO.

`kernel_breakdown(call, hlo_text)` traces `call()` a few times, reads the trace back in-process with
`jax.profiler.ProfileData` (no TensorBoard needed) and returns the device time per HLO op per call, with
the JAX-level op name taken from the compiled HLO's metadata, largest first. Knows nothing of models.
"""

from __future__ import annotations

import collections
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name=\"([^\"]+)\"", re.M)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op_name in its metadata (what the user's code called)."""
    return {m.group(1): m.group(2) for m in _INSTR.finditer(hlo_text)}


def kernel_breakdown(call: Callable[[], Any], hlo_text: str = "", calls: int = 3, top: int = 25,
                     before: Callable[[], None] | None = None, device: str = "/device:GPU") -> dict:
    """Device time per HLO op for one `call()`, from a profiler trace of `calls` calls.

    `before` runs once, untimed, before the warm-up call (e.g. to rewind a cache). `device`: the trace
    planes counted (a prefix: "/device:GPU:0" for one GPU of a multi-GPU run; the default sums them all).
    Returns {"device_us_per_call", "ops": [{"hlo_op", "op_name", "kernels", "launches_per_call",
    "us_per_call", "fraction"}...]} with the `top` largest ops and an "other" row for the rest.
    """
    if before is not None:
        before()
    jax.block_until_ready(call())
    names = hlo_op_names(hlo_text)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            for _ in range(calls):
                jax.block_until_ready(call())
        finally:
            jax.profiler.stop_trace()
        paths = list(Path(tmp).rglob("*.xplane.pb"))
        if not paths:
            return {"device_us_per_call": None, "ops": [], "error": "no trace written"}
        data = jax.profiler.ProfileData.from_file(str(paths[0]))
        ns = collections.Counter()
        launches = collections.Counter()
        kernels: dict[str, set] = collections.defaultdict(set)
        for plane in data.planes:
            if not plane.name.startswith(device):
                continue
            for line in plane.lines:
                if not line.name.startswith("Stream"):
                    continue
                for ev in line.events:
                    stats = dict(ev.stats)
                    op = str(stats.get("hlo_op") or ev.name)
                    if op.startswith("command_buffer"):  # a CUDA graph: name its kernels instead
                        op = ev.name
                    ns[op] += ev.duration_ns
                    launches[op] += 1
                    kernels[op].add(ev.name)
    total = sum(ns.values())
    rows = []
    for op, t in ns.most_common():
        # Kernels are named like their fusion with the last "." as "_" (gemm_fusion_dot_14 = gemm_fusion_dot.14).
        op_name = names.get(op) or names.get(re.sub(r"_(\d+)$", r".\1", op), "")
        rows.append({
            "hlo_op": op, "op_name": op_name, "kernels": sorted(kernels[op])[:3],
            "launches_per_call": launches[op] / calls, "us_per_call": t / calls / 1e3,
            "fraction": t / total if total else 0.0,
        })
    if len(rows) > top:
        rest = rows[top:]
        rows = rows[:top] + [{
            "hlo_op": f"other ({len(rest)} ops)", "op_name": "", "kernels": [],
            "launches_per_call": sum(r["launches_per_call"] for r in rest),
            "us_per_call": sum(r["us_per_call"] for r in rest), "fraction": sum(r["fraction"] for r in rest),
        }]
    return {"device_us_per_call": total / calls / 1e3, "ops": rows}
