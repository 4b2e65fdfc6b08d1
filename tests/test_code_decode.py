"""The inline PTX that decodes int8 / int4 codes (`pallas_kernels.code_decode`), checked on the CPU.

The GPU runs the PTX for real (tests/test_row_matmul.py and tests/test_weight_matmul.py, `-m gpu`: exact
products, bit for bit the jnp spelling's). Here a small interpreter of the instructions the strings use
(mov, xor, shr, prmt, lop3, float32 mul and fma, bfloat16x2 fma) runs them over every code value in every byte
position, so a wrong selector, mask or constant fails in the default suite; and the Triton lowering must
carry the PTX exactly when it is switched on.
"""

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxinfer.bench import switched
from kernel_tools import cuda_lowering
from pallas_kernels import code_decode
from pallas_kernels.row_matmul import row_matmuls
from pallas_kernels.weight_matmul import weight_matmuls

M32 = 0xFFFFFFFF


def _f32(bits: int) -> float:
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def _bits(value) -> int:
    return int(np.array([value], np.float32).view(np.uint32)[0])


def _bf16_halves(bits: int) -> list[np.float64]:
    """The two bfloat16 of a 32-bit register (low half first) as float64."""
    return [np.float64(np.array([bits >> s & 0xFFFF], np.uint16).view(ml_dtypes.bfloat16)[0]) for s in (0, 16)]


def _bf16_bits(value) -> int:
    """bfloat16 bits of `value`, rounded to nearest even (from float64 through float32: exact for these
    operands)."""
    return int(np.array([value], np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)[0])


def _f16_halves(bits: int) -> list[np.float64]:
    """The two float16 of a 32-bit register (low half first) as float64."""
    return [np.float64(np.array([bits >> s & 0xFFFF], np.uint16).view(np.float16)[0]) for s in (0, 16)]


def _f16_bits(value) -> int:
    """float16 bits of `value` (rounded to nearest even)."""
    return int(np.array([value], np.float64).astype(np.float16).view(np.uint16)[0])


def _operand(token: str, regs: dict) -> int:
    if token.startswith("0f"):
        return int(token[2:], 16)
    if token[0].isdigit():
        return int(token, 0)
    return regs[token]


def run_ptx(asm: str, inputs: dict) -> dict:
    """Registers after running `asm` (the instructions code_decode emits; PTX ISA semantics) from `inputs`
    ({"$4": word}); every register is a 32-bit pattern."""
    regs = dict(inputs)
    for line in asm.splitlines():
        line = line.strip()
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = re.fullmatch(r"(\S+)\s+(.*);", line).groups()
        dst, *src = [a.strip() for a in args.split(",")]
        v = [_operand(a, regs) for a in src]
        if op == "mov.b32":
            out = v[0]
        elif op == "xor.b32":
            out = v[0] ^ v[1]
        elif op == "shr.b32":
            out = v[0] >> v[1]
        elif op == "prmt.b32":  # default mode: selector nibble i picks byte i of the result from {b, a}
            pool = [(v[0] >> 8 * k) & 0xFF for k in range(4)] + [(v[1] >> 8 * k) & 0xFF for k in range(4)]
            out = 0
            for i in range(4):
                sel = (v[2] >> 4 * i) & 0xF
                byte = pool[sel & 7]
                if sel & 8:  # sign replication
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << 8 * i
        elif op == "lop3.b32":  # bit i of the result: bit (a_i b_i c_i) of the look-up table
            a, b, c, lut = v
            out = 0
            for idx in range(8):
                if lut >> idx & 1:
                    out |= (a if idx & 4 else ~a) & (b if idx & 2 else ~b) & (c if idx & 1 else ~c)
        elif op == "fma.rn.f32":
            a, b, c = (np.float64(_f32(x)) for x in v)
            out = _bits(np.float32(a * b + c))  # exact in float64 for these operands, then one rounding
        elif op == "mul.rn.f32":
            out = _bits(np.float32(np.float64(_f32(v[0])) * np.float64(_f32(v[1]))))
        elif op.startswith("dp4a."):  # c + sum of the four byte products, bytes signed per .s32 / .u32
            a_kind, b_kind = op.split(".")[1:]
            def byte(w, i, kind):
                b = (w >> 8 * i) & 0xFF
                return b - 256 if kind == "s32" and b & 0x80 else b
            c = v[2] - (1 << 32 if v[2] & 0x80000000 else 0)
            out = c + sum(byte(v[0], i, a_kind) * byte(v[1], i, b_kind) for i in range(4))
        elif op == "fma.rn.bf16x2":  # per half: a * b + c, one rounding to bfloat16
            a, b, c = (_bf16_halves(x) for x in v)
            out = _bf16_bits(a[0] * b[0] + c[0]) | _bf16_bits(a[1] * b[1] + c[1]) << 16
        elif op == "sub.rn.f16x2":  # per half: a - b, one rounding to float16
            a, b = (_f16_halves(x) for x in v)
            out = _f16_bits(a[0] - b[0]) | _f16_bits(a[1] - b[1]) << 16

        else:
            raise AssertionError(f"unexpected instruction {op}")
        regs[dst] = out & M32
    return regs


def _words(rng, byte_values, count=64):
    """32-bit words covering every byte value in every byte position, plus random ones."""
    cover = [int.from_bytes(bytes(np.roll(byte_values, k)[:4]), "little") for k in range(len(byte_values))]
    return cover + [int(w) for w in rng.integers(0, 2**32, count, dtype=np.uint64)]


def _f32_outputs(regs) -> list[float]:
    """The float32 forms' four results, $0..$3."""
    return [_f32(regs[f"${i}"]) for i in range(4)]


def _bf16_outputs(regs) -> list[float]:
    """The bfloat16 forms' four results, two to a register: $0 holds 0 and 1, $1 holds 2 and 3."""
    return _bf16_halves(regs["$0"]) + _bf16_halves(regs["$1"])


# Each PTX form: (its int8 source, its int4 source given (zero, high), the input register, its four results).
FORMS = {
    "f32": (code_decode._INT8_ASM, code_decode._int4_asm, "$4", _f32_outputs),
    "bf16": (code_decode._INT8_BF16_ASM, code_decode._int4_bf16_asm, "$2", _bf16_outputs),
}
INT8_OFFSET = {"f32": 2**23 + 128, "bf16": 0}  # what the form leaves on each code (the f32 wrapper subtracts it)


@pytest.mark.parametrize("form", list(FORMS))
def test_int8_asm_decodes_every_code_in_every_position(form):
    int8_asm, _, register, outputs = FORMS[form]
    rng = np.random.default_rng(0)
    for word in _words(rng, np.arange(256, dtype=np.uint8)):
        regs = run_ptx(int8_asm, {register: word})
        codes = np.frombuffer(word.to_bytes(4, "little"), np.int8)
        got = [v - INT8_OFFSET[form] for v in outputs(regs)]
        assert got == [float(c) for c in codes], (hex(word), got, codes)


def test_int8_f16_asm_decodes_every_code_in_every_position():
    """`int8_codes_f16`'s PTX: each code exactly, code 0 of a word in the low half of the first result."""
    rng = np.random.default_rng(1)
    for word in _words(rng, np.arange(256, dtype=np.uint8)):
        regs = run_ptx(code_decode._INT8_F16_ASM, {"$2": word})
        got = _f16_halves(regs["$0"]) + _f16_halves(regs["$1"])
        codes = np.frombuffer(word.to_bytes(4, "little"), np.int8)
        assert got == [float(c) for c in codes], (hex(word), got, codes)


def test_word_codes_decode_every_byte_position():
    """`word_codes` (jnp, what interpret mode runs): byte b of each int32 word as its int8 code, exactly."""
    rng = np.random.default_rng(3)
    words = np.array(_words(rng, np.arange(256, dtype=np.uint8)), np.uint32).view(np.int32)
    codes = words.view(np.int8).reshape(-1, 4)  # little-endian: byte b of word i
    for byte in range(4):
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
            got = np.asarray(code_decode.word_codes(jnp.asarray(words), byte, dtype), np.float32)
            np.testing.assert_array_equal(got, codes[:, byte].astype(np.float32))


@pytest.mark.parametrize("byte", range(4))
def test_word_byte_f16_asm_decodes_every_code_of_both_words(byte):
    """`word_codes_f16`'s PTX: byte `byte` of two words, every code value, the first word's in the low half."""
    rng = np.random.default_rng(2)
    words = _words(rng, np.arange(256, dtype=np.uint8))
    for a, b in zip(words, words[1:] + words[:1]):
        regs = run_ptx(code_decode._word_byte_f16_asm(byte), {"$1": a, "$2": b})
        want = [float(np.frombuffer(w.to_bytes(4, "little"), np.int8)[byte]) for w in (a, b)]
        assert _f16_halves(regs["$0"]) == want, (hex(a), hex(b), byte)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("zero", [0, 8])
@pytest.mark.parametrize("high", [False, True])
def test_int4_asm_decodes_every_nibble_in_every_position(form, zero, high):
    _, int4_asm, register, outputs = FORMS[form]
    rng = np.random.default_rng(1)
    for word in _words(rng, np.arange(256, dtype=np.uint8)):
        regs = run_ptx(int4_asm(zero, high), {register: word})
        nibbles = [((b >> 4) if high else (b & 0xF)) for b in word.to_bytes(4, "little")]
        got = outputs(regs)
        assert got == [float(n - zero) for n in nibbles], (hex(word), got, nibbles)


@pytest.mark.parametrize("high", [False, True])
def test_int4_product_asm_multiplies_every_nibble_exactly(high):
    """code * x for every nibble in every position, rounded once, for x of every magnitude and sign (the
    x-side constant -2^(23-p) x must be exact and the fused multiply-add must leave the code's product)."""
    rng = np.random.default_rng(2)
    for word in _words(rng, np.arange(256, dtype=np.uint8)):
        x = (rng.standard_normal(4) * 10.0 ** rng.integers(-6, 7, 4)).astype(np.float32)
        inputs = {"$4": word, **{f"${5 + i}": _bits(x[i]) for i in range(4)}}
        regs = run_ptx(code_decode._int4_product_asm(high), inputs)
        nibbles = [((b >> 4) if high else (b & 0xF)) for b in word.to_bytes(4, "little")]
        want = [float(np.float32(np.float64(n) * np.float64(xi))) for n, xi in zip(nibbles, x)]
        assert _f32_outputs(regs) == want, (hex(word), nibbles, x)


@pytest.mark.parametrize("a_signed,b_signed", [(False, False), (False, True), (True, True), (True, False)])
def test_dp4a_asm_equals_the_jnp_spelling(a_signed, b_signed):
    """The dp4a instruction the row kernel emits (run through the PTX semantics above) and the jnp spelling the
    interpreter runs give the same int32 for every byte value in every position, with accumulators near the
    int32 limits."""
    rng = np.random.default_rng(4)
    a = _words(rng, np.arange(256, dtype=np.uint8))
    b = _words(rng, np.arange(256, dtype=np.uint8))[::-1]
    c = [int(x) for x in rng.integers(-(2**31) + 2**17, 2**31 - 2**17, len(a))]
    want = code_decode.dp4a(*(jnp.asarray(np.asarray(w, np.uint32).view(np.int32)) for w in (a, b)),
                            jnp.asarray(c, jnp.int32), a_signed=a_signed, b_signed=b_signed, native=False)
    asm = code_decode._dp4a_asm(a_signed, b_signed)
    got = [run_ptx(asm, {"$1": x, "$2": y, "$3": z & M32})["$0"] for x, y, z in zip(a, b, c)]
    assert np.asarray(got, np.uint32).view(np.int32).tolist() == np.asarray(want).tolist()


@pytest.mark.parametrize("kernel", ["row", "weight"])
@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 128)])
def test_lowering_carries_the_ptx_only_when_switched_on(kernel, fmt, group):
    """The row kernel (one row, float32 codes) and the batched weight kernel (16 rows, bfloat16 dot operands
    from contraction-last codes) carry their PTX only while `INLINE_PTX` is on."""
    sds = jax.ShapeDtypeStruct
    L, N, K = 2, 256, 1024
    if fmt == "int8":
        w = (sds((L, N, K), jnp.int8), sds((L, N, 1), jnp.float32), None)
    else:
        w = (sds((L, N, K // 2), jnp.uint8), sds((L, N, K // group), jnp.float16), None)
    if kernel == "row":
        fn, rows = functools.partial(row_matmuls, interpret=False, fmt=fmt, group_size=group), 1
        marker = "prmt.b32" if fmt == "int8" else "dp4a.u32"  # int4 in one K step: integer dot products
    else:
        fn = functools.partial(weight_matmuls, interpret=False, fmt=fmt, group_size=group, transposed=True)
        rows, marker = 16, "fma.rn.bf16x2"
    x = sds((rows, K), jnp.bfloat16)
    assert marker in cuda_lowering(fn, x, (w,), layer=sds((), jnp.int32))
    with switched(code_decode, {"INLINE_PTX": False}):
        assert marker not in cuda_lowering(fn, x, (w,), layer=sds((), jnp.int32))
