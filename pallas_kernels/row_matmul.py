"""One-row products with weights stored contraction-last, `[(L,) N, K]`, plain or quantized, fused with the
small work around them: the input's RMSNorm before, a residual add or the SwiGLU gate after. Pallas
(Triton lowering), plus a plain-jnp reference. Knows nothing about models or `QArray`s: arrays and static
values.

Why: a batch-1 decode step streams every weight once, and quantized codes only pay off if they stream as
fast as bf16 does. With the contraction axis last every output row's codes are contiguous, so a program
can turn a tile of codes into float32 in registers and multiply-add it with x on the CUDA cores, with no
dot (one row needs none; the dot path dequantized and relaid every tile, which capped int8 / int4 near
half of the copy bandwidth: pallas_kernels/NOTES.md). The small jobs around the product need only the row
of x a program reads anyway (the norm) or its own outputs (the epilogues), so they ride along for free.
Plain bf16 weights work too, but XLA's row reduction reads them ~10 % faster than this kernel (H200), so
`jaxinfer.ops` sends only quantized weights here (benchmarks/BENCHMARKS.md, session 6).

Weight formats (K split into groups of `g` along the contraction; per-channel: one scale per row):
  plain: values bf16/f16 [N, K] (x's dtype); no scales
  int8:  values int8 [N, K];          w = q * s       (s [N, K/g] grouped, or [N, 1] per row)
  fp8:   values float8_e4m3fn [N, K]; w = q * s
  int4:  values uint8 [N, K/2]; within each group byte j holds element j (low nibble) and j + g/2 (high
         nibble); w = (u - 8) * s, or u * s + m with offsets m [N, K/g].

The grid runs over blocks of `block_n` output rows. Internally K is viewed as chunks of `g` elements
(grouped formats) or `block_k` (others), each split into `sub` = 2 (int4: low and high nibbles) or 1
halves: codes as [L, N, chunks, width], x as [chunks, sub, width]. A program loops over `gc` chunks at a
time and, within a step, over its rows one at a time, so every thread holds the same columns of each row
and the (normalised) x of a step is read and converted once for all of them. Codes are decoded exactly in
registers (`code_decode`: inline PTX on the GPU); int4 codes go straight to code * x (one logic op and one
fused multiply-add a code), the zero point taken off once per group as zero * sum(x). Ungrouped formats
accumulate float32 products per row and reduce at the end; grouped ones reduce each group first, scale it
once, and gather the group sums of all rows into one tile, reduced once.

int4 takes integer dot products instead (`DP4A`): x, normalised, is written as a 15-bit fixed-point integer
(a power-of-two scale per group, from its largest |value|) split into two bytes (`_X_BYTES`: or 20 bits in
three), and a 32-bit word's four low (or high) nibbles meet four x bytes in one `dp4a` (four byte products summed
exactly in int32); all rows of a program form one tile, so each byte's sums are reduced once. Fewer instructions
and registers than the float path; the only rounding is x's, to 15 bits of its group's largest |value|
(pallas_kernels/NOTES.md, sessions 17-19). x's fixed point is made once per call by short one-warp programs of
its own (`DP4A_PREPARED_X`; made in every program it cost more than the launch); when x is a decode attention's
output whose key splits are not merged yet (`common.Partials`) and a group is one head, those programs merge the
head's splits first (`MERGE_IN_PREPARATION`: the merge's own launch saved). A normed preparation reads only its own
group: the per-group scale makes the integers independent of the norm's 1 / rms, so each program writes its group's
sum of squares and the product applies 1 / rms to its outputs (`NORM_IN_PRODUCT`). A K longer than one step
(`down`: 14336 = 7 x 2048) is split across programs (`dp4a_splits`), whose float32 partial products are summed
and finished (`_finish`: the epilogue, rounded as the unfused model rounds) outside the kernel.

Parts sharing x (q/k/v) run in one launch, a static branch per part; with `epilogue="swiglu"` one program
reads the same rows of both parts (gate, up) and writes only silu(gate) * up. The norm: every path multiplies
the codes by g * x (float32) and its products by 1 / rms (`NORM_IN_PRODUCT`), so x is not rounded to its dtype
between the norm and the norm weight as the unfused model rounds it (a finer x, not the same bits); products are
rounded to their dtype before an epilogue, as the unfused model rounds them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import code_decode
from pallas_kernels.common import M_INIT, Partials, dequantize_codes, is_pow2, next_pow2

FORMATS = ("plain", "int8", "fp8", "int4")
EPILOGUES = ("none", "residual", "swiglu")
_BLOCK_N = 4  # output rows per program (H200 sweeps over 2-16 rows x 256-4096 columns: BENCHMARKS.md)
_BLOCK_N_ONE_STEP = 8  # when the whole K is one step, for these formats (H200, session 8: 3-10 % faster than 4)
_BLOCK_N_DP4A = 8  # int4 by integer dot products (H200, session 18: x made once per call, 8 rows 2.092 ms a step
# against 16 rows' 2.139; with x made in every program 16 rows had won, 2.297 against 2.408)
_WARPS_DP4A = 4
_ONE_STEP_FORMATS = ("int8", "int4", "fp8")
_BLOCK_K = 4096  # K elements per loop step (the largest power of two dividing K, up to this)
_WARPS = 4
_UNROLLED_FORMATS = ("fp8",)  # K loop unrolled (H200 S8-10: fp8 down 19.9 vs 24.2 us; int8 equal, int4 slower)
_STAGES = 1  # loads that feed no dot are not pipelined: more stages changed nothing (H200 sweep)
DP4A = True  # int4 in one K step by integer dot products (H200, session 17: int4 batch-1 step 1.037x the float path)
DP4A_SPLIT_K = True  # int4 over a longer K (or K / g not a power of two) by integer dot products too, K split
_DP4A_MAX_K = 4096  # K elements one dp4a program takes at most (a power of two); longer K is split across programs
DP4A_PREPARED_X = True  # x's fixed point made once per call by a launch of its own (H200, session 18: 1.095x step)
_PREPARE_GROUPS = 1  # groups per program of x's preparation (each with its own scale)
_PREPARE_WARPS = 1
MERGE_IN_PREPARATION = True  # x given as attention partials: merged by x's preparation where it makes one
# x's preparation merging attention partials: warps a program (H200, S20-4: 2.7 us a launch at 1, 3.0 at 2, 3.6 at 4)
_PREPARE_PARTIALS_WARPS = 1
_X_BYTES = 2  # bytes of x's fixed point: 2 (below 2^15 in magnitude, the high byte signed) or 3 (below 2^20, the high
# byte in [-16, 16]). Two are a third fewer x words to load and dp4a to issue, at x rounded to 2^-15 of its group's
# largest |value| instead of 2^-20 (products within 1e-4 of float64, 1e-3 beside a 300x outlier; bf16 outputs round
# at 4e-3). H200, session 19: the int4 step 1.977 ms against 2.091 with three (gate+up 18.1 against 20.2 us)
_X_BITS = {3: 20, 2: 15}  # x's magnitude bits by its bytes
# The norm's 1 / rms applied to a normed product's outputs, not to x: int4's preparation then reads only its own group
# (the fixed point's per-group scale makes the integers independent of 1 / rms) and writes the group's sum of squares
# beside its terms, which the product sums; the float path multiplies its codes by g * x and its outputs by 1 / rms.
# x is then not rounded to its dtype between the norm and the norm weight (the unfused model's rounding, which needs
# 1 / rms): a finer x, not the same bits.
NORM_IN_PRODUCT = True  # H200 S22-7, same process: int4 batch-1 step 1.891 against 1.952 ms; int8 device time equal


def _pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two <= cap dividing n."""
  b = 1
  while b * 2 <= cap and n % (b * 2) == 0:
    b *= 2
  return b


def plan(k: int, widths, fmt: str = "plain", group: int | None = None, block_n: int | None = None,
         block_k: int | None = None) -> tuple[int, int, int] | None:
  """(block_n, chunk, chunks per step) tiling every part's N and K with powers of two, or None.

  chunk: K elements per scale group (grouped formats) or per step (others). Default block_n: _BLOCK_N, or
  _BLOCK_N_ONE_STEP for _ONE_STEP_FORMATS when one step covers K."""
  if fmt not in FORMATS or not widths or any(n < 1 for n in widths):
    return None
  bk = block_k or _BLOCK_K
  if not is_pow2(bk) or (block_n is not None and not is_pow2(block_n)):
    return None
  if group is None:
    if fmt == "int4":
      return None
    chunk = block_k or _pow2_divisor(k, _BLOCK_K)
    if chunk < 16 or k % chunk:
      return None
    gc = 1
  else:
    if not is_pow2(group) or group < 32 or k % group or (fmt == "plain"):
      return None
    chunk, gc = group, _pow2_divisor(k // group, max(1, bk // group))
  if dp4a_splits(k, fmt, group, block_k) is not None:
    cap = _BLOCK_N_DP4A
  elif fmt in _ONE_STEP_FORMATS and chunk * gc == k:
    cap = _BLOCK_N_ONE_STEP
  else:
    cap = _BLOCK_N
  bn = block_n or min(_pow2_divisor(n, cap) for n in widths)
  if any(n % bn for n in widths):
    return None
  return bn, chunk, gc


def dp4a_splits(k: int, fmt: str, group: int | None, block_k: int | None = None) -> int | None:
  """How many programs share each row block's K on the integer (dp4a) path, or None when it does not apply:
  each takes a power-of-two number of whole groups, at most `block_k` (default `_DP4A_MAX_K`) elements in one
  step; more than one only with `DP4A_SPLIT_K` (their float32 partials are summed outside the kernel)."""
  if fmt != "int4" or group is None or not DP4A or not is_pow2(group) or group < 32 or k % group:
    return None
  groups = k // group
  splits = groups // _pow2_divisor(groups, max(1, (block_k or _DP4A_MAX_K) // group))
  return splits if splits == 1 or DP4A_SPLIT_K else None


def supports(k: int, widths, fmt: str = "plain", group: int | None = None) -> bool:
  """Whether `row_matmuls` handles these static shapes (callers fall back to XLA otherwise)."""
  return plan(k, widths, fmt, group) is not None


def _kernel(layer_ref, x_ref, *refs, parts, fmt, grouped, offsets, norm: bool, eps: float, epilogue: str,
            block_n: int, gc: int, product_dtype, native: bool, dp4a: bool, splits: int, prepared: bool):
  """One program: output rows [j * block_n, (j + 1) * block_n) of the part its block falls in.

  refs: (norm weight [L, chunks, sub, width] if norm), per part the codes [L, N, chunks, width] and (if
  quantized) scales [L, N, chunks or 1] and (if offsets) offsets [L, N, chunks], (residual [1, N] if
  residual), then the outputs [1, N_i] (one output for swiglu). With `dp4a`: x [1, G, 2, g/32, 4, 4] and the
  norm weight [L, G, 2, g/32, 4, 4] (group, half, word, byte), the codes int32 words [L, N, G, g/32, 4]; with
  `prepared`, x is `_prepare_kernel`'s words and its terms come first in refs (no norm weight). With `splits` > 1
  the outputs are every part's float32 partial products [splits, N_i], no epilogue."""
  f32 = jnp.float32
  refs = list(refs)
  terms_ref = refs.pop(0) if prepared else None
  norm_ref = refs.pop(0) if norm else None
  quantized = fmt != "plain"
  n_parts = 2 if epilogue == "swiglu" else len(parts)
  w_refs = []
  for _ in range(n_parts):
    v = refs.pop(0)
    s = refs.pop(0) if quantized else None
    m = refs.pop(0) if offsets else None
    w_refs.append((v, s, m))
  res_ref = refs.pop(0) if epilogue == "residual" else None
  o_refs = refs
  layer = layer_ref[0]
  j = pl.program_id(0)  # read here: interpret mode does not see program ids inside a pl.when branch
  if dp4a:
    split = pl.program_id(1) if splits > 1 else 0
    _dp4a_kernel(layer, j, split, x_ref, norm_ref, w_refs, res_ref, o_refs, parts=parts, norm=norm, eps=eps,
                 epilogue=epilogue, block_n=block_n, splits=splits, product_dtype=product_dtype, native=native,
                 terms_ref=terms_ref)
    return
  chunks, sub, width = x_ref.shape
  n_steps = chunks // gc
  dt = x_ref.dtype

  inv_rms = None
  if norm:  # (first, also with NORM_IN_PRODUCT: after the products it kept x live, int8 gate+up 96 -> 128 registers)
    def squares(c, acc):
      for h in range(sub):
        xc = x_ref[pl.ds(c * gc, gc), h, :].astype(f32)
        acc = acc + xc * xc
      return acc
    ss = lax.fori_loop(0, n_steps, squares, jnp.zeros((gc, width), f32))
    inv_rms = lax.rsqrt(jnp.sum(ss) / (chunks * sub * width) + eps)
  late_norm = norm and NORM_IN_PRODUCT  # the products of g * x, scaled by 1 / rms at the end

  def x_chunks(c):  # per half: [gc, width] float32 of the (normalised) row
    out = []
    for h in range(sub):
      xc = x_ref[pl.ds(c * gc, gc), h, :]
      if norm:
        g = norm_ref[layer, pl.ds(c * gc, gc), h, :]
        if late_norm:
          out.append(g.astype(f32) * xc.astype(f32))
          continue
        xn = (xc.astype(f32) * inv_rms).astype(dt)
        xc = (g.astype(f32) * xn.astype(f32)).astype(jnp.promote_types(g.dtype, dt))
      out.append(xc.astype(f32))
    return out

  def product_tile(v_ref, s_ref, m_ref, row, c, xs, x_sums):
    """[gc, width] scaled products of one output row at this step, and its [gc] offset terms (or None).
    `x_sums` [gc]: x's sum over each group of the step (int4: the zero point's and the offsets' term)."""
    steps = pl.ds(c * gc, gc)
    w = v_ref[layer, row, steps, :]
    zero = 0
    if fmt == "int4":  # code * x in one step; the zero point once per group below
      products = list(code_decode.int4_code_products(w, xs[0], xs[1], native))
      zero = 0 if m_ref is not None else 8
    elif fmt == "int8":
      products = [code_decode.int8_codes_f32(w, native) * xs[0]]
    else:
      products = [w.astype(f32) * xs[0]]
    off = None
    if not grouped:
      return products[0], off
    # a group's sum first, then its scale: one multiply per group, and the sums' adds fuse with the products
    t = sum(jnp.sum(p, axis=1) for p in products)
    if zero:
      t = t - zero * x_sums
    t = t * s_ref[layer, row, steps].astype(f32)
    if m_ref is not None:
      off = m_ref[layer, row, steps].astype(f32) * x_sums
    return t, off

  def stream(w_list, first):  # float32 [block_n] products of each part in w_list at this program's rows
    """One row at a time within a step: each thread then holds the same columns of every row, so the row
    of x (and its norm) is loaded and converted once per step, not once per row."""
    row0 = pl.multiple_of((j - first) * block_n, block_n)
    rows = pl.ds(row0, block_n)

    def tiles(c):  # per part, per row: (products, offset terms)
      xs = x_chunks(c)
      x_sums = sum(jnp.sum(x, axis=1) for x in xs) if fmt == "int4" else None  # once for every row and part
      return tuple(tuple(product_tile(v_ref, s_ref, m_ref, row0 + r, c, xs, x_sums) for r in range(block_n))
                   for v_ref, s_ref, m_ref in w_list)

    def add_step(c, acc):
      return jax.tree.map(jnp.add, acc, tiles(c))

    # The first step starts the sums (no zeros to add: the final reduction's adds then fuse with the products)
    carry = tiles(0)
    if fmt in _UNROLLED_FORMATS:  # K steps unrolled: the loads of later steps may issue before earlier sums
      for c in range(1, n_steps):
        carry = add_step(c, carry)
    else:
      carry = lax.fori_loop(1, n_steps, add_step, carry)
    which = lax.broadcasted_iota(jnp.int32, (block_n,), 0)
    outs = []
    for per_row, (_, s_ref, m_ref) in zip(carry, w_list):
      if grouped:  # [gc] group sums per row: gathered into one [block_n, gc] tile, one reduction for all rows
        tile = jnp.zeros((block_n, gc), f32)
        for r, (acc, offs) in enumerate(per_row):
          tile = jnp.where(which[:, None] == r, (acc if offs is None else acc + offs)[None, :], tile)
        out = jnp.sum(tile, axis=1)
      else:
        out = jnp.zeros((block_n,), f32)
        for r, (acc, _) in enumerate(per_row):
          out = jnp.where(which == r, jnp.sum(jnp.sum(acc, axis=1), axis=0), out)
      if quantized and not grouped:  # one scale per row
        out = out * jnp.sum(s_ref[layer, rows, pl.ds(0, 1)].astype(f32), axis=1)
      outs.append(out)
    if late_norm:
      outs = [out * inv_rms for out in outs]
    return outs, rows

  _epilogues(stream, w_refs, res_ref, o_refs, parts, epilogue, product_dtype, j)


def _epilogues(stream, w_refs, res_ref, o_refs, parts, epilogue, product_dtype, j):
  """Each part's products (`stream(w_list, first) -> ([block_n] float32 per part, rows)`) to its output, through
  the epilogue: silu(gate) * up, or + the residual, rounded as the unfused model rounds."""
  f32 = jnp.float32
  if epilogue == "swiglu":
    (g, u), rows = stream(w_refs, 0)
    o_ref = o_refs[0]
    g, u = g.astype(product_dtype).astype(f32), u.astype(product_dtype).astype(f32)
    silu = (g * jax.nn.sigmoid(g)).astype(o_ref.dtype).astype(f32)
    o_ref[0, rows] = (silu * u).astype(o_ref.dtype)
    return

  def part(w, o_ref, first):
    (acc,), rows = stream([w], first)
    out = acc.astype(product_dtype)
    if res_ref is not None:
      out = (out.astype(f32) + res_ref[0, rows].astype(f32)).astype(o_ref.dtype)
    o_ref[0, rows] = out

  if len(parts) == 1:
    part(w_refs[0], o_refs[0], 0)
    return
  for (first, end), w, o_ref in zip(parts, w_refs, o_refs):
    pl.when((j >= first) & (j < end))(functools.partial(part, w, o_ref, first))


def _x_halves(x_ref, norm_ref, layer, groups, *, norm, eps, late_norm=False):
  """x's two halves of `groups` as [1, groups, g/32, 4, 4] float32, normalised as the unfused model does (the norm
  over the whole row); with `late_norm` (`NORM_IN_PRODUCT`), x times the norm weight only, in float32, the norm's
  1 / rms left to the caller."""
  f32 = jnp.float32
  dt = x_ref.dtype
  inv_rms = _x_inv_rms(x_ref, eps) if norm and not late_norm else None

  def half(h):  # [1, groups, g/32, 4, 4] float32: x's half h of these groups
    xc = x_ref[:, groups, h, :, :, :]
    if norm:
      g = norm_ref[pl.ds(layer, 1), groups, h, :, :, :]
      if late_norm:
        return g.astype(f32) * xc.astype(f32)
      xn = (xc.astype(f32) * inv_rms).astype(dt)
      xc = (g.astype(f32) * xn.astype(f32)).astype(jnp.promote_types(g.dtype, dt))
    return xc.astype(f32)

  return [half(h) for h in range(2)]


def _x_squares(x_ref, groups):
  """x's squares at `groups` of x [1, G, 2, g/32, 4, 4], the two halves added: [1, groups, g/32, 4, 4] float32.
  Adding the halves first and then summing the group axis before the rest took a one-warp preparation program from
  952 to 672 instructions against a sum over all axes at once per half (offline SASS, `benchmarks/sass_count.py`)."""
  return sum(x_ref[:, groups, h, :, :, :].astype(jnp.float32) ** 2 for h in range(2))


def _x_inv_rms(x_ref, eps):
  """1 / rms of the whole row x [1, G, 2, g/32, 4, 4]."""
  return lax.rsqrt(jnp.sum(jnp.sum(_x_squares(x_ref, slice(None)), axis=1)) / x_ref.size + eps)


def _x_fixed_point(xs):
  """x's halves `xs` (`_x_halves`) as a 15- or 20-bit fixed-point integer: per half, per byte (high first;
  `_X_BYTES` of them) [1, groups, g/32, 4] int32 words of four x bytes; x's integer sum per group [1, groups] (the
  zero point's and offsets' term); and 1 / the scale (a power of two)."""
  f32 = jnp.float32
  amax = jnp.maximum(jnp.max(jnp.abs(xs[0])), jnp.max(jnp.abs(xs[1])))
  # scale = 2^(bits - 1 - e) for amax in [2^e, 2^(e + 1)), so |x| * scale < 2^bits (exponent bits: no log)
  n_bytes = _X_BYTES
  bits = _X_BITS[n_bytes]
  e = lax.shift_right_logical(lax.bitcast_convert_type(amax, jnp.int32), 23) - 127
  scale = lax.bitcast_convert_type(lax.shift_left(jnp.clip(127 + bits - 1 - e, 1, 254), 23), f32)
  scale = jnp.where(amax > 0, scale, 1.0)
  # x not finite: a NaN scale makes the outputs NaN, as the float path's are (the integers would be finite)
  scale = jnp.where(amax < jnp.inf, scale, jnp.nan)
  words, v_sum = [], None
  for xh in xs:
    v = jnp.floor(xh * scale + 0.5).astype(jnp.int32)
    if n_bytes == 2:  # |x| * scale rounds up to 2^15 at most: kept inside the signed high byte
      v = jnp.clip(v, -(2**bits) + 1, 2**bits - 1)
    at = lax.broadcasted_iota(jnp.int32, v.shape, 4) * 8
    words.append([jnp.sum(lax.shift_left(lax.shift_right_arithmetic(v, 8 * (n_bytes - 1 - b)) & 0xFF, at), axis=4)
                  for b in range(n_bytes)])
    half_sum = jnp.sum(jnp.sum(jnp.sum(v, axis=4), axis=3), axis=2)
    v_sum = half_sum if v_sum is None else v_sum + half_sum
  return words, v_sum.astype(f32), 1.0 / scale


def _groups(split, splits: int, n_groups: int):
  """The `split`-th of `splits` runs of `n_groups` groups (a static start when there is one run)."""
  return pl.ds(pl.multiple_of(split * n_groups, n_groups) if splits > 1 else 0, n_groups)


def _store_prepared(words_ref, terms_ref, groups, words, v_sum, inv, squares=None):
  """One program's share of the preparation's outputs: words [2 B, G, g/32, 4] (half * B + byte, B = `_X_BYTES`)
  and terms [2, G] (x's integer group sums, 1 / scale) at `groups`; [3, G] with x's group sums of squares
  (`squares`, `NORM_IN_PRODUCT`)."""
  for h in range(2):
    for b, word in enumerate(words[h]):
      words_ref[pl.ds(len(words[h]) * h + b, 1), groups, :, :] = word
  terms_ref[pl.ds(0, 1), groups] = v_sum
  terms_ref[pl.ds(1, 1), groups] = jnp.broadcast_to(inv, v_sum.shape)
  if squares is not None:
    terms_ref[pl.ds(2, 1), groups] = squares


def _prepare_kernel(layer_ref, x_ref, *refs, norm: bool, eps: float, n_groups: int):
  """x's fixed point (`_x_fixed_point`) into words and terms (`_store_prepared`), read by every program of the
  product (`prepared`). Each program takes `n_groups` groups with a scale of their own: short programs with no
  cross-warp reductions at one warp, and a finer scale than one per row. Normed, with terms of three rows
  (`NORM_IN_PRODUCT`): g * x and the groups' sums of squares, the whole row's 1 / rms left to the product (672 -> 240
  instructions a program, H200 S22-5: 2.47 -> 1.84 us a launch); else x normalised over the whole row here."""
  refs = list(refs)
  norm_ref = refs.pop(0) if norm else None
  words_ref, terms_ref = refs
  programs = x_ref.shape[1] // n_groups
  groups = _groups(pl.program_id(0), programs, n_groups)  # (static when there is one program)
  late_norm = norm and terms_ref.shape[0] == 3  # NORM_IN_PRODUCT: the norm's 1 / rms left to the product
  xs = _x_halves(x_ref, norm_ref, layer_ref[0], groups, norm=norm, eps=eps, late_norm=late_norm)
  squares = None
  if late_norm:  # [1, groups]
    squares = jnp.sum(jnp.sum(jnp.sum(_x_squares(x_ref, groups), axis=4), axis=3), axis=2)
  _store_prepared(words_ref, terms_ref, groups, *_x_fixed_point(xs), squares=squares)


def _prepare_partials_kernel(o_ref, m_ref, l_ref, words_ref, terms_ref, *, dtype):
  """`_prepare_kernel` for x given as a split-K attention's partials, one group = one query head a program: the
  head's splits merged as `combine_splits` merges them (rounded to `dtype`), then the fixed point. o [K, S, G, 2,
  g/32, 4, 4], m and l [K, S, G] (one row's): saves the merge's own launch (decode attention's second)."""
  f32 = jnp.float32
  _, splits, group = m_ref.shape
  head = pl.program_id(0)
  kv, r = head // group, head % group
  padded = next_pow2(splits)
  ok = jnp.arange(padded) < splits
  span = pl.ds(0, padded)
  m = pltriton.load(m_ref.at[kv, span, r], mask=ok, other=M_INIT)
  w = jnp.exp2(m - jnp.max(m))  # empty splits (m == M_INIT, l == 0) weigh nothing
  l_sum = jnp.sum(pltriton.load(l_ref.at[kv, span, r], mask=ok, other=0.0) * w)
  xs = []
  for h in range(2):
    o = pltriton.load(o_ref.at[kv, span, r, jnp.int32(h)], mask=ok[:, None, None, None], other=0.0)  # [S, g/32, 4, 4]
    x = jnp.sum(o * w[:, None, None, None], axis=0) / jnp.where(l_sum > 0, l_sum, 1.0)  # no key -> zeros
    xs.append(x.astype(dtype).astype(f32)[None, None])
  _store_prepared(words_ref, terms_ref, pl.ds(head, 1), *_x_fixed_point(xs))


def _preparation_call(kernel, programs: int, n_inputs: int, G: int, group: int, warps: int, name: str, interpret,
                      terms: int = 2):
  """The pallas_call of a launch making x's fixed point (`_prepare_kernel`, `_prepare_partials_kernel`): `programs`
  programs over whole inputs, writing words [2 B, G, g/32, 4] int32 and terms [`terms`, G] float32."""
  return pl.pallas_call(
      kernel,
      grid=(programs,),
      in_specs=[pl.no_block_spec] * n_inputs,
      out_specs=[pl.no_block_spec] * 2,
      out_shape=[jax.ShapeDtypeStruct((2 * _X_BYTES, G, group // 32, 4), jnp.int32),
                 jax.ShapeDtypeStruct((terms, G), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1),
      interpret=interpret,
      name=name,
  )


def _dp4a_kernel(layer, j, split, x_ref, norm_ref, w_refs, res_ref, o_refs, *, parts, norm, eps, epilogue, block_n,
                 splits, product_dtype, native, terms_ref=None):
  """int4 by integer dot products (module docstring): x's fixed point made once per program (or, with `terms_ref`,
  read from `_prepare_kernel`'s words in `x_ref`), then per part all `block_n` rows as one
  [block_n, groups, g/32, 4] tile of code words. With `splits` > 1 the program takes the `split`-th of `splits`
  equal runs of groups and writes float32 partial products (`_write_partials`)."""
  f32 = jnp.float32
  n_groups = (terms_ref.shape[1] if terms_ref is not None else x_ref.shape[1]) // splits
  groups = _groups(split, splits, n_groups)
  inv_rms = None
  if terms_ref is None:
    late_norm = norm and NORM_IN_PRODUCT
    words, v_sum, inv = _x_fixed_point(_x_halves(x_ref, norm_ref, layer, groups, norm=norm, eps=eps,
                                                 late_norm=late_norm))
    inv_rms = _x_inv_rms(x_ref, eps) if late_norm else None
  else:
    n_bytes = x_ref.shape[0] // 2
    words = [[x_ref[pl.ds(n_bytes * h + b, 1), groups, :, :] for b in range(n_bytes)] for h in range(2)]
    v_sum, inv = terms_ref[pl.ds(0, 1), groups], terms_ref[pl.ds(1, 1), groups]
  if terms_ref is not None and terms_ref.shape[0] == 3:  # NORM_IN_PRODUCT: the norm's 1 / rms, from every group
    G = terms_ref.shape[1]
    inv_rms = lax.rsqrt(jnp.sum(terms_ref[pl.ds(2, 1), :]) / (G * x_ref.shape[2] * 32) + eps)

  def stream(w_list, first):
    row0 = pl.multiple_of((j - first) * block_n, block_n)
    rows = pl.ds(row0, block_n)
    outs = []
    for v_ref, s_ref, m_ref in w_list:
      w = v_ref[layer, rows, groups, :, :]  # byte i of word k of a group: elements 4k + i (low), g/2 + 4k + i (high)
      nibbles = (w & 0x0F0F0F0F, lax.shift_right_logical(w, 4) & 0x0F0F0F0F)
      sums = []
      for b in range(len(words[0])):
        acc = jnp.zeros(w.shape, jnp.int32)
        for h in range(2):
          acc = code_decode.dp4a(nibbles[h], jnp.broadcast_to(words[h][b], w.shape), acc, a_signed=False,
                                 b_signed=b == 0, native=native)
        sums.append(jnp.sum(jnp.sum(acc, axis=3), axis=2).astype(f32))  # [block_n, groups]
      t = sums[0]
      for byte_sum in sums[1:]:
        t = t * 256.0 + byte_sum  # the high byte's sum first: sum over the group of code * x * scale
      if m_ref is None:
        t = t - 8.0 * v_sum
      t = t * s_ref[layer, rows, groups].astype(f32)
      if m_ref is not None:
        t = t + m_ref[layer, rows, groups].astype(f32) * v_sum
      out = jnp.sum(t * inv, axis=1)
      outs.append(out if inv_rms is None else out * inv_rms)
    return outs, rows

  if splits > 1:
    _write_partials(stream, w_refs, o_refs, parts, epilogue, j, split)
  else:
    _epilogues(stream, w_refs, res_ref, o_refs, parts, epilogue, product_dtype, j)


def _write_partials(stream, w_refs, o_refs, parts, epilogue, j, split):
  """Each part's float32 products over this program's share of K into row `split` of its partials [splits, N_i]
  (summed and finished outside the kernel: `_finish`)."""
  def write(w_list, refs, first):
    outs, rows = stream(w_list, first)
    for out, o_ref in zip(outs, refs):
      o_ref[pl.ds(split, 1), rows] = out[None, :]

  if epilogue == "swiglu" or len(parts) == 1:
    write(w_refs, o_refs, 0)
    return
  for (first, end), w, o_ref in zip(parts, w_refs, o_refs):
    pl.when((j >= first) & (j < end))(functools.partial(write, [w], [o_ref], first))


def _finish(prods, epilogue, residual, product_dtype):
  """The epilogue on float32 products [1, N_i], rounded where the unfused model rounds (the products to their
  dtype first): silu(gate) * up, or + the residual (in its dtype), or the products in their dtype."""
  f32 = jnp.float32
  rnd = lambda a: a.astype(product_dtype).astype(f32)  # noqa: E731
  if epilogue == "swiglu":
    g, u = rnd(prods[0]), rnd(prods[1])
    return ((rnd(g * jax.nn.sigmoid(g)) * u).astype(product_dtype),)
  if epilogue == "residual":
    return ((rnd(prods[0]) + residual.astype(f32)).astype(residual.dtype),)
  return tuple(p.astype(product_dtype) for p in prods)


def _stacked(a, ndim: int = 2):
  return a if a is None or a.ndim == ndim + 1 else a[None]


def _check_part(K, dt, fmt, group, values, scales, offsets, layers):
  values, scales, offsets = _stacked(values), _stacked(scales), _stacked(offsets)
  kv = K // 2 if fmt == "int4" else K
  codes = {"plain": (dt,), "int8": (jnp.int8,), "fp8": (jnp.float8_e4m3fn,), "int4": (jnp.uint8,)}[fmt]
  if values.ndim != 3 or values.shape[2] != kv or values.dtype not in codes:
    raise ValueError(f"{fmt} values must be [(L,) N, {kv}] of {jnp.dtype(codes[0]).name}, got {values.shape} "
                     f"{values.dtype}")
  if layers is not None and values.shape[0] != layers:
    raise ValueError(f"every part needs the same layer count, got {values.shape[0]} and {layers}")
  N = values.shape[1]
  if fmt == "plain":
    if scales is not None or offsets is not None:
      raise ValueError("plain weights take no scales or offsets")
  else:
    want = (values.shape[0], N, K // group if group else 1)
    if scales is None or scales.shape != want:
      raise ValueError(f"scales must have shape {want}, got {None if scales is None else scales.shape}")
  if offsets is not None and (fmt != "int4" or offsets.shape != scales.shape):
    raise ValueError("offsets are for int4 only and must have the scales' shape")
  return values, scales, offsets


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "eps", "epilogue", "out_dtype", "block_n",
                                             "block_k", "num_warps", "num_stages", "interpret"))
def row_matmuls(
    x: jax.Array | Partials,  # [1, K] bf16 / f16 / f32, or a split-K attention's partials of one row (K = N * H)
    weights: tuple,  # per part (values, scales, offsets) as in the module docstring, each with a leading layer axis or not
    layer: jax.Array | int | None = None,  # which layer of stacked weights (int32 scalar)
    *,
    fmt: str = "plain",
    group_size: int | None = None,
    norm_weight: jax.Array | None = None,  # [(L,) K]: x is RMS-normalised and scaled by it first
    eps: float = 1e-6,
    epilogue: str = "none",  # "residual": + residual [1, N]; "swiglu": silu(part 0) * part 1
    residual: jax.Array | None = None,
    out_dtype=None,  # the products' dtype, default x's (a residual sum is in the residual's dtype)
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> tuple:  # per part [1, N_i] (swiglu: one [1, N])
  """x @ dequantize(W_i[layer]).T for one row x and weights stored [N_i, K], with the fused prologue and
  epilogue. x given as `Partials` (a decode attention's output before its splits are merged): where x's fixed
  point is prepared by its own launch (int4, dp4a) from groups of one head each, that launch merges them
  (`_prepare_partials_kernel`: one launch fewer); otherwise they are merged first (`combine_splits`)."""
  unmerged = x if isinstance(x, Partials) else None
  if unmerged is not None:
    if unmerged.o.shape[0] != 1:
      raise ValueError(f"row_matmuls takes the partials of one row, got a batch of {unmerged.o.shape[0]}")
    x = jax.ShapeDtypeStruct((1, unmerged.shape[1] * unmerged.shape[2]), unmerged.dtype)
  if x.ndim != 2 or x.shape[0] != 1:
    raise ValueError(f"row_matmuls takes one row x [1, K], got shape {x.shape}")
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
  if epilogue not in EPILOGUES:
    raise ValueError(f"unknown epilogue {epilogue!r}; choose one of {', '.join(EPILOGUES)}")
  if not weights:
    raise ValueError("row_matmuls needs at least one weight")
  K = x.shape[1]
  weights = [w if isinstance(w, tuple) else (w, None, None) for w in weights]
  checked, layers = [], None
  for w in weights:
    checked.append(_check_part(K, x.dtype, fmt, group_size, *w, layers))
    layers = checked[-1][0].shape[0]
  widths = [v.shape[1] for v, _, _ in checked]
  if epilogue == "swiglu" and (len(checked) != 2 or widths[0] != widths[1]):
    raise ValueError(f"swiglu takes two weights of equal width (gate, up), got widths {widths}")
  if epilogue == "residual":
    if len(checked) != 1 or residual is None or residual.shape != (1, widths[0]):
      raise ValueError(f"a residual epilogue takes one weight and a residual [1, N], got {len(checked)} weights, "
                       f"residual {None if residual is None else residual.shape}")
  elif residual is not None:
    raise ValueError("a residual is only taken with epilogue='residual'")
  if norm_weight is not None:
    norm_weight = _stacked(norm_weight, 1)
    if norm_weight.shape[1] != K:
      raise ValueError(f"norm_weight must be [(L,) {K}], got {norm_weight.shape}")
  offsets = checked[0][2] is not None
  if any((m is not None) != offsets for _, _, m in checked):
    raise ValueError("either every part has offsets or none")
  tiles = plan(K, widths, fmt, group_size, block_n, block_k)
  if tiles is None:
    raise ValueError(f"block_n={block_n}, block_k={block_k} do not tile K={K}, N={widths} ({fmt}, group "
                     f"{group_size}) with powers of two")
  bn, chunk, gc = tiles
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  product_dtype = jnp.dtype(out_dtype or x.dtype)
  out_dtype = residual.dtype if epilogue == "residual" else product_dtype

  sub = 2 if fmt == "int4" else 1
  chunks, width = K // chunk, chunk // sub
  splits = dp4a_splits(K, fmt, group_size, block_k)
  dp4a = splits is not None
  splits = splits or 1
  # dp4a: x and the norm weight as (group, half, word, byte), the codes as int32 words of eight (a bitcast)
  x_shape = (1, K // group_size, 2, group_size // 32, 4, 4) if dp4a else (chunks, sub, width)
  layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
  prepared = dp4a and DP4A_PREPARED_X
  merge_in_preparation = (MERGE_IN_PREPARATION and unmerged is not None and prepared and norm_weight is None
                          and group_size == unmerged.o.shape[-1])
  if unmerged is not None and not merge_in_preparation:
    x = unmerged.merge(interpret=interpret).reshape(1, K)
  x = None if merge_in_preparation else x.reshape(x_shape)
  norm_weight = None if norm_weight is None else norm_weight.reshape(-1, *x_shape[int(dp4a):])
  arrays = []
  G = K // group_size if prepared else None
  if merge_in_preparation:  # x's fixed point made from the partials, merged in the same launch
    _, kv_heads, n_splits, group, _ = unmerged.o.shape
    x, terms = _preparation_call(
        functools.partial(_prepare_partials_kernel, dtype=unmerged.dtype), G, 3, G, group_size,
        _PREPARE_PARTIALS_WARPS, "row_matmul_int4_prepare_x_merge", interpret,
    )(unmerged.o.reshape(kv_heads, n_splits, group, 2, group_size // 32, 4, 4), unmerged.m[0], unmerged.l[0])
    arrays.append(terms)
  elif prepared:  # x's fixed point made once per call, by its own launch
    n_groups = _pow2_divisor(G, _PREPARE_GROUPS)
    x, terms = _preparation_call(
        functools.partial(_prepare_kernel, norm=norm_weight is not None, eps=float(eps), n_groups=n_groups),
        G // n_groups, 2 + (norm_weight is not None), G, group_size, _PREPARE_WARPS,
        "row_matmul_int4_prepare_x" + ("_norm" if norm_weight is not None else ""), interpret,
        terms=3 if norm_weight is not None and NORM_IN_PRODUCT else 2,
    )(layer, x, *([] if norm_weight is None else [norm_weight]))
    arrays.append(terms)
  elif norm_weight is not None:
    arrays.append(norm_weight)
  for v, s, m in checked:
    L, N = v.shape[:2]
    if dp4a:
      words = lax.bitcast_convert_type(v.reshape(L, N, K // 8, 4), jnp.int32)
      arrays.append(words.reshape(L, N, K // group_size, group_size // 32, 4))
    else:
      arrays.append(v.reshape(L, N, chunks, width))
    arrays += [a for a in (s, m) if a is not None]
  partials = splits > 1  # the kernel writes float32 partial products; the epilogue runs after their sum
  if epilogue == "residual" and not partials:
    arrays.append(residual)
  out_widths = widths[:1] if epilogue == "swiglu" else widths
  parts, first = [], 0
  for n in out_widths:
    parts.append((first, first + n // bn))
    first += n // bn
  kernel = functools.partial(_kernel, parts=tuple(parts), fmt=fmt, grouped=group_size is not None, offsets=offsets,
                             norm=norm_weight is not None and not prepared, eps=float(eps),
                             epilogue=epilogue if not partials or epilogue == "swiglu" else "none", block_n=bn,
                             gc=gc, product_dtype=product_dtype,
                             native=not interpret and code_decode.INLINE_PTX, dp4a=dp4a, splits=splits,
                             prepared=prepared)
  if partials:
    out_shape = [jax.ShapeDtypeStruct((splits, n), jnp.float32) for n in widths]
  else:
    out_shape = [jax.ShapeDtypeStruct((1, n), out_dtype) for n in out_widths]
  outs = pl.pallas_call(
      kernel,
      grid=(first, splits) if partials else (first,),
      in_specs=[pl.no_block_spec] * (2 + len(arrays)),
      out_specs=[pl.no_block_spec] * len(out_shape),
      out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps or (_WARPS_DP4A if dp4a else _WARPS),
                                              num_stages=num_stages or _STAGES),
      interpret=interpret,
      name=f"row_matmul_{fmt}_{epilogue}" + ("_norm" if norm_weight is not None else "") + ("_split" if partials else ""),
  )(layer, x, *arrays)
  if partials:
    return _finish([jnp.sum(o, axis=0, keepdims=True) for o in outs], epilogue, residual, product_dtype)
  return tuple(outs)


def row_matmuls_reference(x, weights, layer=None, *, fmt="plain", group_size=None, norm_weight=None, eps=1e-6,
                          epilogue="none", residual=None, out_dtype=None):
  """The same in plain jnp: float32 products at HIGHEST precision, rounded where the kernel rounds."""
  f32 = jnp.float32
  dt = x.dtype
  weights = [w if isinstance(w, tuple) else (w, None, None) for w in weights]
  pick = lambda a: None if a is None else (a[0 if layer is None else layer] if a.ndim == 3 else a)  # noqa: E731
  if norm_weight is not None:
    g = norm_weight[0 if layer is None else layer] if norm_weight.ndim == 2 else norm_weight
    xf = x.astype(f32)
    inv_rms = lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if NORM_IN_PRODUCT:  # the products of g * x in float32, scaled by 1 / rms
      x = g.astype(f32) * xf
    else:
      x = (g.astype(f32) * (xf * inv_rms).astype(dt).astype(f32)).astype(jnp.promote_types(g.dtype, dt))
  prods = [jnp.dot(x.astype(f32), dequantize_codes(*map(pick, w), fmt=fmt, group_size=group_size).T,
                   precision=lax.Precision.HIGHEST) for w in weights]
  if norm_weight is not None and NORM_IN_PRODUCT:
    prods = [p * inv_rms for p in prods]
  return _finish(prods, epilogue, residual, jnp.dtype(out_dtype or dt))
