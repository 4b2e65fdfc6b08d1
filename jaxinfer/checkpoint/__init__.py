"""Checkpoint readers: Hugging Face safetensors directories and GGUF files, with their tokenizers."""

from .loader import DEFAULT_MODEL, default_model_path, load

__all__ = ["DEFAULT_MODEL", "default_model_path", "load"]
