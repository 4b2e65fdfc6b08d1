"""Decode-shaped products with a stored weight: x [M, K] @ W [K, N] for few rows M, with W plain (bf16/f16)
or quantized, read **in place from one layer of a stacked `[L, K, N]` weight**. Pallas (Triton lowering),
plus a plain-jnp reference. Knows nothing about models or `QArray`s: it takes arrays and static ints.

Why a kernel for plain weights too: inside the model's layer scan XLA feeds a dot (or any custom call)
with a materialised copy of the layer's slice of the stacked weight, so a decode step reads, writes and
reads every weight again. This kernel takes the whole stacked weight and the layer index and streams the
layer's rows straight from it, once.

Weight formats (codes along K, scales per group of K rows or per column):
  plain: values bf16/f16 [K, N] (the activations' dtype); no scales
  int8:  values int8 [K, N];          w = q * s           (s [K/g, N] grouped, or [1, N] per column)
  fp8:   values float8_e4m3fn [K, N]; w = q * s
  int4:  values uint8 [K/2, N], two codes per byte, per group of g rows: byte j of a group holds row j
         (low nibble) and row j + g/2 (high nibble); w = (u - 8) * s, or u * s + m with offsets m [K/g, N].
Each weight-side array may carry a leading layer axis (`[L, ...]`); `layer` (an int32 scalar array) picks
the layer. Without one, the array is its own single layer. With `transposed=True` every format is stored
contraction-last instead (values [N, K(/2)], scales and offsets [N, K/g or 1]: `quantize(contract_last(...))`
makes them so) and its tiles enter the dot transposed.

The grid is (N / block_n, splits): each program streams one [K / splits, block_n] slab of the weight once,
dequantizes it in registers (int4: two half-group dots per group, sharing the loaded bytes; int8 / int4
codes become bfloat16 operands by inline PTX, `code_decode`) and accumulates x @ W in float32 with the group
scale applied to each group's partial product (and the offset times the group's sum of x, the sums taken
once outside the kernel). int4 takes smaller programs, about four per SM (`DOT_TILING`). Splits of K
write float32 partials `[splits, M, N]` that a small jnp sum combines: few rows mean few columns of
programs, so K is split to fill the GPU. The Triton dot takes a
power of two >= 16 rows: x's missing rows load as zeros (masked), never as a padded copy. fp8 codes enter
the dot as float16 (converted in hardware; x too); a single row of x with fp8 codes skips the dot for
multiply-adds on the CUDA cores (`ONE_ROW_FMA`, measured per format in pallas_kernels/NOTES.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import code_decode
from pallas_kernels.common import MIN_DOT_ROWS, dequantize_codes, is_pow2, next_pow2

FORMATS = ("plain", "int8", "fp8", "int4")
MAX_ROWS = 128
TARGET_PROGRAMS = 132  # one wave of a 132-SM H100/H200 (H200: fewer splits beat two waves, BENCHMARKS.md)
# Per format, the dot path's (widest column block, warps, waves of TARGET_PROGRAMS); others: (_BLOCK_N,
# _WARPS, 1). int4: smaller programs, about four resident per SM, hide more of the decode's latency (H200,
# llama-3-8b batch 16: 3.86-3.87 ms a step, against 3.97-4.01 with (128, 4, 2) and 4.50-4.53 with one wave
# of (128, 4); int8 flat; BENCHMARKS.md, session 13).
DOT_TILING = {"int4": (64, 2, 4)}
MIN_SPLIT_ROWS = 256  # below this many K rows per program the loop prologue dominates
_BLOCK_N = 128
_BLOCK_K = 128  # rows per loop step for plain and per-column int8 / fp8 (grouped formats: one group)
_WARPS = 4
_STAGES = 3
# Formats whose one-row products run as multiply-adds on the CUDA cores rather than a dot (H200, batch-1
# llama-3-8b decode: fp8 3.70 vs 4.31 ms; int8 4.78 vs 4.36 and int4 5.72 vs 5.51 lose: pallas_kernels/NOTES.md)
ONE_ROW_FMA = ("fp8",)


def _tiling(fmt: str) -> tuple[int, int, int]:
  """(widest column block, warps, waves) of a format's programs (`DOT_TILING`)."""
  return DOT_TILING.get(fmt, (_BLOCK_N, _WARPS, 1))


def _block_n(n: int, rows: int = 1, fmt: str = "plain") -> int | None:
  widest = _tiling(fmt)[0]
  widest = widest if rows <= 64 else widest // 2  # 128 rows x 128 columns of float32 spill registers
  for b in (widest, 64, 32, 16):
    if b <= widest and n % b == 0:
      return b
  return None


def plan(k: int, n: int, fmt: str, group: int | None, rows: int = 1) -> tuple[int, int, int] | None:
  """(block_n, splits, step) for a K x N weight, or None when the shapes do not fit the kernel.

  Each split streams a power-of-two number of K rows, `step` rows per loop iteration (a whole group when
  grouped); splits grow until the grid has about TARGET_PROGRAMS times the format's waves of programs, but
  no split gets fewer than MIN_SPLIT_ROWS rows unless even the fewest splits give fewer.
  """
  bn = _block_n(n, rows, fmt)
  if bn is None:
    return None
  cands = []
  for s in range(1, k + 1):
    if k % s == 0 and is_pow2(k // s):
      ks = k // s
      step = group if group is not None else min(_BLOCK_K, ks)
      if ks % step == 0 and step >= MIN_DOT_ROWS and (fmt != "int4" or step // 2 >= MIN_DOT_ROWS):
        cands.append((s, step))
  if not cands:
    return None
  floor = min(MIN_SPLIT_ROWS, k // cands[0][0])
  best = cands[0]
  for s, step in cands:
    if k // s < floor:
      break
    best = (s, step)
    if s * (n // bn) >= TARGET_PROGRAMS * _tiling(fmt)[2]:
      break
  return bn, best[0], best[1]


def supports(rows: int, k: int, n: int, fmt: str, group: int | None) -> bool:
  """Whether `weight_matmul` handles these static shapes (callers fall back to XLA otherwise)."""
  if fmt not in FORMATS or rows < 1 or rows > MAX_ROWS:
    return False
  if fmt == "int4" and group is None:
    return False
  if fmt == "plain" and group is not None:
    return False
  if group is not None and (not is_pow2(group) or group < 2 * MIN_DOT_ROWS or k % group):
    return False
  return plan(k, n, fmt, group, rows) is not None


def _uses_cuda_cores(rows: int, fmt: str) -> bool:
  """Whether a product runs as multiply-adds on the CUDA cores (`_stream_one_row`) instead of a dot."""
  return rows == 1 and fmt in ONE_ROW_FMA


def _codes_dtype(fmt: str, x_dtype):
  """The dot's operand dtype: float16 for fp8 codes with 16-bit activations (e4m3 converts to float16 in
  hardware; a bf16 x is exact in float16 between 6e-5 and 65504 in magnitude, the range decoder activations
  stay in: beyond it x would round to zero or overflow), else the activations' dtype."""
  return jnp.float16 if fmt == "fp8" and x_dtype in (jnp.bfloat16, jnp.float16) else x_dtype


def _code_operand(w, cdt, native: bool):
  """int8 / fp8 codes [rows, bn] as the dot's operand (exact). `native`: bfloat16 operands from int8 codes
  by inline PTX (`code_decode`), not by two conversions per code."""
  if w.dtype == jnp.float8_e4m3fn:
    return w.astype(cdt)
  if native and cdt == jnp.bfloat16:
    return code_decode.int8_codes_bf16(w, True)
  return w.astype(jnp.float32).astype(cdt)


def _int4_operands(packed, cdt, *, symmetric: bool, native: bool):
  """Both nibbles of packed int4 codes [g/2, bn] (transposed: [bn, g/2]) as dot operands (exact): u - 8
  when symmetric, else u. `native`: bfloat16 operands by inline PTX, as `_code_operand`."""
  zero = 8 if symmetric else 0
  if native and cdt == jnp.bfloat16:
    return code_decode.int4_codes_bf16(packed, zero, True)
  return (((packed & 0x0F).astype(jnp.float32) - zero).astype(cdt),
          ((packed >> 4).astype(jnp.float32) - zero).astype(cdt))


def _param_row(ref, layer, row, cols, transposed=False):
  """[1, bn] float32: row `row` of a layer's scales or offsets (a group's, or the per-column row 0), at
  this program's columns (`transposed`: the scales stored [(L,) N, K/g or 1], column `row`)."""
  if transposed:
    return ref[layer, cols, row].astype(jnp.float32)[None, :]
  return ref[layer, pl.ds(row, 1), cols].astype(jnp.float32)


def _stream_one_row(layer, split, x_ref, xs_ref, v_ref, s_ref, m_ref, o_ref, cols, *, fmt, group, step,
                    n_steps, transposed=False, native=False):
  """`_stream` for a single row of x and quantized W, on the CUDA cores instead of a dot: each step's codes
  become float32 in registers (integer codes through `code_decode`, fp8 by conversion) and are multiplied
  by x into a [step, bn] accumulator, reduced once at the end. A dot would pad x to 16 rows and take its
  operand through shared memory after the decode, which held every format near bf16's time (NOTES.md)."""
  assert not transposed, "transposed weights take the dot (weight_matmuls keeps them off this path)"
  f32 = jnp.float32
  x_cols0 = split * n_steps * step

  def load_x(start, width):  # [width, 1] float32 of x's only row
    return x_ref[0, pl.ds(x_cols0 + start, width)].astype(f32)[:, None]

  def group_rows(ref, i):  # [1, bn] float32: group i of this split (scales or offsets)
    return _param_row(ref, layer, split * n_steps + i, cols)

  def body(i, carry):
    acc, offs = carry
    if fmt == "int4":
      half = group // 2
      packed = v_ref[layer, pl.ds(split * n_steps * half + i * half, half), cols]  # [g/2, bn] uint8
      zero = 8 if m_ref is None else 0
      x_lo, x_hi = load_x(i * group, half), load_x(i * group + half, half)
      lo, hi = code_decode.int4_codes_f32(packed, zero, native)
      part = lo * x_lo + hi * x_hi  # [g/2, bn]
      acc = acc + part * group_rows(s_ref, i)
      if m_ref is not None:
        offs = offs + xs_ref[0, split * n_steps + i] * group_rows(m_ref, i)
      return acc, offs
    w = v_ref[layer, pl.ds(split * n_steps * step + i * step, step), cols]  # [step, bn]
    if fmt == "int8":
      w = code_decode.int8_codes_f32(w, native)
    else:
      w = w.astype(f32)
    part = w * load_x(i * step, step)
    if group is not None:
      part = part * group_rows(s_ref, i)
    return acc + part, offs

  rows = group // 2 if fmt == "int4" else step
  _, bn = o_ref.shape
  acc, offs = lax.fori_loop(0, n_steps, body, (jnp.zeros((rows, bn), f32), jnp.zeros((1, bn), f32)))
  out = jnp.sum(acc, axis=0, keepdims=True) + offs  # [1, bn]
  if s_ref is not None and group is None:
    out = out * _param_row(s_ref, layer, 0, cols)  # per column
  o_ref[...] = out


def _load_rows(ref, mp: int, cols):
  """[mp, width] of a [M, .] ref at `cols`; rows past M load as zeros (no padded copy)."""
  idx = ref.at[pl.ds(0, mp), cols]
  m = ref.shape[0]
  if m == mp:
    return pltriton.load(idx)
  rows = lax.broadcasted_iota(jnp.int32, idx.shape, 0)
  return pltriton.load(idx, mask=rows < m, other=0)


def _stream(layer, split, x_ref, xs_ref, v_ref, s_ref, m_ref, o_ref, cols, *, fmt, group, step, n_steps,
            transposed, native):
  """x[:, split's columns] @ W[layer, split's rows, cols] -> o [Mp, bn] float32, streaming W once.
  x [M, K] is read whole-ref: rows past M load as zeros (no padded copy of x). `transposed`: W stored
  [N, K(/2)] (contraction last; scales [N, K/g or 1]), its tiles [bn, step] taken into the dot transposed.
  `xs_ref` [M, K/g]: x's sum over each group (int4 with offsets: offset times the group's sum of x).
  (Program ids are read by the caller: interpret mode does not see them inside a `pl.when` branch.)"""
  mp, bn = o_ref.shape
  cdt = _codes_dtype(fmt, x_ref.dtype)  # the dot's operand dtype
  x_cols0 = split * n_steps * step

  def load_x(start, width):  # [Mp, width] of x from column x_cols0 + start
    return _load_rows(x_ref, mp, pl.ds(x_cols0 + start, width))
  rows_per_split = n_steps * (step // 2 if fmt == "int4" else step)  # value rows of W per split

  def group_rows(ref, i):  # [1, bn] float32: group i of this split (scales or offsets)
    return _param_row(ref, layer, split * n_steps + i, cols, transposed)

  def tile(start, size):  # the weight's [size, bn] rows of K (transposed: its [bn, size] block)
    if transposed:
      return v_ref[layer, cols, pl.ds(start, size)]
    return v_ref[layer, pl.ds(start, size), cols]

  def dot(a, w):
    return pltriton.dot(a, w, trans_b=transposed)

  def body(i, acc):
    if fmt == "int4":
      half = group // 2
      packed = tile(split * rows_per_split + i * half, half)  # [g/2, bn] uint8 (transposed: [bn, g/2])
      lo, hi = _int4_operands(packed, cdt, symmetric=m_ref is None, native=native)
      x_lo = load_x(i * group, half)  # [Mp, g/2]
      x_hi = load_x(i * group + half, half)
      part = dot(x_lo.astype(cdt), lo) + dot(x_hi.astype(cdt), hi)  # [Mp, bn] f32
      part = part * group_rows(s_ref, i)
      if m_ref is not None:
        part = part + _load_rows(xs_ref, mp, pl.ds(split * n_steps + i, 1)) * group_rows(m_ref, i)
      return acc + part
    w = tile(split * rows_per_split + i * step, step)  # [step, bn] (transposed: [bn, step])
    if fmt != "plain":
      w = _code_operand(w, cdt, native)
    part = dot(load_x(i * step, step).astype(cdt), w)
    if group is not None:
      part = part * group_rows(s_ref, i)
    return acc + part

  acc = lax.fori_loop(0, n_steps, body, jnp.zeros((mp, bn), jnp.float32))
  if s_ref is not None and group is None:
    acc = acc * _param_row(s_ref, layer, 0, cols, transposed)  # per column
  o_ref[...] = acc


def _kernel(layer_ref, x_ref, *refs, parts, block_n, group_sums, **stream):
  """One program: column block j of the concatenated parts' outputs, split s of K.

  `parts` holds, per weight, (first column block, end column block, has scales, has offsets); the
  weight-side refs are whole (stacked) arrays, indexed here by layer, rows and columns. The program
  streams the one part its column block falls in (a static branch per part). `group_sums`: the first of
  `refs` is x's sum over each group [M, K/g] (for offsets)."""
  o_ref = refs[-1]
  xs_ref, refs = (refs[0], refs[1:]) if group_sums else (None, refs)
  layer = layer_ref[0]
  j, split = pl.program_id(0), pl.program_id(1)
  k = 0
  for first, end, has_s, has_m in parts:
    v_ref = refs[k]
    s_ref = refs[k + 1] if has_s else None
    m_ref = refs[k + 1 + has_s] if has_m else None
    k += 1 + has_s + has_m
    cols = pl.ds(pl.multiple_of((j - first) * block_n, block_n), block_n)
    stream_fn = _stream_one_row if o_ref.shape[0] == 1 else _stream  # one output row: see _uses_cuda_cores
    if len(parts) == 1:
      stream_fn(layer, split, x_ref, xs_ref, v_ref, s_ref, m_ref, o_ref, cols, **stream)
    else:
      pl.when((j >= first) & (j < end))(
          functools.partial(stream_fn, layer, split, x_ref, xs_ref, v_ref, s_ref, m_ref, o_ref, cols, **stream))


def _stacked(a, ndim: int):
  """A weight-side array with its layer axis (a single layer gets one of size 1)."""
  return a if a is None or a.ndim == ndim + 1 else a[None]


def _check_part(x, fmt, g, values, scales, offsets, transposed=False):
  """One weight's arrays, with their layer axis, after checking them against x and the format."""
  M, K = x.shape
  values = _stacked(values, 2)
  N = values.shape[1 if transposed else -1]
  k_axis = 2 if transposed else 1
  if values.ndim != 3 or values.shape[k_axis] != (K // 2 if fmt == "int4" else K):
    raise ValueError(f"{fmt} values of shape {values.shape} do not match x of shape {x.shape}"
                     f"{' (transposed: [L, N, K])' if transposed else ''}")
  if fmt == "plain":
    if scales is not None or offsets is not None or g is not None:
      raise ValueError("plain weights take no scales, offsets or group size")
    if values.dtype != x.dtype:
      raise ValueError(f"plain weights must have the activations' dtype {x.dtype}, got {values.dtype}")
  else:
    scales = _stacked(scales, 2)
    want = (values.shape[0], N, K // g if g else 1) if transposed else (values.shape[0], K // g if g else 1, N)
    if scales is None or scales.shape != want:
      raise ValueError(f"scales have shape {None if scales is None else scales.shape}, expected {want}")
  offsets = _stacked(offsets, 2)
  if offsets is not None and (fmt != "int4" or offsets.shape != scales.shape):
    raise ValueError("offsets are for int4 only and must have the scales' shape")
  if not supports(M, K, N, fmt, g):
    raise ValueError(f"unsupported weight_matmul shape: M={M}, K={K}, N={N}, {fmt}, group {g}")
  return values, scales, offsets


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "transposed", "block_n", "num_splits", "step",
                                             "num_warps", "num_stages", "interpret"))
def weight_matmuls(
    x: jax.Array,  # [M, K] bf16 / f16 / f32
    weights: tuple,  # per weight (values, scales, offsets): see `weight_matmul`; one format for all
    layer: jax.Array | int | None = None,  # which layer of stacked arrays (int32 scalar)
    *,
    fmt: str,
    group_size: int | None,
    transposed: bool = False,  # weights stored [(L,) N, K(/2)] (contraction last), scales [(L,) N, K/g or 1]
    block_n: int | None = None,
    num_splits: int | None = None,
    step: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> tuple:  # per weight: [M, N_i] float32
  """x @ dequantize(W_i[layer]) for several weights sharing x and K, in one launch (the q/k/v or
  gate/up products of a layer: fewer launches, and the narrow ones ride along the wide one's grid)."""
  M, K = x.shape
  g = group_size
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
  if not weights:
    raise ValueError("weight_matmuls needs at least one weight")
  weights = [_check_part(x, fmt, g, *w, transposed=transposed) for w in weights]
  widths = [w[0].shape[1 if transposed else -1] for w in weights]
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  bn, splits, stp = plan(K, sum(widths), fmt, g, M)
  if any(n % bn for n in widths):
    bn = min(_block_n(n, M, fmt) for n in widths)
  bn, splits = block_n or bn, num_splits or splits
  if g is not None:
    stp = g
  elif step is not None or num_splits is not None:
    stp = min(step or _BLOCK_K, K // splits)
  ks = K // splits
  if K % splits or ks % stp or any(n % bn for n in widths):
    raise ValueError(f"block_n={bn}, splits={splits}, step={stp} do not tile K={K}, N={widths}")
  mp = 1 if _uses_cuda_cores(M, fmt) and not transposed else max(MIN_DOT_ROWS, next_pow2(M))
  layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
  # Offsets add offset * (x's sum over the group): the sums once here, not reduced across threads per program.
  has_offsets = any(w[2] is not None for w in weights)
  sums = [jnp.sum(x.astype(jnp.float32).reshape(M, K // g, g), axis=-1)] if has_offsets else []  # [M, K/g]
  parts, first, arrays = [], 0, list(sums)
  for (v, sc, off), n in zip(weights, widths):
    parts.append((first, first + n // bn, sc is not None, off is not None))
    first += n // bn
    arrays += [a for a in (v, sc, off) if a is not None]
  kernel = functools.partial(_kernel, parts=tuple(parts), block_n=bn, group_sums=has_offsets, fmt=fmt, group=g,
                             step=stp, n_steps=ks // stp, transposed=transposed,
                             native=not interpret and code_decode.INLINE_PTX)
  partials = pl.pallas_call(
      kernel,
      grid=(first, splits),
      in_specs=[pl.no_block_spec] * (2 + len(arrays)),
      out_specs=pl.BlockSpec((None, mp, bn), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((splits, mp, sum(widths)), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps or _tiling(fmt)[1],
                                              num_stages=num_stages or _STAGES),
      interpret=interpret,
      name=f"weight_matmul_{fmt}",
  )(layer, x, *arrays)
  out = (partials[0] if splits == 1 else jnp.sum(partials, axis=0))[:M]
  starts = [sum(widths[:i]) for i in range(len(widths))]
  return tuple(out[:, a:a + n] for a, n in zip(starts, widths))


def weight_matmul(x, values, scales=None, offsets=None, layer=None, *, fmt: str, group_size: int | None,
                  **options) -> jax.Array:
  """x [M, K] @ dequantize(W[layer]) -> [M, N] float32, W given by `values` [(L,) K(/2), N] (with
  `transposed=True`: [(L,) N, K(/2)]), `scales` [(L,) K/g or 1, N] (transposed: [(L,) N, K/g or 1]; None
  for plain), `offsets` (int4 asymmetric only). `options`: transposed, block_n,
  num_splits, step, num_warps, num_stages (tuning), interpret (None: unless the backend is a GPU)."""
  return weight_matmuls(x, ((values, scales, offsets),), layer, fmt=fmt, group_size=group_size, **options)[0]


def weight_matmul_reference(x, values, scales=None, offsets=None, layer=None, *, fmt: str,
                            group_size: int | None, transposed: bool = False):
  """Plain jnp: dequantize W[layer] to float32 and multiply (HIGHEST precision). `transposed`: values,
  scales and offsets stored [(L,) N, .]."""
  if values.ndim == 3:
    values, scales, offsets = (None if a is None else a[layer] for a in (values, scales, offsets))
  t = lambda a: a if a is None or transposed else a.T  # noqa: E731  to the [N, .] of dequantize_codes
  w = dequantize_codes(t(values), t(scales), t(offsets), fmt=fmt, group_size=group_size).T
  return jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
