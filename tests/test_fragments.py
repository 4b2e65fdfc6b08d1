"""int4 weights in the tensor cores' fragment order: the byte layout, its inverse, the tree transform, the
model on it (XLA's path on the CPU), serialization; natively on the GPU the fragment kernel against float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from kernel_tools import cuda_lowering
from jaxinfer import ops
from jaxinfer.quant import fragments
from jaxinfer.quant.qarray import dequantize, quantize_array, to_fragment_order, to_row_order

# Every matrix fits the order: N (head_dim, dim, ffn_dim, vocab) multiples of 64, K (dim, heads x head_dim,
# ffn_dim) multiples of 256.
CONFIG = ji.ModelConfig(vocab_size=256, dim=256, ffn_dim=512, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=64, max_seq_len=64)


def test_pack_codes_puts_each_code_where_the_layout_says():
    """Code (n, k) of a 64 x 256 block sits in byte 8 (128 s + t) + 4 j + e of the block read row-major, low
    nibble for rows n % 64 = 16 w + r and high for 16 w + 8 + r, where s = (k % 256) // 32, t = 32 w + 4 r + c
    and k % 32 = 16 j + 4 c + e: the byte wgmma's 8-bit A register (j, h) of thread t takes at step s."""
    rng = np.random.default_rng(0)
    u = rng.integers(0, 16, (128, 512)).astype(np.uint8)
    v = np.asarray(fragments.pack_codes(jnp.asarray(u)))
    assert v.shape == (128, 256) and v.dtype == np.uint8
    for n in range(128):
        for k in range(512):
            b, nr = divmod(n, 64)
            kb, kr = divmod(k, 256)
            s, kk = divmod(kr, 32)
            w, rest = divmod(nr, 16)
            h, r = divmod(rest, 8)
            j, rest = divmod(kk, 16)
            c, e = divmod(rest, 4)
            t = 32 * w + 4 * r + c
            block = v[64 * b:64 * b + 64, 128 * kb:128 * kb + 128].reshape(-1)
            byte = int(block[8 * (128 * s + t) + 4 * j + e])
            assert (byte >> (4 * h)) & 0xF == u[n, k], (n, k)
    np.testing.assert_array_equal(np.asarray(fragments.unpack_codes(jnp.asarray(v))), u)


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("shape,reduce_axes,group", [((2, 128, 512), (-1,), 128), ((64, 4, 128), (-2, -1), 64),
                                                     ((3, 64, 256), (-1,), 32)])
def test_fragment_order_round_trips_and_dequantizes_the_same(zero_point, shape, reduce_axes, group):
    w = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    q = quantize_array(w, "int4", reduce_axes, group, zero_point=zero_point)
    f = to_fragment_order(q)
    assert f.order == "fragments" and f.shape == q.shape and f.values.shape == q.values.shape
    assert not np.array_equal(np.asarray(f.values), np.asarray(q.values))  # the bytes did move
    for a, b in zip(jax.tree.leaves(to_row_order(f)), jax.tree.leaves(q)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(dequantize(f)), np.asarray(dequantize(q)))
    assert to_fragment_order(f) is f


def test_fragment_order_errors_name_the_problem():
    w = jnp.ones((96, 512), jnp.float32)
    with pytest.raises(ValueError, match="N a multiple of 64"):
        to_fragment_order(quantize_array(w, "int4", (-1,), 64))
    with pytest.raises(ValueError, match="int4"):
        to_fragment_order(quantize_array(jnp.ones((64, 256)), "int8", (-1,)))
    with pytest.raises(ValueError, match="groups of 32, 64, 128 or 256"):
        to_fragment_order(quantize_array(jnp.ones((64, 1024)), "int4", (-1,), 512))
    params = ji.init_params(CONFIG, 0, jnp.float32)
    with pytest.raises(ValueError, match="quantized to int4"):
        ji.fragment_order(ji.contract_last(params))
    small = ji.ModelConfig(vocab_size=96, dim=96, ffn_dim=192, num_layers=1, num_heads=3, num_kv_heads=1, head_dim=32)
    tree = ji.quantize(ji.contract_last(ji.init_params(small, 0, jnp.float32)), "int4-g32")
    with pytest.raises(ValueError, match="fits the fragment order"):
        ji.fragment_order(tree)


def _trees(dtype=jnp.float32):
    params = ji.init_params(CONFIG, 0, dtype)
    rows = ji.quantize(ji.contract_last(params), "int4-g64")
    return rows, ji.fragment_order(rows)


def _prefill_then_decode(params, tokens, cache_dtype, steps=3):
    """Float32 logits of a prefill of `tokens` [B, T], then of `steps` decode steps fed tokens[:, t], stacked."""
    cache = ji.init_cache(CONFIG, tokens.shape[0], 32, cache_dtype)
    logits, cache = ji.prefill(params, cache, tokens, config=CONFIG)
    out = [logits]
    for t in range(steps):
        logits, cache = ji.decode_step(params, cache, tokens[:, t], config=CONFIG)
        out.append(logits)
    return np.stack([np.asarray(o, np.float32) for o in out])


def test_model_on_fragment_order_matches_row_order():
    rows, frags = _trees()
    orders = [leaf.values.order for leaf in jax.tree.leaves(frags, is_leaf=ji.weight_layout.is_contract_last)
              if ji.weight_layout.is_contract_last(leaf)]
    assert orders and set(orders) == {"fragments"}
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 12)).astype(np.int32)
    run = lambda params: _prefill_then_decode(params, tokens, jnp.float32)  # noqa: E731
    np.testing.assert_allclose(run(frags), run(rows), rtol=1e-5, atol=1e-5)  # (q/k/v, gate/up packed)
    assert {"qkv", "w_gate_up"} <= set(frags["layers"]) and "w_gate" not in frags["layers"]


def test_gpu_dispatch_takes_a_fragment_ordered_tree(monkeypatch):
    """With the GPU-only kernels' dispatch switched on (interpreted here), a fragment-ordered tree, its q/k/v
    and gate/up packed, runs decode: no kernel that reads row order takes its weights."""
    rows, frags = _trees(jnp.bfloat16)
    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 6)).astype(np.int32)

    def step(params):  # (the cache is donated: a fresh one each time)
        _, cache = ji.prefill(params, ji.init_cache(CONFIG, 2, 16, jnp.bfloat16), tokens, config=CONFIG)
        return ji.decode_step(params, cache, tokens[:, 0], config=CONFIG, impl="auto")[0]

    want = step(rows)
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    monkeypatch.setattr(ops, "ADD_NORM_KERNEL", False)
    got = step(frags)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


def _dequantized_stand_in(values, scales, offsets, layer, group_size):
    pick = (lambda a: a) if layer is None else (lambda a: None if a is None else a[layer])
    q = to_row_order(quantize_array(jnp.zeros((64, 256)), "int4", (-1,), 64).replace(
        values=pick(values), scales=pick(scales), offsets=pick(offsets), group_size=group_size, order="fragments"))
    return dequantize(q, jnp.float32)


@pytest.mark.parametrize("switch", [None, "ADD_NORM_DIGITS", "MERGE_DIGITS"])
def test_x_prepared_by_its_producer_reaches_the_fragment_products(monkeypatch, switch):
    """GPU dispatch walked in interpret mode, with one of these switches on (or none). With `ops.ADD_NORM_DIGITS`
    each add + norm launch before q/k/v and gate/up also writes x's digits; with `ops.MERGE_DIGITS` the decode
    attention's unmerged splits are merged by o's preparation (`x_digits_merged`). Those products read x
    prepared by its producer instead of an `x_digits` launch of their own: with a switch on, fewer `x_digits`
    launches than products; with none, one each. The Mosaic kernel (GPU only) is replaced by a jnp stand-in: the
    product of the dequantized weight with x rebuilt from its digits (sums checked in tests/test_add_rms_norm.py
    and tests/test_x_digits.py). Decode gives the XLA path's logits to the digits' rounding."""
    from pallas_kernels import fragment_matmul as fm
    from pallas_kernels import x_digits as xd

    _, frags = _trees(jnp.bfloat16)
    tokens = np.random.default_rng(3).integers(0, CONFIG.vocab_size, (4, 6)).astype(np.int32)

    def step(params):
        _, cache = ji.prefill(params, ji.init_cache(CONFIG, 4, 16, jnp.bfloat16), tokens, config=CONFIG)
        return np.asarray(ji.decode_step(params, cache, tokens[:, 0], config=CONFIG, impl="auto")[0], np.float32)

    want = step(frags)
    calls = {"x_digits": 0, "products": 0}
    own = xd.x_digits

    def x_digits(*a, **kw):
        calls["x_digits"] += 1
        return own(*a, **kw)

    def digits(d, inv_q, sums, values, scales, offsets=None, layer=None, *, rows, group_size, out_dtype):
        calls["products"] += 1
        p = d.shape[0] // 2
        t = d[:p].astype(jnp.float32) * 256 + d[p:].astype(jnp.float32)
        x = t[:rows] * inv_q[:rows, None]
        return (x @ _dequantized_stand_in(values, scales, offsets, layer, group_size).T).astype(out_dtype)

    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    for name in ("ADD_NORM_DIGITS", "MERGE_DIGITS"):
        monkeypatch.setattr(ops, name, name == switch)
    monkeypatch.setattr(ops, "_fragment_kernel_applies", lambda spec, x, w: True)
    monkeypatch.setattr(xd, "x_digits", x_digits)
    monkeypatch.setattr(fm, "fragment_matmul_digits", digits)
    jax.clear_caches()  # (decode_step's jit would reuse the trace above)
    got = step(frags)
    assert calls["x_digits"] and (calls["x_digits"] < calls["products"]) == (switch is not None)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


def test_matmul_of_a_fragment_ordered_weight_is_the_dequantized_product():
    w = jax.random.normal(jax.random.key(2), (256, 512), jnp.float32)
    q = to_fragment_order(quantize_array(w, "int4", (-1,), 128, zero_point=True))
    x = jax.random.normal(jax.random.key(3), (5, 512), jnp.float32)
    got = ops.matmul("mk,nk->mn", x, q, jnp.float32)
    want = np.asarray(x, np.float64) @ np.asarray(dequantize(to_row_order(q), jnp.float32), np.float64).T
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="row order"):
        ops.embed(q, jnp.array([0, 3]))


def test_save_and_load_keep_the_order_and_the_layout(tmp_path):
    """The file keeps the fragment order and the layout wrappers (contract-last, packed q/k/v and gate/up): the
    loaded tree is the saved one, and runs."""
    _, frags = _trees()
    path = ji.save_quantized(tmp_path / "f.safetensors", frags)
    back, _ = ji.load_quantized(path)
    assert jax.tree.structure(back) == jax.tree.structure(frags)  # static fields (order, parts, ...) included
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(frags)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back["layers"]["o"].values.order == "fragments"
    abstract, _ = ji.load_quantized(path, abstract=True)
    assert jax.tree.structure(abstract) == jax.tree.structure(frags)
    tokens = np.arange(6, dtype=np.int32).reshape(1, 6)
    logits, _ = ji.prefill(back, ji.init_cache(CONFIG, 1, 16, jnp.float32), tokens, config=CONFIG)
    want, _ = ji.prefill(frags, ji.init_cache(CONFIG, 1, 16, jnp.float32), tokens, config=CONFIG)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))


def test_a_file_of_another_fragment_byte_order_is_refused(tmp_path):
    """A fragment-ordered file written with another byte-order version (or none: version 1) is refused with an
    error naming the leaf and the versions, not read as codes in the wrong places."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file

    from jaxinfer.quant import serialize

    _, frags = _trees()
    path = ji.save_quantized(tmp_path / "f.safetensors", frags)
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()[serialize.METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for info in meta["leaves"].values():
        info.pop("fragment_layout", None)  # as files of the 16-bit layout were written
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={serialize.METADATA_KEY: json.dumps(meta)})
    with pytest.raises(ValueError, match="fragment byte order version 1, this library reads version 2"):
        ji.load_quantized(old)


def test_sums_layout_keeps_rows_whole_and_boxes_small():
    """x's group sums: each group's padded rows fit, a row holds whole groups in 128-byte multiples, a TMA box
    stays within 256 floats, and at 16 rows in groups of 128 there is no padding to add."""
    from pallas_kernels import fragment_matmul as fm

    for m in range(1, fm.MAX_ROWS + 1):
        mp = fm.padded_rows(m)
        for group in fm.GROUPS:
            n_groups = fm.STEP // group
            width, per_row = fm.sums_layout(mp, n_groups)
            assert width >= mp and n_groups % per_row == 0, (m, group)
            assert per_row * width <= 256 and (per_row * width * 4) % 128 == 0, (m, group)
    assert fm.sums_layout(16, 2) == (16, 2)


@pytest.mark.parametrize("rows,k,n,group,offsets", [(1, 4096, 6144, 128, True), (16, 4096, 28672, 128, True),
                                                   (40, 14336, 4096, 256, True), (64, 2048, 384, 32, True),
                                                   (5, 2048, 384, 64, False)])
def test_the_kernel_lowers_for_cuda_on_the_cpu(rows, k, n, group, offsets):
    """Mosaic GPU lowers the kernel (layouts, TMA boxes, the inline PTX's register layout, the transposed store)
    while JAX lowers the call, GPU or not: API and shape mistakes fail here, with K split and not."""
    from pallas_kernels import fragment_matmul as fm

    x = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16)
    values = jax.ShapeDtypeStruct((2, n, k // 2), jnp.uint8)
    scales = jax.ShapeDtypeStruct((2, n, k // group), jnp.float16)
    text = cuda_lowering(lambda x, v, s, m, i: fm.fragment_matmul(x, v, s, m, i, group_size=group), x, values,
                         scales, scales if offsets else None, jax.ShapeDtypeStruct((), jnp.int32))
    assert "mosaic_gpu" in text


# -- the kernel, natively on the GPU -------------------------------------------------------------------------


def _reference(x, q, layer):
    w = np.asarray(dequantize(to_row_order(q), jnp.float32), np.float64)[layer]
    return np.asarray(x, np.float64) @ w.T


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 5, 16, 24, 40, 64])
@pytest.mark.parametrize("group,zero_point", [(128, True), (64, True), (32, True), (256, True), (64, False),
                                              (256, False)])
def test_fragment_kernel_matches_float64(rows, group, zero_point):
    """Within 1e-5 of the float64 product of x's fixed point (the integer products are exact), and within
    1e-4 of x's own (the fixed point rounds by 2^-16 of a row's largest |value|)."""
    from pallas_kernels import fragment_matmul as fm
    from pallas_kernels.x_digits import x_digits_reference

    L, N, K = 3, 384, 2048
    w = jax.random.normal(jax.random.key(rows), (L, N, K), jnp.float32)
    q = to_fragment_order(quantize_array(w, "int4", (-1,), group, zero_point=zero_point))
    x = jax.random.normal(jax.random.key(7), (rows, K), jnp.float32).astype(jnp.bfloat16)
    got = np.asarray(fm.fragment_matmul(x, q.values, q.scales, q.offsets, jnp.int32(2), group_size=group,
                                        out_dtype=jnp.float32), np.float64)
    mp = fm.padded_rows(rows)
    digits, inv_q, _ = (np.asarray(a, np.float64) for a in x_digits_reference(x, rows=mp, group_size=group))
    x_fixed = (digits[:rows] * 256 + digits[mp:mp + rows]) * inv_q[:rows, None]
    for xs, tol in ((x_fixed, 1e-5), (x, 1e-4)):
        want = _reference(xs, q, 2)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < tol, (err, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("producers", [False, True])
def test_fragment_kernel_runs_the_model_on_the_gpu(monkeypatch, producers):
    """Batched prefill and decode on a fragment-ordered tree take the kernel and give the row-ordered tree's
    logits (which take the Triton weight kernel); with x prepared by its producers (`ops.ADD_NORM_DIGITS`,
    `ops.MERGE_DIGITS`) and without."""
    from pallas_kernels import fragment_matmul as fm

    for switch in ("ADD_NORM_DIGITS", "MERGE_DIGITS"):
        monkeypatch.setattr(ops, switch, producers)
    jax.clear_caches()  # (jit caches do not see the switches)

    rows, frags = _trees(jnp.bfloat16)
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 12)).astype(np.int32)
    calls = []
    kernel = fm.fragment_matmul_digits  # (every fragment product reaches the kernel through it)
    monkeypatch.setattr(fm, "fragment_matmul_digits", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    run = lambda params: _prefill_then_decode(params, tokens, jnp.bfloat16)  # noqa: E731
    ref = run(rows)
    assert not calls
    got = run(frags)
    assert calls
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-2


def test_packed_gate_up_is_refused_on_a_mesh():
    _, frags = _trees()
    from jaxinfer.sharding import tree_shardings

    with pytest.raises(ValueError, match="unsharded"):
        tree_shardings(frags, CONFIG, ji.make_mesh())


def test_the_fragments_layout_needs_int4():
    from jaxinfer.bench.runner import BenchSpec

    with pytest.raises(ValueError, match="needs quant='int4'"):
        BenchSpec(config=CONFIG, weight_layout="fragments", quant="int8")


def test_sharding_refuses_splits_that_cut_the_fragment_blocks():
    from types import SimpleNamespace

    from jaxinfer.sharding import _check_fragment_split

    q = to_fragment_order(quantize_array(jnp.ones((2, 256, 512)), "int4", (-1,), 128))
    mesh = SimpleNamespace(shape={"tensor": 2, "data": 1})
    split = lambda *spec: q.replace(values=SimpleNamespace(spec=spec, mesh=mesh))  # noqa: E731
    _check_fragment_split(q, split(None, "tensor", None), "o")  # column-parallel: whole 128-row halves
    _check_fragment_split(q, split(None, None, "data"), "o")  # a mesh axis of one splits nothing
    with pytest.raises(ValueError, match="contracted axes"):
        _check_fragment_split(q, split(None, None, "tensor"), "o")
    narrow = to_fragment_order(quantize_array(jnp.ones((64, 512)), "int4", (-1,), 128))
    with pytest.raises(ValueError, match="whole blocks of 64 rows"):
        _check_fragment_split(narrow, narrow.replace(values=SimpleNamespace(spec=("tensor",), mesh=mesh)), "q")
