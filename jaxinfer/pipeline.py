"""Pipeline parallelism: the stacked `layers` axis split on the mesh axis `pipeline`, micro-batches
flowing stage to stage.

`forward(params, cache, tokens, lengths, ...)` computes what `model.forward` computes. Embedding, the
final norm and the output head run outside the pipeline (SPMD over the whole mesh); the decoder layers
run inside `jax.shard_map`, manual over `pipeline` only (data and tensor parallelism stay automatic
inside a stage). Each stage holds its slice of the stacked layer weights and of the KV cache
(`[L/p, B, S, K, H]`). The batch is cut into M micro-batches; at tick i stage s works on micro-batch
i - s and hands its activations to stage s + 1 with `ppermute`, so after p - 1 ticks of filling all
stages work at once (GPipe schedule, M + p - 1 ticks; a stage's idle ticks compute on masked rows and
write nothing).

The dense cache is viewed per stage as `[L/p * M, B/M, S, K, H]` (a free reshape), so micro-batch m of
local layer l is cache layer `l * M + m` and the model's own scan writes it in place. A paged cache
needs no reshape: micro-batch m uses rows of the block table.

`model.forward` comes here by itself under a context mesh whose `pipeline` axis is larger than one
(`generate`, `prefill` and `decode_step` set the parameters' mesh), with `default_microbatches`; call
`forward` directly to choose M. Knows nothing of checkpoints, sampling or kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import model, tensor_parallel
from .cache import KVCache, PagedKVCache, QuantKVCache
from .config import ModelConfig
from .sharding import data_axis

AXIS = "pipeline"


def default_microbatches(batch: int, tokens: int, stages: int) -> int:
    """M: as many micro-batches as stages (all stages busy once the pipeline is full), or the largest
    divisor of the batch below that."""
    return max(m for m in range(1, min(batch, stages) + 1) if batch % m == 0)


def forward(
    params, cache, tokens, lengths=None, *, config: ModelConfig, impl: str = "xla", last_only: bool = False,
    microbatches: int | None = None, mesh=None,
):
    """`model.forward` as a pipeline over the mesh axis `pipeline` (the context mesh unless `mesh`).

    With a `data` axis that divides the batch, each data shard pipelines its own rows (the stage is
    manual over `pipeline` and `data`); `microbatches` (default `default_microbatches`) counts the
    micro-batches of one data shard.
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        raise ValueError("pipeline.forward needs a mesh with a 'pipeline' axis (pass mesh= or use jax.set_mesh)")
    p = mesh.shape[AXIS]
    if config.num_layers % p:
        raise ValueError(f"pipeline degree {p} does not divide num_layers={config.num_layers}")
    B, T = tokens.shape
    data = data_axis(mesh, B)  # None: the batch stays whole on every data shard
    local_b = B // mesh.shape["data"] if data else B
    M = microbatches or default_microbatches(local_b, T, p)
    if local_b % M:
        raise ValueError(f"batch {B} ({local_b} rows per data shard) is not divisible into {M} micro-batches")
    paged = isinstance(cache, PagedKVCache)
    if paged and data:
        raise NotImplementedError("a paged cache with pipeline and data parallelism together: use a dense cache")

    lengths, positions, valid, kv_lengths, rope = model.step_inputs(cache, tokens, lengths, config)
    x = tensor_parallel.embed(params, tokens, config)  # [B, T, D]
    rows = (x, positions, valid, kv_lengths, *rope, cache.block_table if paged else kv_lengths)
    # the cache's per-layer arrays, all stacked on layers (a quantized cache adds its scales)
    names = ("k_pages", "v_pages") if paged else ("k", "v", "k_scale", "v_scale") if isinstance(
        cache, QuantKVCache) else ("k", "v")
    dense = QuantKVCache if isinstance(cache, QuantKVCache) else KVCache
    kv = tuple(getattr(cache, n) for n in names)
    out_t = 1 if last_only else T

    def stage(layer_params, kv, rows):
        s = jax.lax.axis_index(AXIS)
        n_local = jax.tree.leaves(layer_params)[0].shape[0]
        mb = rows[0].shape[0] // M  # rows of one micro-batch on this data shard
        x, positions, valid, kv_lengths, cos, sin, tables = (a.reshape(M, mb, *a.shape[1:]) for a in rows)
        if not paged:  # [L/p, b, ...] -> [L/p * M, mb, ...]: micro-batch m of local layer l is layer l * M + m
            kv = tuple(a.reshape(n_local * M, mb, *a.shape[2:]) for a in kv)
        outs = jnp.zeros((M, mb, out_t, x.shape[-1]), x.dtype)
        state = jnp.zeros(x.shape[1:], x.dtype)

        def tick(carry, i):
            state, kv, outs = carry
            m = i - s  # the micro-batch this stage works on at tick i
            active = (m >= 0) & (m < M)
            mc = jnp.clip(m, 0, M - 1)
            h = jnp.where(s == 0, x[mc], state)
            if paged:
                sub = PagedKVCache(*kv, tables[mc], kv_lengths[mc])
                ids = jnp.arange(n_local, dtype=jnp.int32)
            else:
                sub = dense(*kv, kv_lengths[mc])
                ids = jnp.arange(n_local, dtype=jnp.int32) * M + mc
            h, sub = model.decoder_layers(
                layer_params, h, sub, ids, (cos[mc], sin[mc]), positions[mc], valid[mc] & active, kv_lengths[mc],
                config=config, impl=impl,
            )
            kv = tuple(getattr(sub, n) for n in names)
            result = model.last_tokens(h, valid[mc].sum(-1).astype(jnp.int32)) if last_only else h
            outs = outs.at[mc].set(jnp.where(active & (s == p - 1), result, outs[mc]))
            state = jax.lax.ppermute(h, AXIS, [(j, j + 1) for j in range(p - 1)])
            return (state, kv, outs), None

        (_, kv, outs), _ = jax.lax.scan(tick, (state, kv, outs), jnp.arange(M + p - 1, dtype=jnp.int32))
        if not paged:
            kv = tuple(a.reshape(n_local, M * mb, *a.shape[2:]) for a in kv)
        return outs.reshape(1, M * mb, out_t, -1), kv

    # Manual over pipeline, data (when it splits the batch) and every size-1 axis, so that a stage of a
    # pipeline-only mesh is fully manual (kernels need no inner shard_map); tensor stays automatic.
    manual = {AXIS} | ({data} if data else set()) | {a for a in mesh.axis_names if mesh.shape[a] == 1}
    layer_spec = jax.tree.map(lambda _: P(AXIS), params["layers"])
    kv_spec = tuple(P(AXIS) if paged else P(AXIS, data) for _ in names)
    outs, kv = jax.shard_map(
        stage, mesh=mesh, in_specs=(layer_spec, kv_spec, P(data)), out_specs=(P(AXIS, data), kv_spec),
        axis_names=manual, check_vma=False,
    )(params["layers"], kv, rows)
    h = outs[p - 1]  # the last stage's activations [B, T or 1, D]
    cache = cache.replace(**dict(zip(names, kv)), lengths=kv_lengths)
    logits = model.output_logits(params, h, config)
    return (logits[:, 0] if last_only else logits), cache
