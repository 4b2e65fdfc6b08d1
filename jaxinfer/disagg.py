"""Disaggregated prefill and decode: prompts run on one sub-mesh, the KV cache moves, decoding runs on
another.

Prefill is compute-bound and decode memory-bound, so they can want different devices and layouts (e.g.
prefill with tensor=4 on four GPUs, decode with data=2 x tensor=2 on four others). `disaggregate(model,
prefill_mesh, decode_mesh)` places the weights on both; `generate` prefills on the first, moves the cache
and the first logits with `jax.device_put` to the second mesh's shardings (XLA picks the transfer:
peer-to-peer on GPUs of one host), and runs the on-device decode loop there. It returns the tokens with
the time and bytes of each phase; `transfer_cost` measures the move alone. One process (the two meshes
are devices of the same program); the cache is moved whole (its allocated length), not only the
positions in use. Knows nothing of kernels or checkpoints.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from . import sharding as sh
from .generate import GenerateResult, _decode_all, _prepare, _result, _start
from .bundle import Model
from .sampling import Sampling


@dataclasses.dataclass(frozen=True)
class Disaggregated:
    """A model placed on two meshes: `prefill` (weights on `prefill_mesh`) and `decode`."""

    prefill: Model
    decode: Model
    prefill_mesh: Mesh
    decode_mesh: Mesh
    rules: sh.ShardingRules | None = None


@dataclasses.dataclass(frozen=True)
class PhaseTimes:
    """Wall-clock seconds of each phase (each waited for) and the bytes the cache move carried."""

    prefill_s: float
    transfer_s: float
    decode_s: float
    transfer_bytes: int

    @property
    def transfer_gbps(self) -> float:
        return self.transfer_bytes / max(self.transfer_s, 1e-12) / 1e9


def split_devices(prefill: int, decode: int, devices: Sequence | None = None) -> tuple[list, list]:
    """The first `prefill` devices and the next `decode` ones (all of them must exist)."""
    devices = list(jax.devices() if devices is None else devices)
    if prefill < 1 or decode < 1 or prefill + decode > len(devices):
        raise ValueError(f"cannot split {len(devices)} device(s) into {prefill} for prefill and {decode} for decode")
    return devices[:prefill], devices[prefill : prefill + decode]


def disaggregate(model: Model, prefill_mesh: Mesh, decode_mesh: Mesh, rules=None) -> Disaggregated:
    """Place `model`'s weights on both meshes (each by the rules, checked against each mesh)."""
    overlap = set(prefill_mesh.devices.flat) & set(decode_mesh.devices.flat)
    if overlap:
        raise ValueError(f"the prefill and decode meshes share {len(overlap)} device(s); give them disjoint devices")
    place = lambda mesh: model.replace(params=sh.shard_params(model.params, model.config, mesh, rules))
    return Disaggregated(place(prefill_mesh), place(decode_mesh), prefill_mesh, decode_mesh, rules)


def transfer(cache, config, mesh: Mesh, rules=None):
    """The cache on `mesh`, sharded by the rules (a `jax.device_put`; the source is left intact)."""
    return sh.shard_cache(cache, config, mesh, rules)


def cache_bytes(cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def transfer_cost(cache, config, mesh: Mesh, rules=None, repeats: int = 5) -> dict:
    """Time moving `cache` to `mesh` (first call, then the median of `repeats`): seconds, bytes, GB/s."""
    nbytes = cache_bytes(cache)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        moved = jax.block_until_ready(transfer(cache, config, mesh, rules))
        times.append(time.perf_counter() - start)
        del moved
    median = float(np.median(times[1:])) if repeats else times[0]
    return {"bytes": nbytes, "first_s": times[0], "median_s": median, "gbps": nbytes / max(median, 1e-12) / 1e9}


def generate(
    dm: Disaggregated,
    prompts,
    max_new_tokens: int | Sequence[int] = 64,
    sampling: Sampling | None = None,
    seed: int | Sequence[int] = 0,
    stop_ids: Sequence[int] | None = None,
    max_len: int | None = None,
    impl: str = "auto",
    cache_dtype=None,
) -> tuple[GenerateResult, PhaseTimes]:
    """`jaxinfer.generate` with prefill on `dm.prefill_mesh` and decoding on `dm.decode_mesh`."""
    req = _prepare(dm.prefill, prompts, max_new_tokens, stop_ids, max_len)
    B = len(req.lengths)
    sampling = (sampling or Sampling()).for_batch(B)

    start = time.perf_counter()
    logits, cache = jax.block_until_ready(_start(dm.prefill, req, impl, cache_dtype))
    prefilled = time.perf_counter()

    cache = transfer(cache, dm.decode.config, dm.decode_mesh, _batch_rules(dm, B))
    logits = jax.device_put(logits, sh.batch_sharding(dm.decode_mesh, _batch_rules(dm, B), ndim=2))
    cache, logits = jax.block_until_ready((cache, logits))
    moved = time.perf_counter()

    out = _decode_all(dm.decode, req, cache, logits, seed, sampling, impl)
    done = time.perf_counter()
    return _result(dm.decode, req, out), PhaseTimes(prefilled - start, moved - prefilled, done - moved, cache_bytes(cache))


def _batch_rules(dm: Disaggregated, batch: int):
    """The rules on the decode mesh, with the batch kept whole when its data degree does not divide it."""
    rules = sh._rules(dm.rules)
    n = int(np.prod([dm.decode_mesh.shape[m] for m in rules.mesh_axes("batch")]))
    return dataclasses.replace(rules, batch=None) if batch % n else rules
