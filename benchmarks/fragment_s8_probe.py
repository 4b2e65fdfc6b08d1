"""Probe: the fragment kernel's int4 codes as int8 on the integer tensor cores, x as two int8 digits.

Question (session 26): the library's fragment kernel (`pallas_kernels/fragment_matmul.py`) spends ~40 % of its
instructions widening codes to bfloat16, two instructions a pair (session 25, Nsight Compute). wgmma also takes
s8 operands (m64nNk32, int32 accumulators, A from registers). With each thread's 16 codes of a k32 step packed
as two words whose low / high nibbles are its four A registers, widening is `w & 0x0F0F0F0F` and
`(w >> 4) & 0x0F0F0F0F`: three instructions for eight codes instead of eight. x must then be integers: a
per-row fixed point of 16 bits (x * q rounded, q = 32639 / max |x|) split into a high and a low signed byte,
the two digit rows stacked as wgmma's N (2 M columns), combined in int32 in each group's epilogue
(t = 256 hi + lo, exact), then t * scale + offset * (x's integer group sum), and 1 / q applied to the output.
x's rounding is 2^-16 of its row's largest |value| (bfloat16 rounds each element to 2^-9 of itself).

Timed against the library's kernel on `llama-3-8b`'s products at 16 rows, chained through the output; the
device time per product includes each path's XLA glue (x's digits and sums here; x's sums there).

    PYTHONPATH=. python benchmarks/fragment_s8_probe.py --out DIR [--rows 16] [--check-only]
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from jaxinfer.quant import fragments as fr  # noqa: E402
from pallas_kernels import fragment_matmul as fm  # noqa: E402

ROWS, STEP, STAGES = fm.ROWS, fm.STEP, fm.STAGES
X_MAX = 127 * 256 + 127  # the largest |x * q|: hi = (t + 128) >> 8 stays in [-128, 127], lo in [-128, 127]
SHAPES = {"gateup": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144), "o": (4096, 4096)}
GROUP = 128
LAYERS = 4


def pack_s8(u: jax.Array) -> jax.Array:
    """Codes [..., N, K] (uint8 in [0, 15]) -> bytes [..., N, K/2]: in each 64 x 256 block, k32 step s, thread
    t = 32 w + 4 r + c holds 8 bytes (j, e): low nibble row 16 w + r, high nibble row + 8, column 32 s + 16 j +
    4 c + e. Its word j's low nibbles are wgmma's s8 A register (j, h = 0), the high ones (j, h = 1)."""
    *lead, n, k = u.shape
    u = u.astype(jnp.uint8).reshape(*lead, n // ROWS, 4, 2, 8, k // STEP, 8, 2, 4, 4)
    nd = len(lead)
    b, w, h, r, kb, s, j, c, e = (nd + i for i in range(9))
    u = u.transpose(*range(nd), b, kb, s, w, r, c, j, e, h)
    byte = u[..., 0] | (u[..., 1] << 4)  # [..., b, kb, s, w, r, c, j, e]
    blocks = byte.reshape(*lead, n // ROWS, k // STEP, ROWS, STEP // 2)
    return blocks.swapaxes(-3, -2).reshape(*lead, n, k // 2)


def digits(x: jax.Array, mp: int, group: int):
    """x [M, K] -> (digits [2 mp, K] int8: hi rows then lo rows, 1 / q [M], x's integer group sums [G, mp])."""
    m, k = x.shape
    xf = jnp.pad(x.astype(jnp.float32), ((0, mp - m), (0, 0)))
    amax = jnp.max(jnp.abs(xf), axis=1, keepdims=True)
    q = X_MAX / jnp.maximum(amax, 1e-30)
    t = jnp.round(xf * q).astype(jnp.int32)
    hi = (t + 128) >> 8
    lo = t - 256 * hi
    d = jnp.concatenate([hi, lo], axis=0).astype(jnp.int8)
    sums = jnp.sum(t.reshape(mp, k // group, group), axis=-1).astype(jnp.float32).T
    return d, (1.0 / q)[:m, 0], sums


def _widen_s8(plgpu, words_smem, group: int):
    """The group's codes as a [64, group] int8 wgmma A operand: per k32 step a thread's two words, each giving
    two registers (low nibbles, high nibbles)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as mfa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    steps = group // 32
    strided = plgpu.Layout.WG_STRIDED((group // 4, 128), vec_size=8)  # thread t: bytes 8 t + 1024 s ...
    words = plgpu.load(words_smem, (), layout=strided)

    @plgpu.inline_mgpu(arg_types=(strided,),
                       return_type=plgpu.ShapeDtypeStruct((ROWS, group), jnp.int8, layout=plgpu.Layout.WGMMA_8BIT))
    def widen(_, fa):
        i32 = ir.IntegerType.get_signless(32)
        i8x4 = ir.VectorType.get((4,), ir.IntegerType.get_signless(8))
        shape = mfa.WGMMA_LAYOUT_8BIT.registers_shape((ROWS, group))
        regs = np.empty(shape, dtype=object)
        for s in range(steps):
            pair = vector.bitcast(ir.VectorType.get((2,), i32), fa.registers[s])
            for j in range(2):
                word = vector.extract(pair, [], [j])
                lo = llvm.inline_asm(i32, [word], "and.b32 $0, $1, 0x0F0F0F0F;", "=r,r")
                hi = llvm.inline_asm(
                    i32, [word], "{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }", "=r,r")
                for h, v in enumerate((lo, hi)):
                    idx = (0, 2 * s + j, 0, 0, h) + (0,) * (len(shape) - 5)
                    regs[idx] = mgpu_utils.bitcast(v, i8x4)
        return mgpu.FragmentedArray(_registers=regs, _layout=mfa.WGMMA_LAYOUT_8BIT, _is_signed=True)

    return widen(words)


def _x_transforms(plgpu, group: int):
    swizzle = next(s for s in (128, 64) if group % s == 0)
    return (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))


def _kernel(layer_ref, x_ref, v_ref, s_ref, *refs, group, steps_per_split, offsets, mp):
    plgpu = fm._plgpu()
    m_ref, sums_ref, o_ref = refs if offsets else (None,) + refs
    layer = layer_ref[0]
    j, split = lax.axis_index("n"), lax.axis_index("split")
    rows = pl.ds(j * ROWS, ROWS)
    k0 = split * steps_per_split
    n_groups = STEP // group
    width, per_row = fm.sums_layout(mp, n_groups)
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def add_group(out, acc, params, c):
        """sum w x over group c = s T + off S, T = 256 T_hi + T_lo (int32, exact), off = m or -8 s."""
        t = (acc[:, :mp] * 256 + acc[:, mp:]).astype(jnp.float32)
        scale = plgpu.load(params[0].at[c], (), layout=row_layout).astype(jnp.float32)
        out = out + t * lax.broadcast_in_dim(scale, t.shape, [0])
        if offsets:
            off = plgpu.load(params[1].at[c], (), layout=row_layout).astype(jnp.float32)
        else:
            off = -8.0 * scale
        sums = plgpu.load(params[-1].at[c // per_row, pl.ds(c % per_row * width, mp)], (),
                          layout=plgpu.Layout.WGMMA.reduce(0))
        return out + lax.broadcast_in_dim(off, t.shape, [0]) * lax.broadcast_in_dim(sums, t.shape, [1])

    def body(_, x_smem, w_smem, *params, carry):
        def chain(c, prev_acc, out):
            if c == n_groups:
                return add_group(out, plgpu.wgmma_accumulator_load(prev_acc, wait_n=0), params, c - 1)
            a = _widen_s8(plgpu, w_smem.at[pl.ds(c * group // 4, group // 4)], group)

            def issue(acc_ref):
                plgpu.wgmma(acc_ref, a, x_smem.at[:, pl.ds(c * group, group)].transpose((1, 0)))
                done = out if prev_acc is None else add_group(
                    out, plgpu.wgmma_accumulator_load(prev_acc, wait_n=1), params, c - 1)
                return chain(c + 1, acc_ref, done)
            return pl.run_scoped(issue, plgpu.ACC((ROWS, 2 * mp), jnp.int32))
        return chain(0, None, carry)

    group_spec = plgpu.BlockSpec((n_groups, ROWS), lambda i: (k0 + i, 0))
    specs = [plgpu.BlockSpec((2 * mp, STEP), lambda i: (0, k0 + i), transforms=_x_transforms(plgpu, group)),
             plgpu.BlockSpec((ROWS, STEP // 2), lambda i: (0, k0 + i)), group_spec]
    gmem = [x_ref, v_ref.at[layer, rows], s_ref.at[layer, j]]
    if offsets:
        specs.append(group_spec)
        gmem.append(m_ref.at[layer, j])
    specs.append(plgpu.BlockSpec((n_groups // per_row, per_row * width), lambda i: (k0 + i, 0)))
    gmem.append(sums_ref)
    init = plgpu.layout_cast(jnp.zeros((ROWS, mp), jnp.float32), plgpu.Layout.WGMMA)
    acc = plgpu.emit_pipeline(
        lambda idx, *args: body(idx, *args[:-1], carry=args[-1]),
        grid=(steps_per_split,), in_specs=specs, max_concurrent_steps=STAGES, init_carry=init)(*gmem)

    def store(o_smem):
        fm._store_transposed(plgpu, acc, o_smem)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, :, rows])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store, plgpu.SMEM((mp, ROWS), jnp.float32))


@functools.partial(jax.jit, static_argnames=("group_size", "out_dtype"))
def fragment_matmul_s8(x, values, scales, offsets=None, layer=0, *, group_size: int, out_dtype=jnp.float32):
    """x [M, K] @ dequantize(W[layer]).T, W's codes in `pack_s8`'s order, scales / offsets as the library's."""
    plgpu = fm._plgpu()
    M, K = x.shape
    L, N, _ = values.shape
    G = K // group_size
    mp = fm.padded_rows(M)
    d, inv_q, sums = digits(x, mp, group_size)
    arrays = [d, values, scales.reshape(L, N // ROWS, G, ROWS)]
    if offsets is not None:
        arrays.append(offsets.reshape(L, N // ROWS, G, ROWS))
    width, per_row = fm.sums_layout(mp, STEP // group_size)
    arrays.append(jnp.pad(sums, ((0, 0), (0, width - mp))).reshape(G // per_row, per_row * width))
    splits = fm.plan_splits(K, N)
    kernel = functools.partial(_kernel, group=group_size, steps_per_split=K // STEP // splits,
                               offsets=offsets is not None, mp=mp)
    partials = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((splits, mp, N), jnp.float32), grid=(N // ROWS, splits),
        grid_names=("n", "split"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name="fragment_matmul_s8",
    )(jnp.asarray(layer, jnp.int32).reshape(1), *arrays)
    y = partials[0, :M]
    for i in range(1, splits):
        y = y + partials[i, :M]
    return (y * inv_q[:, None]).astype(out_dtype)


def _data(K, N, offsets, key=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(key), 4)
    G = K // GROUP
    u = jax.random.randint(k1, (LAYERS, N, K), 0, 16, jnp.int32).astype(jnp.uint8)
    scales = (0.01 + 0.01 * jax.random.uniform(k2, (LAYERS, N, G))).astype(jnp.bfloat16)
    offs = (-0.08 + 0.02 * jax.random.uniform(k3, (LAYERS, N, G))).astype(jnp.bfloat16) if offsets else None
    row_bytes = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(jnp.uint8)  # row order: low nibble first (checked below)
    lib = (fr.pack_codes(u), fr.permute_group_params(scales),
           None if offs is None else fr.permute_group_params(offs))
    s8 = (pack_s8(u), lib[1], lib[2])
    return u, scales, offs, lib, s8, row_bytes


def reference(x, u, scales, offs, layer):
    """float64 x @ W[layer].T, W = s (u - 8) or s u + m."""
    u = np.asarray(u[layer], np.float64)
    s = np.repeat(np.asarray(scales[layer].astype(jnp.float32), np.float64), GROUP, axis=1)
    w = s * (u - 8) if offs is None else s * u + np.repeat(
        np.asarray(offs[layer].astype(jnp.float32), np.float64), GROUP, axis=1)
    return np.asarray(x.astype(jnp.float32), np.float64) @ w.T


def check(log):
    ok = True
    for offsets, m in itertools.product((False, True), (1, 5, 16, 24, 64)):
        K, N = 1024, 512
        u, scales, offs, lib, s8, _ = _data(K, N, offsets)
        x = jax.random.normal(jax.random.key(m), (m, K), jnp.bfloat16)
        want = reference(x, u, scales, offs, 2)
        got = np.asarray(fragment_matmul_s8(x, *s8, layer=2, group_size=GROUP), np.float64)
        base = np.asarray(fm.fragment_matmul(x, *lib, layer=2, group_size=GROUP, out_dtype=jnp.float32), np.float64)
        scale = np.max(np.abs(want))
        err, err_lib = np.max(np.abs(got - want)) / scale, np.max(np.abs(base - want)) / scale
        ok &= err < 1e-4
        print(f"check offsets={offsets} rows={m}: s8 {err:.2e}, library {err_lib:.2e}", flush=True)
        log.append(dict(offsets=offsets, rows=m, err=float(err), err_library=float(err_lib)))
    return ok


def main(argv=None):
    from benchmarks.weight_kernel import chain_seconds
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[16])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--check-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "checks": [], "rows": []}
    ok = check(log["checks"])
    print("checks", "passed" if ok else "FAILED", flush=True)
    if not args.check_only:
        for name, m in itertools.product(args.shapes, args.rows):
            K, N = SHAPES[name]
            _, _, _, lib, s8, _ = _data(K, N, offsets=True)
            x = jax.random.normal(jax.random.key(3), (m, K), jnp.bfloat16)
            for tag, w, fn in (("library", lib, fm.fragment_matmul), ("s8", s8, fragment_matmul_s8)):
                ops = []
                wall, dev = chain_seconds(
                    lambda x, w, i, fn=fn: fn(x, w[0], w[1], w[2], i % LAYERS, group_size=GROUP,
                                              out_dtype=jnp.float32), x, w, ops=ops)
                kern = sum(o["us_per_call"] for o in ops if any("fragment" in k for k in o["kernels"])) / 32
                row = dict(shape=name, rows=m, path=tag, wall_us=wall * 1e6, device_us=(dev or 0) * 1e6,
                           kernel_us=kern, ops=ops)
                log["rows"].append(row)
                print(f"{name:7s} rows {m:3d} {tag:8s} wall {wall * 1e6:7.1f} us  device {row['device_us']:7.1f}  "
                      f"kernel {kern:6.1f}", flush=True)
    (out / "fragment_s8_probe.json").write_text(json.dumps(log, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
