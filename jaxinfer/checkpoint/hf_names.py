"""The Hugging Face tensor-name table: which HF tensor fills which leaf of our parameter tree, and how.

Both checkpoint formats arrive here under HF names (the GGUF reader renames its tensors to them), so
this is the only place that knows checkpoint naming. `assemble_params` fills stacked leaves tensor by
tensor in the target dtype and moves each leaf to the device as soon as it is complete, so the host
never holds a second full copy of the model.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..params import param_specs

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _transforms(c: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]]:
    """HF suffix -> (our leaf, HF shape, HF array -> our layout). Torch Linear weights are [out, in]."""
    D, F, N, K, H = c.dim, c.ffn_dim, c.num_heads, c.num_kv_heads, c.head_dim
    same = lambda w: w
    return {
        "input_layernorm.weight": ("attn_norm", (D,), same),
        "post_attention_layernorm.weight": ("mlp_norm", (D,), same),
        "self_attn.q_proj.weight": ("q", (N * H, D), lambda w: w.T.reshape(D, N, H)),
        "self_attn.k_proj.weight": ("k", (K * H, D), lambda w: w.T.reshape(D, K, H)),
        "self_attn.v_proj.weight": ("v", (K * H, D), lambda w: w.T.reshape(D, K, H)),
        "self_attn.o_proj.weight": ("o", (D, N * H), lambda w: w.T.reshape(N, H, D)),
        "self_attn.q_proj.bias": ("q_bias", (N * H,), lambda w: w.reshape(N, H)),
        "self_attn.k_proj.bias": ("k_bias", (K * H,), lambda w: w.reshape(K, H)),
        "self_attn.v_proj.bias": ("v_bias", (K * H,), lambda w: w.reshape(K, H)),
        "self_attn.q_norm.weight": ("q_norm", (H,), same),
        "self_attn.k_norm.weight": ("k_norm", (H,), same),
        "mlp.gate_proj.weight": ("w_gate", (F, D), lambda w: w.T),
        "mlp.up_proj.weight": ("w_up", (F, D), lambda w: w.T),
        "mlp.down_proj.weight": ("w_down", (D, F), lambda w: w.T),
    }


def _top(c: ModelConfig):
    return {
        "model.embed_tokens.weight": ("embed", (c.vocab_size, c.dim), lambda w: w),
        "model.norm.weight": ("final_norm", (c.dim,), lambda w: w),
        "lm_head.weight": ("lm_head", (c.vocab_size, c.dim), lambda w: w.T),
    }


def hf_name(leaf: str, layer: int | None, config: ModelConfig) -> str:
    """The HF tensor name that fills `leaf` (of `layer`), for error messages and writers."""
    if layer is None:
        return next(k for k, (name, _, _) in _top(config).items() if name == leaf)
    suffix = next(k for k, (name, _, _) in _transforms(config).items() if name == leaf)
    return f"model.layers.{layer}.{suffix}"


def assemble_params(
    tensors: Iterable[tuple[str, np.ndarray]], config: ModelConfig, dtype, source: str = "", shardings=None
) -> dict:
    """Build the parameter tree from `(hf_name, array)` pairs; missing or mis-shaped tensors are errors.

    `shardings` (a tree like `param_specs` of `jax.sharding.Sharding`s, e.g. `sharding.param_shardings`)
    places each finished leaf straight into its shards: every device receives only its slice.
    """
    specs = param_specs(config)
    layer_specs, top_specs = specs["layers"], {k: v for k, v in specs.items() if k != "layers"}
    np_dtype = jnp.dtype(dtype)
    per_layer, top = _transforms(config), _top(config)
    buffers: dict[str, np.ndarray] = {}
    filled: dict[str, set[int]] = {k: set() for k in layer_specs}
    out_layers: dict[str, jax.Array] = {}
    out_top: dict[str, jax.Array] = {}
    where = f" in {source}" if source else ""

    def place(array: np.ndarray, leaf: str, top_level: bool) -> jax.Array:
        if shardings is None:
            return jnp.asarray(array)
        target = shardings[leaf] if top_level else shardings["layers"][leaf]
        return jax.make_array_from_callback(array.shape, target, lambda index: array[index])

    for name, array in tensors:
        m = _LAYER.match(name)
        if m:
            layer, suffix = int(m.group(1)), m.group(2)
            if suffix not in per_layer or per_layer[suffix][0] not in layer_specs:
                continue  # e.g. rotary_emb.inv_freq buffers, or biases this config does not use
            leaf, hf_shape, fn = per_layer[suffix]
            if layer >= config.num_layers:
                raise ValueError(f"tensor {name!r}{where} is for layer {layer}, the config has {config.num_layers}")
            buf = buffers.setdefault(leaf, np.empty(layer_specs[leaf].shape, np_dtype))
            buf[layer] = fn(_checked(name, array, hf_shape, where))
            filled[leaf].add(layer)
            if len(filled[leaf]) == config.num_layers:
                out_layers[leaf] = place(buffers.pop(leaf), leaf, top_level=False)
        elif name in top and top[name][0] in top_specs:
            leaf, hf_shape, fn = top[name]
            out_top[leaf] = place(fn(_checked(name, array, hf_shape, where)).astype(np_dtype), leaf, top_level=True)

    missing = [hf_name(k, None, config) for k in top_specs if k not in out_top]
    for leaf, layers in filled.items():
        missing += [hf_name(leaf, i, config) for i in range(config.num_layers) if i not in layers]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"missing tensor(s){where}: {', '.join(missing[:5])}{more}")
    return {**out_top, "layers": out_layers}


def _checked(name, array, hf_shape, where) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != tuple(hf_shape):
        raise ValueError(
            f"tensor {name!r}{where} has shape {tuple(array.shape)}, the config needs {tuple(hf_shape)}"
        )
    return array
