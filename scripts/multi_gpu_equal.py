"""The sharded layer equals the single-device layer, on real GPUs.

For every mesh (data x expert x model) whose size is the GPU count and that the layer
divides, the layer on the mesh against sj.moe on GPU 0, at a small preset and at
Mixtral-8x7B size with uneven routing:

* sj.sharding.moe_sharded (shard_map), sparse experts and the dense twin
  (jax.lax.ragged_dot);
* jax.jit(sj.moe) on the placed sparse parameters (the primitive's partitioning rule),
  whose compiled HLO must hold no all-gather of a weight.

Prints one line per case and exits 1 on any mismatch.
"""
from __future__ import annotations

import itertools
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

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "benchmarks"))
sys.path.insert(0, os.path.join(_HERE, "..", "tests"))
from _weights import random_sparse_layer  # noqa: E402
from helpers import weight_gathers  # noqa: E402

# bf16 outputs; float32 accumulation in another order per mesh, and with a model axis the
# devices' partial down outputs rounded before their sum (tests/helpers.TOL["k_split"]).
TOL = 2e-2
AXES = ("data", "expert", "model")


def _meshes(n: int, cfg) -> list[tuple[int, int, int]]:
    """(data, expert, model) sizes with product n that the layer splits into whole tiles."""
    sp = cfg.sparsity
    out = []
    for d, x, m in itertools.product(range(1, n + 1), repeat=3):
        if (d * x * m == n and cfg.num_experts % x == 0
                and cfg.d_ff % (m * max(sp.m_multiple, sp.sub_row)) == 0):
            out.append((d, x, m))
    return out


def _err(got, ref) -> float:
    got = np.asarray(got, np.float64)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def main() -> int:
    gpus = jax.devices()
    n = len(gpus)
    print(f"{n} x {gpus[0].device_kind}; jax {jax.__version__}")
    failures = 0
    for preset, tokens in (("tiny", 512), ("mixtral-8x7b", 1024)):
        cfg = preset_config(preset)
        key = jax.random.key(7)
        layers = {"sparse": random_sparse_layer(key, cfg, jnp.bfloat16),
                  "dense": sj.init_dense_moe(key, cfg, jnp.bfloat16)}
        for kind, params in layers.items():
            # Uneven routing: a biased router sends most tokens to a few experts.
            params = dict(params)
            params["router"] = params["router"] + jnp.linspace(0, 0.05, cfg.num_experts,
                                                               dtype=jnp.bfloat16)
            x = jax.random.normal(jax.random.key(11), (tokens, cfg.d_model), jnp.bfloat16)
            layer = sj.moe if kind == "sparse" else sj.moe_dense
            ref = np.asarray(jax.jit(layer, static_argnums=2)(params, x, cfg), np.float64)
            for shape in _meshes(n, cfg):
                mesh = Mesh(np.array(gpus).reshape(shape), AXES)
                ex = "expert" if shape[1] > 1 else None
                tp = "model" if shape[2] > 1 else None
                ps = shard_params(params, mesh, expert_axis=ex, tensor_axis=tp)
                xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
                runs = {"moe_sharded": moe_sharded.lower(ps, xs, cfg, mesh, expert_axis=ex,
                                                         tensor_axis=tp).compile()}
                if kind == "sparse":
                    runs["jit(sj.moe)"] = jax.jit(sj.moe, static_argnums=2).lower(
                        ps, x, cfg).compile()
                for how, compiled in runs.items():
                    out = compiled(ps, xs if how == "moe_sharded" else x)
                    err = _err(out, ref)
                    gathers = weight_gathers(compiled.as_text())
                    ok = err < TOL and not gathers
                    failures += not ok
                    print(f"{preset:>13} {kind:>6} T={tokens} mesh {'x'.join(map(str, shape))} "
                          f"(data x expert x model) {how}: rel err vs single device "
                          f"{err:.2e}{f', weights all-gathered {gathers}' if gathers else ''}"
                          f" -> {'OK' if ok else 'MISMATCH'}")
    print(f"sharded == single-device: {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
