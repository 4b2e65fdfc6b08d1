"""The one place the model reaches attention kernels.

`attend(q, view, q_positions, kv_lengths, ...)` takes queries `[B, T, N, H]` and one layer's cache view
(dense or paged, already holding this step's keys/values) and returns `[B, T, N, H]`. `impl` is one of
`xla`, `pallas`, `cudnn`, `auto`; it is an explicit argument, resolved here per call shape and platform,
and an unsupported combination falls back to the XLA path instead of raising. The XLA path is written
from the model's math (not from any kernel's reference), runs everywhere and is differentiable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import ops
from .cache import DenseView, KVCache, PagedView, QuantDenseView, QuantKVCache
from .rope import apply_rope
from .sharding import data_axis

IMPLS = ("xla", "pallas", "cudnn", "auto")
MASK_VALUE = -1e30  # large finite negative: a fully masked row never turns into NaN


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(IMPLS)}")
    return impl


def attend(q, view, q_positions, kv_lengths, *, sliding_window=None, impl="xla"):
    """Causal attention of `q [B,T,N,H]` at `q_positions [B,T]` over cached keys `< kv_lengths [B]`."""
    check_impl(impl)
    if isinstance(view, QuantDenseView):  # int8 / fp8 cache: the decode kernel or the XLA path read the codes
        if _quantized_kernel_applies(impl, q, view):
            return _pallas_quantized_decode(q, view, kv_lengths, sliding_window)
        return quantized_attention(q, view, q_positions, kv_lengths, sliding_window=sliding_window)
    chosen = _resolve(impl, q, view)
    if chosen == "pallas":
        return per_shard(_pallas, q, view, q_positions, kv_lengths, sliding_window)
    if chosen == "cudnn":
        return per_shard(_cudnn, q, view, q_positions, kv_lengths, sliding_window)
    if isinstance(view, PagedView):
        view = gather_pages(view)
    return xla_attention(q, view.k, view.v, q_positions, kv_lengths, sliding_window=sliding_window)


ROPE_WRITE_KERNEL = True  # decode on a GPU rotates and writes in one launch (False: the XLA ops, for comparisons)
APPEND_KERNEL = True  # ... and that launch is the decode attention's own (False: `rope_write`, then attention)


def rotate_write_attend(q, k, v, rope, cache, layer, positions, valid, kv_lengths, *, sliding_window=None,
                        impl="xla"):
    """(attention output `[B, T, N, H]`, cache): this step's q and k rotated, k and v written into `cache`
    at `positions [B, T]` where `valid` (`rotate_and_write`), then q attending over the cached keys `<
    kv_lengths [B]` (`attend`).

    Where the one-token kernel of `rotate_and_write` applies and the dense decode kernel would attend, both
    are one launch (`pallas_kernels.decode_attention_append`): llama-3-8b batch-1 decode on an H200 ran
    `rope_write` at ~2.2 us a layer (benchmarks/BENCHMARKS.md). q, k and v may be parts of one product's
    output (`ops.Sliced`, packed q/k/v weights): that kernel reads them inside it, everything else cuts them.
    That launch's output is `ops.Unmerged` (its key splits not merged yet): the output product merges them in
    its own preparation of x where it makes one, any other consumer with `combine_splits`' launch. An int8 /
    fp8 cache (`QuantKVCache`) takes the same launch, which quantizes the new key and value as the cache's
    `write` does (llama-3-8b batch 16 on an H200: the XLA rotation, quantization and scatters it replaces
    cost ~0.44 ms a step, benchmarks/BENCHMARKS.md)."""
    import pallas_kernels as pk

    quantized = isinstance(cache, QuantKVCache)
    cache_ok = quantized or _holds_q_dtype(cache, q)
    if (APPEND_KERNEL and cache_ok and _one_token_kernel_applies(impl, q, k, v) and _pallas_query_ok(q)
            and pk.decode_attention_supports_append(q.shape[-1])):
        cos, sin = (t[:, 0] for t in rope)
        at = jnp.where(valid[:, 0], positions[:, 0], -1)  # -1: not written
        whole = ops.whole_of((q, k, v), axis=2)  # packed q/k/v: their one product [B, T, N + 2K, H]
        heads = (whole[:, 0], None, None) if whole is not None else (ops.value(t)[:, 0] for t in (q, k, v))
        scales = dict(k_scale=cache.k_scale, v_scale=cache.v_scale) if quantized else {}
        partials, *written = pk.decode_attention_append(
            *heads, cos, sin, cache.k, cache.v, layer=layer, positions=at, lengths=kv_lengths,
            sliding_window=sliding_window, interpret=jax.default_backend() != "gpu", merge=False, **scales)
        names = ("k", "v", "k_scale", "v_scale") if quantized else ("k", "v")
        return ops.Unmerged(partials), cache.replace(**dict(zip(names, written)))
    q, k, v = ops.value(q), ops.value(k), ops.value(v)
    q, cache = rotate_and_write(q, k, v, rope, cache, layer, positions, valid, impl=impl)
    out = attend(q, cache.view(layer), positions, kv_lengths, sliding_window=sliding_window, impl=impl)
    return out, cache


def _rope_write_applies(impl, q, k, v, cache) -> bool:
    """`_one_token_kernel_applies` over a dense cache in q's dtype."""
    return _holds_q_dtype(cache, q) and _one_token_kernel_applies(impl, q, k, v)


def _holds_q_dtype(cache, q) -> bool:
    """A dense (unquantized) cache of q's dtype: what `rope_write` and the appending launch write as they are."""
    return isinstance(cache, KVCache) and cache.k.dtype == q.dtype


def _one_token_kernel_applies(impl, q, k, v) -> bool:
    """One token per sequence in q, k and v of one 16-bit float dtype, on a GPU with `impl` auto or pallas and
    whole arrays (no automatic partitioning), head counts the kernel tiles."""
    from pallas_kernels import rope_write

    B, T, N, H = q.shape
    return (ROPE_WRITE_KERNEL and check_impl(impl) in ("auto", "pallas") and ops.on_gpu() and T == 1
            and q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16)
            and rope_write.supports(N, k.shape[2], H) and ops.whole_arrays())


def rotate_and_write(q, k, v, rope, cache, layer, positions, valid, *, impl="xla"):
    """(q rotated, cache with k rotated and v written at `positions [B, T]` where `valid`) for q `[B, T, N, H]`,
    k and v `[B, T, K, H]`, rope = (cos, sin) `[B, T, H]`.

    Where `_rope_write_applies`, one Pallas launch (`pallas_kernels.rope_write`) instead of the rotations
    and the scatter as XLA kernels (~6 per layer at batch 1). Everything else, the same math in XLA."""
    from pallas_kernels import rope_write

    if not _rope_write_applies(impl, q, k, v, cache):
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, cache.write(layer, k, v, positions, valid)
    cos, sin = (t[:, 0] for t in rope)
    at = jnp.where(valid[:, 0], positions[:, 0], -1)  # -1: not written
    q, k_cache, v_cache = rope_write.rope_write(q[:, 0], k[:, 0], v[:, 0], cos, sin, cache.k, cache.v, layer=layer,
                                                positions=at)
    return q[:, None], cache.replace(k=k_cache, v=v_cache)


def _resolve(impl, q, view) -> str:
    """Pick a concrete implementation; anything unsupported here falls back to XLA."""
    if impl == "xla" or jax.default_backend() != "gpu":
        return "xla"
    if impl == "auto":
        # Measured on an H200 (pallas_kernels/NOTES.md): cuDNN leads prefill, the Pallas split-K kernels
        # lead decode from batch 16 up and cover the paged cache, which cuDNN does not read.
        dense_prefill = q.shape[1] > 1 and isinstance(view, DenseView) and _cudnn_supports(q)
        impl = "cudnn" if dense_prefill else "pallas"
    if impl == "pallas" and _pallas_supports(q, view):
        return "pallas"
    if impl == "cudnn" and isinstance(view, DenseView) and _cudnn_supports(q):
        return "cudnn"
    return "xla"


def _quantized_kernel_applies(impl, q, view) -> bool:
    """The Pallas decode kernel on an int8 / fp8 cache: one query token, `pallas`/`auto` on a GPU, the
    cache's own view (stacked, read in place), and no mesh axis to split it over (XLA partitions there)."""
    if impl not in ("pallas", "auto") or jax.default_backend() != "gpu" or q.shape[1] != 1 or view.layer is None:
        return False
    return ops.whole_arrays() and _pallas_query_ok(q)


def _pallas_quantized_decode(q, view, kv_lengths, sliding_window):
    import pallas_kernels as pk

    k, v, k_scale, v_scale = view.stacked
    out = pk.decode_attention(q[:, 0], k, v, lengths=kv_lengths, layer=view.layer, k_scale=k_scale,
                              v_scale=v_scale, sliding_window=sliding_window)
    return out[:, None]


def per_shard(kernel, q, view, q_positions, kv_lengths, sliding_window):
    """Call `kernel(q, view, q_positions, kv_lengths, sliding_window)` on each device's shard.

    A kernel call (pallas_call, cuDNN) on arrays sharded over a mesh must run inside `shard_map`. With a
    mesh in context (`jax.set_mesh`, as `generate` does for sharded parameters) and axes not already
    manual, the batch goes on `data` and the heads on `tensor` (the default sharding rules); kv heads
    fewer than the tensor degree are replicated, and each shard keeps the one its query heads use.
    Without a mesh, or when the heads do not split evenly, the kernel is called on the whole arrays.
    """
    mesh = jax.sharding.get_abstract_mesh()
    names = set() if mesh.empty else {a for a in mesh.axis_names if a not in mesh.manual_axes}
    free = {a for a in names if mesh.shape[a] > 1}
    if not free:
        return kernel(q, view, q_positions, kv_lengths, sliding_window)
    if isinstance(view, DenseView):
        view = DenseView(view.k, view.v)  # shards see their slice of the layer, not the stack
    B, N = q.shape[0], q.shape[2]
    K = view.k.shape[2] if isinstance(view, DenseView) else view.k_pages.shape[2]
    t = mesh.shape["tensor"] if "tensor" in free else 1
    if N % t or (K % t and t % K):
        return kernel(q, view, q_positions, kv_lengths, sliding_window)  # unreachable with the rules' checks
    data = data_axis(mesh, B) if "data" in free else None
    tensor = "tensor" if t > 1 else None
    kv = tensor if K % t == 0 else None  # else replicated: t // K shards share each kv head
    P = jax.sharding.PartitionSpec
    if isinstance(view, DenseView):
        view_spec = DenseView(P(data, None, kv, None), P(data, None, kv, None))
    else:
        view_spec = PagedView(P(None, None, kv, None), P(None, None, kv, None), P(data, None))

    def body(q, view, q_positions, kv_lengths):
        if tensor is not None and kv is None:
            head = jax.lax.axis_index("tensor") // (t // K)
            take = lambda x: jax.lax.dynamic_slice_in_dim(x, head, 1, axis=2)
            view = DenseView(take(view.k), take(view.v)) if isinstance(view, DenseView) else PagedView(
                take(view.k_pages), take(view.v_pages), view.block_table
            )
        return kernel(q, view, q_positions, kv_lengths, sliding_window)

    return jax.shard_map(
        body, mesh=mesh, in_specs=(P(data, None, tensor, None), view_spec, P(data, None), P(data)),
        out_specs=P(data, None, tensor, None), axis_names=names, check_vma=False,
    )(q, view, q_positions, kv_lengths)


def _pallas_query_ok(q) -> bool:
    """Head dims the kernels take (powers of two, 16..256) and a half-precision query."""
    H = q.shape[-1]
    return 16 <= H <= 256 and H & (H - 1) == 0 and q.dtype in (jnp.bfloat16, jnp.float16)


def _pallas_supports(q, view) -> bool:
    """`_pallas_query_ok`, and keys/values in the query's dtype."""
    k = view.k if isinstance(view, DenseView) else view.k_pages
    return _pallas_query_ok(q) and k.dtype == q.dtype


def _cudnn_supports(q) -> bool:
    return q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


def _pallas(q, view, q_positions, kv_lengths, sliding_window):
    import pallas_kernels as pk

    B, T = q.shape[:2]
    if T == 1:
        if isinstance(view, PagedView):
            out = pk.paged_decode_attention(
                q[:, 0], view.k_pages, view.v_pages, block_table=view.block_table, lengths=kv_lengths,
                sliding_window=sliding_window,
            )
        else:
            if view.layer is not None:  # read the layer in place from the stacked cache
                (k, v), layer = view.stacked, view.layer
            else:
                k, v, layer = view.k, view.v, None
            out = pk.decode_attention(q[:, 0], k, v, lengths=kv_lengths, layer=layer, sliding_window=sliding_window)
        return out[:, None]
    if isinstance(view, PagedView):
        view = gather_pages(view)
    return pk.flash_attention(
        q, view.k, view.v, kv_lengths=kv_lengths, q_offsets=q_positions[:, 0], causal=True,
        sliding_window=sliding_window,
    )


def _cudnn(q, view, q_positions, kv_lengths, sliding_window):
    """cuDNN through `jax.nn.dot_product_attention`; handles prefill from position 0 and T=1 decode."""
    T = q.shape[1]
    window = (sliding_window - 1, 0) if sliding_window else None
    if T == 1:
        # One query at the last valid position: length masking alone is the causal mask.
        return jax.nn.dot_product_attention(
            q, view.k, view.v, key_value_seq_lengths=kv_lengths, local_window_size=window, implementation="cudnn"
        )
    S = view.k.shape[1]
    if S < T:
        return xla_attention(q, view.k, view.v, q_positions, kv_lengths, sliding_window=sliding_window)

    def from_empty_cache():
        # The first T cache slots are this prompt, causal from position 0.
        return jax.nn.dot_product_attention(
            q, view.k[:, :T], view.v[:, :T], is_causal=True, key_value_seq_lengths=jnp.minimum(kv_lengths, T),
            local_window_size=window, implementation="cudnn",
        )

    def continuing():  # cuDNN's causal mask is top-left aligned: a chunk after a prefix takes the XLA path
        return xla_attention(q, view.k, view.v, q_positions, kv_lengths, sliding_window=sliding_window)

    return jax.lax.cond(jnp.all(q_positions[:, 0] == 0), from_empty_cache, continuing)


def xla_attention(q, k, v, q_positions, kv_lengths, *, sliding_window=None):
    """Reference attention in plain jnp: softmax in float32, GQA by grouping query heads per kv head."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    if _one_query(B, T):
        return _decode_attention(q, k, v, q_positions, kv_lengths, sliding_window)
    qg = q.reshape(B, T, K, G, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / H**0.5)
    kpos = jnp.arange(S)[None, None, :]  # [1, 1, S]
    qpos = q_positions[:, :, None]  # [B, T, 1]
    mask = (kpos <= qpos) & (kpos < kv_lengths[:, None, None])  # [B, T, S]
    if sliding_window:
        mask = mask & (qpos - kpos < sliding_window)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q.dtype)


def quantized_attention(q, view: QuantDenseView, q_positions, kv_lengths, *, sliding_window=None):
    """`xla_attention` over an int8 / fp8 cache, written from the math: scores = (q . k_codes) * k_scale,
    out = sum_s (p * v_scale) v_codes. The codes go into the products as they are (no dequantized copy);
    the per-token, per-head scales multiply the scores and the probabilities."""
    B, T, N, H = q.shape
    S, K = view.k.shape[1], view.k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, view.k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * (jnp.transpose(view.k_scale, (0, 2, 1))[:, :, None, None, :] * (1.0 / H**0.5))
    kpos = jnp.arange(S)[None, None, :]
    qpos = q_positions[:, :, None]
    mask = (kpos <= qpos) & (kpos < kv_lengths[:, None, None])  # [B, T, S]
    if sliding_window:
        mask = mask & (qpos - kpos < sliding_window)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1) * jnp.transpose(view.v_scale, (0, 2, 1))[:, :, None, None, :]
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(q.dtype), view.v.astype(q.dtype),
                     preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q.dtype)


REDUCE_MIN_BATCH = 2  # below this, the dot path is as fast or faster (H200, BENCHMARKS.md session 5)
REDUCE_MAX_BATCH = 8  # above this, the dot path wins inside the fused loop (H200, BENCHMARKS.md)


def _one_query(B: int, T: int) -> bool:
    """Take `_decode_attention` for decode at small batch. Measured on an H200, llama-3-8b, context 1024:
    at batch 128 it wins per-step (35 vs 46 ms) but loses in the fused loop (35 vs 27 ms), where XLA lays
    the cache out for the dot once per call, not once per step; at batch 8 it wins per-step (13.08 vs 13.81
    ms) and loses fused (13.13 vs 12.87). At batch 1 the dot is as fast with the stored weights or the
    weight kernel (6.40 vs 6.45, 4.99 vs 4.95 ms per step) and faster with contract-last weights (4.77 vs
    5.11 ms): XLA materialises the reduce path's float32 value products [S, N, H] (~10 us a layer), while a
    one-row cache slice is small enough for the dot's copy."""
    return T == 1 and REDUCE_MIN_BATCH <= B <= REDUCE_MAX_BATCH


def _decode_attention(q, k, v, q_positions, kv_lengths, sliding_window):
    """`xla_attention` for one query per sequence, as multiply + reduce over the cache as it lies.

    Why not einsum: a dot wants each layer's keys as [B, K, S, H], so XLA copied the layer out of the
    scanned cache every layer and, in a per-step jit, transposed the whole cache in and out of that layout
    every step (measured on an H200: over half of a batch-128 step). Reductions read keys and values in place.
    """
    B, _, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    qg = q.reshape(B, 1, K, N // K, H).astype(jnp.float32)  # [B, 1, K, G, H]
    scores = jnp.sum(qg * k[:, :, :, None, :].astype(jnp.float32), axis=-1) * (1.0 / H**0.5)  # [B, S, K, G]
    kpos = jnp.arange(S)[None, :]  # [1, S]
    qpos = q_positions[:, :1]  # [B, 1]
    mask = (kpos <= qpos) & (kpos < kv_lengths[:, None])  # [B, S]
    if sliding_window:
        mask = mask & (qpos - kpos < sliding_window)
    scores = jnp.where(mask[:, :, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=1)
    return _value_sum(probs, v).reshape(B, 1, N, H).astype(q.dtype)


def _value_sum(probs, v):
    """sum_s probs[b, s, k, g] * v[b, s, k, h] -> float32 `[B, K, G, H]`, a reduction reading v in place."""
    return jnp.sum(probs[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=1)


def gather_pages(view: PagedView) -> DenseView:
    """Materialise a paged layer as dense `[B, max_pages*page, K, H]` (the XLA path's way to read pages)."""
    table = jnp.maximum(view.block_table, 0)  # unassigned pages are masked by lengths anyway
    B, M = table.shape
    _, page, K, H = view.k_pages.shape
    k = view.k_pages[table].reshape(B, M * page, K, H)
    v = view.v_pages[table].reshape(B, M * page, K, H)
    return DenseView(k, v)
