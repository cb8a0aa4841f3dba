"""Backward benchmark: forward + backward of one MoE layer, jax.grad w.r.t. x and the
weights, jitted.

  python benchmarks/bench_backward.py --preset=mixtral-8x7b --tokens=512,4096

Paths per token count T (the dense paths run on the decoded pruned weights, so every path
differentiates the same function up to dropped tokens):
  samoyeds               sj.moe, gradients w.r.t. the kept values (gate_up, down), the
                         router and x; the backward products through the CUDA handlers
                         (ffi/cuda_backward.cu) where the build has them
  samoyeds_xla_backward  the same, compiled inside backward.xla_backward_on_cuda(): the
                         backward products through their XLA path (a decoded weight for dx,
                         an XLA SDDMM for dvalues); the same program as samoyeds off CUDA
  xla_ragged_dot         sj.moe_dense (3 jax.lax.ragged_dot), gradients w.r.t. the dense
                         gate, up, down, router and x
  xla_capacity_einsum    the GShard-style capacity layer of benchmarks/_baselines.py
                         (--capacity_factor), same gradients
The loss is sum(layer(x) * ct) for a fixed random ct. Each path is timed twice in the run:
the loss alone (forward) and its gradient (forward + backward); the backward's time is their
difference. `vs dense` is the path's time over the best dense path's at the same T, for
forward + backward and for the backward alone. One step per timed program (a step reads gigabytes:
neither a warm L2 nor launch overlap matters), the median over `--reps` programs; device
time from a profiler trace on a GPU (benchmarks/_trace.py), wall clock elsewhere. `--shrink` divides d_model and d_ff (a CPU
smoke run: tests/test_benchmarks.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import samoyeds_jax as sj
from samoyeds_jax import _cli, backward
from samoyeds_jax.presets import preset_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
from _baselines import moe_capacity  # noqa: E402
from _trace import time_per_call  # noqa: E402

FLAGS = flags.FLAGS
_cli.define_preset_flag("mixtral-8x7b")
flags.DEFINE_list("tokens", ["512", "4096"], "token counts T")
_cli.define_sparsity_flags()
_cli.define_dtype_flag()
flags.DEFINE_float("capacity_factor", 1.25, "capacity factor of the einsum path")
flags.DEFINE_list("paths", ["samoyeds", "samoyeds_xla_backward", "xla_ragged_dot",
                            "xla_capacity_einsum"], "which paths")
flags.DEFINE_integer("shrink", 1, "divide d_model and d_ff by this (smoke runs)")
flags.DEFINE_integer("reps", 10, "timed programs (median)")
flags.DEFINE_integer("seed", 0, "PRNG seed")
flags.DEFINE_string("json_out", "", "write results as JSON here")

DENSE = ("xla_ragged_dot", "xla_capacity_einsum")


def _programs(layer):
    """The jitted loss sum(layer(p, x) * ct) and its gradient w.r.t. (p, x); the weights
    are arguments, never closures (closed-over arrays become constants)."""
    def loss(p, x, ct):
        return jnp.sum(layer(p, x).astype(jnp.float32) * ct)

    return jax.jit(loss), jax.jit(jax.grad(loss, (0, 1), allow_int=True))


def main(argv):
    del argv
    cfg = preset_config(FLAGS.preset, _cli.sparsity_from_flags())
    if FLAGS.shrink > 1:
        cfg = dataclasses.replace(cfg, d_model=cfg.d_model // FLAGS.shrink,
                                  d_ff=cfg.d_ff // FLAGS.shrink)
    dtype = jnp.dtype(FLAGS.dtype)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; preset "
          f"{FLAGS.preset}: d={cfg.d_model} f={cfg.d_ff} E={cfg.num_experts} top-{cfg.top_k}"
          f"; {FLAGS.nv} L={FLAGS.sub_row} {dtype.name}; forward + backward w.r.t. x and "
          f"the weights")
    dense = sj.init_dense_moe(jax.random.key(FLAGS.seed), cfg, dtype)
    sparse = sj.sparsify_moe(dense, cfg)
    del dense
    pruned = sj.decode_moe(sparse, cfg)
    jax.block_until_ready((sparse, pruned))
    layers = {
        "samoyeds": (lambda p, x: sj.moe(p, x, cfg), sparse, contextlib.nullcontext),
        "samoyeds_xla_backward": (lambda p, x: sj.moe(p, x, cfg), sparse,
                                  backward.xla_backward_on_cuda),
        "xla_ragged_dot": (lambda p, x: sj.moe_dense(p, x, cfg), pruned,
                           contextlib.nullcontext),
        "xla_capacity_einsum": (lambda p, x: moe_capacity(p, x, cfg, FLAGS.capacity_factor)[0],
                                pruned, contextlib.nullcontext),
    }
    unknown = set(FLAGS.paths) - set(layers)
    if unknown:
        raise app.UsageError(f"unknown --paths {sorted(unknown)}; expected some of "
                             f"{sorted(layers)}")
    rng = np.random.default_rng(FLAGS.seed)
    rows = []
    for t in map(int, FLAGS.tokens):
        x = jnp.asarray(rng.standard_normal((t, cfg.d_model)), dtype)
        ct = jnp.asarray(rng.standard_normal((t, cfg.d_model)), jnp.float32)
        for path in FLAGS.paths:
            layer, params, context = layers[path]
            secs = []
            for program in _programs(layer):
                with context():  # the lowering (first call) happens inside
                    wall, dev_s, _ = time_per_call(program, (params, x, ct), 1, FLAGS.reps)
                secs.append(dev_s if dev_s is not None else wall)
            fwd, total = secs
            rows.append(dict(tokens=t, path=path, ms=total * 1e3, fwd_ms=fwd * 1e3,
                             bwd_ms=(total - fwd) * 1e3,
                             timer="device" if dev_s is not None else "wall"))
            print(f"  T={t:6d} {path:22s} fwd+bwd {total * 1e3:10.4f} ms, fwd "
                  f"{fwd * 1e3:10.4f} ms", flush=True)

    print(f"\n{'T':>6} {'path':22} {'fwd+bwd ms':>11} {'vs dense':>9} {'fwd ms':>9} "
          f"{'bwd ms':>9} {'vs dense':>9}")
    for row in rows:
        same = [r for r in rows if r["tokens"] == row["tokens"] and r["path"] in DENSE]
        rel = {}
        for key in ("ms", "bwd_ms"):
            best = min((r[key] for r in same), default=None)
            rel[key] = row[key] / best if best else None
        row["vs_best_dense"], row["bwd_vs_best_dense"] = rel["ms"], rel["bwd_ms"]
        fmt = {k: f"{v:.2f}x" if v else "" for k, v in rel.items()}
        print(f"{row['tokens']:>6} {row['path']:22} {row['ms']:11.4f} {fmt['ms']:>9} "
              f"{row['fwd_ms']:9.4f} {row['bwd_ms']:9.4f} {fmt['bwd_ms']:>9}")
    speed = _report.speedups(rows, ("tokens",), "samoyeds", DENSE)
    for r in speed:
        r["tokens_per_expert"] = r["tokens"] * cfg.top_k / cfg.num_experts
        r["label"] = f"{FLAGS.preset} fwd+bwd {FLAGS.nv} vs {r['baseline']}"
    if FLAGS.json_out:
        _report.write_json(FLAGS.json_out, dict(
            bench="backward", device=dev.device_kind, preset=FLAGS.preset, nv=FLAGS.nv,
            sub_row=FLAGS.sub_row, dtype=dtype.name, d_model=cfg.d_model, d_ff=cfg.d_ff,
            capacity_factor=FLAGS.capacity_factor, reps=FLAGS.reps),
            rows, speedup=speed)


if __name__ == "__main__":
    app.run(main)
