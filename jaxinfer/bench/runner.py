"""The benchmark sweep: build a model with random weights, time each phase, set it against the ceilings.

`run_bench(spec)` measures, for every batch and length in `spec`:
- `prefill`: one jitted prefill call of `batch` prompts of `length` random tokens into an empty cache;
- `decode`: the per-step loop, one jitted `decode_step` per token with greedy feedback on device (no
  host round trip), on a cache already holding `length` tokens;
- `decode_fused`: the library's on-device loop (`lax.while_loop`, greedy sampling included).
The cache for decode is filled with random keys/values and its lengths set directly, so no prefill is
compiled for it. Each result carries the analytic cost, the roofline prediction from the ceilings
measured in the same process, MFU, MBU and (given a price) dollars per million tokens.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..cache import KVCache, QuantKVCache, init_cache, is_quantized_kv, quantize_kv
from ..config import ModelConfig
from ..params import init_params
from ..sampling import Sampling, sequence_keys
from .. import packing
from ..weight_layout import LAYOUTS, contract_last, fragment_order
from . import costs
from .ceilings import Ceilings, measure_ceilings
from .measure import Timing, time_calls
from .profile import kernel_breakdown

PHASES = ("prefill", "decode", "decode_fused")
DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16,
          "float32": jnp.float32, "fp32": jnp.float32}

# The jitted steps are the library's own (private) ones, so the benchmark times exactly what users run.
_gen = importlib.import_module("jaxinfer.generate")

# Ops listed by name in a profiled case (the rest are summed in one "other" row).
PROFILE_TOP = 25


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """What to measure. Lists make a sweep: every phase x batch x length (prompt length or context)."""

    config: ModelConfig
    name: str = "custom"
    dtype: str = "bfloat16"
    quant: str | None = None
    impl: str = "xla"
    batches: tuple[int, ...] = (1,)
    prompt_lens: tuple[int, ...] = (128,)
    contexts: tuple[int, ...] = (128,)
    phases: tuple[str, ...] = PHASES
    steps: int = 16  # decode steps per timed sample; the fused loop runs bucket(steps) - 1 per call
    samples: int = 5
    prefill_calls: int = 2
    gpu_hour_price: float | None = None
    seed: int = 0
    profile_batches: tuple[int, ...] = ()  # batches (decode, and prefill) to trace kernel by kernel
    kv_dtype: str | None = None  # decode cache dtype: None = `dtype`; "int8" / "float8_e4m3fn" quantized
    # "contract-last": `weight_layout.contract_last` (XLA's row-reduction layout; the command line's default, while
    # a spec built in code keeps the stored order unless told)
    weight_layout: str = "stored"

    def __post_init__(self):
        bad = [p for p in self.phases if p not in PHASES]
        if bad:
            raise ValueError(f"unknown phase(s) {bad}; choose from {', '.join(PHASES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.weight_layout not in LAYOUTS:
            raise ValueError(f"unknown weight layout {self.weight_layout!r}; choose from {', '.join(LAYOUTS)}")
        if self.weight_layout == "fragments" and not (self.quant or "").startswith("int4"):
            raise ValueError("weight layout 'fragments' lays out int4 codes: it needs quant='int4' (or int4-g*)")
        if min(self.batches) < 1 or min(self.prompt_lens) < 1 or min(self.contexts) < 0 or self.steps < 2:
            raise ValueError("batches and prompt lengths must be >= 1, contexts >= 0, steps >= 2")

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def cases(self) -> list[tuple[str, int, int]]:
        out = []
        for phase in self.phases:
            lengths = self.prompt_lens if phase == "prefill" else self.contexts
            out += [(phase, b, n) for b in self.batches for n in lengths]
        return out

    def max_len(self, phase: str, length: int) -> int:
        """Cache length a case needs: the prompt, or the context plus the decode steps of one sample."""
        if phase == "prefill":
            return length
        return length + (self.steps if phase == "decode" else _gen.bucket(self.steps))


@dataclasses.dataclass
class Measurement:
    """One timed case. Times are per call (prefill) or per token step (decode)."""

    phase: str
    batch: int
    length: int
    seconds: float
    timing: Timing
    cost: costs.StepCost
    predicted_seconds: float
    flops_per_s: float
    bytes_per_s: float
    mfu: float
    mbu: float
    tokens_per_s: float
    usd_per_mtok: float | None
    extras: dict = dataclasses.field(default_factory=dict)

    @property
    def ms(self) -> float:
        return self.seconds * 1e3

    def as_dict(self) -> dict:
        return {
            "phase": self.phase, "batch": self.batch, "length": self.length, "seconds": self.seconds,
            "ms": self.ms, "predicted_ms": self.predicted_seconds * 1e3,
            "measured_over_predicted": self.seconds / self.predicted_seconds, "tokens_per_s": self.tokens_per_s,
            "tflop_per_s": self.flops_per_s / 1e12, "gb_per_s": self.bytes_per_s / 1e9, "mfu": self.mfu,
            "mbu": self.mbu, "usd_per_mtok": self.usd_per_mtok, "timing": self.timing.as_dict(),
            "cost": self.cost.as_dict(), **self.extras,
        }


@dataclasses.dataclass
class BenchReport:
    """A sweep's results with the ceilings measured beside them and where they were measured."""

    spec: BenchSpec
    ceilings: Ceilings
    results: list[Measurement]
    meta: dict

    def as_dict(self) -> dict:
        spec = dataclasses.asdict(self.spec)
        spec["config"] = dataclasses.asdict(self.spec.config)
        return {"meta": self.meta, "spec": spec, "ceilings": self.ceilings.as_dict(),
                "results": [m.as_dict() for m in self.results]}


def evaluate(phase: str, batch: int, length: int, timing: Timing, seconds: float, cost: costs.StepCost,
             ceilings: Ceilings, gpu_hour_price: float | None) -> Measurement:
    """Turn a time and its analytic cost into rates, ratios to the ceilings, a prediction and a price."""
    usd = None
    if gpu_hour_price is not None:
        usd = gpu_hour_price / 3600.0 * seconds / cost.tokens * 1e6
    return Measurement(
        phase=phase, batch=batch, length=length, seconds=seconds, timing=timing, cost=cost,
        predicted_seconds=cost.predict_seconds(ceilings.matmul_flops_per_s, ceilings.copy_bytes_per_s),
        flops_per_s=cost.flops / seconds, bytes_per_s=cost.bytes / seconds,
        mfu=cost.flops / seconds / ceilings.matmul_flops_per_s,
        mbu=cost.bytes / seconds / ceilings.copy_bytes_per_s,
        tokens_per_s=cost.tokens / seconds, usd_per_mtok=usd,
    )


def build_params(config: ModelConfig, dtype, seed: int = 0, quant: str | None = None, layout: str = "stored"):
    """Random weights (normal, never zeros) drawn on the device in `dtype`, then quantized or laid out
    contraction-last (`layout`) if asked; `fragments`: contraction-last, quantized, then `fragment_order`."""
    key = jax.random.key(seed, impl="rbg")  # compiles in a fraction of threefry's time
    params = jax.jit(init_params, static_argnums=(0, 2))(config, key, dtype)
    if layout in ("contract-last", "fragments"):  # before quantizing: the codes are laid out when they are made
        # float trees as the command line lays them out: q/k/v packed into one matrix (`packing`)
        params = contract_last(params, pack_qkv=packing.PACK_FLOAT_QKV and quant is None)
    if quant is not None:
        try:
            from ..quant import quantize  # the quantization work provides this
        except ImportError as e:
            raise ValueError(f"quantization recipe {quant!r} asked for, but jaxinfer.quant is not available") from e
        params = quantize(params, quant)
    if layout == "fragments":
        params = fragment_order(params)
    return params


def random_cache(config: ModelConfig, batch: int, max_len: int, context: int, dtype, seed: int = 1,
                 kv_dtype: str | None = None):
    """A dense cache holding `context` tokens of random keys/values (decode timing needs no prefill);
    `kv_dtype` "int8" / "float8_e4m3fn": a quantized cache of the same random values."""
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    kk, kv = jax.random.split(jax.random.key(seed, impl="rbg"))
    lengths = jnp.full((batch,), context, jnp.int32)
    # One layer's worth of random values repeated over layers: the draw stays under 2^31 elements
    # (an 8B model at batch 128 holds 4.4e9 per tensor); every layer still reads its own memory.
    if kv_dtype is not None and is_quantized_kv(kv_dtype):
        def quantized(k):
            codes, scales = quantize_kv(jax.random.normal(k, shape[1:], dtype), jnp.dtype(kv_dtype))
            return jnp.broadcast_to(codes, shape), jnp.broadcast_to(scales, shape[:-1])

        (k, ks), (v, vs) = jax.jit(quantized)(kk), jax.jit(quantized)(kv)
        return QuantKVCache(k=k, v=v, k_scale=ks, v_scale=vs, lengths=lengths)
    fill = jax.jit(lambda k: jnp.broadcast_to(jax.random.normal(k, shape[1:], dtype), shape))
    return KVCache(k=fill(kk), v=fill(kv), lengths=lengths)


def _key(seed: int):
    return jax.random.key(seed, impl="rbg")


def _rewind(cache: KVCache, length: int) -> KVCache:
    return cache.replace(lengths=jnp.full((cache.batch,), length, jnp.int32))


@functools.partial(jax.jit)
def _greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _time_prefill(params, spec: BenchSpec, batch: int, length: int):
    config, dtype = spec.config, spec.jnp_dtype
    tokens = jax.random.randint(_key(spec.seed + 7), (batch, length), 1, config.vocab_size, jnp.int32)
    lengths = jnp.full((batch,), length, jnp.int32)
    state = {"cache": init_cache(config, batch, length, dtype)}

    def call():
        logits, state["cache"] = _gen._prefill(
            params, _rewind(state["cache"], 0), tokens, lengths, config=config, impl=spec.impl
        )
        return logits

    timing = time_calls(call, calls=spec.prefill_calls, samples=spec.samples, warmup=1)
    breakdown = None
    if batch in spec.profile_batches:
        text = _gen._prefill.lower(params, state["cache"], tokens, lengths, config=config,
                                   impl=spec.impl).compile().as_text()
        breakdown = kernel_breakdown(call, text, calls=2, top=PROFILE_TOP)
        breakdown["hlo_text"] = text
    return timing, timing.median, costs.prefill_cost(config, batch, length, dtype, spec.quant), breakdown


def _decode_call(params, spec: BenchSpec, batch: int, context: int):
    """The per-step loop: `decode_step` then an on-device argmax fed back; nothing leaves the device."""
    config = spec.config
    state = {
        "cache": random_cache(config, batch, spec.max_len("decode", context), context, spec.jnp_dtype, spec.seed + 1,
                              spec.kv_dtype),
        "tok": jax.random.randint(_key(spec.seed + 3), (batch,), 1, config.vocab_size, jnp.int32),
    }

    def call():
        logits, state["cache"] = _gen.decode_step(params, state["cache"], state["tok"], config=config, impl=spec.impl)
        state["tok"] = _greedy(logits)
        return state["tok"]

    def rewind():
        state["cache"] = _rewind(state["cache"], context)

    def hlo():
        active = jnp.ones((batch,), bool)
        return _gen._decode.lower(params, state["cache"], state["tok"], active, config=config,
                                  impl=spec.impl).compile().as_text()

    return call, rewind, spec.steps, context + (spec.steps - 1) / 2, hlo


def _fused_call(params, spec: BenchSpec, batch: int, context: int):
    """The on-device loop: one `_generate_loop` call decodes `capacity - 1` tokens (greedy, no early stop)."""
    config = spec.config
    capacity = _gen.bucket(spec.steps)
    state = {"cache": random_cache(config, batch, spec.max_len("decode_fused", context), context,
                                   spec.jnp_dtype, spec.seed + 1, spec.kv_dtype)}
    first = jax.random.normal(_key(spec.seed + 5), (batch, config.vocab_size), jnp.float32)
    args = dict(keys=sequence_keys(spec.seed, batch), sampling=Sampling().for_batch(batch),
                stop_ids=jnp.full((8,), -2, jnp.int32), max_new=jnp.full((batch,), capacity, jnp.int32))

    def call():
        out, state["cache"] = _gen._generate_loop(
            params, _rewind(state["cache"], context), first, **args, config=config, impl=spec.impl, capacity=capacity
        )
        return out

    def hlo():
        return _gen._generate_loop.lower(params, state["cache"], first, **args, config=config, impl=spec.impl,
                                         capacity=capacity).compile().as_text()

    return call, None, capacity - 1, context + (capacity - 2) / 2, hlo


def _time_decode(params, spec: BenchSpec, phase: str, batch: int, context: int):
    make = _decode_call if phase == "decode" else _fused_call
    call, rewind, steps_per_call, mean_context, hlo = make(params, spec, batch, context)
    calls = steps_per_call if phase == "decode" else 1
    timing = time_calls(call, calls=calls, samples=spec.samples, warmup=2, before_sample=rewind)
    seconds = timing.median * calls / steps_per_call
    cost = costs.decode_cost(spec.config, batch, mean_context, spec.jnp_dtype, spec.quant,
                             jnp.dtype(spec.kv_dtype) if spec.kv_dtype else None)
    breakdown = None
    if batch in spec.profile_batches:
        text = hlo()
        # Decode: stay inside the cache (warm-up + traced calls <= steps); fused calls rewind themselves.
        traced = max(1, calls - 1) if phase == "decode" else 3
        breakdown = kernel_breakdown(call, text, calls=traced, before=rewind, top=PROFILE_TOP)
        breakdown["hlo_text"] = text
        breakdown["steps_per_call"] = 1 if phase == "decode" else steps_per_call
    return timing, seconds, cost, breakdown


def run_bench(spec: BenchSpec, ceilings: Ceilings | None = None, progress: bool = True,
              on_result=None) -> BenchReport:
    """Measure every case of `spec` (ceilings first unless given); `on_result(m)` sees each as it lands."""
    ceilings = ceilings or measure_ceilings(dtype=spec.jnp_dtype)
    params = build_params(spec.config, spec.jnp_dtype, spec.seed, spec.quant, spec.weight_layout)
    cases = spec.cases()
    results = []
    bar = _progress(cases, progress)
    for phase, batch, length in bar:
        if hasattr(bar, "set_description"):
            bar.set_description(f"{phase} B={batch} n={length}")
        if phase == "prefill":
            timing, seconds, cost, breakdown = _time_prefill(params, spec, batch, length)
        else:
            timing, seconds, cost, breakdown = _time_decode(params, spec, phase, batch, length)
        m = evaluate(phase, batch, length, timing, seconds, cost, ceilings, spec.gpu_hour_price)
        if breakdown is not None:
            m.extras["breakdown"] = breakdown
        results.append(m)
        if on_result is not None:
            on_result(m)
    return BenchReport(spec=spec, ceilings=ceilings, results=results, meta=run_metadata())


def _progress(cases: Sequence, enabled: bool):
    if not enabled:
        return cases
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return cases
    return tqdm(cases, unit="case")


def run_metadata() -> dict:
    """Card, software and commit: what BENCHMARKS.md needs next to every number."""
    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev.device_kind, "platform": dev.platform, "device_count": jax.device_count(),
        "jax": jax.__version__, "python": platform.python_version(), "commit": _git_commit(),
    }


def _git_commit() -> str | None:
    """HEAD of this checkout (`+dirty` with uncommitted changes), or $JAXINFER_COMMIT where git is absent."""
    if os.environ.get("JAXINFER_COMMIT"):
        return os.environ["JAXINFER_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
