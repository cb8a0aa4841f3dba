"""One process of tests/test_multiprocess.py (not a test module itself).

Usage: ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES COORDINATOR SEED`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N CPU devices per process). Every
process draws the same layer from SEED, computes the one-device result on its own first
device, then runs the layer data-, expert- and tensor-parallel on meshes over every
process's devices, and checks the shards it holds (and the gradient w.r.t. x) against
the one-device result. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import dense_layer, f64, rand, rel_err, tol  # noqa: E402

# name: (mesh shape, axis names, expert axis, tensor axis, through moe_sharded (else
# plain jax.jit(sj.moe)), bit-identical to one device). Every mesh spans both processes:
# its leading axis is the process boundary.
CASES = {
    "dp8 moe_sharded": ((8, 1), ("data", "expert"), None, None, True, True),
    "ep8 moe_sharded": ((1, 8), ("data", "expert"), "expert", None, True, True),
    "tp8 jit": ((1, 8), ("data", "model"), None, "model", False, False),
    "dp2-ep2-tp2 moe_sharded": ((2, 2, 2), ("data", "expert", "model"), "expert", "model",
                                True, False),
    "tp2-ep2-dp2 jit": ((2, 2, 2), ("model", "expert", "data"), "expert", "model", False,
                        False),
}


def main(process_id: int, num_processes: int, coordinator: str, seed: int) -> int:
    # A generous heartbeat timeout: CI machines may be small and busy.
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=600)
    import samoyeds_jax as sj
    from samoyeds_jax import sharding as sh

    assert jax.process_count() == num_processes, jax.process_count()
    devices = jax.devices()
    cfg = sj.MoEConfig(num_experts=8, top_k=2, d_model=64, d_ff=256,
                       sparsity=sj.SparsityConfig(1, 2, 32))
    rng = np.random.default_rng(seed)
    params = sj.sparsify_moe(dense_layer(rng, cfg, jnp.bfloat16), cfg)
    x = rand(rng, (32, cfg.d_model), jnp.bfloat16)

    def loss_grad(fn):
        return jax.jit(jax.grad(lambda x, p: jnp.sum(fn(p, x).astype(jnp.float32) ** 2)))

    def layer(p, x):
        return sj.moe(p, x, cfg)

    ref, g_ref = np.asarray(f64(layer(params, x))), np.asarray(f64(loss_grad(layer)(x, params)))
    host = jax.tree.map(np.asarray, params)  # the same values in every process
    # Compile every program first, then run them: a process that reaches a collective
    # early waits (polling) for its peer, which on a loaded machine slows the peer's
    # compilation down further.
    programs = {}
    for name, (shape, names, ex, tp, sharded, exact) in CASES.items():
        mesh = Mesh(np.array(devices).reshape(shape), names)
        ps = sh.shard_params(host, mesh, expert_axis=ex, tensor_axis=tp)
        xs = jax.device_put(np.asarray(x), NamedSharding(mesh, P("data")))
        if sharded:
            def fn(p, x, mesh=mesh, ex=ex, tp=tp):
                return sh.moe_sharded(p, x, cfg, mesh, expert_axis=ex, tensor_axis=tp)
        else:
            fn = layer
        programs[name] = (jax.jit(fn).lower(ps, xs).compile(),
                          loss_grad(fn).lower(xs, ps).compile(), ps, xs, exact)
    failures = 0
    for name, (fwd, grad, ps, xs, exact) in programs.items():
        out, g = fwd(ps, xs), grad(xs, ps)
        for what, got, want, bound in (("out", out, ref, tol("k_split", jnp.bfloat16)),
                                       ("grad", g, g_ref, tol("sharded_grad", jnp.bfloat16))):
            for shard in got.addressable_shards:
                local, expect = f64(shard.data), want[shard.index]
                if exact and what == "out":
                    ok = np.array_equal(local, expect)
                    err = float(np.abs(local - expect).max())
                else:
                    err = rel_err(local, expect)
                    ok = err <= bound
                if not ok:
                    failures += 1
                    print(f"process {process_id} {name} {what} shard {shard.index}: "
                          f"error {err:.3g} (bound {0 if exact else bound})", flush=True)
        print(f"process {process_id} {name}: checked", flush=True)
    print(f"process {process_id}: {len(programs)} cases checked, {failures} failures",
          flush=True)
    jax.distributed.shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    pid, nproc, coord, s = sys.argv[1:5]
    sys.exit(main(int(pid), int(nproc), coord, int(s)))
