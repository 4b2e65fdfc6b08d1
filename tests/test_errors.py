"""Bad input gets a clear error that names the problem."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxinfer as ji
from hf_tiny import make_hf_model

CONFIG = ji.ModelConfig(vocab_size=64, dim=32, ffn_dim=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def model():
    return ji.Model(config=CONFIG, params=ji.init_params(CONFIG, 0, jnp.float32))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_hf_model("llama", d)
    return d


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ji.ModelConfig.from_hf({"model_type": "gpt2", "vocab_size": 10})


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hidden_act", "gelu", "hidden_act 'gelu'"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope scaling type 'yarn'"),
        ("mlp_bias", True, "mlp_bias"),
        ("attention_bias", True, "attention_bias"),
    ],
)
def test_unsupported_field_values(field, value, message):
    hf = json.loads((ji.config.PRESETS_DIR / "tiny.json").read_text())
    hf[field] = value
    with pytest.raises(ValueError, match=message):
        ji.ModelConfig.from_hf(hf)


def test_missing_config_field():
    with pytest.raises(ValueError, match="hidden_size"):
        ji.ModelConfig.from_hf({"model_type": "llama", "vocab_size": 10})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'llama-9'"):
        ji.ModelConfig.from_preset("llama-9")


def _rewrite(src, dst, edit):
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def test_missing_tensor(hf_dir, tmp_path):
    _rewrite(hf_dir, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        ji.load(tmp_path / "m")


def test_wrong_shape(hf_dir, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"].T.copy()

    _rewrite(hf_dir, tmp_path / "m", edit)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape"):
        ji.load(tmp_path / "m")


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no model at"):
        ji.load("/nonexistent/model/dir")


def test_prompt_longer_than_cache(model):
    with pytest.raises(ValueError, match="exceeds the cache length max_len=16"):
        ji.generate(model, [list(range(1, 13))], max_new_tokens=8, max_len=16)
    cache = ji.init_cache(CONFIG, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="prompt longer than the cache"):
        ji.prefill(model.params, cache, np.ones((1, 9), np.int32), config=CONFIG)


def test_empty_prompt(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        ji.generate(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="no prompts"):
        ji.generate(model, [], max_new_tokens=4)


def test_max_new_tokens_below_one(model):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        ji.generate(model, [[1, 2]], max_new_tokens=0)


def test_out_of_vocab_prompt(model):
    with pytest.raises(ValueError, match="outside"):
        ji.generate(model, [[1, 64]], max_new_tokens=2)


def test_text_without_tokenizer(model):
    with pytest.raises(ValueError, match="no tokenizer"):
        ji.generate(model, ["hello"], max_new_tokens=2)


def test_bad_sampling_and_impl(model):
    with pytest.raises(ValueError, match="top_p"):
        ji.Sampling(temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        ji.Sampling(top_k=-1)
    with pytest.raises(ValueError, match="unknown attention impl 'fast'"):
        ji.generate(model, [[1, 2]], max_new_tokens=2, impl="fast")


def test_bad_config_shapes():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ji.ModelConfig(vocab_size=8, dim=8, ffn_dim=8, num_layers=1, num_heads=3, num_kv_heads=2, head_dim=4)
