"""Batched and one-row int8 products on Hopper's tensor cores, the codes read straight from shared memory.

    y [M, N] = x [M, K] @ (s[layer] * W[layer]).T     M <= 64 rows, W int8 [L, N, K] (contraction-last), s [L, N]

Per-channel int8 codes are already what the s8 wgmma multiplies, in the order it reads them (K-major rows): TMA
streams each step's (ROWS, STEP) tile of codes into a swizzled shared-memory ring and the wgmma takes it there
as its A operand, so no thread touches a code. x enters as the fragment kernel's 16-bit fixed point
(`x_digits`: a high and a low signed byte a value, the two digit rows of each x row being two of wgmma's N
columns). One int32 accumulator a CTA runs over its K split (|T| <= 127 * 128 * K < 2^31 for K < 2^17); the
epilogue joins the digits in float32 (256 T_hi + T_lo, rounded once) and stores [P, ROWS] float32 partials.
The splits' sum, x's 1 / q and the channel scales are elementwise ops that XLA fuses into the op reading y.
Several weights sharing x (a layer's q/k/v, gate/up) run as one launch: the grid covers their rows one after
another and each CTA runs the product its row block belongs to (small products alone pay a pipeline fill each).

Why: the row kernel (`row_matmul`, CUDA cores) and the weight kernel (`weight_matmul`, Triton) turn every code
into a float in registers; there the bytes in flight depend on registers and the instruction stream, and the
one-row int8 products stayed at 0.58-0.81 of the copy bandwidth (sessions 8-22). Here the instructions a step
are the pipeline's and one wgmma's whatever the batch: on an H200 gate+up streams at 0.92-0.94 of the copy
bandwidth at 1 and 16 rows (session 28; `ops` still gives one row to the row kernel, whose launches also do the
norm, SwiGLU and residual add).
Precision: exact integer products; x's fixed point rounds each element by at most max |x| / 65278 of its row.
GPU only (sm_90); the tests compare it with a float64 product natively and lower it for CUDA on the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import fragment_matmul as fm

ROWS = 64  # weight rows a CTA (wgmma's M)
STEP = 256  # K a pipeline step: (64, 256) codes = 16 KB
STAGES = 2  # ring slots: 40 KB a CTA at 16 rows, five CTAs an SM (beat 3, 4 and 6 slots: session 28)
TARGET_CTAS = 264  # about two per SM of a 132-SM H100 / H200, reached by splitting K
MAX_ROWS = fm.MAX_ROWS
MAX_K = 1 << 16  # keeps the int32 digit sums exact
SUMS_GROUP = 128  # the group size x's preparation (`x_digits`) is asked for: its group sums are not read here


def supports(m: int, k: int, n: int) -> bool:
    """Whether the kernel takes x [m, k] against an int8 weight of n rows (per-channel scales)."""
    return 1 <= m <= MAX_ROWS and n % ROWS == 0 and k % STEP == 0 and k <= MAX_K


def _transforms(plgpu):
    return (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))


def _kernel(layer_ref, x_ref, *refs, parts, steps_per_split, mp, rows, step, stages):
    """CTA (j, split): row block j of the weights' concatenated rows (`parts`: each weight's N), K split `split`."""
    plgpu = fm._plgpu()
    *v_refs, o_ref = refs
    layer = layer_ref[0]
    j, split = lax.axis_index("n"), lax.axis_index("split")
    k0 = split * steps_per_split

    def product(v_ref, block):
        def accumulate(acc_ref):
            def body(_, x_smem, w_smem):
                plgpu.wgmma(acc_ref, w_smem, x_smem.transpose((1, 0)))
                plgpu.wgmma_wait(0)  # the slot's codes are read before the pipeline refills it

            specs = [plgpu.BlockSpec((2 * mp, step), lambda i: (0, k0 + i), transforms=_transforms(plgpu)),
                     plgpu.BlockSpec((rows, step), lambda i: (0, k0 + i), transforms=_transforms(plgpu))]
            plgpu.emit_pipeline(body, grid=(steps_per_split,), in_specs=specs,
                                max_concurrent_steps=stages)(x_ref, v_ref.at[layer, pl.ds(block * rows, rows)])
            return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((rows, 2 * mp), jnp.int32))
        total = acc[:, :mp].astype(jnp.float32) * 256.0 + acc[:, mp:].astype(jnp.float32)

        def store(o_smem):
            fm._store_transposed(plgpu, total, o_smem)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, :, pl.ds(j * rows, rows)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store, plgpu.SMEM((mp, rows), jnp.float32))

    if len(parts) == 1:
        product(v_refs[0], j)
        return
    first = 0
    for v_ref, n in zip(v_refs, parts):  # each CTA runs the one product its row block belongs to
        pl.when((j >= first) & (j < first + n // rows))(functools.partial(product, v_ref, j - first))
        first += n // rows


def int8_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, layer: jax.Array | int | None = None, *,
                out_dtype=None, **tuning) -> jax.Array:
    """x [M, K] @ (scales * values).T for per-channel int8 codes values [(L,) N, K] and scales [(L,) N, 1];
    `layer` picks W from a stack read in place (no copy of the layer)."""
    from pallas_kernels.x_digits import x_digits

    M = x.shape[0]
    mp, width = fm.prepared_layout(M, SUMS_GROUP)
    digits, inv_q, _ = x_digits(x, rows=mp, group_size=SUMS_GROUP, width=width)
    return int8_matmuls(digits, inv_q, ((values, scales),), layer, rows=M, out_dtype=out_dtype or x.dtype,
                        **tuning)[0]


@functools.partial(jax.jit, static_argnames=("rows", "out_dtype", "block_rows", "step", "stages", "target"))
def int8_matmuls(digits: jax.Array, inv_q: jax.Array, weights: tuple, layer: jax.Array | int | None = None, *,
                 rows: int, out_dtype=jnp.float32, block_rows: int = ROWS, step: int = STEP, stages: int = STAGES,
                 target: int = TARGET_CTAS) -> tuple:
    """x @ (s_i * W_i).T for each `(values, scales)` of `weights` (sharing K, each W_i int8 [(L,) N_i, K] with
    scales [(L,) N_i, 1]) in one launch, x already prepared as the fragment kernel's digits [2 P, K] and 1 / q [P]
    (P = `fragment_matmul.padded_rows(rows)`; x's group sums are not read). Returns each product's first `rows`
    rows."""
    mp = fm.padded_rows(rows)
    K = digits.shape[1]
    stacked, flat_scales, parts = [], [], []
    for values, scales in weights:
        if values.dtype != jnp.int8:
            raise ValueError(f"int8_matmul takes int8 codes, got {values.dtype}")
        if values.ndim != (2 if layer is None else 3):
            raise ValueError(f"int8_matmul: codes {values.shape} are not [N, K] (or [L, N, K] with a layer index)")
        if layer is None:
            values, scales = values[None], scales[None]
        L, N, k = values.shape
        if not supports(rows, k, N) or N % block_rows or k % step or k != K:
            raise ValueError(f"int8_matmul takes 1-{MAX_ROWS} rows, N a multiple of {block_rows}, K of {step} up to "
                             f"{MAX_K} (x's K = {K}); got M={rows}, K={k}, N={N}")
        if scales.shape not in ((L, N, 1), (L, N)):
            raise ValueError(f"int8_matmul: per-channel scales {scales.shape} do not match {(L, N, 1)}")
        stacked.append(values)
        flat_scales.append(scales.reshape(L, N))
        parts.append(N)
    if digits.shape != (2 * mp, K) or inv_q.shape != (mp,):
        raise ValueError(f"int8_matmul: x prepared as digits {digits.shape}, inv_q {inv_q.shape}; {rows} rows need "
                         f"{(2 * mp, K)}, {(mp,)}")
    layer = 0 if layer is None else layer
    total = sum(parts)
    splits = fm.plan_splits(K, total, block_rows, step, target)
    kernel = functools.partial(_kernel, parts=tuple(parts), steps_per_split=K // step // splits, mp=mp,
                               rows=block_rows, step=step, stages=stages)
    y = fm.split_k_products(kernel, (jnp.asarray(layer, jnp.int32).reshape(1), digits, *stacked), n=total,
                            rows_per_cta=block_rows, splits=splits, mp=mp, rows=rows, name="int8_matmul")
    y = y * inv_q[:rows, None]  # (x's and the channels' scales: fused with the sum by XLA)
    outs, first = [], 0
    for n, scales in zip(parts, flat_scales):
        scale = lax.dynamic_index_in_dim(scales, layer, 0, keepdims=False).astype(jnp.float32)
        outs.append((y[:, first:first + n] * scale[None, :]).astype(out_dtype))
        first += n
    return tuple(outs)
