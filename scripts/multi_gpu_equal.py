"""The sharded layer equals the single-device layer, on real GPUs (issue 9).

For every mesh shape whose size divides the GPU count (data x expert: n x 1, 1 x n, ...),
sj.sharding.moe_sharded on the mesh vs sj.moe on GPU 0, for sparse experts and for the
dense twin (jax.lax.ragged_dot), at a small preset and at Mixtral-8x7B size with uneven
routing. Prints one line per case and exits 1 on any mismatch.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import samoyeds_jax as sj
from samoyeds_jax.moe import preset_config
from samoyeds_jax.sharding import moe_sharded, shard_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from _weights import random_sparse_layer  # noqa: E402

TOL = 2e-2  # bf16 outputs, fp32 accumulation in a different order per mesh


def main() -> int:
    gpus = jax.devices()
    n = len(gpus)
    print(f"{n} x {gpus[0].device_kind}; jax {jax.__version__}")
    shapes = sorted({(d, n // d) for d in range(1, n + 1) if n % d == 0})
    failures = 0
    for preset, tokens in (("tiny", 512), ("mixtral-8x7b", 1024)):
        cfg = preset_config(preset)
        key = jax.random.key(7)
        layers = {"sparse": random_sparse_layer(key, cfg, jnp.bfloat16),
                  "dense": sj.init_dense_moe(key, cfg, jnp.bfloat16)}
        # Uneven routing: a biased router sends most tokens to a few experts.
        for kind, params in layers.items():
            params = dict(params)
            params["router"] = params["router"] + jnp.linspace(0, 0.05, cfg.num_experts,
                                                               dtype=jnp.bfloat16)
            x = jax.random.normal(jax.random.key(11), (tokens, cfg.d_model), jnp.bfloat16)
            layer = sj.moe if kind == "sparse" else sj.moe_dense
            ref = np.asarray(jax.jit(layer, static_argnums=2)(params, x, cfg), np.float64)
            for d_ax, x_ax in shapes:
                if cfg.num_experts % x_ax:
                    continue
                mesh = Mesh(np.array(gpus[:d_ax * x_ax]).reshape(d_ax, x_ax), ("data", "expert"))
                ps = shard_params(params, mesh)
                xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
                out = jax.jit(moe_sharded, static_argnums=(2, 3))(ps, xs, cfg, mesh)
                got = np.asarray(out, np.float64)
                err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
                ok = np.isfinite(got).all() and err < TOL
                failures += not ok
                print(f"{preset:>13} {kind:>6} T={tokens} mesh {d_ax}x{x_ax}: rel err vs "
                      f"single device {err:.2e} -> {'OK' if ok else 'MISMATCH'}")
    print(f"sharded == single-device: {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
