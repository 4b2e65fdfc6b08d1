"""Batched int4 products on Hopper's tensor cores, with the codes stored in wgmma's fragment order.

    y [M, N] = x [M, K] @ dequantize(W[layer]).T        M <= 64 rows (decode batches), W int4 [L, N, K]

W is a contraction-last int4 `QArray` in `order="fragments"` (`jaxinfer/quant/fragments.py`): in each block of
64 rows x 256 K, thread t of a warpgroup finds the eight codes it feeds one k16 step of wgmma's register A
operand in one 32-bit word. The kernel (Mosaic GPU, one warpgroup per CTA of 64 rows):

- TMA streams each 256-wide step's (64, 128)-byte code tile, x's matching columns (padded to 8 or a multiple
  of 16 rows), the step's group scales (and offsets) and x's group sums into a 3-slot shared-memory ring.
- A thread loads its words (one per k16 step) and widens them in registers, two codes per two instructions
  (a shift and a LOP3 making bfloat16 1 + u / 16, exact), building the A operand directly in `WGMMA_LAYOUT`
  through `plgpu.inline_mgpu`: no shuffles, no layout change.
- One wgmma per group (x^T from shared memory as B) into a fresh accumulator, issued before the previous
  group's accumulator is read, which then joins the float32 total scaled by 16 x its group's scale; the
  group's sum of x times a per-row term takes 1 + u / 16 back to u - 8 (and adds asymmetric codes' offsets).
- The accumulator is stored transposed, as [M, N] float32 partials; K is split over CTAs when there are few
  row blocks, and the partials' sum is a chain of adds that XLA fuses into the op reading y.

Why: the Triton weight kernel spends ~4 instructions a code at 16 rows, a third of them moving operands
between layouts, and reaches 0.42 of the copy bandwidth on `llama-3-8b`'s gate+up (H200); this kernel 0.60
(pallas_kernels/NOTES.md and benchmarks/BENCHMARKS.md, session 23). GPU only (sm_90): Mosaic GPU's
interpreter cannot run `inline_mgpu`; `ops` uses XLA's dequantized product elsewhere, and the tests compare
this kernel with a float64 product natively.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

ROWS = 64  # weight rows a CTA: wgmma's M (= the fragment order's block rows)
STEP = 256  # K elements a pipeline step (= the fragment order's block width: one (64, 128)-byte TMA box)
STAGES = 3  # ring slots: at 16 rows ~17 KB a slot, so three or four CTAs share an SM (S23-2)
MAX_ROWS = 64
TARGET_CTAS = 264  # about two per SM of a 132-SM H100 / H200, reached by splitting K
GROUPS = (32, 64, 128, 256)


def _plgpu():
    from jax.experimental.pallas import mosaic_gpu as plgpu  # only reached on a GPU
    return plgpu


def padded_rows(m: int) -> int:
    """x's rows as wgmma's N: 8, or a multiple of 16."""
    return 8 if m <= 8 else -(-m // 16) * 16


def supports(m: int, k: int, n: int, group_size: int | None) -> bool:
    """Whether the kernel takes x [m, k] against a fragment-ordered weight of n rows in groups of group_size."""
    return (1 <= m <= MAX_ROWS and group_size in GROUPS and n % ROWS == 0 and k % STEP == 0)


def plan_splits(k: int, n: int) -> int:
    """K splits (a power of two dividing the steps, each split at least 4 steps) towards TARGET_CTAS."""
    steps, splits = k // STEP, 1
    while n // ROWS * splits < TARGET_CTAS and steps % (splits * 2) == 0 and steps // (splits * 2) >= 4:
        splits *= 2
    return splits


def sums_layout(mp: int, n_groups: int) -> tuple[int, int]:
    """(width, per_row): x's group sums are stored `per_row` groups to a row, each group's mp sums in `width`
    floats. A TMA box takes at most 256 elements a dimension, and rows stay whole multiples of 128 bytes (session
    14 found that 32- and 64-byte rows of a TMA ring fault). At 16 rows and groups of 128 a row is one step's
    two groups with no padding, so XLA's reduction writes the sums as the kernel reads them (no pad after it)."""
    width, per_row = mp, n_groups
    while per_row * width > 256:
        per_row //= 2
    while per_row * width % 32:
        width += 8
    return width, per_row


def _x_transforms(plgpu, group: int):
    """x's tile swizzled by the widest pattern that a group's columns (bfloat16) fill."""
    row_bytes = group * 2
    swizzle = next(s for s in (128, 64, 32) if row_bytes % s == 0)
    return (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))


def _widen(plgpu, words_smem, group: int):
    """The group's codes as a [64, group] bfloat16 wgmma A operand holding 1 + u / 16, from the fragment-ordered
    bytes [group / 4, 128] (one 512-byte row of words per k16 step). Two instructions a pair of codes: a shift
    putting the nibbles at mantissa bits 3-6 of each half, and one LOP3 ((t & mask) | bf16 1.0). The caller
    takes 1 + u / 16 back to u - 8 through x's group sums (`_kernel.add_group`); the bias is small (1 against
    u / 16 < 1), so float32 accumulation keeps the product's precision."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    steps = group // 16
    strided = plgpu.Layout.WG_STRIDED((group // 4, 128), vec_size=4)  # thread t: bytes 4 t + 512 s ...
    words = plgpu.load(words_smem, (), layout=strided)

    @plgpu.inline_mgpu(arg_types=(strided,),
                       return_type=plgpu.ShapeDtypeStruct((ROWS, group), jnp.bfloat16, layout=plgpu.Layout.WGMMA))
    def widen(_, fa):
        i32 = ir.IntegerType.get_signless(32)
        bf16x2 = ir.VectorType.get((2,), ir.BF16Type.get())
        # WGMMA_LAYOUT's registers: (64-row tile, 8-column tile, ..., row half h, ...); column tile 2 s + j.
        regs = np.empty((1, 2 * steps, 1, 1, 2, 1, 1, 1, 1), dtype=object)
        for s, j, h in itertools.product(range(steps), range(2), range(2)):
            word = mgpu_utils.bitcast(fa.registers[s], i32)
            p = 2 * j + h  # the pair's codes sit at bits 4 p and 16 + 4 p; move them to bits 3 and 19
            shift = "shl.b32 t, $1, 3;" if p == 0 else f"shr.u32 t, $1, {4 * p - 3};"
            pair = llvm.inline_asm(
                i32, [word], f"{{ .reg .b32 t; {shift} lop3.b32 $0, t, 0x00780078, 0x3F803F80, 0xEA; }}", "=r,r")
            regs[0, 2 * s + j, 0, 0, h, 0, 0, 0, 0] = mgpu_utils.bitcast(pair, bf16x2)
        return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

    return widen(words)


def _kernel(layer_ref, x_ref, v_ref, s_ref, *refs, group, steps_per_split, offsets, mp):
    plgpu = _plgpu()
    m_ref, sums_ref, o_ref = refs if offsets else (None,) + refs
    layer = layer_ref[0]
    j, split = lax.axis_index("n"), lax.axis_index("split")
    rows = pl.ds(j * ROWS, ROWS)
    k0 = split * steps_per_split
    n_groups = STEP // group
    width, per_row = sums_layout(mp, n_groups)
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def add_group(out, part, params, c):
        """Group c's partial product (of 1 + u / 16) joined to the float32 total. With S the group's sum of x,
        sum (u - 8) x = 16 part - 24 S, so w = (u - 8) s (+ m + 8 s for asymmetric codes) gives
        16 s part + (m - 16 s) S, or 16 s part - 24 s S for symmetric ones."""
        scale = plgpu.load(params[0].at[c], (), layout=row_layout).astype(jnp.float32)
        out = out + part * lax.broadcast_in_dim(16.0 * scale, part.shape, [0])
        if offsets:
            off = plgpu.load(params[1].at[c], (), layout=row_layout).astype(jnp.float32) - 16.0 * scale
        else:
            off = -24.0 * scale
        sums = plgpu.load(params[-1].at[c // per_row, pl.ds(c % per_row * width, mp)], (),
                          layout=plgpu.Layout.WGMMA.reduce(0))
        return out + lax.broadcast_in_dim(off, part.shape, [0]) * lax.broadcast_in_dim(sums, part.shape, [1])

    def body(_, x_smem, w_smem, *params, carry):
        def chain(c, prev_acc, out):
            """Group c's wgmma issued into a fresh accumulator before group c - 1's is read (one in flight)."""
            if c == n_groups:
                return add_group(out, plgpu.wgmma_accumulator_load(prev_acc, wait_n=0), params, c - 1)
            a = _widen(plgpu, w_smem.at[pl.ds(c * group // 4, group // 4)], group)

            def issue(acc_ref):
                plgpu.wgmma(acc_ref, a, x_smem.at[:, pl.ds(c * group, group)].transpose((1, 0)))
                done = out if prev_acc is None else add_group(
                    out, plgpu.wgmma_accumulator_load(prev_acc, wait_n=1), params, c - 1)
                return chain(c + 1, acc_ref, done)
            return pl.run_scoped(issue, plgpu.ACC((ROWS, mp), jnp.float32))
        return chain(0, None, carry)

    group_spec = plgpu.BlockSpec((n_groups, ROWS), lambda i: (k0 + i, 0))
    specs = [plgpu.BlockSpec((mp, STEP), lambda i: (0, k0 + i), transforms=_x_transforms(plgpu, group)),
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
        _store_transposed(plgpu, acc, o_smem)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, :, rows])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store, plgpu.SMEM((mp, ROWS), jnp.float32))


def _store_transposed(plgpu, acc, o_smem):
    """The [64, mp] accumulator written to shared memory as [mp, 64]: y's own orientation, so that what XLA does
    with the output (the splits' sum, the cast) is elementwise and joins the op that reads it. Each thread
    stores its registers' elements one by one at swapped indices (64 x mp floats a CTA, once: Pallas's own
    store refuses a WGMMA-layout value into a transposed ref)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, vector

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
    def store(_, fa, ref):
        for (row, col), reg in zip(fa.layout.thread_idxs(fa.shape), fa.registers.flat):
            for e in range(fa.layout.vector_length):  # the register's elements sit at columns col, col + 1, ...
                col_e = arith.addi(col, arith.constant(ir.IndexType.get(), e))
                memref.store(vector.extract(reg, [], [e]), ref, [col_e, row])

    store(acc, o_smem)


@functools.partial(jax.jit, static_argnames=("group_size", "out_dtype"))
def fragment_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, offsets: jax.Array | None = None,
                    layer: jax.Array | int | None = None, *, group_size: int, out_dtype=None) -> jax.Array:
    """x [M, K] @ dequantize(W).T for W's fragment-ordered int4 children: values [(L,) N, K/2] uint8, scales
    and offsets [(L,) N, K/g]; `layer` picks W from a stack read in place (no copy of the layer)."""
    plgpu = _plgpu()
    if layer is None:
        values, scales = values[None], scales[None]
        offsets = None if offsets is None else offsets[None]
        layer = 0
    M, K = x.shape
    L, N, half = values.shape
    if half * 2 != K:
        raise ValueError(f"fragment_matmul: values {values.shape} do not match x {x.shape}")
    if not supports(M, K, N, group_size):
        raise ValueError(f"fragment_matmul takes 1-{MAX_ROWS} rows, N a multiple of {ROWS}, K of {STEP} and "
                         f"groups of {GROUPS}; got M={M}, K={K}, N={N}, group {group_size}")
    G = K // group_size
    if scales.shape != (L, N, G) or (offsets is not None and offsets.shape != scales.shape):
        raise ValueError(f"fragment_matmul: scales {scales.shape} (offsets "
                         f"{None if offsets is None else offsets.shape}) do not match {(L, N, G)}")
    mp = padded_rows(M)
    xp = jnp.pad(x.astype(jnp.bfloat16), ((0, mp - M), (0, 0)))
    # A block's [64, G] group parameters are stored transposed: [G, 64] each, viewed without a copy.
    arrays = [xp, values, scales.reshape(L, N // ROWS, G, ROWS)]
    if offsets is not None:
        arrays.append(offsets.reshape(L, N // ROWS, G, ROWS))
    # x's group sums [G, mp], `per_row` groups to a row (padded only where a row would be under 128 bytes).
    width, per_row = sums_layout(mp, STEP // group_size)
    sums = jnp.sum(xp.astype(jnp.float32).reshape(mp, G, group_size), axis=-1).T
    arrays.append(jnp.pad(sums, ((0, 0), (0, width - mp))).reshape(G // per_row, per_row * width))
    splits = plan_splits(K, N)
    kernel = functools.partial(_kernel, group=group_size, steps_per_split=K // STEP // splits,
                               offsets=offsets is not None, mp=mp)
    partials = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((splits, mp, N), jnp.float32),
        grid=(N // ROWS, splits),
        grid_names=("n", "split"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name="fragment_matmul_int4",
    )(jnp.asarray(layer, jnp.int32).reshape(1), *arrays)
    # The splits' partials added one by one (not a reduction): elementwise, so XLA fuses the sum and the cast
    # into the op that reads y instead of launching a reduction of its own.
    y = partials[0, :M]
    for i in range(1, splits):
        y = y + partials[i, :M]
    return y.astype(out_dtype or x.dtype)
