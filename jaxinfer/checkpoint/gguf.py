"""GGUF model files (llama.cpp's format), read through the `gguf` package's `GGUFReader`.

Owns: opening a file with one-line errors (`open_gguf`), turning its metadata into a Hugging Face
style `config.json` dict (`read_gguf_config`), yielding its tensors dequantised under Hugging Face
names and layouts (`iter_gguf_tensors`), and its special tokens and chat template
(`gguf_special_tokens`). Block decoding lives in `gguf_quants`, the tokenizer in `gguf_tokenizer`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGUFReader

from .gguf_quants import dequantize

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")

_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}

# llama.cpp's converter permutes the q/k rows of these architectures (see `_unpermute`).
_PERMUTED_QK = ("llama", "mistral")

# `tokenizer.ggml.pre` names of Llama 3's pre-tokenizer.
LLAMA3_PRE_TOKENIZERS = ("llama3", "llama-v3", "llama-bpe", "falcon3")
# BPE pre-tokenizers for which llama.cpp adds BOS when `tokenizer.ggml.add_bos_token` is missing.
_BOS_BY_DEFAULT = (*LLAMA3_PRE_TOKENIZERS, "tekken")

_MISSING = object()


# ---------------------------------------------------------------------------------------------------
# Opening


def open_gguf(path: str | Path) -> GGUFReader:
    """A `GGUFReader` for `path` (memory-mapped, nothing decoded yet).

    Raises FileNotFoundError for a missing file and a one-line ValueError, naming the path, for
    anything that is not a readable GGUF file (wrong magic, truncated, corrupt metadata).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a GGUF file: it is not a regular file")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        what = "it is empty" if size == 0 else f"it starts with {magic!r}, not b'GGUF'"
        raise ValueError(f"{path} is not a GGUF file: {what}")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader fails with whatever numpy raises on bad bytes
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(
            f"{path} is a truncated or corrupt GGUF file ({size} bytes): {type(e).__name__}: {detail}"
        ) from e
    if reader.byte_order != "I":
        raise ValueError(f"{path} is a big-endian GGUF file; jaxinfer reads little-endian files only")
    return reader


# ---------------------------------------------------------------------------------------------------
# Metadata


def gguf_value(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """The Python value of metadata `key` (str, int, float, bool or list); `default` when absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"GGUF file has no metadata key {key!r}")
        return default
    return field.contents()


def _float(value: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99999974e-06).

    GGUF stores config floats as float32; the original config.json had the short decimal.
    """
    return float(str(np.float32(value)))


def _architecture(reader: GGUFReader) -> str:
    arch = gguf_value(reader, "general.architecture", None)
    if arch is None:
        raise ValueError("GGUF file has no general.architecture metadata; cannot tell what model it holds")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {supported}")
    return arch


def _tensors(reader: GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def _numpy_shape(tensor) -> tuple[int, ...]:
    """GGUF lists dims innermost first; numpy (and torch) list them outermost first."""
    return tuple(int(d) for d in reversed(tensor.shape))


def _same_for_all_layers(value, key: str) -> int:
    if isinstance(value, list):  # some files give per-layer values
        if len(set(value)) != 1:
            raise ValueError(f"GGUF metadata {key} varies per layer ({value}); jaxinfer needs one value")
        value = value[0]
    return int(value)


def read_gguf_config(reader: GGUFReader) -> dict:
    """A Hugging Face `config.json` dict (Llama/Qwen2/Mistral keys) from the file's metadata.

    Where metadata is silent, the tensors decide: vocab size from the embedding, head_dim from q,
    tied embeddings from a missing `output.weight`, q/k/v bias from their presence.
    """
    arch = _architecture(reader)
    tensors = _tensors(reader)
    meta = lambda key, default=_MISSING: gguf_value(reader, f"{arch}.{key}", default)

    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    vocab_size = _numpy_shape(tensors["token_embd.weight"])[0]
    hidden = int(meta("embedding_length"))
    n_heads = _same_for_all_layers(meta("attention.head_count"), f"{arch}.attention.head_count")
    n_kv = _same_for_all_layers(meta("attention.head_count_kv", n_heads), f"{arch}.attention.head_count_kv")
    head_dim = meta("attention.key_length", None)
    if head_dim is None and "blk.0.attn_q.weight" in tensors:
        head_dim = _numpy_shape(tensors["blk.0.attn_q.weight"])[0] // n_heads
    head_dim = int(head_dim or hidden // n_heads)
    rotary = meta("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ValueError(
            f"GGUF rope.dimension_count {rotary} differs from head_dim {head_dim}; partial rotary is not supported"
        )
    rope_theta = _float(meta("rope.freq_base", 10000.0))

    config = {
        "architectures": [_HF_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(reader, arch, tensors, rope_theta, head_dim),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    if arch == "mistral":
        config["sliding_window"] = meta("attention.sliding_window", None)
    special = gguf_special_tokens(reader)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if special.get(key) is not None:
            config[key] = special[key]
    return config


def _rope_scaling(reader, arch, tensors, rope_theta, head_dim) -> dict | None:
    """HF `rope_scaling` from `{arch}.rope.scaling.*` metadata, or llama3's from a `rope_freqs` tensor."""
    meta = lambda key, default=None: gguf_value(reader, f"{arch}.rope.{key}", default)
    kind = meta("scaling.type", "none")
    factor = meta("scaling.factor", None)
    if kind == "none" and meta("scale_linear") is not None:  # older files
        kind, factor = "linear", meta("scale_linear")
    if "rope_freqs.weight" in tensors:
        if kind not in ("none", None):
            raise ValueError(f"GGUF file has both rope scaling type {kind!r} and a rope_freqs tensor")
        freqs = tensors["rope_freqs.weight"]
        factors = dequantize(freqs.data, freqs.tensor_type, _numpy_shape(freqs), freqs.name)
        return _llama3_rope_scaling(factors, rope_theta, head_dim)
    if kind in ("none", None) or factor in (None, 0.0, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": _float(factor)}
        original = meta("scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        for gguf_key, hf_key in (("scaling.yarn_beta_fast", "beta_fast"), ("scaling.yarn_beta_slow", "beta_slow")):
            if meta(gguf_key) is not None:
                scaling[hf_key] = _float(meta(gguf_key))
        return scaling
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported; supported: linear, yarn, llama3")


def _llama3_rope_scaling(factors: np.ndarray, rope_theta: float, head_dim: int) -> dict:
    """Recover HF's llama3 `rope_scaling` from the per-frequency divisors llama.cpp stores instead.

    llama.cpp writes `factor` for long wavelengths, 1 for short ones and a smooth blend between
    (1/f = (1-s)/factor + s, with s = (L/wavelen - lo)/(hi - lo)). s is linear in 1/wavelen, so the
    blended frequencies give L/(hi-lo) and lo/(hi-lo); with lo = 1 (every Llama 3.x release) that fixes
    hi and L. The result is checked by recomputing the divisors.
    """
    factors = factors.astype(np.float64)
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(factors.max())
    blended = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    unexplained = "rope_freqs.weight does not follow llama3 rope scaling"
    if factors.shape != wavelen.shape or factor <= 1 or blended.sum() < 2:
        raise ValueError(f"GGUF {unexplained} (shape {factors.shape}, max {factor})")
    s = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[blended], s, 1)
    high = 1 - 1 / intercept
    original = round(slope * (high - 1))
    scaling = {
        "rope_type": "llama3",
        "factor": _float(factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": _float(round(high, 4)),
        "original_max_position_embeddings": int(original),
    }
    smooth = np.clip((original / wavelen - 1) / (scaling["high_freq_factor"] - 1), 0, 1)
    if not np.allclose(1 / ((1 - smooth) / factor + smooth), factors, rtol=1e-3):
        raise ValueError(f"GGUF {unexplained} with low_freq_factor 1")
    return scaling


def gguf_special_tokens(reader: GGUFReader) -> dict:
    """Special token ids, BOS/EOS insertion flags and the chat template from `tokenizer.*` metadata.

    `eos_token_ids` collects every id that should stop generation (eos, and eot/eom where given).
    `add_bos_token` defaults as llama.cpp does when the file is silent: on for sentencepiece
    vocabularies and Llama 3 / Tekken BPE, off for other BPE.
    """
    get = lambda key: gguf_value(reader, f"tokenizer.{key}", None)
    eos = get("ggml.eos_token_id")
    stop_ids = [get(f"ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    add_bos = get("ggml.add_bos_token")
    if add_bos is None:
        add_bos = get("ggml.model") == "llama" or get("ggml.pre") in _BOS_BY_DEFAULT
    return {
        "bos_token_id": get("ggml.bos_token_id"),
        "eos_token_id": eos,
        "eos_token_ids": list(dict.fromkeys(i for i in stop_ids if i is not None)),
        "pad_token_id": get("ggml.padding_token_id"),
        "unk_token_id": get("ggml.unknown_token_id"),
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(get("ggml.add_eos_token") or False),
        "chat_template": get("chat_template"),
    }


# ---------------------------------------------------------------------------------------------------
# Tensors

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BIASED = ("attn_q", "attn_k", "attn_v")
_FOLDED_INTO_CONFIG = ("rope_freqs.weight",)  # became config["rope_scaling"]
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str, num_layers: int) -> str | None:
    """The Hugging Face name for a GGUF tensor name; None for tensors that have none."""
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    match = _LAYER_TENSOR.match(gguf_name)
    if match is None:
        return None
    layer, part, kind = int(match[1]), match[2], match[3]
    if layer >= num_layers or part not in _PER_LAYER or (kind == "bias" and part not in _BIASED):
        return None
    return f"model.layers.{layer}.{_PER_LAYER[part]}.{kind}"


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order for rotary embeddings.

    HF's llama rotates each head's first half against its second half; llama.cpp rotates adjacent
    pairs, so its converter reorders each head's rows (i, i + half) -> (2i, 2i + 1). Put them back.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_tensors(reader: GGUFReader, config: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_name, float32 array)` for every model tensor, in torch layout ([out, in] for Linear).

    One tensor is dequantised at a time, so the model is never held twice. Tied models yield no
    `lm_head.weight` (see config["tie_word_embeddings"]). Unknown tensors are an error up front rather
    than silently dropped.
    """
    num_layers = config["num_hidden_layers"]
    names = {t.name: hf_tensor_name(t.name, num_layers) for t in reader.tensors}
    unknown = [n for n, hf in names.items() if hf is None and n not in _FOLDED_INTO_CONFIG]
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise ValueError(f"GGUF file has tensors jaxinfer cannot place: {shown}")

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    permuted = config["model_type"] in _PERMUTED_QK
    for tensor in reader.tensors:
        hf_name = names[tensor.name]
        if hf_name is None:
            continue
        array = dequantize(tensor.data, tensor.tensor_type, _numpy_shape(tensor), tensor.name)
        part = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if permuted and part in heads:
            expected = heads[part] * config["head_dim"]
            if array.shape[0] != expected:
                raise ValueError(f"GGUF tensor {tensor.name!r} has {array.shape[0]} rows, expected {expected}")
            array = _unpermute(array, heads[part])
        yield hf_name, array
