"""Where device time goes: a jax.profiler trace of a few calls, summed per XLA op, named from the HLO.

`kernel_breakdown(call, hlo_text)` traces `call()` a few times, reads the trace back in-process with
`jax.profiler.ProfileData` (no TensorBoard needed) and returns the device time per HLO op per call, with
the JAX-level op name taken from the compiled HLO's metadata, largest first. Knows nothing of models.
"""

from __future__ import annotations

import collections
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name=\"([^\"]+)\"", re.M)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op_name in its metadata (what the user's code called)."""
    return {m.group(1): m.group(2) for m in _INSTR.finditer(hlo_text)}


class Event(NamedTuple):
    """One kernel (or copy) on a device stream: times in the trace's clock, ns."""
    start_ns: int
    end_ns: int
    name: str  # the kernel's name
    op: str  # the HLO op it belongs to (a CUDA graph's kernels: the kernel name)
    stream: str


def traced(call: Callable[[], Any], calls: int = 1, before: Callable[[], None] | None = None):
    """The profiler's data (`jax.profiler.ProfileData`) of `calls` traced calls of `call()` after an untimed
    warm-up call (`before()` first, e.g. to rewind a cache); None when no trace was written."""
    if before is not None:
        before()
    jax.block_until_ready(call())
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            for _ in range(calls):
                jax.block_until_ready(call())
        finally:
            jax.profiler.stop_trace()
        paths = list(Path(tmp).rglob("*.xplane.pb"))
        return jax.profiler.ProfileData.from_file(str(paths[0])) if paths else None


def device_events(call: Callable[[], Any], calls: int = 1, before: Callable[[], None] | None = None,
                  device: str = "/device:GPU") -> dict[str, list[Event]] | None:
    """Every device-stream event of `calls` traced calls of `call()` (after an untimed warm-up call),
    per trace plane whose name starts with `device`, sorted by start; None when no trace was written."""
    data = traced(call, calls, before)
    if data is None:
        return None
    planes: dict[str, list[Event]] = {}
    for plane in data.planes:
        if not plane.name.startswith(device):
            continue
        events = planes.setdefault(plane.name, [])
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                op = str(dict(ev.stats).get("hlo_op") or ev.name)
                if op.startswith("command_buffer"):  # a CUDA graph: name its kernels instead
                    op = ev.name
                events.append(Event(int(ev.start_ns), int(ev.end_ns), ev.name, op, line.name))
        events.sort()
    return planes


def idle_report(events: list[Event], is_marked: Callable[[Event], bool], top: int = 8) -> dict:
    """Where one device's timeline sits idle: its span, the time covered by some event, the gaps between
    them, and for the `is_marked` events (e.g. the all-reduces) their count, time, and the idle gaps right
    before and after each. `top`: the largest total gaps by the (previous, next) kernel pair."""
    if not events:
        return {"events": 0}
    gaps, pairs = [], collections.Counter()
    before_marked, after_marked = [], []
    covered_until, busy = events[0].start_ns, 0
    prev = None
    for ev in events:
        gap = max(0, ev.start_ns - covered_until)
        if prev is not None:
            gaps.append(gap)
            pairs[(prev.op, ev.op)] += gap
            if is_marked(ev):
                before_marked.append(gap)
            if is_marked(prev):
                after_marked.append(gap)
        busy += max(0, ev.end_ns - max(ev.start_ns, covered_until))
        covered_until = max(covered_until, ev.end_ns)
        prev = ev
    marked = [ev for ev in events if is_marked(ev)]
    span = covered_until - events[0].start_ns
    us = lambda v: v / 1e3
    return {
        "events": len(events), "span_us": us(span), "busy_us": us(busy), "idle_us": us(span - busy),
        "gaps_over_2us": sum(g > 2000 for g in gaps), "idle_in_gaps_over_2us": us(sum(g for g in gaps if g > 2000)),
        "marked": len(marked), "marked_us": us(sum(ev.end_ns - ev.start_ns for ev in marked)),
        "idle_before_marked_us": us(sum(before_marked)), "idle_after_marked_us": us(sum(after_marked)),
        "largest_gaps_by_pair": [{"prev": a, "next": b, "idle_us": us(g)} for (a, b), g in pairs.most_common(top)],
    }


def marked_skew(planes: dict[str, list[Event]], is_marked: Callable[[Event], bool]) -> dict:
    """For collectives that every device runs in the same order: pairs the i-th marked event of each plane
    and reports, per plane, how much later than the earliest device it started (median / mean) and the
    median difference of their ends, in us (trace clocks are the host's, so small offsets remain)."""
    marked = {name: [ev for ev in evs if is_marked(ev)] for name, evs in planes.items()}
    n = min((len(v) for v in marked.values()), default=0)
    if n == 0 or len(marked) < 2:
        return {"pairs": n}
    out = {"pairs": n}
    first_start = [min(m[i].start_ns for m in marked.values()) for i in range(n)]
    first_end = [min(m[i].end_ns for m in marked.values()) for i in range(n)]
    for name, evs in marked.items():
        late = [evs[i].start_ns - first_start[i] for i in range(n)]
        end = [evs[i].end_ns - first_end[i] for i in range(n)]
        out[name] = {"start_late_median_us": statistics.median(late) / 1e3, "start_late_mean_us": statistics.fmean(late) / 1e3,
                     "end_late_median_us": statistics.median(end) / 1e3}
    return out


def kernel_breakdown(call: Callable[[], Any], hlo_text: str = "", calls: int = 3, top: int = 25,
                     before: Callable[[], None] | None = None, device: str = "/device:GPU") -> dict:
    """Device time per HLO op for one `call()`, from a profiler trace of `calls` calls.

    `before` runs once, untimed, before the warm-up call (e.g. to rewind a cache). `device`: the trace
    planes counted (a prefix: "/device:GPU:0" for one GPU of a multi-GPU run; the default sums them all).
    Returns {"device_us_per_call", "ops": [{"hlo_op", "op_name", "kernels", "launches_per_call",
    "us_per_call", "fraction"}...]} with the `top` largest ops and an "other" row for the rest.
    """
    names = hlo_op_names(hlo_text)
    ns = collections.Counter()
    launches = collections.Counter()
    kernels: dict[str, set] = collections.defaultdict(set)
    planes = device_events(call, calls=calls, before=before, device=device)
    if planes is None:
        return {"device_us_per_call": None, "ops": [], "error": "no trace written"}
    for events in planes.values():
        for ev in events:
            ns[ev.op] += ev.end_ns - ev.start_ns
            launches[ev.op] += 1
            kernels[ev.op].add(ev.name)
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
