"""Probe: decode-shaped int8 / int4 products on Hopper's tensor cores through Mosaic GPU, measured against
bf16 (XLA's dot), the Triton weight kernel and the row kernel on `llama-3-8b`'s product shapes.
Not used by the library. Session 14: with Mosaic's own upcast layouts it did not beat the row kernel where the
step spends its time. Session 23: with the int4 codes packed in wgmma's fragment order (`int4f`) it beats the
Triton weight kernel at 16 rows (gate+up 27.8 vs 35.1 us, down 16.8 vs 24.9; benchmarks/BENCHMARKS.md and
pallas_kernels/NOTES.md, those sessions).

    PYTHONPATH=. python3 benchmarks/weight_mgpu_probe.py --out $OUT [--rows 1 16] [--configs step,stages,splits ...]
    (--check-only int8-0-1: one correctness check alone; --ncu: each kernel launched twice, for Nsight Compute;
    session 23's runs: --rows 16 1 --shapes gateup down qkv o --int4-formats int4f --skip-int8 [--int4-offsets]
    --configs 256,3,0,1 512,2,0,1 ...)

The kernel: TMA streams weight tiles (64 rows of W, contraction-last) and x's matching columns into a ring of
shared-memory slots (`plgpu.emit_pipeline`); the warpgroup loads the codes in Mosaic GPU's upcast layouts
(`WGMMA_UPCAST_2X` / `_4X`: whole 32-bit words), moves them into wgmma's layout as integers, widens them to
bfloat16 in registers and issues a wgmma with the codes as the register A operand and x^T (padded to 8 or
16 rows) from shared memory as B: y^T = W x^T. Chunks of a step are widened while the previous chunk's
wgmma runs. Formats (every array with a leading layer axis):
  int8: values int8 [L, N, K], scales [L, 1, N] per row:   w = q * s (the scale applied to the sum, outside)
  int4: values int4 [L, N, K] (signed, natural K order), scales and optional offsets [L, K/g, N]:
        w = q * s (+ m); each group's partial product from a zero accumulator, scaled in float32, the
        offset times x's group sum added (the sums taken once outside).
  int4f: int4 as above, the codes packed in wgmma's A-fragment order (`pack_fragments`): uint32 words
        [L, N/64, K/16, 128], word [b, s, t] holding the eight codes thread t of the warpgroup feeds the k16
        step s of row block b, so a thread widens its own word with no relayout (a shift, one LOP3 and one
        bf16x2 subtract per two codes: `_fragment_operand`).
K may be split over CTAs (float32 partials summed outside).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from benchmarks.weight_kernel import LAYERS, chain_seconds  # noqa: E402
from jaxinfer.bench import measure_ceilings  # noqa: E402
from pallas_kernels import row_matmul as rm  # noqa: E402
from pallas_kernels import weight_matmul as wm  # noqa: E402

FORMATS = ("int8", "int4", "int4f")
BLOCK_N = 64  # weight rows per CTA: one warpgroup, wgmma's M
TARGET_CTAS = 264  # about two per SM of a 132-SM H100 / H200
DEFAULT_STEP = {"int8": 256, "int4": 512, "int4f": 512}  # K elements per pipeline step
CHUNK = 128  # K elements per wgmma chunk of an ungrouped format (grouped: one group)
DEFAULT_STAGES = 4


def _plgpu():
    from jax.experimental.pallas import mosaic_gpu as plgpu  # needs absl-py; only reached on a GPU
    return plgpu


def padded_rows(m: int) -> int:
    """x's rows as wgmma's N: a multiple of 8 (16 from 9 rows up)."""
    return 8 if m <= 8 else -(-m // 16) * 16


def _sums_cols(mp: int) -> int:
    """Columns of the x-sum rows streamed per group: whole 128-byte rows (a TMA destination in the ring must
    stay 128-byte aligned from slot to slot; 32- and 64-byte rows faulted)."""
    return max(mp, 32)


def _swizzle(row_bytes: int) -> int:
    for s in (128, 64, 32):
        if row_bytes % s == 0:
            return s
    raise ValueError(f"a tile row of {row_bytes} bytes takes no swizzle")


def _transforms(plgpu, dtype, cols: int):
    bits = 4 if jnp.dtype(dtype) == jnp.int4 else jnp.dtype(dtype).itemsize * 8
    s = _swizzle(cols * bits // 8)
    return (plgpu.TilingTransform((8, s * 8 // bits)), plgpu.SwizzleTransform(s))


def pack_fragments(q: jax.Array) -> jax.Array:
    """Signed int4 codes [L, N, K] -> uint32 words [L, N/64, K/16, 128] in wgmma's A-fragment order.

    Thread t = 32 w + 4 r + c of a warpgroup holds, for a k16 step, rows 16 w + r (+ 8) at columns 2 c (+ 1) and
    2 c + 8 (+ 1): four bf16 pairs, register (column half j, row half h) the pair p = 2 j + h. Code e of pair p
    sits at bit 16 e + 4 p of the thread's word (two's-complement nibbles), so pair p is (word >> 4 p) masked."""
    L, N, K = q.shape
    n = (q.astype(jnp.int32) & 0xF).astype(jnp.uint32)
    n = n.reshape(L, N // BLOCK_N, 4, 2, 8, K // 16, 2, 4, 2)  # L, b, w, h, r, s, j, c, e
    n = n.transpose(0, 1, 5, 2, 4, 7, 6, 3, 8)  # L, b, s, w, r, c, j, h, e
    j, h, e = jnp.meshgrid(jnp.arange(2), jnp.arange(2), jnp.arange(2), indexing="ij")
    shifts = (16 * e + 4 * (2 * j + h)).astype(jnp.uint32)
    words = jnp.sum(n << shifts, axis=(-3, -2, -1), dtype=jnp.uint32)  # disjoint bits: the sum is an or
    return words.reshape(L, N // BLOCK_N, K // 16, 128)


def _fragment_operand(plgpu, words_smem, width: int):
    """A [64 T, width] bfloat16 wgmma A operand from packed words [T, width / 16, 128] in shared memory."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    tiles, steps = words_smem.shape[0], width // 16
    strided = plgpu.Layout.WG_STRIDED((tiles, steps, 128), vec_size=1)
    words = plgpu.load(words_smem, (), layout=strided)

    @plgpu.inline_mgpu(arg_types=(strided,),
                       return_type=plgpu.ShapeDtypeStruct((BLOCK_N * tiles, width), jnp.bfloat16,
                                                         layout=plgpu.Layout.WGMMA))
    def widen(_, fa):
        i32 = ir.IntegerType.get_signless(32)
        bf16x2 = ir.VectorType.get((2,), ir.BF16Type.get())
        regs = np.empty((tiles, 2 * steps, 1, 1, 2, 1, 1, 1, 1), dtype=object)
        for m, s in itertools.product(range(tiles), range(steps)):
            word = mgpu_utils.bitcast(fa.registers[m * steps + s], i32)
            for j in range(2):
                for h in range(2):
                    p = 2 * j + h
                    shift = f"shr.u32 t, $1, {4 * p};" if p else "mov.b32 t, $1;"
                    # (t & 0x000F000F) ^ 0x43084308: the exponent of 128 and the nibble's sign bit flipped
                    # (128 + q + 8), then 136 subtracted: q, exact.
                    pair = llvm.inline_asm(
                        i32, [word],
                        f"{{ .reg .b32 t, c; {shift} lop3.b32 t, t, 0x000F000F, 0x43084308, 0x6a; "
                        "mov.b32 c, 0x43084308; sub.bf16x2 $0, t, c; }",
                        "=r,r")
                    regs[m, 2 * s + j, 0, 0, h, 0, 0, 0, 0] = mgpu_utils.bitcast(pair, bf16x2)
        return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

    return widen(words)


def plan(m: int, k: int, n: int, fmt: str, group: int | None, tiles: int = 1) -> tuple[int, int] | None:
    """(step, splits) or None when the shape is not taken."""
    if fmt not in FORMATS or n % (BLOCK_N * tiles) or m > 64:
        return None
    if group is not None:
        if fmt == "int8" or k % group or group % 64:
            return None
    elif fmt != "int8":
        return None
    step = DEFAULT_STEP[fmt]
    while k % step or step < (group or 0):
        step //= 2
    if step < max(group or 0, CHUNK):
        return None
    steps = k // step
    splits = 1
    while n // (BLOCK_N * tiles) * splits < TARGET_CTAS and steps % (splits * 2) == 0 and steps // (splits * 2) >= 4:
        splits *= 2
    return step, splits


def _kernel(layer_ref, x_ref, v_ref, s_ref, *refs, step, chunk, steps_per_split, grouped, offsets, stages, mp,
            overlap=False, tiles=1, fold=False):
    plgpu = _plgpu()
    if offsets:
        m_ref, sums_ref, o_ref = refs
    else:
        (o_ref,) = refs
    layer = layer_ref[0]
    j, split = lax.axis_index("n"), lax.axis_index("split")
    cta_rows = BLOCK_N * tiles
    rows = pl.ds(j * cta_rows, cta_rows)
    k0 = split * steps_per_split
    wgmma_layout = plgpu.Layout.WGMMA

    packed = v_ref.dtype == jnp.uint32

    def operand(w_smem):
        """The step's codes as wgmma's bfloat16 A operand: loaded in the layout made for widening them (whole
        32-bit words per thread), moved into wgmma's layout as integers, then widened."""
        if packed:
            return _fragment_operand(plgpu, w_smem, chunk)
        upcast = plgpu.Layout.WGMMA_UPCAST_4X if w_smem.dtype == jnp.int4 else plgpu.Layout.WGMMA_UPCAST_2X
        codes = plgpu.load(w_smem, (), layout=upcast)
        return plgpu.layout_cast(codes, wgmma_layout).astype(jnp.bfloat16)

    n_chunks = step // chunk

    def x_chunk(x_smem, c):  # x^T's rows of chunk c: wgmma's B operand
        return x_smem.at[:, pl.ds(c * chunk, chunk)].transpose((1, 0))

    def w_chunk(w_smem, c):
        if packed:
            return w_smem.at[:, pl.ds(c * chunk // 16, chunk // 16)]
        return w_smem.at[:, pl.ds(c * chunk, chunk)]

    def body(_, x_smem, w_smem, *group_refs, carry):
        """One pipeline step: its chunks' products, each chunk's codes widened while the previous chunk's
        wgmma runs."""
        if not grouped:
            def accumulate(acc_ref):
                a = operand(w_chunk(w_smem, 0))
                for c in range(n_chunks):
                    plgpu.wgmma(acc_ref, a, x_chunk(x_smem, c))
                    if c + 1 < n_chunks:
                        a = operand(w_chunk(w_smem, c + 1))
            return pl.run_state(accumulate)(plgpu.ACC.init(carry))
        if fold:
            def folded(c):
                """Chunk c's weights in bfloat16: the codes times their group's scale (plus its offset), so one
                accumulator runs through the step (each weight rounded to bfloat16, as XLA's dequantized
                product rounds it)."""
                a = operand(w_chunk(w_smem, c))
                scale = plgpu.load(group_refs[0].at[c], (), layout=wgmma_layout.reduce(1))
                a = a * lax.broadcast_in_dim(scale, a.shape, [0])
                if offsets:
                    off = plgpu.load(group_refs[1].at[c], (), layout=wgmma_layout.reduce(1))
                    a = a + lax.broadcast_in_dim(off, a.shape, [0])
                return a

            def accumulate_folded(acc_ref):
                a = folded(0)
                for c in range(n_chunks):
                    plgpu.wgmma(acc_ref, a, x_chunk(x_smem, c))
                    if c + 1 < n_chunks:
                        a = folded(c + 1)
            return pl.run_state(accumulate_folded)(plgpu.ACC.init(carry))

        def add_group(out, part, c):  # a group's partial product, scaled (and its offset term) in float32
            scale = plgpu.load(group_refs[0].at[c], (), layout=wgmma_layout.reduce(1)).astype(jnp.float32)
            out = out + part * lax.broadcast_in_dim(scale, part.shape, [0])
            if offsets:
                off = plgpu.load(group_refs[1].at[c], (), layout=wgmma_layout.reduce(1)).astype(jnp.float32)
                sums = plgpu.load(group_refs[2].at[c, pl.ds(0, mp)], (), layout=wgmma_layout.reduce(0))
                out = out + lax.broadcast_in_dim(off, part.shape, [0]) * lax.broadcast_in_dim(sums, part.shape, [1])
            return out

        if overlap:
            def chain(c, prev_acc, out):
                """Group c's wgmma issued into a fresh accumulator before group c - 1's is read (one in flight)."""
                if c == n_chunks:
                    return add_group(out, plgpu.wgmma_accumulator_load(prev_acc, wait_n=0), c - 1)
                a = operand(w_chunk(w_smem, c))

                def issue(acc_ref):
                    plgpu.wgmma(acc_ref, a, x_chunk(x_smem, c))
                    done = out if prev_acc is None else add_group(
                        out, plgpu.wgmma_accumulator_load(prev_acc, wait_n=1), c - 1)
                    return chain(c + 1, acc_ref, done)
                return pl.run_scoped(issue, plgpu.ACC((cta_rows, mp), jnp.float32))
            return chain(0, None, carry)
        out = carry
        a = operand(w_chunk(w_smem, 0))
        for c in range(n_chunks):  # one group a chunk, each from a zero accumulator, then scaled in float32
            def issue(acc_ref, a=a, c=c):
                plgpu.wgmma(acc_ref, a, x_chunk(x_smem, c))
                if c + 1 < n_chunks:
                    return acc_ref[...], operand(w_chunk(w_smem, c + 1))
                return acc_ref[...], None
            part, a = pl.run_scoped(issue, plgpu.ACC((cta_rows, mp), jnp.float32))
            out = add_group(out, part, c)
        return out

    x_spec = plgpu.BlockSpec((mp, step), lambda i: (0, k0 + i), transforms=_transforms(plgpu, x_ref.dtype, chunk))
    if packed:
        w_spec = plgpu.BlockSpec((tiles, step // 16, 128), lambda i: (0, k0 + i, 0))
        w_gmem = v_ref.at[layer, pl.ds(j * tiles, tiles)]
    else:
        w_spec = plgpu.BlockSpec((BLOCK_N, step), lambda i: (0, k0 + i),
                                 transforms=_transforms(plgpu, v_ref.dtype, chunk))
        w_gmem = v_ref.at[layer, rows]
    specs, gmem = [x_spec, w_spec], [x_ref, w_gmem]
    if grouped:
        row_spec = plgpu.BlockSpec((n_chunks, cta_rows), lambda i: (k0 + i, 0))
        specs.append(row_spec)
        gmem.append(s_ref.at[layer, :, rows])
        if offsets:
            specs += [row_spec, plgpu.BlockSpec((n_chunks, _sums_cols(mp)), lambda i: (k0 + i, 0))]
            gmem += [m_ref.at[layer, :, rows], sums_ref]
    init = plgpu.layout_cast(jnp.zeros((cta_rows, mp), jnp.float32), wgmma_layout)
    acc = plgpu.emit_pipeline(
        lambda idx, *args: body(idx, *args[:-1], carry=args[-1]),
        grid=(steps_per_split,), in_specs=specs, max_concurrent_steps=stages, init_carry=init)(*gmem)

    def store(o_smem):
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, rows])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store, plgpu.SMEM((cta_rows, mp), jnp.float32, transforms=_transforms(plgpu, jnp.float32, mp)))


@functools.partial(jax.jit,
                   static_argnames=("fmt", "group_size", "step", "splits", "stages", "overlap", "tiles", "fold"))
def weight_matmul_mgpu(x: jax.Array, values: jax.Array, scales: jax.Array, offsets: jax.Array | None = None,
                       layer: jax.Array | int = 0, *, fmt: str, group_size: int | None = None,
                       step: int | None = None, splits: int | None = None, stages: int | None = None,
                       overlap: bool = False, tiles: int = 1, fold: bool = False
                       ) -> jax.Array:  # [M, N] float32
    """x [M, K] (bf16) @ dequantize(W[layer]).T for W stored as in the module docstring."""
    plgpu = _plgpu()
    M, K = x.shape
    if fmt == "int4f":
        L, nb, ks, _ = values.shape
        N, kv = nb * BLOCK_N, ks * 16
    else:
        L, N, kv = values.shape
    if kv != K:
        raise ValueError(f"values {values.shape} do not match x {x.shape}")
    planned = plan(M, K, N, fmt, group_size, tiles)
    if planned is None:
        raise ValueError(f"weight_matmul_mgpu does not take M={M}, K={K}, N={N}, {fmt}, group {group_size}")
    step, splits = step or planned[0], splits or planned[1]
    chunk = group_size or min(CHUNK, step)
    if step % chunk or K % step:
        raise ValueError(f"step {step} must be a multiple of {chunk} dividing K={K}")
    mp = padded_rows(M)
    xp = jnp.pad(x.astype(jnp.bfloat16), ((0, mp - M), (0, 0)))
    grouped = group_size is not None
    arrays = [values, scales]
    if offsets is not None:
        sums = jnp.sum(xp.astype(jnp.float32).reshape(mp, K // group_size, group_size), axis=-1).T  # [K/g, mp]
        sums = jnp.pad(sums, ((0, 0), (0, _sums_cols(mp) - mp)))
        arrays += [offsets, sums]
    steps = K // step
    kernel = functools.partial(_kernel, step=step, chunk=chunk, steps_per_split=steps // splits, grouped=grouped,
                               offsets=offsets is not None, stages=stages or DEFAULT_STAGES, mp=mp,
                               overlap=overlap, tiles=tiles, fold=fold)
    partials = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((splits, N, mp), jnp.float32),
        grid=(N // (BLOCK_N * tiles), splits),
        grid_names=("n", "split"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name=f"weight_matmul_mgpu_{fmt}",
    )(jnp.asarray(layer, jnp.int32).reshape(1), xp, *arrays)
    out = jnp.sum(partials, axis=0)
    if not grouped:  # one scale per row, applied to the sum (one XLA fusion with the split sum and transpose)
        out = out * lax.dynamic_index_in_dim(scales, layer, 0, False)[0].astype(jnp.float32)[:, None]
    return out.T[:M]


def reference(x, values, scales, offsets=None, layer=0, *, fmt: str, group_size: int | None = None):
    """Plain jnp, float32 at HIGHEST precision."""
    q = values[layer].astype(jnp.float32)
    N, K = q.shape
    s = scales[layer].astype(jnp.float32)  # [G, N]
    g = group_size or K
    w = (q.reshape(N, K // g, g) * s.T[:, :, None])
    if offsets is not None:
        w = w + offsets[layer].astype(jnp.float32).T[:, :, None]
    return jnp.dot(x.astype(jnp.float32), w.reshape(N, K).T, precision=lax.Precision.HIGHEST)


# The measurement

SHAPES = {"gateup": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144), "o": (4096, 4096),  # (K, N)
          "even264": (4096, 264 * 64), "even528": (4096, 528 * 64)}  # whole waves of 64-row CTAs
GROUP = 128
OFFSETS = False  # int4 mgpu timings with offsets (--int4-offsets)
INT4_FORMATS = ("int4", "int4f")  # --int4-formats
SKIP_INT8 = False  # --skip-int8
BREAKDOWN = False  # --breakdown: print each case's kernels (us a product)
BASELINES_ONLY_BF16 = False  # --no-triton: the Triton kernels not timed


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


CHECKS = [(fmt, group, offsets, m) for fmt, group, offsets in (("int8", None, False), ("int4", GROUP, False),
                                                               ("int4", GROUP, True), ("int4f", GROUP, False),
                                                               ("int4f", GROUP, True)) for m in (1, 5, 16, 24)]


def check(log, only=None):
    """Small shapes, every format and row count, against the float64 product of the dequantized weight."""
    key = jax.random.key(0)
    L, N, K = 2, 256, 1024
    for fmt, group, offsets, m in CHECKS:
        if only is not None and f"{fmt}-{offsets:d}-{m}" != only:
            continue
        if only is None and (fmt == "int8" and SKIP_INT8 or fmt != "int8" and fmt not in INT4_FORMATS):
            continue
        k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, m), 4)
        lo, hi = (-128, 128) if fmt == "int8" else (-8, 8)
        q = jax.random.randint(k1, (L, N, K), lo, hi, jnp.int32).astype(jnp.int8 if fmt == "int8" else jnp.int4)
        G = 1 if group is None else K // group
        s = (jax.random.uniform(k2, (L, G, N), jnp.float32, 0.5, 1.5) / 64).astype(jnp.bfloat16)
        off = (jax.random.normal(k3, (L, G, N), jnp.float32) / 16).astype(jnp.bfloat16) if offsets else None
        x = jax.random.normal(k4, (m, K), jnp.float32).astype(jnp.bfloat16)
        for overlap, tiles, fold in (((False, 1, False), (True, 1, False), (True, 2, False), (False, 1, True),
                                      (False, 2, True)) if fmt == "int4f" else ((False, 1, False),)):
            name = (f"{fmt} g{group} offsets={offsets} M={m}" + (" overlap" if overlap else "") + f" x{tiles}"
                    + (" fold" if fold else ""))
            tol = 5e-3 if fold else 1e-5  # fold rounds each weight to bfloat16
            try:
                v = pack_fragments(q) if fmt == "int4f" else q
                got = weight_matmul_mgpu(x, v, s, off, jnp.int32(1), fmt=fmt, group_size=group, overlap=overlap,
                                         tiles=tiles, fold=fold)
                want = reference(x, q, s, off, 1, fmt=fmt, group_size=group)
                err = rel(got, want)
                log.append({"check": name, "rel_err": err, "ok": err < tol})
                print(f"check {name}: rel err {err:.2e} {'ok' if err < tol else 'FAIL'}", flush=True)
            except Exception as e:  # noqa: BLE001
                log.append({"check": name, "error": f"{type(e).__name__}: {e}"[:3000]})
                print(f"check {name}: {type(e).__name__}: {str(e)[:3000]}", flush=True)
                traceback.print_exc(limit=4)


def stacks(K, N):
    key = jax.random.key(1)
    k1, k2, k3 = jax.random.split(key, 3)
    G = K // GROUP
    q8 = jax.random.randint(k1, (LAYERS, N, K), -128, 128, jnp.int32).astype(jnp.int8)
    out = {
        "bf16": jax.random.normal(k2, (LAYERS, N, K), jnp.bfloat16),
        "int8": (q8, jnp.full((LAYERS, 1, N), 0.01, jnp.bfloat16)),
        "int8_triton": (q8, jnp.full((LAYERS, N, 1), 0.01, jnp.float32)),
    }
    q4 = (q8 >> 4).astype(jnp.int4)
    out["int4"] = (q4, jnp.full((LAYERS, G, N), 0.01, jnp.bfloat16), jnp.full((LAYERS, G, N), 0.001, jnp.bfloat16))
    out["int4f"] = (pack_fragments(q4),) + out["int4"][1:]
    packed = jax.random.randint(k3, (LAYERS, N, K // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    out["int4_triton"] = (packed, jnp.full((LAYERS, N, G), 0.01, jnp.bfloat16),
                          jnp.full((LAYERS, N, G), 0.001, jnp.bfloat16))
    return out


def products(name, rows, configs):
    K, N = SHAPES[name]
    f32 = jnp.float32
    cases = {
        "bf16 xla": ("bf16", lambda x, w, i: jnp.einsum("mk,nk->mn", x, jax.lax.dynamic_index_in_dim(w, i, 0, False),
                                                          preferred_element_type=f32)),
        "int8 triton": ("int8_triton", lambda x, w, i: wm.weight_matmul(x, w[0], w[1], None, i, fmt="int8",
                                                                         group_size=None, transposed=True)),
        "int4 triton": ("int4_triton", lambda x, w, i: wm.weight_matmul(x, w[0], w[1], w[2], i, fmt="int4",
                                                                         group_size=GROUP, transposed=True)),
    }
    if BASELINES_ONLY_BF16:
        cases = {"bf16 xla": cases["bf16 xla"]}
    elif rows == 1:
        cases["int8 row"] = ("int8_triton", lambda x, w, i: rm.row_matmuls(x, ((w[0], w[1], None),), i, fmt="int8",
                                                                            out_dtype=f32)[0])
        cases["int4 row"] = ("int4_triton", lambda x, w, i: rm.row_matmuls(x, (w,), i, fmt="int4", group_size=GROUP,
                                                                            out_dtype=f32)[0])
    for cfg in configs:
        step, stages, splits, overlap, tiles, fold = (tuple(cfg) + (None,) * 3)[:6]
        kw = dict(stages=stages, splits=splits)
        if not SKIP_INT8:
            cases[f"int8 mgpu s{step} st{stages} sp{splits}"] = (
                "int8", lambda x, w, i, kw=kw, step=step: weight_matmul_mgpu(x, w[0], w[1], None, i, fmt="int8",
                                                                                  step=step, **kw))
        if step < GROUP:
            continue
        for fmt in INT4_FORMATS:
            kw4 = dict(kw, overlap=bool(overlap), tiles=tiles or 1, fold=bool(fold)) if fmt == "int4f" else kw
            tag = ((" overlap" if overlap else "") + (f" x{tiles}" if tiles else "") + (" fold" if fold else "")
                   if fmt == "int4f" else "")
            cases[f"{fmt} mgpu s{step} st{stages} sp{splits}{tag}"] = (
                fmt, lambda x, w, i, kw=kw4, step=step, fmt=fmt: weight_matmul_mgpu(
                    x, w[0], w[1], w[2] if OFFSETS else None, i, fmt=fmt, group_size=GROUP, step=step, **kw))
    return K, N, cases


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--shapes", nargs="+", default=["gateup", "down"])
    p.add_argument("--configs", nargs="*", default=["256,4,0", "128,4,0", "256,8,0", "512,4,0"],
                   help="step,stages,splits[,overlap[,tiles[,fold]]] (0: the plan's) for the mgpu kernel; overlap 1: "
                        "int4f groups issued one ahead of their read; tiles: int4f's 64-row blocks a CTA; fold 1: "
                        "int4f scales (and offsets) applied to the bfloat16 weights, one accumulator a step")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--check-only", help="one check, fmt-offsets(0/1)-rows, e.g. int8-0-16; nothing else runs")
    p.add_argument("--int4-offsets", action="store_true")
    p.add_argument("--ncu", action="store_true", help="launch the int8 and int4 kernels twice each, nothing else")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--int4-formats", nargs="+", default=["int4", "int4f"], choices=["int4", "int4f"])
    p.add_argument("--skip-int8", action="store_true", help="no int8 mgpu cases")
    p.add_argument("--breakdown", action="store_true", help="print each case's kernels, us a product")
    args = p.parse_args(argv)
    global OFFSETS, BASELINES_ONLY_BF16, INT4_FORMATS, SKIP_INT8, BREAKDOWN
    BREAKDOWN = args.breakdown
    INT4_FORMATS = tuple(args.int4_formats)
    SKIP_INT8 = args.skip_int8
    BASELINES_ONLY_BF16 = args.no_triton
    OFFSETS = args.int4_offsets
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "checks": [], "rows": []}
    if args.ncu:  # each mgpu kernel launched twice on gate+up at one row (for Nsight Compute)
        data = stacks(*SHAPES["gateup"])
        x = jax.random.normal(jax.random.key(1), (1, 4096), jnp.bfloat16)
        for _ in range(2):
            jax.block_until_ready(weight_matmul_mgpu(x, *data["int8"], None, 1, fmt="int8"))
        for _ in range(2):
            jax.block_until_ready(weight_matmul_mgpu(x, *data["int4"][:2], None, 1, fmt="int4", group_size=GROUP))
        return 0
    if args.check_only:
        check(log["checks"], args.check_only)
        return 0
    if not args.skip_check:
        check(log["checks"])
    ceil = measure_ceilings()
    copy = ceil.copy_bytes_per_s
    log["copy_tb_s"] = copy / 1e12
    print(f"copy {copy / 1e12:.3f} TB/s", flush=True)
    configs = [tuple(int(v) or None for v in c.split(",")) for c in args.configs]
    for name in args.shapes:
        K, N = SHAPES[name]
        data = stacks(K, N)
        for m in args.rows:
            x = jax.random.normal(jax.random.key(m), (m, K), jnp.bfloat16)
            _, _, cases = products(name, m, configs)
            for label, (kind, fn) in cases.items():
                w = data[kind]
                nbytes = sum(a.size * (0.5 if a.dtype == jnp.int4 else a.dtype.itemsize)
                             for a in jax.tree.leaves(w)) / LAYERS  # int4 is packed two to a byte
                try:
                    ops = []
                    wall, dev = chain_seconds(fn, x, w, calls=32, reps=3, ops=ops)
                    t = dev or wall
                    row = {"shape": name, "rows": m, "case": label, "us": t * 1e6, "wall_us": wall * 1e6,
                           "bytes": nbytes, "of_copy": nbytes / t / copy,
                           "ops_us_per_product": {o["hlo_op"]: o["us_per_call"] / 32 for o in ops}}
                    print(f"{name:7s} M={m:3d} {label:28s} {t * 1e6:8.1f} us  {nbytes / t / 1e12:5.2f} TB/s "
                          f"({nbytes / t / copy:.2f} of copy)", flush=True)
                    if BREAKDOWN:
                        print("    " + ", ".join(f"{k} {v:.2f}" for k, v in row["ops_us_per_product"].items()
                                                 if v >= 0.05), flush=True)
                except Exception as e:  # noqa: BLE001
                    row = {"shape": name, "rows": m, "case": label, "error": f"{type(e).__name__}: {e}"[:2000]}
                    print(f"{name:7s} M={m:3d} {label:28s} FAILED {type(e).__name__}: {str(e)[:800]}", flush=True)
                log["rows"].append(row)
                (out / "weight_mgpu.json").write_text(json.dumps(log, indent=1))
        del data
    return 0


if __name__ == "__main__":
    sys.exit(main())
