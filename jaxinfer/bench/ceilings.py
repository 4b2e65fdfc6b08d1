"""Ceilings of the current device, measured in this process, and the one table of datasheet figures.

MBU and MFU are ratios against what this card does right now: a large device-to-device copy (bytes read
plus bytes written; the best of XLA's copy, an XLA elementwise pass, and torch's copy where torch sees a
GPU) and a large bf16 matrix product through XLA. Datasheet numbers are kept only for context, in
`DATASHEET`; nothing divides by them. Knows nothing of models.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .measure import time_calls

# Vendor figures (SXM parts), for context in reports only: HBM TB/s and dense bf16 TFLOP/s.
DATASHEET = {
    "H200": {"hbm_tb_s": 4.8, "bf16_tflop_s": 989.0},
    "H100": {"hbm_tb_s": 3.35, "bf16_tflop_s": 989.0},
    "A100": {"hbm_tb_s": 2.04, "bf16_tflop_s": 312.0},
}


def datasheet_for(device_kind: str) -> dict | None:
    for name, figures in DATASHEET.items():
        if name.lower() in device_kind.lower():
            return {"part": name, **figures}
    return None


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Measured rates of one device. Bandwidths in bytes/s (read + written), compute in FLOP/s."""

    device: str
    platform: str
    copy_bytes_per_s: float  # the best copy: what MBU divides by
    copy_method: str
    copy_by_method: dict  # method -> bytes/s
    read_bytes_per_s: float  # a read-only reduction, for reference
    matmul_flops_per_s: float  # what MFU divides by
    matmul_n: int
    matmul_dtype: str
    datasheet: dict | None

    @property
    def ridge_intensity(self) -> float:
        """FLOP per byte where the compute roof meets the bandwidth roof."""
        return self.matmul_flops_per_s / self.copy_bytes_per_s

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ridge_intensity"] = self.ridge_intensity
        return d


def measure_ceilings(copy_bytes: int | None = None, matmul_n: int | None = None, dtype=jnp.bfloat16,
                     samples: int = 5, use_torch: bool = True) -> Ceilings:
    """Calibrate copy bandwidth and matmul rate on the default device (about a second on a GPU).

    Defaults: a 1 GiB copy and an 8192^3 product on a GPU (far past L2 and launch overhead), 8 MiB and
    128^3 elsewhere so the CPU test suite stays fast. Inputs are random, never zeros.
    """
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    copy_bytes = copy_bytes or (1 << 30 if on_gpu else 8 << 20)
    matmul_n = matmul_n or (8192 if on_gpu else 128)

    key = jax.random.key(1234, impl="rbg")  # cheap to compile, unlike threefry
    src = jax.random.bits(key, (copy_bytes // 4,), jnp.uint32)
    nbytes = src.size * 4
    rates = {
        "xla_copy": 2 * nbytes / _time(jax.jit(jnp.copy), src, samples),
        "xla_elementwise": 2 * nbytes / _time(jax.jit(lambda x: x ^ jnp.uint32(0x5A5A5A5A)), src, samples),
    }
    if use_torch and on_gpu:
        torch_rate = _torch_copy_rate(nbytes, samples)
        if torch_rate:
            rates["torch_copy"] = torch_rate
    read = nbytes / _time(jax.jit(lambda x: jnp.sum(x, dtype=jnp.uint32)), src, samples)
    del src

    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (matmul_n, matmul_n), dtype)
    b = jax.random.normal(kb, (matmul_n, matmul_n), dtype)
    mm = 2.0 * matmul_n**3 / _time(jax.jit(jnp.matmul), (a, b), samples)
    del a, b

    method = max(rates, key=rates.get)
    return Ceilings(
        device=dev.device_kind, platform=dev.platform, copy_bytes_per_s=rates[method], copy_method=method,
        copy_by_method=rates, read_bytes_per_s=read, matmul_flops_per_s=mm, matmul_n=matmul_n,
        matmul_dtype=str(np.dtype(dtype)), datasheet=datasheet_for(dev.device_kind),
    )


def _time(fn, args, samples: int) -> float:
    args = args if isinstance(args, tuple) else (args,)
    return time_calls(lambda: fn(*args), calls=10, samples=samples, warmup=2).median


def _torch_copy_rate(nbytes: int, samples: int) -> float | None:
    """torch's device-to-device copy (cudaMemcpy), timed with CUDA events; None where torch has no GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 10)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / float(np.median(times))
