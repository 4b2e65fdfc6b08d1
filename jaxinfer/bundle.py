"""`Model`: what `load` returns: config, parameters, tokenizer, stop ids and chat template, together.

A plain immutable record; the functions in `generate.py` take it. Text encoding and decoding live here
because they need the tokenizer and the BOS convention of the checkpoint. Knows nothing of jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Model:
    config: ModelConfig
    params: Any
    tokenizer: Any = None  # a `tokenizers.Tokenizer`, or None for token-only use
    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    chat_template: str | None = None
    special_tokens: dict = dataclasses.field(default_factory=dict)  # bos_token/eos_token strings for templates
    name: str = ""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS where the checkpoint's tokenizer adds one."""
        self._need_tokenizer()
        return self.tokenizer.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self._need_tokenizer()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def replace(self, **changes) -> "Model":
        return dataclasses.replace(self, **changes)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"model {self.name!r} has no tokenizer: pass token ids instead of text")
