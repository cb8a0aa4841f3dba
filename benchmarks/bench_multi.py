"""Multi-device benchmark: the data/expert-parallel MoE layer (sj.sharding.moe_sharded).

  python benchmarks/bench_multi.py --preset=mixtral-8x7b --tokens=4096 --scaling=strong
  # smoke run on 8 virtual CPU devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python benchmarks/bench_multi.py --preset=tiny --tokens=256 --reps=3 --profile_dir=/tmp/p

Runs on however many devices JAX sees (GPUs, or virtual CPU devices). For every mesh size
n (1, 2, 4, ... up to jax.device_count(), or the --mesh list) it builds a 2-D mesh
("data", "expert") and times one jitted layer call:
  strong scaling: --tokens is the global token count, the same at every n;
  weak scaling:   --tokens is the count per device (global = tokens * n).
--mesh=auto puts as much of n on the expert axis as the experts allow (X = gcd(n, E),
D = n / X); --mesh=dp is pure data parallel (n x 1); or give shapes, e.g. 8x1,2x4,1x8.
Printed per mesh: median wall time of one call (over --reps), tokens/s, speedup and
efficiency against the smallest mesh, the all-to-all bytes each device sends per call,
and the routed-choice imbalance (max expert load / mean). Drop-free by default
(--capacity_factor=0); otherwise the dropped count is printed.

With --profile_dir, one call per mesh is traced (jax.profiler, Perfetto) and the mean
time per device is split into all-to-all, expert custom calls (the sparse kernels),
other collectives and everything else (benchmarks/_trace.py: GPU kernels on GPU, XLA:CPU
HLO ops on CPU). On virtual CPU devices all devices share the host's cores, so CPU
numbers check the plumbing, not scaling.

Multi-host: pass --distributed to call jax.distributed.initialize() first (cluster
auto-detection); only process 0 prints.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import samoyeds_jax as sj
from samoyeds_jax import _cli
from samoyeds_jax.presets import preset_config
from samoyeds_jax.sharding import moe_sharded, shard_params

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _trace import device_ops, time_by_category, trace_events  # noqa: E402
from _weights import pruned_sparse_layer, random_sparse_layer  # noqa: E402

FLAGS = flags.FLAGS
_cli.define_preset_flag("tiny")
flags.DEFINE_list("tokens", ["4096"], "token counts: global (strong) or per device (weak)")
flags.DEFINE_enum("scaling", "strong", ["strong", "weak"], "what --tokens means")
flags.DEFINE_string("mesh", "auto", "auto | dp | comma list of DxE mesh shapes")
flags.DEFINE_float("capacity_factor", 0.0, "0: drop-free; else rows per device pair "
                   "capped at ceil(c * T_local * k / X)")
_cli.define_sparsity_flags()
_cli.define_dtype_flag()
flags.DEFINE_integer("reps", 10, "timed calls (median)")
flags.DEFINE_integer("seed", 0, "PRNG seed")
flags.DEFINE_string("profile_dir", "", "trace one call per mesh here and print the time "
                    "split (all-to-all vs expert custom calls)")
flags.DEFINE_string("json_out", "", "write results as JSON here")
flags.DEFINE_list("paths", ["samoyeds", "dense"],
                  "samoyeds: sparse experts; dense: the dense expert-parallel twin "
                  "(jax.lax.ragged_dot on dense weights of the same shapes)")
flags.DEFINE_enum("weights", "random", ["random", "pruned"],
                  "random: valid encoded weights drawn on the device (fast; the kernels do "
                  "the same work whatever the values); pruned: sj.sparsify_moe of random dense "
                  "weights (host encode, ~1 min per Mixtral layer)")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first")


def _sizes(n_dev: int) -> list[int]:
    out, n = [], 1
    while n <= n_dev:
        out.append(n)
        n *= 2
    if out[-1] != n_dev:
        out.append(n_dev)
    return out


def mesh_shapes(spec: str, n_dev: int, num_experts: int) -> list[tuple[int, int]]:
    if spec in ("auto", "dp"):
        shapes = []
        for n in _sizes(n_dev):
            x = math.gcd(n, num_experts) if spec == "auto" else 1
            shapes.append((n // x, x))
        return shapes
    shapes = []
    for item in spec.split(","):
        d, x = (int(v) for v in item.lower().split("x"))
        if d * x > n_dev:
            raise app.UsageError(f"mesh {item} needs {d * x} devices; JAX sees {n_dev}")
        if num_experts % x:
            raise app.UsageError(f"mesh {item}: {num_experts} experts do not divide by {x}")
        shapes.append((d, x))
    return shapes


def _log(*a):
    if jax.process_index() == 0:
        print(*a, flush=True)


def main(argv):
    del argv
    if FLAGS.distributed:
        jax.distributed.initialize()
    cfg = preset_config(FLAGS.preset, _cli.sparsity_from_flags())
    n, v = cfg.sparsity.n, cfg.sparsity.v
    dtype = jnp.dtype(FLAGS.dtype)
    devices = jax.devices()
    dev = devices[0]
    cf = FLAGS.capacity_factor or None
    _log(f"devices: {len(devices)} x {dev.device_kind} ({dev.platform}), "
         f"{jax.process_count()} process(es); jax {jax.__version__}; preset {FLAGS.preset}: "
         f"E={cfg.num_experts} top-{cfg.top_k} d={cfg.d_model} f={cfg.d_ff} "
         f"shared={cfg.d_ff_shared}; {n}:{v} L={FLAGS.sub_row} {dtype.name}; "
         f"{FLAGS.scaling} scaling; capacity {'drop-free' if cf is None else cf}")

    # Same values on every process (deterministic PRNG).
    def make_params(path):
        key = jax.random.key(FLAGS.seed)
        if path == "dense":
            return sj.init_dense_moe(key, cfg, dtype)
        if FLAGS.weights == "random":
            return random_sparse_layer(key, cfg, dtype)
        return pruned_sparse_layer(key, cfg, dtype)

    shapes = mesh_shapes(FLAGS.mesh, len(devices), cfg.num_experts)
    rows = []
    for path in FLAGS.paths:
        params = make_params(path)
        for t_flag in map(int, FLAGS.tokens):
            base = None
            for d_ax, x_ax in shapes:
                size = d_ax * x_ax
                t = t_flag * size if FLAGS.scaling == "weak" else t_flag
                mesh = Mesh(np.array(devices[:size]).reshape(d_ax, x_ax), ("data", "expert"))
                ps = shard_params(params, mesh)
                tok = NamedSharding(mesh, P(("data", "expert")))
                x = jax.jit(lambda k: jax.random.normal(k, (t, cfg.d_model), dtype),
                            out_shardings=tok)(jax.random.key(FLAGS.seed + 1))
                fn = jax.jit(functools.partial(moe_sharded, cfg=cfg, mesh=mesh,
                                               capacity_factor=cf, return_stats=True))
                t0 = time.perf_counter()
                out, stats = jax.block_until_ready(fn(ps, x))
                compile_s = time.perf_counter() - t0
                samples = []
                for _ in range(FLAGS.reps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(ps, x))
                    samples.append(time.perf_counter() - t0)
                secs = float(np.median(samples))
                load = np.asarray(stats["expert_load"])
                t_local = -(-t // size)
                cap = (t_local * cfg.top_k if cf is None else
                       max(1, min(t_local * cfg.top_k, math.ceil(cf * t_local * cfg.top_k / x_ax))))
                a2a_bytes = 0 if x_ax == 1 else x_ax * cap * (cfg.d_model * dtype.itemsize + 4)
                row = dict(path=path, tokens=t, mesh=f"{d_ax}x{x_ax}", devices=size, ms=secs * 1e3,
                           tokens_per_s=t / secs, compile_s=compile_s,
                           dropped=int(stats["dropped"]),
                           imbalance=float(load.max() / max(load.mean(), 1e-9)),
                           a2a_send_mib=a2a_bytes / 2**20)
                if base is None:
                    base = row
                ideal = size / base["devices"]
                if FLAGS.scaling == "strong":
                    row["speedup"] = base["ms"] / row["ms"]
                else:  # weak: the same time at every size is ideal
                    row["speedup"] = ideal * base["ms"] / row["ms"]
                row["efficiency"] = row["speedup"] / ideal
                if FLAGS.profile_dir:
                    logdir = os.path.join(FLAGS.profile_dir, f"t{t}_{d_ax}x{x_ax}")
                    ops = device_ops(trace_events(fn, (ps, x), runs=1, logdir=logdir))
                    cats, n_seen = time_by_category(ops)
                    row["profile_us_per_device"] = cats
                    _log(f"  [T={t} mesh {d_ax}x{x_ax}] per device ({n_seen} traced): " +
                         "; ".join(f"{k} {val:.0f} us" for k, val in cats.items()))
                rows.append(row)
                del ps, x, out
        del params

    _log(f"\n{'path':>9} {'T':>7} {'mesh':>5} {'dev':>4} {'ms':>9} {'tokens/s':>11} {'speedup':>8} "
         f"{'eff':>5} {'a2a MiB':>8} {'imbal':>6} {'dropped':>7}")
    for r in rows:
        _log(f"{r['path']:>9} {r['tokens']:>7} {r['mesh']:>5} {r['devices']:>4} {r['ms']:9.3f} "
             f"{r['tokens_per_s']:11.0f} {r['speedup']:7.2f}x {r['efficiency']:5.2f} "
             f"{r['a2a_send_mib']:8.2f} {r['imbalance']:6.2f} {r['dropped']:>7}")
    if any("profile_us_per_device" in r for r in rows):
        _log(f"\n{'path':>9} {'T':>7} {'mesh':>5} " + " ".join(
            f"{k:>18}" for k in rows[0]["profile_us_per_device"]) + "   (us per device)")
        for r in rows:
            _log(f"{r['path']:>9} {r['tokens']:>7} {r['mesh']:>5} " + " ".join(
                f"{val:18.0f}" for val in r["profile_us_per_device"].values()))
    if FLAGS.json_out and jax.process_index() == 0:
        with open(FLAGS.json_out, "w") as fh:
            json.dump(dict(device=dev.device_kind, platform=dev.platform,
                           n_devices=len(devices), preset=FLAGS.preset,
                           scaling=FLAGS.scaling, nv=FLAGS.nv, sub_row=FLAGS.sub_row,
                           dtype=dtype.name, capacity_factor=cf, rows=rows), fh, indent=1)


if __name__ == "__main__":
    app.run(main)
