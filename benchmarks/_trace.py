"""Device time of a jitted program from a jax.profiler Perfetto trace (shared by benchmarks).

Wall-clock timing of small programs measures host dispatch as much as the GPU (about 50 us
per call was seen on the H100 machine); the trace's device events measure the kernels.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile

import jax


def device_events(fn, args, runs: int = 5, logdir: str | None = None) -> list[dict]:
    """Complete ('X') events on GPU device tracks while `fn(*args)` runs `runs` times."""
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
        events = json.load(fh).get("traceEvents", [])
    pids = {e["pid"]: e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}
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
