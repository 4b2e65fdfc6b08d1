"""The one matmul entry: every weight product in the model goes through `matmul` (or `matmuls`, for
products of one input that may share a kernel launch); embedding lookups through `embed`. Both take a plain array or a `QArray`, so `model.py` never branches on weight format.

Inside the layer scan the model hands each matrix over as `LayerOf(stacked, layer)`: the whole stacked
`[L, ...]` weight and the layer index, not a slice. XLA feeds a dot (or any kernel) with a materialised
copy of a dynamic slice, so a decode step would read, write and read every weight again; the Pallas
kernel (`pallas_kernels.weight_matmul`) instead indexes the layer itself and streams it once. Paths that
cannot take the stacked form slice it first (`LayerOf.take`), as a reduction fusion reads a slice in place.

Paths (all compute the same math, float32 accumulation):
- `row`: one row of x times a quantized contraction-last layer weight (`quantize(contract_last(...))`,
  as `LayerOf`) on the GPU: `pallas_kernels.row_matmul`, codes turned into float32 in registers with no
  dot, and the input's RMSNorm (`Normed`) and a residual add (`matmul(residual=)`) or the SwiGLU gate
  (`swiglu`) in the same launch. Plain bf16 takes it only when forced (`impl="pallas"`): XLA's row
  reduction streams it faster (`ROW_FORMATS`);
- `pallas`: the weight-streaming kernel for 1-128 rows (decode) on the GPU, plain bf16/f16 weights given
  as `LayerOf` (contraction-last ones from 2 rows) and quantized ones in any form and either order; not
  under a mesh with automatically partitioned axes (a kernel cannot see its shard there; `tensor_parallel`
  runs the layers per shard instead);
- `fragments`: int4 weights in the tensor cores' fragment order (`weight_layout.fragment_order`) for 1-64
  rows on the GPU: `pallas_kernels.fragment_matmul` (Mosaic GPU, 8-bit wgmma), the stacked weight read in
  place, x prepared as a 16-bit fixed point by a launch of its own or, with `ADD_NORM_DIGITS`, by the add +
  norm launch before it (`XDigits`); such weights take no other kernel (the `row` and `pallas` kernels read
  row order);
- `s8`: per-channel int8 contraction-last weights for 1-64 rows on the GPU (one row only where the `row`
  kernel declines): `pallas_kernels.int8_matmul` (Mosaic GPU), the codes read by the 8-bit wgmma straight
  from shared memory, x prepared as for `fragments` (`S8_KERNEL`);
- `gemv` (one row): multiply + reduce over the weight as stored (`gemv`, `qgemv`), which reads a scanned
  slice in place; the CPU's and the fallback's batch-1 path;
- `fp8`: native fp8 x fp8 matmul for fp8 weights at prefill sizes on a GPU with fp8 tensor cores
  (activations quantized per token on the fly);
- `xla`: everywhere else, and always on the CPU. Plain weights: einsum. Per-channel int8/fp8 contract the
  raw codes and scale the output per channel; grouped and offset formats dequantize the weight first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from .packing import stored_axis
from .quant.calibrate import Observed, record
from .quant.qarray import FP8, FP8_MAX, QArray, codes, dequantize
from .weight_layout import ContractLast

MATMUL_IMPLS = ("auto", "xla", "gemv", "pallas", "fp8")  # `pallas` also forces `fragments` where it applies
FP8_MIN_ROWS = 256  # below this many rows (tokens), native fp8 loses to streaming the weight (decode)
FP8_OUT_NARROW = True  # native fp8 dots return the activation dtype (bf16), not float32
KERNEL_MIN_ROWS = 1  # GPU products with [KERNEL_MIN_ROWS, KERNEL_MAX_ROWS] rows take the Pallas kernel
# (`auto`); quantized weights from QUANT_KERNEL_MIN_ROWS rows. 128: on an H200 the kernel beat the dot
# on the scan's copied slice at 96 and 128 rows (llama-3-8b decode step 18.3 -> 10.9, 19.2 -> 12.2 ms).
KERNEL_MAX_ROWS = 128
# A plain layer weight from a stack of several reaches XLA's GEMM as a copy of its slice, from a stack of one
# (`model.split_layers`) in place: against the GEMM in place the kernel wins up to this many rows. H200
# llama-3-8b decode loop (S16-7): at 96 / 128 rows the GEMM on split layers 8.07 / 8.57 ms a step, the kernel
# 9.10 / 9.73 ms.
SPLIT_KERNEL_MAX_ROWS = 64
QUANT_KERNEL_MIN_ROWS = 1
PLAIN_KERNEL = True  # plain stacked weights take the kernel (False: the XLA paths, for comparisons)
ROW_KERNEL = True  # one row of contraction-last layer weights may take the fused row kernel (False: never)
# Formats that take it under `auto`. Not plain bf16: XLA's row reduction streams it faster (H200 llama-3-8b
# batch 1: 4.449 ms with XLA vs 4.574 with the kernel and its fusions, BENCHMARKS.md).
ROW_FORMATS = ("int8", "int4", "fp8")
ROW_HEAD = True  # an unstacked weight (the output head) may take the row kernel too (False: XLA's paths)
# GPU decode: a block's residual add and the next RMSNorm in one Pallas launch (pallas_kernels/add_rms_norm.py)
ADD_NORM_KERNEL = True
# ... which also writes the norm as the fragment kernel's x (`XDigits`) where the products after it take the
# fragment path, sparing each a preparation launch (H200 llama-3-8b int4 batch 16: 2.942 against 3.015 ms a step,
# benchmarks/BENCHMARKS.md session 27; gpu_suite variant `int4_fragments_norm_without_digits` turns it off).
ADD_NORM_DIGITS = True
# A decode attention's unmerged output (`Unmerged`) reaching a fragment product: its splits merged by x's
# preparation (`x_digits_merged`), sparing the merge's launch. Off: level when measured (3.05 us a launch against
# the merge's 1.57 + x_digits' 1.63; H200, session 27; variant `int4_fragments_merge_digits`).
MERGE_DIGITS = False
# Per-channel int8 weights at 1-64 rows take the s8 tensor-core kernel where the row kernel does not (H200
# llama-3-8b products at 16 rows: gate+up 30.3 against the Triton weight kernel's 35.1 us, down 16.9 / 20.4,
# q/k/v 8.2 / 11.4, o 6.2 / 7.8; benchmarks/BENCHMARKS.md session 28). False: the Triton weight kernel.
S8_KERNEL = True


@dataclass(frozen=True)
class LayerOf:
    """Layer `index` (int32 scalar) of `stacked`, a weight (array, `QArray` or `Observed`) with a leading
    layer axis, not yet sliced. Built inside the scan body; never a pytree leaf of the parameters."""

    stacked: Any
    index: jax.Array

    def take(self):
        """The layer's slice of every array in the weight."""
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, self.index, 0, keepdims=False),
                            self.stacked)

    def depth(self) -> int:
        """Layers in the stack."""
        return jax.tree.leaves(self.stacked)[0].shape[0]

    def shape_view(self):
        """The layer's weight as shapes only (same type: array or QArray), for choosing a path."""
        return jax.eval_shape(lambda s: jax.tree.map(lambda a: a[0], s), self.stacked)


def rms_norm(x, weight, eps):
    """RMSNorm computed in float32, scaled by `weight` (an array or `LayerOf`) after casting back (as Llama
    does)."""
    weight = weight.take() if isinstance(weight, LayerOf) else weight
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


@dataclass(frozen=True)
class Normed:
    """`rms_norm(x, weight, eps)` not yet computed: a product taking it as its input may fuse the norm into
    its kernel (the `row` path); every other path computes it first (`value`)."""

    x: jax.Array
    weight: Any  # [D] array or LayerOf of a stacked [L, D] one
    eps: float

    def value(self):
        return rms_norm(self.x, self.weight, self.eps)


@dataclass(frozen=True)
class PartOf:
    """Part `start:start + size` of `whole` (a weight, or `LayerOf` one) along its logical axis `axis`
    (negative): one of several weights stored as one (`packing.Packed`). `matmuls` makes the products of all
    the parts as one; a part alone is sliced out (`take`), which XLA reads in place."""

    whole: Any
    start: int
    size: int
    axis: int

    def take(self):
        w = self.whole.take() if isinstance(self.whole, LayerOf) else self.whole
        inner = w.values if isinstance(w, ContractLast) else w
        axis = stored_axis(w, self.axis) % inner.ndim
        part = jax.lax.slice_in_dim(inner, self.start, self.start + self.size, axis=axis)
        return w.replace(values=part) if isinstance(w, ContractLast) else part


@dataclass(frozen=True)
class Sliced:
    """`whole[start:start + size]` along `axis`, not yet cut: one part's product out of a packed weight's
    (`PartOf`). A kernel may read the part inside the whole (`attention.rotate_write_attend`); every other
    consumer takes `value()`."""

    whole: jax.Array
    start: int
    size: int
    axis: int

    @property
    def shape(self):
        return self.whole.shape[: self.axis] + (self.size,) + self.whole.shape[self.axis + 1 :]

    @property
    def dtype(self):
        return self.whole.dtype

    def value(self):
        return jax.lax.slice_in_dim(self.whole, self.start, self.start + self.size, axis=self.axis)


@dataclass(frozen=True)
class Unmerged:
    """A one-token decode attention output `[B, 1, N, H]` whose key splits are not merged yet
    (`pallas_kernels.common.Partials`): the attention output product's row kernel merges them in its own
    preparation of x where it makes one (int4), saving the merge's launch; every other consumer takes `value()`."""

    partials: Any

    @property
    def shape(self):
        batch, heads, head_dim = self.partials.shape
        return (batch, 1, heads, head_dim)

    @property
    def ndim(self):
        return 4

    @property
    def dtype(self):
        return self.partials.dtype

    def value(self):
        return self.partials.merge(interpret=jax.default_backend() != "gpu").reshape(self.shape)


class DigitsFor(NamedTuple):
    """How the fragment and s8 kernels want x prepared (`pallas_kernels/x_digits.py`): `rows` padded rows,
    integer group sums over `group` columns in `width`-float rows."""

    rows: int
    group: int
    width: int


@struct.dataclass
class XDigits:
    """A normalised activation `normed` together with its preparation for the fragment kernel (digits
    [2 P, K] int8, inv_q [P], sums [K / group, width]), written by the add + norm launch that made it. A pytree:
    it rides in the layer scan's carry. The fragment path takes the prepared form where `spec` matches its
    weight, the s8 path where its rows do; every other consumer takes `value()`."""

    normed: jax.Array
    digits: jax.Array
    inv_q: jax.Array
    sums: jax.Array
    spec: DigitsFor = struct.field(pytree_node=False)

    @property
    def shape(self):
        return self.normed.shape

    @property
    def ndim(self):
        return self.normed.ndim

    @property
    def dtype(self):
        return self.normed.dtype

    def value(self):
        return self.normed


# Lazy activations that `_matmul` hands to the digit-reading paths (`fragments`, `s8`) as they are (they prepare
# x from them).
DIGITS_FROM_LAZY = (XDigits, Unmerged)


def value(x):
    """An activation that may still be lazy (`Normed`, `Sliced`, `Unmerged`, `XDigits`) as an array."""
    return x.value() if isinstance(x, (Normed, Sliced, Unmerged, XDigits)) else x


def prepared(normed, spec: DigitsFor) -> XDigits:
    """`normed` with its preparation for the fragment kernel made by a launch of its own (`x_digits`)."""
    from pallas_kernels.x_digits import x_digits

    flat = normed.reshape(-1, normed.shape[-1])
    return XDigits(normed, *x_digits(flat, rows=spec.rows, group_size=spec.group, width=spec.width), spec)


def digits_for(x, products) -> DigitsFor | None:
    """The preparation to ask of the add + norm launch that makes `x` (shape and dtype) when every `(eq, w)` of
    `products` (the products reading it) takes a kernel reading x's digits (`fragments` with one group size, or
    `s8`); else None."""
    if not ADD_NORM_DIGITS:
        return None
    views = [_digits_view(eq, x, w) for eq, w in products]
    if not views or None in views:
        return None
    rows = {r for r, _ in views}
    groups = {g for _, g in views if g is not None}
    if len(rows) != 1 or len(groups) > 1:
        return None
    from pallas_kernels import fragment_matmul as fm
    from pallas_kernels import int8_matmul as im

    group = groups.pop() if groups else im.SUMS_GROUP
    mp, width = fm.prepared_layout(rows.pop(), group)
    return DigitsFor(mp, group, width)


def _digits_view(eq: str, x, w):
    """(rows, group) when `matmul(eq, x, w)` takes the fragment kernel, (rows, None) when it takes the s8 kernel
    (w a parts' whole read as one product when it is a `PartOf`); else None."""
    w = w.whole if isinstance(w, PartOf) else w
    eq, w = _stored_order(eq, w)
    view = w.shape_view() if isinstance(w, LayerOf) else w
    if not isinstance(view, QArray):
        return None
    x = jax.ShapeDtypeStruct(x.shape, x.dtype)
    spec = _parse(eq, x, view)
    path = _choose("auto", spec, x, view)
    return (spec.rows, view.group_size) if path == "fragments" else (spec.rows, None) if path == "s8" else None


def _one_after_another(parts, total: int) -> bool:
    """Whether `parts` (each with `start`, `size`) cover [0, total) in order, without gaps."""
    end = 0
    for p in parts:
        if p.start != end:
            return False
        end += p.size
    return end == total


def whole_of(parts, axis: int):
    """The array that `parts` (`Sliced`) cut along `axis`, when they are all of it in order; else None."""
    first = parts[0]
    if not all(isinstance(p, Sliced) and p.whole is first.whole and p.axis == axis for p in parts):
        return None
    return first.whole if _one_after_another(parts, first.whole.shape[axis]) else None


def matmul(eq: str, x, w, out_dtype=None, *, impl: str = "auto", residual=None, norm=None):
    """`einsum(eq, x, w)` accumulated in float32, returned in `out_dtype` (default: the activation dtype);
    with `residual`, `residual + product` in the residual's dtype (one launch on the `row` path); with
    `residual` and `norm` (weight, eps[, DigitsFor]), the pair `(residual + product, its RMSNorm)`
    (`add_rms_norm`).

    `x` is an array, `Normed` or `XDigits`; `w` a plain array, a `QArray`, a `ContractLast`, or any of them as
    `LayerOf` (one layer of a stacked weight). `impl` forces a path (tests, benchmarks); a forced path that
    does not apply here falls back to `xla` (`gemv` for one row of a plain weight).
    """
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"unknown matmul impl {impl!r}; choose one of {', '.join(MATMUL_IMPLS)}")
    if norm is not None and residual is None:
        raise ValueError("matmul: norm= normalises residual + product, so it needs residual=")
    if isinstance(w, PartOf):
        w = w.take()
    row = _row_plan(impl, x, [_stored_order(eq, w)], residual=residual)
    if row is not None:
        out = row(epilogue="residual" if residual is not None else "none", out_dtype=out_dtype)[0]
        return out if norm is None else (out, rms_norm(out, *norm[:2]))
    x = x if isinstance(x, DIGITS_FROM_LAZY) else value(x)  # (the digit-reading paths prepare x from them: `_matmul`)
    return join_residual(_matmul(eq, x, w, out_dtype or x.dtype, impl), residual, norm)


def join_residual(out, residual=None, norm=None):
    """A product `out` joining the residual stream: `out` itself without a residual, `residual + out` in the
    residual's dtype, and with `norm` (weight, eps[, DigitsFor]) that sum and its RMSNorm (`add_rms_norm`)."""
    if norm is not None:
        return add_rms_norm(residual, out, *norm)
    return out if residual is None else residual + out.astype(residual.dtype)


def add_rms_norm(x, h, weight, eps, prepare: DigitsFor | None = None):
    """`(x + h, rms_norm(x + h, weight, eps))`: a block's output `h` joining the residual stream `x` and the
    next block's normalised input, in one Pallas launch where `residual_norm_fuses` allows (GPU, a few
    rows), else two XLA expressions. With `prepare` (`digits_for`) the kernel's norm comes as `XDigits`."""
    if _add_norm_kernel_applies(x, weight):
        from pallas_kernels import add_rms_norm as kernel

        stacked, layer = (weight.stacked, weight.index) if isinstance(weight, LayerOf) else (weight, None)
        out = kernel.add_rms_norm(x, h, stacked, layer, eps=eps, digits=None if prepare is None else tuple(prepare))
        if prepare is None:
            return out
        s, normed, (digits, inv_q, sums) = out
        return s, XDigits(normed, digits, inv_q, sums, prepare)
    s = x + h.astype(x.dtype)
    return s, rms_norm(s, weight, eps)


def _add_norm_kernel_applies(x, weight=None) -> bool:
    """The one-launch residual add + RMSNorm takes: a GPU (`ADD_NORM_KERNEL`), whole arrays, half-precision
    x of at most KERNEL_MAX_ROWS rows of a power-of-two width, a plain norm weight."""
    if not (ADD_NORM_KERNEL and on_gpu() and x.dtype in (jnp.bfloat16, jnp.float16) and whole_arrays()):
        return False
    w = weight.stacked if isinstance(weight, LayerOf) else weight
    if w is not None and (isinstance(w, (QArray, Observed)) or w.ndim != (2 if isinstance(weight, LayerOf) else 1)):
        return False
    from pallas_kernels import add_rms_norm as kernel

    return math.prod(x.shape[:-1]) <= KERNEL_MAX_ROWS and kernel.supports(x.shape[-1])


def residual_norm_fuses(x, products) -> bool:
    """Whether a model should hand each block's residual add and the next norm to `matmul(residual=,
    norm=)` (one `add_rms_norm` launch per norm) for the residual stream `x`: the kernel applies, and
    none of the row-parallel `products` ((eq, input shape, weight) of the attention output and the MLP
    down) takes the fused row kernel, which adds the residual in its own epilogue and leaves the norm
    to the next product's prologue (no launch of its own)."""
    if not _add_norm_kernel_applies(x):
        return False
    for eq, shape, w in products:
        if _row_plan("auto", jax.ShapeDtypeStruct(shape, x.dtype), [_stored_order(eq, w)], residual=x) is not None:
            return False
    return True


def _matmul(eq: str, x, w, out_dtype, impl: str):
    """`matmul` of an array x (or `XDigits` / `Unmerged`, which the fragment path may read as they are) on every
    path but `row`."""
    eq, w = _stored_order(eq, w)
    if isinstance(w, LayerOf):
        if not isinstance(w.stacked, Observed):  # (calibration wrappers always take the XLA paths)
            one = w.shape_view()
            spec = _parse(eq, x, one)
            path = _choose(impl, spec, x, one, stacked=w.depth())
            if path == "pallas":
                return _pallas_matmul(spec, value(x), w.stacked, w.index).astype(out_dtype)
            if path in ("fragments", "s8"):
                return _digits_matmul(path, spec, x, w.stacked, w.index).astype(out_dtype)
        w = w.take()
    if isinstance(w, Observed):  # calibration: report the input statistics, then multiply as usual
        x = value(x)
        record(w, eq, x)
        eq, w = _stored_order(eq, w.w)
    spec = _parse(eq, x, w)
    path = _choose(impl, spec, x, w)
    if path in ("fragments", "s8"):
        return _digits_matmul(path, spec, x, w).astype(out_dtype)
    x = value(x)
    if path == "pallas":
        return _pallas_matmul(spec, x, w).astype(out_dtype)
    if path == "fp8":
        return fp8_matmul(eq, x, w).astype(out_dtype)
    if path == "gemv":
        return (qgemv(eq, x, w) if isinstance(w, QArray) else gemv(eq, x, w)).astype(out_dtype)
    if not isinstance(w, QArray):
        out = jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return out.astype(out_dtype)
    return xla_matmul(eq, x, w).astype(out_dtype)


def embed(table, tokens):
    """Rows of the embedding `table [V, D]` at integer `tokens`, in the table's (dequantized) dtype."""
    if isinstance(table, Observed):
        table = table.w
    if not isinstance(table, QArray):
        return jnp.take(table, tokens, axis=0)
    if table.ndim != 2 or table.reduce_axes != (-1,) or table.order != "rows":
        raise ValueError(f"a quantized embedding must be scaled per row (reduce axis -1) in row order, got {table!r}")
    take = lambda a: None if a is None else jnp.take(a, tokens, axis=0)
    rows = table.replace(scales=take(table.scales), values=take(table.values), offsets=take(table.offsets))
    return dequantize(rows)


# --------------------------------------------------------------------------------------------------------
# Equation bookkeeping


def _stored_order(eq: str, w):
    """A `ContractLast` weight (or one layer of one) as its stored array, with `eq` rewritten for that
    order (`btd,dnh->btnh` -> `btd,nhd->btnh`); any other weight unchanged."""
    inner = w.stacked if isinstance(w, LayerOf) else w
    if not isinstance(inner, ContractLast):
        return eq, w
    lhs, out = eq.replace(" ", "").split("->")
    xs, ws = lhs.split(",")
    ndim = inner.ndim - (1 if isinstance(w, LayerOf) else 0)  # a layer of a stacked weight has one axis fewer
    if len(ws) != ndim or ndim < inner.contracted + inner.kept:
        raise ValueError(f"matmul equation {eq!r} does not fit the weight {inner!r}")
    eq = f"{xs},{inner.stored_letters(ws)}->{out}"
    return eq, (LayerOf(inner.values, w.index) if isinstance(w, LayerOf) else inner.values)


class _Spec:
    """A parsed `x,w->out` einsum with the weight's contracted letters (w: array, QArray or their shapes)."""

    def __init__(self, eq: str, x, w):
        lhs, out = eq.replace(" ", "").split("->")
        xs, ws = lhs.split(",")
        if "." in eq or len(xs) != x.ndim or len(ws) != len(w.shape):
            raise ValueError(f"matmul equation {eq!r} does not fit x {x.shape} and w {w.shape}")
        self.eq, self.x, self.w, self.out = eq, xs, ws, out
        self.contracted = "".join(c for c in ws if c not in out)
        reduce_axes = w.reduce_axes if isinstance(w, QArray) else ()
        self.reduce_letters = "".join(ws[a] for a in reduce_axes)
        self.rows = math.prod(d for c, d in zip(xs, x.shape) if c not in ws)
        self.k = math.prod(d for c, d in zip(ws, w.shape) if c in self.contracted)


def _parse(eq, x, w) -> _Spec:
    return _Spec(eq, x, w)


def _choose(impl: str, spec: _Spec, x, w, *, stacked: int = 0) -> str:
    """The path for this call: a forced `impl` where it applies (else `xla`, or `gemv` for one row of a
    plain weight), or by shape, format and platform. `stacked`: w is one layer of a stack of that many
    layers (0: not stacked)."""
    quantized = isinstance(w, QArray)
    if quantized and w.order == "fragments":
        return "fragments" if impl in ("auto", "pallas") and _fragment_kernel_applies(spec, x, w) else "xla"
    if impl == "auto" and quantized and _s8_kernel_applies(spec, x, w):
        return "s8"
    fp8_ok = quantized and w.fmt == "fp8" and w.group_size is None and set(spec.reduce_letters) == set(spec.contracted)
    fallback = "gemv" if spec.rows == 1 and not quantized else "xla"
    if impl == "gemv":
        return "gemv" if spec.rows == 1 else "xla"
    if impl == "pallas":
        return "pallas" if _kernel_supports(spec, x, w) else fallback
    if impl == "fp8":
        return "fp8" if fp8_ok else "xla"
    if impl == "xla":
        return "xla"
    on_gpu = jax.default_backend() == "gpu"
    first = QUANT_KERNEL_MIN_ROWS if quantized else KERNEL_MIN_ROWS
    wants_kernel = quantized or (stacked and PLAIN_KERNEL)  # plain weights only lose the copy in the scan
    if not quantized and spec.rows == 1 and _contraction_last(spec):
        wants_kernel = False  # one row: XLA's row reduction streams it faster (H200 llama-3-8b: 4.41 vs 4.65 ms)
    last = KERNEL_MAX_ROWS if quantized or stacked > 1 else SPLIT_KERNEL_MAX_ROWS
    if on_gpu and wants_kernel and first <= spec.rows <= last and x.dtype in (jnp.bfloat16, jnp.float16) \
            and whole_arrays() and _kernel_supports(spec, x, w):
        return "pallas"
    if spec.rows == 1:
        return "gemv"
    if on_gpu and fp8_ok and spec.rows >= FP8_MIN_ROWS and _has_fp8_tensor_cores():
        return "fp8"
    return "xla"


def whole_arrays() -> bool:
    """No mesh axis larger than one that XLA partitions automatically: a kernel call sees whole arrays."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or all(n == 1 for a, n in mesh.shape.items() if a not in mesh.manual_axes)


def _has_fp8_tensor_cores() -> bool:
    """Ada (sm_89) and Hopper (sm_90) or newer."""
    try:
        cc = jax.devices()[0].compute_capability
        major, minor = (int(p) for p in str(cc).split(".")[:2])
        return (major, minor) >= (8, 9)
    except Exception:  # not a CUDA device, or no compute capability reported
        return False


def _scale_letters(spec: _Spec, w: QArray) -> str:
    """Letters of a per-channel scale once its size-1 reduced axes are squeezed."""
    return "".join(c for i, c in enumerate(spec.w) if i - len(spec.w) not in w.reduce_axes)


def _squeezed(a, w: QArray):
    return jnp.squeeze(a, axis=w.reduce_axes).astype(jnp.float32)


# --------------------------------------------------------------------------------------------------------
# XLA paths


GEMV_PARTIALS = 1 << 14  # split-K target: partial sums per product (H200: 2^14 > 2^17 > 2^19, BENCHMARKS.md)
# A row reduction over rows at least this long sums each row in ROW_SPLITS chunks first (more, shorter
# rows): llama-3-8b's down (4096 rows of 14336) 28.2 + 1.5 us instead of 31.9 per layer, batch-1 decode
# 4.341 vs 4.402 ms on an H200 (benchmarks/BENCHMARKS.md, session 10).
ROW_SPLIT_MIN_K = 8192
ROW_SPLITS = 4


def gemv(eq: str, x, w):
    """A one-row product as multiply + reduce over the weight in its stored order; float32 result.

    Why not einsum: inside the layer scan XLA feeds a dot's weight through a materialised dynamic slice
    (read + write + read: ~3x the bytes, measured on an H200). A reduction fusion reads the slice in
    place, once. The weight is viewed as 2-D (contracted letters leading or trailing, a free reshape),
    since XLA transposed whole stacked 3-D weights every step to reduce them; and a leading contraction
    is split into chunks summed in a second, tiny pass (split-K), since a column reduction over few
    output columns runs on few blocks and leaves bandwidth unused; long rows are summed in chunks too
    (`ROW_SPLIT_MIN_K`).
    """
    xs, ws = eq.replace(" ", "").split("->")[0].split(",")
    out = eq.replace(" ", "").split("->")[1]
    con = "".join(c for c in ws if c not in out)
    kept = "".join(c for c in ws if c in out)
    if any(c in xs and c in out for c in ws) or not (ws.startswith(con) or ws.endswith(con)):
        return _gemv_general(eq, x, w)
    k = math.prod(w.shape[ws.index(c)] for c in con)
    n = math.prod(w.shape[ws.index(c)] for c in kept)
    xv = x.reshape([d for c, d in zip(xs, x.shape) if c in ws])  # drop x's size-1 row letters
    xv = jnp.transpose(xv, [[c for c in xs if c in ws].index(c) for c in con]).reshape(k).astype(jnp.float32)
    if ws.startswith(con):
        splits = _splits(k, n)
        w3 = w.reshape(splits, k // splits, n).astype(jnp.float32)
        r = jnp.sum(xv.reshape(splits, k // splits, 1) * w3, axis=1)  # [splits, n]
        # The barrier keeps XLA from merging the two sums back into one long reduction.
        r = jnp.sum(jax.lax.optimization_barrier(r), axis=0) if splits > 1 else r[0]
    else:
        s = ROW_SPLITS if k >= ROW_SPLIT_MIN_K and k % (ROW_SPLITS * 32) == 0 else 1
        if s > 1:  # long rows: each summed in s chunks, then the chunks (kept apart as above)
            r = jnp.sum(w.reshape(n, s, k // s).astype(jnp.float32) * xv.reshape(s, k // s), axis=2)
            r = jnp.sum(jax.lax.optimization_barrier(r), axis=1)
        else:
            r = jnp.sum(w.reshape(n, k).astype(jnp.float32) * xv, axis=1)  # row reduction: already coalesced
    r = r.reshape([w.shape[ws.index(c)] for c in kept])
    r = jnp.transpose(r, [kept.index(c) for c in out if c in kept])
    return r.reshape([w.shape[ws.index(c)] if c in ws else 1 for c in out])


def _splits(k: int, n: int) -> int:
    """Power-of-two chunks of the contraction so that splits * n ~ GEMV_PARTIALS, chunks >= 32 long."""
    s = 1
    while s * 2 * n <= GEMV_PARTIALS and k % (s * 2) == 0 and k // (s * 2) >= 32:
        s *= 2
    return s


def _gemv_general(eq: str, x, w):
    """`gemv` for any letter order: broadcast x against w as stored, reduce the contracted axes."""
    xs, ws = eq.replace(" ", "").split("->")[0].split(",")
    out = eq.replace(" ", "").split("->")[1]
    kept = [c for c in xs if c in ws]  # x's letters that w has (contracted or shared)
    xk = x.reshape([d for c, d in zip(xs, x.shape) if c in ws])
    xk = jnp.transpose(xk, [kept.index(c) for c in ws if c in kept])
    xb = xk.reshape([x.shape[xs.index(c)] if c in kept else 1 for c in ws])  # broadcastable against w
    contracted = tuple(i for i, c in enumerate(ws) if c not in out)
    r = jnp.sum(xb.astype(jnp.float32) * w.astype(jnp.float32), axis=contracted)
    r_letters = [c for c in ws if c in out]
    r = jnp.transpose(r, [r_letters.index(c) for c in out if c in r_letters])
    return r.reshape([w.shape[ws.index(c)] if c in ws else 1 for c in out])


def qgemv(eq: str, x, w: QArray):
    """One row times a quantized weight as multiply + reduce (like `gemv`), float32 result.

    The reduction fusion reads the stored codes once, in place (also the scanned slice of a stacked
    weight), with the dequantization as elementwise work inside it:
    - fp8 per channel: `gemv` over the raw codes, the scale applied to the output;
    - int4 in groups, contraction leading: each packed byte is read once and multiplied with the two
      activations its nibbles belong to (no unpacked copy), scaled per group inside the sum, split-K;
    - anything else: `gemv` over the dequantize expression.
    """
    spec = _parse(eq, x, w)
    same = set(spec.reduce_letters) == set(spec.contracted)
    if w.fmt == "fp8" and w.group_size is None and same:
        # H200, llama-3-8b batch-1 step: codes + output scale 5.16 ms, dequantize expression 5.76 ms (bf16 6.38)
        out = gemv(eq, x, w.values)
        return jnp.einsum(f"{spec.out},{_scale_letters(spec, w)}->{spec.out}", out, _squeezed(w.scales, w))
    c = len(spec.contracted)
    leading = spec.w[:c] == spec.contracted and spec.x[-c:] == spec.contracted and spec.out == spec.x[:-c] + spec.w[c:]
    if w.fmt != "int4" or not same or not leading:
        # int8 per channel lands here on purpose: codes + output scale ran 6.37 ms, this 5.84 ms (H200, as above)
        return gemv(eq, x, dequantize(w, jnp.float32))
    K, g = spec.k, w.group_size
    G, h = K // g, g // 2
    N = math.prod(w.shape[c:])
    xv = x.reshape(G, 2, h).astype(jnp.float32)  # one row; contracted letters trailing, in w's order
    x_lo, x_hi = xv[:, 0, :, None], xv[:, 1, :, None]  # [G, h, 1]: the activations of the low / high nibbles
    p = w.values.reshape(G, h, N)
    lo, hi = (p & 0x0F).astype(jnp.float32), (p >> 4).astype(jnp.float32)
    if w.offsets is None:
        lo, hi = lo - 8.0, hi - 8.0
    term = (x_lo * lo + x_hi * hi) * w.scales.reshape(G, 1, N).astype(jnp.float32)  # [G, h, N]
    rows = G * h
    splits = _splits(rows, N)
    r = jnp.sum(term.reshape(splits, rows // splits, N), axis=1)
    r = jnp.sum(jax.lax.optimization_barrier(r), axis=0) if splits > 1 else r[0]
    if w.offsets is not None:  # sum_k x_k * m_group(k): one small reduction over groups
        xsum = jnp.sum(xv, axis=(1, 2))  # [G]
        r = r + jnp.einsum("g,gn->n", xsum, w.offsets.reshape(G, N).astype(jnp.float32))
    return r.reshape(*x.shape[:-c], *w.shape[c:])


def xla_matmul(eq: str, x, w: QArray):
    """The reference path, float32 result. Per-channel without offsets: contract the codes, scale the
    output; otherwise dequantize the weight to the activation dtype first."""
    spec = _parse(eq, x, w)
    if w.group_size is None and w.offsets is None and set(spec.reduce_letters) == set(spec.contracted):
        out = jnp.einsum(eq, x, codes(w).astype(x.dtype), preferred_element_type=jnp.float32)
        s = _scale_letters(spec, w)
        return jnp.einsum(f"{spec.out},{s}->{spec.out}", out, _squeezed(w.scales, w))
    return jnp.einsum(eq, x, dequantize(w, x.dtype), preferred_element_type=jnp.float32)


def fp8_matmul(eq: str, x, w: QArray):
    """Native fp8 x fp8 -> float32 matmul: activations quantized per row (token) to e4m3 with their own
    scale, weights per output channel; both scales applied to the float32 output. Float32 result."""
    if w.fmt != "fp8" or w.group_size is not None:
        raise ValueError(f"fp8_matmul needs a per-channel fp8 weight, got {w!r}")
    spec = _parse(eq, x, w)
    x_axes = tuple(i for i, c in enumerate(spec.x) if c in spec.contracted)
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=x_axes, keepdims=True)
    xs = jnp.where(amax == 0, 1.0, amax / FP8_MAX)
    xq = jnp.clip(xf / xs, -FP8_MAX, FP8_MAX).astype(FP8)
    # bf16 straight out of the fp8 dot (half the output traffic of float32); scales applied after, in f32
    acc = x.dtype if FP8_OUT_NARROW and x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    out = jnp.einsum(eq, xq, w.values, preferred_element_type=acc).astype(jnp.float32)
    x_letters = "".join(c for c in spec.x if c not in spec.contracted)
    s = _scale_letters(spec, w)
    return jnp.einsum(
        f"{spec.out},{x_letters},{s}->{spec.out}", out, jnp.squeeze(xs, axis=x_axes), _squeezed(w.scales, w)
    )


# --------------------------------------------------------------------------------------------------------
# Fused kernel path (GPU decode)


def _contraction_last(spec: _Spec) -> bool:
    """The weight's contracted letters trail (a `ContractLast` weight's stored order): the kernel takes
    them as [N, K] tiles into a transposed dot."""
    c = len(spec.contracted)
    return spec.w[-c:] == spec.contracted and spec.out == spec.x[:-c] + spec.w[:-c]


def _contraction_last_product(spec: _Spec, w) -> bool:
    """x's and the weight's contracted letters both trail, in the same order, and a quantized weight's reduce
    axes are the contracted ones: the `[M, K] @ [N, K]^T` shape the row and fragment kernels read."""
    c = len(spec.contracted)
    if not (_contraction_last(spec) and spec.x[-c:] == spec.contracted):
        return False
    return not isinstance(w, QArray) or set(spec.reduce_letters) == set(spec.contracted)


def _kernel_supports(spec: _Spec, x, w) -> bool:
    """The kernel computes x2d [M, K] @ W [K, N] with the contracted axes leading in w, in order (or
    trailing: W stored [N, K]), and x's contracted letters trailing in the same order; few rows; groups a
    power of two >= 32; plain weights in the activations' dtype."""
    c = len(spec.contracted)
    if spec.x[-c:] != spec.contracted:
        return False
    last = _contraction_last(spec)
    if not last and (spec.w[:c] != spec.contracted or spec.out != spec.x[:-c] + spec.w[c:]):
        return False
    if isinstance(w, QArray):
        fmt, group = w.fmt, w.group_size
        if set(spec.reduce_letters) != set(spec.contracted) or w.order != "rows":
            return False
    else:
        fmt, group = "plain", None
        if w.dtype != x.dtype:
            return False
    try:
        from pallas_kernels import weight_matmul as wm
    except ImportError:
        return False
    n = math.prod(w.shape[:-c] if last else w.shape[c:])
    return wm.supports(spec.rows, spec.k, n, fmt, group)


def _flat_kernel_args(spec: _Spec, w, layer):
    """((values, scales, offsets) flattened, fmt, group, free-axes shape) of w, an array or QArray with a
    leading layer axis when `layer` is given: contracted axes leading as [(L,) K(/2), N] (scales [(L,)
    K/g or 1, N]); contraction-last weights as [(L,) N, K(/2)] (scales [(L,) N, K/g or 1])."""
    c = len(spec.contracted)
    quantized = isinstance(w, QArray)
    values = w.values if quantized else w
    lead = () if layer is None else (values.shape[0],)
    # Groups run within the last contracted axis, so flattened contracted axes keep their group order (a
    # group never crosses the boundary of an outer contracted axis).
    if _contraction_last(spec):  # [(L,) N..., K...] -> [(L,) N, K]
        free = values.shape[len(lead):-c]
        flat = lambda a: None if a is None else a.reshape(*lead, math.prod(free), -1)  # noqa: E731
    else:  # [(L,) K..., N...] -> [(L,) K, N]
        free = values.shape[len(lead) + c:]
        flat = lambda a: None if a is None else a.reshape(*lead, -1, math.prod(free))  # noqa: E731
    if quantized:
        return (flat(values), flat(w.scales), flat(w.offsets)), w.fmt, w.group_size, free
    return (flat(values), None, None), "plain", None, free


def _pallas_matmul(spec: _Spec, x, w, layer=None):
    """The kernel on x and w (array or QArray), w with a leading layer axis when `layer` is given."""
    return _pallas_matmuls(x, [(spec, w)], layer)[0]


def _pallas_matmuls(x, products, layer):
    """One kernel launch for [(spec, w)] sharing x, K and the weight format."""
    from pallas_kernels import weight_matmul as wm

    args = [_flat_kernel_args(spec, w, layer) for spec, w in products]
    spec0 = products[0][0]
    c = len(spec0.contracted)
    transposed = _contraction_last(spec0)
    outs = wm.weight_matmuls(x.reshape(-1, spec0.k), tuple(a[0] for a in args), layer, fmt=args[0][1],
                             group_size=args[0][2], transposed=transposed)
    return [out.reshape(*x.shape[:-c], *a[3]) for out, a in zip(outs, args)]


def _fragment_kernel_applies(spec: _Spec, x, w: QArray) -> bool:
    """The fragment kernel takes: a GPU, whole arrays, bf16/f16 x of at most its row count, a contraction-last
    product whose contracted letters are the weight's reduce axes (the order's blocks were cut that way).
    Not `on_gpu()`, which tests patch to run kernels interpreted: Mosaic GPU's interpreter cannot run it."""
    if not (jax.default_backend() == "gpu" and whole_arrays() and x.dtype in (jnp.bfloat16, jnp.float16)):
        return False
    if not _contraction_last_product(spec, w):
        return False
    from pallas_kernels import fragment_matmul as fm

    return fm.supports(spec.rows, spec.k, math.prod(w.shape[:-len(spec.contracted)]), w.group_size)


def _s8_kernel_applies(spec: _Spec, x, w: QArray) -> bool:
    """The s8 kernel takes (`S8_KERNEL`): a GPU, whole arrays, bf16/f16 x of at most its row count, per-channel
    int8 codes in row order, a contraction-last product whose contracted letters are the weight's reduce axes."""
    if not (S8_KERNEL and w.fmt == "int8" and w.group_size is None and w.order == "rows"):
        return False
    if not (jax.default_backend() == "gpu" and whole_arrays() and x.dtype in (jnp.bfloat16, jnp.float16)):
        return False
    if not _contraction_last_product(spec, w):
        return False
    from pallas_kernels import int8_matmul as im

    return im.supports(spec.rows, spec.k, math.prod(w.shape[:-len(spec.contracted)]))


def _digits_matmul(path: str, spec: _Spec, x, w: QArray, layer=None):
    """The fragment kernel (`path` "fragments": a fragment-ordered int4 w) or the s8 kernel ("s8": per-channel
    int8) on x, with a leading layer axis on w when `layer` is given."""
    from pallas_kernels import fragment_matmul as fm

    if path == "s8":
        return _s8_matmuls(x, [(spec, w)], layer)[0]
    (values, scales, offsets), _, group, free = _flat_kernel_args(spec, w, layer)
    out = fm.fragment_matmul_digits(*_prepared_x(path, spec, x, group), values, scales, offsets, layer,
                                    rows=spec.rows, group_size=group, out_dtype=jnp.float32)
    return out.reshape(*x.shape[:-len(spec.contracted)], *free)


def _prepared_x(path: str, spec: _Spec, x, group: int | None):
    """x as the digit-reading kernels take it, (digits, inv_q, sums): the ones an `XDigits` carries when made for
    this product (for `s8`, made with any group: it reads no sums), else made by a launch of its own (`x_digits`;
    `x_digits_merged` from an `Unmerged` attention output with `MERGE_DIGITS`)."""
    from pallas_kernels import fragment_matmul as fm
    from pallas_kernels import int8_matmul as im
    from pallas_kernels import x_digits as xd

    group = group or im.SUMS_GROUP
    mp, width = fm.prepared_layout(spec.rows, group)
    layout = dict(rows=mp, group_size=group, width=width)
    if isinstance(x, XDigits) and (x.spec == (mp, group, width) or (path == "s8" and x.spec.rows == mp)):
        return x.digits, x.inv_q, x.sums
    if isinstance(x, Unmerged) and MERGE_DIGITS and xd.merged_supports(x.partials.o.shape, group):
        p = x.partials
        return xd.x_digits_merged(p.o, p.m, p.l, p.dtype, **layout)
    return xd.x_digits(value(x).reshape(-1, spec.k), **layout)


def _s8_matmuls(x, plan, layer):
    """One s8 launch for [(spec, w)] sharing x, K and the layer (a layer's q/k/v, gate/up)."""
    from pallas_kernels import int8_matmul as im

    args = [_flat_kernel_args(spec, w, layer) for spec, w in plan]
    spec0 = plan[0][0]
    digits, inv_q, _ = _prepared_x("s8", spec0, x, None)
    outs = im.int8_matmuls(digits, inv_q, tuple(a[0][:2] for a in args), layer, rows=spec0.rows,
                           out_dtype=jnp.float32)
    return [out.reshape(*x.shape[:-len(spec0.contracted)], *a[3]) for out, a in zip(outs, args)]


def matmuls(x, *products, out_dtype=None, impl: str = "auto"):
    """`matmul(eq, x, w)` for several `(eq, w)` products of one input (a layer's q/k/v, gate/up): one
    kernel launch when one kernel path (`pallas` or `s8`) takes every product and they share K, the weight
    format and the layer; otherwise one `matmul` each. `x` may be `Normed`. Returns a tuple in order.

    Products of all the parts (`PartOf`) of one packed weight, in order, are one product of the whole
    weight, returned as `Sliced` parts of its output."""
    packed = _packed_product(products)
    if packed is not None:
        eq, whole, cuts, axis = packed
        (out,) = matmuls(x, (eq, whole), out_dtype=out_dtype, impl=impl)
        return tuple(Sliced(out, start, size, axis) for start, size in cuts)
    products = [(eq, w.take() if isinstance(w, PartOf) else w) for eq, w in products]
    products = [_stored_order(eq, w) for eq, w in products]
    row = _row_plan(impl, x, products)
    if row is not None:
        return row(epilogue="none", out_dtype=out_dtype)
    x = x if isinstance(x, DIGITS_FROM_LAZY) else value(x)  # (the digit-reading paths prepare x from them: `_matmul`)
    out_dtype = out_dtype or x.dtype
    plan = []
    for eq, w in products:
        stacked = isinstance(w, LayerOf)
        view = w.shape_view() if stacked else w
        if isinstance(w, Observed) or (stacked and isinstance(w.stacked, Observed)):
            plan = None
            break
        spec = _parse(eq, x, view)
        path = _choose(impl, spec, x, view, stacked=w.depth() if stacked else 0)
        if path not in ("pallas", "s8"):
            plan = None
            break
        plan.append((spec, w.stacked if stacked else w, w.index if stacked else None, view, path))
    same = plan and all(
        p[0].k == plan[0][0].k and (p[2] is plan[0][2]) and _format(p[3]) == _format(plan[0][3])
        and _contraction_last(p[0]) == _contraction_last(plan[0][0]) and p[4] == plan[0][4] for p in plan)
    if len(products) < 2 or not same:
        return tuple(_matmul(eq, x, w, out_dtype, impl) for eq, w in products)
    pairs, layer = [(spec, w) for spec, w, *_ in plan], plan[0][2]
    outs = _s8_matmuls(x, pairs, layer) if plan[0][4] == "s8" else _pallas_matmuls(value(x), pairs, layer)
    return tuple(o.astype(out_dtype) for o in outs)


def _packed_product(products):
    """(eq, whole weight, [(start, size)], output axis) when `products` are every part of one packed weight
    in order, with one equation up to the letter of the packed axis; else None."""
    ws = [w for _, w in products]
    if len(ws) < 2 or not all(isinstance(w, PartOf) and w.whole is ws[0].whole for w in ws):
        return None
    whole = ws[0].whole
    if not _one_after_another(ws, (whole.shape_view() if isinstance(whole, LayerOf) else whole).shape[ws[0].axis]):
        return None

    def letters(eq, axis):
        lhs, out = eq.replace(" ", "").split("->")
        return lhs.split(",")[1][axis], lhs, out

    letter, lhs, out = letters(products[0][0], ws[0].axis)
    for eq, w in products[1:]:
        own, other_lhs, other_out = letters(eq, w.axis)
        if (other_lhs.replace(own, letter), other_out.replace(own, letter)) != (lhs, out):
            return None
    return products[0][0], whole, [(w.start, w.size) for w in ws], out.index(letter)


def _format(w) -> tuple:
    return (w.fmt, w.group_size, w.offsets is not None, w.order) if isinstance(w, QArray) else ("plain", w.dtype)


def swiglu(x, gate, up, *, impl: str = "auto"):
    """`silu(x @ gate) * (x @ up)` in x's dtype for two `(eq, w)` products of one input (the MLP's first
    half); one launch writing only the gated product on the `row` path. `x` may be `Normed`."""
    row = _row_plan(impl, x, [_stored_order(*gate), _stored_order(*up)], swiglu=True)
    if row is not None:
        return row(epilogue="swiglu", out_dtype=None)[0]
    g, u = (value(o) for o in matmuls(x, gate, up, impl=impl))  # parts of a packed gate/up come `Sliced`
    return jax.nn.silu(g) * u


# --------------------------------------------------------------------------------------------------------
# Fused one-row path (GPU batch-1 decode, contraction-last layer weights)


def on_gpu() -> bool:
    """Whether kernels that exist only for the GPU apply (the fused row path here, `attention.rotate_and_write`).
    Tests patch it to run those paths in interpret mode on the CPU."""
    return jax.default_backend() == "gpu"


def _row_plan(impl: str, x, products, *, residual=None, swiglu: bool = False):
    """A function running `products` (already in stored order) as one `row_matmul` launch, or None when
    the `row` path does not take them. It takes: one row of x in bf16/f16; every weight contraction-last,
    either each a layer (`LayerOf`, one shared layer index) or none (the output head, if `ROW_HEAD`), plain
    in x's dtype or quantized along its contracted axes, one format for all; whole arrays; the kernel's
    tiling; and under `auto` a GPU and a format in `ROW_FORMATS` (`impl="pallas"` forces it, in interpret
    mode off the GPU). A `Normed` x fuses its norm when its weight is a layer of the same index."""
    if impl not in ("auto", "pallas") or not ROW_KERNEL:
        return None
    if impl == "auto" and not on_gpu():
        return None
    if any(isinstance(w, PartOf) for _, w in products):  # parts of a packed weight: `matmuls` makes them as one
        return None
    xv = (x.x if isinstance(x, Normed) else jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, Unmerged)
          else value(x))  # (an `XDigits` as its normed array: the row kernel prepares x itself)
    if xv.dtype not in (jnp.bfloat16, jnp.float16) or not whole_arrays():
        return None
    flats, index, spec0, fmt = [], None, None, None
    layered = {isinstance(w, LayerOf) for _, w in products}
    if len(layered) != 1 or (layered == {False} and not ROW_HEAD):
        return None
    for eq, w in products:
        if isinstance(w, LayerOf):
            if index is not None and w.index is not index:
                return None
            inner, index, view = w.stacked, w.index, w.shape_view()
        else:
            inner = view = w
        if isinstance(inner, Observed):
            return None
        if isinstance(view, QArray):
            if (view.offsets is not None and view.fmt != "int4") or view.order != "rows":
                return None
        elif view.dtype != xv.dtype:
            return None
        spec = _parse(eq, xv, view)
        if spec.rows != 1 or not _contraction_last_product(spec, view):
            return None
        if (spec0 is not None and spec.k != spec0.k) or (fmt is not None and _format(view) != fmt):
            return None
        spec0, fmt = spec0 or spec, fmt or _format(view)
        flats.append(_flat_kernel_args(spec, inner, index))
    from pallas_kernels import row_matmul as rm

    _, kind, group, free = flats[0]
    c = len(spec0.contracted)
    widths = [f[0][0].shape[1] for f in flats]
    if impl == "auto" and kind not in ROW_FORMATS:
        return None
    if not rm.supports(spec0.k, widths, kind, group) or (swiglu and widths[0] != widths[1]):
        return None
    if residual is not None and residual.shape != xv.shape[:-c] + free:
        return None
    norm = None
    if isinstance(x, Normed):
        nw = x.weight
        if isinstance(nw, LayerOf) and nw.index is index and not isinstance(nw.stacked, (QArray, Observed)):
            norm = nw.stacked
        else:
            xv = x.value()
    lead = xv.shape[:-c]

    def run(*, epilogue, out_dtype):
        row = x.partials if isinstance(x, Unmerged) else xv.reshape(1, spec0.k)  # partials: merged by the kernel
        outs = rm.row_matmuls(
            row, tuple(f[0] for f in flats), index, fmt=kind, group_size=group, norm_weight=norm,
            eps=x.eps if norm is not None else 1e-6, epilogue=epilogue,
            residual=None if residual is None else residual.reshape(1, -1),
            out_dtype=out_dtype, interpret=jax.default_backend() != "gpu")
        return tuple(o.reshape(*lead, *f[3]) for o, f in zip(outs, flats))

    return run

