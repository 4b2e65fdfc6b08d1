"""Recipes and `quantize(params, recipe) -> params`: a pure transform of the parameter tree.

A `Recipe` says which format (int8 / int4 / fp8), which group size, and which leaves: the matrices of the
stacked `layers` subtree by leaf name (exact tree-path components, never name substrings), plus the
`lm_head` and the `embed` table as switches. Layers are stacked on one axis and run by one `lax.scan`,
so a matrix is quantized in every layer or in none. Named presets cover the common cases.

`quantize` selects leaves by tree path, reads each leaf's logical axes and the axes its matmuls contract from
`params.axes_by_path` / `params.contracted_axes`, and returns a new tree where the selected leaves are
`QArray`s. Abstract trees (`jax.ShapeDtypeStruct` leaves) give abstract `QArray`s of the real shapes, so
loading, sharding and memory planning see the quantized tree without computing anything.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..params import LAYER_MATRICES, axes_by_path, contracted_axes, path_names
from ..weight_layout import is_contract_last
from .qarray import FORMATS, QArray, check_group, default_scale_dtype, is_qarray, normalize_axes, quantize_array

PER_LAYER_ABOVE = 1 << 26  # elements: stacked leaves larger than this are quantized layer by layer


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What to quantize and how. `group_size=None` is per output channel (int8, fp8 only)."""

    format: str
    group_size: int | None = None
    zero_point: bool = False  # int4 only: asymmetric codes with a per-group offset (GGUF Q4_1 style)
    matrices: tuple[str, ...] = LAYER_MATRICES  # leaves of params["layers"] to quantize
    lm_head: bool = True  # the untied output head (absent in tied models)
    embed: bool = False  # the embedding table (also the head in tied models)
    scale_dtype: str | None = None  # None: float16 for int4, float32 otherwise (one scale per channel)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"unknown quantization format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.format == "int4" and self.group_size is None:
            raise ValueError("int4 needs a group size (e.g. 32, 64 or 128): per-channel int4 loses too much")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or self.group_size < 1 or (self.format == "int4" and self.group_size % 2)
        ):
            raise ValueError(f"group size must be a positive{' even' if self.format == 'int4' else ''} integer, got {self.group_size!r}")
        if self.zero_point and self.format != "int4":
            raise ValueError(f"zero points are only supported for int4, not {self.format}")
        unknown = [m for m in self.matrices if m not in LAYER_MATRICES]
        if unknown:
            raise ValueError(f"unknown layer matrices {unknown}; the quantizable ones are {', '.join(LAYER_MATRICES)}")
        if self.scale_dtype is not None:
            jnp.dtype(self.scale_dtype)  # raises on a bad name

    @property
    def scales(self):
        if self.scale_dtype is not None:
            return jnp.dtype(self.scale_dtype)
        return default_scale_dtype(self.format)

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Recipe] = {
    "int8": Recipe("int8"),
    "fp8": Recipe("fp8"),
    "int4-g32": Recipe("int4", 32, zero_point=True),
    "int4-g64": Recipe("int4", 64, zero_point=True),
    "int4-g128": Recipe("int4", 128, zero_point=True),
    "int4": Recipe("int4", 128, zero_point=True),  # the name the memory planner and bench know
}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A `Recipe` from a preset name or a `Recipe`; anything else is a clear error."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        if recipe in PRESETS:
            return PRESETS[recipe]
        raise ValueError(f"unknown quantization recipe {recipe!r}; presets: {', '.join(PRESETS)}")
    raise TypeError(f"a quantization recipe is a preset name or a jaxinfer.quant.Recipe, got {type(recipe).__name__}")


# --------------------------------------------------------------------------------------------------------
# quantize


def selected_paths(params, recipe: Recipe) -> list[tuple[str, ...]]:
    want = [("layers", m) for m in recipe.matrices]
    if recipe.lm_head:
        want.append(("lm_head",))
    if recipe.embed:
        want.append(("embed",))
    return want


def quantize(params, recipe: str | Recipe, importance: dict | None = None):
    """Return a new parameter tree with the leaves `recipe` selects replaced by `QArray`s.

    `importance` (optional, from `calibrate.activation_stats`): per-input-channel activation mean squares
    by tree path; int4 then minimises the error weighted by them (other formats ignore it).

    Works on concrete arrays (computed on the arrays' device, layer by layer for stacked leaves) and on
    abstract `jax.ShapeDtypeStruct` trees (shapes only). Errors: an unknown recipe, a tree that already
    holds quantized leaves, a group size that does not divide a selected leaf's group axis, a leaf path
    the model does not have.
    """
    from ..packing import has_packed  # (packing imports quant.qarray)

    recipe = get_recipe(recipe)
    if has_packed(params):
        raise ValueError("q, k and v are packed into one matrix (`pack_qkv`): quantize the unpacked tree (the row "
                         "kernel reads quantized q, k and v in one launch anyway)")
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: is_qarray(x) or is_contract_last(x))
    if any(is_qarray(leaf) for _, leaf in leaves_with_paths):
        raise ValueError("the parameter tree is already quantized; quantize the float tree instead")
    if importance is not None and any(is_contract_last(leaf) for _, leaf in leaves_with_paths):
        raise ValueError("calibrated quantization (importance) takes the tree as stored, not a contract-last tree")
    table = axes_by_path()
    paths = [path_names(p) for p, _ in leaves_with_paths]
    present = set(paths)
    targets = {p for p in selected_paths(params, recipe) if p in present}
    if recipe.embed and ("embed",) not in present:
        raise ValueError("the recipe quantizes the embedding, but the tree has no 'embed' leaf")
    out = []
    for path, (_, leaf) in zip(paths, leaves_with_paths):
        if path not in targets:
            out.append(leaf)
            continue
        if path not in table:
            raise ValueError(f"leaf {'/'.join(path)} is not a parameter of the model")
        axes = table[path]
        if len(leaf.shape) != len(axes):
            raise ValueError(f"leaf {'/'.join(path)} has shape {tuple(leaf.shape)}, expected {len(axes)} axes {axes}")
        if is_contract_last(leaf):  # codes in the stored order: the contracted axes trail, groups along the last
            array, reduce, names = leaf.values, tuple(range(-leaf.contracted, 0)), leaf.stored_letters(list(axes))
        else:
            array, reduce, names = leaf, contracted_axes(path, axes), axes
        check_group(array.shape, normalize_axes(reduce, len(axes)), recipe.format, recipe.group_size, "/".join(path))
        imp = _importance_for(importance, path, array.shape, reduce, names)  # (None for contract-last trees)
        q = _quantize_leaf(array, recipe, reduce, names, imp)
        out.append(leaf.replace(values=q) if is_contract_last(leaf) else q)
    return treedef.unflatten(out)


def _importance_for(importance, path, shape, reduce, axes):
    """The calibration entry for `path` ([layers,] contracted dims), shaped to broadcast against the leaf."""
    if importance is None:
        return None
    node = importance
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if node is None:
        return None
    ndim = len(shape)
    target = tuple(d if (i == 0 and axes[0] == "layers") or i - ndim in reduce else 1 for i, d in enumerate(shape))
    node = jnp.asarray(node, jnp.float32)
    if int(np.prod(node.shape)) != int(np.prod(target)):
        raise ValueError(f"importance for {'/'.join(path)} has shape {tuple(node.shape)}, expected {target}")
    return node.reshape(target)


def _quantize_leaf(leaf, recipe: Recipe, reduce, axes, importance=None) -> QArray:
    static = dict(fmt=recipe.format, reduce_axes=tuple(reduce), group_size=recipe.group_size,
                  zero_point=recipe.zero_point, scale_dtype=recipe.scales.name, logical_axes=tuple(axes))
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.eval_shape(functools.partial(quantize_array, **static), leaf)
    # Large stacked leaves are quantized one layer at a time, so temporaries stay one layer big (axes are
    # negative, so the per-layer metadata is valid for the stack); small ones at once (faster on a CPU).
    stacked = axes[0] == "layers" and leaf.shape[0] > 1 and int(np.prod(leaf.shape)) > PER_LAYER_ABOVE
    return _quantize_jit(leaf, importance, stacked=stacked, **static)


@functools.partial(jax.jit, static_argnames=("stacked", "fmt", "reduce_axes", "group_size", "zero_point",
                                             "scale_dtype", "logical_axes"))
def _quantize_jit(w, importance, *, stacked, **static):
    fn = lambda w, imp: quantize_array(w, importance=imp, **static)
    if not stacked:
        return fn(w, importance)
    if importance is None:
        return jax.lax.map(lambda w: fn(w, None), w)
    return jax.lax.map(lambda args: fn(*args), (w, importance))


def dequantize_tree(params, dtype=None):
    """Replace every `QArray` in a tree by its dequantized float array (e.g. to compare with float)."""
    from .qarray import dequantize

    return jax.tree.map(lambda x: dequantize(x, dtype) if is_qarray(x) else x, params, is_leaf=is_qarray)
