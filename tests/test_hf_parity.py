"""Parity with Hugging Face transformers (torch, CPU) on tiny random models of every supported family."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxinfer as ji
from hf_tiny import FAMILIES, make_hf_model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, directory)
    model = ji.load(directory, dtype=jnp.float32)
    return request.param, hf, model, directory


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def test_config_read(pair):
    family, hf, model, directory = pair
    c = model.config
    assert c.num_layers == hf.config.num_hidden_layers
    assert c.num_kv_heads == hf.config.num_key_value_heads
    assert c.tie_embeddings == bool(hf.config.tie_word_embeddings)
    assert ("lm_head" in model.params) == (not c.tie_embeddings)


def test_logits_match_on_padded_batch(pair):
    family, hf, model, _ = pair
    rng = np.random.default_rng(0)
    lengths = [23, 9, 16]
    tokens = np.zeros((3, 23), np.int32)
    rows = [rng.integers(2, model.config.vocab_size, n).tolist() for n in lengths]
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    cache = ji.init_cache(model.config, 3, 32, jnp.float32)
    logits, cache = ji.forward(model.params, cache, jnp.asarray(tokens), jnp.asarray(lengths), config=model.config)
    logits = np.asarray(logits)
    for i, r in enumerate(rows):
        err = rel_err(logits[i, : len(r)], hf_logits(hf, r))
        assert err < 1e-4, (family, i, err)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)


def test_greedy_generation_matches(pair):
    family, hf, model, _ = pair
    prompt = [5, 17, 42, 99, 3, 250]
    ours = ji.generate(model, [prompt], max_new_tokens=32).token_ids[0]
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert ours == theirs, family


def test_prefix_then_decode_equals_one_forward(pair):
    family, _, model, _ = pair
    c = model.config
    rng = np.random.default_rng(1)
    seq = rng.integers(0, c.vocab_size, (2, 20)).astype(np.int32)
    full, _ = ji.forward(model.params, ji.init_cache(c, 2, 32, jnp.float32), jnp.asarray(seq), config=c)
    full = np.asarray(full)
    cache = ji.init_cache(c, 2, 32, jnp.float32)
    logits, cache = ji.prefill(model.params, cache, seq[:, :12], config=c)
    np.testing.assert_allclose(np.asarray(logits), full[:, 11], rtol=1e-4, atol=1e-4)
    for t in range(12, 20):
        logits, cache = ji.decode_step(model.params, cache, seq[:, t], config=c)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=1e-4, atol=1e-4)


def test_sharded_safetensors_with_index(tmp_path):
    hf = make_hf_model("llama", tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a = ji.load(tmp_path / "one")
    b = ji.load(tmp_path / "sharded")
    for x, y in zip(jax_leaves(a.params), jax_leaves(b.params)):
        np.testing.assert_array_equal(x, y)


def test_load_casts_dtype(tmp_path):
    make_hf_model("qwen2", tmp_path)
    model = ji.load(tmp_path, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax_leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}
    ids = ji.generate(model, [[1, 2, 3]], max_new_tokens=4).token_ids[0]
    assert len(ids) == 4 and all(0 <= t < model.config.vocab_size for t in ids)


def test_eos_from_generation_config_stops(tmp_path):
    hf = make_hf_model("llama", tmp_path)
    prompt = [5, 17, 42]
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    stop = int(greedy[0, len(prompt) + 2])
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    gen["eos_token_id"] = stop
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    model = ji.load(tmp_path)
    assert model.eos_ids == (stop,)
    ids = ji.generate(model, [prompt], max_new_tokens=8).token_ids[0]
    assert ids[-1] == stop and len(ids) == ids.index(stop) + 1


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
