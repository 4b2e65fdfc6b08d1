"""Generation loop, sampling and recompilation behaviour, on a tiny random model (no checkpoint)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from jaxinfer.sampling import sequence_keys

CONFIG = ji.ModelConfig(vocab_size=96, dim=32, ffn_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def model():
    params = ji.init_params(CONFIG, 0, jnp.float32)
    return ji.Model(config=CONFIG, params=params, name="tiny")


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block."""
    counter = {"n": 0}

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counter["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_new_sampling_values_seeds_and_lengths_do_not_recompile(model):
    def run(temp, top_p, min_p, seed, prompt_len):
        prompts = [list(range(1, prompt_len + 1)), list(range(3, 3 + prompt_len // 2 + 1))]
        s = ji.Sampling(temperature=temp, top_p=top_p, min_p=min_p, top_k=0)
        ji.generate(model, prompts, max_new_tokens=6, sampling=s, seed=seed, max_len=64)
        list(ji.stream(model, prompts, max_new_tokens=3, sampling=s, seed=seed, max_len=64))

    run(0.7, 0.9, 0.0, 0, 9)  # warm: compiles prefill bucket 16, the loop, the stream step
    with count_compiles() as c:
        run(1.3, 0.5, 0.1, 7, 12)
        run(0.0, 1.0, 0.05, 3, 16)
        run(0.2, 0.95, 0.0, 11, 10)
    assert c["n"] == 0
    with count_compiles() as c:  # a new bucket (17..32) does compile: the counter works
        run(0.7, 0.9, 0.0, 0, 20)
    assert c["n"] > 0


def test_temperature_zero_is_greedy(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    greedy = ji.generate(model, prompts, max_new_tokens=12).token_ids
    zero = ji.generate(model, prompts, max_new_tokens=12, sampling=ji.Sampling(temperature=0.0, top_p=0.3), seed=5)
    assert greedy == zero.token_ids
    # And greedy really is argmax of a forward pass over the growing sequence.
    seq = list(prompts[0])
    for t in greedy[0][:4]:
        logits, _ = ji.forward(model.params, ji.init_cache(CONFIG, 1, 32, jnp.float32), jnp.asarray([seq]), config=CONFIG)
        assert int(np.argmax(logits[0, -1])) == t
        seq.append(t)


def test_generate_equals_stream(model):
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    s = ji.Sampling(temperature=0.8, top_p=0.9)
    gen = ji.generate(model, prompts, max_new_tokens=10, sampling=s, seed=3).token_ids
    chunks = [c.token_ids for c in ji.stream(model, prompts, max_new_tokens=10, sampling=s, seed=3)]
    streamed = [[int(c[i]) for c in chunks if c[i] >= 0] for i in range(2)]
    assert gen == streamed


def test_large_batch_decode_loop_splits_the_layers_once(model, monkeypatch):
    """A decode loop over more rows than the product kernel takes gets the layers split once, before the
    loop (`model.split_for_loop`): its forward runs a tuple of stacks of one. Same tokens as the stacked
    layers and as the per-step stream."""
    from jaxinfer import model as model_lib
    from jaxinfer import ops
    from jaxinfer.bench import switched

    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    seen = []
    layers = model_lib.decoder_layers
    monkeypatch.setattr(model_lib, "decoder_layers", lambda lp, *a, **k: seen.append(type(lp)) or layers(lp, *a, **k))
    with switched(ops, {"SPLIT_KERNEL_MAX_ROWS": 1}):  # two rows are "many"
        split = ji.generate(model, prompts, max_new_tokens=10).token_ids
        assert tuple in seen
        seen.clear()
        with switched(model_lib, {"SPLIT_LAYERS": False}):
            stacked = ji.generate(model, prompts, max_new_tokens=10).token_ids
        assert tuple not in seen
    chunks = [c.token_ids for c in ji.stream(model, prompts, max_new_tokens=10)]
    assert split == stacked == [[int(c[i]) for c in chunks if c[i] >= 0] for i in range(2)]


def test_per_sequence_stops(model):
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    free = ji.generate(model, prompts, max_new_tokens=10).token_ids
    stop = free[0][3]
    out = ji.generate(model, prompts, max_new_tokens=[10, 4], stop_ids=[stop]).token_ids
    assert out[0] == free[0][: free[0].index(stop) + 1]
    expected1 = free[1][:4]
    if stop in expected1:
        expected1 = expected1[: expected1.index(stop) + 1]
    assert out[1] == expected1


def _draws(logits, sampling, n=4000):
    keys = sequence_keys(np.arange(n), n)
    batch = jnp.broadcast_to(logits, (n, logits.shape[-1]))
    return np.asarray(jax.jit(ji.sample)(batch, keys, sampling.for_batch(n)))


def test_top_k_top_p_min_p_stay_in_allowed_set():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=50) * 2.0, jnp.float32)
    probs = np.asarray(jax.nn.softmax(logits))
    order = np.argsort(-probs)

    draws = _draws(logits, ji.Sampling(temperature=1.0, top_k=5))
    assert set(draws) <= set(order[:5]) and len(set(draws)) == 5

    cum = np.cumsum(probs[order])
    nucleus = set(order[: int(np.searchsorted(cum, 0.6)) + 1])
    draws = _draws(logits, ji.Sampling(temperature=1.0, top_p=0.6))
    assert set(draws) <= nucleus and len(set(draws)) == len(nucleus)

    allowed = set(np.nonzero(probs >= 0.2 * probs.max())[0])
    draws = _draws(logits, ji.Sampling(temperature=1.0, min_p=0.2))
    assert set(draws) <= allowed and len(set(draws)) == len(allowed)


def test_sampling_follows_the_distribution():
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.2, 0.0 + 1e-9]))
    draws = _draws(logits, ji.Sampling(temperature=1.0), n=8000)
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq[:3], [0.5, 0.3, 0.2], atol=0.025)
    hot = np.bincount(_draws(logits, ji.Sampling(temperature=0.25), n=8000), minlength=4) / 8000
    assert hot[0] > 0.85  # low temperature sharpens


def test_per_sequence_sampling_values(model):
    s = ji.Sampling(temperature=jnp.asarray([0.0, 1.5]))
    a = ji.generate(model, [[1, 2], [1, 2]], max_new_tokens=8, sampling=s, seed=0).token_ids
    greedy = ji.generate(model, [[1, 2]], max_new_tokens=8).token_ids[0]
    assert a[0] == greedy and a[1] != greedy


def test_paged_cache_matches_dense(model):
    c = CONFIG
    rng = np.random.default_rng(2)
    seq = rng.integers(0, c.vocab_size, (2, 14)).astype(np.int32)
    dense_logits, _ = ji.forward(model.params, ji.init_cache(c, 2, 32, jnp.float32), jnp.asarray(seq), config=c)
    alloc = ji.PageAllocator(num_pages=16)
    cache = ji.init_paged_cache(c, batch=2, num_pages=16, page_size=4, max_pages_per_seq=8, dtype=jnp.float32)
    cache = alloc.reserve(alloc.reserve(cache, 1, 14), 0, 14)  # interleaved pages
    logits, cache = ji.forward(model.params, cache, jnp.asarray(seq[:, :9]), config=c)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(dense_logits[:, :9]), rtol=1e-5, atol=1e-5)
    for t in range(9, 14):
        logits, cache = ji.forward(model.params, cache, jnp.asarray(seq[:, t : t + 1]), config=c)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(dense_logits[:, t]), rtol=1e-5, atol=1e-5)
    cache = alloc.free(cache, 0)
    assert len(alloc.free_pages) == 16 - 4 and int(cache.lengths[0]) == 0


def test_differentiable_training_reduces_loss():
    import optax

    params = ji.init_params(CONFIG, 1, jnp.float32)
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (4, 17)), jnp.int32)

    def loss_fn(p):
        cache = ji.init_cache(CONFIG, 4, 16, jnp.float32)
        logits, _ = ji.forward(p, cache, tokens[:, :-1], config=CONFIG)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    losses = []
    for _ in range(15):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
