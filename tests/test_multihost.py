"""Multi-process (multi-host) generation with `jax.distributed`: two processes on this machine.

The test starts this file twice as a program (`--process-id 0/1`), each process with 2 CPU devices,
joined by `jax.distributed.initialize` on a loopback port and CPU collectives (gloo): a 4-device mesh of
data=2 (across the processes) x tensor=2 (inside each). Both processes run the same program; their
greedy tokens and logits must equal a single process's. `docs/multihost.md` shows the same program on a
real cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPTS = [[5, 9, 2, 7, 1, 3], [4, 4, 8], [11, 3, 2, 9, 9, 1, 6, 2, 7, 3, 5], [2]]
MAX_NEW = 8
TIMEOUT_S = 300


def tiny_config():
    import jaxinfer as ji

    return ji.ModelConfig.from_preset("tiny")


def host_params(config, seed: int = 0) -> dict:
    """The same random float32 weights in every process (numpy, seeded): no broadcast needed."""
    import jax

    from jaxinfer import params as params_lib

    rng = np.random.default_rng(seed)

    def leaf(spec):
        x = rng.standard_normal(spec.shape)
        if spec.kind == "norm":
            x = 1 + 0.1 * x
        elif spec.kind == "matrix":
            x = x / np.sqrt(params_lib._fan_in(spec))
        return x.astype(np.float32)

    return jax.tree.map(leaf, params_lib.param_specs(config), is_leaf=params_lib.is_spec)


def run(params, config):
    """Prefill logits and greedy tokens: the part that is identical for one process or many."""
    import jax.numpy as jnp

    import jaxinfer as ji
    from jaxinfer import sharding as sh
    from jaxinfer.generate import _host

    tokens = np.zeros((len(PROMPTS), max(map(len, PROMPTS))), np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = p
    lengths = np.asarray([len(p) for p in PROMPTS], np.int32)
    cache = sh.init_cache_on(sh.mesh_of(params), config, len(PROMPTS), 64, jnp.float32)
    logits, _ = ji.prefill(params, cache, tokens, lengths, config=config, impl="auto")
    result = ji.generate(ji.Model(config=config, params=params), PROMPTS, max_new_tokens=MAX_NEW, impl="auto")
    return _host(logits), result.token_ids


# ----------------------------------------------------------------------------------------------------
# The program each process runs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="one process of the 2-process jaxinfer test")
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--coordinator", required=True, help="host:port of process 0")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
        initialization_timeout=120,
    )
    from jaxinfer import sharding as sh

    config = tiny_config()
    mesh = sh.make_mesh(data=jax.process_count(), tensor=jax.local_device_count())  # tensor inside a process
    params = sh.shard_params(host_params(config), config, mesh)
    logits, token_ids = run(params, config)
    q = params["layers"]["q"]
    report = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "mesh": dict(mesh.shape),
        "q_spec": [None if a is None else str(a) for a in q.sharding.spec],
        "q_local_shards": [list(s.data.shape) for s in q.addressable_shards],
        "logits": logits.tolist(),
        "token_ids": token_ids,
    }
    Path(args.out).write_text(json.dumps(report))
    jax.distributed.shutdown()


# ----------------------------------------------------------------------------------------------------
# The test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_the_same_tokens_as_one(tmp_path):
    import jax

    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2 "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    ).strip()
    coordinator = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    for i in range(2):
        log = open(tmp_path / f"process{i}.log", "w")
        logs.append(log)
        cmd = [sys.executable, __file__, "--process-id", str(i), "--coordinator", coordinator,
               "--out", str(tmp_path / f"out{i}.json")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    outputs = "\n".join(f"--- process {i}:\n" + (tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2))
    assert all(p.returncode == 0 for p in procs), f"return codes {[p.returncode for p in procs]}\n{outputs}"

    reports = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in reports] == [0, 1]
    for r in reports:
        assert r["process_count"] == 2 and r["device_count"] == 4 and r["mesh"] == {"data": 2, "pipeline": 1, "tensor": 2}
        assert r["q_spec"] == ["pipeline", None, "tensor", None]
        cfg = tiny_config()
        assert r["q_local_shards"] == [[cfg.num_layers, cfg.dim, cfg.num_heads // 2, cfg.head_dim]] * 2

    # The reference: this process on one CPU device (CPU numerics, as in the workers), same weights, no mesh.
    config = tiny_config()
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        logits, token_ids = run(jax.device_put(host_params(config), cpu), config)
    for r in reports:
        got = np.asarray(r["logits"])
        assert np.abs(got - logits).max() / np.abs(logits).max() < 1e-5
        assert r["token_ids"] == token_ids
    assert all(len(t) == MAX_NEW for t in token_ids)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
