"""CPU smoke tests of the benchmark suite: bench_stack.py and bench_memory.py end to end on
the `tiny` preset (JSON, CSV and, when matplotlib is installed, the PNG), bench_kernel.py's
CPU mode (--shape, --repeat), plus the pieces they rest on: the abstract/random encoded
layers against sj.sparsify_moe, the memory search against brute force, and the report
helpers.

The scripts live in benchmarks/ (not a package) and are imported from there; both share
their common absl flags through benchmarks/_stack.py, so one process can import both.
Each run parses its own argv into the global FLAGS and resets it afterwards.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

import samoyeds_jax as sj
from samoyeds_jax.format import SUPPORTED_NV, SUPPORTED_SUB_ROWS
from samoyeds_jax.moe import PRESETS, preset_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                "benchmarks"))
import _report  # noqa: E402
import _stack  # noqa: E402
import bench_memory  # noqa: E402
import bench_stack  # noqa: E402

FLAGS = flags.FLAGS
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_main():
    """run_main(module, *flags): parse the flags, run module.main, reset the flags."""
    def run(module, *argv: str) -> None:
        FLAGS.unparse_flags()
        FLAGS([module.__name__, *argv])
        module.main([])

    yield run
    FLAGS.unparse_flags()


BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def _signature(tree) -> tuple:
    return jax.tree.structure(tree), [(tuple(a.shape), jnp.dtype(a.dtype))
                                      for a in jax.tree.leaves(tree)]


def test_bench_stack_tiny(run_main, tmp_path):
    out = tmp_path / "stack"
    argv = ["--preset=tiny", "--layers=2", "--tokens=16,32", "--reps=2",
            f"--json_out={out}.json", f"--csv_out={out}.csv", f"--profile_dir={out}_prof"]
    if HAVE_MPL:
        argv.append(f"--plot={out}.png")
    run_main(bench_stack, *argv)

    data = json.loads((tmp_path / "stack.json").read_text())
    assert data["preset"] == "tiny" and data["layers"] == 2 and data["bench"] == "stack"
    paths = ["samoyeds", "xla_ragged_dot", "xla_capacity_einsum"]
    rows = data["rows"]
    assert [(r["tokens"], r["path"]) for r in rows] == [
        (t, p) for t in (16, 32) for p in paths]
    for r in rows:
        assert r["ms"] > 0 and r["wall_ms"] > 0 and r["gib"] > 0
        assert r["tokens_per_expert"] == r["tokens"] * 2 / 8
        assert r["timer"] == ("device" if jax.devices()[0].platform == "gpu" else "wall")
        # Named scopes reach the profile: every layer of the path, by name.
        scope = _stack.SCOPES[r["path"]]
        assert {f"layer0/{scope}", f"layer1/{scope}"} <= set(r["scope_us"]), r["scope_us"]
    for r in rows:
        if r["path"] == "samoyeds":
            assert r["err"] < 1e-2, r            # same weights as the dense twin
            assert r["scope_us"]["sparse_kernels"] > 0
        if r["path"] == "xla_capacity_einsum":
            assert r["dropped"] >= 0 and r["err"] >= 0
    # Sparse weights are smaller than the decoded dense ones they run against.
    assert data["weight_bytes"]["samoyeds"] < data["weight_bytes"]["dense"]

    speed = data["speedup"]
    assert sorted((s["tokens"], s["baseline"]) for s in speed) == sorted(
        (t, b) for t in (16, 32) for b in ("xla_ragged_dot", "xla_capacity_einsum"))
    by = {(r["tokens"], r["path"]): r["ms"] for r in rows}
    for s in speed:
        assert s["speedup"] == pytest.approx(by[s["tokens"], s["baseline"]]
                                             / by[s["tokens"], "samoyeds"])
        assert s["label"].startswith("tiny stack x2 1:2 vs ")

    with open(tmp_path / "stack.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows)
    assert {"device", "preset", "tokens", "path", "ms", "gib"} <= set(table[0])
    assert [float(t["ms"]) for t in table] == pytest.approx([r["ms"] for r in rows])
    assert any(k.startswith("scope_us.layer0/") for k in table[0])
    assert (tmp_path / "stack_prof" / "samoyeds_T16").is_dir()

    if HAVE_MPL:
        assert (tmp_path / "stack.png").read_bytes()[:8] == PNG_MAGIC


def test_bench_stack_records_a_failed_path(run_main, tmp_path, monkeypatch):
    # An out-of-memory path at some T (the dense twin at large T on a GPU) becomes an
    # error row; the run goes on and the speedups skip it.
    def fake(path, cfg, t, x, params):
        if path == "xla_ragged_dot":
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory (test)")
        row = dict(tokens=t, tokens_per_expert=t / 4, path=path, ms=2.0, ms_per_layer=2.0,
                   wall_ms=2.0, timer="wall", gib=0.1)
        return row, x

    monkeypatch.setattr(bench_stack, "_measure", fake)
    run_main(bench_stack, "--preset=tiny", "--layers=1", "--tokens=16", "--reps=1",
             f"--json_out={tmp_path}/s.json")
    data = json.loads((tmp_path / "s.json").read_text())
    failed = [r for r in data["rows"] if r["path"] == "xla_ragged_dot"]
    assert len(failed) == 1 and "RESOURCE_EXHAUSTED" in failed[0]["error"]
    assert [s["baseline"] for s in data["speedup"]] == ["xla_capacity_einsum"]


def test_bench_memory_tiny(run_main, tmp_path):
    out = tmp_path / "mem"
    run_main(bench_memory, "--preset=tiny", "--layers=1", "--budget_gib=0.03",
             "--paths=samoyeds,xla_ragged_dot", f"--json_out={out}.json",
             f"--csv_out={out}.csv")
    data = json.loads((tmp_path / "mem.json").read_text())
    assert data["budget_gib"] == pytest.approx(0.03)
    assert data["budget_source"] == "--budget_gib"
    rows = {r["path"]: r for r in data["rows"]}
    assert set(rows) == {"samoyeds", "xla_ragged_dot"}
    budget = int(0.03 * 2**30)
    for path, r in rows.items():
        best, m = r["max_tokens"], data["token_multiple"]
        assert best > 0 and best % m == 0 and not r["capped"]
        assert r["total_gib"] * 2**30 <= budget
        # Maximal: the search probed best (fits) and best + multiple (does not).
        seen = {p["tokens"]: p["fits"] for p in data["probes"][path]}
        assert seen[best] is True and seen[best + m] is False, seen
        assert r["weights_gib"] == pytest.approx(
            sj.moe_param_bytes(_stack.abstract_layers(
                preset_config("tiny"), jnp.dtype(jnp.bfloat16), 1,
                sparse=path == "samoyeds")[0]) / 2**30)
    # Sparse weights and activations are smaller: a larger batch fits.
    assert rows["samoyeds"]["max_tokens"] > rows["xla_ragged_dot"]["max_tokens"]
    assert data["max_tokens_ratio"]["xla_ragged_dot"] == pytest.approx(
        rows["samoyeds"]["max_tokens"] / rows["xla_ragged_dot"]["max_tokens"])
    with open(tmp_path / "mem.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["path"] for t in table] == ["samoyeds", "xla_ragged_dot"]
    assert int(table[0]["max_tokens"]) == rows["samoyeds"]["max_tokens"]


@pytest.mark.parametrize("fn", [
    lambda t: 1000 + 7 * t,                        # linear
    lambda t: 1000 + 7 * t + 300 * (t > 4000),     # a step
    lambda t: 1000 + t * t // 50,                  # convex
    lambda t: 50_000,                              # flat: capped
])
def test_largest_fitting_matches_brute_force(fn):
    budget, m, cap = 60_000, 16, 1 << 14
    best, probes = bench_memory.largest_fitting(fn, budget, m, cap)
    want = max((t for t in range(m, cap + 1, m) if fn(t) <= budget), default=0)
    assert best == want
    assert len(probes) <= 24


def test_largest_fitting_nothing_fits():
    best, probes = bench_memory.largest_fitting(lambda t: 10**9 + t, 10**6, 16, 1 << 20)
    assert best == 0 and len(probes) == 1


def test_every_preset_fits_every_supported_pattern():
    # MoEConfig raises unless d_model and d_ff meet the format's multiples (K: sub_row,
    # M: 16 * V / N), so real shapes need no padding for any pattern.
    for name in PRESETS:
        for n, v in SUPPORTED_NV:
            for sub_row in SUPPORTED_SUB_ROWS:
                preset_config(name, sj.SparsityConfig(n, v, sub_row))


def test_random_and_abstract_layers_match_sparsify_moe():
    cfg = preset_config("tiny")
    dt = jnp.dtype(jnp.bfloat16)
    real = sj.sparsify_moe(sj.init_dense_moe(jax.random.key(0), cfg, dt), cfg)
    rand = _stack.random_sparse_layer(jax.random.key(1, impl="rbg"), cfg, dt)
    abstract = _stack.abstract_layers(cfg, dt, 3, sparse=True)
    assert len(abstract) == 3
    assert _signature(real) == _signature(rand) == _signature(abstract[0])
    assert _signature(_stack.abstract_layers(cfg, dt, 1, sparse=False)[0]) == _signature(
        sj.init_dense_moe(jax.random.key(0), cfg, dt))


# 1:2 (the default) and 2:4, the one pattern that keeps several sub-rows per block (the
# other V only change a table size); each config costs a compile of the draw.
@pytest.mark.parametrize("nv", [(1, 2), (2, 4)])
def test_random_layer_is_a_valid_encoding(nv):
    cfg = preset_config("tiny", sj.SparsityConfig(*nv, 128))
    dt = jnp.dtype(jnp.bfloat16)
    rand = _stack.random_sparse_layer(jax.random.key(1, impl="rbg"), cfg, dt)
    assert _signature(rand) == _signature(_stack.abstract_layers(cfg, dt, 1, sparse=True)[0])
    for key in ("gate_up", "down"):
        sj.validate(rand[key])
        # encode(decode(w)) gives back the same arrays: the draw is a canonical encoding.
        again = sj.encode(sj.decode(rand[key]), cfg.sparsity)
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(rand[key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Every allowed sub-row index occurs (the draw covers the pattern, not one corner).
    assert set(np.unique(np.asarray(rand["gate_up"].indices))) == set(range(nv[1]))


def test_report_helpers(tmp_path):
    rows = [dict(tokens=16, path="samoyeds", ms=2.0, scope=dict(a=1.0)),
            dict(tokens=16, path="dense", ms=3.0, err="0.1"),
            dict(tokens=32, path="dense", ms=5.0)]
    speed = _report.speedups(rows, ("tokens",), "samoyeds", ("dense", "missing"))
    assert speed == [dict(tokens=16, baseline="dense", sparse_ms=2.0, dense_ms=3.0,
                          speedup=1.5)]
    _report.write_csv(str(tmp_path / "r.csv"), rows, dict(preset="tiny"))
    with open(tmp_path / "r.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["preset", "tokens", "path", "ms", "err", "scope.a"]
    assert table[2] == ["tiny", "16", "dense", "3.0", "0.1", ""]
    _report.write_json(str(tmp_path / "sub" / "r.json"), dict(preset="tiny"), rows,
                       speedup=speed)
    data = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert data["preset"] == "tiny" and data["rows"] == rows and data["speedup"] == speed


def test_plot_without_matplotlib_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        _report.plot_speedup([], "unused.png")


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed")
def test_plot_speedup_png(tmp_path):
    recs = [dict(label=lab, tokens_per_expert=x, speedup=s)
            for lab, pts in (("a", ((4, 0.5), (64, 1.5))), ("b", ((4, 2.0), (64, 3.0))))
            for x, s in pts]
    _report.plot_speedup(recs, str(tmp_path / "p.png"), "title")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_bench_kernel_cpu_mode(tmp_path):
    """--shape and --repeat end to end; in a subprocess, as bench_kernel.py's flags share
    their names with _stack's."""
    out = tmp_path / "kernel.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, "bench_kernel.py"), "--shape=128x64",
           "--tokens=8", "--rotate=1", "--reps=2", "--repeat=2", f"--json_out={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "min..max" in res.stdout and "K=128 M=64" in res.stdout, res.stdout
    data = json.loads(out.read_text())
    assert (data["k"], data["m"]) == (128, 64)
    paths = ["samoyeds", "xla_dense_dot", "samoyeds", "xla_ragged_dot", "xla_batched_einsum"]
    assert [r["path"] for r in data["rows"]] == paths
    assert [r["repeat"] for r in data["samples"]] == [0] * 5 + [1] * 5
    for r in data["rows"]:
        assert r["repeats"] == 2 and r["ms_min"] <= r["ms"] <= r["ms_max"]
    assert {(r["case"], r["baseline"]) for r in data["speedup"]} == {
        ("single", "xla_dense_dot"), ("grouped", "xla_ragged_dot"),
        ("grouped", "xla_batched_einsum")}


def test_bench_quality_smoke(tmp_path):
    """The quality benchmark end to end at its smoke size (one pattern): pretraining, both
    pruners, the sparse fine-tune through the backward primitives, the JSON and the table.
    In a subprocess, as its flags share their names with _stack's."""
    out = tmp_path / "quality.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, "bench_quality.py"), "--size=smoke",
           "--layers=1", "--steps=10", "--eval_tokens=512", f"--json_out={out}"]
    if HAVE_MPL:
        cmd.append(f"--plot={tmp_path / 'quality.png'}")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    variants = [(r["variant"], r["nv"]) for r in data["rows"]]
    assert variants == [("dense_f32", ""), ("dense", ""), ("dense+continued", ""),
                        ("magnitude", "1:2"),
                        ("magnitude+recovery", "1:2"), ("calibrated", "1:2"),
                        ("calibrated+recovery", "1:2")]
    for r in data["rows"]:
        assert 1 < r["ppl"] < 256, r                   # better than uniform over bytes
    assert data["rows"][4]["recover_steps"] == 1       # 10 % of 10 steps
    assert set(data["bars"]) == {"1:2"}
    assert data["corpus"]["held_out_modules"] and data["corpus"]["train_bytes"] > 1e6
    assert "| magnitude | 1:2 | 0.250 |" in res.stdout
    if HAVE_MPL:
        assert (tmp_path / "quality.png").read_bytes()[:8] == PNG_MAGIC


def test_bench_backward_smoke(tmp_path):
    """The backward benchmark end to end on a shrunk Mixtral layer: every path, the table
    and the JSON. In a subprocess, as its flags share their names with _stack's."""
    out = tmp_path / "backward.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, "bench_backward.py"), "--shrink=16",
           "--tokens=32", "--reps=1", f"--json_out={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "vs dense" in res.stdout, res.stdout
    data = json.loads(out.read_text())
    assert (data["bench"], data["d_model"], data["d_ff"]) == ("backward", 256, 896)
    assert [r["path"] for r in data["rows"]] == [
        "samoyeds", "samoyeds_xla_backward", "xla_ragged_dot", "xla_capacity_einsum"]
    for r in data["rows"]:
        assert r["tokens"] == 32 and r["ms"] > 0 and r["vs_best_dense"] > 0
        assert r["fwd_ms"] > 0 and r["bwd_ms"] == pytest.approx(r["ms"] - r["fwd_ms"])
    assert {r["baseline"] for r in data["speedup"]} == {"xla_ragged_dot",
                                                        "xla_capacity_einsum"}
