"""Does XLA launch Pallas (Triton) kernels with programmatic dependent launch (PDL), and can a kernel use it better?

On Hopper a kernel launched with programmatic stream serialization may start while the kernel before it in
the stream drains; its `griddepcontrol.wait` holds it until that kernel's writes are visible. A batch-1
decode step is ~350 short, latency-bound launches. XLA inserts the wait and sets the launch attribute itself
(`--xla_gpu_enable_pdl`, on by default in jax 0.11).

    PYTHONPATH=. python3 benchmarks/pdl_probe.py --out $OUT

For jax's default and for `--xla_gpu_enable_pdl=false` (one child process each, since XLA reads its flags once):
the wall time per launch of a chain of dependent tiny launches (Pallas kernels; XLA fusions), and per step of a
chain of 32 dependent row products (`row_chain_step`) in four forms: plain, an early trigger of the next launch,
the weight rows loaded before an explicit wait, the explicit wait alone, timed interleaved, with their outputs
compared bit for bit. Also where XLA's dumps mention `griddepcontrol` or PDL (on jax 0.11.2 only the inline
assembly's own text: XLA dumps no PTX). Results: benchmarks/BENCHMARKS.md, session 22.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHAIN = 256  # dependent launches per call
SETTINGS = ("default", "false")
ROW_LAYERS, ROW_N, ROW_K, ROW_BLOCK = 32, 4096, 4096, 4  # the row-product chain: llama-3-8b's o product shape
MODES = ("plain", "trigger", "early", "early_no_trigger")


def _asm_scalar(v, op: str):
    """`op` (a PTX instruction without operands) as inline assembly that passes the int32 scalar `v` through:
    whatever reads the result waits for the instruction."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas import triton as pltriton

    v = jnp.zeros((1,), jnp.int32) + v
    [t] = pltriton.elementwise_inline_asm(f"{op}\nmov.b32 $0, $1;", args=[v], constraints="=r,r", pack=1,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, v.dtype)])
    return jnp.sum(t)


def row_chain_step(w, x, layer: int, mode: str):
    """x + 1e-3 * (w[layer] @ x) for a [L, N, K] bf16 stack, N == K, one program per ROW_BLOCK rows. Modes: `plain`;
    `trigger`: `griddepcontrol.launch_dependents` first (the next launch may start while this one drains);
    `early`: that, and this program's weight rows loaded before an explicit `griddepcontrol.wait`, x after it;
    `early_no_trigger`: the explicit wait alone."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    def kernel(w_ref, x_ref, o_ref):
        j = pl.program_id(0)
        row0 = pl.multiple_of(j * ROW_BLOCK, ROW_BLOCK)
        zero = j * 0
        if mode in ("trigger", "early"):
            zero = _asm_scalar(zero, "griddepcontrol.launch_dependents;")
        wt = w_ref[layer, pl.ds(row0, ROW_BLOCK), :].astype(jnp.float32)
        if mode in ("early", "early_no_trigger"):
            zero = _asm_scalar(zero, "griddepcontrol.wait;")
        zero = pl.multiple_of(zero, 16)  # the asm's result is 0: keep x's loads vectorised
        xs = x_ref[pl.ds(zero, x_ref.shape[0])].astype(jnp.float32)
        y = jnp.sum(wt * xs[None, :], axis=1)
        xr = x_ref[pl.ds(zero + row0, ROW_BLOCK)].astype(jnp.float32)
        o_ref[pl.ds(row0, ROW_BLOCK)] = (xr + y * 1e-3).astype(o_ref.dtype)

    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(w.shape[1] // ROW_BLOCK,),
                          in_specs=[any_spec, any_spec], out_specs=any_spec,
                          compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
                          name=f"row_chain_{mode}")(w, x)


def _timed(f, *args, calls: int = 20) -> float:
    """Median seconds of one synchronised call of `f(*args)` over `calls` samples, after one warm-up call."""
    from jaxinfer.bench import time_calls

    return time_calls(lambda: f(*args), calls=1, samples=calls, warmup=1).median


def child(setting: str, dump: str) -> dict:
    flags = [f"--xla_dump_to={dump}", "--xla_dump_hlo_module_re=.*chain.*", "--xla_dump_hlo_as_text"]
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
        out[name + "_us_per_launch"] = round(_timed(jax.jit(fn), x) / CHAIN * 1e6, 3)

    w = jax.random.normal(jax.random.key(0), (ROW_LAYERS, ROW_N, ROW_K), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (ROW_K,), jnp.bfloat16)
    results, fns, times = {}, {}, {mode: [] for mode in MODES}
    for mode in MODES:
        def chain(w, x, mode=mode):
            for i in range(ROW_LAYERS):
                x = row_chain_step(w, x, i, mode)
            return x
        fns[mode] = jax.jit(chain)
        results[mode] = jax.block_until_ready(fns[mode](w, x))
    for _ in range(6):  # the modes interleaved, so that drift between them does not read as a difference
        for mode in MODES:
            times[mode].append(_timed(fns[mode], w, x, calls=5))
    for mode in MODES:
        out[f"row_{mode}_us_per_step"] = round(sorted(times[mode])[len(times[mode]) // 2] / ROW_LAYERS * 1e6, 3)
    out["row_gb_per_step"] = ROW_N * ROW_K * 2 / 1e9
    out["row_same_as_plain"] = {m: bool(jnp.array_equal(results[m], results["plain"])) for m in MODES}

    def reference(w, x):  # the same rounding, in XLA
        for i in range(ROW_LAYERS):
            y = jnp.einsum("nk,k->n", w[i].astype(jnp.float32), x.astype(jnp.float32))
            x = (x.astype(jnp.float32) + y * 1e-3).astype(x.dtype)
        return x
    ref = jax.jit(reference)(w, x).astype(jnp.float32)
    out["row_plain_max_err_vs_xla"] = float(jnp.max(jnp.abs(results["plain"].astype(jnp.float32) - ref)))
    hits = {}
    for p in Path(dump).rglob("*"):
        if p.is_file():
            text = p.read_text(errors="replace")
            n = text.count("griddepcontrol")
            if n:
                hits[p.name] = n
    out["dump_griddepcontrol"] = hits
    pdl_lines = []
    for p in Path(dump).rglob("*thunk_sequence*.txt"):
        pdl_lines += [ln.strip()[:200] for ln in p.read_text(errors="replace").splitlines() if "pdl" in ln.lower()][:4]
    out["thunk_pdl_lines"] = pdl_lines[:12]
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
