"""Chat templates: render a checkpoint's Jinja chat template, and `chat(model, messages)` for multi-turn use.

The template comes from the checkpoint (GGUF metadata or `tokenizer_config.json`) and is rendered with
jinja2 the way Hugging Face does (sandboxed, trim_blocks, lstrip_blocks, loop controls). Knows nothing of
jit or the model's math.
"""

from __future__ import annotations

import datetime
import functools

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .bundle import Model


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(model: Model, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]) under the model's chat template."""
    if not model.chat_template:
        raise ValueError(f"model {model.name!r} has no chat template; pass raw text instead")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    return _compile(model.chat_template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=model.special_tokens.get("bos_token", ""),
        eos_token=model.special_tokens.get("eos_token", ""),
    )


def encode_chat(model: Model, messages: list[dict]) -> list[int]:
    """Token ids of the rendered conversation. The template writes any BOS itself, so none is added."""
    text = render_chat(model, messages)
    return model.tokenizer.encode(text, add_special_tokens=False).ids


def chat(model: Model, messages: list[dict], max_new_tokens: int = 256, **generate_kwargs) -> str:
    """The assistant's reply to `messages`; append it as {"role": "assistant", ...} to continue."""
    from .generate import generate

    result = generate(model, [encode_chat(model, messages)], max_new_tokens=max_new_tokens, **generate_kwargs)
    return result.texts[0].strip()
