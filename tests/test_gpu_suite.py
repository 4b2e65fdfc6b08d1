"""The GPU runner's test stage (benchmarks/gpu_suite.py) as a dry run on the CPU: it must find the files
with GPU-marked tests, run them in child processes and add up what pytest reported."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_suite  # noqa: E402


def test_gpu_test_stage_collects_runs_and_counts(tmp_path):
    files = ("tests/test_gpu_dispatch.py", "tests/test_bench.py", "tests/test_memory.py")
    r = gpu_suite.run_gpu_tests(tmp_path, 300, files, jobs=2, platform="cpu")
    # test_memory has no GPU test; the other two have some, which the CPU skips (conftest): as many as
    # pytest collects with the gpu mark
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", *files],
                               cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    gpu_tests = sum("::" in line for line in collected.splitlines())
    assert gpu_tests >= 2
    assert r["files"] == 2, r
    assert r["exit_code"] == 0, r
    assert r["counts"].get("skipped") == gpu_tests and "failed" not in r["counts"], (r, gpu_tests)
    log = (tmp_path / "pytest.log").read_text()
    assert log.index("test_gpu_dispatch.py (exit 0)") < log.index("test_bench.py (exit 0)")  # serial file last
