"""`pack_qkv(params)`: each layer's q, k and v weights stored as one matrix, so that one product makes all three.

Why: with contraction-last weights a batch-1 decode step multiplies q (4096 output rows in llama-3-8b) and k
and v (1024 each) as XLA row reductions, which fuse only reductions of one shape: q alone, then k and v
together. The three as one [6144, 4096] matrix took 13.6 us against 15.7 for the two launches on an H200
(benchmarks/BENCHMARKS.md, S10-2), a product that also reaches the decode attention kernel whole
(`pallas_kernels.decode_attention_append` reads the three heads' blocks in place).

A `Packed` leaf replaces `layers/q`, `layers/k` and `layers/v` by `layers/qkv`: the weights concatenated along
their head axis (the first output axis), plain or `ContractLast`, with the parts' names and sizes. The model
never sees it: `model.layer_view` hands out each part as `ops.PartOf`, and `ops.matmuls` makes the three
products as one where they come together. Float weights, and int4 weights in the tensor cores' fragment order
(`weight_layout.fragment_order`, which packs them with `pack_gate_up` too: no other kernel reads that order, so
one product a group of them is how they share a launch); other quantized q/k/v already run in one launch of the
row kernel or the weight kernel.

Sharded on `tensor`: `pack_qkv(params, shards=t)` lays the concatenation out per shard, [q_0 k_0 v_0 | q_1 k_1
v_1 | ...] with each block one device's heads, so that splitting the packed axis t ways hands every device a
packed matrix of its own q, k and v heads (the per-shard layers of `tensor_parallel` then make the three
products as one, as on one device). Such a tree runs only split that way; the sharding rules refuse a packed
tree whose `shards` is not the tensor degree (a head split would mix the parts).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .quant.qarray import QArray
from .weight_layout import ContractLast

PACK_FLOAT_QKV = True  # the command line and the bench pack float contract-last trees (False: for comparisons)
QKV = ("q", "k", "v")
GATE_UP = ("w_gate", "w_up")  # packed along their output (ffn) axis, the last logical one
HEAD_AXIS = -2  # the parts' concatenated logical axis: q [.., D, N, H], k and v [.., D, K, H]


@struct.dataclass
class Packed:
    """Weights sharing their input, stored as one: concatenated along the logical axis `axis` (negative,
    counted from the end of the logical shape) in the order of `parts`, (name, size) pairs."""

    values: Any  # the concatenation: an array in the stored order, or a ContractLast
    parts: tuple[tuple[str, int], ...] = struct.field(pytree_node=False)
    axis: int = struct.field(pytree_node=False, default=HEAD_AXIS)
    shards: int = struct.field(pytree_node=False, default=1)  # blocks along `axis`, each holding every part

    @property
    def shape(self):
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype

    def offsets(self, length: int | None = None):
        """(name, start, size) of each part along the packed axis of a matrix `length` long there: the whole
        packed axis (the default) or, for a tree packed per shard, one shard's block of it."""
        total = sum(size for _, size in self.parts)
        length = total if length is None else length
        if length * self.shards != total:
            raise ValueError(
                f"q/k/v packed for {self.shards} tensor shards run only split that way (a matrix {length} heads "
                f"long along the packed axis, expected {total // self.shards}): run it on a mesh with tensor="
                f"{self.shards}, or pack the unpacked tree for this one")
        out, start = [], 0
        for name, size in self.parts:
            out.append((name, start, size // self.shards))
            start += size // self.shards
        return tuple(out)

    def axis_names(self) -> "Packed":
        """The logical axis names of the stored values (for sharding rules), as a `Packed` of them (`pack_qkv`
        names the packed axis like the query heads when it lays it out per shard, so the rules split it the
        same way, and leaves it unnamed otherwise)."""
        if not isinstance(self.values, ContractLast):
            raise ValueError("sharding a packed tree needs contraction-last weights (`contract_last`) with axis names")
        return self.replace(values=self.values.axis_names())


def is_packed(x) -> bool:
    return isinstance(x, Packed)


def has_packed(params) -> bool:
    return any(is_packed(leaf) for leaf in jax.tree.leaves(params, is_leaf=is_packed))


def stored_axis(w, axis: int) -> int:
    """The stored axis (negative) of a weight's logical axis `axis` (negative): itself for an array, and for
    a `ContractLast` where its stored order puts it (kept axes before the contracted ones)."""
    if not isinstance(w, ContractLast):
        return axis
    if axis >= -w.kept:  # a kept axis: stored before the contracted ones
        return axis - w.contracted
    return axis + w.kept if axis >= -(w.kept + w.contracted) else axis  # contracted: stored last; leading: same


def pack_qkv(params, shards: int = 1):
    """The parameter tree with each layer's q, k and v replaced by one `Packed` `qkv` leaf (concrete or
    abstract arrays, plain or `ContractLast`); `shards`: laid out for a `tensor` degree (module docstring).
    Errors: no layer q/k/v, quantized weights (but fragment-ordered int4 on one shard), a tree already packed,
    a degree that does not divide the heads of each part, a per-shard layout of weights without
    contraction-last axis names."""
    return _pack(params, QKV, "qkv", HEAD_AXIS, shards)


def pack_gate_up(params):
    """The tree with each layer's w_gate and w_up as one `Packed` `w_gate_up` leaf (concatenated along the
    ffn axis): for fragment-ordered int4 weights (`weight_layout.fragment_order`), unsharded."""
    return _pack(params, GATE_UP, "w_gate_up", -1, 1)


def fragment_ordered(w) -> bool:
    """Whether `w` (a QArray, or one inside a `ContractLast`) is int4 in the fragment order."""
    v = w.values if isinstance(w, ContractLast) else w
    return isinstance(v, QArray) and v.order == "fragments"


def _pack(params, names: tuple[str, ...], packed_name: str, logical_axis: int, shards: int):
    layers = params.get("layers", {}) if isinstance(params, dict) else {}
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    if packed_name in layers:
        raise ValueError(f"the parameter tree already has {listed} packed")
    missing = [n for n in names if n not in layers]
    if missing:
        raise ValueError(f"packing needs the layers' {', '.join(names)} weights; missing layers/"
                         f"{', layers/'.join(missing)}")
    ws = [layers[n] for n in names]
    quantized = [isinstance(w, QArray) or isinstance(getattr(w, "values", None), QArray) for w in ws]
    if any(quantized) and not (all(fragment_ordered(w) for w in ws) and shards == 1):
        raise ValueError(f"packing {listed} takes float weights, or int4 weights in the fragment order "
                         "on one shard (other quantized weights already run in one launch of a kernel): keep a "
                         "quantized tree unpacked")
    kinds = {type(w) for w in ws}
    if len(kinds) != 1:
        raise ValueError(f"{listed} must share one layout to be packed, got {[type(w).__name__ for w in ws]}")
    first = ws[0]
    if shards > 1 and not (isinstance(first, ContractLast) and first.logical_axes):
        raise ValueError("pack_qkv(shards=...) lays out contraction-last weights with axis names (`contract_last`)")
    axis = stored_axis(first, logical_axis)
    arrays = [w.values if isinstance(w, ContractLast) else w for w in ws]
    sizes = tuple((n, int(a.shape[axis])) for n, a in zip(names, arrays))
    bad = [f"{n}={size}" for n, size in sizes if size % shards]
    if bad:
        raise ValueError(f"pack_qkv: {shards} shards do not divide the heads of {', '.join(bad)}")
    blocks = [_split(a, shards, axis) for a in arrays]  # per part, its `shards` blocks of heads
    packed = _concatenate([part[s] for s in range(shards) for part in blocks], axis)
    if isinstance(first, ContractLast):
        axis_names = first.logical_axes
        if axis_names:  # parts of several kinds: named like the first only where the rules may split them
            i = logical_axis % len(axis_names)
            axis_names = axis_names[:i] + (axis_names[i] if shards > 1 else None,) + axis_names[i + 1:]
        packed = first.replace(values=packed, logical_axes=axis_names)
    new_layers = {k: v for k, v in layers.items() if k not in names}
    new_layers[packed_name] = Packed(values=packed, parts=sizes, axis=logical_axis, shards=shards)
    return {**params, "layers": new_layers}


def _split(a, n: int, axis: int):
    """`a` in `n` equal blocks along `axis` (concrete or abstract)."""
    if n == 1:
        return [a]
    if isinstance(a, jax.ShapeDtypeStruct):
        shape = list(a.shape)
        shape[axis] //= n
        return [jax.ShapeDtypeStruct(tuple(shape), a.dtype)] * n
    return (np if isinstance(a, np.ndarray) else jnp).split(a, n, axis=axis)


def _concatenate(arrays, axis: int):
    if isinstance(arrays[0], QArray):  # (not the group axis: scales and offsets share its position)
        cat = lambda xs: None if xs[0] is None else _concatenate(xs, axis)  # noqa: E731
        return arrays[0].replace(values=cat([a.values for a in arrays]), scales=cat([a.scales for a in arrays]),
                                 offsets=cat([a.offsets for a in arrays]))
    if isinstance(arrays[0], jax.ShapeDtypeStruct):
        shape = list(arrays[0].shape)
        shape[axis] = sum(a.shape[axis] for a in arrays)
        return jax.ShapeDtypeStruct(tuple(shape), arrays[0].dtype)
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.concatenate(arrays, axis=axis)
    return jnp.concatenate(arrays, axis=axis)
