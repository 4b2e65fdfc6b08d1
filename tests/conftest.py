"""Shared fixtures: tiny random Hugging Face checkpoints of every supported family, saved to disk."""

import jax
import pytest

jax.config.update("jax_enable_x64", False)


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU (run benchmarks/gpu_suite.py on a GPU runner)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
