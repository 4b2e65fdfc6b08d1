"""Tensor parallelism with the layers run per shard: the decoder layers inside one `jax.shard_map`.

Under XLA's automatic partitioning a Pallas call cannot see its shard, so `ops` keeps the weight kernel
off there and a tensor-parallel step ran XLA's products (each a dot on a copied layer slice); on 2 and 4
H200s that made TP slower than one GPU. Here the whole layer stack is one manual region over every mesh
axis: each device runs the same model code on its shard (its query and kv heads, its slice of the ffn,
its rows of the batch when `data` splits it), so the weight kernel and the attention kernels run as on
one device, and the Megatron pattern is written out: q/k/v and gate/up are column-parallel (no
communication), the attention output and the MLP down product are row-parallel and their partial sums
are added over `tensor` with one `psum` each (`row_parallel`, in float32).

`model.forward` comes here when `applies(...)`: a context mesh (`generate` sets the parameters' mesh)
with `tensor` larger than one, no pipeline, and a tensor degree dividing the query heads, kv heads and
ffn width, which is how the default sharding rules split the layers. Anything else keeps XLA's
partitioner: kv heads fewer than the degree, a pipeline, a group-quantized weight whose shards would cut
a group, a paged cache whose rows `data` splits (its page pool is shared by all rows). The embedding lookup runs per shard under any mesh
with a `tensor` axis (`embed`; the pipeline's too); the output head stays with XLA, split on the
vocabulary. `ENABLED = False` turns both off (for comparisons).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import ops
from . import sharding as sh
from . import xla_flags
from .cache import PagedKVCache, QuantKVCache
from .config import ModelConfig
from .quant.qarray import QArray

AXIS = "tensor"
ENABLED = True


def _tensor_mesh():
    """The context mesh when it has a `tensor` axis larger than one and no manual axes yet, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if not ENABLED or mesh.empty or mesh.manual_axes or mesh.shape.get(AXIS, 1) == 1:
        return None
    return mesh


def applies(config: ModelConfig, params, cache=None) -> bool:
    """The layers can run per shard over the context mesh's `tensor` axis (see the module docstring)."""
    mesh = _tensor_mesh()
    if mesh is None or mesh.shape.get("pipeline", 1) > 1:
        return False
    if isinstance(cache, PagedKVCache) and sh.data_axis(mesh, cache.block_table.shape[0]) is not None:
        return False  # the page pool is shared by all rows: data shards would each keep a diverging copy
    t = mesh.shape[AXIS]
    divides = config.num_heads % t == 0 and config.num_kv_heads % t == 0 and config.ffn_dim % t == 0
    return divides and _whole_groups(params, config, mesh)


def _whole_groups(params, config: ModelConfig, mesh) -> bool:
    """Each shard of a group-quantized layer weight holds whole groups: where the codes' group axis is
    split, the scales' is too (the rules replicate scales whose group count the degree does not divide,
    and a shard with part of a group cannot dequantize it; XLA's partitioner handles that case)."""
    shardings = sh.tree_shardings(params, config, mesh)["layers"]
    for name, w in params["layers"].items():
        if isinstance(w, QArray) and w.group_size is not None:
            axis = w.group_axis % w.ndim
            split = lambda s: (tuple(s.spec) + (None,) * w.ndim)[axis]
            if split(shardings[name].values) != split(shardings[name].scales):
                return False
    return True


def row_parallel(eq: str, x, w, residual=None, norm=None):
    """`ops.matmul(eq, x, w, residual=residual, norm=norm)` for a weight whose contraction is split on
    `tensor` (attention output, MLP down). Inside the per-shard layers each device's product is a float32
    partial sum, added over the shards with one `psum` and rounded to x's dtype where it joins the residual
    (`ops.join_residual`: with `norm`, inside the add + norm launch, which saves a conversion kernel a
    sum); elsewhere XLA's partitioner inserts the sum."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.manual_axes or mesh.shape[AXIS] == 1:
        return ops.matmul(eq, x, w, residual=residual, norm=norm)
    out = jax.lax.psum(ops.matmul(eq, x, w, jnp.float32), AXIS)
    if residual is None or residual.dtype != x.dtype:  # else join_residual rounds it to the residual's dtype
        out = out.astype(x.dtype)
    return ops.join_residual(out, residual, norm)


def embed(params, tokens, config: ModelConfig):
    """`ops.embed(params["embed"], tokens)`; under a mesh with a `tensor` axis, per shard: each device
    looks up the tokens of its slice of the vocabulary (zeros elsewhere) and one `psum` over `tensor`
    assembles the rows. Under XLA's partitioner the lookup of a vocab-split table all-gathered the whole
    table every step (1 GB for llama-3-8b: 1.95 ms of a 5.5 ms TP2 step on an H200)."""
    mesh = _tensor_mesh()
    if mesh is None:
        return ops.embed(params["embed"], tokens)
    rows, rules = _region(mesh, tokens.shape[0])
    table_spec = _specs(sh.tree_shardings(params, config, mesh, rules)["embed"])

    def body(table, tokens):
        n = table.shape[0]  # this shard's vocabulary rows (all of them when the vocab is replicated)
        if n == config.vocab_size:
            return ops.embed(table, tokens)
        local = tokens - jax.lax.axis_index(AXIS) * n
        mine = (local >= 0) & (local < n)
        x = ops.embed(table, jnp.where(mine, local, 0))
        return jax.lax.psum(jnp.where(mine[..., None], x, jnp.zeros((), x.dtype)), AXIS)

    return jax.shard_map(body, mesh=mesh, in_specs=(table_spec, rows), out_specs=rows,
                         axis_names=set(mesh.axis_names), check_vma=False)(params["embed"], tokens)


def _region(mesh, batch: int):
    """(rows, rules) of a per-shard region: the spec of per-sequence arrays (batch on `data` where it
    divides the batch) and the default sharding rules with the batch placed so."""
    rows = P(sh.data_axis(mesh, batch))
    return rows, dataclasses.replace(sh.DEFAULT_RULES, batch=rows[0])


def _specs(shardings):
    """`PartitionSpec`s of a tree of `NamedSharding`s (shard_map's in/out specs)."""
    return jax.tree.map(lambda s: s.spec, shardings)


def decoder_layers(params, x, cache, layer_ids, rope, positions, valid, kv_lengths, *, config: ModelConfig, impl):
    """`model.decoder_layers` on `params["layers"]`, run per shard over the context mesh (`applies`)."""
    from . import model  # (model imports this module)

    if jax.default_backend() == "gpu":
        xla_flags.warn_if_missing()  # the sums' kernel (NCCL) is chosen by a process flag
    mesh = jax.sharding.get_abstract_mesh()
    t = mesh.shape[AXIS]
    rows, rules = _region(mesh, x.shape[0])
    layer_specs = _specs(sh.tree_shardings(params, config, mesh, rules)["layers"])
    paged = isinstance(cache, PagedKVCache)
    cache_specs = _specs(sh.cache_shardings(config, mesh, rules, paged=paged, quantized=isinstance(cache, QuantKVCache)))
    local = config.replace(num_heads=config.num_heads // t, num_kv_heads=config.num_kv_heads // t,
                           ffn_dim=config.ffn_dim // t)

    def body(layers, x, cache, layer_ids, rope, positions, valid, kv_lengths):
        return model.decoder_layers(layers, x, cache, layer_ids, rope, positions, valid, kv_lengths,
                                    config=local, impl=impl)

    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(layer_specs, rows, cache_specs, P(), (rows, rows), rows, rows, rows),
        out_specs=(rows, cache_specs), axis_names=set(mesh.axis_names), check_vma=False,
    )(params["layers"], x, cache, layer_ids, rope, positions, valid, kv_lengths)

