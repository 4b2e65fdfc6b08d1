"""Wall-clock timing of device work: warm-up, device synchronisation, several calls per sample, medians.

JAX dispatches asynchronously, so a sample enqueues `calls` calls back to back and then blocks on the
last output: dispatch overlaps device work as it does in a real loop, and the host clock brackets only
finished work. Knows nothing of models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import statistics
import time
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: the median over samples, and every sample (each the mean of `calls` calls)."""

    median: float
    samples: tuple[float, ...]
    calls: int

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the samples are; a difference below it is noise."""
        return (max(self.samples) - min(self.samples)) / self.median

    def as_dict(self) -> dict:
        return {"median_s": self.median, "samples_s": list(self.samples), "calls": self.calls,
                "spread": self.spread}


def time_calls(call: Callable[[], Any], *, calls: int = 5, samples: int = 5, warmup: int = 2,
               before_sample: Callable[[], None] | None = None) -> Timing:
    """Time `call()` (which may thread state through a closure); returns seconds per call.

    `warmup` calls run first (compilation, autotuning, allocation). `before_sample` runs untimed before
    each sample, after the device is idle, e.g. to rewind a cache.
    """
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(samples):
        if before_sample is not None:
            before_sample()
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return Timing(median=statistics.median(times), samples=tuple(times), calls=calls)


@contextlib.contextmanager
def switched(module, values: dict):
    """`module`'s attributes set to `values` for the block and restored after: the switches a function
    reads when it is traced (paths, block sizes), compared within one process. Compiled programs are
    dropped on entry and exit, so each state traces its own."""
    saved = {k: getattr(module, k) for k in values}
    jax.clear_caches()
    try:
        for k, v in values.items():
            setattr(module, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)
        jax.clear_caches()


@contextlib.contextmanager
def switched_modules(switches: dict):
    """`switched` for several modules at once: {module or dotted module path: {name: value}}."""
    with contextlib.ExitStack() as stack:
        for module, values in switches.items():
            module = importlib.import_module(module) if isinstance(module, str) else module
            stack.enter_context(switched(module, values))
        yield
