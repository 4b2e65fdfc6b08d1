"""jaxinfer: fast transformer (LLM) inference in JAX/XLA, with Pallas kernels for NVIDIA GPUs.

The model is a pure function `forward(params, cache, tokens, lengths) -> (logits, cache)`; the KV cache
is an explicit pytree; `prefill` and `decode_step` are separately jitted with the cache donated;
`generate` runs the decode loop on device and `stream` yields tokens as they come.
"""

from . import xla_flags

xla_flags.apply()  # before any backend starts: XLA reads its flags once

from .bundle import Model
from .cache import KVCache, PageAllocator, PagedKVCache, init_cache, init_paged_cache
from .chat import chat, render_chat
from .checkpoint import load
from .config import ModelConfig
from . import disagg, pipeline, sharding
from .generate import GenerateResult, StreamChunk, decode_step, generate, prefill, stream
from .memory import DoesNotFit, MemoryPlan, check_fits, memory_plan
from .model import forward
from .perplexity import perplexity
from .quant import QArray, Recipe, load_quantized, quantize, save_quantized
from .params import abstract_params, init_params, param_axes, param_specs
from .sampling import Sampling, sample
from .sharding import ShardingRules, cache_shardings, make_mesh, param_shardings, shard_cache, shard_params
from .weight_layout import ContractLast, contract_last, fragment_order

__all__ = [
    "abstract_params",
    "cache_shardings",
    "chat",
    "contract_last",
    "ContractLast",
    "check_fits",
    "decode_step",
    "disagg",
    "DoesNotFit",
    "forward",
    "fragment_order",
    "generate",
    "GenerateResult",
    "init_cache",
    "init_paged_cache",
    "init_params",
    "KVCache",
    "load",
    "load_quantized",
    "make_mesh",
    "memory_plan",
    "MemoryPlan",
    "Model",
    "ModelConfig",
    "PageAllocator",
    "PagedKVCache",
    "param_axes",
    "param_shardings",
    "param_specs",
    "perplexity",
    "pipeline",
    "prefill",
    "QArray",
    "quantize",
    "Recipe",
    "render_chat",
    "sample",
    "Sampling",
    "save_quantized",
    "shard_cache",
    "shard_params",
    "sharding",
    "ShardingRules",
    "stream",
    "StreamChunk",
]
