"""Multi-GPU acceptance numbers in one run: one-GPU baselines next to tensor / pipeline parallelism,
and the cost of moving the KV cache between two sub-meshes (disaggregated prefill/decode).

    PYTHONPATH=. python3 benchmarks/multi_gpu.py --out $OUT            # on a 2-GPU or 4-GPU host

Parts (default: all that fit the device count n):
- `tp`:  `llama-3-8b` bf16, batch-1 decode tokens/s (on-device loop of `generate`, greedy, after a
         `--context`-token prompt) on one GPU and with tensor=n (and tensor=2 when n == 4); ratio to one GPU.
         Each degree several ways: the layers per shard (`tensor_parallel`, the default), XLA's partitioner
         (`_partitioner`), per shard without the row-parallel sums (`_nosum`: wrong logits, timing only,
         what the 2 all-reduces per layer cost), and per shard with q/k/v packed per shard (`_packed`);
         `--tp-variants` picks among them. `--fori`: each also through a fixed-count loop without the
         per-step host round trip; `--timeline STEPS`: each GPU's idle time around the sums, from a
         trace. The sums run on the library's choice of kernel (NCCL, `jaxinfer.xla_flags`); a process with
         `XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true` times XLA's own default.
- `pp`:  (n >= 4) batch `--pp-batch` on one GPU vs pipeline=n: prefill tokens/s of `--context`-token
         prompts and decode tokens/s (an on-device greedy loop), for the micro-batch counts given; decode
         also with micro-batches of different steps in flight (`pipeline.decode_loop`, `_inflight_m<M>`).
         `--pp-variants default,stacked`: also with the stages' layers left stacked (`_stacked`, the way before
         session 16: XLA's GEMMs copying each layer's slice on every tick); `--profile`: the per-op device time
         of one prefill on GPU 0.
- `tp-processes` (alone, with `--tp-processes n`): batch-1 decode with tensor=n and one process per GPU
         (`jax.distributed`), to compare with the one-process numbers of a `tp` run just before.
- `disagg`: prefill on the first n/2 GPUs (tensor=n/2), the cache moved to the last n/2, decode there:
         `disagg.transfer_cost` (bytes, seconds, GB/s) and the phase times of one `disagg.generate`.
Every timing is a median of `--samples` runs after a warm-up (which compiles). <out>/multi_gpu.json is
rewritten after every case; a table is printed and the last line is one JSON object.
`--preset tiny` with `JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4` checks the
script on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxinfer as ji  # noqa: E402
from jaxinfer import disagg, model, ops, pipeline, tensor_parallel  # noqa: E402
from jaxinfer import sharding as sh  # noqa: E402
from jaxinfer.bench import switched  # noqa: E402
from jaxinfer.bench.profile import device_events, idle_report, kernel_breakdown, marked_skew  # noqa: E402
from jaxinfer.generate import _generate_loop, _on_mesh, bucket  # noqa: E402
from jaxinfer.model import forward  # noqa: E402
from jaxinfer.sampling import Sampling, sequence_keys  # noqa: E402
from jaxinfer.packing import pack_qkv  # noqa: E402
from jaxinfer.weight_layout import DEFAULT_LAYOUT, LAYOUTS  # noqa: E402

TARGETS = {"tp2_decode_b1": 1.7, "tp4_decode_b1": 2.6, "pp4_throughput_b64": 3.0}


def _median_time(run, samples: int) -> tuple[float, list[float]]:
    """`run()` returns a zero-arg callable that does the timed work (so setup stays untimed)."""
    jax.block_until_ready(run()())  # warm-up: compiles
    times = []
    for _ in range(samples):
        work = run()
        t0 = time.perf_counter()
        jax.block_until_ready(work())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _prompt(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


# ----------------------------------------------------------------------------------------------------
# Batch-1 decode through generate's on-device loop


def _decode_loop_run(params, cfg, *, batch, context, steps, impl, dtype, loop="generate"):
    """A `run()` for `_median_time`: prefills a fresh cache (untimed) and returns the timed work, `steps`
    greedy decode steps through the fused loop `generate` runs (`loop="fori"`: a fixed-count loop of
    forward + argmax instead, with no stop test and no sampler, so no host round trip per step)."""
    mesh = sh.mesh_of(params)
    tokens = _prompt(batch, context, cfg.vocab_size)
    max_len = bucket(context + steps + 1, 128)
    stops = jnp.full((8,), -2, jnp.int32)
    sampling = Sampling().for_batch(batch)
    keys = sequence_keys(0, batch)
    max_new = jnp.full((batch,), steps + 1, jnp.int32)

    def run():
        cache = sh.init_cache_on(mesh, cfg, batch, max_len, dtype)
        logits, cache = ji.prefill(params, cache, tokens, config=cfg, impl=impl)
        jax.block_until_ready(cache)

        def work():
            with _on_mesh(params):
                if loop == "fori":
                    tok = jnp.argmax(logits, -1).astype(jnp.int32)
                    return _decode_loop(params, cache, tok, cfg=cfg, impl=impl, microbatches=None, mesh=None, steps=steps)[0]
                out, _ = _generate_loop(
                    params, cache, logits, keys, sampling, stops, max_new, config=cfg, impl=impl, capacity=steps + 1
                )
            return out

        return work

    return run


def decode_tokens_per_s(params, cfg, *, batch, context, steps, impl, samples, dtype, loop="generate"):
    """Tokens/s of `steps` greedy decode steps (the fused loop `generate` runs, or `loop="fori"`) after a prefill."""
    run = _decode_loop_run(params, cfg, batch=batch, context=context, steps=steps, impl=impl, dtype=dtype, loop=loop)
    seconds, times = _median_time(run, samples)
    return {"tokens_per_s": batch * steps / seconds, "step_ms": 1e3 * seconds / steps, "samples_s": times}


def _is_all_reduce(ev) -> bool:
    names = (ev.op + " " + ev.name).lower()
    return any(w in names for w in ("all-reduce", "all_reduce", "allreduce", "nccl", "psum"))


def decode_timeline(params, cfg, *, context, steps, impl, dtype, dump=None):
    """Each GPU's timeline of one traced decode loop (`steps` batch-1 steps): span, busy and idle time,
    the all-reduces' time and the idle gaps around them, the kernel pairs with the most idle time between
    them, and (several GPUs) how late each device reaches the all-reduces compared with the earliest.
    `dump`: a path to write the raw events of two steps from the middle of the loop (every GPU) to."""
    works = [_decode_loop_run(params, cfg, batch=1, context=context, steps=steps, impl=impl, dtype=dtype)()
             for _ in range(2)]  # one warm-up, one traced; each on its own (donated) cache
    planes = device_events(lambda: works.pop(0)(), calls=1)
    if planes is None:
        return {"error": "no trace written"}
    planes = {name: events for name, events in planes.items() if events}
    per_step = lambda d: {k: v / steps for k, v in d.items()}
    out = {"steps": steps, "per_step": {}}
    if dump is not None and planes:
        t0 = min(evs[0].start_ns for evs in planes.values())
        t1 = max(evs[-1].end_ns for evs in planes.values())
        lo, hi = t0 + (t1 - t0) * (steps // 2) // steps, t0 + (t1 - t0) * (steps // 2 + 2) // steps
        Path(dump).write_text(json.dumps({name: [[e.start_ns - t0, e.end_ns - t0, e.op, e.name[:80], e.stream]
                                                 for e in evs if lo <= e.start_ns < hi] for name, evs in planes.items()}))
    for name, events in sorted(planes.items()):
        report = idle_report(events, _is_all_reduce)
        pairs = report.pop("largest_gaps_by_pair", [])
        out["per_step"][name] = per_step(report)
        out["per_step"][name]["largest_gaps_by_pair"] = [{**g, "idle_us": g["idle_us"] / steps} for g in pairs]
    out["all_reduce_skew"] = marked_skew(planes, _is_all_reduce)
    return out


def profile_decode_step(params, cfg, *, context, impl, dtype, top=12):
    """Device time per op of one batch-1 decode step on the first GPU (the profiler's kernel times)."""
    mesh = sh.mesh_of(params)
    cache = sh.init_cache_on(mesh, cfg, 1, bucket(context + 2, 128), dtype)
    logits, cache = ji.prefill(params, cache, _prompt(1, context, cfg.vocab_size), config=cfg, impl=impl)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
    step = jax.jit(lambda p, c, t: forward(p, c, t, config=cfg, impl=impl)[0])
    with _on_mesh(params):
        text = step.lower(params, cache, tok).compile().as_text()
        out = kernel_breakdown(lambda: step(params, cache, tok), text, calls=5, top=top, device="/device:GPU:0")
    return {"device_us": out["device_us_per_call"], "ops": [
        {k: r[k] for k in ("hlo_op", "op_name", "launches_per_call", "us_per_call")} for r in out["ops"]]}


# ----------------------------------------------------------------------------------------------------
# Pipeline throughput: prefill and decode at a large batch


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "microbatches", "mesh"), donate_argnames=("cache",))
def _prefill_fn(params, cache, tokens, *, cfg, impl, microbatches, mesh):
    if mesh is None:
        return forward(params, cache, tokens, config=cfg, impl=impl, last_only=True)
    return pipeline.forward(params, cache, tokens, config=cfg, impl=impl, last_only=True, microbatches=microbatches, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "microbatches", "mesh", "steps"), donate_argnames=("cache",))
def _decode_loop(params, cache, tok, *, cfg, impl, microbatches, mesh, steps):
    def body(_, carry):
        tok, cache = carry
        if mesh is None:
            logits, cache = forward(params, cache, tok[:, None], config=cfg, impl=impl)
        else:
            logits, cache = pipeline.forward(
                params, cache, tok[:, None], config=cfg, impl=impl, microbatches=microbatches, mesh=mesh
            )
        return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

    tok, cache = jax.lax.fori_loop(0, steps, body, (tok, cache))
    return tok, cache


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "microbatches", "mesh", "steps"), donate_argnames=("cache",))
def _inflight_loop(params, cache, tok, *, cfg, impl, microbatches, mesh, steps):
    return pipeline.decode_loop(params, cache, tok, steps, config=cfg, impl=impl, microbatches=microbatches, mesh=mesh)


def throughput(params, cfg, *, mesh, microbatches, batch, context, steps, impl, samples, dtype, phases=("prefill", "decode"),
               inflight=False, profile=False):
    """Prefill tokens/s (batch x context) and decode tokens/s (batch x steps) on one GPU (mesh None)
    or through the pipeline with `microbatches`; `inflight`: decode with `pipeline.decode_loop` (micro-batches
    of different steps in flight) instead of one pipelined forward per step; `profile`: also the device
    time per op of one prefill on GPU 0 (a pipeline's first stage)."""
    tokens = _prompt(batch, context, cfg.vocab_size)
    max_len = bucket(context + steps + 1, 128)
    new_cache = lambda: sh.init_cache_on(mesh, cfg, batch, max_len, dtype)
    kw = dict(cfg=cfg, impl=impl, microbatches=microbatches, mesh=mesh)

    def run_prefill():
        cache = jax.block_until_ready(new_cache())
        return lambda: _prefill_fn(params, cache, tokens, **kw)

    def run_decode():
        logits, cache = _prefill_fn(params, new_cache(), tokens, **kw)
        tok = jax.block_until_ready(jnp.argmax(logits, -1).astype(jnp.int32))
        return lambda: (_inflight_loop if inflight else _decode_loop)(params, cache, tok, steps=steps, **kw)

    out = {"microbatches": microbatches}
    if "prefill" in phases:
        pre, _ = _median_time(run_prefill, samples)
        out.update(prefill_tokens_per_s=batch * context / pre, prefill_s=pre)
        if profile:
            prefill = jax.jit(lambda p, c, t: _prefill_fn(p, c, t, **kw))
            text = prefill.lower(params, new_cache(), tokens).compile().as_text()
            prof = kernel_breakdown(lambda: prefill(params, new_cache(), tokens), text, calls=2, top=16,
                                    device="/device:GPU:0")
            out["prefill_profile"] = {"device_us": prof["device_us_per_call"], "ops": [
                {k: r[k] for k in ("hlo_op", "op_name", "launches_per_call", "us_per_call")} for r in prof["ops"]]}
    if "decode" in phases:
        dec, _ = _median_time(run_decode, samples)
        out.update(decode_tokens_per_s=batch * steps / dec, decode_step_ms=1e3 * dec / steps)
    return out


# ----------------------------------------------------------------------------------------------------
# Tensor parallelism with one process per GPU (jax.distributed): no in-process rendezvous per collective


def tp_in_processes(args) -> dict:
    """Starts `args.tp_processes` copies of this script, process i on GPU i, joined by
    `jax.distributed.initialize`; they time batch-1 decode with tensor=n and process 0 writes the result."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    n = args.tp_processes
    common = ["--tp-processes", str(n), "--coordinator", f"127.0.0.1:{port}", "--out", str(args.out),
              "--preset", args.preset, "--impl", args.impl, "--context", str(args.context),
              "--steps", str(args.steps), "--samples", str(args.samples), "--weight-layout", args.weight_layout]
    logs = [open(args.out / f"tp_process{i}.log", "w") for i in range(n)]
    procs = [subprocess.Popen([sys.executable, __file__, "--tp-process-id", str(i), *common], stdout=logs[i],
                              stderr=subprocess.STDOUT, cwd=ROOT) for i in range(n)]
    try:
        codes = [p.wait(timeout=args.tp_process_timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
        for log in logs:
            log.close()
    result = args.out / "tp_processes.json"
    if any(codes) or not result.exists():
        raise RuntimeError(f"tp processes exited with {codes}; logs in {args.out}/tp_process*.log")
    return json.loads(result.read_text())


def tp_process(args) -> None:
    """One process of `tp_in_processes`."""
    on_cpu = jax.config.jax_platforms == "cpu"
    if on_cpu:  # the script's CPU check: gloo collectives, one CPU device per process
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.tp_processes,
                               process_id=args.tp_process_id, initialization_timeout=120,
                               local_device_ids=None if on_cpu else [args.tp_process_id])
    cfg = ji.ModelConfig.from_preset(args.preset)
    mesh = sh.make_mesh(tensor=jax.device_count())
    params = sh.init_params(cfg, mesh, dtype=jnp.bfloat16)
    if args.weight_layout == "contract-last":  # as the one-process cases, transposed in place in the shards
        abstract = ji.contract_last(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))
        params = jax.jit(ji.contract_last, out_shardings=sh.tree_shardings(abstract, cfg, mesh))(params)
    r = decode_tokens_per_s(params, cfg, batch=1, context=args.context, steps=args.steps, impl=args.impl,
                            samples=args.samples, dtype=jnp.bfloat16)
    r.update(processes=jax.process_count(), devices=[d.device_kind for d in jax.devices()], weight_layout=args.weight_layout)
    if jax.process_index() == 0:
        (args.out / "tp_processes.json").write_text(json.dumps(r))
    jax.distributed.shutdown()


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("multi_gpu_out"))
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--parts", default="", help="comma list of tp,pp,disagg (default: all that fit)")
    ap.add_argument("--impl", default="auto", help="attention impl (auto, xla, pallas, cudnn)")
    ap.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per sample")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--profile", action="store_true",
                    help="tp: also the per-op device time of one decode step; pp: of one prefill on GPU 0")
    ap.add_argument("--timeline", type=int, default=0, metavar="STEPS",
                    help="tp: also each GPU's idle time around the all-reduces, from a trace of STEPS decode steps")
    ap.add_argument("--fori", action="store_true",
                    help="tp: also time each case with a fixed-count forward + argmax loop (no per-step host round trip)")
    ap.add_argument("--tp-variants", default="per-shard,partitioner,nosum", help="tp: which ways to time (per-shard, partitioner, nosum, packed)")
    ap.add_argument("--weight-layout", default=DEFAULT_LAYOUT, choices=LAYOUTS,
                    help="contract-last (the command line's default): every case on `ji.contract_last(params)`")
    ap.add_argument("--pp-batch", type=int, default=64)
    ap.add_argument("--pp-variants", default="default", help="pp: which ways to time (default, stacked)")
    ap.add_argument("--pp-prefill-microbatches", default="16,32")
    ap.add_argument("--pp-decode-microbatches", default="1,4")
    ap.add_argument("--pp-inflight-microbatches", default="4,8",
                    help="pp: decode with micro-batches of different steps in flight (pipeline.decode_loop), M >= n")
    ap.add_argument("--disagg-batch", type=int, default=8)
    ap.add_argument("--tp-processes", type=int, default=0,
                    help="with --parts tp-processes: time tensor=N with one process per GPU (alone in its run)")
    ap.add_argument("--tp-process-timeout", type=int, default=400)
    ap.add_argument("--tp-process-id", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tp_process_id is not None:
        return tp_process(args)
    if args.parts == "tp-processes":  # before this process takes any GPU memory
        r = tp_in_processes(args)
        print(json.dumps({f"decode_b1_tp{args.tp_processes}_processes": r}))
        return

    devices = jax.devices()
    n = len(devices)
    parts = set(filter(None, args.parts.split(","))) or ({"tp", "disagg"} | ({"pp"} if n >= 4 else set()))
    cfg = ji.ModelConfig.from_preset(args.preset)
    dtype = jnp.bfloat16
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit, "jax": jax.__version__,
        "devices": [d.device_kind for d in devices], "preset": args.preset, "impl": args.impl,
        "context": args.context, "steps": args.steps, "results": {}, "errors": {},
    }
    results, errors = report["results"], report["errors"]

    def save():
        (args.out / "multi_gpu.json").write_text(json.dumps(report, indent=1))

    def case(name, fn):
        t0 = time.time()
        try:
            results[name] = fn()
            results[name]["wall_s"] = round(time.time() - t0, 1)
        except Exception as e:  # recorded, the run goes on
            errors[name] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
        print(f"[{time.time() - T0:7.1f}s] {name}: {results.get(name) or errors.get(name)}", flush=True)
        save()

    T0 = time.time()
    one = sh.make_mesh(devices=devices[:1])
    base_params = sh.init_params(cfg, one, dtype=dtype)  # one copy on GPU 0; every other layout is placed from it
    if args.weight_layout == "contract-last":
        base_params = ji.contract_last(base_params)
    report["weight_layout"] = args.weight_layout
    jax.block_until_ready(base_params)

    decode_kw = dict(batch=1, context=args.context, steps=args.steps, impl=args.impl, samples=args.samples, dtype=dtype)
    if "tp" in parts:
        case("decode_b1_1gpu", lambda: decode_tokens_per_s(base_params, cfg, **decode_kw))
        if args.fori:
            case("decode_b1_1gpu_fori", lambda: decode_tokens_per_s(base_params, cfg, loop="fori", **decode_kw))
        if args.weight_layout == "contract-last":  # one GPU as the command line runs it: q/k/v packed
            case("decode_b1_1gpu_packed", lambda: decode_tokens_per_s(pack_qkv(base_params), cfg, **decode_kw))
        if args.timeline:
            case("timeline_1gpu", lambda: decode_timeline(base_params, cfg, context=args.context, steps=args.timeline,
                                                          impl=args.impl, dtype=dtype, dump=args.out / "events_1gpu.json"))
        if args.profile:
            case("profile_1gpu", lambda: profile_decode_step(base_params, cfg, context=args.context, impl=args.impl, dtype=dtype))
        for t in sorted({n, 2} if n >= 4 else {n}):
            # per-shard layers (the library default), XLA's partitioner, the per-shard layers with the
            # two sums per layer left out (wrong logits: isolates what the all-reduces cost), and the
            # per-shard layers with q/k/v packed per shard (`pack_qkv(shards=t)`, contraction-last trees)
            variants = {"": {}, "_partitioner": {"ENABLED": False},
                        "_nosum": {"row_parallel": ops.matmul},  # each shard's partial sum as if whole
                        "_packed": {}}
            chosen = {{"per-shard": ""}.get(v, f"_{v}") for v in args.tp_variants.split(",")}
            for suffix, switches in ((k, v) for k, v in variants.items() if k in chosen):
                def tp_case(t=t, switches=switches, packed=suffix == "_packed"):
                    tree = pack_qkv(base_params, shards=t) if packed else base_params
                    params = sh.shard_params(tree, cfg, sh.make_mesh(tensor=t, devices=devices[:t]))
                    try:
                        with switched(tensor_parallel, switches):
                            r = decode_tokens_per_s(params, cfg, **decode_kw)
                            if args.fori and not suffix:
                                r["fori"] = decode_tokens_per_s(params, cfg, loop="fori", **decode_kw)
                            if args.timeline:
                                r["timeline"] = decode_timeline(params, cfg, context=args.context, steps=args.timeline,
                                                                impl=args.impl, dtype=dtype,
                                                                dump=args.out / f"events_tp{t}{suffix}.json")
                            if args.profile:
                                r["profile"] = profile_decode_step(params, cfg, context=args.context, impl=args.impl, dtype=dtype)
                            return r
                    finally:
                        del params
                name = f"decode_b1_tp{t}{suffix}"
                case(name, tp_case)
                if name in results and "decode_b1_1gpu" in results:
                    results[name]["speedup"] = results[name]["tokens_per_s"] / results["decode_b1_1gpu"]["tokens_per_s"]
                if name in results and "fori" in results[name] and "decode_b1_1gpu_fori" in results:
                    results[name]["fori"]["speedup"] = (results[name]["fori"]["tokens_per_s"]
                                                        / results["decode_b1_1gpu_fori"]["tokens_per_s"])
                if name in results and "decode_b1_1gpu_packed" in results:  # against the one-GPU default
                    results[name]["speedup_vs_packed"] = (results[name]["tokens_per_s"]
                                                          / results["decode_b1_1gpu_packed"]["tokens_per_s"])

    if "pp" in parts and n >= 2:
        pp_kw = dict(batch=args.pp_batch, context=args.context, steps=args.steps // 2, impl=args.impl,
                     samples=args.samples, dtype=dtype)
        case(f"throughput_b{args.pp_batch}_1gpu",
             lambda: throughput(base_params, cfg, mesh=None, microbatches=None, profile=args.profile, **pp_kw))
        pp_mesh = sh.make_mesh(pipeline=n)
        try:
            pp_params = sh.shard_params(base_params, cfg, pp_mesh)
        except ValueError as e:
            pp_params, errors[f"pp{n}"] = None, str(e)
        base = results.get(f"throughput_b{args.pp_batch}_1gpu")
        pre_ms = [int(m) for m in args.pp_prefill_microbatches.split(",") if m]
        dec_ms = [int(m) for m in args.pp_decode_microbatches.split(",") if m]
        # `_stacked`: prefill micro-batches read each stage's stacked weights, whose layer slices reach XLA's
        # GEMMs as copies made on every tick (the default since S16: each layer sliced once per call)
        pp_variants = {"": {}, "_stacked": {"SPLIT_LAYERS": False}}  # model's switch
        chosen = {{"default": ""}.get(v, f"_{v}") for v in args.pp_variants.split(",")}
        for m, (suffix, switches) in ((m, kv) for m in (sorted(set(pre_ms) | set(dec_ms)) if pp_params is not None else ())
                                      for kv in pp_variants.items() if kv[0] in chosen):
            name = f"throughput_b{args.pp_batch}_pp{n}_m{m}{suffix}"
            phases = tuple(ph for ph, ms in (("prefill", pre_ms), ("decode", dec_ms)) if m in ms)

            def pp_case(m=m, phases=phases, switches=switches):
                with switched(model, switches):
                    return throughput(pp_params, cfg, mesh=pp_mesh, microbatches=m, phases=phases,
                                      profile=args.profile, **pp_kw)
            case(name, pp_case)
            for ph in phases:
                if name in results and base and f"{ph}_tokens_per_s" in base:
                    results[name][f"{ph}_speedup"] = results[name][f"{ph}_tokens_per_s"] / base[f"{ph}_tokens_per_s"]
        for m in [int(m) for m in args.pp_inflight_microbatches.split(",") if m] if pp_params is not None else ():
            name = f"throughput_b{args.pp_batch}_pp{n}_inflight_m{m}"
            case(name, lambda m=m: throughput(pp_params, cfg, mesh=pp_mesh, microbatches=m, phases=("decode",),
                                              inflight=True, **pp_kw))
            if name in results and base and "decode_tokens_per_s" in base:
                results[name]["decode_speedup"] = results[name]["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        del pp_params

    if "disagg" in parts and n >= 2:
        def disagg_case():
            half = n // 2
            a, b = disagg.split_devices(half, half)
            model = ji.Model(config=cfg, params=base_params)
            dm = disagg.disaggregate(model, sh.make_mesh(tensor=half, devices=a), sh.make_mesh(tensor=half, devices=b))
            B = args.disagg_batch
            max_len = bucket(args.context + args.steps + 1, 128)
            cache = sh.init_cache(cfg, B, max_len, dm.prefill_mesh, dtype=dtype)
            cost = disagg.transfer_cost(cache, cfg, dm.decode_mesh, repeats=5)
            prompts = _prompt(B, args.context, cfg.vocab_size)
            disagg.generate(dm, prompts, max_new_tokens=args.steps, max_len=max_len, impl=args.impl)  # compiles
            _, times = disagg.generate(dm, prompts, max_new_tokens=args.steps, max_len=max_len, impl=args.impl)
            return {
                "prefill_devices": half, "decode_devices": half, "batch": B, "max_len": max_len,
                "cache_bytes": cost["bytes"], "transfer_median_s": cost["median_s"], "transfer_first_s": cost["first_s"],
                "transfer_gbps": cost["gbps"], "generate_prefill_s": times.prefill_s,
                "generate_transfer_s": times.transfer_s, "generate_decode_s": times.decode_s,
                "transfer_vs_decode_step": times.transfer_s / (times.decode_s / args.steps),
            }
        case("disagg", disagg_case)

    # Summary against the acceptance targets.
    summary = {}
    for t in (2, 4):
        r = results.get(f"decode_b1_tp{t}")
        if r and "speedup" in r:
            summary[f"tp{t}_decode_b1"] = {"speedup": round(r["speedup"], 3), "target": TARGETS[f"tp{t}_decode_b1"]}
    pp = [v for k, v in results.items() if k.startswith(f"throughput_b{args.pp_batch}_pp")]
    if pp:
        summary[f"pp{n}_throughput_b{args.pp_batch}"] = {
            "best_prefill_speedup": round(max(v.get("prefill_speedup", 0) for v in pp), 3),
            "best_decode_speedup": round(max(v.get("decode_speedup", 0) for v in pp), 3),
            "target": TARGETS["pp4_throughput_b64"],
        }
    if "disagg" in results:
        d = results["disagg"]
        summary["disagg_transfer"] = {"bytes": d["cache_bytes"], "seconds": round(d["transfer_median_s"], 5),
                                      "gbps": round(d["transfer_gbps"], 2)}
    report["summary"] = summary
    report["total_s"] = round(time.time() - T0, 1)
    save()

    print(f"\n{'case':34} {'result':>60}")
    for name, r in results.items():
        keys = [k for k in ("tokens_per_s", "speedup", "prefill_tokens_per_s", "prefill_speedup",
                            "decode_tokens_per_s", "decode_speedup", "transfer_gbps", "transfer_median_s") if k in r]
        print(f"{name:34} " + ", ".join(f"{k}={r[k]:.4g}" for k in keys))
        if "fori" in r:
            print(f"{name + ' (fori loop)':34} " + ", ".join(f"{k}={r['fori'][k]:.4g}" for k in ("tokens_per_s", "speedup") if k in r["fori"]))
    for name, r in results.items():
        prof = r if name.startswith("profile") else r.get("profile") or r.get("prefill_profile")
        if prof and prof.get("device_us"):
            print(f"\n{name}: device time of one {'prefill' if 'prefill_profile' in r else 'decode step'} on GPU 0,"
                  f" {prof['device_us']:.0f} us")
            for op in prof["ops"][:10]:
                print(f"  {op['us_per_call']:8.1f} us x{op['launches_per_call']:<5g} {op['hlo_op'][:40]:40} {op['op_name'][-60:]}")
    for name, r in results.items():
        tl = r if name.startswith("timeline") else r.get("timeline")
        for plane, d in (tl or {}).get("per_step", {}).items():
            print(f"\n{name} {plane}, per step: span {d['span_us']:.0f} us, busy {d['busy_us']:.0f}, idle {d['idle_us']:.0f}"
                  f" (in gaps > 2 us: {d['idle_in_gaps_over_2us']:.0f}); all-reduces {d['marked']:.3g} x, {d['marked_us']:.0f} us,"
                  f" idle before {d['idle_before_marked_us']:.0f} / after {d['idle_after_marked_us']:.0f}")
            for g in d["largest_gaps_by_pair"][:5]:
                print(f"  {g['idle_us']:7.1f} us idle between {g['prev'][:40]} -> {g['next'][:40]}")
        if tl and tl.get("all_reduce_skew", {}).get("pairs"):
            print(f"{name} all-reduce skew: " + json.dumps(tl["all_reduce_skew"]))
    for name, e in errors.items():
        print(f"{name:34} ERROR {e[:200]}")
    print(json.dumps({"summary": summary, "errors": list(errors), "devices": len(devices), "commit": commit}))


if __name__ == "__main__":
    main()
