"""Time-bounded randomized soak of sj.ragged_dot (issue 7), on whatever device JAX picks.

  python scripts/soak.py --seconds=240 --json_out=/tmp/soak.json     # GPU, ~4 minutes
  python scripts/soak.py --seconds=30 --max_shapes=8                 # CPU smoke run

A pool of --max_shapes shapes is drawn once (every N:V config x sub_row, bf16 and fp16,
with and without SEL, E in 1..16, K and M legal multiples up to 512) and each is compiled
once in a warm-up pass; then calls pick a pool shape at random and draw fresh activations,
group sizes (empty experts, one hot expert of 300 rows, padding rows past the groups with
garbage SEL entries) and SEL, and every result is compared against a float64 numpy
reference on sj.decode(sw). Weights are re-drawn every --weight_refresh calls of a shape
(encoding runs on the host and would otherwise dominate the loop).

Checked on every call: shape and dtype, no NaN/Inf, rows at or past sum(group_sizes)
exactly zero, no routed row all zero, relative error (whole output and per row) within
the tolerances of tests/test_gpu.py and tests/test_ops.py. Also:
  * a fixed probe input re-run every --recheck_every calls must give bit-identical output
    (determinism, no drift over the run);
  * --threads threads drive different compiled programs (disjoint pool shapes) at once for
    --concurrent_fraction of the loop, every result checked (a longer, fresh-data version
    of tests/test_ops.py::test_concurrent_use_from_two_jitted_functions);
  * the probe's jitted function replayed back to back on the same inputs, all outputs
    bit-identical;
  * device bytes_in_use after warm-up vs at the end (memory_stats() is None on CPU: the
    check is skipped there and host RSS is reported instead).
Failures carry the shape and the call/weight seeds (make_call / make_weight rebuild the
inputs from them). Exit status 1 on any failure; a one-paragraph summary is printed and
the full record written to --json_out.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import threading
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import samoyeds_jax as sj
from samoyeds_jax.format import SUPPORTED_NV, SUPPORTED_SUB_ROWS

FLAGS = flags.FLAGS
flags.DEFINE_float("seconds", 240.0, "wall-clock budget of the whole run, warm-up included")
flags.DEFINE_integer("seed", None, "base seed (default: fresh, printed and recorded)")
flags.DEFINE_string("json_out", "", "write the full record as JSON here")
flags.DEFINE_integer("max_shapes", 24, "distinct shapes in the pool (each compiles once); "
                     "24 covers every N:V x sub_row config with two dtype/SEL variants")
flags.DEFINE_integer("threads", 2, "threads in the concurrent phase; 1 turns it off")
flags.DEFINE_float("concurrent_fraction", 0.3, "share of the main loop run concurrently")
flags.DEFINE_integer("recheck_every", 25, "re-run the fixed probe every this many calls")
flags.DEFINE_integer("weight_refresh", 8, "a shape gets a fresh weight every this many calls")
flags.DEFINE_integer("replay_calls", 512, "back-to-back replays of the probe at the end")
flags.DEFINE_float("mem_slack_mib", 64.0, "allowed growth of device bytes_in_use between "
                   "the end of warm-up and the end of the run")
flags.DEFINE_integer("max_failures", 5, "stop early after this many failed checks")

# Whole-output relative Frobenius error vs float64 (tests/test_gpu.py) and worst row
# (tests/test_ops.py): fp32 accumulation, one rounding to the output dtype.
TOL = {"bfloat16": 1e-2, "float16": 2e-3}
ROW_TOL = {"bfloat16": 2e-2, "float16": 5e-3}
DTYPES = ("bfloat16", "float16")
# Shape space: small to medium so that one call (and its reference) stays fast.
MAX_E, MAX_K, MAX_M, MAX_ROWS, MAX_TOKENS, HOT_ROWS = 16, 512, 512, 1024, 512, 300
REPLAY_BATCH = 32  # calls in flight before the first result is read

RD = jax.jit(sj.ragged_dot)  # one jit object: its cache holds one program per shape


# --- shapes, weights and call inputs (pure functions of their seeds) ----------------------

@dataclasses.dataclass(frozen=True)
class Shape:
    n: int
    v: int
    sub_row: int
    dtype: str
    e: int
    k: int
    m: int
    rows: int    # R: output rows (group capacity)
    tokens: int  # T for SEL; 0 means no SEL (x is [R, K])

    @property
    def cfg(self) -> sj.SparsityConfig:
        return sj.SparsityConfig(self.n, self.v, self.sub_row)

    @property
    def has_sel(self) -> bool:
        return self.tokens > 0

    def name(self) -> str:
        sel = f" T={self.tokens} sel" if self.has_sel else " nosel"
        return (f"{self.n}:{self.v}/L{self.sub_row} {self.dtype} E={self.e} K={self.k} "
                f"M={self.m} R={self.rows}{sel}")


def _log_uniform(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))))


def draw_shape(rng: np.random.Generator, nv: tuple[int, int], sub_row: int, dtype: str,
               use_sel: bool) -> Shape:
    n, v = nv
    cfg = sj.SparsityConfig(n, v, sub_row)
    e = int(rng.integers(1, MAX_E + 1))
    k = sub_row * int(rng.integers(1, MAX_K // sub_row + 1))
    m = cfg.m_multiple * int(rng.integers(1, MAX_M // cfg.m_multiple + 1))
    cap = min(MAX_ROWS, e * HOT_ROWS)
    # Half the shapes have room for a hot expert of HOT_ROWS, half are small (tail tiles).
    rows = int(rng.integers(cap // 2, cap + 1)) if rng.random() < 0.5 else _log_uniform(rng, 1, cap)
    tokens = _log_uniform(rng, 1, MAX_TOKENS) if use_sel else 0
    return Shape(n, v, sub_row, dtype, e, k, m, max(rows, 1), tokens)


def make_pool(rng: np.random.Generator, count: int) -> list[Shape]:
    """`count` distinct shapes; every round of 12 covers each (N:V, sub_row) once and over
    4 rounds each config meets each (dtype, SEL) variant once."""
    configs = [(nv, L) for nv in SUPPORTED_NV for L in SUPPORTED_SUB_ROWS]
    variants = [(dt, s) for dt in DTYPES for s in (False, True)]
    pool: list[Shape] = []
    rnd = 0
    while len(pool) < count:
        for ci in rng.permutation(len(configs)):
            dt, use_sel = variants[(rnd + int(ci)) % len(variants)]
            shape = draw_shape(rng, configs[ci][0], configs[ci][1], dt, use_sel)
            if shape not in pool and len(pool) < count:
                pool.append(shape)
        rnd += 1
    return pool


def make_weight(shape: Shape, seed: int) -> tuple[sj.SparseWeight, np.ndarray]:
    """(encoded weight, its decoded dense [E, K, M] as float32: exact for bf16/fp16, and
    half the host memory of float64)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((shape.e, shape.k, shape.m), np.float32) / np.sqrt(shape.k / 4)
    sw = sj.encode(sj.prune(jnp.asarray(w, shape.dtype), shape.cfg), shape.cfg)
    return sw, np.asarray(sj.decode(sw).astype(jnp.float32))


def make_group_sizes(shape: Shape, rng: np.random.Generator) -> np.ndarray:
    e, rows = shape.e, shape.rows
    small = np.array([_log_uniform(rng, 1, HOT_ROWS) for _ in range(e)])
    counts = np.where(rng.random(e) < 0.5, small, rng.integers(0, HOT_ROWS + 1, e))
    counts[rng.random(e) < 0.3] = 0                      # empty experts
    if rng.random() < 0.02:
        counts[:] = 0
    # Fill R rows half the time, else leave a padded tail of rows.
    fill = rows if rng.random() < 0.5 else int(rng.integers(0, rows + 1))
    hot = int(rng.integers(e)) if rng.random() < 0.7 else -1   # one hot expert
    budget = fill - (min(HOT_ROWS, fill) if hot >= 0 else 0)
    if hot >= 0:
        counts[hot] = 0
    # The others share what is left: clipping the running total empties the last experts,
    # so half the time scale down instead.
    if counts.sum() > budget and rng.random() < 0.5:
        counts = counts * budget // counts.sum()
    counts = np.diff(np.minimum(np.cumsum(counts), budget), prepend=0)
    if hot >= 0:
        counts[hot] = min(HOT_ROWS, fill)
    return counts.astype(np.int32)


def make_call(shape: Shape, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(x, group_sizes, sel or None) for one call, all numpy."""
    gs = make_group_sizes(shape, rng)
    x = rng.standard_normal((shape.tokens if shape.has_sel else shape.rows, shape.k),
                            np.float32).astype(jnp.dtype(shape.dtype))
    x = np.where(x == 0, np.asarray(1, x.dtype), x)      # no all-zero rows to mask errors
    if not shape.has_sel:
        return x, gs, None
    t, total = shape.tokens, int(gs.sum())
    mode = rng.random()
    if mode < 0.7:
        sel = rng.integers(0, t, shape.rows)
    elif mode < 0.85:                                     # many rows read a few tokens
        sel = rng.integers(0, min(t, 3), shape.rows)
    else:                                                 # the bounds of x
        sel = np.where(rng.random(shape.rows) < 0.5, 0, t - 1)
    if rng.random() < 0.5:  # padding rows: the kernel must not read these entries
        pad = np.asarray([-1, t, t + 7, 2**31 - 1])
        sel[total:] = pad[rng.integers(0, len(pad), shape.rows - total)]
    return x, gs, sel.astype(np.int32)


def reference(x: np.ndarray, w32: np.ndarray, gs: np.ndarray, sel: np.ndarray | None
              ) -> np.ndarray:
    """float64 out[:sum(gs)]: row r = x[sel[r] or r] @ W[e(r)]."""
    x64 = x.astype(np.float64)
    total = int(gs.sum())
    src = np.arange(total) if sel is None else sel[:total].astype(np.int64)
    out = np.empty((total, w32.shape[-1]))
    start = 0
    for ex, g in enumerate(gs.tolist()):
        if g:
            out[start:start + g] = x64[src[start:start + g]] @ w32[ex].astype(np.float64)
            start += g
    return out


def check(y: np.ndarray, ref: np.ndarray, shape: Shape) -> tuple[float, float, list[str]]:
    """(relative error, worst row relative error, problems) of one output."""
    problems: list[str] = []
    if y.shape != (shape.rows, shape.m) or y.dtype != jnp.dtype(shape.dtype):
        return math.inf, math.inf, [f"output {y.dtype}{list(y.shape)}, want "
                                    f"{shape.dtype}{[shape.rows, shape.m]}"]
    y64 = y.astype(np.float64)
    total = ref.shape[0]
    bad = ~np.isfinite(y64)
    if bad.any():
        problems.append(f"{int(bad.sum())} non-finite values, first in row "
                        f"{int(np.argwhere(bad)[0, 0])}")
    tail = np.nonzero(np.abs(y64[total:]).sum(-1))[0]
    if len(tail):
        problems.append(f"{len(tail)} rows past sum(group_sizes)={total} are not zero, "
                        f"first row {total + int(tail[0])}")
    if not total:
        return 0.0, 0.0, problems
    head = y64[:total]
    dead = (np.abs(head).sum(-1) == 0) & (np.abs(ref).sum(-1) > 0)
    if dead.any():
        problems.append(f"{int(dead.sum())} routed rows all zero, first row "
                        f"{int(np.argmax(dead))}")
    diff = np.nan_to_num(head - ref, nan=np.inf)
    err = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))
    row = np.linalg.norm(diff, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)
    row_err = float(row.max())
    if not err <= TOL[shape.dtype]:
        problems.append(f"relative error {err:.3g} > {TOL[shape.dtype]}")
    if not row_err <= ROW_TOL[shape.dtype]:
        problems.append(f"row {int(np.argmax(row))} relative error {row_err:.3g} > "
                        f"{ROW_TOL[shape.dtype]}")
    return err, row_err, problems


def device_bytes_in_use(device: jax.Device) -> int | None:
    stats = device.memory_stats()  # None on CPU
    return int(stats["bytes_in_use"]) if stats and "bytes_in_use" in stats else None


def host_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# --- the run ------------------------------------------------------------------------------

@dataclasses.dataclass
class _WeightSlot:
    sw: sj.SparseWeight | None = None
    w32: np.ndarray | None = None
    seed: int = -1
    uses: int = 0


class Probe:
    """A fixed input on a fixed shape: its first output is the reference bit pattern."""

    SHAPE = Shape(1, 2, 128, "bfloat16", e=8, k=512, m=256, rows=600, tokens=256)

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        sw, w32 = make_weight(self.SHAPE, seed)
        gs = np.asarray([0, HOT_ROWS, 17, 1, 0, 150, 33, 64], np.int32)  # empty, hot, odd
        x, _, _ = make_call(self.SHAPE, rng)
        sel = rng.integers(0, self.SHAPE.tokens, self.SHAPE.rows).astype(np.int32)
        sel[int(gs.sum()):] = -1
        self.args = (jnp.asarray(x), sw, jnp.asarray(gs), jnp.asarray(sel))
        self.ref = reference(x, w32, gs, sel)
        y = np.asarray(RD(*self.args))
        self.err, _, self.problems = check(y, self.ref, self.SHAPE)
        self.bits = y.view(np.uint16).copy()

    def same_bits(self, y: jax.Array) -> bool:
        return bool(np.array_equal(np.asarray(y).view(np.uint16), self.bits))


class Soak:
    def __init__(self, seed: int, device: jax.Device):
        self.seed = seed
        self.device = device
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.slots: dict[Shape, _WeightSlot] = {}
        self.calls = 0
        self.per_dtype = {dt: {"calls": 0, "max_rel_err": 0.0, "max_row_rel_err": 0.0}
                          for dt in DTYPES}
        self.per_shape: dict[str, int] = {}
        self.errs: list[tuple[int, str, float]] = []      # (call index, dtype, err / TOL)
        self.counts = {"sel_calls": 0, "empty_experts": 0, "hot_expert_calls": 0,
                       "padded_calls": 0, "garbage_sel_padding_calls": 0,
                       "all_empty_calls": 0, "weights_drawn": 0}
        self.failures: list[str] = []
        self.probe: Probe | None = None
        self.probe_log: list[tuple[float, bool, float]] = []  # (t, bit-identical, err)
        self.mem_samples: list[tuple[float, int | None]] = []
        self.t0 = time.monotonic()
        self.thread_calls: dict[str, int] = {}

    def fail(self, msg: str) -> None:
        with self.lock:
            self.failures.append(msg)
            print("FAIL", msg, flush=True)
            if len(self.failures) >= FLAGS.max_failures:
                self.stop.set()

    def _weight(self, shape: Shape, rng: np.random.Generator) -> _WeightSlot:
        # Each shape is used by one thread at a time (threads get disjoint shapes), so the
        # slot needs no lock.
        slot = self.slots.setdefault(shape, _WeightSlot())
        if slot.sw is None or slot.uses % FLAGS.weight_refresh == 0:
            slot.seed = int(rng.integers(2**63))
            slot.sw, slot.w32 = None, None  # drop the old device arrays before the new ones
            slot.sw, slot.w32 = make_weight(shape, slot.seed)
            with self.lock:
                self.counts["weights_drawn"] += 1
        slot.uses += 1
        return slot

    def one_call(self, shape: Shape, rng: np.random.Generator, label: str) -> None:
        call_seed = int(rng.integers(2**63))
        slot = self._weight(shape, rng)
        x, gs, sel = make_call(shape, np.random.default_rng(call_seed))
        where = (f"[{label}] {shape.name()} call_seed={call_seed} weight_seed={slot.seed} "
                 f"gs={gs.tolist()}")
        try:
            y = np.asarray(RD(jnp.asarray(x), slot.sw, jnp.asarray(gs),
                              None if sel is None else jnp.asarray(sel)))
        except Exception as exc:  # a runtime error is a finding, not a crash of the soak
            self.fail(f"{where}: {type(exc).__name__}: {exc}")
            return
        err, row_err, problems = check(y, reference(x, slot.w32, gs, sel), shape)
        total = int(gs.sum())
        with self.lock:
            idx = self.calls
            self.calls += 1
            self.thread_calls[label] = self.thread_calls.get(label, 0) + 1
            d = self.per_dtype[shape.dtype]
            d["calls"] += 1
            d["max_rel_err"] = max(d["max_rel_err"], err)
            d["max_row_rel_err"] = max(d["max_row_rel_err"], row_err)
            self.per_shape[shape.name()] = self.per_shape.get(shape.name(), 0) + 1
            self.errs.append((idx, shape.dtype, err / TOL[shape.dtype]))
            c = self.counts
            c["sel_calls"] += shape.has_sel
            c["empty_experts"] += int((gs == 0).sum())
            c["hot_expert_calls"] += int(gs.max(initial=0) >= HOT_ROWS)
            c["padded_calls"] += total < shape.rows
            c["all_empty_calls"] += total == 0
            c["garbage_sel_padding_calls"] += bool(
                sel is not None and ((sel[total:] < 0) | (sel[total:] >= shape.tokens)).any())
        for p in problems:
            self.fail(f"{where}: {p}")
        if FLAGS.recheck_every > 0 and (idx + 1) % FLAGS.recheck_every == 0:
            self.recheck_probe()

    def recheck_probe(self) -> None:
        assert self.probe is not None
        y = RD(*self.probe.args)
        same = self.probe.same_bits(y)
        err = float(np.linalg.norm(np.asarray(y, np.float64)[: self.probe.ref.shape[0]]
                                   - self.probe.ref) / np.linalg.norm(self.probe.ref))
        t = time.monotonic() - self.t0
        with self.lock:
            self.probe_log.append((t, same, err))
            self.mem_samples.append((t, device_bytes_in_use(self.device)))
        if not same:
            self.fail(f"probe {Probe.SHAPE.name()} re-run at t={t:.1f}s is not bit-identical "
                      f"to its first output (err {err:.3g} vs {self.probe.err:.3g})")

    def loop(self, shapes: list[Shape], rng: np.random.Generator, until: float,
             label: str) -> None:
        while time.monotonic() < until and not self.stop.is_set():
            self.one_call(shapes[int(rng.integers(len(shapes)))], rng, label)

    def guarded_loop(self, *args: Any) -> None:
        try:
            self.loop(*args)
        except Exception:  # keep other threads going; record the error as a failure
            self.fail(f"[{args[-1]}] worker crashed:\n{traceback.format_exc()}")

    def concurrent(self, pool: list[Shape], threads: int, until: float,
                   seeds: list[np.random.SeedSequence]) -> dict[str, Any]:
        # Disjoint shape subsets: each thread runs its own compiled programs (two different
        # jitted executables at once) and owns its weight slots.
        subsets = [pool[i::threads] for i in range(threads)]
        spans: dict[str, list[float]] = {}
        before = dict(self.thread_calls)

        def work(i: int) -> None:
            label = f"thread{i}"
            spans[label] = [time.monotonic()]
            self.guarded_loop(subsets[i], np.random.default_rng(seeds[i]), until, label)
            spans[label].append(time.monotonic())

        ths = [threading.Thread(target=work, args=(i,), name=f"soak{i}") for i in range(threads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        start = max(s[0] for s in spans.values())
        end = min(s[-1] for s in spans.values())
        return {
            "threads": threads,
            "shapes_per_thread": [[s.name() for s in sub] for sub in subsets],
            "calls_per_thread": {k: self.thread_calls.get(k, 0) - before.get(k, 0)
                                 for k in sorted(spans)},
            "overlap_seconds": round(max(0.0, end - start), 2),
        }

    def replay(self, until: float) -> dict[str, Any]:
        """The probe's jitted function on the same inputs, REPLAY_BATCH calls in flight."""
        assert self.probe is not None
        done = mismatches = 0
        while done < FLAGS.replay_calls and (time.monotonic() < until or done < 2):
            batch = [RD(*self.probe.args) for _ in range(min(REPLAY_BATCH,
                                                             FLAGS.replay_calls - done))]
            mismatches += sum(not self.probe.same_bits(y) for y in batch)
            done += len(batch)
        if mismatches:
            self.fail(f"replay: {mismatches} of {done} back-to-back calls on the same inputs "
                      f"differ from the first output")
        return {"calls": done, "mismatches": mismatches}


def _first_last(values: list[float]) -> dict[str, Any]:
    """Mean and max over the first and the last 10% of a sequence."""
    if not values:
        return {"n": 0}
    k = max(1, len(values) // 10)
    first, last = values[:k], values[-k:]
    return {"n": len(values), "per_10pct": k,
            "first_mean": float(np.mean(first)), "first_max": float(np.max(first)),
            "last_mean": float(np.mean(last)), "last_max": float(np.max(last))}


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def main(argv: list[str]) -> int:
    del argv
    seed = FLAGS.seed if FLAGS.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    device = jax.devices()[0]
    soak = Soak(seed, device)
    t0 = soak.t0
    deadline = t0 + FLAGS.seconds
    print(f"soak: seed={seed} device={device.device_kind} ({device.platform}) "
          f"seconds={FLAGS.seconds} max_shapes={FLAGS.max_shapes} threads={FLAGS.threads}",
          flush=True)
    mem_start, rss_start = device_bytes_in_use(device), host_rss_bytes()
    ss_pool, ss_probe, ss_main, ss_threads = np.random.SeedSequence(seed).spawn(4)
    pool = make_pool(np.random.default_rng(ss_pool), FLAGS.max_shapes)
    rng = np.random.default_rng(ss_main)

    soak.probe = Probe(int(ss_probe.generate_state(1)[0]))
    for p in soak.probe.problems:
        soak.fail(f"probe {Probe.SHAPE.name()} first run: {p}")

    # Warm-up: compile every pool shape once (checked like any call), within 40% of the
    # budget; shapes not reached are dropped so that compiles stay out of the main loop.
    warm: list[Shape] = []
    for shape in pool:
        if soak.stop.is_set() or (warm and time.monotonic() - t0 > 0.4 * FLAGS.seconds):
            break
        soak.one_call(shape, rng, "warmup")
        warm.append(shape)
    dropped = len(pool) - len(warm)
    pool = warm
    warm_seconds = time.monotonic() - t0
    gc.collect()
    mem_warm, rss_warm = device_bytes_in_use(device), host_rss_bytes()
    calls_warm = soak.calls
    print(f"warm-up: {len(pool)} shapes compiled in {warm_seconds:.1f}s"
          + (f" ({dropped} dropped: out of time)" if dropped else ""), flush=True)

    # Main loop: single-threaded, then --threads at once, then single-threaded again; the
    # last 10% of the budget is kept for the replay.
    loop_end = deadline - 0.1 * FLAGS.seconds
    now = time.monotonic()
    threads = max(1, min(FLAGS.threads, len(pool)))
    span = max(0.0, loop_end - now)
    conc_start = now + 0.35 * span
    conc_end = conc_start + (FLAGS.concurrent_fraction * span if threads > 1 else 0.0)
    soak.loop(pool, rng, conc_start, "main")
    conc = None
    if threads > 1 and not soak.stop.is_set():
        conc = soak.concurrent(pool, threads, conc_end, ss_threads.spawn(threads))
    soak.loop(pool, rng, loop_end, "main")
    replay = soak.replay(deadline) if not soak.stop.is_set() else {"calls": 0, "mismatches": 0}
    soak.recheck_probe()

    gc.collect()
    mem_end, rss_end = device_bytes_in_use(device), host_rss_bytes()
    growth = None if mem_end is None or mem_warm is None else mem_end - mem_warm
    if growth is not None and growth > FLAGS.mem_slack_mib * 2**20:
        soak.fail(f"device bytes_in_use grew by {_mib(growth)} after warm-up "
                  f"({_mib(mem_warm)} -> {_mib(mem_end)}), slack {FLAGS.mem_slack_mib} MiB")
    elapsed = time.monotonic() - t0
    if soak.calls - calls_warm < 1 and not soak.failures:
        soak.fail(f"no calls after warm-up: --seconds={FLAGS.seconds} is too short")

    probe_errs = [e for _, _, e in soak.probe_log]
    errs_all = [e for _, _, e in soak.errs]
    cache = getattr(RD, "_cache_size", lambda: None)()
    ok = not soak.failures
    record = {
        "ok": ok, "seed": seed, "elapsed_seconds": round(elapsed, 1),
        "device": f"{device.device_kind} ({device.platform})", "jax": jax.__version__,
        "flags": {f: getattr(FLAGS, f) for f in (
            "seconds", "max_shapes", "threads", "concurrent_fraction", "recheck_every",
            "weight_refresh", "replay_calls", "mem_slack_mib", "max_failures")},
        "tolerance": {"rel_err": TOL, "row_rel_err": ROW_TOL},
        "calls": soak.calls, "calls_after_warmup": soak.calls - calls_warm,
        "warmup_seconds": round(warm_seconds, 1), "shapes_dropped_at_warmup": dropped,
        "distinct_shapes": len(soak.per_shape), "compiled_ragged_dot_programs": cache,
        "per_dtype": soak.per_dtype, "counts": soak.counts, "calls_per_shape": soak.per_shape,
        "error_drift_all_calls_err_over_tol": _first_last(errs_all),
        "error_drift_all_calls_by_dtype": {
            dt: _first_last([e for _, d, e in soak.errs if d == dt]) for dt in DTYPES},
        "probe": {"shape": Probe.SHAPE.name(), "first_rel_err": soak.probe.err,
                  "rechecks": len(soak.probe_log),
                  "bit_identical": all(s for _, s, _ in soak.probe_log),
                  "error_drift": _first_last(probe_errs)},
        "replay": replay, "concurrency": conc,
        "memory": {"device_bytes_in_use": {"start": mem_start, "after_warmup": mem_warm,
                                           "end": mem_end, "growth_after_warmup": growth,
                                           "samples": soak.mem_samples[:: max(1, len(
                                               soak.mem_samples) // 50)]},
                   "host_rss_bytes": {"start": rss_start, "after_warmup": rss_warm,
                                      "end": rss_end}},
        "failures": soak.failures,
    }

    dt_part = "; ".join(
        f"{dt} {d['calls']} calls, max rel err {d['max_rel_err']:.2e} (tol {TOL[dt]:g}), "
        f"worst row {d['max_row_rel_err']:.2e}" for dt, d in soak.per_dtype.items())
    drift = record["error_drift_all_calls_err_over_tol"]
    conc_part = ("no concurrent phase" if conc is None else
                 f"{conc['threads']} threads on disjoint programs for "
                 f"{conc['overlap_seconds']}s overlap, calls {conc['calls_per_thread']}")
    mem_part = (f"device bytes_in_use {_mib(mem_start)} at start, {_mib(mem_warm)} after "
                f"warm-up, {_mib(mem_end)} at end" if mem_end is not None else
                "device memory_stats() not reported on this platform")
    print(
        f"\nSOAK {'PASSED' if ok else 'FAILED'} on {record['device']} in {elapsed:.0f}s "
        f"(seed {seed}): {soak.calls} ragged_dot calls ({soak.calls - calls_warm} after "
        f"warm-up) over {len(soak.per_shape)} distinct shapes "
        f"({cache} compiled programs), {soak.counts['sel_calls']} with SEL, "
        f"{soak.counts['empty_experts']} empty experts, {soak.counts['hot_expert_calls']} "
        f"calls with a {HOT_ROWS}-row expert, {soak.counts['weights_drawn']} weights drawn; "
        f"{dt_part}; error/tol mean over first vs last 10% of calls "
        f"{drift.get('first_mean', 0):.3f} vs {drift.get('last_mean', 0):.3f}; probe re-run "
        f"{len(soak.probe_log)} times, "
        f"{'all bit-identical' if record['probe']['bit_identical'] else 'NOT bit-identical'} "
        f"(rel err {soak.probe.err:.2e}); replay {replay['calls']} back-to-back calls, "
        f"{replay['mismatches']} mismatches; {conc_part}; {mem_part}"
        f"{f' (growth {_mib(growth)})' if growth is not None else ''}; host RSS "
        f"{_mib(rss_warm)} after warm-up, {_mib(rss_end)} at end; "
        f"{len(soak.failures)} failures.", flush=True)
    if FLAGS.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
        with open(FLAGS.json_out, "w") as fh:
            json.dump(record, fh, indent=1, default=str)
        print(f"wrote {FLAGS.json_out}")
    return 0 if ok else 1


if __name__ == "__main__":
    app.run(main)
