"""Meshes and sharding rules: which mesh axis splits which logical axis of the parameters and the cache.

`make_mesh(data=, tensor=, pipeline=)` builds a `jax.sharding.Mesh` with the axes `data`, `pipeline` and
`tensor` (tensor innermost, so a tensor group is neighbouring devices of one host). `ShardingRules` maps
logical axis names (`batch`, `layers`, `embed`, `q_heads`, `kv_heads`, `head_dim`, `ffn`, `vocab`, `seq`)
to mesh axes and rejects two logical axes of one array landing on the same mesh axis. `rules.resolve(
config, mesh)` checks the model against the mesh (a tensor degree must divide the query heads and the ffn
width, a pipeline degree the layers) and replicates what cannot be split: kv heads fewer than the tensor
degree, a vocabulary the tensor degree does not divide.

From there: `param_shardings` / `cache_shardings` give the `NamedSharding` of every leaf, `init_params` /
`init_cache` create arrays already sharded (jit with `out_shardings`: no device ever holds the whole
tree), `shard_params` / `shard_cache` place existing trees. The mesh never enters the model config or the
model code: sharded arrays flow through the ordinary jitted functions; with a tensor axis the layers run
per shard (`tensor_parallel.py`: Megatron pattern, one all-reduce after the attention output and one after
the MLP), elsewhere XLA's SPMD partitioner inserts the collectives.

Axes are `Auto` (compiler-propagated), not JAX's newer default `Explicit`, so that the model's einsums
need no per-op output shardings. This file knows nothing of checkpoints or kernels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from . import params as params_lib
from .cache import KVCache, PagedKVCache, QuantKVCache, is_quantized_kv
from .config import ModelConfig
from .packing import QKV, Packed, has_packed
from .quant.qarray import QArray
from .weight_layout import ContractLast

MESH_AXES = ("data", "pipeline", "tensor")  # mesh axis order: tensor innermost (neighbouring devices)
DENSE_CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")  # KVCache.k / .v
PAGED_CACHE_AXES = ("layers", None, None, "kv_heads", "head_dim")  # PagedKVCache pages: a pool shared by rows

MeshAxes = str | tuple[str, ...] | None


# ----------------------------------------------------------------------------------------------------
# Mesh


def make_mesh(data: int = 1, tensor: int = 1, pipeline: int = 1, *, devices: Sequence | None = None) -> Mesh:
    """A mesh of `data x pipeline x tensor` devices (all of `jax.devices()` unless `devices` is given).

    The product must equal the number of devices: a mesh that leaves devices idle or asks for more than
    there are is an error, not a silent sub-mesh (pass `devices=` for a sub-mesh).
    """
    sizes = {"data": data, "tensor": tensor, "pipeline": pipeline}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"make_mesh: {name} must be a positive int, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    n = data * tensor * pipeline
    if n != len(devices):
        raise ValueError(
            f"make_mesh: data={data} x tensor={tensor} x pipeline={pipeline} = {n} devices, but "
            f"{len(devices)} device(s) are given ({_describe(devices)}); the mesh size must equal the device count"
        )
    return jax.make_mesh(
        (data, pipeline, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def _describe(devices) -> str:
    kinds = sorted({d.platform for d in devices})
    return ", ".join(kinds) if kinds else "none"


def mesh_of(tree) -> Mesh | None:
    """The mesh the leaves of `tree` are sharded over (None when they live on one device or are not arrays)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


# ----------------------------------------------------------------------------------------------------
# Rules


def _known_leaf_axes() -> list[tuple[str | None, ...]]:
    """Logical axes of every kind of array the rules must place: all parameter leaves (with every optional
    leaf present), the dense and paged cache, and activations."""
    probe = ModelConfig(
        vocab_size=2, dim=2, ffn_dim=2, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=2,
        qkv_bias=True, qk_norm=True,
    )
    leaves = jax.tree.leaves(params_lib.param_axes(probe), is_leaf=lambda x: isinstance(x, tuple))
    return [*leaves, DENSE_CACHE_AXES, PAGED_CACHE_AXES, ("batch", None), ("batch", "seq", "embed"),
            ("batch", "seq", "q_heads", "head_dim"), ("batch", "seq", "kv_heads", "head_dim"),
            ("batch", "seq", "ffn"), ("batch", "seq", "vocab")]


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis (a name, a tuple of names, or None for replicated).

    The default is Megatron-style tensor parallelism (heads, ffn and vocab on `tensor`), layers on
    `pipeline` and batch on `data`; `embed`, `head_dim` and `seq` stay whole. Construction rejects rules
    that would put two axes of one array on the same mesh axis.
    """

    batch: MeshAxes = "data"
    layers: MeshAxes = "pipeline"
    q_heads: MeshAxes = "tensor"
    kv_heads: MeshAxes = "tensor"
    ffn: MeshAxes = "tensor"
    vocab: MeshAxes = "tensor"
    embed: MeshAxes = None
    head_dim: MeshAxes = None
    seq: MeshAxes = None

    def __post_init__(self):
        for name in self.logical_axes():
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, name, value)
            ok = value is None or isinstance(value, str) or (
                isinstance(value, tuple) and all(isinstance(v, str) for v in value)
            )
            if not ok:
                raise ValueError(f"ShardingRules.{name} must be a mesh axis name, a tuple of names or None, got {value!r}")
        for axes in _known_leaf_axes():
            self._check_collision(axes)

    @classmethod
    def logical_axes(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, MeshAxes]) -> "ShardingRules":
        unknown = set(mapping) - set(cls.logical_axes())
        if unknown:
            raise ValueError(f"unknown logical axis name(s) {sorted(unknown)}; known: {', '.join(cls.logical_axes())}")
        return cls(**mapping)

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """The mesh axes `logical` is split over (empty when replicated)."""
        if logical is None:
            return ()
        value = getattr(self, logical)
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else tuple(value)

    def _check_collision(self, axes, what: str = "") -> None:
        seen: dict[str, str] = {}
        for logical in axes:
            for m in self.mesh_axes(logical):
                if m in seen:
                    where = f" of {what}" if what else ""
                    raise ValueError(
                        f"sharding rule collision: logical axes {seen[m]!r} and {logical!r}{where} "
                        f"(array axes {axes}) both map to mesh axis {m!r}"
                    )
                seen[m] = logical

    def spec(self, axes: Sequence[str | None], what: str = "") -> PartitionSpec:
        """The `PartitionSpec` of an array whose dimensions have logical names `axes`."""
        axes = tuple(axes)
        self._check_collision(axes, what)
        parts = []
        for logical in axes:
            m = self.mesh_axes(logical)
            parts.append(None if not m else (m[0] if len(m) == 1 else m))
        return PartitionSpec(*parts)

    def resolve(self, config: ModelConfig, mesh: Mesh) -> "ShardingRules":
        """Check `config` against `mesh` and return rules with the replications the shapes need.

        Errors: a mesh axis the mesh lacks; a degree that does not divide query heads, ffn, layers or a
        mapped embed/head_dim. Replicated instead of split: kv heads when the tensor degree is a multiple
        of them (each device keeps every kv head and uses the one its query heads need), and a vocabulary
        the degree does not divide.
        """
        for name in self.logical_axes():
            for m in self.mesh_axes(name):
                if m not in mesh.shape:
                    raise ValueError(f"ShardingRules.{name} names mesh axis {m!r}; the mesh has {tuple(mesh.shape)}")
        size = lambda name: math.prod(mesh.shape[m] for m in self.mesh_axes(name))
        c = config
        changes = {}
        hard = {
            "q_heads": ("num_heads", c.num_heads),
            "ffn": ("ffn_dim", c.ffn_dim),
            "layers": ("num_layers", c.num_layers),
            "embed": ("dim", c.dim),
            "head_dim": ("head_dim", c.head_dim),
        }
        for logical, (field, dim) in hard.items():
            n = size(logical)
            if dim % n:
                kind = "pipeline" if logical == "layers" else "tensor" if self.mesh_axes(logical) == ("tensor",) else "mesh"
                raise ValueError(
                    f"{kind} degree {n} (mesh axes {self.mesh_axes(logical)} for {logical!r}) does not divide "
                    f"{field}={dim}; choose a degree that divides it"
                )
        t = size("kv_heads")
        if c.num_kv_heads % t:
            if t % c.num_kv_heads == 0 and size("q_heads") == t:
                changes["kv_heads"] = None  # fewer kv heads than devices: every device keeps them all
            else:
                raise ValueError(
                    f"tensor degree {t} neither divides num_kv_heads={c.num_kv_heads} nor is a multiple of it"
                )
        if c.vocab_size % size("vocab"):
            changes["vocab"] = None
        return dataclasses.replace(self, **changes) if changes else self


DEFAULT_RULES = ShardingRules()


def _rules(rules: ShardingRules | Mapping | None) -> ShardingRules:
    if rules is None:
        return DEFAULT_RULES
    if isinstance(rules, Mapping):
        return ShardingRules.from_mapping(rules)
    return rules


# ----------------------------------------------------------------------------------------------------
# Shardings of the parameter tree and the cache


def param_shardings(config: ModelConfig, mesh: Mesh, rules: ShardingRules | Mapping | None = None) -> dict:
    """The `NamedSharding` of every parameter leaf (same tree structure as `params.param_specs`)."""
    r = _rules(rules).resolve(config, mesh)
    specs = params_lib.param_specs(config)
    paths, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=params_lib.is_spec)
    out = [NamedSharding(mesh, r.spec(s.axes, jax.tree_util.keystr(p))) for p, s in paths]
    return treedef.unflatten(out)


def tree_shardings(params, config: ModelConfig, mesh: Mesh, rules: ShardingRules | Mapping | None = None):
    """The shardings of an actual parameter tree, whose leaves may be quantized (`quant.QArray`).

    A plain leaf gets its rule as in `param_shardings`. A quantized leaf gets one sharding per child
    (values, scales, offsets) from the logical axes it carries (`QArray.axis_names()`); a child axis
    its mesh axes do not divide (a per-channel scale's size-1 axis, a short group axis) is replicated.
    """
    r = _rules(rules).resolve(config, mesh)
    specs = params_lib.param_specs(config)
    if has_packed(params):
        specs = _packed_specs(params, specs, mesh, r)

    def child(axes, array, what):
        parts = []
        for logical, dim in zip(axes, array.shape):
            m = r.mesh_axes(logical)
            split = m and dim % math.prod(mesh.shape[a] for a in m) == 0
            parts.append(logical if split else None)
        return NamedSharding(mesh, r.spec(parts, what))

    def one(path, spec, leaf):
        what = jax.tree_util.keystr(path)
        names = getattr(leaf, "axis_names", None)
        if callable(names):  # a QArray: shard each child by its own logical axes
            shardings = jax.tree.map(
                lambda axes, a: child(axes, a, what), names(), leaf, is_leaf=lambda x: isinstance(x, tuple)
            )
            _check_fragment_split(leaf, shardings, what)
            return shardings
        if tuple(leaf.shape) != spec.shape:
            raise ValueError(f"parameter {what} has shape {tuple(leaf.shape)}, the config needs {spec.shape}")
        return NamedSharding(mesh, r.spec(spec.axes, what))

    try:
        return jax.tree_util.tree_map_with_path(one, specs, params, is_leaf=params_lib.is_spec)
    except (ValueError, KeyError, TypeError) as e:
        if "the config needs" in str(e):
            raise
        raise ValueError(f"parameter tree does not match the config's parameter specs: {e}") from None


def _check_fragment_split(leaf, shardings, what: str):
    """A fragment-ordered int4 weight (`quant/fragments.py`) is permuted in blocks of 64 rows x 256 K: it may be
    split along its output rows in whole blocks, never along its contracted axes (row-parallel products)."""
    while not isinstance(leaf, QArray) and hasattr(leaf, "values"):  # Packed / ContractLast wrappers
        leaf, shardings = leaf.values, shardings.values
    if not isinstance(leaf, QArray) or leaf.order != "fragments":
        return
    spec = tuple(shardings.values.spec) + (None,) * (leaf.ndim - len(shardings.values.spec))
    mesh = shardings.values.mesh
    r = len(leaf.reduce_axes)

    def ways(axes) -> int:
        return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))

    if any(ways(a) > 1 for a in spec[-r:]):
        raise ValueError(f"{what}: an int4 weight in the fragment order cannot be split along its contracted axes "
                         "(row-parallel); shard a row-ordered tree, or keep this one unsharded")
    rows = leaf.shape[-r - 1] // ways(spec[-r - 1])
    if rows % 64:
        raise ValueError(f"{what}: an int4 weight in the fragment order splits only in whole blocks of 64 rows; "
                         f"this mesh leaves {rows} a shard")


def _packed_specs(params, specs, mesh: Mesh, r: ShardingRules):
    """The spec tree of a tree whose layers hold q, k and v packed (`packing.pack_qkv`): checked against the
    mesh (laid out for its tensor degree, contraction-last with axis names) and given a `qkv` entry (the
    leaf itself names its axes)."""
    if isinstance(params, dict) and "w_gate_up" in params.get("layers", {}):
        raise ValueError("gate and up are packed into one matrix for the fragment order (`fragment_order`), "
                         "which runs unsharded: shard a tree without it")
    leaf = params.get("layers", {}).get("qkv") if isinstance(params, dict) else None
    degree = math.prod(mesh.shape[a] for a in r.mesh_axes("q_heads") or ())
    if not isinstance(leaf, Packed) or leaf.shards != degree:
        shards = leaf.shards if isinstance(leaf, Packed) else 1
        raise ValueError(f"q, k and v are packed into one matrix for {shards} tensor shard(s) (`pack_qkv`) but this "
                         f"mesh splits the heads {degree} ways (a head split of the packed axis would mix them): "
                         f"pack with shards={degree}, or shard the unpacked tree")
    if not isinstance(leaf.values, ContractLast):
        raise ValueError("sharding packed q/k/v needs contraction-last weights (`contract_last` before `pack_qkv`)")
    layers = {k: v for k, v in specs["layers"].items() if k not in QKV}
    return {**specs, "layers": {**layers, "qkv": specs["layers"]["q"]}}


def param_partition_specs(config: ModelConfig, mesh: Mesh, rules=None) -> dict:
    """Like `param_shardings`, as bare `PartitionSpec`s (for `shard_map` in/out specs)."""
    return jax.tree.map(lambda s: s.spec, param_shardings(config, mesh, rules))


def _check_batch(batch: int | None, mesh: Mesh, r: ShardingRules) -> None:
    n = math.prod(mesh.shape[m] for m in r.mesh_axes("batch"))
    if batch is not None and batch % n:
        raise ValueError(
            f"batch {batch} is not divisible by the data degree {n} (mesh axes {r.mesh_axes('batch')}); "
            f"use a batch that is a multiple of {n}"
        )


def cache_shardings(config: ModelConfig, mesh: Mesh, rules=None, *, batch: int | None = None, paged: bool = False,
                    quantized: bool = False):
    """The shardings of a cache as a cache-shaped tree: `KVCache` (`PagedKVCache` when `paged`,
    `QuantKVCache` when `quantized`) whose fields are `NamedSharding`s. Dense k/v `[L,B,S,K,H]` split
    layers/batch/kv heads (a quantized cache's scales `[L,B,S,K]` alike); the paged pool is a single pool
    shared by every row, so it is split on layers and kv heads only."""
    r = _rules(rules).resolve(config, mesh)
    _check_batch(batch, mesh, r)
    ns = lambda axes, what: NamedSharding(mesh, r.spec(axes, what))
    lengths = ns(("batch",), "cache.lengths")
    if paged:
        pages = ns(PAGED_CACHE_AXES, "cache pages")
        return PagedKVCache(k_pages=pages, v_pages=pages, block_table=ns(("batch", None), "block_table"), lengths=lengths)
    kv = ns(DENSE_CACHE_AXES, "cache k/v")
    if quantized:
        scales = ns(DENSE_CACHE_AXES[:-1], "cache scales")
        return QuantKVCache(k=kv, v=kv, k_scale=scales, v_scale=scales, lengths=lengths)
    return KVCache(k=kv, v=kv, lengths=lengths)


def data_axis(mesh, batch: int) -> str | None:
    """"data" when the mesh's `data` axis is larger than one and divides `batch` (each data shard runs its
    own rows), else None (every data shard runs the whole batch). Used where a `shard_map` places rows."""
    d = mesh.shape.get("data", 1)
    return "data" if d > 1 and batch % d == 0 else None


def batch_sharding(mesh: Mesh, rules=None, ndim: int = 1) -> NamedSharding:
    """Sharding of a per-sequence input (`tokens [B, T]`, `lengths [B]`): batch on its mesh axes."""
    return NamedSharding(mesh, _rules(rules).spec(("batch",) + (None,) * (ndim - 1)))


# ----------------------------------------------------------------------------------------------------
# Creating and placing sharded trees


def init_params(config: ModelConfig, mesh: Mesh, rules=None, key: jax.Array | int = 0, dtype=jnp.bfloat16) -> dict:
    """Random parameters created directly in their shards (same values as `params.init_params`)."""
    shardings = param_shardings(config, mesh, rules)
    if isinstance(key, int):
        key = jax.random.key(key)
    make = jax.jit(lambda k: params_lib.init_params(config, k, dtype), out_shardings=shardings)
    return make(key)


def init_cache(config: ModelConfig, batch: int, max_len: int, mesh: Mesh, rules=None, dtype=jnp.bfloat16) -> KVCache:
    """An empty dense cache created directly in its shards."""
    from .cache import init_cache as _init

    from .memory import check_fits, free_device_bytes

    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    free, _ = free_device_bytes(local[0]) if local else (None, "")
    if free is not None:  # the cache is spread over the mesh: count every device's free memory
        check_fits(config, batch, max_len, dtype, parts=("kv_cache",), available=free * mesh.size)
    shardings = cache_shardings(config, mesh, rules, batch=batch, quantized=is_quantized_kv(dtype))
    return jax.jit(lambda: _init(config, batch, max_len, dtype, check_memory=False), out_shardings=shardings)()


def init_cache_on(mesh: Mesh | None, config: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    """The cache `generate` makes for parameters on `mesh` (default rules; None: one device). A batch the
    data degree does not divide keeps the batch whole (replicated) instead of failing."""
    from .cache import init_cache as _init

    if mesh is None:
        return _init(config, batch, max_len, dtype)
    rules = DEFAULT_RULES
    if batch % math.prod(mesh.shape[m] for m in rules.mesh_axes("batch")):
        rules = dataclasses.replace(rules, batch=None)
    return init_cache(config, batch, max_len, mesh, rules, dtype)


def shard_params(params: dict, config: ModelConfig, mesh: Mesh, rules=None) -> dict:
    """Place an existing parameter tree (host or device arrays, quantized leaves too) on `mesh` by the rules."""
    return jax.device_put(params, tree_shardings(params, config, mesh, rules))


def quantize_params(params, recipe, config: ModelConfig, mesh: Mesh, rules=None):
    """`quant.quantize(params, recipe)` computed in one jit whose outputs are declared in their shards
    (`tree_shardings` of the quantized abstract tree): the quantized tree is born sharded."""
    from . import quant

    abstract = quant.quantize(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params), recipe)
    shardings = tree_shardings(abstract, config, mesh, rules)
    return jax.jit(lambda p: quant.quantize(p, recipe), out_shardings=shardings)(params)


def shard_cache(cache, config: ModelConfig, mesh: Mesh, rules=None):
    """Place an existing dense or paged cache on `mesh` by the rules."""
    paged = isinstance(cache, PagedKVCache)
    shardings = cache_shardings(config, mesh, rules, batch=None if paged else cache.batch, paged=paged,
                                quantized=isinstance(cache, QuantKVCache))
    return jax.device_put(cache, shardings)


def leaf_from_host(array: np.ndarray, sharding, dtype=None) -> jax.Array:
    """One global array from a host numpy array, each device receiving only its own slice.

    Works in multi-process runs too: each process fills only the shards of its addressable devices.
    """
    array = np.asarray(array)
    if dtype is not None:
        dtype = jnp.dtype(dtype)
    return jax.make_array_from_callback(
        array.shape, sharding, lambda index: np.asarray(array[index], dtype or array.dtype)
    )
