"""Probe: int4 decode products on the integer tensor cores (int8 `dot`), against the row kernel, on the GPU.

Question: the int4 row kernel (`pallas_kernels/row_matmul.py`, dp4a on the CUDA cores) spends ~2.2 instructions
a code after session 18, and the batch-16 weight kernel (bf16 operands) ~4. If x is a 20-bit fixed-point
integer written as three signed 7-bit digits (columns of an int8 operand: 3 per batch row), the codes' nibbles
(one LOP3 per four codes) and the digits meet in an int8 `jnp.dot` with int32 sums, exact per group; each
group's [rows, columns] sums are scaled once in float32. Does the decode then stream near the copy bandwidth?

Layout: codes uint8 [L, N, K/2] as the library stores them (within a group of g, byte j holds element j in its
low nibble and j + g/2 in its high nibble), scales [L, N, K/g]; zero point 8 (no offsets). x's digits
[K, C] int8 and their group sums [G, C] int32 are made outside (the products alone are timed, like the library's
prepared x). Device time per product from the profiler (8 stacked layers, one call each), its fraction of the
copy bandwidth and the error against float64; `--sass` counts the kernel's SASS offline instead (no GPU).

    PYTHONPATH=. python3 benchmarks/imma_probe.py --out $OUT/r   # results: BENCHMARKS.md, session 18
    python benchmarks/imma_probe.py --sass
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

X_BITS = 20
COLUMNS = 16  # the dot's N at least: 3 digit columns per batch row, padded to a power of two (Triton: N >= 16)


def columns(batch: int) -> int:
  return max(COLUMNS, 1 << (3 * batch - 1).bit_length())


def x_digits(x, g: int):
  """x [B, K] float -> (digits [K, columns(B)] int8: column 3b + d holds digit d (high first) of row b; their group
  sums [K/g, COLUMNS] int32; per-column weights [COLUMNS] float32 = 128^(2-d) / scale_b)."""
  B, K = x.shape
  xf = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(xf), axis=1, keepdims=True)
  e = jnp.where(amax > 0, jnp.floor(jnp.log2(jnp.maximum(amax, 1e-30))) + 1, 0)  # amax < 2^e
  scale = jnp.exp2(X_BITS - 1 - e)
  v = jnp.round(xf * scale).astype(jnp.int32)  # |v| < 2^19: three balanced base-128 digits
  d0 = ((v + 64) & 127) - 64
  v1 = (v - d0) >> 7
  d1 = ((v1 + 64) & 127) - 64
  d2 = (v1 - d1) >> 7  # |d2| <= 32
  digits = jnp.stack([d2, d1, d0], axis=2).reshape(B, K, 3).transpose(1, 0, 2).reshape(K, 3 * B)
  C = columns(B)
  digits = jnp.pad(digits, ((0, 0), (0, C - 3 * B)))
  sums = digits.reshape(K // g, g, C).sum(axis=1)
  w = (jnp.asarray([128.0**2, 128.0, 1.0])[None, :] / scale).reshape(3 * B)
  return digits.astype(jnp.int8), sums.astype(jnp.int32), jnp.pad(w, (0, C - 3 * B)).astype(jnp.float32)


def _nibbles(b, native: bool):
  """uint8 codes -> (low, high) nibbles as int8 (0..15): one LOP3 per four codes (packed four to a register)."""
  if not native:
    return (b & 0x0F).astype(jnp.int8), (b >> 4).astype(jnp.int8)
  shape = [jax.ShapeDtypeStruct(b.shape, jnp.int8)]
  lo = pltriton.elementwise_inline_asm("and.b32 $0, $1, 0x0F0F0F0F;", args=[b], constraints="=r,r", pack=4,
                                       result_shape_dtypes=shape)[0]
  hi = pltriton.elementwise_inline_asm("{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }", args=[b],
                                       constraints="=r,r", pack=4, result_shape_dtypes=shape)[0]
  return lo, hi


@functools.partial(jax.jit, static_argnames=("block_n", "warps", "stages", "groups_step", "batch", "interpret"))
def imma_int4_matmul(digits, sums, weights, codes, scales, layer, *, block_n=64, warps=4, stages=3, groups_step=1,
                     batch=1, interpret=False):
  """x @ dequantize(codes[layer]).T for x given as digits (x_digits): [batch, N] float32."""
  L, N, Kh = codes.shape
  G = scales.shape[2]
  g = 2 * Kh // G
  native = not interpret
  C = digits.shape[1]

  def kernel(layer_ref, d_ref, s_sum_ref, w_ref, c_ref, sc_ref, o_ref):
    lay = layer_ref[0]
    rows = pl.ds(pl.multiple_of(pl.program_id(0) * block_n, block_n), block_n)

    def group_terms(gi):  # the group's scales [bn, 1] and digit sums [1, C] (loads that feed no dot: not pipelined)
      return sc_ref[lay, rows, pl.ds(gi, 1)].astype(jnp.float32), s_sum_ref[pl.ds(gi, 1), :]

    def group_sum(gi, dsum):  # [bn, C]: sum over the group of (code - 8) * digit, exact in int32
      b = c_ref[lay, rows, pl.ds(pl.multiple_of(gi * (g // 2), g // 2), g // 2)]  # uint8 [bn, g/2]
      lo, hi = _nibbles(b, native)
      x_lo = d_ref[pl.ds(pl.multiple_of(gi * g, g), g // 2), :]  # int8 [g/2, C]
      x_hi = d_ref[pl.ds(pl.multiple_of(gi * g + g // 2, g // 2), g // 2), :]
      return (jnp.dot(lo, x_lo, preferred_element_type=jnp.int32) + jnp.dot(hi, x_hi, preferred_element_type=jnp.int32)
              - 8 * dsum)

    def body(step, carry):  # `groups_step` groups, independent dots; their terms loaded a step ahead
      acc, terms = carry
      first = step * groups_step
      ahead = [group_terms(jnp.minimum(first + groups_step + i, G - 1)) for i in range(groups_step)]
      for i, (scale, dsum) in enumerate(terms):
        acc = acc + group_sum(first + i, dsum).astype(jnp.float32) * scale
      return acc, ahead

    acc, _ = lax.fori_loop(0, G // groups_step, body, (jnp.zeros((block_n, C), jnp.float32),
                                                       [group_terms(i) for i in range(groups_step)]))
    w = w_ref[...]
    cols = lax.broadcasted_iota(jnp.int32, (1, C), 1) // 3
    for r in range(batch):
      o_ref[r, rows] = jnp.sum(jnp.where(cols == r, acc * w[None, :], 0.0), axis=1)

  return pl.pallas_call(
      kernel, grid=(N // block_n,), in_specs=[pl.no_block_spec] * 6, out_specs=pl.no_block_spec,
      out_shape=jax.ShapeDtypeStruct((batch, N), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages), interpret=interpret,
      name="imma_int4")(jnp.asarray(layer, jnp.int32).reshape(1), digits, sums, weights, codes, scales)


def _inputs(N, K, L, g=128, batch=1, seed=0):
  codes = jax.random.randint(jax.random.key(seed), (L, N, K // 2), 0, 256, jnp.int32).astype(jnp.uint8)
  scales = (jax.random.uniform(jax.random.key(seed + 1), (L, N, K // g), jnp.float32) * 0.02).astype(jnp.bfloat16)
  x = jax.random.normal(jax.random.key(seed + 2), (batch, K), jnp.float32).astype(jnp.bfloat16)
  return codes, scales, x


def _want(codes, scales, x, layer, g):
  from pallas_kernels.common import dequantize_codes
  w = np.asarray(dequantize_codes(codes[layer], scales[layer], fmt="int4", group_size=g), np.float64)
  return np.asarray(x.astype(jnp.float32), np.float64) @ w.T


def check_interpret():
  """The kernel in interpret mode against float64 (no GPU)."""
  N, K, L, g = 128, 512, 2, 128
  for batch in (1, 6):
    codes, scales, x = _inputs(N, K, L, g, batch)
    got = imma_int4_matmul(*x_digits(x, g), codes, scales, 1, block_n=32, groups_step=2, batch=batch,
                           interpret=True)
    want = _want(codes, scales, x, 1, g)
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    print(f"interpret batch {batch}: rel err {err:.2e}")
    assert err < 1e-5


def sass(configs):
  from benchmarks.sass_count import capture_modules, sass_counts
  S = jax.ShapeDtypeStruct
  L, N, K, g = 2, 28672, 4096, 128
  for bn, warps, stages, gs in configs:
    fn = functools.partial(imma_int4_matmul, block_n=bn, warps=warps, stages=stages, groups_step=gs)
    [m] = capture_modules(fn, S((K, COLUMNS), jnp.int8), S((K // g, COLUMNS), jnp.int32), S((COLUMNS,), jnp.float32),
                          S((L, N, K // 2), jnp.uint8), S((L, N, K // g), jnp.bfloat16), S((), jnp.int32))
    c = sass_counts(m, warps)
    codes = bn * g // (warps * 32)  # codes a thread per loop iteration (the loop body is counted once)
    top = ", ".join(f"{op} {n}" for op, n in c["ops"].most_common(14))
    print(f"bn {bn} warps {warps} stages {stages} groups {gs}: {c['resources']}, {c['instructions']} static instructions "
          f"({codes} codes a thread an iteration); {top}", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sass", action="store_true")
  ap.add_argument("--check", action="store_true", help="interpret-mode check only (CPU)")
  ap.add_argument("--out")
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--configs", default="64:4:3:1,64:4:3:2,64:4:3:4,32:4:3:2,128:4:3:2",
                  help="block_n:warps:stages:groups_step,...")
  ap.add_argument("--batches", default="1,16")
  args = ap.parse_args()
  configs = [tuple(map(int, (c + ":1").split(":")[:4])) for c in args.configs.split(",")]
  if args.check:
    return check_interpret()
  if args.sass:
    return sass(configs)
  from benchmarks.dp4a_probe import SHAPES, save_results, timed
  from jaxinfer.bench.ceilings import measure_ceilings
  from pallas_kernels.row_matmul import row_matmuls
  from pallas_kernels.weight_matmul import weight_matmul
  ceil = measure_ceilings()
  copy = ceil.copy_bytes_per_s / 1e12
  print(f"copy {copy:.3f} TB/s ({ceil.copy_method})", flush=True)
  L, g, results = args.layers, 128, []
  for name, (N, K) in SHAPES.items():
    codes, scales, x1 = _inputs(N, K, L, g, 1)
    nbytes = N * K // 2 + N * (K // g) * 2
    row = dict(shape=name, N=N, K=K)

    def base(i, x, codes, scales):
      return row_matmuls(x, ((codes, scales, None),), i, fmt="int4", group_size=g)[0]
    want = _want(codes, scales, x1, 3, g)
    got = np.asarray(jax.jit(base)(3, x1, codes, scales).astype(jnp.float32), np.float64)
    t, _ = timed(base, L, x1, codes, scales)
    row["row_kernel"] = dict(us=t * 1e6, of_copy=nbytes / t / 1e12 / copy,
                             err=float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    for batch in map(int, args.batches.split(",")):
      x = x1 if batch == 1 else _inputs(N, K, L, g, batch, seed=5)[2]
      d, s, w = x_digits(x, g)
      want = _want(codes, scales, x, 3, g)
      if batch > 1:  # the library's kernel for several rows: bf16 dot operands from the codes (weight_matmul)
        def wk(i, x, codes, scales):
          return weight_matmul(x, codes, scales, None, i, fmt="int4", group_size=g, transposed=True)
        got = np.asarray(jax.jit(wk)(3, x, codes, scales), np.float64)
        t, _ = timed(wk, L, x, codes, scales)
        row[f"weight_kernel_b{batch}"] = dict(us=t * 1e6, of_copy=nbytes / t / 1e12 / copy,
                                              err=float(np.linalg.norm(got - want) / np.linalg.norm(want)))
      for bn, warps, stages, gs in configs:
        key = f"imma_b{batch}_{bn}:{warps}:{stages}:{gs}"
        if N % bn or (K // g) % gs:
          continue
        try:
          f = lambda i, d, s, w, codes, scales, bn=bn, warps=warps, stages=stages, gs=gs, batch=batch: (  # noqa: E731
              imma_int4_matmul(d, s, w, codes, scales, i, block_n=bn, warps=warps, stages=stages, groups_step=gs,
                               batch=batch))
          got = np.asarray(jax.jit(f)(3, d, s, w, codes, scales), np.float64)
          t, _ = timed(f, L, d, s, w, codes, scales)
          row[key] = dict(us=t * 1e6, of_copy=nbytes / t / 1e12 / copy,
                          err=float(np.linalg.norm(got - want) / np.linalg.norm(want)))
        except Exception as e:  # noqa: BLE001
          row[key] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    print(json.dumps(row), flush=True)
    results.append(row)
  save_results(args.out, "imma_probe.json", copy, results)
  print("\nshape | row kernel us (of copy) | best int8-dot us (of copy) per batch")
  for r in results:
    line = f"{r['shape']} | {r['row_kernel']['us']:.1f} ({r['row_kernel']['of_copy']:.2f})"
    for batch in map(int, args.batches.split(",")):
      cands = [(v["us"], k) for k, v in r.items() if k.startswith(f"imma_b{batch}_") and "us" in v]
      if f"weight_kernel_b{batch}" in r:
        line += f" | weight kernel b{batch} {r[f'weight_kernel_b{batch}']['us']:.1f}"
      if cands:
        us, k = min(cands)
        line += f" | b{batch} {us:.1f} ({r[k]['of_copy']:.2f}) {k} err {r[k]['err']:.1e}"
    print(line)


if __name__ == "__main__":
  main()
