"""Layer benchmark: the whole MoE layer (router -> dispatch -> experts -> combine), jitted.

  python benchmarks/bench_layer.py --preset=mixtral-8x7b --tokens=16,512,4096,16384

Paths per token count T (same weights: the dense paths run on the decoded pruned weights,
so every path computes the same function up to dropped tokens):
  samoyeds            sj.moe: SEL dispatch + 2 sparse ragged dots (fused gate_up, down)
  xla_ragged_dot      sj.moe_dense: the same routing, x[sel] gathered, 3 jax.lax.ragged_dot
  xla_capacity_einsum GShard-style capacity factor (--capacity_factor, 1.25; the two
                      einsum paths live in benchmarks/_baselines.py): positions
                      from a cumsum of the one-hot expert mask (first choices first),
                      tokens over capacity dropped, dispatch [E, C, d] by scatter, batched
                      einsums, combine by gather (the one-hot einsum dispatch would add
                      O(T*E*C*d) FLOPs, so it is not used)
  xla_all_experts     every expert on every token, masked by the routing weights (only
                      where its [E, T, d_ff] intermediates fit --all_experts_max_gib)
  samoyeds_kernels    kernel-only: the 2 sj.ragged_dot calls of sj.moe for the same routing
                      (sel, group sizes and the GLU input precomputed)
  xla_kernels         kernel-only: the 3 jax.lax.ragged_dot calls of the dense twin
  samoyeds_gate_up, samoyeds_down (not run by default): the two calls of samoyeds_kernels
                      alone; samoyeds_gate_up_unfused: the gate_up product without the
                      fused GLU, then the GLU in XLA (what the fusion replaces)
The overhead of routing, dispatch, GLU and combine is stated as layer - kernels. `err` is
the relative error of a layer path against sj.moe_dense on the first token set (nonzero
for the capacity path when tokens are dropped).
Each timed program runs `--rotate` layer calls on distinct token sets back to back (so a
warm L2 or launch overlap does not flatter anyone); the median over `--reps` programs is
divided by `--rotate`. Shared experts (qwen2-moe, deepseek-moe) are in every layer path
and in none of the kernel-only rows.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import samoyeds_jax as sj
from samoyeds_jax import _cli
from samoyeds_jax.ops import _glu_act
from samoyeds_jax.presets import preset_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
from _baselines import moe_all_experts, moe_capacity  # noqa: E402
from _trace import time_per_call  # noqa: E402

FLAGS = flags.FLAGS
_cli.define_preset_flag("mixtral-8x7b")
flags.DEFINE_list("tokens", ["16", "512", "4096"], "token counts T")
_cli.define_sparsity_flags()
_cli.define_dtype_flag()
flags.DEFINE_float("capacity_factor", 1.25, "capacity factor of the einsum path")
flags.DEFINE_float("all_experts_max_gib", 8.0,
                   "skip the all-experts path when its intermediates exceed this")
flags.DEFINE_list("paths", ["samoyeds", "xla_ragged_dot", "xla_capacity_einsum",
                            "xla_all_experts", "samoyeds_kernels", "xla_kernels"],
                  "which paths")
flags.DEFINE_integer("rotate", 4, "distinct token sets per timed program")
flags.DEFINE_integer("reps", 10, "timed programs (median)")
flags.DEFINE_integer("seed", 0, "PRNG seed")
flags.DEFINE_string("json_out", "", "write results as JSON here")
flags.DEFINE_string("csv_out", "", "write the result rows as CSV here")
flags.DEFINE_string("plot", "", "write the speedup plot (PNG) here; needs matplotlib")


# --- timing ------------------------------------------------------------------------------

def _unrolled(f):
    """One program that applies f(params_i, *set_i) to `rotate` (params, argument) pairs.
    The weights are arguments, never closures (closed-over arrays become constants), and
    the dense paths get one weight copy per call: with a shared copy XLA merges the calls'
    dots and reads the weights once for all of them."""
    return jax.jit(lambda params, sets: tuple(f(p, *s) for p, s in zip(params, sets)))


def _copies(params):
    # Adding i to every weight keeps the routing (a constant shift of all router logits).
    return [jax.tree.map(lambda a, i=i: a + jnp.asarray(i, a.dtype), params)
            for i in range(FLAGS.rotate)]


def _glu_after(gu: jax.Array, activation: str) -> jax.Array:
    """act(gate) * up of a [R, 2f] product, in XLA (float32 math, rounded to gu's dtype)."""
    f = gu.shape[-1] // 2
    g, u = gu[:, :f].astype(jnp.float32), gu[:, f:].astype(jnp.float32)
    return (_glu_act(g, activation) * u).astype(gu.dtype)


def _time(fn, args) -> float:
    """Seconds per call: device time from a profiler trace on a GPU, else wall clock."""
    wall, dev, _ = time_per_call(fn, args, FLAGS.rotate, FLAGS.reps)
    return dev if dev is not None else wall


def main(argv):
    del argv
    _report.check_plot_flag(FLAGS.plot)
    cfg = preset_config(FLAGS.preset, _cli.sparsity_from_flags())
    n, v = cfg.sparsity.n, cfg.sparsity.v
    dtype = jnp.dtype(FLAGS.dtype)
    dev = jax.devices()[0]
    e, k, d, f = cfg.num_experts, cfg.top_k, cfg.d_model, cfg.d_ff
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; preset "
          f"{FLAGS.preset}: d={d} f={f} E={e} top-{k} {cfg.router}"
          f"{f' shared={cfg.num_shared_experts}x{cfg.d_ff_shared}' if cfg.has_shared else ''}"
          f"; {n}:{v} L={FLAGS.sub_row} {dtype.name}")
    key = jax.random.key(FLAGS.seed)
    dense = sj.init_dense_moe(key, cfg, dtype)
    sparse = sj.sparsify_moe(dense, cfg, progress=True)
    del dense
    pruned = sj.decode_moe(sparse, cfg)  # every dense path runs on the same pruned weights
    jax.block_until_ready((sparse, pruned))
    sparse_sets, pruned_sets = [sparse] * FLAGS.rotate, _copies(pruned)
    print(f"weights: dense {sj.moe_param_bytes(pruned) / 2**20:.1f} MiB, sparse "
          f"{sj.moe_param_bytes(sparse) / 2**20:.1f} MiB")
    rng = np.random.default_rng(FLAGS.seed)
    rows = []

    def record(t, path, secs, **extra):
        rows.append(dict(tokens=t, path=path, ms=secs * 1e3, **extra))
        print(f"  T={t:6d} {path:20s} {secs * 1e3:10.4f} ms"
              + "".join(f"  {a}={b}" for a, b in extra.items()), flush=True)

    for t in map(int, FLAGS.tokens):
        xs = [jnp.asarray(rng.standard_normal((t, d)), dtype) for _ in range(FLAGS.rotate)]
        sets = [(x,) for x in xs]
        paths = FLAGS.paths
        twin = np.asarray(sj.moe_dense(pruned, xs[0], cfg), np.float64)

        def err(y):  # relative error vs the dense twin on the first token set (a sanity check)
            y = np.asarray(y, np.float64)
            return f"{np.linalg.norm(y - twin) / np.linalg.norm(twin):.2g}"

        if "samoyeds" in paths:
            fn = _unrolled(lambda p, x: sj.moe(p, x, cfg))
            record(t, "samoyeds", _time(fn, (sparse_sets, sets)),
                   err=err(fn(sparse_sets, sets)[0]))
        if "xla_ragged_dot" in paths:
            record(t, "xla_ragged_dot",
                   _time(_unrolled(lambda p, x: sj.moe_dense(p, x, cfg)), (pruned_sets, sets)))
        if "xla_capacity_einsum" in paths:
            fn = _unrolled(lambda p, x: moe_capacity(p, x, cfg, FLAGS.capacity_factor))
            y0, dropped = fn(pruned_sets, sets)[0]
            record(t, "xla_capacity_einsum", _time(fn, (pruned_sets, sets)), err=err(y0),
                   dropped=f"{int(dropped)}/{t * k}")
        if "xla_all_experts" in paths:
            gib = 3 * e * t * max(f, d) * dtype.itemsize / 2**30
            if gib <= FLAGS.all_experts_max_gib:
                fn = _unrolled(lambda p, x: moe_all_experts(p, x, cfg))
                record(t, "xla_all_experts", _time(fn, (pruned_sets, sets)),
                       err=err(fn(pruned_sets, sets)[0]))
            else:
                print(f"  T={t:6d} xla_all_experts      skipped ({gib:.1f} GiB > "
                      f"--all_experts_max_gib={FLAGS.all_experts_max_gib})")
        # Kernel-only: the same routing as the layer, computed outside the timed program.
        if any(p_.endswith("kernels") or p_.startswith("samoyeds_") for p_ in paths):
            routed = []
            for x in xs:
                _, experts = sj.route(sparse["router"], x, cfg)
                sel, gs, _ = sj.dispatch(experts, e)
                h = jnp.asarray(rng.standard_normal((t * k, f)), dtype)
                routed.append((x, sel, gs, h))
            if "samoyeds_kernels" in paths:
                fn = _unrolled(lambda p, x, sel, gs, h: (
                    sj.ragged_dot(x, p["gate_up"], gs, sel, glu=cfg.activation),
                    sj.ragged_dot(h, p["down"], gs)))
                record(t, "samoyeds_kernels", _time(fn, (sparse_sets, routed)))
            parts = {
                "samoyeds_gate_up": lambda p, x, sel, gs, h: sj.ragged_dot(
                    x, p["gate_up"], gs, sel, glu=cfg.activation),
                "samoyeds_gate_up_unfused": lambda p, x, sel, gs, h: _glu_after(
                    sj.ragged_dot(x, p["gate_up"], gs, sel), cfg.activation),
                "samoyeds_down": lambda p, x, sel, gs, h: sj.ragged_dot(h, p["down"], gs),
            }
            for name, part in parts.items():
                if name in paths:
                    record(t, name, _time(_unrolled(part), (sparse_sets, routed)))
            if "xla_kernels" in paths:
                def three(p, x, sel, gs, h):
                    xs_ = x[sel]
                    return (jax.lax.ragged_dot(xs_, p["gate"], gs),
                            jax.lax.ragged_dot(xs_, p["up"], gs),
                            jax.lax.ragged_dot(h, p["down"], gs))
                record(t, "xla_kernels", _time(_unrolled(three), (pruned_sets, routed)))

    print(f"\n{'T':>6} {'path':20} {'ms':>10} {'vs samoyeds':>12}")
    for row in rows:
        same_t = {r["path"]: r["ms"] for r in rows if r["tokens"] == row["tokens"]}
        ref = same_t.get("samoyeds")
        rel = f"{row['ms'] / ref:.2f}x" if ref else ""
        extra = "".join(f"  {name} {row[name]}" for name in ("err", "dropped") if name in row)
        print(f"{row['tokens']:>6} {row['path']:20} {row['ms']:10.4f} {rel:>12}{extra}")
    for t in map(int, FLAGS.tokens):
        same_t = {r["path"]: r["ms"] for r in rows if r["tokens"] == t}
        for layer, kern in (("samoyeds", "samoyeds_kernels"), ("xla_ragged_dot", "xla_kernels")):
            if layer in same_t and kern in same_t:
                over = same_t[layer] - same_t[kern]
                print(f"T={t}: {layer} routing/dispatch/GLU/combine overhead = "
                      f"{over:.4f} ms ({over / same_t[layer]:.0%} of the layer)")
    # Speedup of the sparse layer over each dense layer path, and kernels over kernels.
    speed = (_report.speedups(rows, ("tokens",), "samoyeds",
                              ("xla_ragged_dot", "xla_capacity_einsum", "xla_all_experts"))
             + _report.speedups(rows, ("tokens",), "samoyeds_kernels", ("xla_kernels",)))
    for r in speed:
        r["tokens_per_expert"] = r["tokens"] * k / e
        what = "kernels" if r["baseline"] == "xla_kernels" else "layer"
        r["label"] = f"{FLAGS.preset} {what} {FLAGS.nv} vs {r['baseline']}"
    if FLAGS.json_out:
        _report.write_json(FLAGS.json_out, dict(
            device=dev.device_kind, preset=FLAGS.preset, nv=FLAGS.nv, sub_row=FLAGS.sub_row,
            dtype=dtype.name, capacity_factor=FLAGS.capacity_factor, rotate=FLAGS.rotate,
            reps=FLAGS.reps), rows, speedup=speed)
    if FLAGS.csv_out:
        _report.write_csv(FLAGS.csv_out, rows, dict(device=dev.device_kind,
                                                    preset=FLAGS.preset, nv=FLAGS.nv))
    if FLAGS.plot:
        _report.plot_speedup(speed, FLAGS.plot, f"{FLAGS.preset}: one MoE layer, {FLAGS.nv} "
                             f"L={FLAGS.sub_row}, {dtype.name}, {dev.device_kind}")


if __name__ == "__main__":
    app.run(main)
