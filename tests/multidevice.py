"""Run a test file again in a subprocess with 8 simulated CPU devices.

The main pytest process keeps the default single CPU device (the rest of the suite assumes it), so the
multi-device tests skip themselves there and one driver test re-runs their file under
`--xla_force_host_platform_device_count=8`, where they run for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

DEVICES = 8
REPO = Path(__file__).resolve().parent.parent

# The float32 comparisons assume CPU numerics: a host with 8 GPUs still runs these in the CPU subprocess.
READY = jax.default_backend() == "cpu" and jax.device_count() >= DEVICES
needs_devices = pytest.mark.skipif(not READY, reason=f"needs {DEVICES} CPU devices: runs in the {DEVICES}-device subprocess")


def rerun_with_devices(test_file: str, timeout: int = 600) -> None:
    """Run `test_file` under pytest with 8 CPU devices; fail with its output when any test fails."""
    if READY:
        pytest.skip(f"already running with {jax.device_count()} CPU devices")
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    # Cheaper CPU compiles (the tests compile many small programs; both sides of a comparison share them).
    fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES} {fast}".strip()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(test_file)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{DEVICES}-device run of {Path(test_file).name} failed:\n{out[-8000:]}"
    assert " passed" in out, out[-2000:]
