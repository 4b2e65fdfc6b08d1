"""Helpers the kernel tests share: lowering a kernel call for CUDA on a machine without a GPU, listing
the pallas_calls a traced program makes, and the relative error the kernels are judged by."""

from __future__ import annotations

import jax
import numpy as np
import pytest


def rel_err(out, ref) -> float:
    """Relative norm error of `out` against `ref`, in float64."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def cuda_lowering(fn, *args, **kwargs) -> str:
    """The lowered text of `jax.jit(fn)` for CUDA, with its Pallas kernels lowered to Triton. This catches
    Triton lowering errors (tile sizes, dtypes) on the CPU; jaxlib newer than 0.10.2 compiles Triton while
    lowering, which needs a GPU, so the calling test skips there (the native GPU tests compile for real)."""
    try:
        from jax._src.lib import version as jaxlib_version
    except ImportError:  # pragma: no cover
        jaxlib_version = (0, 0, 0)
    if jaxlib_version > (0, 10, 2):
        pytest.skip("newer jaxlib compiles Triton while lowering, which needs a GPU")
    return jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()


def equations(jaxpr):
    """Every equation of a jaxpr, nested ones (scan body, jit) included, in program order."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def pallas_calls(jaxpr) -> list:
    """The pallas_call equations of a jaxpr, nested ones (scan body, jit) included, in program order."""
    return [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "pallas_call"]


def pallas_call_name(eqn) -> str:
    name = eqn.params.get("name_and_src_info") or eqn.params.get("name")
    return str(getattr(name, "name", name))


def pallas_call_names(jaxpr) -> list[str]:
    """Names of the pallas_calls in a jaxpr, nested ones (scan body, jit) included, in program order."""
    return [pallas_call_name(e) for e in pallas_calls(jaxpr)]
