"""GGUF straight to `QArray`s: Q8_0, Q4_0, Q4_1 and Q4_K weights load without a round trip through floats.

GGUF quantizes along the input dimension of each `[out, in]` matrix in blocks of 32 (Q4_K: super-blocks
of 256 holding eight 32-element sub-blocks, each with its own 6-bit scale and minimum), which is our
group axis (the contracted one) with a group size of 32:

    Q8_0 -> int8, groups of 32, w = q * d                       (float16 scales, exact)
    Q4_0 -> int4, groups of 32, w = (u - 8) * d                  (float16 scales, exact)
    Q4_1 -> int4, groups of 32, w = u * d + m                    (float16 scales and offsets, exact)
    Q4_K -> int4, groups of 32, w = u * (d * sc) - dmin * mn     (float32 scales and offsets, exact)

ggml packs a 32-block's nibbles exactly as `QArray` packs int4 groups (byte j: element j low, j + 16
high), so codes only move with the matrix's layout change. Layout changes (transposes, head reshapes,
llama's q/k row order) reuse the loader's own tables (`checkpoint.hf_names`, `checkpoint.gguf`): codes go
through them as they are; scales are spread over their 32 elements, moved, and sampled back.
Other tensors (norms, F16/F32 weights, other K-quants) are dequantized as usual; a stacked matrix whose
layers mix encodings becomes a float leaf too, and so does one whose 32-blocks would straddle our group
axis (o with a head dim below 32). `assemble_gguf_quantized` reports what each matrix kept.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from ..config import ModelConfig
from ..params import axes_by_path, contracted_axes, param_specs
from .qarray import QArray

BLOCK = 32
_KEEP_LEAVES = {"q", "k", "v", "o", "w_gate", "w_up", "w_down", "embed", "lm_head"}


class _Blocks:
    """One GGUF tensor, still quantized, in HF layout [out, in]: codes unpacked one per element."""

    def __init__(self, fmt, codes, scales, offsets):
        self.fmt, self.codes, self.scales, self.offsets = fmt, codes, scales, offsets  # scales [out, in/32]

    def _full(self, s):
        """Scales/offsets spread over their elements (they stay so once a layout change has moved them)."""
        return s if s is None or s.shape == self.codes.shape else np.repeat(s, BLOCK, axis=-1)

    def map(self, fn):
        """Apply a layout change `fn` (written for full-size [out, in] arrays) to codes and scales."""
        return _Blocks(self.fmt, fn(self.codes), *(None if s is None else fn(self._full(s)) for s in (self.scales, self.offsets)))

    def float32(self):
        w = self.codes.astype(np.float32)
        if self.fmt == "int4" and self.offsets is None:
            w = w - 8
        w = w * self._full(self.scales).astype(np.float32)
        if self.offsets is not None:
            w = w + self._full(self.offsets).astype(np.float32)
        return w


def read_blocks(tensor, shape):
    """A GGUF tensor as `_Blocks` if its encoding maps onto a QArray, else None."""
    from ..checkpoint.gguf_quants import ggml_type_of, split_blocks

    qtype = ggml_type_of(tensor.tensor_type, tensor.name).name
    if qtype in ("Q8_0", "Q4_0", "Q4_1"):
        b = split_blocks(tensor.data, qtype, shape, tensor.name)
        values = b.values.reshape(shape)
        if qtype == "Q8_0":
            return _Blocks("int8", values.astype(np.int8), b.scale, None)
        codes = (values.astype(np.int16) + (8 if qtype == "Q4_0" else 0)).astype(np.uint8)
        return _Blocks("int4", codes, b.scale, b.offset)
    if qtype == "Q4_K":
        return _split_q4_k(tensor.data, shape, tensor.name)
    return None


def _split_q4_k(raw, shape, name):
    from ..checkpoint.gguf_quants import QK_K, _as_blocks, _f16, _k_low_nibbles, _k_scales_mins, ggml_type_of

    blocks = _as_blocks(raw, ggml_type_of("Q4_K"), shape, name)  # [n, 144]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # [n, 1] float32
    sc, mn = _k_scales_mins(blocks[:, 4:16])  # [n, 8]
    codes = _k_low_nibbles(blocks[:, 16:144]).reshape(-1, QK_K)  # [n, 256] in element order
    rows = (*shape[:-1], shape[-1] // BLOCK)
    return _Blocks(
        "int4", codes.reshape(shape).astype(np.uint8), (d * sc).reshape(rows), (-(dmin * mn)).reshape(rows)
    )


def _pack(codes: np.ndarray, axis: int) -> np.ndarray:
    """uint8 codes -> two per byte along `axis` in groups of 32 (QArray / ggml order)."""
    a = axis % codes.ndim
    g = codes.reshape(*codes.shape[:a], codes.shape[a] // BLOCK, BLOCK, *codes.shape[a + 1 :])
    lo = np.take(g, np.arange(BLOCK // 2), axis=a + 1)
    hi = np.take(g, np.arange(BLOCK // 2, BLOCK), axis=a + 1)
    packed = lo | (hi << 4)
    return packed.reshape(*codes.shape[:a], codes.shape[a] // 2, *codes.shape[a + 1 :])


def _to_qarray(parts: list[_Blocks], path, stacked: bool) -> QArray:
    """Per-layer (or single) `_Blocks` already in our layout -> one QArray (stacked on axis 0)."""
    axes = axes_by_path()[path]
    reduce = contracted_axes(path, axes)
    g = reduce[-1]
    join = (lambda xs: np.stack(xs)) if stacked else (lambda xs: xs[0])
    sample = lambda s: np.take(s, np.arange(0, s.shape[g], BLOCK), axis=g)  # one scale per group
    first = parts[0]
    codes = join([p.codes for p in parts])
    values = _pack(codes, g) if first.fmt == "int4" else codes.astype(np.int8)
    scales = join([sample(p.scales) for p in parts])
    offsets = None if first.offsets is None else join([sample(p.offsets) for p in parts])
    if not stacked:
        axes = tuple(a for a in axes)
    return QArray(
        scales=jnp.asarray(scales), values=jnp.asarray(values),
        offsets=None if offsets is None else jnp.asarray(offsets),
        fmt=first.fmt, reduce_axes=reduce, group_size=BLOCK, dtype_name="", logical_axes=axes,
    )


def _same_encoding(parts) -> bool:
    first = parts[0]
    return all(
        isinstance(p, _Blocks) and p.fmt == first.fmt and (p.offsets is None) == (first.offsets is None)
        and p.scales.dtype == first.scales.dtype
        for p in parts
    )


def assemble_gguf_quantized(reader, hf_config: dict, config: ModelConfig, dtype, source: str = ""):
    """The parameter tree of a GGUF file with its Q8_0/Q4_0/Q4_1/Q4_K matrices kept as `QArray`s.

    Returns `(params, kept)`: `kept` maps each leaf path ("layers/q", "embed", ...) to the encoding it
    kept ("int8", "int4", or "float" where it was dequantized).
    """
    from ..checkpoint import gguf as g
    from ..checkpoint.hf_names import _LAYER, _checked, _top, _transforms, hf_name

    where = f" in {source}" if source else ""
    num_layers = config.num_layers
    specs = param_specs(config)
    layer_specs = specs["layers"]
    per_layer, top = _transforms(config), _top(config)
    heads = {"attn_q": hf_config["num_attention_heads"], "attn_k": hf_config["num_key_value_heads"]}
    permuted = hf_config["model_type"] in g._PERMUTED_QK
    np_dtype = jnp.dtype(dtype)
    dtype_name = np_dtype.name

    layers: dict[str, dict[int, object]] = {}
    tops: dict[str, object] = {}
    for tensor in reader.tensors:
        name = g.hf_tensor_name(tensor.name, num_layers)
        if name is None:
            continue
        shape = g._numpy_shape(tensor)
        m = _LAYER.match(name)
        entry = per_layer.get(m.group(2)) if m else top.get(name)
        if entry is None or (m and entry[0] not in layer_specs) or (not m and entry[0] not in specs):
            continue
        leaf, hf_shape, fn = entry
        if tuple(shape) != tuple(hf_shape):
            _checked(name, np.empty(shape, np.uint8), hf_shape, where)  # raises with the loader's message
        item = read_blocks(tensor, shape) if leaf in _KEEP_LEAVES else None
        if item is None:
            item = g.dequantize(tensor.data, tensor.tensor_type, shape, tensor.name)
        part = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if permuted and part in heads:
            item = item.map(lambda w: g._unpermute(w, heads[part])) if isinstance(item, _Blocks) else g._unpermute(item, heads[part])
        item = item.map(fn) if isinstance(item, _Blocks) else fn(item)
        if m:
            layers.setdefault(leaf, {})[int(m.group(1))] = item
        else:
            tops[leaf] = item

    missing = [hf_name(k, None, config) for k in specs if k != "layers" and k not in tops]
    for leaf in layer_specs:
        missing += [hf_name(leaf, i, config) for i in range(num_layers) if i not in layers.get(leaf, {})]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"missing tensor(s){where}: {', '.join(missing[:5])}{more}")

    kept: dict[str, str] = {}

    def fits(parts, path) -> bool:
        """One encoding throughout, and 32-blocks that do not straddle our group axis (e.g. o's heads)."""
        if not (all(isinstance(p, _Blocks) for p in parts) and _same_encoding(parts)):
            return False
        g = contracted_axes(path, axes_by_path()[path])[-1]
        return parts[0].codes.shape[g] % BLOCK == 0

    def build(parts, path, stacked):
        if fits(parts, path):
            q = _to_qarray(parts, path, stacked)
            kept["/".join(path)] = q.fmt
            return q.replace(dtype_name=dtype_name)
        floats = [p.float32() if isinstance(p, _Blocks) else p for p in parts]
        if path[-1] in _KEEP_LEAVES:
            kept["/".join(path)] = "float"
        arr = np.stack(floats) if stacked else floats[0]
        return jnp.asarray(arr.astype(np_dtype))

    out_layers = {leaf: build([parts[i] for i in range(num_layers)], ("layers", leaf), True) for leaf, parts in layers.items()}
    out_top = {leaf: build([item], (leaf,), False) for leaf, item in tops.items()}
    return {**out_top, "layers": out_layers}, kept
