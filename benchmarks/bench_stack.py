"""Stack benchmark: the forward of L MoE layers (x <- x + moe_i(x)), sparse vs dense, jitted.

  python benchmarks/bench_stack.py --preset=mixtral-8x7b --layers=4 \\
      --tokens=16,128,1024,8192 --json_out=stack.json --csv_out=stack.csv \\
      --plot=stack.png [--profile_dir=/tmp/prof]

Paths (benchmarks/_stack.py; every layer has its own weights, all paths the same ones):
  samoyeds             sj.moe on the SparseWeights
  xla_ragged_dot       sj.moe_dense, the dense twin (jax.lax.ragged_dot) on the decoded weights
  xla_capacity_einsum  GShard capacity-factor einsums (--capacity_factor; the fastest dense
                       layer on the H100 at 512-4096 tokens in bench_layer.py; drops tokens)
Time: device time per forward from a profiler trace on a GPU (benchmarks/_trace.py; the
wall clock off-GPU), median of --reps wall samples alongside. No rotation of inputs as in
bench_layer.py: each layer reads its own weights (>= 170 MiB of sparse weights per layer
for every real preset, far past the 50 MB L2), so a warm cache cannot help, and the trace
has no host dispatch in it. `err` is the relative error of the stack's output against the
dense twin (xla_ragged_dot); `GiB` the program's argument + output + temp bytes
(memory_analysis). A path that fails at some T (out of memory) is recorded with its error.

--weights=random (default) draws valid encoded weights directly on the device (the kernels'
work does not depend on the values); --weights=pruned runs the library's magnitude
pruning + host encode per layer (sj.sparsify_moe, ~1 min per Mixtral-8x7B layer).

--profile_dir keeps one trace per (path, T) (open in Perfetto / TensorBoard) and prints the
device time per named scope (layer{i}/samoyeds_moe, ...) and in the sparse kernels.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import samoyeds_jax as sj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
import _stack  # noqa: E402  (defines the flags shared with bench_memory.py)
from _trace import device_ops, time_per_call, trace_events  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("tokens", ["16", "512", "4096"], "token counts T per forward")
flags.DEFINE_enum("weights", "random", ["random", "pruned"],
                  "random: valid encoded weights drawn on the device; pruned: "
                  "sj.sparsify_moe of random dense weights (slow host encode)")
flags.DEFINE_integer("reps", 10, "timed forwards (wall-clock median)")
flags.DEFINE_string("profile_dir", "", "keep a jax.profiler trace per (path, T) here and "
                    "print the device time per named scope")
flags.DEFINE_integer("profile_runs", 2, "forwards in each --profile_dir trace")
flags.DEFINE_string("plot", "", "write the speedup plot (PNG) here; needs matplotlib")


def _rel_err(y: jax.Array, ref: jax.Array) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def _profile(compiled, args: tuple, name: str) -> dict[str, float]:
    """Trace --profile_runs forwards into --profile_dir/name; device us per named scope."""
    logdir = os.path.join(FLAGS.profile_dir, name)
    events = trace_events(compiled, args, runs=FLAGS.profile_runs, logdir=logdir)
    return _stack.time_by_scope(device_ops(events), _stack.op_names(compiled),
                                FLAGS.profile_runs)


def _measure(path: str, cfg, t: int, x: jax.Array, params: list[dict]
             ) -> tuple[dict, jax.Array]:
    """(result row, stack output) of one path at one token count."""
    compiled = _stack.stack_fn(path, cfg, FLAGS.capacity_factor).lower(params, x).compile()
    y, dropped = compiled(params, x)
    wall, dev_s, per_kernel = time_per_call(compiled, (params, x), 1, FLAGS.reps)
    secs = dev_s if dev_s is not None else wall
    row = dict(tokens=t, tokens_per_expert=_stack.tokens_per_expert(cfg, t), path=path,
               ms=secs * 1e3, ms_per_layer=secs * 1e3 / FLAGS.layers, wall_ms=wall * 1e3,
               timer="device" if dev_s is not None else "wall",
               gib=_stack.memory_bytes(compiled)["total"] / 2**30)
    if path == "xla_capacity_einsum":
        row["dropped"] = int(dropped)
    # GPU kernel names of the sparse custom call (none off-GPU: no device trace).
    kern = sum(us for name, us in per_kernel.items() if _stack.SPARSE_KERNEL.search(name))
    if kern:
        row["sparse_kernel_ms"] = kern * 1e-3
    if FLAGS.profile_dir:
        row["scope_us"] = _profile(compiled, (params, x), f"{path}_T{t}")
        print(f"  [{path} T={t}] device us per forward: " + "; ".join(
            f"{k}={v:.0f}" for k, v in row["scope_us"].items()))
    print(f"  T={t:6d} {path:20s} {row['ms']:10.4f} ms ({row['timer']})  "
          f"{row['gib']:.3f} GiB", flush=True)
    return row, y


def main(argv: list[str]) -> None:
    del argv
    _report.check_plot_flag(FLAGS.plot)
    _stack.check_paths()
    cfg, dtype = _stack.config_from_flags()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; "
          f"{_stack.describe(cfg, dtype)}; weights {FLAGS.weights}", flush=True)

    sparse = _stack.sparse_layers(cfg, dtype, FLAGS.layers, FLAGS.seed, FLAGS.weights)
    dense_needed = any(p in _stack.DENSE_PATHS for p in FLAGS.paths)
    # The dense paths run on the decoded sparse weights: every path computes the same stack.
    dense = [sj.decode_moe(p, cfg) for p in sparse] if dense_needed else []
    jax.block_until_ready((sparse, dense))
    weights = {"samoyeds": _stack.weight_bytes(sparse)}
    if dense:
        weights["dense"] = _stack.weight_bytes(dense)
    print("weights: " + ", ".join(f"{k} {v / 2**30:.3f} GiB" for k, v in weights.items()))

    rng = np.random.default_rng(FLAGS.seed)
    rows = []
    for t in map(int, FLAGS.tokens):
        x = jnp.asarray(rng.standard_normal((t, cfg.d_model)), dtype)
        outs = {}
        for path in FLAGS.paths:
            try:
                params = sparse if path == _stack.SPARSE_PATH else dense
                row, outs[path] = _measure(path, cfg, t, x, params)
            except jax.errors.JaxRuntimeError as err:
                # Out of memory (the dense paths at large T): record it, keep going.
                msg = str(err).splitlines()[0][:160]
                row = dict(tokens=t, tokens_per_expert=_stack.tokens_per_expert(cfg, t),
                           path=path, error=msg)
                print(f"  T={t:6d} {path:20s} failed: {msg}", flush=True)
            rows.append(row)
        ref = outs.pop("xla_ragged_dot", None)  # the dense twin: the reference output
        for row in rows:
            if ref is not None and row["tokens"] == t and row["path"] in outs:
                row["err"] = _rel_err(outs[row["path"]], ref)
        del outs, ref

    timed = [r for r in rows if "ms" in r]
    speed = _report.speedups(timed, ("tokens", "tokens_per_expert"), _stack.SPARSE_PATH,
                             _stack.DENSE_PATHS)
    for r in speed:
        r["label"] = f"{FLAGS.preset} stack x{FLAGS.layers} {FLAGS.nv} vs {r['baseline']}"

    print(f"\n{'T':>6} {'tok/exp':>8} {'path':20} {'ms/fwd':>10} {'ms/layer':>9} "
          f"{'speedup':>8} {'GiB':>7} {'err':>8}   (ms: {timed[0]['timer'] if timed else ''})")
    for row in rows:
        if "error" in row:
            print(f"{row['tokens']:>6} {row['tokens_per_expert']:>8.1f} {row['path']:20} "
                  f"failed: {row['error']}")
            continue
        sp = next((f"{r['speedup']:.2f}x" for r in speed if r["tokens"] == row["tokens"]
                   and r["baseline"] == row["path"]), "")
        err = f"{row['err']:.2g}" if "err" in row else ""
        extra = f"  dropped {row['dropped']}" if "dropped" in row else ""
        print(f"{row['tokens']:>6} {row['tokens_per_expert']:>8.1f} {row['path']:20} "
              f"{row['ms']:10.4f} {row['ms_per_layer']:9.4f} {sp:>8} {row['gib']:7.3f} "
              f"{err:>8}{extra}")
    print("speedup = dense path time / samoyeds time (> 1: the sparse stack is faster)")

    sp = cfg.sparsity
    meta = dict(bench="stack", device=dev.device_kind, platform=dev.platform,
                jax=jax.__version__, preset=FLAGS.preset, layers=FLAGS.layers, nv=FLAGS.nv,
                sub_row=sp.sub_row, dtype=jnp.dtype(dtype).name, weights=FLAGS.weights,
                capacity_factor=FLAGS.capacity_factor, reps=FLAGS.reps,
                num_experts=cfg.num_experts, top_k=cfg.top_k, d_model=cfg.d_model,
                d_ff=cfg.d_ff, weight_bytes=weights)
    if FLAGS.json_out:
        _report.write_json(FLAGS.json_out, meta, rows, speedup=speed)
    if FLAGS.csv_out:
        _report.write_csv(FLAGS.csv_out, rows, dict(device=dev.device_kind,
                                                    preset=FLAGS.preset,
                                                    layers=FLAGS.layers, nv=FLAGS.nv))
    if FLAGS.plot:
        _report.plot_speedup(speed, FLAGS.plot,
                             f"{FLAGS.preset}: {FLAGS.layers}-layer MoE stack, {FLAGS.nv} "
                             f"L={sp.sub_row}, {jnp.dtype(dtype).name}, {dev.device_kind}")
    for path in (FLAGS.json_out, FLAGS.csv_out, FLAGS.plot):
        if path:
            print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
