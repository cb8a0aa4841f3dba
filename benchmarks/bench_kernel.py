"""Kernel benchmark: sj.dot / sj.ragged_dot against XLA's dense paths, same run, same inputs.

  python benchmarks/bench_kernel.py --preset=mixtral-8x7b --tokens=16,4096
  python benchmarks/bench_kernel.py --shape=1024x4096 --tokens=16,256 --repeat=5   # CPU

Cases per token count T:
  single  one expert, T tokens: sj.dot vs jnp.dot on the decoded dense weight;
  grouped E experts, top-k routing of T tokens (balanced, so that a batched einsum is
          valid too): sj.ragged_dot with SEL vs jax.lax.ragged_dot on gathered rows vs
          a batched dense einsum [E, T*k/E, K] x [E, K, M].
Each timed program runs `--rotate` calls on distinct inputs (and distinct weights in the
single case) back to back, so neither launch overhead nor a warm L2 flatters anyone;
the median over `--reps` programs is divided by `--rotate`.
Printed: time, dense-equivalent TFLOP/s (2*R*K*M / t) and GB/s of the bytes each path
actually reads and writes.

On a GPU the time is device time from a profiler trace; on the CPU (the C++ handler) it is
the wall clock of the blocked-on program, which is the device time there. `--shape=KxM`
replaces the preset's projection shape, and `--repeat=N` measures every path N times in
turn (sparse, then its baselines) and prints the median with the spread (min..max) of the
speedup, for machines whose other load moves single measurements.
"""

from __future__ import annotations

import itertools
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import samoyeds_jax as sj
from samoyeds_jax import _cli
from samoyeds_jax.presets import PRESETS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
from _trace import time_per_call  # noqa: E402


FLAGS = flags.FLAGS
_cli.define_preset_flag("mixtral-8x7b")
flags.DEFINE_list("tokens", ["16", "4096"], "token counts T")
flags.DEFINE_enum("proj", "up", ["up", "down"], "up: K=d_model, M=d_ff; down: K=d_ff, M=d_model")
_cli.define_sparsity_flags()
_cli.define_dtype_flag()
flags.DEFINE_list("cases", ["single", "grouped"], "which cases")
flags.DEFINE_integer("rotate", 4, "distinct input sets per timed program")
flags.DEFINE_integer("reps", 20, "timed programs (median)")
flags.DEFINE_string("shape", "", "KxM: this weight shape instead of the preset's --proj")
flags.DEFINE_integer("repeat", 1, "measure every path this many times in turn; report the "
                     "median and the spread of the speedup")
flags.DEFINE_string("json_out", "", "write results as JSON here")
flags.DEFINE_string("csv_out", "", "write the result rows as CSV here")
flags.DEFINE_string("plot", "", "write the speedup plot (PNG) here; needs matplotlib")
flags.DEFINE_string("profile_dir", "", "write a jax.profiler trace of one timed program per "
                    "path here and print the device time per kernel name")


def _time(fn, args, name: str = "") -> tuple[float, float | None]:
    """(wall seconds per call, device seconds per call or None off-GPU)."""
    logdir = os.path.join(FLAGS.profile_dir, name) if FLAGS.profile_dir else None
    # A trace gives device time on a GPU only; on the CPU the wall clock is the device time.
    trace = jax.default_backend() == "gpu" or bool(FLAGS.profile_dir)
    wall, dev, per_kernel = time_per_call(fn, args, FLAGS.rotate, FLAGS.reps, logdir, trace)
    if per_kernel and FLAGS.profile_dir:
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:4]
        print(f"  [{name}] device us per program: " + "; ".join(f"{k}={v:.0f}" for k, v in top))
    return wall, dev


def _unrolled(f):
    """One program that applies f to each of `rotate` argument sets."""
    return jax.jit(lambda sets: tuple(f(*s) for s in sets))


def _nbytes(*arrays) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def _cpu_note(dev) -> str:
    """On the CPU: the processor and the threads the handler may use."""
    if dev.platform != "cpu":
        return ""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh
                          if ln.startswith("model name")), model)
    except OSError:
        pass
    threads = os.environ.get("SAMOYEDS_CPU_THREADS", "XLA's pool")
    return f", {model}, {os.cpu_count()} CPUs, SAMOYEDS_CPU_THREADS={threads}"


def _rate(v: float) -> str:
    """8 characters; three decimals for the small rates of a CPU."""
    return f"{v:8.1f}" if v >= 10 else f"{v:8.3f}"


def _median_rows(samples: list[dict]) -> list[dict]:
    """One row per (case, T, path) in first-seen order: the median over repeats of every
    number, with the spread of ms."""
    groups: dict[tuple, list[dict]] = {}
    for r in samples:
        groups.setdefault((r["case"], r["tokens"], r["path"]), []).append(r)
    rows = []
    for (case, t, path), rs in groups.items():
        row = dict(case=case, tokens=t, path=path, timer=rs[0]["timer"], repeats=len(rs))
        for key in ("ms", "wall_ms", "tflops", "gbs"):
            row[key] = float(np.median([r[key] for r in rs]))
        row["ms_min"], row["ms_max"] = min(r["ms"] for r in rs), max(r["ms"] for r in rs)
        rows.append(row)
    return rows


def _best_speedups(samples: list[dict], case: str, tokens: int) -> list[float]:
    """Per repeat: the best baseline's ms over samoyeds' ms, for one case and T."""
    out = []
    for rep in sorted({r["repeat"] for r in samples}):
        mine = [r for r in samples
                if (r["case"], r["tokens"], r["repeat"]) == (case, tokens, rep)]
        ours = [r["ms"] for r in mine if r["path"] == "samoyeds"]
        base = [r["ms"] for r in mine if r["path"] != "samoyeds"]
        if ours and base:
            out.append(min(base) / ours[0])
    return out


def main(argv):
    del argv
    _report.check_plot_flag(FLAGS.plot)
    p = PRESETS[FLAGS.preset]
    d, f, experts, top_k = p["d_model"], p["d_ff"], p["num_experts"], p["top_k"]
    k, m = (d, f) if FLAGS.proj == "up" else (f, d)
    cfg = _cli.sparsity_from_flags()
    dtype = jnp.dtype(FLAGS.dtype)
    rng = np.random.default_rng(0)
    if FLAGS.shape:
        try:
            k, m = (int(a) for a in FLAGS.shape.lower().split("x"))
        except ValueError:
            raise app.UsageError(f"--shape must look like KxM, got {FLAGS.shape!r}") from None
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}){_cpu_note(dev)}; jax {jax.__version__}; "
          f"preset {FLAGS.preset} {FLAGS.shape or FLAGS.proj}: K={k} M={m} E={experts} "
          f"top-{top_k}; {cfg.n}:{cfg.v} L={cfg.sub_row} {dtype.name}")
    n_w = max(FLAGS.rotate, experts)
    w = jnp.asarray(rng.standard_normal((n_w, k, m), np.float32) / np.sqrt(k), dtype)
    sw = sj.encode(sj.prune(w, cfg), cfg)
    wd = sj.decode(sw)  # the dense baselines run on the same (pruned) weights
    del w
    samples = []  # one row per path, T and repeat

    def record(case, t_tokens, name, times, r, bytes_moved):
        # Device time when a trace has it (GPU), else wall clock.
        wall, dev = times
        secs = dev if dev is not None else wall
        flops = 2.0 * r * k * m
        samples.append(dict(case=case, tokens=t_tokens, path=name, ms=secs * 1e3,
                            wall_ms=wall * 1e3, timer="device" if dev is not None else "wall",
                            tflops=flops / secs / 1e12, gbs=bytes_moved / secs / 1e9,
                            repeat=rep))

    for rep, t in itertools.product(range(FLAGS.repeat), map(int, FLAGS.tokens)):
        xs = [jnp.asarray(rng.standard_normal((t, k)), dtype) for _ in range(FLAGS.rotate)]
        if "single" in FLAGS.cases:
            ours = _unrolled(sj.dot)
            dense = _unrolled(jnp.dot)
            sets = [(xs[i], sw[i]) for i in range(FLAGS.rotate)]
            sets_d = [(xs[i], wd[i]) for i in range(FLAGS.rotate)]
            out_bytes = t * m * dtype.itemsize
            record("single", t, "samoyeds", _time(ours, (sets,), f"single{t}_samoyeds"), t,
                   sw[0].nbytes + _nbytes(xs[0]) + out_bytes)
            record("single", t, "xla_dense_dot", _time(dense, (sets_d,), f"single{t}_dense"), t,
                   _nbytes(wd[0], xs[0]) + out_bytes)
        if "grouped" in FLAGS.cases:
            r = t * top_k
            per = r // experts
            if per * experts != r:
                print(f"skip grouped T={t}: T*k not divisible by E")
                continue
            # Balanced top-k routing: SEL sorted by expert, every expert gets T*k/E rows.
            sels = []
            for _ in range(FLAGS.rotate):
                choice = np.stack([rng.permutation(r) % experts for _ in range(1)])[0]
                order = np.argsort(choice, kind="stable")
                sels.append(jnp.asarray(order // top_k, jnp.int32))
            gs = jnp.full((experts,), per, jnp.int32)
            swe = sw[:experts]
            # One dense weight stack per rotated call: with a shared stack XLA merges the
            # calls' dots and reads the weights once for all of them.
            wdes = [wd[:experts] + jnp.asarray(i, dtype) for i in range(FLAGS.rotate)]
            ours = _unrolled(lambda x, s, w: sj.ragged_dot(x, swe, gs, s))
            rd = _unrolled(lambda x, s, w: jax.lax.ragged_dot(x[s], w, gs))
            ein = _unrolled(lambda x, s, w: jnp.einsum("egk,ekm->egm",
                                                       x[s].reshape(experts, per, k), w))
            sets = [(xs[i], sels[i], wdes[i]) for i in range(FLAGS.rotate)]
            sets_ours = [(xs[i], sels[i], None) for i in range(FLAGS.rotate)]
            wde = wdes[0]
            out_bytes = r * m * dtype.itemsize
            x_bytes = r * k * dtype.itemsize
            record("grouped", t, "samoyeds", _time(ours, (sets_ours,), f"grouped{t}_samoyeds"), r,
                   swe.nbytes + x_bytes + out_bytes)
            record("grouped", t, "xla_ragged_dot", _time(rd, (sets,), f"grouped{t}_ragged"), r,
                   _nbytes(wde) + 2 * x_bytes + out_bytes)
            record("grouped", t, "xla_batched_einsum", _time(ein, (sets,), f"grouped{t}_einsum"),
                   r,
                   _nbytes(wde) + 2 * x_bytes + out_bytes)

    rows = _median_rows(samples)
    spread = FLAGS.repeat > 1
    print(f"\n{'case':8} {'T':>6} {'path':20} {'ms':>9} {'wall ms':>9} {'TFLOP/s':>8} "
          f"{'GB/s':>8} {'speedup':>8}" + (f" {'min..max':>13}" if spread else "") +
          f"   (ms: {rows[0]['timer'] if rows else ''} time per call"
          + (f", median of {FLAGS.repeat} repeats)" if spread else ")"))
    for row in rows:
        sp, rng_sp = "", ""
        if row["path"] == "samoyeds":
            per_rep = _best_speedups(samples, row["case"], row["tokens"])
            if per_rep:
                sp = f"{float(np.median(per_rep)):.2f}x"
                rng_sp = f"{min(per_rep):.2f}..{max(per_rep):.2f}x"
        print(f"{row['case']:8} {row['tokens']:>6} {row['path']:20} {row['ms']:9.4f} "
              f"{row['wall_ms']:9.4f} {_rate(row['tflops'])} {_rate(row['gbs'])} {sp:>8}"
              + (f" {rng_sp:>13}" if spread else ""))
    # Speedup of samoyeds over each dense path, per case and T (JSON "speedup", the plot).
    speed = _report.speedups(rows, ("case", "tokens"), "samoyeds",
                             ("xla_dense_dot", "xla_ragged_dot", "xla_batched_einsum"))
    for r in speed:
        # single: T tokens on one expert; grouped: T * top_k rows over E experts.
        r["tokens_per_expert"] = (r["tokens"] if r["case"] == "single"
                                  else r["tokens"] * top_k / experts)
        r["label"] = f"{r['case']} {FLAGS.proj} {k}x{m} {FLAGS.nv} vs {r['baseline']}"
    if FLAGS.json_out:
        _report.write_json(FLAGS.json_out, dict(
            device=dev.device_kind, preset=FLAGS.preset, proj=FLAGS.proj, k=k, m=m,
            config=FLAGS.nv, sub_row=FLAGS.sub_row, dtype=dtype.name), rows, speedup=speed,
            **({"samples": samples} if spread else {}))
    if FLAGS.csv_out:
        _report.write_csv(FLAGS.csv_out, rows, dict(device=dev.device_kind,
                                                    preset=FLAGS.preset, proj=FLAGS.proj,
                                                    k=k, m=m, config=FLAGS.nv))
    if FLAGS.plot:
        _report.plot_speedup(speed, FLAGS.plot, f"{FLAGS.preset} {FLAGS.proj} projection "
                             f"(K={k}, M={m}), {FLAGS.nv} L={FLAGS.sub_row}, {dtype.name}, "
                             f"{dev.device_kind}")


if __name__ == "__main__":
    app.run(main)
