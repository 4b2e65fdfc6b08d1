"""Batched int4 products on Hopper's tensor cores, with the codes stored in wgmma's fragment order.

    y [M, N] = x [M, K] @ dequantize(W[layer]).T        M <= 64 rows (decode batches), W int4 [L, N, K]

W is a contraction-last int4 `QArray` in `order="fragments"` (`jaxinfer/quant/fragments.py`): in each block of
64 rows x 256 K, thread t of a warpgroup finds the sixteen codes it feeds one k32 step of wgmma's 8-bit register
A operand in two adjacent 32-bit words. The codes enter the tensor cores as the integers they are, and so does
x: a 16-bit fixed point a row, split into a high and a low signed byte (`x_digits.py`), the two digit rows of
each x row being two of wgmma's N columns. The kernel (Mosaic GPU, one warpgroup per CTA of 64 rows):

- TMA streams each 256-wide step's (64, 128)-byte code tile, x's digits for those columns (2 P rows, P = M
  padded to 8 or a multiple of 16), the step's group scales (and offsets) and x's group sums into a 3-slot
  shared-memory ring.
- A thread loads its 8 adjacent bytes a k32 step and widens them in registers: a word's low nibbles are
  one A register (`& 0x0F0F0F0F`), its high nibbles the next (a shift and the same mask): three instructions
  for eight codes, no shuffles, no layout change (`plgpu.inline_mgpu` builds the operand in
  `WGMMA_LAYOUT_8BIT`).
- One s8 wgmma per group (x's digits from shared memory as B) into a fresh int32 accumulator, issued before the
  previous group's accumulator is read. Its epilogue joins the digits exactly (T = 256 T_hi + T_lo in int32:
  |T| < 2^27 for groups up to 256) and adds s T + o S to the float32 total, S being x's integer group sum and
  o the group's offset (m, or -8 s for symmetric codes). Groups of 32 run a 64-wide wgmma (s8 operands from
  registers need a 64-byte swizzle at least) with the other group's registers zero.
- The total is stored transposed, as [M, N] float32 partials; K is split over CTAs when there are few row
  blocks, and the partials' sum and the scale back by 1 / q are elementwise ops that XLA fuses into the op
  reading y.

Precision: exact integer products; x's fixed point rounds each element by at most max |x| / 65278 of its row.
Why: widening codes to bfloat16 took two instructions a pair of codes, ~40 % of the kernel's instructions
(session 25, Nsight Compute); as bytes it is 3 / 8 of an instruction a code, and an s8 wgmma covers k32 (session
26: gate+up 24.4 -> 20.1 us at 16 rows on an H200). GPU only (sm_90): Mosaic GPU's interpreter cannot run
`inline_mgpu`; `ops` uses XLA's dequantized product elsewhere, and the tests compare this kernel with a float64
product natively.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.x_digits import x_digits

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


def plan_splits(k: int, n: int, rows: int = ROWS, step: int = STEP, target: int = TARGET_CTAS) -> int:
    """K splits (a power of two dividing the steps, each split at least 4 steps) towards `target` CTAs of `rows`
    weight rows and `step`-wide pipeline steps."""
    steps, splits = k // step, 1
    while n // rows * splits < target and steps % (splits * 2) == 0 and steps // (splits * 2) >= 4:
        splits *= 2
    return splits


def split_k_products(kernel, operands, *, n: int, rows_per_cta: int, splits: int, mp: int, rows: int, name: str):
    """Launches `kernel` (Mosaic GPU, one warpgroup a CTA) over (N / rows_per_cta row blocks, K splits), each
    CTA writing its [mp, rows_per_cta] float32 partial of the [splits, mp, N] output, and returns the splits'
    sum of the first `rows` rows. The partials are added one by one (not a reduction): elementwise, so XLA fuses
    the sum, and whatever scales the caller applies, into the op that reads y instead of launching a reduction
    of its own."""
    plgpu = _plgpu()
    partials = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((splits, mp, n), jnp.float32),
        grid=(n // rows_per_cta, splits),
        grid_names=("n", "split"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name=name,
    )(*operands)
    y = partials[0, :rows]
    for i in range(1, splits):
        y = y + partials[i, :rows]
    return y


def prepared_layout(rows: int, group: int) -> tuple[int, int]:
    """(P, width) of x prepared for `rows` rows in groups of `group` (`x_digits`): digits [2 P, K], inv_q [P],
    sums [K / group, width]."""
    mp = padded_rows(rows)
    return mp, sums_layout(mp, STEP // group)[0]


def _check_supports(m: int, k: int, n: int, group_size: int | None):
    if not supports(m, k, n, group_size):
        raise ValueError(f"fragment_matmul takes 1-{MAX_ROWS} rows, N a multiple of {ROWS}, K of {STEP} and "
                         f"groups of {GROUPS}; got M={m}, K={k}, N={n}, group {group_size}")


def sums_layout(mp: int, n_groups: int) -> tuple[int, int]:
    """(width, per_row): x's group sums are stored `per_row` groups to a row, each group's mp sums in `width`
    floats. A TMA box takes at most 256 elements a dimension, and rows stay whole multiples of 128 bytes (session
    14 found that 32- and 64-byte rows of a TMA ring fault). Row-major, the sums of group c for x row r sit at
    c width + r: `x_digits` writes them as a [G, width] array, which the kernel reads as [G / per_row, per_row
    width] without a copy."""
    width, per_row = mp, n_groups
    while per_row * width > 256:
        per_row //= 2
    while per_row * width % 32:
        width += 8
    return width, per_row


def _span(group: int) -> int:
    """K columns a wgmma covers: the group, at least 64 (an s8 A operand in registers needs a 64-byte swizzle)."""
    return max(group, 64)


def _x_transforms(plgpu, group: int):
    """x's digit tile swizzled by the widest pattern that a wgmma's columns (bytes) fill."""
    swizzle = min(_span(group), 128)
    return (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))


def _widen(plgpu, words_smem, group: int, part: int):
    """The group's codes as a [64, span] int8 wgmma A operand, from the fragment-ordered bytes [group / 4, 128]
    (1024 bytes a k32 step: thread t's 8 at 8 t). Each word gives two registers: its low nibbles, and its
    high ones shifted down. A group narrower than the span fills k32 step `part` of it; the rest is zeros."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as mfa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    steps, span = group // 32, _span(group)
    strided = plgpu.Layout.WG_STRIDED((group // 4, 128), vec_size=8)  # thread t: bytes 8 t + 1024 s ...
    words = plgpu.load(words_smem, (), layout=strided)

    @plgpu.inline_mgpu(arg_types=(strided,),
                       return_type=plgpu.ShapeDtypeStruct((ROWS, span), jnp.int8, layout=plgpu.Layout.WGMMA_8BIT))
    def widen(_, fa):
        i32 = ir.IntegerType.get_signless(32)
        i8x4 = ir.VectorType.get((4,), ir.IntegerType.get_signless(8))
        # WGMMA_LAYOUT_8BIT's registers: (64-row tile, 16-column tile, ..., row half h, ...); column tile 2 s + j.
        shape = mfa.WGMMA_LAYOUT_8BIT.registers_shape((ROWS, span))
        zero = mgpu_utils.bitcast(arith.constant(i32, 0), i8x4)
        regs = np.full(shape, zero, dtype=object)
        for s in range(steps):
            pair = vector.bitcast(ir.VectorType.get((2,), i32), fa.registers[s])
            for j in range(2):
                word = vector.extract(pair, [], [j])
                low = llvm.inline_asm(i32, [word], "and.b32 $0, $1, 0x0F0F0F0F;", "=r,r")
                high = llvm.inline_asm(
                    i32, [word], "{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }", "=r,r")
                for h, v in enumerate((low, high)):
                    regs[(0, 2 * (part + s) + j, 0, 0, h) + (0,) * (len(shape) - 5)] = mgpu_utils.bitcast(v, i8x4)
        return mgpu.FragmentedArray(_registers=regs, _layout=mfa.WGMMA_LAYOUT_8BIT, _is_signed=True)

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
    span = _span(group)

    def add_group(out, acc, params, c):
        """Group c's integer product joined to the float32 total: with T = sum u t (the digits' columns joined,
        exact) and S = sum t, sum w t = s T + o S for w = s u + o (o = m, or -8 s for symmetric codes)."""
        part = (acc[:, :mp] * 256 + acc[:, mp:]).astype(jnp.float32)
        scale = plgpu.load(params[0].at[c], (), layout=row_layout).astype(jnp.float32)
        out = out + part * lax.broadcast_in_dim(scale, part.shape, [0])
        if offsets:
            off = plgpu.load(params[1].at[c], (), layout=row_layout).astype(jnp.float32)
        else:
            off = -8.0 * scale
        sums = plgpu.load(params[-1].at[c // per_row, pl.ds(c % per_row * width, mp)], (),
                          layout=plgpu.Layout.WGMMA.reduce(0))
        return out + lax.broadcast_in_dim(off, part.shape, [0]) * lax.broadcast_in_dim(sums, part.shape, [1])

    def body(_, x_smem, w_smem, *params, carry):
        def chain(c, prev_acc, out):
            """Group c's wgmma issued into a fresh accumulator before group c - 1's is read (one in flight)."""
            if c == n_groups:
                return add_group(out, plgpu.wgmma_accumulator_load(prev_acc, wait_n=0), params, c - 1)
            a = _widen(plgpu, w_smem.at[pl.ds(c * group // 4, group // 4)], group, c % (span // group))
            cols = pl.ds(c * group // span * span, span)

            def issue(acc_ref):
                plgpu.wgmma(acc_ref, a, x_smem.at[:, cols].transpose((1, 0)))
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
    M, K = x.shape
    _check_supports(M, K, values.shape[-2], group_size)
    mp, width = prepared_layout(M, group_size)
    digits, inv_q, sums = x_digits(x, rows=mp, group_size=group_size, width=width)
    return fragment_matmul_digits(digits, inv_q, sums, values, scales, offsets, layer, rows=M,
                                  group_size=group_size, out_dtype=out_dtype or x.dtype)


@functools.partial(jax.jit, static_argnames=("rows", "group_size", "out_dtype"))
def fragment_matmul_digits(digits: jax.Array, inv_q: jax.Array, sums: jax.Array, values: jax.Array,
                           scales: jax.Array, offsets: jax.Array | None = None, layer: jax.Array | int | None = None,
                           *, rows: int, group_size: int, out_dtype=jnp.float32) -> jax.Array:
    """`fragment_matmul` of x already prepared (`x_digits`, or `add_rms_norm(..., digits=...)`): digits
    [2 P, K] int8, inv_q [P], sums [K / group_size, width] for (P, width) = `prepared_layout(rows, group_size)`;
    returns the first `rows` rows of y."""
    if layer is None:
        values, scales = values[None], scales[None]
        offsets = None if offsets is None else offsets[None]
        layer = 0
    M, (mp, width) = rows, prepared_layout(rows, group_size)
    K = digits.shape[1]
    L, N, half = values.shape
    if half * 2 != K:
        raise ValueError(f"fragment_matmul: values {values.shape} do not match x's K={K}")
    _check_supports(M, K, N, group_size)
    G = K // group_size
    per_row = sums_layout(mp, STEP // group_size)[1]
    if digits.shape != (2 * mp, K) or inv_q.shape != (mp,) or sums.shape != (G, width):
        raise ValueError(f"fragment_matmul: x prepared as digits {digits.shape}, inv_q {inv_q.shape}, sums "
                         f"{sums.shape}; {M} rows need {(2 * mp, K)}, {(mp,)}, {(G, width)}")
    if scales.shape != (L, N, G) or (offsets is not None and offsets.shape != scales.shape):
        raise ValueError(f"fragment_matmul: scales {scales.shape} (offsets "
                         f"{None if offsets is None else offsets.shape}) do not match {(L, N, G)}")
    # A block's [64, G] group parameters are stored transposed: [G, 64] each, viewed without a copy; x's group
    # sums [G, width] are read as [G / per_row, per_row * width] (`sums_layout`).
    arrays = [digits, values, scales.reshape(L, N // ROWS, G, ROWS)]
    if offsets is not None:
        arrays.append(offsets.reshape(L, N // ROWS, G, ROWS))
    arrays.append(sums.reshape(G // per_row, per_row * width))
    splits = plan_splits(K, N)
    kernel = functools.partial(_kernel, group=group_size, steps_per_split=K // STEP // splits,
                               offsets=offsets is not None, mp=mp)
    y = split_k_products(kernel, (jnp.asarray(layer, jnp.int32).reshape(1), *arrays), n=N, rows_per_cta=ROWS,
                         splits=splits, mp=mp, rows=M, name="fragment_matmul_int4")
    return (y * inv_q[:M, None]).astype(out_dtype)  # (x's scale back: fused with the sum by XLA)
