"""Model configuration: a frozen description of a Llama-family decoder's shapes and math.

Owns `ModelConfig`, its construction from a Hugging Face `config.json` dict (rejecting what we do not
implement, by name) and the presets in the top-level `configs/` folder. It knows nothing about
parameters, checkpoints or devices.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency-dependent rope scaling (`rope_type: llama3`) or plain linear scaling."""

    kind: str  # "llama3" or "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Llama-family decoder. Hashable, so it is a static jit argument."""

    vocab_size: int
    dim: int  # D, model width
    ffn_dim: int  # F, MLP hidden width
    num_layers: int  # L
    num_heads: int  # N, query heads
    num_kv_heads: int  # K, key/value heads (GQA when K < N, MQA when K == 1)
    head_dim: int  # H
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 / Qwen2.5
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    sliding_window: int | None = None  # Mistral
    model_type: str = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "dim", "ffn_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_per_kv(self) -> int:
        """G: query heads sharing one key/value head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict; unsupported architectures and values are errors."""
        return _from_hf(hf)

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        """A preset from `configs/<name>.json` (HF-style JSON holding shapes only)."""
        path = PRESETS_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
        return cls.from_hf(json.loads(path.read_text()))


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


# Fields whose value must be one we implement; anything else is rejected with its name.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; jaxinfer supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"config for {model_type!r} is missing required field(s): {', '.join(missing)}")

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r} (only 'silu' is implemented)")
    if hf.get("mlp_bias"):
        raise ValueError("unsupported mlp_bias=True (MLP projections without bias only)")
    bias_default = model_type == "qwen2"
    qkv_bias = bool(hf.get("attention_bias", bias_default))
    if qkv_bias and model_type not in ("qwen2",):
        raise ValueError(f"unsupported attention_bias=True for model_type {model_type!r}")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("unsupported use_sliding_window=True for qwen2")
    if model_type == "qwen3" and hf.get("use_sliding_window"):
        raise ValueError("unsupported use_sliding_window=True for qwen3")
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise ValueError(f"unsupported pretraining_tp={hf['pretraining_tp']}")

    num_heads = hf["num_attention_heads"]
    num_kv = hf.get("num_key_value_heads") or num_heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    sliding = hf.get("sliding_window") if model_type == "mistral" else None
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        ffn_dim=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(_rope_theta(hf)),
        rope_scaling=_rope_scaling(hf),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=model_type == "qwen3",
        sliding_window=int(sliding) if sliding else None,
        model_type=model_type,
    )


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers 5 moves rope_theta into `rope_parameters`; older files keep it at the top level.
    params = hf.get("rope_parameters") or {}
    return params.get("rope_theta", hf.get("rope_theta", 10000.0))


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(rs["factor"]),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rs["factor"]))
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: llama3, linear)")


def rope_inv_freq(config: ModelConfig):
    """Inverse rotary frequencies [H/2] as Python floats, with rope scaling applied."""
    h = config.head_dim
    inv = [1.0 / (config.rope_theta ** (2 * i / h)) for i in range(h // 2)]
    rs = config.rope_scaling
    if rs is None:
        return inv
    if rs.kind == "linear":
        return [f / rs.factor for f in inv]
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor
            )
            out.append((1 - smooth) * f / rs.factor + smooth * f)
    return out
