"""The Llama-family decoder as a pure function: `forward(params, cache, tokens, lengths) -> (logits, cache)`.

Embedding, RMSNorm, rotary embedding, the attention block (GQA, optional q/k/v bias and q/k norm), the
SwiGLU MLP and the output head. Layers are stacked on a leading axis and run with `lax.scan`; the cache
is threaded through the scan as part of the carry. Attention goes through `attention.attend`, every
weight product through `ops.matmul` (`ops.matmuls` for products sharing an input). Knows nothing of checkpoints, sampling or jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import attention, ops, tensor_parallel
from .config import ModelConfig
from .packing import is_packed
from .params import LAYER_MATRICES
from .rope import rope_tables

# Layers per iteration of the layer scan (`lax.scan(unroll=)`): fewer loop-control kernels (counter, slot
# slice, carry copy) per layer. H200 llama-3-8b decode, context 1k, batch 1/8/32: 4.805/5.078/6.270 ms with 1,
# 4.711/4.979/6.155 with 4, 4.865/4.995/6.233 fully unrolled (benchmarks/BENCHMARKS.md).
LAYER_UNROLL = 4


rms_norm = ops.rms_norm  # RMSNorm in float32, scaled by the weight after casting back (as Llama does)


def residual_add(eq: str, h, w, x, next_norm, fused: bool):
    """`x + h @ w` (a row-parallel product joining the residual stream) and the next block's input, `x`
    normalised by `next_norm` ((weight, eps, `ops.DigitsFor` or None)): with `fused`, one `ops.add_rms_norm`
    launch after the product (which also prepares the norm for fragment-ordered products when asked);
    otherwise an `ops.Normed` that the next product fuses where a kernel can."""
    if fused:
        return tensor_parallel.row_parallel(eq, h, w, residual=x, norm=next_norm)
    x = tensor_parallel.row_parallel(eq, h, w, residual=x)
    return x, ops.Normed(x, *next_norm[:2])


def attention_block(p, x, xn, cache, layer, rope, positions, valid, kv_lengths, config: ModelConfig, impl,
                    fused: bool = False):
    """`x + attention(xn)` for one layer on the residual stream `x [B, T, D]`, `xn` its normalised copy (an
    array, `ops.Normed` or `ops.XDigits`); writes this step's k/v into the cache. Returns the new x, its norm
    by the layer's `mlp_norm` (`residual_add`) and the cache."""
    q, k, v = ops.matmuls(xn, *attention_inputs(p))
    if config.qkv_bias or config.qk_norm:  # (packed q/k/v give parts of one output, `ops.Sliced`)
        q, k, v = ops.value(q), ops.value(k), ops.value(v)
    if config.qkv_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if config.qk_norm:
        q = rms_norm(q, p["q_norm"], config.norm_eps)
        k = rms_norm(k, p["k_norm"], config.norm_eps)
    out, cache = attention.rotate_write_attend(q, k, v, rope, cache, layer, positions, valid, kv_lengths,
                                               sliding_window=config.sliding_window, impl=impl)
    prep = ops.digits_for(x, mlp_inputs(p)) if fused else None
    x, xn = residual_add("btnh,nhd->btd", out, p["o"], x, (p["mlp_norm"], config.norm_eps, prep), fused)
    return x, xn, cache


def attention_inputs(p):
    """The (eq, weight) products reading a layer's normalised attention input."""
    return [("btd,dnh->btnh", p["q"]), ("btd,dkh->btkh", p["k"]), ("btd,dkh->btkh", p["v"])]


def mlp_inputs(p):
    """The (eq, weight) products reading a layer's normalised MLP input."""
    return [("btd,df->btf", p["w_gate"]), ("btd,df->btf", p["w_up"])]


def mlp_block(p, x, xn, next_norm, fused: bool = False):
    """`x + down(silu(gate(xn)) * up(xn))`: the SwiGLU MLP on the residual stream `x`, `xn` its normalised
    copy. Returns the new x and its norm by `next_norm` (`residual_add`; the next layer's attention norm)."""
    h = ops.swiglu(xn, *mlp_inputs(p))
    return residual_add("btf,fd->btd", h, p["w_down"], x, next_norm, fused)


def step_inputs(cache, tokens, lengths, config: ModelConfig):
    """Per-token bookkeeping of one chunk: lengths `[B]`, positions and valid `[B, T]`, the cached
    lengths after it `[B]`, and the rotary tables."""
    B, T = tokens.shape
    if lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    lengths = lengths.astype(jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    positions = cache.lengths[:, None] + t  # [B, T]
    valid = t < lengths[:, None]  # [B, T]
    kv_lengths = cache.lengths + lengths  # [B]
    return lengths, positions, valid, kv_lengths, rope_tables(config, positions)


def layer_view(layer_params, i):
    """Layer `i` of the stacked `layer_params`: weight matrices and norm weights as `ops.LayerOf` (kernels
    read the layer in place; other paths slice it), biases sliced; the parts of a packed matrix
    (`packing.Packed`, e.g. q/k/v) as `ops.PartOf` that layer, under their own names."""
    views = {}
    for name, a in layer_params.items():
        if is_packed(a):
            whole = ops.LayerOf(a.values, i)  # one object: `ops.matmuls` sees the parts belong together
            parts = a.offsets(a.values.shape[a.axis])  # inside the per-shard layers: this shard's block
            views.update({part: ops.PartOf(whole, start, size, a.axis) for part, start, size in parts})
        elif name in LAYER_MATRICES or name.endswith("norm"):
            views[name] = ops.LayerOf(a, i)
        else:
            views[name] = ops.LayerOf(a, i).take()
    return views


# A loop that runs the layers on every trip on more than `ops.SPLIT_KERNEL_MAX_ROWS` rows (generate's decode
# loop at a large batch, a pipeline's prefill ticks) gets them split once (`split_layers`), where there is room.
SPLIT_LAYERS = True


def split_layers(layer_params) -> tuple:
    """The stacked `layer_params` as a tuple of stacks of one layer each, for `decoder_layers`.

    XLA's GEMMs read a layer's slice of the stack only as a copy, made each time the layers run, and XLA
    does not hoist those copies out of an enclosing loop: split once before the loop, the stacks of one are
    read in place on every trip (and the GEMMs then beat the product kernel beyond `ops.SPLIT_KERNEL_MAX_ROWS`
    rows, not only beyond the `ops.KERNEL_MAX_ROWS` it takes). The price is a second copy of the layer weights
    while they are in use (`split_pays`)."""
    n = jax.tree.leaves(layer_params)[0].shape[0]
    return tuple(jax.tree.map(lambda a: a[j : j + 1], layer_params) for j in range(n))


def split_pays(layer_params, rows: int, shards: int = 1) -> bool:
    """Whether a loop running `layer_params` on `rows` rows a trip should split them first: `SPLIT_LAYERS`,
    more than `ops.SPLIT_KERNEL_MAX_ROWS` rows (XLA's GEMMs), and a second copy of one device's share
    (1 / `shards`) taking at most half of the free memory of this process's first device (free memory
    unknown: yes, as `memory.check_fits`)."""
    if not SPLIT_LAYERS or rows <= ops.SPLIT_KERNEL_MAX_ROWS:
        return False
    from .memory import free_device_bytes

    free, _ = free_device_bytes(jax.local_devices()[0])
    share = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(layer_params)) // shards
    return free is None or share <= free // 2


def split_for_loop(params, cache, rows: int, config: ModelConfig):
    """`params` with its layers split (`split_layers`) for a loop of `forward` calls on `rows` rows each,
    where the layers run whole by `decoder_layers` (not per tensor shard or pipeline stage, which split
    their own way or not at all) and `split_pays`."""
    if _pipelined() or tensor_parallel.applies(config, params, cache) or not split_pays(params["layers"], rows):
        return params
    return {**params, "layers": split_layers(params["layers"])}


def decoder_layers(layer_params, x, cache, layer_ids, rope, positions, valid, kv_lengths, *, config: ModelConfig, impl):
    """The stacked layers `layer_params` (leading axis) over `x [B, T, D]` with `lax.scan`; layer i reads
    and writes cache layer `layer_ids[i]`. Returns x and the cache (lengths not advanced). A tuple of
    stacks (`split_layers`) runs stack after stack, each with its share of `layer_ids`.

    The scan runs over layer numbers and the body picks its layer from the whole stacked weights
    (`layer_view`) rather than scanning over the weights: a scanned slice reaches a kernel as a copy.

    Where `ops.residual_norm_fuses` (GPU decode, products off the fused row kernel) each residual add
    and the norm after it are one launch, the MLP's reaching into the next layer's attention norm, so
    the carry holds x's normalised copy too."""
    if isinstance(layer_params, tuple):
        start = 0
        for part in layer_params:
            n = jax.tree.leaves(part)[0].shape[0]
            x, cache = decoder_layers(part, x, cache, layer_ids[start : start + n], rope, positions, valid,
                                      kv_lengths, config=config, impl=impl)
            start += n
        return x, cache
    n, eps = layer_ids.shape[0], config.norm_eps
    B, T, _ = x.shape
    stacked_norms = layer_params["attn_norm"]
    fused = ops.residual_norm_fuses(x, [
        ("btnh,nhd->btd", (B, T, config.num_heads, config.head_dim), ops.LayerOf(layer_params["o"], 0)),
        ("btf,fd->btd", (B, T, config.ffn_dim), ops.LayerOf(layer_params["w_down"], 0))])

    def layer_step(carry, xs):
        x, xn, cache = carry
        i, layer = xs
        p = layer_view(layer_params, i)
        if not fused:
            xn = ops.Normed(x, p["attn_norm"], eps)
        x, xn, cache = attention_block(p, x, xn, cache, layer, rope, positions, valid, kv_lengths, config, impl,
                                       fused)
        next_norm = (ops.LayerOf(stacked_norms, jnp.minimum(i + 1, n - 1)), eps,  # the last layer's is unused
                     ops.digits_for(x, attention_inputs(p)) if fused else None)  # (the next layer's: same shapes)
        x, xn = mlp_block(p, x, xn, next_norm, fused)
        return (x, xn if fused else None, cache), None

    xn = None
    if fused:  # the first layer's norm, in the form the carry holds
        xn = rms_norm(x, ops.LayerOf(stacked_norms, 0), eps)
        prep = ops.digits_for(x, attention_inputs(layer_view(layer_params, 0)))
        xn = xn if prep is None else ops.prepared(xn, prep)
    local = jnp.arange(n, dtype=jnp.int32)
    (x, _, cache), _ = jax.lax.scan(layer_step, (x, xn, cache), (local, layer_ids), unroll=LAYER_UNROLL)
    return x, cache


def last_tokens(x, lengths):
    """`x [B, T, D]` at each sequence's last valid token, `[B, 1, D]`."""
    last = jnp.maximum(lengths - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)


def output_logits(params, x, config: ModelConfig):
    """Final norm and output head: float32 logits `[B, T, V]`."""
    x = rms_norm(x, params["final_norm"], config.norm_eps)
    if config.tie_embeddings:
        return ops.matmul("btd,vd->btv", x, params["embed"], out_dtype=jnp.float32)
    return ops.matmul("btd,dv->btv", x, params["lm_head"], out_dtype=jnp.float32)


def forward(params, cache, tokens, lengths=None, *, config: ModelConfig, impl: str = "xla", last_only: bool = False):
    """Run `tokens [B, T]` (right-padded; `lengths [B]` valid tokens each) after what `cache` holds.

    Token t of sequence b sits at position `cache.lengths[b] + t`. Returns logits `[B, T, V]` in float32
    (or `[B, V]` at each sequence's last valid token when `last_only`) and the cache with this chunk's
    keys/values written and `lengths` advanced. Padded tokens are neither cached nor counted.

    Under a context mesh with a `pipeline` axis larger than one (`generate` sets the parameters' mesh),
    the layers run as a pipeline of micro-batches (`pipeline.forward`); with a `tensor` axis larger than
    one (and no pipeline) they run per shard (`tensor_parallel.decoder_layers`): same results.
    """
    if _pipelined():
        from .pipeline import forward as pipeline_forward

        return pipeline_forward(params, cache, tokens, lengths, config=config, impl=impl, last_only=last_only)
    lengths, positions, valid, kv_lengths, rope = step_inputs(cache, tokens, lengths, config)
    layer_ids = jnp.arange(config.num_layers, dtype=jnp.int32)
    x = tensor_parallel.embed(params, tokens, config)  # [B, T, D]
    if tensor_parallel.applies(config, params, cache):  # the layers per shard, so that kernels run on each shard
        x, cache = tensor_parallel.decoder_layers(
            params, x, cache, layer_ids, rope, positions, valid, kv_lengths, config=config, impl=impl
        )
    else:
        x, cache = decoder_layers(
            params["layers"], x, cache, layer_ids, rope, positions, valid, kv_lengths, config=config, impl=impl
        )
    cache = cache.replace(lengths=kv_lengths)
    if last_only:
        x = last_tokens(x, lengths)  # [B, 1, D]
    logits = output_logits(params, x, config)
    return (logits[:, 0] if last_only else logits), cache


def _pipelined() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.shape.get("pipeline", 1) > 1 and "pipeline" not in mesh.manual_axes
