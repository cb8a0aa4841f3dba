"""Serving-size batches (1 to 512 routed rows per expert): the sparse kernels against the
dense paths, same run, same inputs, with every result as a fraction of the copy roofline.

  python benchmarks/bench_serving.py --cases=single,grouped,deepseek --json_out=serving.json

The copy bandwidth is measured first in the same process (a device-to-device copy of
--copy_mb megabytes, bytes read plus bytes written over the device time). Each case then
reports, per path, the device time per call (profiler trace), the bytes the call must
move (weight as stored, activations read once, outputs written once) over that time,
that rate as a fraction of the copy bandwidth, and the speedup over the best dense path.

Cases (bf16):
  single    one Mixtral-8x7B expert, up (4096 x 14336) and down (14336 x 4096), for each
            --configs N:V, at --single_tokens tokens: sj.dot vs XLA jnp.dot on the decoded
            weight;
  grouped   Mixtral-8x7B fused gate_up (4096 x 2 * 14336), 8 experts, top-2 routing of
            --grouped_tokens tokens, SwiGLU: sj.ragged_dot(glu="silu") vs
            jax.lax.ragged_dot + GLU, a batched einsum + GLU (balanced routing) and, when
            torch is importable, torch._grouped_mm (CUTLASS's grouped GEMM, no GLU);
  deepseek  the same for DeepSeek-MoE shapes (2048 x 2 * 1408, 64 experts, top-6) at
            --deepseek_tokens tokens.
--kernels adds rows for the sparse kernels forced one by one (the table behind the
automatic choice in ffi/cuda/dispatch.cuh). Weights rotate over --rotate copies (distinct
buffers) so that the 50 MB L2 never holds a call's weight.
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
from samoyeds_jax._util import parse_nv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
from _trace import time_per_call  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["single", "grouped", "deepseek"], "which cases")
flags.DEFINE_list("configs", ["1:2", "1:1", "1:4"], "N:V patterns of the single case")
flags.DEFINE_list("projs", ["up", "down"], "projections of the single case")
flags.DEFINE_list("single_tokens", ["16", "64", "256"], "tokens of the single case")
flags.DEFINE_list("grouped_tokens", ["16", "128", "512"], "tokens of the grouped case")
flags.DEFINE_list("deepseek_tokens", ["16", "512"], "tokens of the deepseek case")
flags.DEFINE_list("kernels", [], "sparse kernels also timed forced (warp, hopper, stream)")
_cli.define_sub_row_flag()
flags.DEFINE_integer("rotate", 4, "distinct inputs (and weights) per timed program")
flags.DEFINE_integer("reps", 10, "timed programs (median wall clock)")
flags.DEFINE_integer("copy_mb", 2048, "size of the copy that measures the bandwidth")
flags.DEFINE_boolean("torch", True, "time torch._grouped_mm when torch is importable")
flags.DEFINE_string("json_out", "", "write results as JSON here")
flags.DEFINE_integer("shrink", 1, "divide every model dimension by this (smoke tests)")

DT = jnp.bfloat16


def _nbytes(*arrays) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def _device_seconds(fn, args) -> float:
    wall, dev, _ = time_per_call(fn, args, FLAGS.rotate, FLAGS.reps)
    return dev if dev is not None else wall


def _unrolled(f):
    """One program applying f to each of `rotate` argument sets."""
    return jax.jit(lambda sets: tuple(f(*s) for s in sets))


def _forced(f, kernel: str):
    def g(*a):
        with sj.ops.force_kernel(kernel):
            return f(*a)
    return g


def copy_bandwidth() -> float:
    """Bytes read plus bytes written per second by a large device-to-device copy."""
    n = FLAGS.copy_mb * (1 << 20) // 2 // FLAGS.shrink
    srcs = [jnp.ones((n,), DT) + i for i in range(FLAGS.rotate)]
    copy = _unrolled(lambda a: a + jnp.asarray(0, DT))  # one read, one write
    secs = _device_seconds(copy, ([(s,) for s in srcs],))
    return 2 * n * 2 / secs


def _glu(gu):
    f = gu.shape[-1] // 2
    g, u = gu[:, :f].astype(jnp.float32), gu[:, f:].astype(jnp.float32)
    return (jax.nn.silu(g) * u).astype(gu.dtype)


class Table:
    def __init__(self, copy_bw: float):
        self.copy_bw = copy_bw
        self.rows: list[dict] = []

    def add(self, case: str, shape: str, config: str, tokens: int, per_expert: float,
            path: str, secs: float, nbytes: int):
        self.rows.append(dict(case=case, shape=shape, config=config, tokens=tokens,
                              rows_per_expert=per_expert, path=path, us=secs * 1e6,
                              gbs=nbytes / secs / 1e9, roofline=nbytes / secs / self.copy_bw))
        r = self.rows[-1]
        print(f"  {case:9} {shape:16} {config:4} T={tokens:<5} {path:22} {r['us']:9.1f} us "
              f"{r['gbs']:7.0f} GB/s {100 * r['roofline']:5.1f} % of copy", flush=True)

    def speedups(self):
        out = []
        for r in self.rows:
            if not r["path"].startswith("samoyeds"):
                continue
            base = [b for b in self.rows
                    if (b["case"], b["shape"], b["config"], b["tokens"]) ==
                    (r["case"], r["shape"], r["config"], r["tokens"])
                    and not b["path"].startswith("samoyeds")]
            if base:
                best = min(base, key=lambda b: b["us"])
                out.append(dict(r, best_dense=best["path"], speedup=best["us"] / r["us"]))
        return out


def _sparse_paths():
    return [("samoyeds", None)] + [(f"samoyeds[{k}]", k) for k in FLAGS.kernels]


def run_single(table: Table, rng):
    d, f = 4096 // FLAGS.shrink, 14336 // FLAGS.shrink
    for proj in FLAGS.projs:
        k, m = (d, f) if proj == "up" else (f, d)
        for nv in FLAGS.configs:
            cfg = sj.SparsityConfig(*parse_nv(nv, "--configs"), FLAGS.sub_row)
            w = jnp.asarray(rng.standard_normal((FLAGS.rotate, k, m), np.float32) / np.sqrt(k), DT)
            sw = sj.encode(sj.prune(w, cfg), cfg)
            wd = sj.decode(sw)
            del w
            for t in map(int, FLAGS.single_tokens):
                xs = [jnp.asarray(rng.standard_normal((t, k)), DT) for _ in range(FLAGS.rotate)]
                io = _nbytes(xs[0]) + t * m * 2
                shape = f"{proj} {k}x{m}"
                for name, kern in _sparse_paths():
                    fn = sj.dot if kern is None else _forced(sj.dot, kern)
                    sets = [(xs[i], sw[i]) for i in range(FLAGS.rotate)]
                    table.add("single", shape, nv, t, t, name,
                              _device_seconds(_unrolled(fn), (sets,)), sw[0].nbytes + io)
                sets = [(xs[i], wd[i]) for i in range(FLAGS.rotate)]
                table.add("single", shape, nv, t, t, "xla_dense_dot",
                          _device_seconds(_unrolled(jnp.dot), (sets,)), _nbytes(wd[0]) + io)
            del sw, wd


def _torch_grouped_mm(x_rows: list[np.ndarray], w_dense: np.ndarray, gs: np.ndarray):
    """Seconds per call of torch._grouped_mm over the rotated inputs (CUDA events), or None."""
    try:
        import torch
    except ImportError:
        return None
    if not hasattr(torch, "_grouped_mm") or not torch.cuda.is_available():
        return None
    dev = torch.device("cuda")
    offs = torch.tensor(np.cumsum(gs), dtype=torch.int32, device=dev)
    def bf16(a):  # torch reads no ml_dtypes arrays: through float32 (bf16 values are exact)
        return torch.from_numpy(np.asarray(a, np.float32)).to(dev, torch.bfloat16)

    # CUTLASS's grouped GEMM takes B column-major: [E, M, K] storage seen as [E, K, M].
    wt = bf16(np.ascontiguousarray(np.swapaxes(w_dense, 1, 2)))
    ws = [(wt + i).transpose(1, 2) for i in range(len(x_rows))]
    xs = [bf16(x) for x in x_rows]
    try:
        def run():
            for x, w in zip(xs, ws):
                torch._grouped_mm(x, w, offs=offs, out_dtype=torch.bfloat16)
        run()
        torch.cuda.synchronize()
        times = []
        for _ in range(FLAGS.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1e-3 / len(xs))
        return float(np.median(times))
    except Exception as e:  # the op's layout rules changed between torch releases
        print(f"  torch._grouped_mm unavailable here: {type(e).__name__}: {e}")
        return None
    finally:
        del xs, ws, wt
        torch.cuda.empty_cache()


def run_grouped(table: Table, rng, case: str, d: int, f: int, experts: int, top_k: int,
                tokens_list):
    k, m = d, 2 * f
    cfg = sj.SparsityConfig(1, 2, FLAGS.sub_row)
    w = jnp.asarray(rng.standard_normal((experts, k, m), np.float32) / np.sqrt(k), DT)
    sw = sj.encode(sj.prune(w, cfg), cfg)
    wd = sj.decode(sw)
    del w
    # One dense stack per rotated call (a shared one lets XLA merge the calls' reads).
    wds = [wd + jnp.asarray(i, DT) for i in range(FLAGS.rotate)]
    shape = f"gate_up {k}x{m}"
    for t in tokens_list:
        r = t * top_k
        per = r // experts
        xs = [jnp.asarray(rng.standard_normal((t, k)), DT) for _ in range(FLAGS.rotate)]
        # Balanced top-k routing when it divides (the einsum needs it), SEL sorted by expert.
        sels, sizes = [], None
        for _ in range(FLAGS.rotate):
            choice = (rng.permutation(r) % experts if per * experts == r
                      else rng.integers(0, experts, r))
            order = np.argsort(choice, kind="stable")
            sels.append(jnp.asarray(order // top_k, jnp.int32))
            sizes = np.bincount(choice, minlength=experts).astype(np.int32)
        gs = jnp.asarray(sizes)
        io = r * k * 2 + r * f * 2
        for name, kern in _sparse_paths():
            g = lambda x, s: sj.ragged_dot(x, sw, gs, s, glu="silu")
            fn = g if kern is None else _forced(g, kern)
            sets = [(xs[i], sels[i]) for i in range(FLAGS.rotate)]
            table.add(case, shape, "1:2", t, r / experts, name,
                      _device_seconds(_unrolled(fn), (sets,)), sw.nbytes + io)
        dense_bytes = _nbytes(wd) + io
        sets = [(xs[i], sels[i], wds[i]) for i in range(FLAGS.rotate)]
        rd = lambda x, s, w: _glu(jax.lax.ragged_dot(x[s], w, gs))
        table.add(case, shape, "1:2", t, r / experts, "xla_ragged_dot+glu",
                  _device_seconds(_unrolled(rd), (sets,)), dense_bytes)
        if per * experts == r:
            ein = lambda x, s, w: _glu(jnp.einsum("egk,ekm->egm", x[s].reshape(experts, per, k),
                                                  w).reshape(r, m))
            table.add(case, shape, "1:2", t, r / experts, "xla_batched_einsum+glu",
                      _device_seconds(_unrolled(ein), (sets,)), dense_bytes)
        if FLAGS.torch:
            rows = [np.asarray(xs[i][sels[i]]) for i in range(FLAGS.rotate)]
            secs = _torch_grouped_mm(rows, np.asarray(wd), sizes)
            if secs is not None:
                table.add(case, shape, "1:2", t, r / experts, "torch_grouped_mm",
                          secs, _nbytes(wd) + r * k * 2 + r * m * 2)
    del sw, wd, wds


def main(argv):
    del argv
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}")
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s")
    table = Table(copy_bw)
    rng = np.random.default_rng(0)
    if "single" in FLAGS.cases:
        run_single(table, rng)
    if "grouped" in FLAGS.cases:
        run_grouped(table, rng, "grouped", 4096 // FLAGS.shrink, 14336 // FLAGS.shrink, 8, 2,
                    map(int, FLAGS.grouped_tokens))
    if "deepseek" in FLAGS.cases:
        run_grouped(table, rng, "deepseek", 2048 // FLAGS.shrink, 1408 // FLAGS.shrink, 64, 6,
                    map(int, FLAGS.deepseek_tokens))
    speed = table.speedups()
    print(f"\n{'case':9} {'shape':16} {'N:V':4} {'T':>5} {'path':22} {'us':>9} {'% copy':>7} "
          f"{'speedup':>8}  vs")
    for s in speed:
        print(f"{s['case']:9} {s['shape']:16} {s['config']:4} {s['tokens']:>5} {s['path']:22} "
              f"{s['us']:9.1f} {100 * s['roofline']:6.1f}% {s['speedup']:7.2f}x  {s['best_dense']}")
    if FLAGS.json_out:
        _report.write_json(FLAGS.json_out, dict(device=dev.device_kind, copy_bw=copy_bw,
                                                sub_row=FLAGS.sub_row), table.rows,
                           speedup=speed)


if __name__ == "__main__":
    app.run(main)
