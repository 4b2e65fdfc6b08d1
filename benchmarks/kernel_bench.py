"""GPU timings of the pallas_kernels attention kernels against cuDNN and XLA, measured in one run.

`run_kernel_benchmarks(out_dir)` times prefill (causal flash attention) and decode (dense split-K and
paged) at real shapes next to `jax.nn.dot_product_attention` with implementation "cudnn" and "xla",
plus the card's copy bandwidth and bf16 matmul rate as ceilings, and returns one dict per
measurement (also written to out_dir/kernel_bench.json). `sweep=True` adds block-size / warp / stage
sweeps used to choose the kernels' defaults. Run as a script it prints a short table and ends with
one JSON line.

Timing: `calls` kernel calls chained inside one jit (each call's output is the next call's query, so
nothing is merged or reordered), the median of `reps` runs divided by `calls`: this keeps the ~50 us
dispatch floor out of per-call numbers. Inputs are random, never zeros.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import decode_attention, flash_attention, paged_decode_attention


def _time_chain(step: Callable, q, *args, calls: int, reps: int) -> float:
  """Median seconds per call of `step(q, *args) -> new q`, `calls` chained calls per jit."""

  @jax.jit
  def chain(q, *args):
    for _ in range(calls):
      q = step(q, *args).astype(q.dtype)
    return q

  chain(q, *args).block_until_ready()  # compile and warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    chain(q, *args).block_until_ready()
    times.append(time.perf_counter() - t0)
  return statistics.median(times) / calls


def _try(fn: Callable, *args, **kwargs) -> tuple[float | None, str | None]:
  try:
    return fn(*args, **kwargs), None
  except Exception as e:  # noqa: BLE001 - a failing config is a result, not a crash
    return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def measure_ceilings() -> dict[str, float]:
  """The card's ceilings as the library measures them (`jaxinfer.bench.ceilings`: the best of XLA's copy, an
  XLA elementwise pass and torch's copy of 1 GiB; an 8192^3 bf16 product). This script's own chained bf16
  multiply read ~3.05 TB/s on an H200 where those read ~4.24, so its MBU column overstated the kernels."""
  from jaxinfer.bench.ceilings import measure_ceilings as library_ceilings

  c = library_ceilings()
  return {"copy_tb_s": c.copy_bytes_per_s / 1e12, "read_tb_s": c.read_bytes_per_s / 1e12,
          "matmul_bf16_tflop_s": c.matmul_flops_per_s / 1e12, "copy_method": c.copy_method}


# --------------------------------------------------------------------------------------------
# Prefill


def _prefill_inputs(batch, seq, num_heads, num_kv, head_dim, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(k1, (batch, seq, num_heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(k2, (batch, seq, num_kv, head_dim), jnp.bfloat16)
  v = jax.random.normal(k3, (batch, seq, num_kv, head_dim), jnp.bfloat16)
  return q, k, v


# The default prefill rows: `flash_attention`'s choice (on Hopper the Mosaic GPU kernel) and the Triton kernel.
PREFILL_BACKENDS = (None, dict(backend="triton"))


def bench_prefill(batch=4, seq=4096, num_heads=32, num_kv=8, head_dim=128, *, configs=PREFILL_BACKENDS,
                  baselines=True, xla=True, calls=5, reps=5) -> list[dict[str, Any]]:
  """Causal prefill, all sequences full length. FLOPs counted as 4 * B * N * H * T * S / 2. A config
  may hold `switches` ({module: {name: value}}, jaxinfer.bench.switched_modules) besides flash_attention's
  keyword arguments."""
  from jaxinfer.bench import switched_modules

  q, k, v = _prefill_inputs(batch, seq, num_heads, num_kv, head_dim)
  lengths = jnp.full((batch,), seq, jnp.int32)
  flops = 4 * batch * num_heads * head_dim * seq * seq / 2
  case = f"prefill B{batch} S{seq} N{num_heads} K{num_kv} H{head_dim} causal bf16"
  rows = []

  def add(impl, config, seconds, error):
    rows.append(dict(kind="prefill", case=case, impl=impl, config=config, error=error,
                     time_us=None if seconds is None else seconds * 1e6,
                     tflop_s=None if seconds is None else flops / seconds / 1e12))

  if baselines:
    for impl in ("cudnn", "xla") if xla else ("cudnn",):
      step = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=impl)
      add(impl, None, *_try(_time_chain, lambda q, k, v: step(q, k, v), q, k, v, calls=calls,
                            reps=reps))
  for config in configs:
    kw = dict(config or {})
    switches = kw.pop("switches", {})
    step = functools.partial(flash_attention, kv_lengths=lengths, causal=True, **kw)
    with switched_modules(switches):
      add("pallas", config, *_try(_time_chain, lambda q, k, v: step(q, k, v), q, k, v,
                                  calls=calls, reps=reps))
  return rows


def prefill_length_jobs():
  """Issue 5's prefill range, 2k-16k keys at about the same FLOPs (B x S^2 fixed), H128 GQA 32/8:
  the library's choice (on Hopper the Mosaic GPU kernel) and the Triton kernel, against cuDNN (XLA only
  up to 4k: its [S, S] scores grow past what is worth timing)."""
  return [functools.partial(bench_prefill, batch, seq, xla=seq <= 4096)
          for batch, seq in [(8, 2048), (4, 4096), (2, 8192), (1, 16384)]]


# --------------------------------------------------------------------------------------------
# Decode


def _decode_lengths(batch, max_len, ragged, seed=0):
  if not ragged:
    return np.full((batch,), max_len, np.int32)
  rng = np.random.default_rng(seed)
  return rng.integers(max_len // 8, max_len + 1, batch).astype(np.int32)  # e.g. 1k..8k of 8k


def bench_decode(batch, max_len, *, ragged, num_heads=32, num_kv=8, head_dim=128, page_size=16,
                 configs=(None,), paged_configs=(None,), baselines=True, calls=20,
                 reps=7) -> list[dict[str, Any]]:
  """One query token per sequence against a cache of max_len; TB/s counts valid K+V bytes."""
  k1, k2, k3 = jax.random.split(jax.random.key(batch), 3)
  q = jax.random.normal(k1, (batch, num_heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(k2, (batch, max_len, num_kv, head_dim), jnp.bfloat16)
  v = jax.random.normal(k3, (batch, max_len, num_kv, head_dim), jnp.bfloat16)
  lengths_np = _decode_lengths(batch, max_len, ragged)
  lengths = jnp.asarray(lengths_np)
  kv_bytes = int(lengths_np.sum()) * num_kv * head_dim * 2 * 2
  case = (f"decode B{batch} cache {max_len} lengths "
          f"{'ragged ' if ragged else ''}{lengths_np.min()}-{lengths_np.max()} "
          f"N{num_heads} K{num_kv} H{head_dim} bf16")
  rows = []

  def add(impl, config, seconds, error):
    rows.append(dict(kind="decode", case=case, impl=impl, config=config, error=error,
                     time_us=None if seconds is None else seconds * 1e6,
                     tb_s=None if seconds is None else kv_bytes / seconds / 1e12))

  if baselines:
    for impl in ("cudnn", "xla"):
      def step(q, k, v, impl=impl):
        out = jax.nn.dot_product_attention(q[:, None], k, v, key_value_seq_lengths=lengths,
                                           implementation=impl)
        return out[:, 0]
      add(impl, None, *_try(_time_chain, step, q, k, v, calls=calls, reps=reps))
  for config in configs:
    step = functools.partial(decode_attention, lengths=lengths, **(config or {}))
    add("pallas", config, *_try(_time_chain, lambda q, k, v: step(q, k, v), q, k, v,
                                calls=calls, reps=reps))
  if paged_configs:
    # The same cache as a shuffled page pool: logical page j of sequence b is pool page perm[..].
    pages_per_seq = max_len // page_size
    perm = np.random.default_rng(1).permutation(batch * pages_per_seq)
    inverse = np.argsort(perm)
    k_pages = k.reshape(batch * pages_per_seq, page_size, num_kv, head_dim)[inverse]
    v_pages = v.reshape(batch * pages_per_seq, page_size, num_kv, head_dim)[inverse]
    table = jnp.asarray(perm.reshape(batch, pages_per_seq), jnp.int32)
    del k, v
    for config in paged_configs:
      step = functools.partial(paged_decode_attention, block_table=table, lengths=lengths,
                               **(config or {}))
      add(f"pallas-paged{page_size}", config,
          *_try(_time_chain, lambda q, kp, vp: step(q, kp, vp), q, k_pages, v_pages,
                calls=calls, reps=reps))
  return rows


def bench_decode_stacked(batch, length, max_len, *, configs=(None,), layers=32, num_heads=32, num_kv=8,
                         head_dim=128, reps=7) -> list[dict[str, Any]]:
  """The decode step's attention as the model calls it: a stacked `[L, B, S, K, H]` cache read in place
  (`layer=`), one call per layer chained through q (so every call reads its own layer from HBM, as a
  decode step does, not an L2-resident copy); every sequence `length` long. Time per call."""
  k1, k2, k3 = jax.random.split(jax.random.key(batch), 3)
  q = jax.random.normal(k1, (batch, num_heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(k2, (layers, batch, max_len, num_kv, head_dim), jnp.bfloat16)
  v = jax.random.normal(k3, (layers, batch, max_len, num_kv, head_dim), jnp.bfloat16)
  lengths = jnp.full((batch,), length, jnp.int32)
  kv_bytes = batch * length * num_kv * head_dim * 2 * 2
  case = f"decode stacked L{layers} B{batch} length {length} of {max_len} N{num_heads} K{num_kv} H{head_dim} bf16"
  rows = []
  for config in configs:
    @jax.jit
    def chain(q, k, v, config=config):
      for i in range(layers):
        q = decode_attention(q, k, v, lengths=lengths, layer=jnp.int32(i), **(config or {})).astype(q.dtype)
      return q

    def run():
      chain(q, k, v).block_until_ready()
      times = []
      for _ in range(reps):
        t0 = time.perf_counter()
        chain(q, k, v).block_until_ready()
        times.append(time.perf_counter() - t0)
      return statistics.median(times) / layers

    seconds, error = _try(run)
    rows.append(dict(kind="decode", case=case, impl="pallas", config=config, error=error,
                     time_us=None if seconds is None else seconds * 1e6,
                     tb_s=None if seconds is None else kv_bytes / seconds / 1e12))
  return rows


def stacked_decode_jobs():
  """The model's decode attention at llama-3-8b shapes over key blocks, pipelining depth, warps and splits:
  contexts of 1k at batch 1-128 (short loops: pipeline fill and shared memory per program matter) and
  4k at batch 16 and 64 (issue 5's decode cases), to choose the defaults by batch and length."""
  configs = ([None] + [dict(block_k=bk, num_stages=st) for bk, st in ((128, 1), (128, 3), (64, 2), (64, 3), (64, 4),
                                                                      (32, 3), (32, 4))]
             + [dict(block_k=64, num_stages=3, num_warps=8), dict(block_k=64, num_stages=3, num_splits=2)])
  return [functools.partial(bench_decode_stacked, batch, length, max_len, configs=configs)
          for batch, length, max_len in ((1, 1040, 1152), (8, 1040, 1152), (32, 1040, 1152), (128, 1040, 1152),
                                         (16, 4112, 4224), (64, 4112, 4224))]


# --------------------------------------------------------------------------------------------
# Sweeps (used to choose the defaults) and the default suite


def _grid(**axes):
  keys = list(axes)
  out = [{}]
  for key in keys:
    out = [dict(c, **{key: val}) for c in out for val in axes[key]]
  return out


def prefill_sweeps():
  """Second-round sweep around the best of a 24-config first round (see pallas_kernels/NOTES.md)."""
  h128 = [None] + [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st) for bq, bk, w, st in
                   [(32, 128, 8, 3), (32, 128, 8, 4), (32, 64, 4, 2), (32, 64, 8, 4),
                    (64, 64, 8, 2), (64, 64, 8, 3), (16, 64, 4, 2), (16, 32, 4, 3)]]
  h64 = [None] + [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st) for bq, bk, w, st in
                  [(32, 128, 4, 3), (32, 128, 4, 2), (32, 128, 4, 4), (16, 64, 4, 3),
                   (64, 64, 8, 3), (64, 128, 8, 3)]]
  h256 = [None] + [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st) for bq, bk, w, st in
                   [(16, 32, 4, 2), (16, 32, 4, 3), (16, 64, 8, 2), (32, 32, 8, 2),
                    (8, 32, 4, 3)]]
  return [dict(head_dim=128, configs=h128), dict(head_dim=64, configs=h64),
          dict(head_dim=256, num_heads=16, num_kv=4, configs=h256)]


def decode_sweep():
  dense = [None] + [dict(block_k=bk, num_warps=w, num_stages=st) for bk, w, st in
                    [(128, 4, 2), (128, 4, 3), (128, 4, 4), (64, 4, 3), (64, 4, 4), (256, 4, 2),
                     (128, 2, 2), (128, 2, 3)]]
  paged = [None] + [dict(pages_per_block=p, num_warps=4, num_stages=st)
                    for p, st in [(8, 3), (4, 2), (16, 2)]]
  splits = [None] + [dict(num_splits=s) for s in (1, 2, 3, 4, 6, 8, 12, 16)]
  return dense, paged, splits


def paged_jobs():
  """Paged (page 16) against dense decode over the paged kernel's keys per step and pipelining depth, at
  batches that need splits (16) and batches that fill the GPU without them (32-128): issue 5 asks paged
  within 10 % of dense at page 16."""
  paged = [None, dict(pages_per_block=8, num_stages=2), dict(pages_per_block=4, num_stages=3),
           dict(pages_per_block=8, num_stages=3), dict(pages_per_block=16, num_stages=2)]
  dense = [None, dict(block_k=64, num_stages=3)]
  cases = [(1, 8192, False), (16, 8192, True), (32, 4096, False), (64, 4096, False), (128, 2048, False)]
  return [functools.partial(bench_decode, b, s, ragged=r, configs=dense, paged_configs=paged, baselines=b in (1, 16, 64))
          for b, s, r in cases]


def long_decode_jobs():
  """Decode over long caches (16k-64k keys) beside cuDNN: where a batch-1 call stops being latency-bound (an 8k
  call moves 34 MB in ~20 us, 0.4 of copy), over splits and key blocks."""
  configs = ([None] + [dict(num_splits=s) for s in (16, 66, 132)]
             + [dict(block_k=bk, num_stages=st) for bk, st in ((64, 3), (128, 2), (128, 3))])
  cases = [(1, 16384, False), (1, 32768, False), (1, 65536, False), (4, 32768, False), (16, 32768, True)]
  return [functools.partial(bench_decode, b, s, ragged=r, configs=configs, paged_configs=[None]) for b, s, r in cases]


def run_kernel_benchmarks(out_dir: str | None = None, *, sweep: bool = False,
                          quick: bool = False, stacked: bool = False, paged: bool = False,
                          prefill: bool = False, long: bool = False) -> list[dict[str, Any]]:
  """Times the kernels (defaults, or sweeps) and the cuDNN / XLA baselines on the current GPU."""
  if jax.default_backend() != "gpu":
    raise RuntimeError("kernel benchmarks need a GPU (jax.default_backend() == 'gpu')")
  device = jax.devices()[0].device_kind
  ceilings = measure_ceilings()
  rows: list[dict[str, Any]] = [dict(kind="ceiling", case="device", impl="xla", config=None,
                                     error=None, **ceilings)]
  if prefill:
    jobs = prefill_length_jobs()
  elif long:
    jobs = long_decode_jobs()
  elif stacked:
    jobs = stacked_decode_jobs()
  elif paged:
    jobs = paged_jobs()
  elif sweep:
    dense, paged, splits = decode_sweep()
    jobs = [functools.partial(bench_prefill, **kw, baselines=kw["head_dim"] == 128)
            for kw in prefill_sweeps()]
    jobs += [
        functools.partial(bench_decode, 16, 8192, ragged=True, configs=dense + splits,
                          paged_configs=paged),
        functools.partial(bench_decode, 16, 8192, ragged=True, page_size=64, configs=(),
                          paged_configs=[None, dict(pages_per_block=4)],
                          baselines=False),
        functools.partial(bench_decode, 1, 8192, ragged=False,
                          configs=splits + [dict(num_splits=s, block_k=64) for s in (8, 16)],
                          paged_configs=[None, dict(num_splits=8)]),
        functools.partial(bench_decode, 64, 4096, ragged=False, configs=splits[:4],
                          paged_configs=[None]),
    ]
  else:
    jobs = [bench_prefill]
    if not quick:
      jobs.append(functools.partial(bench_prefill, head_dim=64))
    for batch, max_len, ragged in [(1, 8192, False), (16, 8192, True), (64, 4096, False)]:
      if not quick or batch == 16:
        jobs.append(functools.partial(bench_decode, batch, max_len, ragged=ragged))
    jobs.append(functools.partial(bench_decode, 16, 8192, ragged=True, page_size=64,
                                  configs=(), baselines=False))
  for job in jobs:  # write after every job, so a run cut short still leaves its numbers
    rows += job()
    _add_ratios(rows, ceilings)
    for row in rows:
      row["device"] = device
    print(format_table(rows[-1:]), flush=True)
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
      with open(os.path.join(out_dir, "kernel_bench.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
  return rows


def _add_ratios(rows, ceilings):
  """Ratios to cuDNN and XLA of the same case, and to the card's ceilings."""
  base = {(r["case"], r["impl"]): r.get("time_us") for r in rows if r["impl"] in ("cudnn", "xla")}
  for r in rows:
    t = r.get("time_us")
    if r["kind"] == "ceiling" or t is None:
      continue
    for impl in ("cudnn", "xla"):
      b = base.get((r["case"], impl))
      r[f"speedup_vs_{impl}"] = None if not b else b / t
    if r.get("tflop_s") is not None:
      r["mfu"] = r["tflop_s"] / ceilings["matmul_bf16_tflop_s"]
    if r.get("tb_s") is not None:
      r["mbu"] = r["tb_s"] / ceilings["copy_tb_s"]
      r["of_read_bw"] = r["tb_s"] / ceilings["read_tb_s"]


def format_table(rows: list[dict[str, Any]], best_only: bool = False) -> str:
  lines = []
  for r in rows:
    if r["kind"] == "ceiling":
      lines.append(f"# {r.get('device', '')}: copy {r['copy_tb_s']:.2f} TB/s, read "
                   f"{r['read_tb_s']:.2f} TB/s, bf16 matmul {r['matmul_bf16_tflop_s']:.0f} TFLOP/s")
      continue
    if r.get("error"):
      lines.append(f"{r['case'][:58]:58s} {r['impl']:15s} FAILED {r['error'][:90]}")
      continue
    rate = (f"{r['tflop_s']:7.1f} TF/s" if r.get("tflop_s") is not None
            else f"{r['tb_s']:7.3f} TB/s")
    vs = " ".join(f"x{r[k]:.2f}" if r.get(k) else "  -  "
                  for k in ("speedup_vs_cudnn", "speedup_vs_xla"))
    cfg = json.dumps(r["config"]) if r["config"] else "default"
    lines.append(f"{r['case'][:58]:58s} {r['impl']:15s} {r['time_us']:9.1f} us {rate} "
                 f"vs cudnn/xla {vs}  {cfg}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--sweep", action="store_true", help="block-size sweeps (slow)")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--stacked", action="store_true",
                      help="only the model's decode attention (stacked cache) over splits and block sizes")
  parser.add_argument("--paged", action="store_true", help="only paged vs dense decode over the paged kernel's configs")
  parser.add_argument("--prefill", action="store_true", help="only prefill over 2k-16k keys, each backend")
  parser.add_argument("--long", action="store_true", help="only decode over 16k-64k keys, splits and key blocks")
  args = parser.parse_args()
  rows = run_kernel_benchmarks(args.out, sweep=args.sweep, quick=args.quick, stacked=args.stacked, paged=args.paged,
                               prefill=args.prefill, long=args.long)
  print(format_table(rows))
  best: dict[tuple[str, str], dict[str, Any]] = {}
  for r in rows:
    rate = r.get("tflop_s") or r.get("tb_s")
    key = (r["case"], r["impl"])
    if rate and (key not in best or rate > (best[key].get("tflop_s") or best[key]["tb_s"])):
      best[key] = r
  print(json.dumps({f"{c} | {i}": dict(config=r["config"], us=round(r["time_us"], 1))
                    for (c, i), r in best.items()}))


if __name__ == "__main__":
  main()
