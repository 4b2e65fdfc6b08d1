"""The benchmark: analytic FLOP/byte counts (by hand and against XLA's cost analysis), the rate and
ratio arithmetic, and `jaxinfer bench` end to end on the CPU with the tiny preset (JSON + PNG)."""

import argparse
import importlib
import json

import jax
import jax.numpy as jnp
import pytest

from jaxinfer.bench import costs
from jaxinfer.bench.ceilings import Ceilings, datasheet_for, measure_ceilings
from jaxinfer.bench.measure import Timing, switched, switched_modules, time_calls
from jaxinfer.bench.profile import Event, hlo_op_names, idle_report, marked_skew
from jaxinfer.bench.runner import evaluate
from jaxinfer.cache import init_cache
from jaxinfer.config import ModelConfig
from jaxinfer.params import abstract_params

gen = importlib.import_module("jaxinfer.generate")
TINY = ModelConfig.from_preset("tiny")  # V=512, D=64, F=128, L=2, N=4, K=2, H=16, untied


def test_tiny_costs_by_hand():
    # One layer's matrices: q 64*4*16 + k,v 64*2*16 each + o 4*16*64 + gate, up, down 64*128 each.
    per_layer = 4096 + 2048 + 2048 + 4096 + 3 * 8192
    assert costs.layer_matrix_elements(TINY) == per_layer == 36864
    head = 64 * 512
    d = costs.decode_cost(TINY, batch=3, context=10, dtype=jnp.bfloat16)
    assert d.matmul_flops == 2 * 3 * (2 * per_layer + head)
    assert d.attention_flops == 3 * 2 * 4 * 4 * 16 * 11  # B * L * 4NH * (context + the new token)
    # bf16 weights: both layers (matrices + 2 norms of 64), final norm, head, 3 embedding rows.
    assert d.weight_bytes == 2 * (2 * (per_layer + 128) + 64 + head + 3 * 64)
    kv_token = 2 * 2 * 2 * 16 * 2  # k and v, L=2, K=2, H=16, 2 bytes
    assert d.kv_read_bytes == 3 * 11 * kv_token and d.kv_write_bytes == 3 * kv_token
    assert d.bytes == d.weight_bytes + d.kv_read_bytes

    p = costs.prefill_cost(TINY, batch=2, prompt_len=5, dtype=jnp.bfloat16)
    assert p.matmul_flops == 2 * (2 * 5 * 2 * per_layer + 2 * head)  # the head only at the last token
    assert p.attention_flops == 2 * 2 * 4 * 4 * 16 * (1 + 2 + 3 + 4 + 5)  # causal: query i sees i + 1 keys
    assert p.tokens == 10 and p.kv_write_bytes == 10 * kv_token


def test_quantized_weights_stream_codes_and_scales():
    bf16 = costs.streamed_weight_bytes(TINY, jnp.bfloat16)
    int8 = costs.streamed_weight_bytes(TINY, jnp.bfloat16, quant="int8")
    # Per-channel int8: 1 byte a code instead of 2, plus a float32 scale per output channel
    # (elements / contracted size): q, k, v, gate, up contract D=64, o contracts N*H=64, down F=128.
    elements = {"q": 2 * 4096, "k": 2 * 2048, "v": 2 * 2048, "o": 2 * 4096, "w_gate": 2 * 8192,
                "w_up": 2 * 8192, "w_down": 2 * 8192, "lm_head": 64 * 512}
    contracted = {"w_down": 128}
    scales = sum(4 * n // contracted.get(name, 64) for name, n in elements.items())
    assert int8 == bf16 - sum(elements.values()) + scales
    with pytest.raises(ValueError, match="unknown quantization recipe"):
        costs.streamed_weight_bytes(TINY, jnp.bfloat16, quant="int3")


# XLA's cost analysis counts a while-loop body once, so compare on one layer (the scan of one step).
ONE_LAYER = ModelConfig(vocab_size=256, dim=128, ffn_dim=512, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32)


def _xla_cost(fn, *args, **kw):
    return fn.lower(*args, **kw).compile().cost_analysis()


def test_decode_counts_match_xla_cost_analysis():
    c, B, S = ONE_LAYER, 2, 16
    params = abstract_params(c, jnp.float32)
    cache = jax.eval_shape(lambda: init_cache(c, B, S, jnp.float32))
    tok, act = jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((B,), bool)
    xla = _xla_cost(gen._decode, params, cache, tok, act, config=c, impl="xla")
    # A cache already full to S - 1: the new token attends all S slots, as XLA's dense einsum does.
    ours = costs.decode_cost(c, B, S - 1, jnp.float32)
    assert xla["flops"] == pytest.approx(ours.flops, rel=0.03)  # the rest is elementwise work
    # Bytes: ours is the floor (weights + KV once); XLA adds activations and layout copies on top.
    assert ours.min_bytes <= xla["bytes accessed"] <= 1.6 * ours.min_bytes


def test_prefill_flops_match_xla_cost_analysis():
    c, B, T = ONE_LAYER, 2, 16
    params = abstract_params(c, jnp.float32)
    cache = jax.eval_shape(lambda: init_cache(c, B, T, jnp.float32))
    toks, lens = jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32)
    xla = _xla_cost(gen._prefill, params, cache, toks, lens, config=c, impl="xla")
    ours = costs.prefill_cost(c, B, T, jnp.float32)
    # XLA's reference attention computes every (query, key) pair and masks; ours counts the causal half.
    dense_attention = 4 * c.num_heads * c.head_dim * B * T * T
    assert xla["flops"] == pytest.approx(ours.matmul_flops + dense_attention, rel=0.03)
    assert ours.attention_flops < dense_attention


def _ceilings(copy=1e12, mm=1e14):
    return Ceilings(device="test", platform="cpu", copy_bytes_per_s=copy, copy_method="xla_copy",
                    copy_by_method={"xla_copy": copy}, read_bytes_per_s=copy, matmul_flops_per_s=mm,
                    matmul_n=128, matmul_dtype="bfloat16", datasheet=None)


def test_rates_ratios_prediction_and_price():
    cost = costs.StepCost(matmul_flops=1e11, attention_flops=0.0, weight_bytes=4e9, kv_read_bytes=1e9,
                          kv_write_bytes=0.0, tokens=8)
    t = 0.01
    m = evaluate("decode", 8, 100, Timing(t, (t,), 1), t, cost, _ceilings(), gpu_hour_price=3.6)
    assert m.mbu == pytest.approx(5e9 / t / 1e12)  # 0.5
    assert m.mfu == pytest.approx(1e11 / t / 1e14)  # 0.1
    assert m.predicted_seconds == pytest.approx(5e-3)  # memory-bound: 5 GB at 1 TB/s
    assert m.tokens_per_s == pytest.approx(800)
    assert m.usd_per_mtok == pytest.approx(3.6 / 3600 * t / 8 * 1e6)
    assert cost.intensity == pytest.approx(20.0)


def test_time_calls_takes_median_and_rewinds():
    seen = []
    timing = time_calls(lambda: jnp.ones(4) * 2, calls=3, samples=4, warmup=1,
                        before_sample=lambda: seen.append(1))
    assert len(timing.samples) == 4 and len(seen) == 4 and timing.calls == 3
    assert min(timing.samples) <= timing.median <= max(timing.samples) and timing.median > 0


def test_switched_sets_module_knobs_for_the_block_and_restores_them():
    """A traced function reads the switch: inside the block it is retraced with the new value, after it the
    old value is back (also when the block raises)."""
    import types

    knobs = types.SimpleNamespace(SCALE=2.0)
    f = jax.jit(lambda x: x * knobs.SCALE)
    assert float(f(1.0)) == 2.0
    with switched(knobs, {"SCALE": 5.0}):
        assert knobs.SCALE == 5.0 and float(f(1.0)) == 5.0
    assert knobs.SCALE == 2.0 and float(f(1.0)) == 2.0
    with pytest.raises(RuntimeError):
        with switched(knobs, {"SCALE": 7.0}):
            raise RuntimeError("a failing case")
    assert knobs.SCALE == 2.0


def test_switched_modules_takes_modules_and_dotted_paths_and_restores_all():
    import types

    from jaxinfer import ops

    knobs = types.ModuleType("knobs")
    knobs.SCALE = 2.0
    before = ops.ROW_HEAD
    with pytest.raises(RuntimeError):
        with switched_modules({knobs: {"SCALE": 3.0}, "jaxinfer.ops": {"ROW_HEAD": not before}}):
            assert knobs.SCALE == 3.0 and ops.ROW_HEAD is (not before)
            raise RuntimeError("a failing case")
    assert knobs.SCALE == 2.0 and ops.ROW_HEAD is before


def test_measured_ceilings_are_positive_and_pick_the_best_copy():
    c = measure_ceilings(copy_bytes=1 << 20, matmul_n=64, samples=2)
    assert c.copy_bytes_per_s == max(c.copy_by_method.values()) > 0
    assert c.matmul_flops_per_s > 0 and c.read_bytes_per_s > 0
    assert datasheet_for("NVIDIA H100 80GB HBM3")["hbm_tb_s"] == 3.35 and datasheet_for("cpu") is None


def test_hlo_op_names_reads_metadata():
    text = ('  %fusion.3 = bf16[4]{0} fusion(%p), kind=kLoop, calls=%f, metadata={op_name="jit(f)/mul" '
            'stack_frame_id=2}\n  ROOT %copy.1 = f32[2]{0} copy(%x), metadata={op_name="jit(f)/copy"}\n')
    assert hlo_op_names(text) == {"fusion.3": "jit(f)/mul", "copy.1": "jit(f)/copy"}


def test_idle_report_counts_gaps_overlaps_and_the_idle_around_marked_events():
    ev = lambda a, b, op: Event(a * 1000, b * 1000, op, op, "Stream #1")
    # us: a [0, 10], b [5, 12] overlapping it, a 3-us gap, sum [15, 20], 1-us gap, c [21, 30], 4-us gap, sum [34, 36]
    events = [ev(0, 10, "a"), ev(5, 12, "b"), ev(15, 20, "sum"), ev(21, 30, "c"), ev(34, 36, "sum")]
    r = idle_report(events, lambda e: e.op == "sum")
    assert (r["span_us"], r["busy_us"], r["idle_us"]) == (36, 28, 8)
    assert (r["gaps_over_2us"], r["idle_in_gaps_over_2us"]) == (2, 7)
    assert (r["marked"], r["marked_us"]) == (2, 7)
    assert (r["idle_before_marked_us"], r["idle_after_marked_us"]) == (7, 1)
    assert r["largest_gaps_by_pair"][0] == {"prev": "c", "next": "sum", "idle_us": 4}


def test_marked_skew_pairs_the_collectives_in_order():
    ev = lambda a, b, op: Event(a * 1000, b * 1000, op, op, "Stream #1")
    planes = {"gpu0": [ev(0, 5, "x"), ev(10, 20, "sum"), ev(30, 40, "sum")],
              "gpu1": [ev(14, 20, "sum"), ev(31, 41, "sum")]}
    r = marked_skew(planes, lambda e: e.op == "sum")
    assert r["pairs"] == 2
    assert r["gpu0"]["start_late_median_us"] == 0 and r["gpu1"]["start_late_median_us"] == 2.5
    assert r["gpu1"]["end_late_median_us"] == 0.5


def test_cli_end_to_end_writes_json_and_png(tmp_path, capsys):
    from jaxinfer.bench import command

    parser = argparse.ArgumentParser(prog="jaxinfer")
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "bench", "--preset", "tiny", "--batch", "2", "--prompt-len", "8", "--context", "8", "--steps", "2",
        "--samples", "2", "--gpu-hour-price", "2.0", "--no-progress", "--out", str(tmp_path),
    ])
    report = args.handler(args)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["phase"] for r in data["results"]] == ["prefill", "decode", "decode_fused"]
    for r in data["results"]:
        assert r["batch"] == 2 and r["length"] == 8 and r["seconds"] > 0
        assert 0 < r["mbu"] and 0 < r["mfu"] and r["predicted_ms"] > 0 and r["usd_per_mtok"] > 0
        assert r["gb_per_s"] * 1e9 == pytest.approx(r["cost"]["bytes"] / r["seconds"])
    assert data["ceilings"]["copy_bytes_per_s"] > 0 and data["meta"]["platform"] == "cpu"
    assert data["spec"]["impl"] == "auto"  # by default the bench times the attention the library defaults to
    png = (tmp_path / "roofline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    out = capsys.readouterr().out
    assert "| decode_fused | 2 | 8 |" in out and "MBU" in out
    assert len(report.results) == 3


def test_cli_refuses_a_configuration_that_cannot_fit(tmp_path, monkeypatch):
    from jaxinfer import memory
    from jaxinfer.bench import command

    parser = command.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--preset", "llama-3-8b", "--batch", "64", "--context", "8192", "--out", str(tmp_path)])
    monkeypatch.setattr(memory, "free_device_bytes", lambda device=None: (80 * 10**9, "the test device has 80 GB"))
    with pytest.raises(memory.DoesNotFit, match=r"weights 16\.\d\d GB \+ kv cache \d+\.\d\d GB"):
        command.run(args)
    assert not (tmp_path / "bench.json").exists()


ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")


@pytest.mark.parametrize("dtype,tol", [
    (jnp.float32, 1e-5),
    pytest.param(jnp.bfloat16, 0.15, marks=[pytest.mark.gpu, gpu]),
])
def test_benchmarked_decode_path_equals_one_forward(dtype, tol):
    """Prefill 6 + 4 decode steps give the logits of one forward pass over the 10 tokens."""
    from jaxinfer.generate import decode_step, prefill
    from jaxinfer.model import forward
    from jaxinfer.params import init_params

    c = ModelConfig(vocab_size=100, dim=32, ffn_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    # One jit and an rbg key: far quicker to compile on the CPU than eager threefry draws.
    params = jax.jit(init_params, static_argnums=(0, 2))(c, jax.random.key(1, impl="rbg"), dtype)
    tokens = jax.random.randint(jax.random.key(3, impl="rbg"), (2, 10), 0, 100)
    want, _ = jax.jit(forward, static_argnames="config")(params, init_cache(c, 2, 16, dtype), tokens, config=c)
    logits, cache = prefill(params, init_cache(c, 2, 16, dtype), tokens[:, :6], config=c, impl="xla")
    got = [logits]
    for t in range(6, 10):
        logits, cache = decode_step(params, cache, tokens[:, t], config=c, impl="xla")
        got.append(logits)
    got = jnp.stack(got, axis=1)  # next-token logits at positions 5..9
    assert float(jnp.max(jnp.abs(got - want[:, 5:]))) < tol


@pytest.mark.gpu
@gpu
def test_gpu_ceilings_are_plausible_for_a_datacenter_card():
    c = measure_ceilings(copy_bytes=256 << 20, matmul_n=4096, samples=3)
    assert c.copy_bytes_per_s > 1e12, c.copy_by_method  # every Hopper/Ampere card copies > 1 TB/s
    assert c.matmul_flops_per_s > 100e12, c.matmul_flops_per_s
    assert c.copy_bytes_per_s == max(c.copy_by_method.values())
