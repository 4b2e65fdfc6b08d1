"""`QArray`: one quantized weight as a pytree, and the array math to make and undo it.

A `QArray` stands for a float array `w` of `shape` (its "logical" shape). Along its reduce axes (the
axes a matmul contracts) `w` is cut into groups; each group has one scale (and, optionally, one offset):

    int8:  w = q * scale                      q int8 in [-127, 127]
    fp8:   w = q * scale                      q float8_e4m3fn (|q| <= 448)
    int4:  w = (u - 8) * scale                u a 4-bit code in [0, 15] (symmetric, like GGUF Q4_0)
           w = u * scale + offset             with offsets (asymmetric, like GGUF Q4_1: offset = group min)

`group_size=None` means one group per output channel: the scale covers all reduce axes (scales keep
them as size-1 axes). A group size means groups of `group_size` consecutive elements along the last
reduce axis (scales have that axis divided by the group size). int4 codes are packed two per byte
along that axis, GGUF style: within each group, byte j holds element j in its low nibble and element
j + group/2 in its high nibble, so a packed byte never straddles groups (or shards of that axis).

`order="fragments"` (int4 only): the same bytes permuted for the tensor cores' batched product
(`fragments.py`, `to_fragment_order`); `codes` and `dequantize` read either order.

Axes are stored counted from the end (negative), so slicing leading axes off (as `lax.scan` does over
the stacked `layers` axis) leaves the metadata valid. The leaf's logical axis names travel with it so
sharding rules still apply (`axis_names`). Knows nothing about models or kernels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import fragments

FORMATS = ("int8", "int4", "fp8")
FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
INT8_MAX = 127.0
INT4_CENTER = 8  # symmetric int4: code u stands for u - 8


@struct.dataclass
class QArray:
    """A quantized array. Children: scales, values, offsets (scales first: see `compute_dtype`)."""

    scales: jax.Array  # float; `shape` with reduce axes -> 1 (per channel) or the group axis / group_size
    values: jax.Array  # int8 / float8_e4m3fn of `shape`; int4: uint8 with the group axis halved
    offsets: jax.Array | None = None  # like scales (asymmetric int4 only), else None
    fmt: str = struct.field(pytree_node=False, default="int8")
    reduce_axes: tuple[int, ...] = struct.field(pytree_node=False, default=(-2,))  # negative axis numbers
    group_size: int | None = struct.field(pytree_node=False, default=None)
    dtype_name: str = struct.field(pytree_node=False, default="bfloat16")  # the dequantized dtype
    logical_axes: tuple[str | None, ...] | None = struct.field(pytree_node=False, default=None)
    order: str = struct.field(pytree_node=False, default="rows")  # int4: "rows" or "fragments" (fragments.py)

    # -- shape information (works on concrete and abstract children alike) -------------------------------

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def group_axis(self) -> int:
        """The (negative) axis along which groups run and int4 codes are packed."""
        return self.reduce_axes[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.values.shape)
        if self.fmt == "int4":
            shape[self.group_axis] *= 2
        return tuple(shape)

    @property
    def dtype(self):
        return jnp.dtype(self.dtype_name)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(a) for a in (self.scales, self.values, self.offsets) if a is not None)

    def axis_names(self) -> "QArray":
        """The logical axis names of each child, as a `QArray` of tuples (same tree structure as self).

        Values keep the original names (a packed axis is still the same axis, halved); scales and
        offsets keep them too, except size-1 (reduced per-channel) axes, which get None.
        """
        names = self.logical_axes
        if names is None:
            names = (None,) * self.ndim
        names = tuple(names[len(names) - self.ndim :])  # leading axes sliced off (scan) drop out
        scale_names = tuple(None if d == 1 else n for d, n in zip(self.scales.shape, names))
        return self.replace(
            scales=scale_names, values=names, offsets=None if self.offsets is None else scale_names
        )

    def __repr__(self) -> str:
        if not hasattr(self.values, "shape"):  # a tree of something else (axis names, shapes, ...)
            return f"QArray(scales={self.scales!r}, values={self.values!r}, offsets={self.offsets!r}, fmt={self.fmt!r})"
        group = f", group_size={self.group_size}" if self.group_size else ", per-channel"
        order = ", order=fragments" if self.order != "rows" else ""
        return (f"QArray({self.fmt}{group}, shape={self.shape}, dtype={self.dtype_name}, "
                f"reduce_axes={self.reduce_axes}{order})")


def _nbytes(a) -> int:
    return int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


def compute_dtype(params):
    """The float dtype a (possibly quantized) parameter tree computes in.

    Plain trees: the first leaf's dtype. A QArray's first child is its scales, but its compute dtype is
    the dtype it dequantizes to, so this looks at QArrays first.
    """
    for leaf in jax.tree.leaves(params, is_leaf=is_qarray):
        if isinstance(leaf, QArray):
            return leaf.dtype
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.dtype(leaf.dtype)
    raise ValueError("the parameter tree has no floating-point leaves")


# --------------------------------------------------------------------------------------------------------
# Validation shared by quantize and the loaders


def normalize_axes(axes, ndim: int) -> tuple[int, ...]:
    """Sorted negative axis numbers; out of range is an error."""
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array of {ndim} dimensions")
        out.append(a - ndim if a >= 0 else a)
    return tuple(sorted(set(out)))


def check_group(shape, reduce_axes, fmt: str, group_size: int | None, what: str = "array"):
    """Raise a clear error when `group_size` cannot cut the group axis of `shape` evenly."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "int4" and group_size is None:
        raise ValueError("int4 needs a group size (e.g. 32, 64 or 128): per-channel int4 loses too much")
    if group_size is None:
        return
    if group_size < 1 or (fmt == "int4" and group_size % 2):
        raise ValueError(f"group size must be a positive{' even' if fmt == 'int4' else ''} integer, got {group_size}")
    dim = shape[reduce_axes[-1]]
    if dim % group_size:
        raise ValueError(
            f"group size {group_size} does not divide dimension {dim} (axis {reduce_axes[-1]} of {what} with "
            f"shape {tuple(shape)}); choose a group size that divides {dim}"
        )


# --------------------------------------------------------------------------------------------------------
# Group reshapes


def _split_group_axis(x, axis: int, group_size: int):
    """[..., A, ...] -> [..., A/g, g, ...] at negative `axis`; the group index stays at `axis - 1`."""
    shape = x.shape
    a = axis % len(shape)
    return x.reshape(*shape[:a], shape[a] // group_size, group_size, *shape[a + 1 :])


def _merge_group_axis(x, axis: int):
    """Inverse of `_split_group_axis`: `axis` is the negative axis of the merged result."""
    shape = x.shape
    a = (axis % (len(shape) - 1))  # position in the merged array
    return x.reshape(*shape[:a], shape[a] * shape[a + 1], *shape[a + 2 :])


def pack_int4(codes, axis: int, group_size: int):
    """uint8 codes in [0, 15] -> uint8 bytes, two per byte along `axis` (group halves, GGUF order)."""
    g = _split_group_axis(codes.astype(jnp.uint8), axis, group_size)  # [..., A/g, g, ...]
    a = axis % codes.ndim + 1  # the within-group axis of g
    half = group_size // 2
    lo = jax.lax.slice_in_dim(g, 0, half, axis=a)
    hi = jax.lax.slice_in_dim(g, half, group_size, axis=a)
    return _merge_group_axis(lo | (hi << 4), axis)


def unpack_int4(packed, axis: int, group_size: int):
    """Inverse of `pack_int4`: uint8 bytes -> uint8 codes in [0, 15], `axis` doubled."""
    g = _split_group_axis(packed, axis, group_size // 2)  # [..., A/g, g/2, ...]
    a = axis % packed.ndim + 1
    codes = jnp.concatenate([g & 0x0F, g >> 4], axis=a)  # [..., A/g, g, ...]
    return _merge_group_axis(codes, axis)


# --------------------------------------------------------------------------------------------------------
# Quantize / dequantize (pure jnp: jittable, and usable under jax.eval_shape for abstract trees)


def quantize_array(
    w,
    fmt: str,
    reduce_axes,
    group_size: int | None = None,
    *,
    zero_point: bool = False,
    scale_dtype=None,
    logical_axes=None,
    importance=None,
) -> QArray:
    """Quantize float `w` along `reduce_axes` (the axes its matmuls contract); see `_quantize_array`.
    Jitted per shape and format (the scale searches are loops), so eager calls stay cheap."""
    return _quantize_array_jit(
        w, importance=importance, fmt=fmt, reduce_axes=tuple(reduce_axes), group_size=group_size, zero_point=zero_point,
        scale_dtype=None if scale_dtype is None else jnp.dtype(scale_dtype).name,
        logical_axes=None if logical_axes is None else tuple(logical_axes),
    )


def _quantize_array(
    w,
    fmt: str,
    reduce_axes,
    group_size: int | None = None,
    *,
    zero_point: bool = False,
    scale_dtype=None,
    logical_axes=None,
    importance=None,
) -> QArray:
    """Quantize float `w` along `reduce_axes` (the axes its matmuls contract).

    `importance` (int4 only; broadcastable to `w`, e.g. the mean square of the activations each input
    channel sees, from `calibrate.activation_stats`) weights the error the int4 search minimises.
    """
    reduce_axes = normalize_axes(reduce_axes, w.ndim)
    check_group(w.shape, reduce_axes, fmt, group_size)
    if zero_point and fmt != "int4":
        raise ValueError(f"zero points are only supported for int4, not {fmt}")
    scale_dtype = jnp.dtype(scale_dtype or default_scale_dtype(fmt))
    wf = w.astype(jnp.float32)
    if group_size is None:
        stat_axes = reduce_axes
        grouped = wf
    else:
        grouped = _split_group_axis(wf, reduce_axes[-1], group_size)  # [..., A/g, g, ...]
        stat_axes = (reduce_axes[-1],)  # the within-group axis (counted from the end, it keeps its number)

    act = None
    if importance is not None:
        act = jnp.broadcast_to(jnp.asarray(importance, jnp.float32), w.shape)
        act = act if group_size is None else _split_group_axis(act, reduce_axes[-1], group_size)

    def amax():
        return jnp.max(jnp.abs(grouped), axis=stat_axes, keepdims=True)

    offsets = None
    if fmt == "int4":
        # The search reduces over each group many times: run it with the group axis innermost (contiguous).
        last = lambda a: None if a is None else jnp.moveaxis(a, stat_axes[0], -1)
        back = lambda a: None if a is None else jnp.moveaxis(a, -1, stat_axes[0])
        if zero_point:
            scale, offsets, codes = map(back, _int4_asymmetric(last(grouped), -1, scale_dtype, last(act)))
        else:
            scale, codes = map(back, _int4_symmetric(last(grouped), -1, scale_dtype, last(act)))
    elif fmt == "int8":
        scale = _round_scale(amax() / INT8_MAX, scale_dtype)
        codes = jnp.clip(jnp.round(grouped / scale), -INT8_MAX, INT8_MAX)
    else:  # fp8
        scale, codes = _fp8_search(grouped, stat_axes, amax(), scale_dtype, act)

    if group_size is not None:
        codes = _merge_group_axis(codes, reduce_axes[-1])
        squeeze = lambda s: jnp.squeeze(s, axis=reduce_axes[-1])  # drop the size-1 within-group axis
        scale = squeeze(scale)
        offsets = None if offsets is None else squeeze(offsets)

    if fmt == "int8":
        values = codes.astype(jnp.int8)
    elif fmt == "fp8":
        values = codes.astype(FP8)
    else:
        values = pack_int4(codes.astype(jnp.uint8), reduce_axes[-1], group_size)
    return QArray(
        scales=scale.astype(scale_dtype),
        values=values,
        offsets=None if offsets is None else offsets.astype(scale_dtype),
        fmt=fmt,
        reduce_axes=reduce_axes,
        group_size=group_size,
        dtype_name=jnp.dtype(w.dtype).name,
        logical_axes=None if logical_axes is None else tuple(logical_axes),
    )


_quantize_array_jit = jax.jit(
    _quantize_array, static_argnames=("fmt", "reduce_axes", "group_size", "zero_point", "scale_dtype", "logical_axes")
)


def default_scale_dtype(fmt: str):
    """float16 for int4 (one scale per small group: 2 bytes matter, as in GGUF); float32 otherwise
    (one scale per output channel: negligible size)."""
    return jnp.dtype(jnp.float16 if fmt == "int4" else jnp.float32)


# Searched scales. int4 has 16 levels: where the scale (and offset) sit matters, so both int4 quantizers
# search: each candidate step gives codes by round-to-nearest, then (scale, offset) are refit to those
# codes by weighted least squares, and the candidate with the least weighted squared error wins
# (llama.cpp's make_qkx search). fp8 keeps ~2^-4 relative precision at any scale, but where its grid
# falls depends on the scale: 8 scales over one octave are tried. The plain candidate (min/max, signed
# max, amax/448) is always among them, so a search never does worse than it by its own measure.
SEARCH_STEPS = 21  # int4 candidate steps: (15 or 8) + (-1.0, -0.9, ..., +1.0)
FP8_STEPS = 8


def _importance(w, axis, act):
    """Per-element weights of the error, as llama.cpp weighs them: sqrt(group mean square + w^2), so the
    search does not buy a lower mean error by clipping the large weights a model depends on; times the
    activation mean square of the element's input channel where calibration data is given (imatrix)."""
    imp = jnp.sqrt(jnp.mean(w * w, axis=axis, keepdims=True) + w * w)
    return imp if act is None else imp * act


def _sse(w, s, m, codes, axis, imp):
    return jnp.sum(imp * jnp.square(codes * s + m - w), axis=axis, keepdims=True)


def _search(n: int, first, candidate):
    """Keep the lowest-error result among `first` and `candidate(i)` for i < n (error is the last item)."""

    def body(i, best):
        cand = candidate(i, best)
        better = cand[-1] < best[-1]
        return tuple(jnp.where(better, c, b) for c, b in zip(cand, best))

    return jax.lax.fori_loop(0, n, body, first)


def _int4_asymmetric(w, axis: int, scale_dtype, act=None):
    """w ~ u * s + m, u in [0, 15], per group along `axis` (a within-group axis, keepdims stats)."""
    imp = _importance(w, axis, act)
    total = jnp.sum(imp, axis=axis, keepdims=True)
    lo = jnp.min(w, axis=axis, keepdims=True)
    hi = jnp.max(w, axis=axis, keepdims=True)
    span = jnp.where(hi > lo, hi - lo, 1.0)
    sum_w = jnp.sum(imp * w, axis=axis, keepdims=True)
    plain = (span / 15.0, lo)

    def candidate(i, best):  # codes for this step, then (s, m) refit to them; error before storage rounding
        step = -1.0 + 0.1 * i.astype(jnp.float32)
        u = jnp.clip(jnp.round((w - lo) * ((15.0 + step) / span)), 0, 15)
        su, suu = jnp.sum(imp * u, axis, keepdims=True), jnp.sum(imp * u * u, axis, keepdims=True)
        suw = jnp.sum(imp * u * w, axis, keepdims=True)
        det = total * suu - su * su
        s = (total * suw - su * sum_w) / jnp.where(det > 0, det, 1.0)
        m = (sum_w - s * su) / total
        ok = (det > 0) & (s > 0)
        s, m = jnp.where(ok, s, best[0]), jnp.where(ok, m, best[1])
        return s, m, _sse(w, s, m, u, axis, imp)

    u0 = jnp.clip(jnp.round((w - lo) / plain[0]), 0, 15)
    s, m, _ = _search(SEARCH_STEPS, (*plain, _sse(w, *plain, u0, axis, imp)), candidate)
    # store-rounded scale and offset; final codes against them
    s = _round_scale(s, scale_dtype)
    m = m.astype(scale_dtype).astype(jnp.float32)
    return s, m, jnp.clip(jnp.round((w - m) / s), 0, 15)


def _int4_symmetric(w, axis: int, scale_dtype, act=None):
    """w ~ (u - 8) * d, u in [0, 15]; d starts from GGUF Q4_0's rule (the signed largest magnitude maps
    to -8, using all 16 levels) and is searched like the asymmetric case with the offset fixed at 0."""
    idx = jnp.argmax(jnp.abs(w), axis=axis, keepdims=True)
    signed_max = jnp.take_along_axis(w, idx, axis=axis)
    signed_max = jnp.where(signed_max == 0, 1.0, signed_max)
    imp = _importance(w, axis, act)

    def candidate(i, best):
        step = -1.0 + 0.1 * i.astype(jnp.float32)
        q = jnp.clip(jnp.round(w * ((-8.0 - step) / signed_max)), -8, 7)
        sqq = jnp.sum(imp * q * q, axis, keepdims=True)
        d = jnp.sum(imp * q * w, axis, keepdims=True) / jnp.where(sqq > 0, sqq, 1.0)
        d = jnp.where((sqq > 0) & (d != 0), d, best[0])
        return d, _sse(w, d, 0.0, q, axis, imp)

    d0 = signed_max / -8.0
    q0 = jnp.clip(jnp.round(w / d0), -8, 7)
    d, _ = _search(SEARCH_STEPS, (d0, _sse(w, d0, 0.0, q0, axis, imp)), candidate)
    d = _round_scale(d, scale_dtype)
    return d, jnp.clip(jnp.round(w / d), -8, 7) + INT4_CENTER


def _fp8_search(w, axes, amax, scale_dtype, act):
    """fp8 codes (as float32) and scale: 8 scales over one octave from amax/448, least weighted error."""
    imp = jnp.sqrt(jnp.mean(w * w, axis=axes, keepdims=True) + w * w)
    imp = imp if act is None else imp * act

    def finish(s):
        s = _round_scale(s, scale_dtype)
        q = jnp.clip(w / s, -FP8_MAX, FP8_MAX).astype(FP8).astype(jnp.float32)
        return s, q, jnp.sum(imp * jnp.square(q * s - w), axis=axes, keepdims=True)

    # Scales only grow from amax/448 (up to one octave), so the largest element never clips.
    up = lambda i: 2.0 ** ((i + 1).astype(jnp.float32) / FP8_STEPS)
    s, q, _ = _search(FP8_STEPS - 1, finish(amax / FP8_MAX), lambda i, best: finish(amax / FP8_MAX * up(i)))
    return s, q


def _round_scale(scale, scale_dtype):
    """Scales rounded to their storage dtype first (so codes are computed against the stored scale); a
    zero scale (an all-zero group) becomes 1 so that nothing divides by zero."""
    scale = jnp.where(scale == 0, 1.0, scale)
    return scale.astype(scale_dtype).astype(jnp.float32)


def _fragment_view(q: QArray) -> tuple[tuple[int, ...], int, int]:
    """(leading shape, N, K) of an int4 `QArray` whose trailing axes are its reduce axes (K, flattened) and
    whose axis before them is N; a ValueError naming the problem otherwise."""
    r = len(q.reduce_axes)
    if q.fmt != "int4" or q.group_size is None or q.reduce_axes != tuple(range(-r, 0)) or q.ndim < r + 1:
        raise ValueError(f"the fragment order takes int4 weights grouped along trailing reduce axes after an "
                         f"output axis, got {q!r}")
    lead, n, k = q.shape[:-r - 1], q.shape[-r - 1], math.prod(q.shape[-r:])
    fragments.check_fragment_shape(n, k, q.group_size, what=repr(q))
    return lead, n, k


def to_fragment_order(q: QArray) -> QArray:
    """An int4 `QArray` with its bytes in the tensor cores' fragment order (`fragments.py`), shapes and dtypes
    unchanged: values and group parameters flattened to [..., N, K] around the trailing reduce axes (as the
    products flatten them). Already in that order: returned as is."""
    if q.order == "fragments":
        return q
    lead, n, k = _fragment_view(q)
    u = unpack_int4(q.values.reshape(*lead, n, k // 2), -1, q.group_size)
    perm = lambda a: fragments.permute_group_params(a.reshape(*lead, n, -1)).reshape(a.shape)  # noqa: E731
    return q.replace(values=fragments.pack_codes(u).reshape(q.values.shape), scales=perm(q.scales),
                     offsets=None if q.offsets is None else perm(q.offsets), order="fragments")


def to_row_order(q: QArray) -> QArray:
    """Inverse of `to_fragment_order` (row-ordered arrays returned as they are)."""
    if q.order == "rows":
        return q
    if q.order != "fragments":
        raise ValueError(f"unknown QArray order {q.order!r}; choose one of {', '.join(fragments.ORDERS)}")
    lead, n, k = _fragment_view(q)
    u = fragments.unpack_codes(q.values.reshape(*lead, n, k // 2))
    unperm = lambda a: fragments.unpermute_group_params(a.reshape(*lead, n, -1)).reshape(a.shape)  # noqa: E731
    return q.replace(values=pack_int4(u, -1, q.group_size).reshape(q.values.shape), scales=unperm(q.scales),
                     offsets=None if q.offsets is None else unperm(q.offsets), order="rows")


def codes(q: QArray):
    """The integer (or fp8) values of `q` unpacked to the logical shape, as float32 ready to scale:
    int4 symmetric codes are centred (u - 8); asymmetric ones stay in [0, 15]."""
    q = to_row_order(q)
    if q.fmt == "int4":
        u = unpack_int4(q.values, q.group_axis, q.group_size).astype(jnp.float32)
        return u if q.offsets is not None else u - INT4_CENTER
    return q.values.astype(jnp.float32)


def dequantize(q: QArray, dtype=None):
    """The float array `q` stands for, in `dtype` (default: the dtype it was quantized from)."""
    dtype = dtype or q.dtype
    q = to_row_order(q)
    c = codes(q)
    scales = q.scales.astype(jnp.float32)
    offsets = None if q.offsets is None else q.offsets.astype(jnp.float32)
    if q.group_size is None:
        w = c * scales if offsets is None else c * scales + offsets
        return w.astype(dtype)
    axis = q.group_axis
    cg = _split_group_axis(c, axis, q.group_size)  # [..., A/g, g, ...]
    expand = lambda s: jnp.expand_dims(s, axis)  # [..., A/g, 1, ...]
    w = cg * expand(scales)
    if offsets is not None:
        w = w + expand(offsets)
    return _merge_group_axis(w, axis).astype(dtype)


def bits_per_element(q: QArray) -> float:
    """Stored bits per logical element, scales and offsets included."""
    return 8.0 * q.nbytes / math.prod(q.shape)
