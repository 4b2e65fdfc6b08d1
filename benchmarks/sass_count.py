"""Registers and SASS instructions of a Pallas Triton kernel, counted offline (no GPU).

The call is lowered for CUDA on the CPU (jax 0.10.2: newer jaxlib compiles Triton while lowering, which
needs a GPU), each `pallas_call`'s Triton module is captured from the lowering, compiled for sm_90 with the
`triton` wheel (which ships ptxas, nvdisasm and cuobjdump) and its static SASS counted by opcode. jaxlib's
own Triton on the GPU may differ in detail: count to choose what to time, then time it.

    python benchmarks/sass_count.py [case ...]     # cases: see CASES; default all

Prints per case: registers, shared / local memory, static instructions, instructions per weight code, and the
most frequent opcodes.
"""
from __future__ import annotations

import collections
import functools
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

S = jax.ShapeDtypeStruct


def capture_modules(fn, *args, **kwargs) -> list[str]:
    """The Triton modules (MLIR text) of the pallas_calls in `jax.jit(fn)(*args, **kwargs)` lowered for CUDA."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    captured = []
    original = registration.lowering.lower_jaxpr_to_triton_module

    def grab(*a, **k):
        result = original(*a, **k)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = grab
    try:
        jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original
    return captured


def sass_counts(ttir: str, num_warps: int, num_stages: int = 3) -> dict:
    """Compile a Triton module for sm_90 and count its SASS: {"resources": ..., "instructions": n, "ops": Counter}."""
    import triton
    from triton.backends.compiler import GPUTarget

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                                 "num_stages": num_stages})
        cubin = os.path.join(d, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    return {"resources": dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", usage)),
            "instructions": sum(ops.values()), "ops": ops}


def _row_int4_swiglu(dp4a: bool, block_n=None, prepared=True, preparation=False):
    """The model's int4 gate+up launch (two parts, SwiGLU, the norm; llama-3-8b, groups of 128): the product, or
    (`preparation`) the launch making x's fixed point before it ("codes": the x elements a thread's norm reads)."""
    from jaxinfer.bench import switched
    from pallas_kernels import row_matmul as rm

    L, N, K, g = 2, 14336, 4096, 128
    w = (S((L, N, K // 2), jnp.uint8), S((L, N, K // g), jnp.bfloat16), None)
    fn = functools.partial(rm.row_matmuls, fmt="int4", group_size=g, epilogue="swiglu", interpret=False,
                           block_n=block_n)
    with switched(rm, {"DP4A": dp4a, "DP4A_PREPARED_X": prepared}):
        modules = capture_modules(fn, S((1, K), jnp.bfloat16), (w, w), layer=S((), jnp.int32),
                                  norm_weight=S((L, K), jnp.bfloat16))
    if preparation:
        return modules[0], rm._PREPARE_WARPS, K // (32 * rm._PREPARE_WARPS)
    codes_per_thread = 2 * (block_n or rm._BLOCK_N_DP4A) * K // (4 * 32)
    return modules[-1], rm._WARPS_DP4A if dp4a else rm._WARPS, codes_per_thread


def _probe_int4(block_n=8):
    """`dp4a_probe.py`'s int4 kernel with x's bytes made in the kernel (`2dx`: one part, no norm)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dp4a_probe import dp4a_int4_matmul_2d

    L, N, K, g = 2, 28672, 4096, 128
    fn = functools.partial(dp4a_int4_matmul_2d, layer=1, block_n=block_n, groups_step=K // g)
    modules = capture_modules(fn, None, S((K // g,), jnp.float32), S((), jnp.float32),
                              S((L, N, K // g, g // 32, 4), jnp.int32), S((L, N, K // g), jnp.bfloat16),
                              x=S((K,), jnp.bfloat16))
    return modules[-1], 4, block_n * K // (4 * 32)


def _decode_append(code_dtype=None, **switches):
    """The model's decode attention launch (`decode_attention_append`, llama-3-8b at batch 16 over 1k keys: 32-key
    blocks, 4 stages) on a bf16 cache, or an int8 / fp8 one ("codes": a thread's cache codes a key block)."""
    from jaxinfer.bench import switched
    from pallas_kernels import decode_attention_append
    attention = sys.modules["pallas_kernels.decode_attention"]  # (the package's name is the function)

    L, B, T, K, H = 2, 16, 1152, 8, 128
    cache = S((L, B, T, K, H), code_dtype or jnp.bfloat16)
    kw = {} if code_dtype is None else dict(k_scale=S((L, B, T, K), jnp.float32), v_scale=S((L, B, T, K), jnp.float32))
    fn = functools.partial(decode_attention_append, interpret=False)
    with switched(attention, switches):
        new, trig = S((B, K, H), jnp.bfloat16), S((B, H), jnp.float32)
        modules = capture_modules(fn, S((B, 32, H), jnp.bfloat16), new, new, trig, trig, cache, cache,
                                  layer=S((), jnp.int32), positions=S((B,), jnp.int32), lengths=S((B,), jnp.int32),
                                  **kw)
    return modules[0], attention._DEFAULT_WARPS, 2 * 32 * H // (32 * attention._DEFAULT_WARPS), attention._SHORT_STAGES


CASES = {
    "decode-append-bf16": _decode_append,
    "decode-append-int8": functools.partial(_decode_append, jnp.int8),
    "decode-append-int8-ptx-f16": functools.partial(_decode_append, jnp.int8, CODES_BY_PTX=True,
                                                    QUANT_DOT_DTYPE="float16"),
    "decode-append-int8-words": functools.partial(_decode_append, jnp.int8, VALUE_WORDS="bfloat16"),
    "decode-append-int8-words-f16": functools.partial(_decode_append, jnp.int8, VALUE_WORDS="float16"),
    "row-int4-swiglu-float": functools.partial(_row_int4_swiglu, False),
    "row-int4-swiglu-dp4a": functools.partial(_row_int4_swiglu, True),
    "row-int4-swiglu-dp4a-16rows": functools.partial(_row_int4_swiglu, True, 16),
    "row-int4-swiglu-dp4a-x-in-kernel": functools.partial(_row_int4_swiglu, True, prepared=False),
    "row-int4-swiglu-dp4a-x-in-kernel-16rows": functools.partial(_row_int4_swiglu, True, 16, prepared=False),
    "row-int4-prepare-x-norm": functools.partial(_row_int4_swiglu, True, preparation=True),
    "probe-int4-2dx": _probe_int4,
}


def main(names):
    for name in names or CASES:
        ttir, warps, codes, *stages = CASES[name]()
        c = sass_counts(ttir, warps, *stages)
        top = ", ".join(f"{op} {n}" for op, n in c["ops"].most_common(12))
        print(f"{name}: {c['resources']}, {c['instructions']} instructions, "
              f"{c['instructions'] / codes:.2f} a code ({codes} codes a thread); {top}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
