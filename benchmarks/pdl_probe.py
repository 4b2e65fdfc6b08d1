"""Does XLA launch Pallas (Triton) kernels with programmatic dependent launch (PDL), and what is a launch worth?

On Hopper a kernel launched with programmatic stream serialization may start while the kernel before it in
the stream drains; its `griddepcontrol.wait` holds it until that kernel's writes are visible. A batch-1
decode step is ~350 short, latency-bound launches, so the overlap of one kernel's tail with the next one's
start is what PDL could buy. XLA inserts the wait and sets the launch attribute itself
(`--xla_gpu_enable_pdl`); whether its Triton path does so for Pallas calls is what this measures.

    PYTHONPATH=. python3 benchmarks/pdl_probe.py --out $OUT

For each setting of the flag (jax's default, true, false; one child process each, since XLA reads its flags
once): jax / jaxlib versions, whether the compiled PTX of a Pallas kernel and of an XLA fusion holds
`griddepcontrol` instructions, and the wall time per launch of a chain of dependent tiny launches (Pallas
kernels; XLA fusions), median of several calls.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHAIN = 256  # dependent launches per call
SETTINGS = ("default", "true", "false")


def child(setting: str, dump: str) -> dict:
    flags = [f"--xla_dump_to={dump}", "--xla_dump_hlo_module_re=.*chain.*"]
    if setting != "default":
        flags.append(f"--xla_gpu_enable_pdl={setting}")
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", "")] + flags))
    import jax
    import jax.numpy as jnp
    import jaxlib
    from jax.experimental import pallas as pl

    def bump_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 1.0001 + 1.0

    def bump(x):
        spec = pl.BlockSpec((128,), lambda i: (i,))
        return pl.pallas_call(bump_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(x.shape[0] // 128,),
                              in_specs=[spec], out_specs=spec)(x)

    def pallas_chain(x):
        for _ in range(CHAIN):
            x = bump(x)
        return x

    def xla_chain(x):
        for i in range(CHAIN):  # a reduction between elementwise steps keeps each step a fusion of its own
            x = jnp.sin(x) + jnp.sum(x) * 1e-9 + i
        return x

    x = jnp.arange(128 * 132, dtype=jnp.float32) / 1e4
    out = {"setting": setting, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "device": jax.devices()[0].device_kind}
    for name, fn in (("pallas_chain", pallas_chain), ("xla_chain", xla_chain)):
        f = jax.jit(fn)
        jax.block_until_ready(f(x))
        times = []
        for _ in range(20):
            t = time.perf_counter()
            jax.block_until_ready(f(x))
            times.append(time.perf_counter() - t)
        times.sort()
        out[name + "_us_per_launch"] = round(times[len(times) // 2] / CHAIN * 1e6, 3)
        out[name + "_us_per_launch_best"] = round(times[0] / CHAIN * 1e6, 3)
    ptx = {}
    for p in Path(dump).rglob("*.ptx"):
        text = p.read_text(errors="replace")
        ptx[p.name] = {"griddepcontrol.wait": text.count("griddepcontrol.wait"),
                       "griddepcontrol.launch_dependents": text.count("griddepcontrol.launch_dependents"),
                       "entries": text.count(".entry")}
    out["ptx"] = ptx
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="folder for pdl_probe.json")
    ap.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.dump)), flush=True)
        return 0
    results = []
    for setting in SETTINGS:
        with tempfile.TemporaryDirectory() as dump:
            proc = subprocess.run([sys.executable, __file__, "--child", setting, "--dump", dump],
                                  capture_output=True, text=True, timeout=300)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        result = json.loads(line[0][7:]) if line else {"setting": setting, "error": proc.stderr[-3000:]}
        results.append(result)
        print(json.dumps(result, indent=1), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "pdl_probe.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
