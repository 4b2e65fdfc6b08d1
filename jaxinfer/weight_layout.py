"""`contract_last(params)`: the weight matrices stored with their contracted axes last, for XLA's products.

The library's matrices are stored input-axes first (`q [L, D, N, H]`, `w_down [L, F, D]`, `lm_head
[D, V]`), the layout the Pallas weight kernel streams. Without that kernel (`ops.PLAIN_KERNEL` off, a
platform or shape it does not take) a one-row product is XLA's multiply + reduce over the weight
(`ops.gemv`), and the stored order decides which reduction that is: contracted axes first make a column
reduction, which streamed llama-3-8b's layer weights at 0.59 of copy bandwidth on an H200; contracted axes
last make a row reduction over contiguous memory, 0.85 (`benchmarks/decode_variants.py --weights-only`,
BENCHMARKS.md). `contract_last` is a parameter transform like `quantize`: it wraps each matrix in a
`ContractLast` leaf holding the transposed array (or, quantized after the transform, a `QArray` of it), and
`ops.matmul` rewrites the product's equation for the stored order, so `model.py` never sees the difference.
On a GPU one row then takes XLA's row reduction and 2-128 rows the Pallas weight kernel with [N, K] tiles
in a transposed dot: llama-3-8b bf16 decode on an H200 with Pallas attention, batch 1 4.40 ms (0.81 of
copy) against 4.64 ms stored, batches 8-128 within 1 % of the stored layout (BENCHMARKS.md, session 5).
Quantized in this layout, one row takes the fused row kernel (`pallas_kernels/row_matmul.py`, the fastest
batch-1 step of every format) and 2-128 rows the weight kernel's transposed tiles too (int8 batch 16 3.79 ms,
1.37x bf16, against 4.65 stored; int4 3.82, 1.36x; stored 4.08 with the previous tiling: BENCHMARKS.md,
sessions 12-13).

The command line (`generate`, `chat`, `perplexity`, `bench`) applies it by default (`DEFAULT_LAYOUT`) to
float weights: H200 llama-3-8b bf16 decode, context 1024, ms per step stored / contraction-last in two
processes each: batch 1 4.556 / 4.272 (6 % faster), 8 4.855 / 4.944, 32 6.009 / 6.080 (1-2 % slower), 128
11.961 / 11.784; prefill 2048 tokens 61.0 / 59.9 ms, 8192 234.5 / 235.1 (BENCHMARKS.md, session 11). Trees
that must keep the checkpoint's order (GGUF blocks kept quantized, calibration) stay stored.

Knows nothing about models beyond the parameter table (`params.axes_by_path`, `params.contracted_axes`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .params import LAYER_MATRICES, axes_by_path, contracted_axes, path_names
from .quant.qarray import QArray, to_fragment_order


LAYOUTS = ("stored", "contract-last", "fragments")  # fragments: contract-last, then int4 in `fragment_order`
DEFAULT_LAYOUT = "contract-last"  # the command line's layout for float weights (see above)


@struct.dataclass
class ContractLast:
    """A weight whose logical axes `[..., in..., out...]` are stored as `[..., out..., in...]`.

    `contracted` and `kept` count the trailing logical axes that a product contracts and keeps; leading
    axes (the stacked `layers` axis) stay in place, so a slice of a layer is still a `ContractLast`.
    """

    values: jax.Array
    contracted: int = struct.field(pytree_node=False, default=1)
    kept: int = struct.field(pytree_node=False, default=1)
    logical_axes: tuple[str | None, ...] | None = struct.field(pytree_node=False, default=None)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape (the weight's shape before the transform)."""
        s = tuple(self.values.shape)
        first, last = len(s) - self.kept - self.contracted, len(s) - self.contracted
        return s[:first] + s[last:] + s[first:last]  # leading axes, contracted, kept

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    def stored_letters(self, letters: str) -> str:
        """The einsum letters of the stored array, given the logical ones (trailing axes: in..., out...)."""
        return _in_stored_order(letters, self.contracted, self.kept)

    def axis_names(self) -> "ContractLast":
        """The logical axis names of the stored values (for sharding rules), as a `ContractLast` of a tuple
        (of a `QArray` of tuples when the stored values are quantized)."""
        if isinstance(self.values, QArray):
            return self.replace(values=self.values.axis_names())
        names = self.logical_axes or (None,) * self.ndim
        names = tuple(names[len(names) - self.ndim :])
        return self.replace(values=tuple(self.stored_letters(list(names))))  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"ContractLast(shape={self.shape}, stored={tuple(self.values.shape)}, contracted={self.contracted})"


def is_contract_last(x) -> bool:
    return isinstance(x, ContractLast)


def contract_last(params, *, pack_qkv: bool = False):
    """Return the parameter tree with every weight matrix (the layers' q, k, v, o, w_gate, w_up, w_down
    and an untied `lm_head`) as a `ContractLast`. Works on concrete and abstract (`ShapeDtypeStruct`) trees.
    With `pack_qkv`, each layer's q, k and v then become one matrix (`packing.pack_qkv`: float trees that
    stay float and unsharded; the command line's default for them).

    Quantize after this transform (`quantize(contract_last(params), recipe)`): the codes are then stored
    in this order too, groups along the trailing contracted axis. Errors: a tree already in this layout, a
    quantized matrix, a matrix whose shape does not fit its logical axes.
    """
    if pack_qkv:
        from .packing import pack_qkv as pack

        return pack(contract_last(params))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: is_contract_last(x) or isinstance(x, QArray))
    if any(is_contract_last(leaf) for _, leaf in leaves):
        raise ValueError("the parameter tree is already in the contract-last layout")
    table = axes_by_path()
    out = []
    for key_path, leaf in leaves:
        path = path_names(key_path)
        if not _is_matrix(path):
            out.append(leaf)
            continue
        name = "/".join(path)
        if isinstance(leaf, QArray):
            raise ValueError(f"{name} is quantized ({leaf.fmt}); apply contract_last to the float tree, then "
                             f"quantize (the codes are laid out when they are made)")
        axes = table[path]
        if len(leaf.shape) != len(axes):
            raise ValueError(f"{name} has shape {tuple(leaf.shape)}, expected {len(axes)} axes {axes}")
        contracted = contracted_axes(path, axes)
        n, c, lead = len(axes), len(contracted), 1 if axes[0] == "layers" else 0
        if contracted != tuple(range(lead - n, lead - n + c)):  # the matrix part's leading axes
            raise ValueError(f"{name}: contracted axes {contracted} are not the leading matrix axes of {axes}")
        order = _in_stored_order(list(range(n)), c, n - lead - c)
        out.append(ContractLast(values=_transpose(leaf, order), contracted=c, kept=n - lead - c, logical_axes=axes))
    return treedef.unflatten(out)


def _in_stored_order(seq, contracted: int, kept: int):
    """`seq` (axis letters, names or numbers) with its trailing `contracted` + `kept` items reordered from
    (in..., out...) to (out..., in...); leading items stay."""
    first = len(seq) - contracted - kept
    return seq[:first] + seq[first + contracted :] + seq[first : first + contracted]


def _is_matrix(path: tuple[str, ...]) -> bool:
    return path == ("lm_head",) or (len(path) == 2 and path[0] == "layers" and path[1] in LAYER_MATRICES)


def _transpose(leaf, order):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(leaf.shape[i] for i in order), leaf.dtype, sharding=None)
    return np.transpose(leaf, order) if isinstance(leaf, np.ndarray) else jnp.transpose(leaf, order)


def fragment_order(params, *, pack: bool = True):
    """Return the tree with every int4 matrix of a quantized contract-last tree whose shape allows it in the
    tensor cores' fragment order (`quant/fragments.py`): the same shapes and bytes permuted, for batched
    decode on Hopper (`pallas_kernels.fragment_matmul`, 1-64 rows). One-row products of these weights lose
    the fused row kernel (it reads row order), so this is a layout for batched serving. Matrices whose
    shape does not fit (N a multiple of 64, K of 256, groups dividing 256) stay in row order. With `pack`, each
    layer's q/k/v and gate/up (when all of them moved) become one matrix each (`packing.pack_qkv`,
    `pack_gate_up`): one launch a group of products, as the row-order kernels fuse them.

    Errors: a tree with no contract-last int4 matrix, or none that fits."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_contract_last)
    out, int4, moved = [], 0, 0
    for leaf in leaves:
        if is_contract_last(leaf) and isinstance(leaf.values, QArray) and leaf.values.fmt == "int4":
            int4 += 1
            try:
                leaf = leaf.replace(values=to_fragment_order(leaf.values))
                moved += 1
            except ValueError:
                pass  # stays in row order (see the docstring)
        out.append(leaf)
    if not int4:
        raise ValueError("fragment_order takes a contract-last tree quantized to int4 "
                         "(quantize(contract_last(params), 'int4')); this tree has no such matrix")
    if not moved:
        raise ValueError("no int4 matrix of this tree fits the fragment order (N a multiple of 64, K of 256, "
                         "groups of 32-256)")
    params = treedef.unflatten(out)
    if pack:  # no other kernel reads this order: products of one input share a launch only as one matrix
        from .packing import GATE_UP, QKV, fragment_ordered, pack_gate_up, pack_qkv

        for names, pack_group in ((QKV, pack_qkv), (GATE_UP, pack_gate_up)):
            layers = params.get("layers", {}) if isinstance(params, dict) else {}
            if all(n in layers and fragment_ordered(layers[n]) for n in names):
                params = pack_group(params)
    return params
