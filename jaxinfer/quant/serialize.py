"""Save and load a (quantized) parameter tree as one safetensors file, so quantizing once is enough.

Tensors are named by tree path: a plain leaf `layers/mlp_norm`, a `QArray` as `layers/q.values`,
`layers/q.scales` and `layers/q.offsets`. The header's metadata (`jaxinfer.params`, JSON) records each
leaf's kind, dtypes and the `QArray` static fields, plus the model config and the recipe when given. Layout
wrappers around a leaf (`ContractLast`, a `Packed` q/k/v or gate/up) are recorded with it (`wrappers`, outermost
first) and rebuilt on load, so a tree in the command line's layout comes back runnable.
bfloat16 and float8 tensors are stored as same-width unsigned integers (safetensors' numpy side knows
neither) and viewed back on load. `load_quantized(..., abstract=True)` reads only the header and
returns `jax.ShapeDtypeStruct`s, for planning and sharding before any data moves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig, RopeScaling
from ..params import path_names
from . import fragments
from .qarray import QArray
from .recipe import Recipe

METADATA_KEY = "jaxinfer.params"
FORMAT_VERSION = 1
_CHILDREN = ("scales", "values", "offsets")
# dtypes numpy cannot hand to safetensors: stored as the unsigned integer of the same width
_STORED_AS = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8}


def _to_numpy(a) -> tuple[np.ndarray, str]:
    host = np.asarray(jax.device_get(a))
    name = jnp.dtype(host.dtype).name
    if name in _STORED_AS:
        host = host.view(_STORED_AS[name])
    return np.ascontiguousarray(host), name


def save_quantized(path, params, config: ModelConfig | None = None, recipe: Recipe | str | None = None) -> Path:
    """Write `params` (plain and `QArray` leaves, in `ContractLast` / `Packed` layouts or not) to `path` (a
    .safetensors file); returns the path."""
    from safetensors.numpy import save_file

    from ..packing import Packed
    from ..weight_layout import ContractLast

    tensors, leaves = {}, {}
    wrapped = lambda x: isinstance(x, (QArray, ContractLast, Packed))  # noqa: E731
    for p, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=wrapped)[0]:
        name = "/".join(path_names(p))
        wrappers = []
        while isinstance(leaf, (ContractLast, Packed)):
            if isinstance(leaf, Packed):
                wrappers.append({"kind": "packed", "parts": [list(part) for part in leaf.parts], "axis": leaf.axis,
                                 "shards": leaf.shards})
            else:
                wrappers.append({"kind": "contract_last", "contracted": leaf.contracted, "kept": leaf.kept,
                                 "logical_axes": None if leaf.logical_axes is None else list(leaf.logical_axes)})
            leaf = leaf.values
        if isinstance(leaf, QArray):
            dtypes = {}
            for child in _CHILDREN:
                a = getattr(leaf, child)
                if a is not None:
                    tensors[f"{name}.{child}"], dtypes[child] = _to_numpy(a)
            leaves[name] = {
                "kind": "qarray", "dtypes": dtypes, "fmt": leaf.fmt, "reduce_axes": list(leaf.reduce_axes),
                "group_size": leaf.group_size, "dtype_name": leaf.dtype_name,
                "logical_axes": None if leaf.logical_axes is None else list(leaf.logical_axes),
                "order": leaf.order,
            }
            if leaf.order == "fragments":
                leaves[name]["fragment_layout"] = fragments.LAYOUT_VERSION
        else:
            tensors[name], dtype = _to_numpy(leaf)
            leaves[name] = {"kind": "array", "dtype": dtype}
        if wrappers:
            leaves[name]["wrappers"] = wrappers
    if isinstance(recipe, Recipe):
        recipe = dataclasses.asdict(recipe)
    meta = {"version": FORMAT_VERSION, "leaves": leaves, "recipe": recipe,
            "config": None if config is None else dataclasses.asdict(config)}
    path = Path(path)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def load_quantized(path, abstract: bool = False, device=None):
    """Read a file written by `save_quantized`: returns `(params, config)` (config None if not saved).

    With `abstract=True` only the header is read and every array is a `jax.ShapeDtypeStruct`.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no parameter file at {path}")
    with safe_open(str(path), framework="numpy") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path} was not written by jaxinfer.quant.save_quantized (no {METADATA_KEY} metadata)")
        meta = json.loads(raw)
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has parameter format version {meta.get('version')}, expected {FORMAT_VERSION}")

        def read(name: str, dtype: str):
            if abstract:
                return jax.ShapeDtypeStruct(tuple(f.get_slice(name).get_shape()), jnp.dtype(dtype))
            host = f.get_tensor(name)
            if dtype in _STORED_AS:
                host = host.view(jnp.dtype(dtype))
            return jax.device_put(host, device) if device is not None else jnp.asarray(host)

        tree: dict = {}
        for name, info in meta["leaves"].items():
            if info["kind"] == "qarray":
                if info.get("order") == "fragments" and info.get("fragment_layout", 1) != fragments.LAYOUT_VERSION:
                    raise ValueError(
                        f"{path}: leaf {name!r} holds int4 codes in fragment byte order version "
                        f"{info.get('fragment_layout', 1)}, this library reads version {fragments.LAYOUT_VERSION}; "
                        f"save the row-ordered tree and apply `fragment_order` after loading it")
                children = {c: read(f"{name}.{c}", d) for c, d in info["dtypes"].items()}
                leaf = QArray(
                    scales=children["scales"], values=children["values"], offsets=children.get("offsets"),
                    fmt=info["fmt"], reduce_axes=tuple(info["reduce_axes"]), group_size=info["group_size"],
                    dtype_name=info["dtype_name"],
                    logical_axes=None if info["logical_axes"] is None else tuple(info["logical_axes"]),
                    order=info.get("order", "rows"),
                )
            elif info["kind"] == "array":
                leaf = read(name, info["dtype"])
            else:
                raise ValueError(f"{path}: leaf {name!r} has unknown kind {info['kind']!r}")
            leaf = _wrapped(leaf, info.get("wrappers", ()), f"{path}: leaf {name!r}")
            node = tree
            *parents, last = name.split("/")
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = leaf
    return tree, _config_from_dict(meta.get("config"))


def _wrapped(leaf, wrappers, what: str):
    """`leaf` inside its recorded layout wrappers (outermost first)."""
    from ..packing import Packed
    from ..weight_layout import ContractLast

    for w in reversed(list(wrappers)):
        if w["kind"] == "contract_last":
            axes = None if w["logical_axes"] is None else tuple(w["logical_axes"])
            leaf = ContractLast(values=leaf, contracted=w["contracted"], kept=w["kept"], logical_axes=axes)
        elif w["kind"] == "packed":
            leaf = Packed(values=leaf, parts=tuple((n, int(size)) for n, size in w["parts"]), axis=w["axis"],
                          shards=w["shards"])
        else:
            raise ValueError(f"{what} has unknown layout wrapper {w['kind']!r}")
    return leaf


def _config_from_dict(d: dict | None) -> ModelConfig | None:
    if d is None:
        return None
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return ModelConfig(**d)
