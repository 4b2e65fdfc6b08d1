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

A prefill's micro-batches reach XLA's GEMMs, which would copy each layer's slice of the stacked weights
on every tick; each stage instead splits its layers once per call (`model.split_layers`, where a second
copy of its weights takes at most half of the free device memory).

The dense cache is viewed per stage as `[L/p * M, B/M, S, K, H]` (a free reshape), so micro-batch m of
local layer l is cache layer `l * M + m` and the model's own scan writes it in place. A paged cache
needs no reshape: micro-batch m uses rows of the block table.

`model.forward` comes here by itself under a context mesh whose `pipeline` axis is larger than one
(`generate`, `prefill` and `decode_step` set the parameters' mesh), with `default_microbatches`; call
`forward` directly to choose M. `decode_loop` is greedy decoding that keeps micro-batches of different
steps in flight (no fill and drain per step). Knows nothing of checkpoints, sampling or kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import model, ops, tensor_parallel
from .cache import KVCache, PagedKVCache, QuantKVCache
from .config import ModelConfig
from .sharding import data_axis

AXIS = "pipeline"


# Prefill micro-batches keep at least this many rows (tokens): more micro-batches shrink the fill/drain
# bubble, (p - 1) / (M + p - 1) of the ticks, until the GEMMs get too few rows. llama-3-8b, batch 64 x 512
# on 4x H200 (S16-5): M = 32 (1024 rows) 3.29x one GPU, M = 16 3.20x (M = 8 and 64 measured only with
# the per-tick weight copies: 2.7x and 2.2x, S16-4 and S4-6).
PREFILL_ROWS = 1024


def default_microbatches(batch: int, tokens: int, stages: int) -> int:
    """M: as many micro-batches as stages (all stages busy once the pipeline is full), or the largest
    divisor of the batch below that; for a prefill (`tokens` > 1), more where each still has
    `PREFILL_ROWS` rows (up to 8 per stage)."""
    divisors = [m for m in range(1, batch + 1) if batch % m == 0]
    fill = max(m for m in divisors if m <= stages)
    more = [m for m in divisors if tokens > 1 and m <= 8 * stages and batch // m * tokens >= PREFILL_ROWS]
    return max([fill, *more])


def _stages(mesh, config: ModelConfig, caller: str):
    """(mesh, pipeline degree p): `mesh`, or the context mesh, checked to have a `pipeline` axis whose
    degree divides the layers."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        raise ValueError(f"pipeline.{caller} needs a mesh with a 'pipeline' axis (pass mesh= or use jax.set_mesh)")
    p = mesh.shape[AXIS]
    if config.num_layers % p:
        raise ValueError(f"pipeline degree {p} does not divide num_layers={config.num_layers}")
    return mesh, p


def _by_microbatch(a, M: int):
    """A stage's dense cache array `[L/p, b, ...]` as `[L/p * M, b/M, ...]` (a free reshape): micro-batch m
    of local layer l is layer l * M + m, which the model's layer scan writes in place."""
    return a.reshape(a.shape[0] * M, a.shape[1] // M, *a.shape[2:])


def _by_layer(a, n_local: int):
    """`_by_microbatch` undone: `[L/p * M, b/M, ...]` back to `[L/p, b, ...]`."""
    return a.reshape(n_local, -1, *a.shape[2:])


def forward(
    params, cache, tokens, lengths=None, *, config: ModelConfig, impl: str = "xla", last_only: bool = False,
    microbatches: int | None = None, mesh=None,
):
    """`model.forward` as a pipeline over the mesh axis `pipeline` (the context mesh unless `mesh`).

    With a `data` axis that divides the batch, each data shard pipelines its own rows (the stage is
    manual over `pipeline` and `data`); `microbatches` (default `default_microbatches`) counts the
    micro-batches of one data shard.
    """
    mesh, p = _stages(mesh, config, "forward")
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

    # Micro-batches of many rows (prefill) reach XLA's GEMMs, which would copy each layer's slice on every
    # tick: the stages' layers split once, before the ticks, where that pays.
    tensor = mesh.shape["tensor"] if "tensor" in mesh.axis_names else 1
    split = model.split_pays(params["layers"], rows=local_b // M * T, shards=p * tensor)

    def stage(layer_params, kv, rows):
        s = jax.lax.axis_index(AXIS)
        n_local = jax.tree.leaves(layer_params)[0].shape[0]
        mb = rows[0].shape[0] // M  # rows of one micro-batch on this data shard
        x, positions, valid, kv_lengths, cos, sin, tables = (a.reshape(M, mb, *a.shape[1:]) for a in rows)
        if not paged:
            kv = tuple(_by_microbatch(a, M) for a in kv)
        if split:
            layer_params = model.split_layers(layer_params)
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
            kv = tuple(_by_layer(a, n_local) for a in kv)
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


def decode_loop(params, cache, tokens, steps: int, *, config: ModelConfig, impl: str = "xla",
                microbatches: int | None = None, mesh=None):
    """Greedy decoding of `steps` tokens through the pipeline with micro-batches of different steps in
    flight: `forward` fills and drains the pipeline on every step, so during decode each stage re-reads its
    weights M + p - 1 times per step while doing one micro-batch's work each time; here the last stage's
    head turns micro-batch m's activations into its next token and passes it round to stage 0, which starts
    m's next step on the following tick, so after the first p - 1 ticks every stage works on every tick.

    `tokens [B]` is each sequence's next input token (the argmax of prefill's logits); returns the tokens
    generated `[B, steps]` (token k is the argmax after feeding token k - 1) and the cache with the `steps`
    fed tokens written. M (default p) micro-batches, M >= p. A pipeline-only mesh and a dense cache.
    """
    mesh, p = _stages(mesh, config, "decode_loop")
    if any(mesh.shape[a] > 1 for a in mesh.axis_names if a != AXIS) or type(cache) is not KVCache:
        raise NotImplementedError("pipeline.decode_loop runs on a pipeline-only mesh with a dense cache; use forward")
    (B,) = tokens.shape
    M = microbatches or p
    if M < p or B % M:
        raise ValueError(f"decode_loop needs at least {p} micro-batches (one per stage) dividing the batch {B}, got {M}")
    mb, work = B // M, steps * M  # rows per micro-batch; (micro-batch, step) items per stage
    head = {k: params[k] for k in ("embed", "final_norm", "lm_head") if k in params}

    def stage(layer_params, head, k, v, lengths, tokens):
        s = jax.lax.axis_index(AXIS)
        n_local = k.shape[0]
        kv = tuple(_by_microbatch(a, M) for a in (k, v))
        ids = jnp.arange(n_local, dtype=jnp.int32) * M
        perm = [(i, (i + 1) % p) for i in range(p)]

        def tick(carry, t):
            state, arrived, feed, lengths, kv, out = carry
            # the token the last stage made at tick t - 1 is for micro-batch (t - p) mod M's next step
            slot = jnp.maximum(t - p, 0) % M
            feed = feed.at[slot].set(jnp.where(t >= p, arrived, feed[slot]))
            j = jnp.clip(t - s, 0, work - 1)  # this stage's item: micro-batch j mod M, step j // M
            active = (t - s >= 0) & (t - s < work)
            m, step = j % M, j // M
            x = ops.embed(head["embed"], feed[m])[:, None, :]  # stage 0's input
            h = jnp.where(s == 0, x, state)
            pos = lengths[m][:, None]  # [mb, 1]
            kv_len = lengths[m] + active.astype(jnp.int32)
            h, sub = model.decoder_layers(
                layer_params, h, KVCache(*kv, lengths[m]), ids + m, model.rope_tables(config, pos), pos,
                jnp.broadcast_to(active, (mb, 1)), kv_len, config=config, impl=impl,
            )
            kv, lengths = (sub.k, sub.v), lengths.at[m].set(kv_len)
            token = jax.lax.cond(  # only the last stage reads the head
                s == p - 1, lambda h: jnp.argmax(model.output_logits(head, h, config)[:, 0], -1).astype(jnp.int32),
                lambda h: jnp.zeros((mb,), jnp.int32), h)
            out = out.at[step, m].set(jnp.where(active & (s == p - 1), token, out[step, m]))
            state, arrived = jax.lax.ppermute((h, token), AXIS, perm)
            return (state, arrived, feed, lengths, kv, out), None

        feed = tokens.reshape(M, mb)  # the token each micro-batch feeds next (stage 0 reads it)
        state = ops.embed(head["embed"], feed[0])[:, None, :]  # any [mb, 1, D] value: idle stages ignore it
        init = (state, jnp.zeros((mb,), jnp.int32), feed, lengths.reshape(M, mb), kv,
                jnp.zeros((steps, M, mb), jnp.int32))
        (_, _, _, lengths, kv, out), _ = jax.lax.scan(tick, init, jnp.arange(work + p - 1, dtype=jnp.int32))
        k, v = (_by_layer(a, n_local) for a in kv)
        return out[None], k, v, lengths.reshape(1, B)

    layer_spec = jax.tree.map(lambda _: P(AXIS), params["layers"])
    out, k, v, lengths = jax.shard_map(
        stage, mesh=mesh, in_specs=(layer_spec, jax.tree.map(lambda _: P(), head), P(AXIS), P(AXIS), P(), P()),
        out_specs=(P(AXIS), P(AXIS), P(AXIS), P(AXIS)), axis_names=set(mesh.axis_names), check_vma=False,
    )(params["layers"], head, cache.k, cache.v, cache.lengths, tokens.astype(jnp.int32))
    new = out[p - 1].transpose(1, 2, 0).reshape(B, steps)  # [steps, M, mb] -> [B, steps]
    return new, cache.replace(k=k, v=v, lengths=lengths[0])
