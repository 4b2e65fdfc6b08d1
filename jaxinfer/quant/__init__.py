"""Quantized weights as parameter transforms: the `QArray` pytree type, recipes and `quantize`.

`quantize(params, recipe)` returns a new tree whose selected matrices are `QArray`s; `ops.matmul` and
`ops.embed` accept them, so the model runs unchanged. `activation_stats(model, text)` measures how
strongly each input channel is driven on real text; passed to `quantize(..., importance=...)` it makes
the int4/fp8 scale search weigh the channels the model uses. `save_quantized` / `load_quantized` store such a
tree in safetensors with its metadata. The GGUF loader can build `QArray`s straight from Q8_0/Q4_0/Q4_1
blocks (`jaxinfer.load(..., keep_quantized=True)`).
"""

from .qarray import FORMATS, QArray, bits_per_element, compute_dtype, dequantize, is_qarray, quantize_array
from .calibrate import activation_stats
from .recipe import LAYER_MATRICES, PRESETS, Recipe, dequantize_tree, get_recipe, quantize
from .serialize import load_quantized, save_quantized

__all__ = [
    "FORMATS",
    "LAYER_MATRICES",
    "PRESETS",
    "QArray",
    "activation_stats",
    "Recipe",
    "bits_per_element",
    "compute_dtype",
    "dequantize",
    "dequantize_tree",
    "get_recipe",
    "is_qarray",
    "load_quantized",
    "quantize",
    "quantize_array",
    "save_quantized",
]
