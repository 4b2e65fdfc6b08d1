"""Quantization codes to exact float32 inside a Triton kernel, in as few instructions as the GPU allows.

Why: a batch-1 product over int8 / int4 codes is issue-bound, not memory-bound, when the codes are decoded
the way the Triton lowering spells uint8 arithmetic (byte extract, xor, mask, OR into a float's mantissa,
subtract: about four integer instructions per code before the multiply-add; Nsight Compute and the SASS in
pallas_kernels/NOTES.md). Inline PTX does the same bit trick a 32-bit word at a time: a code set into the
mantissa of 2^23 is the float 2^23 + code, so one byte permute (int8) or one three-input logic op (int4) per
code makes the float, and one subtract (or fused multiply-add) removes the constant, exactly. No
int-to-float conversion instruction (those run at a quarter of the FMA rate).

`int4_code_products` goes one step further for the one-row kernel: with the nibble set where it weighs 1 in
the mantissa of 2^(23-p), one fused multiply-add with x and -2^(23-p) x (shared by every row of a program)
leaves code * x, rounded once, so the subtract per code is gone.

The `*_bf16` forms make a dot's bfloat16 operand (the batched weight kernel, the decode attention over an int8
cache) the same way, two codes to a 32-bit register, straight into bfloat16's mantissa (`int8_codes_f16`:
float16's, one subtract per two codes): per two codes one permute, one or two logic ops and
one fused multiply-add, instead of an int-to-float and a float-to-bfloat16 conversion per code (the
lowering's own spelling, whose cost depends on the Triton version).

`native=False` gives the same values in plain jnp: the interpreter (CPU tests) runs no PTX.
"""
from __future__ import annotations

import struct

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import codes_f32

INLINE_PTX = True  # False: the jnp spelling on the GPU too (benchmarks compare the two in one process)
_MAGIC = 0x4B000000  # float bits of 2^23: a value below 2^23 in the low mantissa bits reads as 2^23 + value
_BF16_MAGIC = 0x43004300  # two bfloat16 128.0: a value below 128 in a half's low 7 bits reads as 128 + value


def _f32(x: float) -> str:
  """A PTX float32 literal (exact bits)."""
  return "0f%08X" % struct.unpack("<I", struct.pack("<f", x))[0]


# Four int8 codes in one 32-bit register ($4): flip the sign bits (q + 128 as unsigned), then each byte
# becomes the low byte of 2^23's bits; outputs $0..$3 are 2^23 + 128 + q.
_INT8_ASM = "\n".join([
    "{", ".reg .b32 u;", "xor.b32 u, $4, 0x80808080;",
    *(f"prmt.b32 ${i}, u, {_MAGIC:#010x}, 0x765{i};" for i in range(4)), "}"])


def _nibble_places(high: bool) -> list[tuple[str, int]]:
  """Where the four low (or high) nibbles of a word $4 (bytes 0-3) sit for a masking op: (register, bit),
  with bits 20-31 read from h = $4 >> 16 so that every nibble ends below bit 20 (inside 2^23's mantissa)."""
  return [("$4", 4), ("$4", 12), ("h", 4), ("h", 12)] if high else [("$4", 0), ("$4", 8), ("$4", 16), ("h", 8)]


def _int4_asm(zero: int, high: bool) -> str:
  """Eight int4 codes in one 32-bit register ($4; byte i: low nibble element i of the group's first half,
  high nibble element i of its second): outputs $0..$3 the four low (or high) nibbles, each minus `zero`.
  A nibble at bit p is masked into the mantissa of 2^23 in place (bits 20-31 first shifted down by 16),
  giving 2^23 + code * 2^p; one fused multiply-add scales by 2^-p and subtracts 2^(23-p) + zero, exactly.
  (Two calls, one per half: jax's lowering of a multi-result inline asm is broken in 0.10.)"""
  lines = ["{", ".reg .b32 h, t;", "shr.b32 h, $4, 16;"]
  for out, (src, p) in enumerate(_nibble_places(high)):
    lines.append(f"lop3.b32 t, {src}, {0xF << p:#x}, {_MAGIC:#010x}, 0xEA;")  # (src & mask) | 2^23
    lines.append(f"fma.rn.f32 ${out}, t, {_f32(2.0 ** -p)}, {_f32(-(2.0 ** (23 - p) + zero))};")
  return "\n".join(lines + ["}"])


def _int4_product_asm(high: bool) -> str:
  """Eight int4 codes in one register ($4, laid out as for `_int4_asm`) and the four matching float32 x
  ($5..$8): outputs $0..$3 code * x for the four low (or high) nibbles, rounded once. A nibble at bit p is
  masked into the mantissa of 2^(23-p), where it weighs 1 (the float 2^(23-p) + code); one fused multiply-add
  with x and -2^(23-p) x (exact: a power of two) leaves code * x. The code's zero point is not subtracted."""
  lines = ["{", ".reg .b32 h, t, n;", "shr.b32 h, $4, 16;"]
  for out, (src, p) in enumerate(_nibble_places(high)):
    lines.append(f"lop3.b32 t, {src}, {0xF << p:#x}, {(150 - p) << 23:#010x}, 0xEA;")  # (src & mask) | 2^(23-p)
    lines.append(f"mul.rn.f32 n, ${5 + out}, {_f32(-(2.0 ** (23 - p)))};")
    lines.append(f"fma.rn.f32 ${out}, t, ${5 + out}, n;")
  return "\n".join(lines + ["}"])


def _bf16_pair(value: float) -> int:
  """Bits of a bfloat16x2 register holding `value` twice (an integer of magnitude < 256: exact)."""
  bits = struct.unpack("<I", struct.pack("<f", value))[0] >> 16
  return bits << 16 | bits


# Four int8 codes ($2) to four bfloat16 in two registers ($0: codes 0 and 1, code 0 in the low half; $1:
# codes 2 and 3). A permute sets each code byte under the byte 0x43, so a half reads as 128 + (q & 0x7F)
# when the sign bit is clear; the sign bit lands in the exponent and doubles 128 to 256. Hence (bits without
# the sign bit) - (bits with only the sign bit and 0x43) = (q & 0x7F) - 128 * sign = q, one fused
# multiply-add by -1 per two codes, exactly.
_INT8_BF16_ASM = "\n".join([
    "{", ".reg .b32 t, lo, hi, m;", f"mov.b32 m, {_bf16_pair(-1.0):#010x};",
    *(line for out, selector in enumerate((0x4140, 0x4342)) for line in (
        f"prmt.b32 t, $2, 0x43434343, {selector:#x};",
        "lop3.b32 lo, t, 0xFF7FFF7F, 0, 0xC0;",  # t & mask: 128 + (q & 0x7F)
        "lop3.b32 hi, t, 0xFF80FF80, 0, 0xC0;",  # 128, or 256 when q < 0
        f"fma.rn.bf16x2 ${out}, hi, m, lo;")),
    "}"])


# Four int8 codes ($2) to four float16 in two registers ($0: codes 0 and 1, code 0 in the low half; $1: codes
# 2 and 3): flip the sign bits (q + 128 as unsigned), set each byte under the byte 0x64 (the float16 1024 + 128 +
# q: float16 holds the integers of [1024, 2048) exactly), and subtract 1152 from both halves at once, exactly.
_INT8_F16_ASM = "\n".join([
    "{", ".reg .b32 u, c;", "xor.b32 u, $2, 0x80808080;", "mov.b32 c, 0x64806480;",
    *(line for out, selector in enumerate((0x4140, 0x4342)) for line in (
        f"prmt.b32 ${out}, u, 0x64646464, {selector:#x};", f"sub.rn.f16x2 ${out}, ${out}, c;")),
    "}"])


def _word_byte_f16_asm(byte: int) -> str:
  """Byte `byte` of two int32 words ($1, $2; four int8 codes each) to two float16 in one register ($0: $1's in the
  low half): a permute puts the two bytes at the bottom of each half, one logic op flips their sign bits and sets
  0x64 above them ((t & 0x00FF00FF) ^ 0x64806480: the float16 1024 + 128 + q), and a paired subtract of 1152
  leaves q, exactly."""
  selector = byte | byte << 4 | (4 + byte) << 8 | (4 + byte) << 12
  return "\n".join(["{", ".reg .b32 t, c;", f"prmt.b32 t, $1, $2, {selector:#x};",
                     "lop3.b32 t, t, 0x00FF00FF, 0x64806480, 0x6A;", "mov.b32 c, 0x64806480;",
                     "sub.rn.f16x2 $0, t, c;", "}"])


def _int4_bf16_asm(zero: int, high: bool) -> str:
  """Eight int4 codes in one register ($2; byte i: low nibble element i of the group's first half, high
  nibble element i of its second) to the four low (or high) nibbles minus `zero` as bfloat16, two per output
  register ($0: bytes 0 and 1, byte 0's in the low half; $1: bytes 2 and 3). A permute puts two bytes at
  the bottom of each half, the nibble is masked into the mantissa of 128.0 (128 + code), and a fused
  multiply-add by 1 subtracts 128 + zero, exactly. High nibbles are first shifted down by four."""
  src = "h" if high else "$2"
  lines = ["{", ".reg .b32 h, t, one, c;", f"mov.b32 one, {_bf16_pair(1.0):#010x};",
           f"mov.b32 c, {_bf16_pair(-(128.0 + zero)):#010x};"]
  if high:
    lines.append("shr.b32 h, $2, 4;")
  for out, selector in enumerate((0x4140, 0x4342)):  # bytes (0, 1) / (2, 3) to bits 0-7 and 16-23, zeros above
    lines += [f"prmt.b32 t, {src}, 0, {selector:#x};",
              f"lop3.b32 t, t, 0x000F000F, {_BF16_MAGIC:#010x}, 0xEA;",  # (t & mask) | 128.0 pair
              f"fma.rn.bf16x2 ${out}, t, one, c;"]
  return "\n".join(lines + ["}"])


def int8_codes_f32(w: jax.Array, native: bool) -> jax.Array:
  """int8 codes as float32: one byte permute and one subtract per code (plus one xor per four)."""
  if not native:
    return codes_f32(lax.bitcast_convert_type(w, jnp.uint8) ^ jnp.uint8(0x80), 128)
  [c] = pltriton.elementwise_inline_asm(_INT8_ASM, args=[w], constraints="=r,=r,=r,=r,r", pack=4,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.float32)])
  return c - float(2**23 + 128)


def int4_codes_f32(w: jax.Array, zero: int, native: bool) -> tuple[jax.Array, jax.Array]:
  """Packed int4 codes (uint8, two per byte) as float32 (low nibbles, high nibbles), each minus `zero`: one
  logic op and one fused multiply-add per code."""
  if not native:
    return codes_f32(w & 0x0F, zero), codes_f32(w >> 4, zero)
  shape = [jax.ShapeDtypeStruct(w.shape, jnp.float32)]
  return tuple(pltriton.elementwise_inline_asm(_int4_asm(zero, high), args=[w], constraints="=r,=r,=r,=r,r",
                                               pack=4, result_shape_dtypes=shape)[0] for high in (False, True))


def int4_code_products(w: jax.Array, x_low: jax.Array, x_high: jax.Array, native: bool
                       ) -> tuple[jax.Array, jax.Array]:
  """Packed int4 codes (uint8, two per byte) times float32 x of the same shape, one x per nibble half:
  (low nibbles * x_low, high nibbles * x_high), each product rounded once and the zero point not subtracted
  (callers subtract zero * sum(x) once per group). One logic op and one fused multiply-add per code: the
  decode's subtract is gone, and ptxas computes the x-side constants once for all rows of a program."""
  if not native:
    return codes_f32(w & 0x0F, 0) * x_low, codes_f32(w >> 4, 0) * x_high
  shape = [jax.ShapeDtypeStruct(w.shape, jnp.float32)]
  constraints = "=r," * 4 + "r," * 4 + "r"  # four products; the codes' word and four x
  return tuple(pltriton.elementwise_inline_asm(_int4_product_asm(high), args=[w, x], constraints=constraints,
                                               pack=4, result_shape_dtypes=shape)[0]
               for high, x in ((False, x_low), (True, x_high)))


def _int8_codes_16bit(w: jax.Array, native: bool, asm: str, dtype) -> jax.Array:
  """int8 codes as the 16-bit float `dtype` by `asm` (four codes in a register to two registers), or in jnp."""
  if not native:
    return int8_codes_f32(w, False).astype(dtype)
  [c] = pltriton.elementwise_inline_asm(asm, args=[w], constraints="=r,=r,r", pack=4,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, dtype)])
  return c


def int8_codes_bf16(w: jax.Array, native: bool) -> jax.Array:
  """int8 codes as bfloat16 (exact): per two codes one permute, two logic ops and one fused multiply-add."""
  return _int8_codes_16bit(w, native, _INT8_BF16_ASM, jnp.bfloat16)


def int8_codes_f16(w: jax.Array, native: bool) -> jax.Array:
  """int8 codes as float16 (exact): per four codes one logic op, two permutes and two paired subtracts."""
  return _int8_codes_16bit(w, native, _INT8_F16_ASM, jnp.float16)


def word_codes(w: jax.Array, byte: int, dtype) -> jax.Array:
  """Code `byte` (little-endian) of each int32 word of four int8 codes, as `dtype`, exactly, in jnp: the byte with
  its sign bit flipped (q + 128 as unsigned) through `codes_f32`."""
  return codes_f32((lax.shift_right_logical(w, 8 * byte) & 0xFF) ^ 0x80, 128).astype(dtype)


def word_codes_f16(w: jax.Array, byte: int, native: bool) -> jax.Array:
  """`word_codes` into float16: per two codes one permute, one logic op and one paired subtract."""
  if not native:
    return word_codes(w, byte, jnp.float16)
  [c] = pltriton.elementwise_inline_asm(_word_byte_f16_asm(byte), args=[w], constraints="=r,r,r", pack=2,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.float16)])
  return c


def int4_codes_bf16(w: jax.Array, zero: int, native: bool) -> tuple[jax.Array, jax.Array]:
  """Packed int4 codes (uint8, two per byte) as bfloat16 (low nibbles, high nibbles), each minus `zero`,
  exactly: per two codes one permute, one logic op and one fused multiply-add (high nibbles: a shift per
  four more)."""
  if not native:
    return tuple(c.astype(jnp.bfloat16) for c in int4_codes_f32(w, zero, False))
  shape = [jax.ShapeDtypeStruct(w.shape, jnp.bfloat16)]
  return tuple(pltriton.elementwise_inline_asm(_int4_bf16_asm(zero, high), args=[w], constraints="=r,=r,r",
                                               pack=4, result_shape_dtypes=shape)[0] for high in (False, True))


def _dp4a_asm(a_signed: bool, b_signed: bool) -> str:
  """$0 = $3 + the sum of the four byte products of $1 and $2 (each byte signed or not, as asked)."""
  kind = lambda signed: "s32" if signed else "u32"  # noqa: E731
  return f"dp4a.{kind(a_signed)}.{kind(b_signed)} $0, $1, $2, $3;"


def dp4a(a: jax.Array, b: jax.Array, c: jax.Array, *, a_signed: bool, b_signed: bool, native: bool) -> jax.Array:
  """c + the dot product of the four bytes of int32 words a and b, elementwise: PTX `dp4a`, one instruction for
  four byte products summed exactly in int32 (a, b, c of one shape on the GPU: broadcast b first). Each byte is
  read as signed or unsigned as asked. `native=False`: the same integer arithmetic in jnp."""
  if native:
    [d] = pltriton.elementwise_inline_asm(_dp4a_asm(a_signed, b_signed), args=[a, b, c], constraints="=r,r,r,r",
                                          pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)])
    return d

  def byte(w, i, signed):
    v = lax.shift_right_logical(w, 8 * i) & 0xFF
    return jnp.where(v >= 128, v - 256, v) if signed else v

  return c + sum(byte(a, i, a_signed) * byte(b, i, b_signed) for i in range(4))
