"""Fused dequantize-matmul for decode shapes: x [M, K] @ W [K, N] with W stored quantized, in Pallas
(Triton lowering), plus a plain-jnp reference. Knows nothing about models or `QArray`s: it takes the
arrays and static ints.

Weight formats (codes along K, scales per group of K rows or per column):
  int8: values int8 [K, N];          w = q * s           (s [K/g, N] grouped, or [1, N] per column)
  fp8:  values float8_e4m3fn [K, N]; w = q * s
  int4: values uint8 [K/2, N], two codes per byte, per group of g rows: byte j of a group holds row j
        (low nibble) and row j + g/2 (high nibble); w = (u - 8) * s, or u * s + m with offsets m [K/g, N].

The grid is (N / block_n, splits): each program streams one [K / splits, block_n] slab of the weight once,
dequantizes it in registers (int4: two half-group dots per group, sharing the loaded bytes) and
accumulates x @ W in float32 with the group scale applied to each group's partial product (and the offset
times the group's sum of x). Splits of K write float32 partials `[splits, M, N]` that a small jnp sum
combines: batch-1 decode has few columns per program, so K is split to fill the GPU. M (<= 64 rows) is
padded to 16 for the Triton dot.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

FORMATS = ("int8", "fp8", "int4")
MIN_DOT = 16  # Triton dots need every dimension >= 16
MAX_ROWS = 64
TARGET_PROGRAMS = 264  # two waves of a 132-SM H100/H200
MIN_SPLIT_ROWS = 256  # below this many K rows per program the loop prologue dominates
_BLOCK_N = 128
_BLOCK_K8 = 128  # rows per step for per-column int8 / fp8
_WARPS = 4
_STAGES = 3


def _pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _block_n(n: int) -> int | None:
  for b in (_BLOCK_N, 64, 32, 16):
    if n % b == 0:
      return b
  return None


def plan(k: int, n: int, fmt: str, group: int | None) -> tuple[int, int, int] | None:
  """(block_n, splits, step) for a K x N weight, or None when the shapes do not fit the kernel.

  Each split streams a power-of-two number of K rows, `step` rows per loop iteration (a whole group when
  grouped); splits grow until the grid has about TARGET_PROGRAMS programs, but no split gets fewer
  than MIN_SPLIT_ROWS rows unless even the fewest splits give fewer.
  """
  bn = _block_n(n)
  if bn is None:
    return None
  cands = []
  for s in range(1, k + 1):
    if k % s == 0 and _pow2(k // s):
      rows = k // s
      step = group if group is not None else min(_BLOCK_K8, rows)
      if rows % step == 0 and step >= MIN_DOT and (fmt != "int4" or step // 2 >= MIN_DOT):
        cands.append((s, step))
  if not cands:
    return None
  floor = min(MIN_SPLIT_ROWS, k // cands[0][0])
  best = cands[0]
  for s, step in cands:
    if k // s < floor:
      break
    best = (s, step)
    if s * (n // bn) >= TARGET_PROGRAMS:
      break
  return bn, best[0], best[1]


def supports(rows: int, k: int, n: int, fmt: str, group: int | None) -> bool:
  """Whether `quant_matmul` handles these static shapes (callers fall back to XLA otherwise)."""
  if fmt not in FORMATS or rows < 1 or rows > MAX_ROWS:
    return False
  if fmt == "int4" and group is None:
    return False
  if group is not None and (not _pow2(group) or group < 2 * MIN_DOT or k % group):
    return False
  return plan(k, n, fmt, group) is not None


def _kernel(x_ref, v_ref, s_ref, *refs, fmt, group, step, n_steps, has_offsets):
  """One program: x [Mp, Ks] @ W[Ks(/2), bn] -> o [Mp, bn] float32."""
  m_ref = refs[0] if has_offsets else None
  o_ref = refs[-1]
  mp, bn = o_ref.shape
  dt = x_ref.dtype

  def group_scale(i):
    return s_ref[pl.ds(i, 1), :].astype(jnp.float32)  # [1, bn]

  def body(i, acc):
    if fmt == "int4":
      half = group // 2
      packed = v_ref[pl.ds(i * half, half), :]  # [g/2, bn] uint8
      lo = (packed & 0x0F).astype(jnp.float32)
      hi = (packed >> 4).astype(jnp.float32)
      if not has_offsets:
        lo, hi = lo - 8.0, hi - 8.0
      x_lo = x_ref[:, pl.ds(i * group, half)]  # [Mp, g/2]
      x_hi = x_ref[:, pl.ds(i * group + half, half)]
      part = pltriton.dot(x_lo, lo.astype(dt)) + pltriton.dot(x_hi, hi.astype(dt))  # [Mp, bn] f32
      part = part * group_scale(i)
      if has_offsets:
        xs = (jnp.sum(x_lo.astype(jnp.float32), axis=1, keepdims=True)
              + jnp.sum(x_hi.astype(jnp.float32), axis=1, keepdims=True))  # [Mp, 1]
        part = part + xs * m_ref[pl.ds(i, 1), :].astype(jnp.float32)
      return acc + part
    w = v_ref[pl.ds(i * step, step), :].astype(jnp.float32).astype(dt)  # [step, bn]
    part = pltriton.dot(x_ref[:, pl.ds(i * step, step)], w)
    if group is not None:
      part = part * group_scale(i)
    return acc + part

  acc = lax.fori_loop(0, n_steps, body, jnp.zeros((mp, bn), jnp.float32))
  if group is None:
    acc = acc * s_ref[...].astype(jnp.float32)  # [1, bn] per column
  o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "block_n", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def quant_matmul(
    x: jax.Array,  # [M, K] bf16 / f16 / f32
    values: jax.Array,  # [K, N] int8 / float8_e4m3fn, or [K/2, N] uint8 (int4)
    scales: jax.Array,  # [K/g, N] or [1, N]
    offsets: jax.Array | None = None,  # [K/g, N] (int4 asymmetric only)
    *,
    fmt: str,
    group_size: int | None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:  # [M, N] float32
  """x @ dequantize(W), float32. `interpret=None`: interpret mode unless the default backend is a GPU."""
  M, K = x.shape
  N = values.shape[1]
  g = group_size
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
  if values.shape[0] != (K // 2 if fmt == "int4" else K):
    raise ValueError(f"{fmt} values of shape {values.shape} do not match x of shape {x.shape}")
  if scales.shape != ((K // g if g else 1), N):
    raise ValueError(f"scales have shape {scales.shape}, expected {((K // g if g else 1), N)}")
  if offsets is not None and (fmt != "int4" or offsets.shape != scales.shape):
    raise ValueError("offsets are for int4 only and must have the scales' shape")
  if not supports(M, K, N, fmt, g):
    raise ValueError(f"unsupported quant_matmul shape: M={M}, K={K}, N={N}, {fmt}, group {g}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  bn, splits, step = plan(K, N, fmt, g)
  if block_n is not None or num_splits is not None:  # explicit choices (benchmarks, tests)
    bn, splits = block_n or bn, num_splits or splits
    step = g if g is not None else min(_BLOCK_K8, K // splits)
  ks = K // splits
  mp = max(MIN_DOT, _next_pow2(M))
  xp = jnp.pad(x, ((0, mp - M), (0, 0))) if mp != M else x
  kv = ks // 2 if fmt == "int4" else ks  # value rows per split
  ksc = ks // g if g else 1  # scale rows per split
  scale_map = (lambda j, s: (s, j)) if g else (lambda j, s: (0, j))
  in_specs = [
      pl.BlockSpec((mp, ks), lambda j, s: (0, s)),
      pl.BlockSpec((kv, bn), lambda j, s: (s, j)),
      pl.BlockSpec((ksc, bn), scale_map),
  ]
  args = [xp, values, scales]
  if offsets is not None:
    in_specs.append(pl.BlockSpec((ksc, bn), scale_map))
    args.append(offsets)
  kernel = functools.partial(_kernel, fmt=fmt, group=g, step=step, n_steps=ks // step,
                             has_offsets=offsets is not None)
  partials = pl.pallas_call(
      kernel,
      grid=(N // bn, splits),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, mp, bn), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((splits, mp, N), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps or _WARPS, num_stages=num_stages or _STAGES),
      interpret=interpret,
      name=f"quant_matmul_{fmt}",
  )(*args)
  out = partials[0] if splits == 1 else jnp.sum(partials, axis=0)
  return out[:M]


def quant_matmul_reference(x, values, scales, offsets=None, *, fmt: str, group_size: int | None):
  """Plain jnp: dequantize W to float32 and multiply (HIGHEST precision)."""
  K = x.shape[1]
  if fmt == "int4":
    g = group_size
    p = values.reshape(K // g, g // 2, -1)
    codes = jnp.concatenate([p & 0x0F, p >> 4], axis=1).astype(jnp.float32)  # [K/g, g, N]
    if offsets is None:
      codes = codes - 8.0
  else:
    codes = values.astype(jnp.float32).reshape(K // (group_size or K), group_size or K, -1)
  w = codes * scales.astype(jnp.float32)[:, None, :]
  if offsets is not None:
    w = w + offsets.astype(jnp.float32)[:, None, :]
  w = w.reshape(K, -1)
  return jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
