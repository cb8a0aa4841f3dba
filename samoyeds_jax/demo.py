"""Demo: one (or a few) MoE layers with a real model's shapes, sparse vs dense.

  python -m samoyeds_jax.demo                       # tiny on CPU, mixtral-8x7b on a GPU
  python -m samoyeds_jax.demo --preset=qwen2-moe --tokens=4096 --nv=1:2 --dtype=bfloat16

Random weights with the preset's shapes are pruned to N:V + 2:4 and encoded (progress
bar), then three jitted stacks ``x <- x + moe_l(x)`` run on the same tokens:

* ``sparse``: ``sj.moe`` on the encoded weights (the Samoyeds kernel);
* ``dense twin``: ``sj.moe_dense`` on the pruned dense weights: the sparse layer's exact
  counterpart, so its error column is the kernel's numerical error;
* ``dense original``: ``sj.moe_dense`` on the unpruned weights (for information: the
  error column is what pruning random weights costs; real checkpoints need fine-tuning or
  a pruning-aware recipe to keep accuracy).

The table gives max abs / relative (Frobenius) error against the dense twin, the weight
bytes of each, and the median time per call after warmup (``block_until_ready``).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import samoyeds_jax as sj
from samoyeds_jax import _cli
from samoyeds_jax.presets import preset_config

FLAGS = flags.FLAGS
_cli.define_preset_flag("auto", extra=("auto",),
                        help="model shapes; auto: tiny on CPU, mixtral-8x7b on a GPU")
flags.DEFINE_integer("tokens", 0, "tokens per call; 0: 64 for tiny, 2048 otherwise")
_cli.define_sparsity_flags()
_cli.define_dtype_flag(help="parameter and activation dtype")
flags.DEFINE_integer("layers", 1, "MoE layers stacked (x <- x + moe_l(x))")
flags.DEFINE_integer("reps", 5, "timed calls (median) after warmup")
flags.DEFINE_integer("seed", 0, "PRNG seed of the random weights and tokens")
flags.DEFINE_string("checkpoint", None,
                    "a samoyeds-convert output (.safetensors): run its first --layers MoE "
                    "layers instead of random ones (loader: samoyeds_jax.checkpoint)")
_cli.define_top_k_flag("with --checkpoint: override the stored top_k")


def _stack(layer_fn, cfg):
    def run(params_list, x):
        for p in params_list:
            x = x + layer_fn(p, x, cfg)
        return x
    return jax.jit(run)


def _time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def _timing_note(dev) -> str:
    """What a CPU time is: the wall clock of whole jitted calls, which on the CPU is the
    device time, and the threads the sparse kernel ran on."""
    if dev.platform != "cpu":
        return ""
    cap = os.environ.get("SAMOYEDS_CPU_THREADS")
    threads = (f"SAMOYEDS_CPU_THREADS={cap}" if cap
               else f"XLA's CPU threads, {os.cpu_count()} CPUs")
    return (f"; each the wall clock of one jitted call to block_until_ready, after 2 warm-up "
            f"calls; the sparse kernel on {threads}")


def _errors(y, ref) -> tuple[float, float]:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(y - ref).max()), float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def _load_converted(path: str, num_layers: int):
    """(cfg, sparse layers, label) from a ``samoyeds-convert`` output file."""
    try:
        layers, info, _ = sj.load_checkpoint(path, top_k=FLAGS.top_k, load_other=False)
    except Exception as err:  # the loader's own errors say what is wrong with the file
        raise SystemExit(
            f"samoyeds_jax.demo: --checkpoint={path}: {err}. The demo reads files written by "
            f"samoyeds-convert (python -m samoyeds_jax.checkpoint --input HF_DIR --output "
            f"OUT.safetensors --nv 1:2); loading and converting Hugging Face "
            f"checkpoints is samoyeds_jax.checkpoint's job") from None
    cfg = info.get("moe_config")
    if cfg is None:
        raise SystemExit(f"samoyeds_jax.demo: --checkpoint={path} does not record top_k; "
                         f"pass --top_k")
    chosen = list(layers)[:num_layers]
    return cfg, [layers[i] for i in chosen], f"checkpoint {path} (MoE layers {chosen})"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    backend = jax.default_backend()
    dev = jax.devices()[0]
    key = jax.random.key(FLAGS.seed)
    t0 = time.perf_counter()
    if FLAGS.checkpoint:
        # Real weights, already pruned and encoded: no unpruned original to compare with.
        cfg, sparse, label = _load_converted(FLAGS.checkpoint, FLAGS.layers)
        originals = None
        dtype = jnp.dtype(sparse[0]["gate_up"].dtype)
        tokens = FLAGS.tokens or 2048
    else:
        preset = FLAGS.preset
        if preset == "auto":
            preset = "mixtral-8x7b" if backend == "gpu" else "tiny"
        tokens = FLAGS.tokens or (64 if preset == "tiny" else 2048)
        cfg = preset_config(preset, _cli.sparsity_from_flags())
        dtype = jnp.dtype(FLAGS.dtype)
        label = f"preset {preset}"
        if backend == "cpu" and preset != "tiny":
            print("note: large presets take minutes on CPU (pruning and encoding on the host, "
                  "then the dense layers)")
    sp = cfg.sparsity
    print(f"samoyeds_jax demo: {label} (d_model={cfg.d_model} d_ff={cfg.d_ff} "
          f"E={cfg.num_experts} top-{cfg.top_k} router={cfg.router}"
          + (f" shared={cfg.num_shared_experts}x d_ff_shared={cfg.d_ff_shared}"
             f"{' gated' if cfg.shared_expert_gate else ''}" if cfg.has_shared else "")
          + f"), {FLAGS.layers} layer(s), {tokens} tokens, {dtype.name}, "
          f"{sp.n}:{sp.v} + 2:4 sub_row={sp.sub_row} (density {sp.density:.1%})")
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}")

    if FLAGS.checkpoint:
        pruned = [sj.decode_moe(p, cfg) for p in sparse]
    else:
        originals, pruned, sparse = [], [], []
        for _ in range(FLAGS.layers):
            key, k_layer = jax.random.split(key)
            dense = sj.init_dense_moe(k_layer, cfg, dtype)
            sparse.append(sj.sparsify_moe(dense, cfg, progress=True))
            pruned.append(sj.prune_moe(dense, cfg))
            originals.append(dense)
    jax.block_until_ready((sparse, pruned))
    print(f"{'loaded' if FLAGS.checkpoint else 'pruned + encoded'} {len(sparse)} layer(s) "
          f"in {time.perf_counter() - t0:.1f} s")

    x = jax.random.normal(jax.random.fold_in(key, 1), (tokens, cfg.d_model), dtype)
    runs = {"sparse (samoyeds)": (_stack(sj.moe, cfg), sparse),
            "dense twin (pruned)": (_stack(sj.moe_dense, cfg), pruned)}
    if originals:
        runs["dense original"] = (_stack(sj.moe_dense, cfg), originals)
    outs, times = {}, {}
    for name, (fn, params) in runs.items():
        outs[name] = fn(params, x)
        times[name] = _time(fn, params, x, reps=FLAGS.reps)
    ref = outs["dense twin (pruned)"]
    dense_bytes = sum(sj.moe_param_bytes(p) for p in pruned)
    print(f"\n{'path':22} {'max abs err':>12} {'rel err':>10} {'weights MiB':>12} "
          f"{'vs dense':>9} {'ms/call':>10}")
    for name in runs:
        nbytes = sum(sj.moe_param_bytes(p) for p in runs[name][1])
        if name == "dense twin (pruned)":
            mx, rel = "reference", ""
        else:
            mx, rel = (f"{e:.4g}" for e in _errors(outs[name], ref))
        print(f"{name:22} {mx:>12} {rel:>10} {nbytes / 2**20:12.1f} "
              f"{nbytes / dense_bytes:8.2f}x {times[name] * 1e3:10.3f}")
    speed = times["dense twin (pruned)"] / times["sparse (samoyeds)"]
    print("\nerrors are against the dense twin on the same pruned weights"
          + ("; the original's row is the pruning error of random weights." if originals
             else "; tokens are random normals, not the model's hidden states.")
          + "\nsparse vs dense twin: "
          f"{speed:.2f}x the speed on {dev.platform} ({tokens} tokens, median of "
          f"{FLAGS.reps} calls{_timing_note(dev)}).")


if __name__ == "__main__":
    app.run(main)
