"""Calibration: how strongly each input channel of each weight matrix is driven, measured on real text.

`activation_stats(model, text)` runs the model over the text with every matrix wrapped in an `Observed`
leaf; `ops.matmul` sees the wrapper, hands the mean square of its input per contracted channel to the
host (`jax.debug.callback`), and multiplies by the plain weight. The result is a tree shaped like the
quantizable part of the parameters, each entry the per-input-channel mean of x^2 (`[L, D]` for `q`,
`[L, N, H]` for `o`, ...): llama.cpp's "importance matrix". `quantize(params, recipe, importance=...)`
weighs the int4 error by it, so the channels the model actually uses are quantized most carefully.
Knows nothing of kernels; the model runs unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ..bundle import Model
from ..cache import init_cache
from .recipe import LAYER_MATRICES


@struct.dataclass
class Observed:
    """A weight whose matmul inputs are recorded. `ids` is the layer number (sliced per layer by scan)."""

    w: jax.Array
    ids: jax.Array
    name: str = struct.field(pytree_node=False, default="")
    sink: "Sink | None" = struct.field(pytree_node=False, default=None)


class Sink:
    """Host-side sums of x^2 per (matrix, layer). Hashed by identity, so it can ride as static data."""

    def __init__(self):
        self.sums: dict[tuple[str, int], list] = {}

    def __call__(self, name, layer, stat, rows):
        key = (name, int(layer))
        stat = np.asarray(stat, np.float64)
        total = self.sums.get(key)
        self.sums[key] = [stat, float(rows)] if total is None else [total[0] + stat, total[1] + float(rows)]


def record(observed: Observed, eq: str, x) -> None:
    """Send sum over rows of x^2 per contracted channel (in the weight's axis order) to the host."""
    lhs, out = eq.replace(" ", "").split("->")
    xs, ws = lhs.split(",")
    contracted = "".join(c for c in ws if c not in out)
    xf = x.astype(jnp.float32)
    stat = jnp.einsum(f"{xs},{xs}->{contracted}", xf, xf)
    rows = np.prod([d for c, d in zip(xs, x.shape) if c not in contracted])
    if observed.sink is not None:
        jax.debug.callback(functools.partial(observed.sink, observed.name), observed.ids, stat, rows)


def _wrap(params, config, sink):
    L = config.num_layers
    layers = dict(params["layers"])
    for name in LAYER_MATRICES:
        layers[name] = Observed(layers[name], jnp.arange(L, dtype=jnp.int32), name=f"layers/{name}", sink=sink)
    out = {**params, "layers": layers}
    head = "embed" if config.tie_embeddings else "lm_head"
    out[head] = Observed(params[head], jnp.int32(-1), name=head, sink=sink)
    return out


def activation_stats(model: Model, text: str | np.ndarray, window: int = 256, batch: int = 4) -> dict:
    """Per-input-channel mean of x^2 for every layer matrix and the head, over `text` in `window`-token
    pieces (the last partial piece is dropped unless it is the only one). Returns a nested dict of
    numpy float32 arrays: {"layers": {"q": [L, D], ...}, "lm_head" or "embed": [D]}."""
    from ..model import forward

    ids = np.asarray(model.encode(text) if isinstance(text, str) else text, np.int32).reshape(-1)
    n = max(1, len(ids) // window)
    T = min(window, len(ids))
    pieces = ids[: n * T].reshape(n, T)
    sink = Sink()
    wrapped = _wrap(model.params, model.config, sink)
    dtype = model.params["final_norm"].dtype

    @functools.partial(jax.jit, static_argnames=("config",))
    def run(params, tokens, *, config):
        cache = init_cache(config, tokens.shape[0], tokens.shape[1], dtype)
        return forward(params, cache, tokens, config=config, impl="xla")[0].sum()

    for i in range(0, n, batch):
        jax.block_until_ready(run(wrapped, jnp.asarray(pieces[i : i + batch]), config=model.config))
    jax.effects_barrier()
    sums = sink.sums
    out: dict = {"layers": {}}
    for name in LAYER_MATRICES:
        per_layer = [sums[(f"layers/{name}", l)] for l in range(model.config.num_layers)]
        out["layers"][name] = np.stack([s / r for s, r in per_layer]).astype(np.float32)
    head = "embed" if model.config.tie_embeddings else "lm_head"
    s, r = sums[(head, -1)]
    out[head] = (s / r).astype(np.float32)
    return out
