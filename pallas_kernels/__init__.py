"""Pallas attention kernels for NVIDIA GPUs (Triton lowering; the prefill kernel also has a Mosaic GPU
version for Hopper), each with an interpret mode and a plain-jnp reference. Kernels take arrays and
static ints; they know nothing about models."""
from pallas_kernels.decode_attention import (decode_attention, decode_attention_append,
                                              decode_attention_reference)
from pallas_kernels.decode_attention import supports_append as decode_attention_supports_append
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.paged_attention import (paged_decode_attention,
                                            paged_decode_attention_reference)

__all__ = [
    "decode_attention",
    "decode_attention_append",
    "decode_attention_reference",
    "decode_attention_supports_append",
    "flash_attention",
    "flash_attention_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
]
