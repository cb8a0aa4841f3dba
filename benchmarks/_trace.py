"""Device time of a jitted program from a jax.profiler Perfetto trace (shared by benchmarks).

Wall-clock timing of small programs measures host dispatch as much as the GPU (about 50 us
per call was seen on the H100 machine); the trace's device events measure the kernels.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import tempfile

import jax


def trace_events(fn, args, runs: int = 5, logdir: str | None = None) -> list[dict]:
    """All events of a Perfetto trace taken while `fn(*args)` runs `runs` times (after one
    untraced warm-up run); [] when no trace was written."""
    logdir = logdir or tempfile.mkdtemp(prefix="samoyeds_trace_")
    os.makedirs(logdir, exist_ok=True)
    jax.block_until_ready(fn(*args))
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    for _ in range(runs):
        jax.block_until_ready(fn(*args))
    jax.profiler.stop_trace()
    files = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        return []
    with gzip.open(files[-1]) as fh:
        return json.load(fh).get("traceEvents", [])


def _process_names(events: list[dict]) -> dict:
    return {e["pid"]: e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}


def device_events(fn, args, runs: int = 5, logdir: str | None = None) -> list[dict]:
    """Complete ('X') events on GPU device tracks while `fn(*args)` runs `runs` times."""
    events = trace_events(fn, args, runs, logdir)
    pids = _process_names(events)
    return [e for e in events
            if e.get("ph") == "X" and "/device:GPU" in pids.get(e.get("pid"), "")]


def device_time_us(fn, args, runs: int = 5, logdir: str | None = None
                   ) -> tuple[float | None, dict[str, float]]:
    """(device microseconds per run, microseconds per kernel name per run); None off-GPU."""
    events = device_events(fn, args, runs, logdir)
    if not events:
        return None, {}
    per: dict[str, float] = {}
    for e in events:
        per[e["name"][:80]] = per.get(e["name"][:80], 0.0) + e.get("dur", 0) / runs
    return sum(per.values()), per


# --- ops per device and per category (benchmarks/bench_multi.py) ------------------------

def device_ops(events: list[dict]) -> list[tuple[str, str, str, float]]:
    """``(device, name, hlo_op, dur_us)`` of every device op of a trace.

    GPU: the complete events of the ``/device:GPU:N`` tracks (kernel names; ``hlo_op`` when
    XLA records it). Without GPU events (XLA:CPU, e.g. virtual CPU devices): the host events
    that carry ``args.hlo_op`` (one per HLO op, with ``args.device_ordinal``).
    """
    pids = _process_names(events)
    gpu = [(pids[e["pid"]], e.get("name", ""), e.get("args", {}).get("hlo_op", ""),
            float(e.get("dur", 0))) for e in events
           if e.get("ph") == "X" and "/device:GPU" in pids.get(e.get("pid"), "")]
    if gpu:
        return gpu
    return [(f"cpu:{e['args'].get('device_ordinal', '?')}", e.get("name", ""),
             e["args"]["hlo_op"], float(e.get("dur", 0))) for e in events
            if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
            and not e.get("name", "").startswith("end: ")]


# Categories of the sharded MoE layer's ops; the first match (against hlo_op, then the
# name: NCCL kernels such as ncclDevKernel_SendRecv carry no HLO opcode) wins.
CATEGORIES: dict[str, str] = {
    "all-to-all": r"all-to-all|alltoall|SendRecv",
    "expert custom call": r"custom-call|samoyeds",
    "other collectives": r"all-reduce|all-gather|reduce-scatter|collective-permute|nccl",
}


def time_by_category(ops, runs: int = 1, categories: dict[str, str] | None = None
                     ) -> tuple[dict[str, float], int]:
    """(mean microseconds per device and run in each category plus "other", device count)."""
    cats = {k: re.compile(v, re.IGNORECASE) for k, v in (categories or CATEGORIES).items()}
    total = {k: 0.0 for k in [*cats, "other"]}
    devices = set()
    for device, name, hlo_op, dur in ops:
        devices.add(device)
        key = next((k for k, rx in cats.items() if rx.search(hlo_op) or rx.search(name)),
                   "other")
        total[key] += dur
    n = max(len(devices), 1)
    return {k: v / n / runs for k, v in total.items()}, len(devices)


def time_per_call(fn, args, calls: int, reps: int, logdir: str | None = None,
                  trace: bool = True) -> tuple[float, float | None, dict[str, float]]:
    """Time a program that makes `calls` calls: (median wall seconds per call, device
    seconds per call from a trace or None off-GPU or with trace=False, device microseconds
    per kernel name per program). Compiles and warms up first."""
    import time

    import numpy as np

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    dev_us, per_kernel = (device_time_us(fn, args, runs=5, logdir=logdir) if trace
                          else (None, {}))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    wall = float(np.median(samples)) / calls
    return wall, (dev_us * 1e-6 / calls if dev_us is not None else None), per_kernel
