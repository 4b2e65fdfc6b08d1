"""Probe: one-row int8 / int4 products by integer dot products (dp4a) against the row kernel, on the GPU.

Question: the row kernel decodes each code to float32 and multiply-adds it (about 5 instructions a code,
thought issue-bound: pallas_kernels/NOTES.md). If x is written as a 20-bit fixed-point integer (one
power-of-two scale) split into three bytes, four codes meet one byte of four x in one `dp4a` (byte products
summed exactly in int32), so a code costs under an instruction plus its load; the byte sums are combined
once per row (int8) or group (int4). The only rounding is x's, relative 2^-20 of its largest |x|.

Kernels (configs `block_n:span:warps` for int8, `[kind@]block_n:groups_per_step:warps` for int4): one row at
a time (`dp4a_matmul`, `dp4a_int4_matmul`), every row of a program in one tile (`2d:` / `2d@`), and int4
with x's bytes made in the kernel from float x (`2dx@`, what a fused kernel pays); elsewhere x's bytes are
made outside (the products alone are timed). Device time per product from the profiler (8 stacked layers,
one call each), the fraction of the copy bandwidth, the error against float64. `--ncu` only launches the
gate+up kernels for Nsight Compute. Results: BENCHMARKS.md, session 17.

    PYTHONPATH=. python3 benchmarks/dp4a_probe.py --fmt int4 --out $OUT/r
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

from jaxinfer.bench.profile import kernel_breakdown  # noqa: E402
from pallas_kernels import code_decode  # noqa: E402
from pallas_kernels.row_matmul import row_matmuls  # noqa: E402

X_BITS = 20  # |x * scale| < 2^20: the high byte is signed in [-16, 15]


def x_bytes(x):
  """x [K] float -> (bytes [3, K/4] int32 words: high (signed), middle, low; 1 / scale)."""
  xf = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(xf))
  e = jnp.where(amax > 0, jnp.floor(jnp.log2(jnp.maximum(amax, 1e-30))) + 1, 0)  # amax < 2^e
  scale = jnp.exp2(X_BITS - e)
  v = jnp.round(xf * scale).astype(jnp.int32)
  v = jnp.clip(v, -(2**X_BITS) + 1, 2**X_BITS - 1)
  limbs = [v >> 16, (v >> 8) & 0xFF, v & 0xFF]
  words = []
  for b in limbs:
    q = (b & 0xFF).reshape(-1, 4).astype(jnp.uint32)
    w = q[:, 0] | (q[:, 1] << 8) | (q[:, 2] << 16) | (q[:, 3] << 24)
    words.append(lax.bitcast_convert_type(w, jnp.int32))
  return jnp.stack(words), 1.0 / scale


def _dp4a(a, b, c, b_signed: bool):  # signed codes (int8)
  return code_decode.dp4a(a, b, c, a_signed=True, b_signed=b_signed, native=True)


def _dp4a_u(a, b, c, b_signed: bool):  # unsigned codes (int4 nibbles)
  return code_decode.dp4a(a, b, c, a_signed=False, b_signed=b_signed, native=True)


def _kernel(layer_ref, xw_ref, inv_ref, w_ref, s_ref, o_ref, *, block_n, span, pieces):
  j = pl.program_id(0)
  layer = layer_ref[0]
  row0 = pl.multiple_of(j * block_n, block_n)
  xs = [[xw_ref[limb, pl.ds(p * span, span)] for limb in range(3)] for p in range(pieces)]
  which = lax.broadcasted_iota(jnp.int32, (block_n,), 0)
  out = jnp.zeros((block_n,), jnp.float32)
  for r in range(block_n):
    acc = [jnp.zeros((span,), jnp.int32) for _ in range(3)]
    for p in range(pieces):
      w = w_ref[layer, row0 + r, pl.ds(p * span, span)]
      acc = [_dp4a(w, xs[p][limb], acc[limb], limb == 0) for limb in range(3)]
    sums = [jnp.sum(a).astype(jnp.float32) for a in acc]
    total = sums[0] * 65536.0 + sums[1] * 256.0 + sums[2]
    out = jnp.where(which == r, total, out)
  scales = jnp.sum(s_ref[layer, pl.ds(row0, block_n), :].astype(jnp.float32), axis=1)
  o_ref[0, pl.ds(row0, block_n)] = (out * scales * inv_ref[0]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_n", "span", "warps", "two_d"))
def dp4a_matmul(xw, inv, words, scales, layer, *, block_n=8, span=512, warps=4, two_d=False):
  """int8 one-row product by dp4a: rows one at a time, or (`two_d`) every row of a program in one tile."""
  L, N, KW = words.shape
  kernel = functools.partial(_kernel_2d if two_d else _kernel, block_n=block_n, span=span, pieces=KW // span)
  return pl.pallas_call(
      kernel, grid=(N // block_n,), in_specs=[pl.no_block_spec] * 5, out_specs=pl.no_block_spec,
      out_shape=jax.ShapeDtypeStruct((1, N), jnp.bfloat16),
      compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1),
      name="dp4a_probe_2d" if two_d else "dp4a_probe",
  )(jnp.asarray(layer, jnp.int32).reshape(1), xw[:, None, :] if two_d else xw, jnp.asarray(inv, jnp.float32).reshape(1),
    words, scales)


def x_bytes_int4(x, g):
  """x [K] -> (bytes [3, K/g, 2, g/32, 4] int32 words (each group's halves, words of 4 elements), x's group
  sums in the same fixed point [K/g] float32, 1 / scale)."""
  xw, inv = x_bytes(x)
  K = x.shape[0]
  v = jnp.round(x.astype(jnp.float32) / inv)
  return xw.reshape(3, K // g, 2, g // 32, 4), jnp.sum(v.reshape(-1, g), axis=1), inv


def _int4_kernel(layer_ref, xw_ref, xs_ref, inv_ref, w_ref, s_ref, o_ref, *, block_n, groups_step, steps):
  """Codes [L, N, K/g, g/32, 4] words of eight nibbles (byte j: element j low, j + g/2 high)."""
  j = pl.program_id(0)
  layer = layer_ref[0]
  row0 = pl.multiple_of(j * block_n, block_n)
  which = lax.broadcasted_iota(jnp.int32, (block_n,), 0)
  out = jnp.zeros((block_n,), jnp.float32)

  def step(c, out):
    gs = pl.ds(c * groups_step, groups_step)
    xs = [[xw_ref[limb, gs, h, :, :] for limb in range(3)] for h in range(2)]
    xsum = xs_ref[gs]
    for r in range(block_n):
      w = w_ref[layer, row0 + r, gs, :, :]
      lo = w & 0x0F0F0F0F
      hi = lax.shift_right_logical(w, 4) & 0x0F0F0F0F
      zero = jnp.zeros(w.shape, jnp.int32)
      acc = [_dp4a_u(hi, xs[1][limb], _dp4a_u(lo, xs[0][limb], zero, limb == 0), limb == 0) for limb in range(3)]
      sums = [jnp.sum(jnp.sum(a, axis=2), axis=1).astype(jnp.float32) for a in acc]
      grp = sums[0] * 65536.0 + sums[1] * 256.0 + sums[2] - 8.0 * xsum
      val = jnp.sum(grp * s_ref[layer, row0 + r, gs].astype(jnp.float32))
      out = jnp.where(which == r, out + val, out)
    return out

  out = lax.fori_loop(0, steps, step, out) if steps > 1 else step(0, out)
  o_ref[0, pl.ds(row0, block_n)] = (out * inv_ref[0]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_n", "groups_step", "warps"))
def dp4a_int4_matmul(xw, xsum, inv, words, scales, layer, *, block_n=8, groups_step=32, warps=4):
  L, N, G = words.shape[:3]
  kernel = functools.partial(_int4_kernel, block_n=block_n, groups_step=groups_step, steps=G // groups_step)
  return pl.pallas_call(
      kernel, grid=(N // block_n,), in_specs=[pl.no_block_spec] * 6, out_specs=pl.no_block_spec,
      out_shape=jax.ShapeDtypeStruct((1, N), jnp.bfloat16),
      compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1), name="dp4a_int4_probe",
  )(jnp.asarray(layer, jnp.int32).reshape(1), xw, xsum, jnp.asarray(inv, jnp.float32).reshape(1), words, scales)


def _kernel_2d(layer_ref, xw_ref, inv_ref, w_ref, s_ref, o_ref, *, block_n, span, pieces):
  """All rows of a program in one [block_n, span] tile per piece: one reduction per limb for every row."""
  j = pl.program_id(0)
  layer = layer_ref[0]
  row0 = pl.multiple_of(j * block_n, block_n)
  rows = pl.ds(row0, block_n)
  acc = [jnp.zeros((block_n, span), jnp.int32) for _ in range(3)]
  for p in range(pieces):
    w = w_ref[layer, rows, pl.ds(p * span, span)]
    acc = [_dp4a(w, jnp.broadcast_to(xw_ref[limb, :, pl.ds(p * span, span)], w.shape), acc[limb], limb == 0)
           for limb in range(3)]
  sums = [jnp.sum(a, axis=1).astype(jnp.float32) for a in acc]
  out = sums[0] * 65536.0 + sums[1] * 256.0 + sums[2]
  scales = jnp.sum(s_ref[layer, rows, :].astype(jnp.float32), axis=1)
  o_ref[0, rows] = (out * scales * inv_ref[0]).astype(o_ref.dtype)


def _int4_kernel_2d(layer_ref, x_ref, sc_ref, xs_ref, inv_ref, w_ref, s_ref, o_ref, *, block_n, groups_step, steps,
                    x_in_kernel):
  """int4 with every row of a program in one [block_n, groups, g/32, 4] tile: one reduction per byte sum for all
  rows. x's byte words come made, [3, 1, K/g, 2, g/32, 4], or (`x_in_kernel`) are made in the kernel from float
  x [1, K/g, 2, g/32, 4, 4] scaled by sc (what a fused kernel pays: every program converts its step's x)."""
  j = pl.program_id(0)
  layer = layer_ref[0]
  row0 = pl.multiple_of(j * block_n, block_n)
  rows = pl.ds(row0, block_n)

  def x_words(gs):  # per half, per limb (high, middle, low): [1, G, g/32, 4] words of four x bytes
    if not x_in_kernel:
      return [[x_ref[limb, :, gs, h, :, :] for limb in range(3)] for h in range(2)]
    words = []
    for h in range(2):
      xf = x_ref[:, gs, h, :, :, :]  # [1, G, g/32, 4, 4] float32
      v = jnp.floor(xf * sc_ref[0] + 0.5).astype(jnp.int32)
      shift = lax.broadcasted_iota(jnp.int32, xf.shape, 4) * 8
      words.append([jnp.sum(lax.shift_left(lax.shift_right_arithmetic(v, 8 * (2 - limb)) & 0xFF, shift), axis=4)
                    for limb in range(3)])
    return words

  def step(c, out):
    gs = pl.ds(c * groups_step, groups_step)
    words = x_words(gs)
    w = w_ref[layer, rows, gs, :, :]
    lo = w & 0x0F0F0F0F
    hi = lax.shift_right_logical(w, 4) & 0x0F0F0F0F
    acc = []
    for limb in range(3):
      a = _dp4a_u(lo, jnp.broadcast_to(words[0][limb], w.shape), jnp.zeros(w.shape, jnp.int32), limb == 0)
      acc.append(_dp4a_u(hi, jnp.broadcast_to(words[1][limb], w.shape), a, limb == 0))
    sums = [jnp.sum(jnp.sum(a, axis=3), axis=2).astype(jnp.float32) for a in acc]  # [block_n, groups]
    grp = sums[0] * 65536.0 + sums[1] * 256.0 + sums[2] - 8.0 * xs_ref[:, gs]
    return out + jnp.sum(grp * s_ref[layer, rows, gs].astype(jnp.float32), axis=1)

  out = jnp.zeros((block_n,), jnp.float32)
  out = lax.fori_loop(0, steps, step, out) if steps > 1 else step(0, out)
  o_ref[0, rows] = (out * inv_ref[0]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_n", "groups_step", "warps"))
def dp4a_int4_matmul_2d(xw, xsum, inv, words, scales, layer, *, x=None, block_n=8, groups_step=32, warps=4):
  """`_int4_kernel_2d` over x's words `xw` made outside, or over float x [K] (then `xw` is not read)."""
  L, N, G = words.shape[:3]
  inv = jnp.asarray(inv, jnp.float32).reshape(1)
  x_arg = xw[:, None] if x is None else x.astype(jnp.float32).reshape(1, G, 2, x.shape[0] // G // 32, 4, 4)
  kernel = functools.partial(_int4_kernel_2d, block_n=block_n, groups_step=groups_step, steps=G // groups_step,
                             x_in_kernel=x is not None)
  return pl.pallas_call(
      kernel, grid=(N // block_n,), in_specs=[pl.no_block_spec] * 7, out_specs=pl.no_block_spec,
      out_shape=jax.ShapeDtypeStruct((1, N), jnp.bfloat16),
      compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1),
      name="dp4a_int4_probe_2d" + ("x" if x is not None else ""),
  )(jnp.asarray(layer, jnp.int32).reshape(1), x_arg, 1.0 / inv, xsum[None], inv, words, scales)


def _case_int8(name, N, K, L, args, copy):
  key = jax.random.key(N + K)
  codes = jax.random.randint(key, (L, N, K), -127, 128, jnp.int32).astype(jnp.int8)
  scales = (jax.random.uniform(jax.random.key(1), (L, N, 1), jnp.float32) * 0.02).astype(jnp.bfloat16)
  x = jax.random.normal(jax.random.key(2), (1, K), jnp.float32).astype(jnp.bfloat16)
  xw, inv = x_bytes(x[0])
  want = np.asarray(x.astype(jnp.float32), np.float64) @ (
      np.asarray(codes[3], np.float64) * np.asarray(scales[3].astype(jnp.float32), np.float64)).T
  nbytes = N * K
  row = dict(shape=name, N=N, K=K)

  def base(i, x, codes, scales):
    return row_matmuls(x, ((codes, scales, None),), i, fmt="int8")[0]
  got = np.asarray(jax.jit(base)(3, x, codes, scales).astype(jnp.float32), np.float64)
  row["base_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
  t, row["row_kernel_ops"] = timed(base, L, x, codes, scales)
  row["row_kernel_us"] = t * 1e6
  row["row_kernel_of_copy"] = nbytes / t / 1e12 / copy
  for cfg in args.configs.split(","):
    two_d = cfg.startswith("2d:")
    bn, span, warps = map(int, cfg.removeprefix("2d:").split(":"))
    if (K // 4) % span or N % bn:
      continue
    try:
      f = lambda i, xw, inv, codes, scales, bn=bn, span=span, warps=warps, two_d=two_d: dp4a_matmul(  # noqa: E731
          xw, inv, lax.bitcast_convert_type(codes.reshape(L, N, K // 4, 4), jnp.int32), scales, i,
          block_n=bn, span=span, warps=warps, two_d=two_d)
      got = np.asarray(jax.jit(f)(3, xw, inv, codes, scales).astype(jnp.float32), np.float64)
      err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
      t, ops = timed(f, L, xw, inv, codes, scales)
      row[f"dp4a_{cfg}"] = dict(us=t * 1e6, of_copy=nbytes / t / 1e12 / copy, err=err, ops=ops)
    except Exception as e:  # noqa: BLE001
      row[f"dp4a_{cfg}"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
  return row

# llama-3-8b's one-row products (N, K): q/k/v and gate+up packed
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate+up": (28672, 4096), "down": (4096, 14336)}


def timed(f, L, *args):
  """Device time of f(i, *args) for every layer in one jit (profiler), per layer; the ops seen."""
  run = jax.jit(lambda *a: [f(i, *a) for i in range(L)])
  prof = kernel_breakdown(lambda: run(*args)[-1].block_until_ready(), calls=3)
  return prof["device_us_per_call"] / 1e6 / L, {o["hlo_op"]: round(o["us_per_call"], 1) for o in prof["ops"]}


def _case_int4(name, N, K, L, args, copy, g=128):
  from pallas_kernels.common import dequantize_codes
  codes = jax.random.randint(jax.random.key(N + K), (L, N, K // 2), 0, 256, jnp.int32).astype(jnp.uint8)
  scales = (jax.random.uniform(jax.random.key(1), (L, N, K // g), jnp.float32) * 0.02).astype(jnp.bfloat16)
  x = jax.random.normal(jax.random.key(2), (1, K), jnp.float32).astype(jnp.bfloat16)
  xw, xsum, inv = x_bytes_int4(x[0], g)
  w3 = np.asarray(dequantize_codes(codes[3], scales[3], fmt="int4", group_size=g), np.float64)
  want = np.asarray(x.astype(jnp.float32), np.float64) @ w3.T
  nbytes = N * K // 2 + N * (K // g) * 2
  row = dict(shape=name, fmt="int4", N=N, K=K)
  def base(i, x, codes, scales):
    return row_matmuls(x, ((codes, scales, None),), i, fmt="int4", group_size=g)[0]
  got = np.asarray(jax.jit(base)(3, x, codes, scales).astype(jnp.float32), np.float64)
  row["base_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
  t, row["row_kernel_ops"] = timed(base, L, x, codes, scales)
  row["row_kernel_us"] = t * 1e6
  row["row_kernel_of_copy"] = nbytes / t / 1e12 / copy
  for cfg in args.configs4.split(","):
    kind, _, rest = cfg.rpartition("@")
    two_d = kind in ("2d", "2dx")
    bn, gs, warps = map(int, rest.split(":"))
    if (K // g) % gs or N % bn:
      continue
    try:
      def f(i, xw, xsum, inv, codes, scales, bn=bn, gs=gs, warps=warps, two_d=two_d, kind=kind):
        words = lax.bitcast_convert_type(codes.reshape(L, N, K // 8, 4), jnp.int32).reshape(L, N, K // g, g // 32, 4)
        if kind == "2dx":
          return dp4a_int4_matmul_2d(xw, xsum, inv, words, scales, i, x=x[0], block_n=bn, groups_step=gs,
                                     warps=warps)
        mm = dp4a_int4_matmul_2d if two_d else dp4a_int4_matmul
        return mm(xw, xsum, inv, words, scales, i, block_n=bn, groups_step=gs, warps=warps)
      got = np.asarray(jax.jit(f)(3, xw, xsum, inv, codes, scales).astype(jnp.float32), np.float64)
      err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
      t, ops = timed(f, L, xw, xsum, inv, codes, scales)
      row[f"dp4a_{cfg}"] = dict(us=t * 1e6, of_copy=nbytes / t / 1e12 / copy, err=err, ops=ops)
    except Exception as e:  # noqa: BLE001
      row[f"dp4a_{cfg}"] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
  return row



def launch_only(fmt):
  """Each kernel of the gate+up shape once (after a warm-up launch), for Nsight Compute:
  ncu --kernel-name regex:"row_matmul|dp4a" --launch-skip 2 ... python benchmarks/dp4a_probe.py --ncu."""
  N, K, g, L = 28672, 4096, 128, 2
  x = jax.random.normal(jax.random.key(2), (1, K), jnp.float32).astype(jnp.bfloat16)
  if fmt == "int8":
    codes = jax.random.randint(jax.random.key(0), (L, N, K), -127, 128, jnp.int32).astype(jnp.int8)
    scales = jnp.full((L, N, 1), 0.01, jnp.bfloat16)
    xw, inv = x_bytes(x[0])
    words = lax.bitcast_convert_type(codes.reshape(L, N, K // 4, 4), jnp.int32)
    calls = [lambda: row_matmuls(x, ((codes, scales, None),), 1, fmt="int8")[0],
             lambda: dp4a_matmul(xw, inv, words, scales, 1, block_n=4, span=512)]
  else:
    codes = jax.random.randint(jax.random.key(0), (L, N, K // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = jnp.full((L, N, K // g), 0.01, jnp.bfloat16)
    xw, xsum, inv = x_bytes_int4(x[0], g)
    words = lax.bitcast_convert_type(codes.reshape(L, N, K // 8, 4), jnp.int32).reshape(L, N, K // g, g // 32, 4)
    calls = [lambda: row_matmuls(x, ((codes, scales, None),), 1, fmt="int4", group_size=g)[0],
             lambda: dp4a_int4_matmul(xw, xsum, inv, words, scales, 1, block_n=8, groups_step=32)]
  for c in calls:  # warm-up (compile) launches first, then one launch of each to profile
    c().block_until_ready()
  for c in calls:
    c().block_until_ready()
  print(fmt, "launched", flush=True)


def save_results(out, name, copy, results):
  """The probe's rows with the run's copy bandwidth and card as <out>/<name> (nothing without --out)."""
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
      json.dump(dict(copy_tb_s=copy, results=results, device=str(jax.devices()[0].device_kind)), f, indent=1)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ncu", action="store_true", help="only launch the gate+up kernels (for Nsight Compute)")
  ap.add_argument("--out")
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--fmt", default="int4", choices=("int8", "int4"))
  ap.add_argument("--configs4", default="8:32:4,2d@8:32:4,2d@4:32:4,2dx@8:32:4,2dx@4:32:4,2d@8:16:4")
  ap.add_argument("--configs", default="8:512:4,4:512:4,8:256:4,16:256:4")
  args = ap.parse_args()
  if args.ncu:
    return launch_only(args.fmt)
  from jaxinfer.bench.ceilings import measure_ceilings
  ceil = measure_ceilings()
  copy = ceil.copy_bytes_per_s / 1e12
  print(f"copy {copy:.3f} TB/s ({ceil.copy_method})", flush=True)
  results = []
  L = args.layers
  for name, (N, K) in SHAPES.items():
    row = _case_int4(name, N, K, L, args, copy) if args.fmt == "int4" else _case_int8(name, N, K, L, args, copy)
    print(json.dumps(row), flush=True)
    results.append(row)
  save_results(args.out, "dp4a_probe.json", copy, results)
  print("\nshape | row kernel us (of copy) | best dp4a us (of copy) cfg")
  for r in results:
    best = min((v["us"], k) for k, v in r.items() if k.startswith("dp4a_") and "us" in v) if any(
        k.startswith("dp4a_") and "us" in v for k, v in r.items()) else (None, None)
    us, name = best
    print(r["shape"], f"{r['row_kernel_us']:.1f} ({r['row_kernel_of_copy']:.2f})",
          None if us is None else f"{us:.1f} ({r[name]['of_copy']:.2f}) {name} err {r[name]['err']:.1e}")


if __name__ == "__main__":
  main()
