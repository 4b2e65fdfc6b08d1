"""The XLA flags jaxinfer sets at import: added when absent, a user's own setting kept, known to this XLA, and
one warning where they could not be set."""

import os
import subprocess
import sys

import jax._src.xla_bridge as xla_bridge

from jaxinfer import xla_flags

NAME = "xla_gpu_unsupported_use_all_reduce_one_shot_kernel"


def test_apply_adds_missing_flags_and_keeps_the_users(monkeypatch):
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert xla_flags.apply(env) == [NAME]
    assert env["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x --{NAME}=false"
    assert xla_flags.apply(env) == [] and env["XLA_FLAGS"].count(NAME) == 1  # idempotent
    mine = {"XLA_FLAGS": f"--{NAME}=true"}
    assert xla_flags.apply(mine) == [] and mine["XLA_FLAGS"] == f"--{NAME}=true"
    empty = {}
    xla_flags.apply(empty)
    assert empty["XLA_FLAGS"] == f"--{NAME}=false"


def test_apply_does_nothing_once_a_backend_runs(monkeypatch):
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    env = {}
    assert xla_flags.apply(env) == [] and env == {}


def test_importing_jaxinfer_sets_the_flag_and_xla_accepts_it():
    """In a fresh process: the flag is in XLA_FLAGS after `import jaxinfer` and a computation runs (XLA
    stops the process on a flag it does not know)."""
    code = "import os, jaxinfer, jax.numpy as jnp; print(os.environ['XLA_FLAGS']); print(float(jnp.ones(3).sum()))"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    flags, total = out.stdout.split("\n")[:2]
    assert f"--{NAME}=false" in flags and float(total) == 3.0


def test_a_missing_flag_is_named_in_one_warning(monkeypatch):
    """A process whose backend started before `import jaxinfer` keeps XLA's default: the tensor-parallel
    layers warn once, naming the flag and how to set it; with the flag set, nothing is said."""
    import warnings

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    xla_flags.warn_if_missing.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xla_flags.warn_if_missing()
        xla_flags.warn_if_missing()
    assert len(caught) == 1 and f"XLA_FLAGS='--{NAME}=false'" in str(caught[0].message)
    monkeypatch.setenv("XLA_FLAGS", f"--{NAME}=true")
    xla_flags.warn_if_missing.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xla_flags.warn_if_missing()
    assert caught == []
    xla_flags.warn_if_missing.cache_clear()
