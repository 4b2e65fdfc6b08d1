"""Perplexity of a text: exp of the mean negative log-likelihood of every scored token.

The text is tokenized once (with a BOS only where the tokenizer adds one) and cut into windows of
`window` tokens starting every `stride` tokens; each window is scored on its own, and only the tokens no
earlier window scored count (the first token of the text has no context and is never scored). With
stride == window (the default) the windows do not overlap.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .bundle import Model
from .cache import init_cache
from .config import ModelConfig
from .model import forward
from .quant.qarray import compute_dtype

WINDOWS_PER_BATCH = 4


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    scored_tokens: int
    windows: int


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window, HF-style strided evaluation."""
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        out.append((begin, end, max(begin + 1, prev_end)))
        prev_end = end
        if end == num_tokens:
            break
    return out


@functools.partial(jax.jit, static_argnames=("config", "impl"))
def _token_nll(params, tokens, lengths, *, config: ModelConfig, impl):
    """NLL of tokens[:, t+1] given tokens[:, :t+1], for every t: [B, T-1] float32."""
    cache = init_cache(config, tokens.shape[0], tokens.shape[1], compute_dtype(params))
    logits, _ = forward(params, cache, tokens, lengths, config=config, impl=impl)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def perplexity(model: Model, text: str, window: int = 512, stride: int | None = None, impl: str = "auto",
               progress: bool = False) -> PerplexityResult:
    stride = window if stride is None else stride
    if not text.strip():
        raise ValueError("the text is empty: nothing to score")
    ids = np.asarray(model.encode(text), np.int32)
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    spans = windows(len(ids), window, stride)
    from tqdm.auto import tqdm

    total, count = 0.0, 0
    bar = tqdm(total=len(spans), desc="perplexity", unit="window", disable=not progress)
    for i in range(0, len(spans), WINDOWS_PER_BATCH):
        group = spans[i : i + WINDOWS_PER_BATCH]
        tokens = np.zeros((WINDOWS_PER_BATCH, window), np.int32)
        lengths = np.ones((WINDOWS_PER_BATCH,), np.int32)
        for j, (b, e, _) in enumerate(group):
            tokens[j, : e - b] = ids[b:e]
            lengths[j] = e - b
        nll = np.asarray(_token_nll(model.params, tokens, lengths, config=model.config, impl=impl), np.float64)
        for j, (b, e, first) in enumerate(group):
            # nll[j, t] scores the token at absolute position b + t + 1.
            scored = nll[j, first - b - 1 : e - b - 1]
            total += float(scored.sum())
            count += len(scored)
        bar.update(len(group))
    bar.close()
    mean = total / count
    return PerplexityResult(perplexity=math.exp(mean), mean_nll=mean, scored_tokens=count, windows=len(spans))
