"""Probe: what the host does for each batched decode step, by traced host event (session 29).

Question: decode steps on Mosaic GPU products idle 85-100 us a step in per-step calls and ~290 us in the on-device
loop where bf16 idles under 50 (S29-1), and unrolling the layer scan made it worse: is the host, not the device,
setting the pace? Each case traces `--steps` per-step decode calls (`jaxinfer.bench`'s loop) and sums the host
threads' trace events by name (count and total time a step, nested events counted in each of their parents), beside
the device's busy time a step.

    PYTHONPATH=. python benchmarks/host_probe.py --out DIR [--batch 16] [--cases bf16 int4_fragments]
"""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from benchmarks.idle_probe import decode_case, probe_parser, start_log  # noqa: E402
from jaxinfer.bench.profile import traced  # noqa: E402


def traced_events(call, calls: int, before):
    """{plane name: [(line name, event name, start ns, end ns)]} of `calls` traced calls after a warm-up."""
    data = traced(call, calls, before)
    return {plane.name: [(line.name, ev.name, int(ev.start_ns), int(ev.end_ns))
                         for line in plane.lines for ev in line.events] for plane in data.planes}


def summarize(planes: dict, steps: int, top: int) -> dict:
    host = collections.defaultdict(lambda: [0, 0.0])
    busy = 0.0
    for name, events in planes.items():
        if name.startswith("/host"):
            for _, ev, start, end in events:
                host[ev][0] += 1
                host[ev][1] += (end - start) / 1e3
        elif name.startswith("/device:GPU"):
            busy += sum((end - start) / 1e3 for line, _, start, end in events if line.startswith("Stream"))
    rows = sorted(host.items(), key=lambda kv: -kv[1][1])[:top]
    return {"device_busy_us_per_step": busy / steps,
            "host": [{"event": k, "count_per_step": c / steps, "us_per_step": t / steps} for k, (c, t) in rows]}


def main(argv=None):
    p = probe_parser(["bf16", "int4_fragments"])
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    out, log = start_log(args)
    for name in args.cases:
        call, rewind = decode_case(name, args.batch, args.context, args.steps)
        summary = summarize(traced_events(call, args.steps, rewind), args.steps, args.top)
        log["cases"][name] = summary
        print(f"{name}: device busy {summary['device_busy_us_per_step']:.0f} us a step; host events a step:",
              flush=True)
        for row in summary["host"]:
            print(f"  {row['us_per_step']:9.1f} us x{row['count_per_step']:7.1f}  {row['event'][:100]}", flush=True)
        del call
    (out / "host_probe.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
