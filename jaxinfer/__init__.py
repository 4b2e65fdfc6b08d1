"""jaxinfer: fast transformer (LLM) inference in JAX/XLA, with Pallas kernels for NVIDIA GPUs.

The model is a pure function `forward(params, cache, tokens, lengths) -> (logits, cache)`; the KV cache
is an explicit pytree; `prefill` and `decode_step` are separately jitted with the cache donated;
`generate` runs the decode loop on device and `stream` yields tokens as they come.
"""

from .bundle import Model
from .cache import KVCache, PageAllocator, PagedKVCache, init_cache, init_paged_cache
from .chat import chat, render_chat
from .checkpoint import load
from .config import ModelConfig
from .generate import GenerateResult, StreamChunk, decode_step, generate, prefill, stream
from .model import forward
from .perplexity import perplexity
from .params import abstract_params, init_params, param_axes, param_specs
from .sampling import Sampling, sample

__all__ = [
    "GenerateResult",
    "KVCache",
    "Model",
    "ModelConfig",
    "PageAllocator",
    "PagedKVCache",
    "Sampling",
    "StreamChunk",
    "abstract_params",
    "chat",
    "decode_step",
    "forward",
    "generate",
    "init_cache",
    "init_paged_cache",
    "init_params",
    "load",
    "param_axes",
    "param_specs",
    "perplexity",
    "prefill",
    "render_chat",
    "sample",
    "stream",
]
