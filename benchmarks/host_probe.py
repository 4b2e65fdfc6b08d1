"""Probe: what the host does for each batched decode step, by traced host event (session 29).

Question: decode steps on Mosaic GPU products idle 85-100 us a step in per-step calls and ~290 us in the on-device
loop where bf16 idles under 50 (S29-1), and unrolling the layer scan made it worse: is the host, not the device,
setting the pace? Each case traces `--steps` per-step decode calls (`jaxinfer.bench`'s loop) and sums the host
threads' trace events by name (count and total time a step, nested events counted in each of their parents), beside
the device's busy time a step.

    PYTHONPATH=. python benchmarks/host_probe.py --out DIR [--batch 16] [--cases bf16 int4_fragments]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from benchmarks.idle_probe import CASES  # noqa: E402
from jaxinfer.bench import runner  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402


def traced_events(call, calls: int, before):
    """{plane name: [(line name, event name, start ns, end ns)]} of `calls` traced calls after a warm-up."""
    before()
    jax.block_until_ready(call())
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            for _ in range(calls):
                jax.block_until_ready(call())
        finally:
            jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(str(next(Path(tmp).rglob("*.xplane.pb"))))
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
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--cases", nargs="+", default=["bf16", "int4_fragments"], choices=list(CASES))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "cases": {}}
    for name in args.cases:
        quant, layout = CASES[name]
        spec = runner.BenchSpec(config=ModelConfig.from_preset("llama-3-8b"), impl="auto", batches=(args.batch,),
                                contexts=(args.context,), phases=("decode",), quant=quant, weight_layout=layout,
                                steps=args.steps)
        params = runner.build_params(spec.config, spec.jnp_dtype, quant=quant, layout=layout)
        call, rewind, _, _, _ = runner._decode_call(params, spec, args.batch, args.context)
        summary = summarize(traced_events(call, args.steps, rewind), args.steps, args.top)
        log["cases"][name] = summary
        print(f"{name}: device busy {summary['device_busy_us_per_step']:.0f} us a step; host events a step:",
              flush=True)
        for row in summary["host"]:
            print(f"  {row['us_per_step']:9.1f} us x{row['count_per_step']:7.1f}  {row['event'][:100]}", flush=True)
        del params, call
    (out / "host_probe.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
