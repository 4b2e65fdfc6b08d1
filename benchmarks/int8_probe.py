"""Probe: per-channel int8 products on the s8 tensor cores, codes read by wgmma from shared memory
(`pallas_kernels/int8_matmul.py`), against the library's int8 paths on `llama-3-8b`'s products.

Question (session 28): the one-row int8 products stay at 0.58-0.81 of the copy bandwidth on the CUDA cores
(`row_matmul`), and batch 16 on the Triton weight kernel at 1.34-1.38x bf16 a step. With the codes never in
registers, does TMA + wgmma stream them at the copy rate? Each product chained through its output over 8
stacked layers (`weight_kernel.chain_seconds`); `kernel` is the product kernel's own device time a call,
`device` every launch of the call (x's digits and the XLA glue included).

    PYTHONPATH=. python benchmarks/int8_probe.py --out DIR [--rows 1 16] [--check-only]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.weight_kernel import LAYERS, chain_seconds  # noqa: E402
from pallas_kernels import fragment_matmul as fm  # noqa: E402
from pallas_kernels import int8_matmul as im  # noqa: E402
from pallas_kernels import row_matmul as rm  # noqa: E402
from pallas_kernels import weight_matmul as wm  # noqa: E402
from pallas_kernels.x_digits import x_digits_reference  # noqa: E402

SHAPES = {"gateup": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144), "o": (4096, 4096)}
CONFIGS = {  # name: (block_rows, step, stages, target CTAs)
    "r64s256x4": (64, 256, 4, 264), "r64s256x2": (64, 256, 2, 264), "r64s256x3": (64, 256, 3, 264),
    "r64s256x6": (64, 256, 6, 264), "r128s256x4": (128, 256, 4, 264), "r64s512x3": (64, 512, 3, 264),
    "r64s256x4t528": (64, 256, 4, 528),
}


def _data(K, N, layers, key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    values = jax.random.randint(k1, (layers, N, K), -127, 128, jnp.int32).astype(jnp.int8)
    scales = (0.002 + 0.002 * jax.random.uniform(k2, (layers, N, 1))).astype(jnp.float32)
    return values, scales


def check(log) -> bool:
    ok = True
    L, K, N = 3, 2048, 384
    values, scales = _data(K, N, L)
    w = np.asarray(values, np.float64) * np.asarray(scales, np.float64)
    for (name, cfg), m in itertools.product(CONFIGS.items(), (1, 5, 16, 64)):
        rows_, step, stages, target = cfg
        x = jax.random.normal(jax.random.key(m), (m, K), jnp.float32).astype(jnp.bfloat16)
        try:
            got = np.asarray(im.int8_matmul(x, values, scales, jnp.int32(2), out_dtype=jnp.float32, block_rows=rows_,
                                            step=step, stages=stages, target=target), np.float64)
        except Exception as e:  # noqa: BLE001 (a config over the shared memory: recorded, not fatal)
            print(f"check {name} rows={m}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            log.append(dict(config=name, rows=m, error=str(e)[:400]))
            continue
        mp = fm.padded_rows(m)
        d, inv_q, _ = (np.asarray(a, np.float64) for a in x_digits_reference(x, rows=mp, group_size=128))
        x_fixed = (d[:m] * 256 + d[mp:mp + m]) * inv_q[:m, None]
        errs = []
        for xs in (x_fixed, np.asarray(x, np.float64)):
            want = xs @ w[2].T
            errs.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
        good = errs[0] < 1e-5 and errs[1] < 1e-4
        ok &= good
        print(f"check {name} rows={m}: vs fixed point {errs[0]:.2e}, vs x {errs[1]:.2e} {'ok' if good else 'BAD'}",
              flush=True)
        log.append(dict(config=name, rows=m, err_fixed=errs[0], err_x=errs[1]))
    return ok


def _paths(m):
    paths = {}
    if m == 1:
        paths["row_kernel"] = lambda x, w, i: rm.row_matmuls(x, ((w[0], w[1], None),), jnp.int32(i), fmt="int8")[0]
    paths["weight_kernel"] = lambda x, w, i: wm.weight_matmul(x, w[0], w[1], None, i, fmt="int8", group_size=None,
                                                              transposed=True)
    for name, (rows_, step, stages, target) in CONFIGS.items():
        paths[name] = (lambda x, w, i, c=(rows_, step, stages, target): im.int8_matmul(
            x, w[0], w[1], jnp.int32(i), block_rows=c[0], step=c[1], stages=c[2], target=c[3]))
    return paths


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--check-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "checks": [], "rows": []}
    ok = check(log["checks"])
    print("checks", "passed" if ok else "FAILED", flush=True)
    table = []
    if not args.check_only:
        for name, m in itertools.product(args.shapes, args.rows):
            K, N = SHAPES[name]
            w = _data(K, N, LAYERS)
            x = jax.random.normal(jax.random.key(3), (m, K), jnp.bfloat16)
            gb = N * K / 1e9
            for tag, fn in _paths(m).items():
                ops = []
                try:
                    wall, dev = chain_seconds(fn, x, w, ops=ops)
                except Exception as e:  # noqa: BLE001
                    print(f"{name:7s} rows {m:3d} {tag:14s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                kern = sum(o["us_per_call"] for o in ops
                           if any(k.startswith(("int8_matmul", "row_matmul", "weight_matmul")) for k in o["kernels"]))
                kern /= 32
                row = dict(shape=name, rows=m, path=tag, wall_us=wall * 1e6, device_us=(dev or 0) * 1e6,
                           kernel_us=kern, kernel_tb_s=gb / kern * 1e3 if kern else None, ops=ops)
                log["rows"].append(row)
                table.append(row)
                print(f"{name:7s} rows {m:3d} {tag:14s} wall {wall * 1e6:7.1f} us  device {row['device_us']:7.1f}  "
                      f"kernel {kern:6.1f} ({row['kernel_tb_s'] or 0:.2f} TB/s)", flush=True)
                (out / "int8_probe.json").write_text(json.dumps(log, indent=1, default=str))
    (out / "int8_probe.json").write_text(json.dumps(log, indent=1, default=str))
    print("\n| shape | rows | path | kernel us | TB/s | device us |\n| --- | ---: | --- | ---: | ---: | ---: |")
    for r in table:
        print(f"| {r['shape']} | {r['rows']} | {r['path']} | {r['kernel_us']:.1f} | {r['kernel_tb_s'] or 0:.2f} | "
              f"{r['device_us']:.1f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
