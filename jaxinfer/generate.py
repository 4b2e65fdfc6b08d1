"""Jitted steps and generation loops: `prefill`, `decode_step`, `generate` (on device) and `stream`.

`prefill` and `decode_step` are separately jit-compiled with the cache donated. Prompt lengths are
padded up to a bucket so that new lengths reuse compiled programs; sampling values, lengths and seeds are
traced, so new values never recompile. `generate` runs the whole decode loop on device with
`lax.while_loop`; `stream` runs one jitted step per token and yields as tokens arrive. Both stop per
sequence on EOS / stop ids / max_new_tokens. Overflowing the cache is an error raised before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .attention import check_impl
from .bundle import Model
from .cache import KVCache, init_cache
from .config import ModelConfig
from .model import forward, split_for_loop
from .quant.qarray import compute_dtype
from .sampling import Sampling, sample, sequence_keys
from .sharding import init_cache_on, mesh_of

MIN_BUCKET = 16
NO_TOKEN = -1  # fills the output after a sequence has stopped


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (and >= minimum): the padded size that picks a compiled program."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------------
# Jitted steps


@functools.partial(jax.jit, static_argnames=("config", "impl"), donate_argnames=("cache",))
def _prefill(params, cache, tokens, lengths, *, config, impl):
    return forward(params, cache, tokens, lengths, config=config, impl=impl, last_only=True)


@functools.partial(jax.jit, static_argnames=("config", "impl"), donate_argnames=("cache",))
def _decode(params, cache, tokens, active, *, config, impl):
    logits, cache = forward(params, cache, tokens[:, None], active.astype(jnp.int32), config=config, impl=impl)
    return logits[:, 0], cache


def prefill(params, cache: KVCache, tokens, lengths=None, *, config: ModelConfig, impl: str = "auto"):
    """Run right-padded prompts `tokens [B, T]` (`lengths [B]` valid each) into `cache`.

    Returns float32 logits `[B, V]` at each prompt's last token and the updated cache (the input cache is
    donated). T is padded to a power-of-two bucket so that nearby prompt lengths share one program.
    """
    check_impl(impl)
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"prefill expects tokens of shape [batch, length], got {tokens.shape}")
    B, T = tokens.shape
    lengths = np.full((B,), T, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},), got {lengths.shape}")
    if B != cache.batch:
        raise ValueError(f"prompt batch {B} does not match the cache batch {cache.batch}")
    if (lengths < 1).any() or (lengths > T).any():
        raise ValueError(f"every prompt needs between 1 and {T} tokens, got lengths {lengths.tolist()}")
    needed = _host(cache.lengths) + lengths
    if needed.max() > cache.max_len:
        raise ValueError(
            f"prompt longer than the cache: sequence {int(needed.argmax())} needs {int(needed.max())} "
            f"positions, the cache holds {cache.max_len}"
        )
    padded = np.zeros((B, max(T, min(bucket(T), cache.max_len))), np.int32)
    padded[:, :T] = tokens
    with _on_mesh(params):
        return _prefill(params, cache, padded, lengths, config=config, impl=impl)


def decode_step(params, cache: KVCache, tokens, *, config: ModelConfig, active=None, impl: str = "auto"):
    """Append one token per sequence (`tokens [B]`); rows with `active` False are left untouched.

    Returns float32 logits `[B, V]` and the updated cache (donated). The caller owns the cache budget:
    `generate` and `stream` check it before they start.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    active = jnp.ones(tokens.shape, bool) if active is None else jnp.asarray(active, bool)
    with _on_mesh(params):
        return _decode(params, cache, tokens, active, config=config, impl=impl)


def _on_mesh(params):
    """The mesh of sharded `params` as the context mesh (`jax.set_mesh`), so that kernels run per shard;
    nothing for parameters on one device."""
    mesh = mesh_of(params)
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _host(x) -> np.ndarray:
    """A device array as numpy; in a multi-process run, gathered from every process first."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _next_token(params, cache, tok, done, keys, step, sampling, config, impl):
    """One decode step and one sample; finished rows neither advance the cache nor emit a token."""
    logits, cache = forward(params, cache, tok[:, None], (~done).astype(jnp.int32), config=config, impl=impl)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    nxt = sample(logits[:, 0], step_keys, sampling)
    return jnp.where(done, NO_TOKEN, nxt), cache


def _is_stop(tok, stop_ids, count, max_new):
    return jnp.isin(tok, stop_ids) | (count >= max_new)


@functools.partial(jax.jit, static_argnames=("config", "impl", "capacity"), donate_argnames=("cache",))
def _generate_loop(params, cache, first_logits, keys, sampling, stop_ids, max_new, *, config, impl, capacity):
    """The whole decode loop on device. Output `[B, capacity]` of token ids, NO_TOKEN after a stop."""
    B = first_logits.shape[0]
    params = split_for_loop(params, cache, B, config)  # a large batch: each layer's weights sliced once
    first = sample(first_logits, jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 0), sampling)
    out = jnp.full((B, capacity), NO_TOKEN, jnp.int32).at[:, 0].set(first)
    done = _is_stop(first, stop_ids, 1, max_new)

    def cond(state):
        step, _, done, _, _ = state
        return (step < capacity) & ~jnp.all(done)

    def body(state):
        step, tok, done, out, cache = state
        nxt, cache = _next_token(params, cache, tok, done, keys, step, sampling, config, impl)
        out = out.at[:, step].set(nxt)
        done = done | _is_stop(nxt, stop_ids, step + 1, max_new)
        return step + 1, nxt, done, out, cache

    _, _, _, out, cache = jax.lax.while_loop(cond, body, (jnp.int32(1), first, done, out, cache))
    return out, cache


@functools.partial(jax.jit, static_argnames=("config", "impl"), donate_argnames=("cache",))
def _stream_step(params, cache, tok, done, keys, step, sampling, stop_ids, max_new, *, config, impl):
    nxt, cache = _next_token(params, cache, tok, done, keys, step, sampling, config, impl)
    return nxt, done | _is_stop(nxt, stop_ids, step + 1, max_new), cache


@functools.partial(jax.jit, static_argnames=())
def _first_token(first_logits, keys, sampling, stop_ids, max_new):
    first = sample(first_logits, jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 0), sampling)
    return first, _is_stop(first, stop_ids, 1, max_new)


# ----------------------------------------------------------------------------------------------------
# Request preparation shared by generate and stream


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    token_ids: list[list[int]]  # generated ids per prompt, stop token included
    texts: list[str] | None  # decoded generations (special tokens skipped), None without a tokenizer
    prompt_tokens: list[int]  # prompt length per prompt


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    token_ids: np.ndarray  # [B] the token each sequence produced this step, NO_TOKEN once stopped
    texts: list[str]  # new text per sequence since the previous chunk ("" when none or no tokenizer)


@dataclasses.dataclass(frozen=True)
class _Request:
    tokens: np.ndarray  # [B, T] right-padded
    lengths: np.ndarray  # [B]
    max_new: np.ndarray  # [B]
    stop_ids: np.ndarray  # [n] padded to a multiple of 8 with -2
    max_len: int


def _prepare(model: Model, prompts, max_new_tokens, stop_ids, max_len) -> _Request:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings or token sequences, not a single string")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    rows = [model.encode(p) if isinstance(p, str) else [int(t) for t in np.asarray(p).reshape(-1)] for p in prompts]
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {i} is empty")
        if min(r) < 0 or max(r) >= model.config.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {model.config.vocab_size})")
    B = len(rows)
    max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (B,)).astype(np.int32)
    if (max_new < 1).any():
        raise ValueError(f"max_new_tokens must be >= 1, got {np.asarray(max_new_tokens).tolist()}")
    lengths = np.asarray([len(r) for r in rows], np.int32)
    need = int((lengths + max_new).max())
    if max_len is None:
        max_len = bucket(need, 128)
    if need > max_len:
        i = int((lengths + max_new).argmax())
        raise ValueError(
            f"prompt {i} ({lengths[i]} tokens) + max_new_tokens ({max_new[i]}) = {need} exceeds the cache "
            f"length max_len={max_len}"
        )
    tokens = np.zeros((B, int(lengths.max())), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    stops = sorted(set(model.eos_ids) | set(stop_ids or ()))
    padded_stops = np.full((max(8, -(-len(stops) // 8) * 8),), -2, np.int32)
    padded_stops[: len(stops)] = stops
    return _Request(tokens, lengths, max_new, padded_stops, int(max_len))


def _start(model: Model, req: _Request, impl: str, cache_dtype):
    dtype = cache_dtype or compute_dtype(model.params)  # a quantized tree's leaves are codes and scales
    cache = init_cache_on(mesh_of(model.params), model.config, len(req.lengths), req.max_len, dtype)
    return prefill(model.params, cache, req.tokens, req.lengths, config=model.config, impl=impl)


def generate(
    model: Model,
    prompts: Sequence[str] | Sequence[Sequence[int]] | np.ndarray,
    max_new_tokens: int | Sequence[int] = 64,
    sampling: Sampling | None = None,
    seed: int | Sequence[int] = 0,
    stop_ids: Sequence[int] | None = None,
    max_len: int | None = None,
    impl: str = "auto",
    cache_dtype=None,
) -> GenerateResult:
    """Generate for a batch of prompts with the whole decode loop on device; returns ids and texts."""
    check_impl(impl)
    req = _prepare(model, prompts, max_new_tokens, stop_ids, max_len)
    sampling = (sampling or Sampling()).for_batch(len(req.lengths))
    logits, cache = _start(model, req, impl, cache_dtype)
    return _result(model, req, _decode_all(model, req, cache, logits, seed, sampling, impl))


def _decode_all(model: Model, req: _Request, cache, logits, seed, sampling: Sampling, impl: str) -> np.ndarray:
    """The on-device decode loop from the prefill's logits to every sequence's tokens, on the host."""
    with _on_mesh(model.params):
        out, _ = _generate_loop(
            model.params, cache, logits, sequence_keys(seed, len(req.lengths)), sampling, jnp.asarray(req.stop_ids),
            jnp.asarray(req.max_new), config=model.config, impl=impl, capacity=bucket(int(req.max_new.max())),
        )
    return _host(out)


def _result(model: Model, req: _Request, out: np.ndarray) -> GenerateResult:
    """Token ids (padding dropped) and their texts."""
    ids = [[int(t) for t in row if t != NO_TOKEN] for row in out]
    texts = [model.decode(r) for r in ids] if model.tokenizer is not None else None
    return GenerateResult(token_ids=ids, texts=texts, prompt_tokens=req.lengths.tolist())


def stream(
    model: Model,
    prompts,
    max_new_tokens: int | Sequence[int] = 64,
    sampling: Sampling | None = None,
    seed: int | Sequence[int] = 0,
    stop_ids: Sequence[int] | None = None,
    max_len: int | None = None,
    impl: str = "auto",
    cache_dtype=None,
) -> Iterator[StreamChunk]:
    """Like `generate`, but yields a `StreamChunk` per decode step as tokens arrive."""
    check_impl(impl)
    req = _prepare(model, prompts, max_new_tokens, stop_ids, max_len)
    B = len(req.lengths)
    sampling = (sampling or Sampling()).for_batch(B)
    keys = sequence_keys(seed, B)
    stops, max_new = jnp.asarray(req.stop_ids), jnp.asarray(req.max_new)
    logits, cache = _start(model, req, impl, cache_dtype)
    tok, done = _first_token(logits, keys, sampling, stops, max_new)
    detok = _IncrementalDecoder(model, B)
    step = 1
    while True:
        host_tok = _host(tok)
        yield StreamChunk(token_ids=host_tok, texts=detok.push(host_tok))
        if bool(_host(done).all()):
            return
        with _on_mesh(model.params):
            tok, done, cache = _stream_step(
                model.params, cache, tok, done, keys, jnp.int32(step), sampling, stops, max_new,
                config=model.config, impl=impl,
            )
        step += 1


class _IncrementalDecoder:
    """Turns token ids into text deltas, holding back incomplete UTF-8 (a trailing U+FFFD)."""

    def __init__(self, model: Model, batch: int):
        self.model = model
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.emitted = [""] * batch

    def push(self, tokens: np.ndarray) -> list[str]:
        if self.model.tokenizer is None:
            return [""] * len(self.ids)
        deltas = []
        for i, t in enumerate(tokens):
            if t != NO_TOKEN:
                self.ids[i].append(int(t))
            text = self.model.decode(self.ids[i])
            if text.endswith("\ufffd") or not text.startswith(self.emitted[i]):
                deltas.append("")
                continue
            deltas.append(text[len(self.emitted[i]) :])
            self.emitted[i] = text
        return deltas
