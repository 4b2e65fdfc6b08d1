"""Quantized weights as parameter transforms: the `QArray` pytree type, recipes and `quantize`.

`quantize(params, recipe)` returns a new tree whose selected matrices are `QArray`s; `ops.matmul` and
`ops.embed` accept them, so the model runs unchanged. `save_quantized` / `load_quantized` store such a
tree in safetensors with its metadata. The GGUF loader can build `QArray`s straight from Q8_0/Q4_0/Q4_1
blocks (`jaxinfer.load(..., keep_quantized=True)`).
"""

from .qarray import FORMATS, QArray, bits_per_element, compute_dtype, dequantize, is_qarray, quantize_array
from .recipe import LAYER_MATRICES, PRESETS, Recipe, dequantize_tree, get_recipe, quantize

__all__ = [
    "FORMATS",
    "LAYER_MATRICES",
    "PRESETS",
    "QArray",
    "Recipe",
    "bits_per_element",
    "compute_dtype",
    "dequantize",
    "dequantize_tree",
    "get_recipe",
    "is_qarray",
    "quantize",
    "quantize_array",
]
