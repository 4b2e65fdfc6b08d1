"""XLA flags the library sets before jax starts a backend, and why (each measured in benchmarks/BENCHMARKS.md).

XLA reads `XLA_FLAGS` once, when the first backend starts, so `apply()` runs when `jaxinfer` is imported and
changes nothing once a backend is up. A flag the user has already set, to any value, is left as it is.

- `--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false`: jax 0.11's XLA adds small tensors across
  GPUs with its own Triton one-shot kernel on a side stream. A tensor-parallel decode step's 64 sums are one
  row each, and NCCL adds them sooner: 2x H200, TP2 batch-1 `llama-3-8b`, 288 against 271 tokens/s (session
  15). Passing it as a jit compiler option does not reach the choice (tried: the kernel stayed).

Only for the jaxlib versions these were tried with: XLA stops the process on a flag it does not know.
`warn_if_missing()` tells a user whose process started its backend before importing `jaxinfer` (the
tensor-parallel layers call it when they run on a GPU).
"""

from __future__ import annotations

import functools
import os
import warnings

FLAGS = {"xla_gpu_unsupported_use_all_reduce_one_shot_kernel": "false"}
TESTED_JAXLIB = ("0.10.", "0.11.")


def apply(environ=os.environ) -> list[str]:
    """Adds each of `FLAGS` the user has not set to `environ["XLA_FLAGS"]`; returns the names added (none
    once a backend has started or on an untried jaxlib)."""
    import jax._src.xla_bridge as xla_bridge

    if xla_bridge.backends_are_initialized():
        return []
    current = environ.get("XLA_FLAGS", "")
    added = missing(environ)
    if added:
        environ["XLA_FLAGS"] = " ".join(filter(None, [current, _settings(added)]))
    return added


def _settings(names) -> str:
    """`--name=value` of each of `names` (keys of `FLAGS`), as XLA_FLAGS spells them."""
    return " ".join(f"--{name}={FLAGS[name]}" for name in names)


def missing(environ=os.environ) -> list[str]:
    """The names of `FLAGS` absent from `environ["XLA_FLAGS"]` (on a tried jaxlib; else none)."""
    import jaxlib

    if not jaxlib.__version__.startswith(TESTED_JAXLIB):
        return []
    current = environ.get("XLA_FLAGS", "") + " "
    return [name for name in FLAGS if f"--{name}=" not in current and f"--{name} " not in current]


@functools.cache
def warn_if_missing() -> None:
    """Once per process: a warning naming the flags that did not reach XLA (jax started before `jaxinfer`
    was imported), with how to set them."""
    names = missing()
    if names:
        flags = _settings(names)
        warnings.warn(f"jaxinfer could not set XLA flags it relies on for speed (jax's backend started before "
                      f"jaxinfer was imported): import jaxinfer first, or start with XLA_FLAGS='{flags}' "
                      f"(jaxinfer/xla_flags.py says why)", stacklevel=2)
