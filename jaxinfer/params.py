"""The parameter tree: one table of leaves with their shapes and logical axis names, and random init.

Parameters are a plain nested dict of arrays. Per-layer leaves are stacked on a leading `layers` axis so
the model runs them with `lax.scan`. `param_specs(config)` is the single source of truth: it gives each
leaf's shape and logical axes (`layers`, `embed`, `q_heads`, `kv_heads`, `head_dim`, `ffn`, `vocab`),
which the sharding rules map onto a mesh. Knows nothing about checkpoints or kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


LAYER_MATRICES = ("q", "k", "v", "o", "w_gate", "w_up", "w_down")  # the weight matrices of each layer


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape and logical axis names of one parameter leaf; `kind` chooses its random init."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    kind: str = "matrix"  # "matrix" (fan-in scaled normal), "norm" (ones), "bias" (small normal)

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def param_specs(config: ModelConfig) -> dict:
    """The tree of `ParamSpec`s for `config`, with the same structure as the parameters."""
    c = config
    L, D, F, N, K, H, V = c.num_layers, c.dim, c.ffn_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", "embed"), "norm"),
        "q": ParamSpec((L, D, N, H), ("layers", "embed", "q_heads", "head_dim")),
        "k": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "v": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "o": ParamSpec((L, N, H, D), ("layers", "q_heads", "head_dim", "embed")),
        "mlp_norm": ParamSpec((L, D), ("layers", "embed"), "norm"),
        "w_gate": ParamSpec((L, D, F), ("layers", "embed", "ffn")),
        "w_up": ParamSpec((L, D, F), ("layers", "embed", "ffn")),
        "w_down": ParamSpec((L, F, D), ("layers", "ffn", "embed")),
    }
    if c.qkv_bias:
        layers["q_bias"] = ParamSpec((L, N, H), ("layers", "q_heads", "head_dim"), "bias")
        layers["k_bias"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "bias")
        layers["v_bias"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "bias")
    if c.qk_norm:
        layers["q_norm"] = ParamSpec((L, H), ("layers", "head_dim"), "norm")
        layers["k_norm"] = ParamSpec((L, H), ("layers", "head_dim"), "norm")
    tree = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "embedding"),
        "layers": layers,
        "final_norm": ParamSpec((D,), ("embed",), "norm"),
    }
    if not c.tie_embeddings:
        tree["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return tree


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(config: ModelConfig) -> dict:
    """The tree of logical axis-name tuples, one per leaf."""
    return jax.tree.map(lambda s: s.axes, param_specs(config), is_leaf=is_spec)


def abstract_params(config: ModelConfig, dtype=jnp.bfloat16) -> dict:
    """Shape-only tree (`jax.ShapeDtypeStruct`), for planning, sharding and loading without memory."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(config), is_leaf=is_spec)


def init_params(config: ModelConfig, key: jax.Array | int = 0, dtype=jnp.bfloat16) -> dict:
    """Random weights of the right shapes (normal, never zeros), e.g. for benchmarks and tests.

    Matrices are N(0, 1/fan_in) so activations stay O(1) through depth; norms are ones.
    """
    if isinstance(key, int):
        key = jax.random.key(key)
    specs = param_specs(config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([_init_leaf(s, k, dtype) for s, k in zip(leaves, keys)])


def _init_leaf(spec: ParamSpec, key: jax.Array, dtype) -> jax.Array:
    if spec.kind == "norm":
        return jnp.ones(spec.shape, dtype)
    if spec.kind == "bias":
        return 0.02 * jax.random.normal(key, spec.shape, dtype)
    if spec.kind == "embedding":
        return jax.random.normal(key, spec.shape, dtype)
    # Drawn directly in `dtype` so an 8B model never holds a float32 copy on the device.
    return jax.random.normal(key, spec.shape, dtype) * jnp.asarray(1 / np.sqrt(_fan_in(spec)), dtype)


def _fan_in(spec: ParamSpec) -> int:
    """Product of the contracted (input) dims: `embed` for q/k/v/gate/up/lm_head, the rest for o/down."""
    dims = [d for d, a in zip(spec.shape, spec.axes) if a != "layers"]
    if spec.axes[-1] == "embed":  # o: [N, H, D], w_down: [F, D]
        return int(np.prod(dims[:-1]))
    return dims[0]


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def param_bytes(params) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------------------------
# Logical axes by tree path (for transforms that select leaves by path: quantization, weight layouts)


@functools.lru_cache(maxsize=None)
def axes_by_path() -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """Every leaf path the model can have -> its logical axes, from `param_specs` (all options on)."""
    full = ModelConfig(vocab_size=8, dim=8, ffn_dim=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                       qkv_bias=True, qk_norm=True)
    flat = jax.tree_util.tree_flatten_with_path(param_specs(full), is_leaf=is_spec)[0]
    return {path_names(p): s.axes for p, s in flat}


def path_names(path) -> tuple[str, ...]:
    """A jax key path as plain names, e.g. `("layers", "q")`."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def contracted_axes(path: tuple[str, ...], axes: tuple[str | None, ...]) -> tuple[int, ...]:
    """The axes a leaf's matmuls contract, as negative numbers, from its logical axes.

    Output-side leaves (last axis `embed`: o, w_down) contract every non-`layers` axis but the last;
    input-side ones contract `embed`. The embedding table is scaled per row (per vocab entry): that is
    the contraction of the tied head (`btd,vd->btv`) and keeps a gathered row self-contained.
    """
    n = len(axes)
    if path == ("embed",) or axes[-1] != "embed":
        return (axes.index("embed") - n,)
    return tuple(i - n for i, a in enumerate(axes[:-1]) if a != "layers")
