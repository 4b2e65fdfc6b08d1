"""Probe: a decode step's small all-reduce as a Mosaic GPU kernel writing into the peers' memory.

Why: on 2x H200 each of a tensor-parallel batch-1 step's 64 `psum`s of a [1, 4096] float32 partial costs
~15 us of wall time (NCCL's launch and protocol), ~1 ms of a 3.7 ms step (BENCHMARKS.md, S12-12). The same
sum done by the devices themselves needs one NVLink round trip to agree that both are in the kernel and one
to hand over the data. This script checks that jax's Mosaic GPU remote references and semaphores work on
the runner, that the kernel's sum equals `psum`'s bit for bit, and times both in a chain of dependent sums.

    PYTHONPATH=. python3 benchmarks/allreduce_probe.py --out $OUT/allreduce

Prints one JSON line last. Not used by the library (a probe; NOTES.md records the outcome).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

AXIS = "tensor"


def pallas_all_reduce(x, *, n: int):
    """Sum of x [R, 128] float32 over the `tensor` axis (inside shard_map): each device writes its x into
    slot `me` of every device's `gathered` output, then adds the n slots in order 0..n-1 (the same order
    everywhere, so every device holds the same bits)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def kernel(x_ref, gathered_ref, o_ref, ready_sem, recv_sem):
        me = lax.axis_index(AXIS)
        peers = [lax.rem(me + d, n) for d in range(1, n)]
        for peer in peers:  # the peers are in this call: their previous call has read its slots
            pl.semaphore_signal(ready_sem, device_id={AXIS: peer})
        pl.semaphore_wait(ready_sem, n - 1)
        mine = x_ref[...]
        gathered_ref.at[me][...] = mine
        for peer in peers:
            plgpu.remote_ref(gathered_ref, {AXIS: peer}).at[me][...] = mine
            pl.semaphore_signal(recv_sem, device_id={AXIS: peer})
        pl.semaphore_wait(recv_sem, n - 1)
        total = gathered_ref[0]
        for j in range(1, n):
            total = total + gathered_ref[j]
        o_ref[...] = total

    _, out = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((n, *x.shape), x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype)),
        scratch_types=[plgpu.SemaphoreType.REGULAR, plgpu.SemaphoreType.REGULAR],
        compiler_params=plgpu.CompilerParams(),
    )(x)
    return out


def chain(reduce, x, calls: int):
    """`calls` dependent sums, unrolled (a loop's trip costs a host round trip of its own): each input is
    the previous sum scaled, so nothing can be hoisted."""
    for _ in range(calls):
        x = reduce(x) * (1.0 / jax.lax.axis_size(AXIS))
    return x


def seconds(fn, x, reps=20):
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="allreduce_probe")
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--rows", type=int, default=32, help="rows of 128 float32 (32: one 4096-wide token)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__}
    try:
        import jax.experimental.mosaic.gpu.core as mcore
        report["single_process_multi_device"] = bool(mcore.is_single_process_multi_device_topology())
        report["nvshmem_available"] = bool(mcore.is_nvshmem_available())
    except Exception as e:  # noqa: BLE001
        report["topology_check"] = repr(e)
    n = jax.device_count()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), (AXIS,))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n * args.rows, 128)), jnp.float32)

    def region(f):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False))

    psum = functools.partial(lax.psum, axis_name=AXIS)
    kernel = functools.partial(pallas_all_reduce, n=n)
    try:
        want = region(psum)(x)
        got = region(kernel)(x)
        report["max_abs_diff_vs_psum"] = float(jnp.max(jnp.abs(got - want)))
        report["bitwise_equal"] = bool(jnp.all(got == want))
        for label, f in (("none", lambda y: y + 1.0), ("psum", psum), ("pallas", kernel)):
            t = seconds(region(lambda y, f=f: chain(f, y, args.calls)), x)
            report[f"{label}_us_per_sum"] = round(t / args.calls * 1e6, 2)
    except Exception as e:  # noqa: BLE001
        report["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        report["traceback"] = traceback.format_exc()[-4000:]
    (out / "allreduce_probe.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "traceback"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
