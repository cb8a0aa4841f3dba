"""Memory benchmark: the largest token batch whose L-layer stack forward fits a budget.

  python benchmarks/bench_memory.py --preset=mixtral-8x7b --layers=4 --json_out=mem.json

For each of --paths (sparse sj.moe, the dense twin sj.moe_dense, the capacity-factor
einsum layer; benchmarks/_stack.py) the jitted stack of --layers layers is compiled for
abstract inputs (jax.ShapeDtypeStruct: no weights are allocated, so Mixtral-8x22B at 4
layers works on any machine) and XLA's buffer assignment gives the bytes it needs:
arguments (the weights of all layers + x) + outputs + temporaries
(compiled.memory_analysis(); nothing runs). The largest T, a multiple of --token_multiple,
with bytes <= budget is found by search, assuming bytes grow with T: guesses from lines
through earlier probes, each checked together with its neighbour.

Budget: --budget_gib, else the device's bytes_limit (what JAX's allocator may use: on a GPU
by default 75 % of its memory, XLA_PYTHON_CLIENT_MEM_FRACTION), else --default_budget_gib.

The numbers are those of the backend that compiles: run it on the GPU for GPU numbers.
XLA:CPU lowers jax.lax.ragged_dot through dense temporaries (weight-sized, e.g. 2.6 GiB
per Mixtral-8x7B layer, and [rows, E * d] masked inputs), so CPU runs overstate the dense
twin; they check the plumbing.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
import _stack  # noqa: E402  (defines the flags shared with bench_stack.py)

FLAGS = flags.FLAGS
flags.DEFINE_float("budget_gib", 0.0, "memory budget in GiB; 0: the device's bytes_limit, "
                   "or --default_budget_gib where the device reports none")
flags.DEFINE_float("default_budget_gib", 80.0, "budget when the device reports no memory "
                   "(CPU); 80 = an H100 80GB")
flags.DEFINE_integer("token_multiple", 16, "T is searched in multiples of this")
flags.DEFINE_integer("max_tokens", 1 << 24, "stop searching here (reported as capped)")

GIB = 2**30


def budget_bytes() -> tuple[int, str]:
    """(budget, where it came from)."""
    if FLAGS.budget_gib > 0:
        return int(FLAGS.budget_gib * GIB), "--budget_gib"
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{dev.device_kind} bytes_limit"
    return int(FLAGS.default_budget_gib * GIB), \
        f"--default_budget_gib ({dev.platform} reports no memory)"


def largest_fitting(total_at: Callable[[int], int], budget: int, multiple: int,
                    max_tokens: int) -> tuple[int, list[dict]]:
    """Largest T (a multiple of `multiple`, <= max_tokens) with total_at(T) <= budget, or 0
    when even T = multiple does not fit; and the probes made. Assumes total_at grows
    with T. Bytes are close to linear in T (weights + T * per-token bytes), so guesses come
    from lines through earlier probes; each guess is checked together with its neighbour,
    and a bisection step backs up any guess that does not halve the bracket."""
    max_tokens = max_tokens // multiple * multiple
    probes: list[dict] = []
    seen: dict[int, int] = {}
    lo, hi = 0, None  # largest T known to fit, smallest known not to

    def probe(t: int) -> bool:
        nonlocal lo, hi
        if t not in seen:
            seen[t] = total_at(t)
            probes.append(dict(tokens=t, bytes=seen[t], fits=seen[t] <= budget))
        if seen[t] <= budget:
            lo = max(lo, t)
            return True
        hi = t if hi is None else min(hi, t)
        return False

    def down(t: float) -> int:
        return int(t) // multiple * multiple

    def on_line(t0: int, t1: int) -> float:
        """T where the line through the probes at t0 < t1 reaches the budget."""
        slope = (seen[t1] - seen[t0]) / (t1 - t0)
        return t0 + (budget - seen[t0]) / slope if slope > 0 else float("inf")

    if not probe(multiple):
        return 0, probes
    t = min(max_tokens, max(2 * multiple, down(4096)))
    while hi is None and lo < max_tokens:  # find a T that does not fit
        probe(t)
        if hi is None:  # aim 1/8 past the line's answer, and at least double
            t = min(max_tokens, max(2 * lo, down(min(on_line(multiple, lo) * 1.125, 2**62))))
    while hi is not None and hi - lo > multiple:  # shrink the bracket [lo, hi)
        width = hi - lo
        guess = down(on_line(lo, hi)) if lo > 0 else lo + down(width // 2)
        guess = min(max(guess, lo + multiple), hi - multiple)
        if probe(guess):
            if guess + multiple < hi:
                probe(guess + multiple)
        elif guess - multiple > lo:
            probe(guess - multiple)
        if hi - lo > width // 2 and hi - lo > multiple:
            probe(lo + down((hi - lo) // 2))
    return lo, probes


def main(argv: list[str]) -> None:
    del argv
    _stack.check_paths()
    if not 1 <= FLAGS.token_multiple <= FLAGS.max_tokens:
        raise app.UsageError("need 1 <= --token_multiple <= --max_tokens")
    cap = FLAGS.max_tokens // FLAGS.token_multiple * FLAGS.token_multiple
    cfg, dtype = _stack.config_from_flags()
    dev = jax.devices()[0]
    budget, source = budget_bytes()
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; "
          f"{_stack.describe(cfg, dtype)}; budget {budget / GIB:.2f} GiB ({source})",
          flush=True)

    # No GEMM autotuning on the GPU: it would run candidate kernels on device buffers as
    # large as the probed batch, and nothing runs here. Sizes change at most by the GEMM
    # workspace the default algorithm asks for (MiBs).
    compiler_options = {"xla_gpu_autotune_level": 0} if dev.platform == "gpu" else None
    rows, all_probes = [], {}
    for path in FLAGS.paths:
        params = _stack.abstract_layers(cfg, dtype, FLAGS.layers,
                                        sparse=path == _stack.SPARSE_PATH)
        fn = _stack.stack_fn(path, cfg, FLAGS.capacity_factor)
        stats: dict[int, dict[str, int]] = {}

        def total_at(t: int) -> int:
            x = jax.ShapeDtypeStruct((t, cfg.d_model), dtype)
            try:
                compiled = fn.lower(params, x).compile(compiler_options)
            except jax.errors.JaxRuntimeError as err:
                # A backend that cannot compile this size cannot run it: count as too big.
                print(f"    T={t}: compile failed ({str(err).splitlines()[0][:120]}); "
                      f"counted as not fitting")
                return 1 << 62
            stats[t] = _stack.memory_bytes(compiled)
            return stats[t]["total"]

        t0 = time.perf_counter()
        best, probes = largest_fitting(total_at, budget, FLAGS.token_multiple,
                                       FLAGS.max_tokens)
        secs = time.perf_counter() - t0
        wbytes = _stack.weight_bytes(params)
        row = dict(path=path, layers=FLAGS.layers, weights_gib=wbytes / GIB,
                   max_tokens=best, capped=best == cap,
                   max_tokens_per_expert=_stack.tokens_per_expert(cfg, best),
                   probes=len(probes), search_s=secs)
        if best:
            at, first = stats[best], stats[FLAGS.token_multiple]
            row.update(total_gib=at["total"] / GIB, argument_gib=at["argument"] / GIB,
                       output_gib=at["output"] / GIB, temp_gib=at["temp"] / GIB)
            if best > FLAGS.token_multiple:  # activation bytes per token at this size
                row["kib_per_token"] = ((at["total"] - first["total"]) /
                                        (best - FLAGS.token_multiple) / 1024)
        rows.append(row)
        all_probes[path] = probes
        print(f"  {path:20s} max T = {best}{' (capped)' if row['capped'] else ''} "
              f"({len(probes)} compiles, {secs:.1f} s)", flush=True)

    print(f"\n{'path':20} {'weights GiB':>11} {'max T':>9} {'tok/exp':>9} {'total GiB':>9} "
          f"{'temp GiB':>9} {'KiB/token':>9}")
    for r in rows:
        print(f"{r['path']:20} {r['weights_gib']:11.3f} {r['max_tokens']:>9} "
              f"{r['max_tokens_per_expert']:>9.0f} {r.get('total_gib', 0):9.3f} "
              f"{r.get('temp_gib', 0):9.3f} {r.get('kib_per_token', 0):9.1f}")
    by_path = {r["path"]: r["max_tokens"] for r in rows}
    ratios = {}
    for dense in _stack.DENSE_PATHS:
        if _stack.SPARSE_PATH in by_path and dense in by_path:
            s, d = by_path[_stack.SPARSE_PATH], by_path[dense]
            ratios[dense] = s / d if d else None
            print(f"max T sparse / {dense}: " + (f"{s / d:.2f}x" if d else
                                                 f"{s} vs 0 (dense weights do not fit)"))
    if dev.platform == "cpu":
        print("note: compiled for XLA:CPU, whose ragged_dot lowering adds weight-sized "
              "temporaries to the dense path; compile on the GPU for GPU numbers")

    meta = dict(bench="memory", device=dev.device_kind, platform=dev.platform,
                jax=jax.__version__, preset=FLAGS.preset, layers=FLAGS.layers, nv=FLAGS.nv,
                sub_row=FLAGS.sub_row, dtype=jnp.dtype(dtype).name,
                budget_gib=budget / GIB, budget_source=source,
                token_multiple=FLAGS.token_multiple, num_experts=cfg.num_experts,
                top_k=cfg.top_k, d_model=cfg.d_model, d_ff=cfg.d_ff)
    if FLAGS.json_out:
        _report.write_json(FLAGS.json_out, meta, rows, max_tokens_ratio=ratios,
                           probes=all_probes)
        print(f"wrote {FLAGS.json_out}")
    if FLAGS.csv_out:
        _report.write_csv(FLAGS.csv_out, rows, dict(device=dev.device_kind,
                                                    preset=FLAGS.preset,
                                                    budget_gib=budget / GIB, nv=FLAGS.nv))
        print(f"wrote {FLAGS.csv_out}")


if __name__ == "__main__":
    app.run(main)
