"""Tiny random-initialised Hugging Face models of each supported family, for parity tests."""

from __future__ import annotations

# family -> (transformers config class name, extra config fields)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama31-rope": (
        "LlamaConfig",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "max_position_embeddings": 512,
        },
    ),
    "llama-mqa-tied": ("LlamaConfig", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": 12}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
}

BASE = dict(
    vocab_size=257,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=None,
    pad_token_id=0,
)


def make_hf_model(family: str, directory, seed: int = 0):
    """Build, randomly initialise and `save_pretrained` a tiny model; returns the torch model (eval, fp32)."""
    import torch
    import transformers

    cls_name, extra = FAMILIES[family]
    fields = {**BASE, **extra}
    config = getattr(transformers, cls_name)(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from 1 so that a missing norm weight is caught
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory, safe_serialization=True)
    return model
