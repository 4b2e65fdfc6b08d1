"""KV caches as explicit pytrees: dense `[L, B, S, K, H]` and paged `[L, P, page, K, H]` + block table.

The cache is the only state of a generation. Every write is pure (returns a new cache); with the cache
donated to a jitted step XLA performs it in place. Both caches offer the same three operations the model
needs: `write(layer, k, v, positions, valid)`, `view(layer)` for attention, and `lengths` (valid tokens per
sequence). Writes of padded (invalid) tokens and positions past the end are dropped, never wrapped.
This file knows nothing of the model's math or of kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .config import ModelConfig
from .memory import check_fits


@struct.dataclass
class DenseView:
    """One layer of a dense cache, as attention reads it: k, v `[B, S, K, H]`. A cache's own view also
    carries the whole stacked k, v `[L, B, S, K, H]` and the layer, so a kernel can read the layer in
    place (the sliced k, v reach a kernel as copies; unused, XLA drops them)."""

    k: jax.Array
    v: jax.Array
    stacked: tuple | None = None  # the cache's (k, v) `[L, B, S, K, H]`
    layer: jax.Array | None = None


@struct.dataclass
class PagedView:
    """One layer of a paged cache: pages `[P, page, K, H]` and the block table `[B, max_pages]`."""

    k_pages: jax.Array
    v_pages: jax.Array
    block_table: jax.Array


def dense_slots(positions, valid, max_len):
    """(batch index, position) `[B, T]` scatter indices into a dense cache; invalid tokens point past the
    end (`max_len`), so a `mode="drop"` scatter skips them."""
    B, T = positions.shape
    return jnp.broadcast_to(jnp.arange(B)[:, None], (B, T)), jnp.where(valid, positions, max_len)


class _DenseLayout:
    """Shape properties of a dense cache, whose `k` is `[L, B, S, K, H]` (plain or quantized codes)."""

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


@struct.dataclass
class KVCache(_DenseLayout):
    """Dense cache: k, v `[L, B, S, K, H]`; lengths `[B]` int32 = valid cached tokens per sequence."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    def view(self, layer) -> DenseView:
        return DenseView(self.k[layer], self.v[layer], (self.k, self.v), jnp.asarray(layer, jnp.int32))

    def write(self, layer, k_new, v_new, positions, valid) -> "KVCache":
        """Store k/v `[B, T, K, H]` of one layer at `positions [B, T]` where `valid [B, T]`."""
        b, pos = dense_slots(positions, valid, self.max_len)
        k = self.k.at[layer, b, pos].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[layer, b, pos].set(v_new.astype(self.v.dtype), mode="drop")
        return self.replace(k=k, v=v)


@struct.dataclass
class PagedKVCache:
    """Paged cache: pages `[L, P, page, K, H]`, block_table `[B, max_pages]` of page ids, lengths `[B]`.

    Logical position s of sequence b lives in page `block_table[b, s // page]`, slot `s % page`.
    Unassigned block-table entries hold -1. `PageAllocator` hands out pages on the host.
    """

    k_pages: jax.Array
    v_pages: jax.Array
    block_table: jax.Array
    lengths: jax.Array

    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]

    @property
    def max_len(self) -> int:
        return self.block_table.shape[1] * self.page_size

    def view(self, layer) -> PagedView:
        return PagedView(self.k_pages[layer], self.v_pages[layer], self.block_table)

    def write(self, layer, k_new, v_new, positions, valid) -> "PagedKVCache":
        B, T = positions.shape
        P, page = self.k_pages.shape[1], self.page_size
        slot_page = jnp.take_along_axis(
            self.block_table, jnp.clip(positions // page, 0, self.block_table.shape[1] - 1), axis=1
        )
        ok = valid & (positions < self.max_len) & (slot_page >= 0)
        slot_page = jnp.where(ok, slot_page, P)  # P is out of bounds: dropped
        slot = positions % page
        k = self.k_pages.at[layer, slot_page, slot].set(k_new.astype(self.k_pages.dtype), mode="drop")
        v = self.v_pages.at[layer, slot_page, slot].set(v_new.astype(self.v_pages.dtype), mode="drop")
        return self.replace(k_pages=k, v_pages=v)


KV_QUANT_MAX = {"int8": 127.0, "float8_e4m3fn": 448.0}  # code range of each quantized cache dtype
KV_CACHE_NAMES = {"int8": "int8", "fp8": "float8_e4m3fn"}  # command-line names of the quantized cache dtypes


def is_quantized_kv(dtype) -> bool:
    """Whether a cache of `dtype` is a `QuantKVCache` (int8 / fp8 codes with per-token scales)."""
    return jnp.dtype(dtype).name in KV_QUANT_MAX


@struct.dataclass
class QuantDenseView:
    """One layer of a quantized dense cache: codes k, v `[B, S, K, H]` (int8 or float8_e4m3fn) and their
    per-token, per-head scales `[B, S, K]` (float32): key = k * k_scale[..., None]."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array
    stacked: tuple | None = None  # the cache's (k, v, k_scale, v_scale) `[L, ...]`, for kernels (as DenseView)
    layer: jax.Array | None = None


@struct.dataclass
class QuantKVCache(_DenseLayout):
    """Dense cache with int8 / fp8 (e4m3) keys and values: codes `[L, B, S, K, H]`, scales `[L, B, S, K]`
    (one per token per kv head, absmax / code range), lengths `[B]`. `init_cache` makes one when asked
    for an int8 or float8_e4m3fn cache; attention reads the codes and applies the scales (`QuantDenseView`)."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array
    lengths: jax.Array

    def view(self, layer) -> QuantDenseView:
        return QuantDenseView(self.k[layer], self.v[layer], self.k_scale[layer], self.v_scale[layer],
                              (self.k, self.v, self.k_scale, self.v_scale), jnp.asarray(layer, jnp.int32))

    def write(self, layer, k_new, v_new, positions, valid) -> "QuantKVCache":
        """Quantize k/v `[B, T, K, H]` per token and head, store codes and scales where `valid`."""
        b, pos = dense_slots(positions, valid, self.max_len)
        kc, ks = quantize_kv(k_new, self.k.dtype)
        vc, vs = quantize_kv(v_new, self.v.dtype)
        return self.replace(
            k=self.k.at[layer, b, pos].set(kc, mode="drop"),
            v=self.v.at[layer, b, pos].set(vc, mode="drop"),
            k_scale=self.k_scale.at[layer, b, pos].set(ks, mode="drop"),
            v_scale=self.v_scale.at[layer, b, pos].set(vs, mode="drop"),
        )


def quantize_kv(x, dtype):
    """x `[..., H]` -> (codes `[..., H]` in `dtype`, float32 scales `[...]`): absmax per vector."""
    top = KV_QUANT_MAX[jnp.dtype(dtype).name]
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, amax / top, 1.0)
    q = jnp.clip(xf / scale[..., None], -top, top)
    return (jnp.round(q) if jnp.issubdtype(dtype, jnp.integer) else q).astype(dtype), scale


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, check_memory: bool = True) -> KVCache:
    """An empty dense cache for `batch` sequences of up to `max_len` tokens.

    Refuses early, naming the numbers, when the cache would not fit the device's free memory
    (`check_memory=False` for callers that check per shard themselves). An int8 or float8_e4m3fn `dtype`
    gives a `QuantKVCache` (codes plus a float32 scale per token and kv head).
    """
    if batch < 1 or max_len < 1:
        raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
    if check_memory:
        check_fits(config, batch, max_len, dtype, parts=("kv_cache",))
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    if is_quantized_kv(dtype):
        ones = lambda: jnp.ones(shape[:-1], jnp.float32)
        return QuantKVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), k_scale=ones(), v_scale=ones(),
                            lengths=jnp.zeros((batch,), jnp.int32))
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))


def init_paged_cache(
    config: ModelConfig, batch: int, num_pages: int, page_size: int, max_pages_per_seq: int, dtype=jnp.bfloat16
) -> PagedKVCache:
    """An empty paged cache: a shared pool of `num_pages` pages and a block table with no pages assigned."""
    shape = (config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim)
    return PagedKVCache(
        k_pages=jnp.zeros(shape, dtype),
        v_pages=jnp.zeros(shape, dtype),
        block_table=jnp.full((batch, max_pages_per_seq), -1, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


class PageAllocator:
    """Host-side free list of pages for a `PagedKVCache`: reserve pages for a sequence, free them later.

    Pure with respect to the cache: `reserve` and `free` return a new cache with an updated block table.
    """

    def __init__(self, num_pages: int):
        self.free_pages = list(range(num_pages - 1, -1, -1))

    def reserve(self, cache: PagedKVCache, seq: int, total_tokens: int) -> PagedKVCache:
        """Ensure sequence `seq` owns enough pages to hold `total_tokens` tokens."""
        table = np.asarray(cache.block_table).copy()
        need = -(-total_tokens // cache.page_size)
        if need > table.shape[1]:
            raise ValueError(
                f"sequence {seq} needs {need} pages for {total_tokens} tokens, block table holds {table.shape[1]}"
            )
        have = int((table[seq] >= 0).sum())
        if need - have > len(self.free_pages):
            raise ValueError(f"out of KV pages: need {need - have} more, {len(self.free_pages)} free")
        for i in range(have, need):
            table[seq, i] = self.free_pages.pop()
        return cache.replace(block_table=jnp.asarray(table))

    def free(self, cache: PagedKVCache, seq: int) -> PagedKVCache:
        """Return sequence `seq`'s pages to the pool and reset its length to 0."""
        table = np.asarray(cache.block_table).copy()
        self.free_pages.extend(int(p) for p in table[seq] if p >= 0)
        table[seq] = -1
        return cache.replace(block_table=jnp.asarray(table), lengths=cache.lengths.at[seq].set(0))
