"""Prefill flash attention for Hopper through Mosaic GPU: wgmma, TMA and warp specialisation.

Why a second prefill kernel: the Triton lowering cannot issue Hopper's asynchronous tensor-core
products or its bulk copies, and stays near 0.66x cuDNN at B4 S4096 causal H128. This one is built the
way Hopper wants attention built (FlashAttention-3's plan, written for this library's inputs):

- One CTA holds `2 * block_q` query tokens of one query head of one sequence, in three warpgroups. The
  third streams key/value blocks into a ring of `stages` shared-memory slots by TMA and does nothing
  else; the first two own `block_q` query rows each and run the online softmax.
- The two compute warpgroups take turns on the tensor cores (a two-party rendezvous, `turn`): while
  one runs its softmax on the CUDA cores, the other's products run.
- Keys are read only up to what the CTA needs (`kv_lengths`, the causal diagonal); blocks that are
  valid for every row skip the mask. Query tiles are visited heaviest first (causal), so the tail of
  the launch is short.

Same contract as `flash_attention` (right-padded ragged batch, `q_offsets`, causal or not, GQA, rows
with no valid key written as zeros), for bf16/fp16 and head dims 64 and 128, without sliding window
or soft-cap. Keys and values beyond `kv_lengths` must be finite (a cache's zeros or stale entries
are): a masked key's probability is exactly 0, but it still enters the product with V. The wrapper
`flash_attention` chooses this kernel on Hopper when the shape allows and keeps the Triton kernel
for everything else (the CPU's interpret mode included).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import LOG2E, M_INIT, MASK_VALUE

# Per head dim: (block_q per compute warpgroup, block_kv, stages). Tuned on an H200 at B4 S4096 N32
# K8 causal bf16 (pallas_kernels/NOTES.md).
DEFAULTS = {64: (64, 128, 2), 128: (64, 128, 2)}
COMPUTE_WARPGROUPS = 2


def _plgpu():
  # Imported on use: the module needs absl-py and is only reached on a GPU.
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu


def supports(q, k, *, sliding_window=None, softcap=None) -> bool:
  """Whether this kernel takes these shapes: half-precision, head dim 64/128, no window or soft-cap,
  the key length a multiple of the key block."""
  head_dim = q.shape[-1]
  if head_dim not in DEFAULTS or sliding_window is not None or softcap is not None:
    return False
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return False
  return k.shape[1] % DEFAULTS[head_dim][1] == 0


def _body(len_ref, off_ref, q_ref, k_ref, v_ref, o_ref, scratch, *, block_q, block_kv, stages, group,
          causal, scale, num_tiles, pingpong, native):
  """One CTA: `COMPUTE_WARPGROUPS * block_q` query tokens of one (sequence, query head)."""
  plgpu = _plgpu()
  q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, k_free, v_free, turn = scratch
  head_dim = q_ref.shape[-1]
  dtype = q_ref.dtype
  b, head = lax.axis_index("batch"), lax.axis_index("heads")
  wg = lax.axis_index("wg")
  rows = COMPUTE_WARPGROUPS * block_q  # query tokens per tile
  # Heaviest tiles first under a causal mask (the tile axis is the grid's slowest, so every
  # sequence's heaviest tiles start first), so the launch ends on short tiles.
  tile = num_tiles - 1 - lax.axis_index("q_tiles")

  def take_turn():
    if pingpong:
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

  kv_len = jnp.minimum(len_ref[b], k_ref.shape[1])
  q_off = off_ref[b]
  cta_t0 = tile * rows

  def key_end(t_end):
    """The exclusive end of the keys that query tokens < t_end need."""
    end = jnp.minimum(kv_len, q_off + t_end) if causal else kv_len
    return jnp.maximum(end, 0)

  # The CTA's key blocks: at least one, also for an empty sequence (its rows come out as zeros), so
  # every warpgroup runs the same sequence of barriers.
  cta_steps = jnp.maximum(pl.cdiv(key_end(cta_t0 + rows), block_kv), 1)

  def slot_of(j):
    return lax.rem(j, stages)

  def compute():
    """A compute warpgroup's `block_q` rows of the tile."""

    def release(free, j):
      # Frees the slot of key block j for the streamer, only if block j + stages is needed: an
      # arrival nobody waits for would leave the barrier a phase ahead.
      pl.when(j + stages < cta_steps)(lambda: plgpu.barrier_arrive(free.at[slot_of(j)]))

    t0 = cta_t0 + wg * block_q
    q_tile = q_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(t0, block_q), head], q_tile, q_ready.at[wg])
    steps = jnp.maximum(pl.cdiv(key_end(t0 + block_q), block_kv), 1)
    # Blocks whose keys are all valid for every row of this warpgroup: below kv_len and, causally,
    # at or before the first row's position.
    open_end = jnp.minimum(kv_len, q_off + t0 + 1) if causal else kv_len
    open_steps = jnp.clip(open_end // block_kv, 0, steps)
    plgpu.barrier_wait(q_ready.at[wg])
    if pingpong:
      pl.when(wg == 1)(take_turn)  # offset the two by one turn
    wgmma_layout = plgpu.Layout.WGMMA

    def filled(shape, value, layout):  # the interpreter has no layouts
      x = jnp.full(shape, value, jnp.float32)
      return plgpu.layout_cast(x, layout) if native else x

    def logits(slot, after_issue):
      """Raw q k^T of the key block in `slot`; `after_issue` runs while the product does."""
      if not native:  # the interpreter's wgmma takes no transposed operand: the same product in jnp
        after_issue()
        return lax.dot_general(q_tile[...], k_smem[slot], (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)

      def product(s_ref):
        plgpu.wgmma(s_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
        after_issue()
        return s_ref[...]

      return pl.run_scoped(product, plgpu.ACC((block_q, block_kv), jnp.float32))

    def add_weighted_values(acc, p, slot, after_issue):
      """acc + p v of the value block in `slot`; `after_issue` runs while the product does."""
      if not native:  # the interpreter's wgmma takes no register operand
        after_issue()
        return acc + lax.dot_general(p, v_smem[slot], (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

      def product(acc_ref):
        plgpu.wgmma(acc_ref, p, v_smem.at[slot])
        after_issue()

      return pl.run_state(product)(plgpu.ACC.init(acc))

    def softmax(s, j, m, l, *, masked):
      """Folds raw logits s of key block j into the running max m and sum l: (p, m, l, alpha)."""
      s = s * (scale * LOG2E)  # base 2: exp(x) = exp2(x log2 e)
      if masked:
        layout = {"layout": wgmma_layout} if native else {}
        row = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0, **layout)
        col = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, **layout)
        kpos = j * block_kv + col
        keep = kpos < kv_len
        if causal:
          keep = keep & (kpos <= q_off + t0 + row)
        s = jnp.where(keep, s, MASK_VALUE)
      m_new = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
      l = l * alpha + p.sum(axis=1)
      return p.astype(dtype), m_new, l, alpha

    def rescale(acc, alpha):
      return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

    m = filled((block_q,), M_INIT, wgmma_layout.reduce(1))
    l = filled((block_q,), 0.0, wgmma_layout.reduce(1))
    acc = filled((block_q, head_dim), 0.0, wgmma_layout)

    def wait_keys(j):
      @pl.when(j < steps)
      def _():
        plgpu.barrier_wait(k_ready.at[slot_of(j)])

    def step(j, carry, *, masked):
      # One turn at the tensor cores per block: q k^T is issued at the start of the turn, p v
      # at its end, and the softmax runs while the other warpgroup's products do.
      acc, m, l = carry
      slot = slot_of(j)
      s = logits(slot, after_issue=take_turn)
      release(k_free, j)
      p, m, l, alpha = softmax(s, j, m, l, masked=masked)
      if pingpong:
        plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(v_ready.at[slot])
      if pingpong:
        plgpu.barrier_wait(turn)
      acc = add_weighted_values(rescale(acc, alpha), p, slot,
                                after_issue=lambda: wait_keys(j + 1))
      release(v_free, j)
      return acc, m, l

    wait_keys(0)
    carry = (acc, m, l)
    carry = lax.fori_loop(0, open_steps, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(open_steps, steps, functools.partial(step, masked=True), carry)

    @pl.loop(steps, cta_steps)
    def _release(j):
      # The other warpgroup still needs these blocks: see them arrive (every waiter of a barrier
      # observes each of its phases), free their slots, and keep the turns in step.
      slot = slot_of(j)
      plgpu.barrier_wait(k_ready.at[slot])
      plgpu.barrier_wait(v_ready.at[slot])
      release(k_free, j)
      release(v_free, j)
      take_turn()
      take_turn()

    if pingpong:
      pl.when(wg == 0)(take_turn)

    l = jnp.where(l > 0, l, 1.0)  # a row with no valid key has acc == 0: written as zeros
    out = acc / lax.broadcast_in_dim(l, acc.shape, [0])
    q_tile[...] = out.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, o_ref.at[b, pl.ds(t0, block_q), head])
    plgpu.wait_smem_to_gmem(0)

  def stream():
    """The streaming warpgroup: the tile's key/value blocks through the ring."""
    kv_head = lax.div(head, group)

    def load(j, slot, after_free: bool):
      """Key and value block j into `slot`; `after_free`: first wait until both compute warpgroups have
      freed the slot."""
      keys = (b, pl.ds(j * block_kv, block_kv), kv_head)
      for src, dst, ready, free in ((k_ref, k_smem, k_ready, k_free), (v_ref, v_smem, v_ready, v_free)):
        if after_free:
          plgpu.barrier_wait(free.at[slot])
        plgpu.copy_gmem_to_smem(src.at[keys], dst.at[slot], ready.at[slot])

    for j in range(min(stages, k_ref.shape[1] // block_kv)):
      pl.when(j < cta_steps)(functools.partial(load, j, j, False))
    pl.loop(stages, cta_steps)(lambda j: load(j, slot_of(j), True))

  @pl.when(wg < COMPUTE_WARPGROUPS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    compute()

  @pl.when(wg == COMPUTE_WARPGROUPS)
  def _stream():
    plgpu.set_max_registers(40, action="decrease")
    stream()


@functools.partial(
    jax.jit,
    static_argnames=("causal", "scale", "block_q", "block_kv", "stages", "pingpong", "interpret"))
def flash_attention_mgpu(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    kv_lengths: jax.Array,  # [B] int
    q_offsets: jax.Array | None = None,  # [B] int
    causal: bool = True,
    scale: float | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    stages: int | None = None,
    pingpong: bool = True,
    interpret=False,
) -> jax.Array:  # [B, T, N, H]
  """`flash_attention`'s contract on Hopper's tensor cores (see the module docstring for the limits).

  Called through `flash_attention`, which checks the arguments and falls back to the Triton kernel
  for what this one does not take."""
  plgpu = _plgpu()
  if interpret is True:  # Mosaic GPU's own interpreter: threads, barriers and copies simulated on the CPU
    params = getattr(plgpu, "InterpretGPUParams", None)  # public from jax 0.11
    if params is None:
      from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    interpret = params()
  batch, seq_q, num_heads, head_dim = q.shape
  _, seq_k, num_kv_heads, _ = k.shape
  d_block_q, d_block_kv, d_stages = DEFAULTS[head_dim]
  block_q, block_kv, stages = block_q or d_block_q, block_kv or d_block_kv, stages or d_stages
  if block_q % 64 or block_kv % 64:
    raise ValueError(f"block_q and block_kv must be multiples of 64, got {block_q}, {block_kv}")
  if seq_k % block_kv:
    raise ValueError(f"key length {seq_k} must be a multiple of block_kv {block_kv}")
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  rows = COMPUTE_WARPGROUPS * block_q
  num_tiles = pl.cdiv(seq_q, rows)
  padded = num_tiles * rows
  if padded != seq_q:  # extra query rows attend like any other and are cut off afterwards
    q = jnp.pad(q, ((0, 0), (0, padded - seq_q), (0, 0), (0, 0)))
  kv_lengths = kv_lengths.astype(jnp.int32)
  q_offsets = (jnp.zeros((batch,), jnp.int32) if q_offsets is None
               else q_offsets.astype(jnp.int32))

  def entry(len_ref, off_ref, q_ref, k_ref, v_ref, o_ref):
    # 128-byte swizzled tiles of 64 elements: the layout wgmma reads and TMA writes.
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    smem = (
        plgpu.SMEM((COMPUTE_WARPGROUPS, block_q, head_dim), q.dtype, transforms=tiled),
        plgpu.SMEM((stages, block_kv, head_dim), k.dtype, transforms=tiled),
        plgpu.SMEM((stages, block_kv, head_dim), v.dtype, transforms=tiled),
    )
    barriers = (
        plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),  # q_ready
        plgpu.Barrier(num_barriers=stages),  # k_ready
        plgpu.Barrier(num_barriers=stages),  # v_ready
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),  # k_free
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),  # v_free
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),  # turn
    )
    body = functools.partial(
        _body, block_q=block_q, block_kv=block_kv, stages=stages, group=num_heads // num_kv_heads,
        causal=causal, scale=scale, num_tiles=num_tiles, pingpong=pingpong, native=not interpret)
    pl.run_scoped(lambda *scratch: body(len_ref, off_ref, q_ref, k_ref, v_ref, o_ref, scratch),
                  *smem, *barriers, collective_axes="wg")

  out = plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(num_heads, batch, num_tiles),
      grid_names=("heads", "batch", "q_tiles"),
      num_threads=COMPUTE_WARPGROUPS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret,
      kernel_name="flash_attention_mgpu",
  )(kv_lengths, q_offsets, q, k, v)
  return out[:, :seq_q] if padded != seq_q else out
