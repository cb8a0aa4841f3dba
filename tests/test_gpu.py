"""GPU tests of the CUDA kernel against a float64 reference on decode(sw).

Skipped cleanly without a GPU; run on the H100 through scripts/gpu_check.sh. Large shapes
compare a random sample of full output rows (every column) to keep the float64
reference cheap; every row is checked for being written (finite) and for the zero tail.
Inputs come from the seeded ``rng`` of tests/conftest.py, so SAMOYEDS_TEST_SEED replays a
failure; references and tolerances are those of tests/helpers.py.
"""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samoyeds_jax as sj
from helpers import (
    DTYPES, f64, has_gpu, rand, ref_glu, ref_ragged_dot, seed_for, sparse_weight, tol)
from samoyeds_jax.format import SUPPORTED_NV, SUPPORTED_SUB_ROWS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU"),
]


def _weight(rng, e, k, m, cfg, dtype):
    return sparse_weight(rng, cfg, dtype, (e, k, m), scale=1 / np.sqrt(k / 4))


def _poison_device_memory(nbytes=1 << 28):
    # Fill and free a large buffer so fresh XLA allocations start out as NaN: rows the
    # kernel forgets to write then show up as non-finite.
    junk = jnp.full((nbytes // 4,), jnp.nan, jnp.float32)
    junk.block_until_ready()
    del junk


def _check(y, x, sw, gs, sel, dtype, sample_rows=None, rng=None):
    y = f64(y)
    gs = np.asarray(gs)
    total = int(gs.sum())
    assert np.isfinite(y).all(), "unwritten or non-finite output rows"
    assert (y[total:] == 0).all(), "rows past sum(group_sizes) must be zero"
    rows = np.arange(total)
    if sample_rows is not None and total > sample_rows:
        rows = np.sort(rng.choice(total, sample_rows, replace=False))
    ref = ref_ragged_dot(x, f64(sj.decode(sw)), gs, sel, only=rows)
    got = y[rows]
    if len(rows):
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err < tol("product", dtype), f"relative error {err:.3g}"
        assert np.abs(got).sum(axis=1).min() > 0, "a routed row came back all zero"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nv", SUPPORTED_NV)
@pytest.mark.parametrize("sub_row", SUPPORTED_SUB_ROWS)
def test_configs(rng, dtype, nv, sub_row):
    cfg = sj.SparsityConfig(*nv, sub_row=sub_row)
    e, k, m = 4, 384, 192 if cfg.m_multiple <= 64 else 256
    sw = _weight(rng, e, k, m, cfg, dtype)
    gs = jnp.asarray([37, 0, 1, 90], jnp.int32)
    r = int(gs.sum()) + 5
    x = rand(rng, (r, k), dtype)
    _poison_device_memory()
    _check(jax.jit(sj.ragged_dot)(x, sw, gs), x, sw, gs, None, dtype)
    t = 50
    xt = rand(rng, (t, k), dtype)
    sel = jnp.asarray(rng.integers(0, t, r), jnp.int32)
    _poison_device_memory()
    _check(jax.jit(sj.ragged_dot)(xt, sw, gs, sel), xt, sw, gs, sel, dtype)


_MODEL_WEIGHTS = {}


def _model_weight(k, m):
    # Encoding a Mixtral-sized stack takes seconds: one per shape per session, drawn from
    # its own seed (not the first test's) so that a replayed test gets the same weight.
    if (k, m) not in _MODEL_WEIGHTS:
        rng = np.random.default_rng(seed_for(f"model weight {k}x{m}"))
        _MODEL_WEIGHTS[(k, m)] = _weight(rng, 8, k, m, sj.SparsityConfig(1, 2, 128),
                                         jnp.bfloat16)
    return _MODEL_WEIGHTS[(k, m)]


@pytest.mark.parametrize("k,m", [(4096, 14336), (14336, 4096), (2048, 1408), (1408, 2048)])
@pytest.mark.parametrize("tokens", [1, 16, 4096])
def test_model_shapes(rng, k, m, tokens):
    dtype = jnp.bfloat16
    e, top_k = 8, 2
    sw = _model_weight(k, m)
    x = rand(rng, (tokens, k), dtype)
    # Top-2 routing with one hot expert: expert 0 takes a third of the choices.
    choice = rng.integers(0, e, (tokens, top_k))
    choice[: tokens // 3, 0] = 0
    flat = choice.reshape(-1)
    order = np.argsort(flat, kind="stable")
    sel = jnp.asarray(order // top_k, jnp.int32)
    gs = jnp.asarray(np.bincount(flat, minlength=e), jnp.int32)
    _poison_device_memory()
    y = jax.jit(sj.ragged_dot)(x, sw, gs, sel)
    _check(y, x, sw, gs, sel, dtype, sample_rows=48, rng=rng)
    if tokens == 4096:  # one expert taking 4096 tokens, no SEL
        _poison_device_memory()
        y = jax.jit(sj.dot)(x, sw[1])
        _check(y, x, sw[1:2], jnp.asarray([tokens], jnp.int32), None, dtype, sample_rows=48,
               rng=rng)


@pytest.mark.parametrize("layout", ["one_expert_all", "odd", "zeros", "tail"])
def test_group_layouts(rng, layout):
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(1, 2, 128)
    e, k, m = 6, 256, 128
    sw = _weight(rng, e, k, m, cfg, dtype)
    r = 300
    gs = {"one_expert_all": [0, 0, r, 0, 0, 0], "odd": [1, 63, 65, 127, 3, 41],
          "zeros": [0] * e, "tail": [7, 0, 0, 129, 0, 2]}[layout]
    gs = jnp.asarray(gs, jnp.int32)
    x = rand(rng, (r, k), dtype)
    _poison_device_memory()
    _check(jax.jit(sj.ragged_dot)(x, sw, gs), x, sw, gs, None, dtype)


@pytest.mark.parametrize("tokens", [1, 7, 64, 65, 1000])
def test_tokens_per_expert(rng, tokens):
    dtype = jnp.float16
    cfg = sj.SparsityConfig(1, 4, 32)
    sw = _weight(rng, 1, 512, 640, cfg, dtype)
    x = rand(rng, (tokens, 512), dtype)
    _poison_device_memory()
    y = jax.jit(sj.dot)(x, sw[0])
    gs = jnp.asarray([tokens], jnp.int32)
    _check(y, x, sw, gs, None, dtype)


@pytest.mark.parametrize("nv,sub_row", [((1, 2), 128), ((1, 4), 32), ((2, 4), 64), ((1, 1), 128)])
@pytest.mark.parametrize("tokens", [1, 16])
def test_split_k_decode(rng, nv, sub_row, tokens):
    """One expert, few tokens, long K: the warp-level kernel splits K across a cluster
    (on the H100: 4 splits of 17 K stages; the last stage partial for sub_row 32, 64)."""
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(*nv, sub_row=sub_row)
    k, m = 2080 if sub_row == 32 else 2048 + sub_row, 1408
    sw = _weight(rng, 1, k, m, cfg, dtype)
    x = rand(rng, (tokens, k), dtype)
    _poison_device_memory()
    y = jax.jit(sj.dot)(x, sw[0])
    _check(y, x, sw, jnp.asarray([tokens], jnp.int32), None, dtype)


@pytest.mark.parametrize("glu", ["silu", "gelu"])
@pytest.mark.parametrize("nv,sub_row", [((1, 2), 128), ((1, 4), 32), ((2, 4), 64), ((1, 1), 128)])
@pytest.mark.parametrize("tokens", [5, 100, 700])
def test_fused_glu(rng, glu, nv, sub_row, tokens):
    """glu= in the epilogue: a tile's lower half holds gate rows and its upper half the up
    rows behind the same output columns. On the H100, 5 tokens: the warp-level decode tile
    with K splits (clusters); 100: the warp-level prefill tile; 700: the Hopper kernel.
    F leaves a partial last tile in some kernel for every config (1:2: 608 kept rows per
    half = 9 x 64 + 32 on the Hopper kernel; 1:1: 1232 = 38 x 32 + 16 on the warp tile)."""
    x, sw, gs, sel = _glu_inputs(rng, nv, sub_row, tokens)
    _poison_device_memory()
    y = jax.jit(lambda *a: sj.ragged_dot(*a, glu=glu))(x, sw, gs, sel)
    _glu_check(y, x, sw, gs, sel, glu, jnp.bfloat16)


def _glu_inputs(rng, nv, sub_row, tokens):
    """bf16 (x, gate_up [2, 1152, 2F], group_sizes, sel) with 3 zero rows after the
    groups; F = 1232 for 1:1, else 1216."""
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(*nv, sub_row=sub_row)
    k, f, e = 1152, 1232 if nv == (1, 1) else 1216, 2
    sw = _weight(rng, e, k, 2 * f, cfg, dtype)
    x = rand(rng, (tokens, k), dtype)
    sel = jnp.asarray(rng.integers(0, tokens, tokens + 3), jnp.int32)
    gs = jnp.asarray([tokens // 2, tokens - tokens // 2], jnp.int32)
    return x, sw, gs, sel


def _glu_check(y, x, sw, gs, sel, glu, dtype):
    """A fused-GLU output [R, F]: shape, every row written, zero past the groups, and the
    error against the float64 reference."""
    y = f64(y)
    total = int(np.asarray(gs).sum())
    assert y.shape == (len(sel), sw.shape[-1] // 2), y.shape
    assert np.isfinite(y).all(), "unwritten or non-finite output rows"
    assert (y[total:] == 0).all(), "rows past sum(group_sizes) must be zero"
    ref = ref_glu(ref_ragged_dot(x, f64(sj.decode(sw)), gs, sel)[:total], glu)
    err = np.linalg.norm(y[:total] - ref) / np.linalg.norm(ref)
    assert err < tol("product", dtype), f"relative error {err:.3g}"


@pytest.mark.parametrize("glu", [None, "silu"])
def test_plain_wide_blocks(rng, glu):
    """Plain 2:4 runs 192 x 192 Hopper blocks where they fill a wave of the GPU (192 x 128
    below that): a shape past the threshold on an H100 (12 M tiles x 15 row tiles), with
    SEL, odd group sizes, an empty expert and a partial last row tile; fused GLU too."""
    dtype = jnp.float16
    cfg = sj.SparsityConfig(1, 1, 128)
    k, m, tokens, e = 256, 2304, 2150, 3
    sw = _weight(rng, e, k, m, cfg, dtype)
    x = rand(rng, (tokens, k), dtype)
    sel = jnp.asarray(rng.integers(0, tokens, tokens), jnp.int32)
    gs = jnp.asarray([1001, 0, 1146], jnp.int32)  # 3 zero rows after
    _poison_device_memory()
    y = jax.jit(lambda *a: sj.ragged_dot(*a, glu=glu))(x, sw, gs, sel)
    if glu is None:
        _check(y, x, sw, gs, sel, dtype, sample_rows=64, rng=rng)
        return
    y = f64(y)
    assert y.shape == (tokens, m // 2) and np.isfinite(y).all() and (y[2147:] == 0).all()
    rows = np.sort(rng.choice(2147, 64, replace=False))
    ref = ref_glu(ref_ragged_dot(x, f64(sj.decode(sw)), gs, sel, only=rows), glu)
    err = np.linalg.norm(y[rows] - ref) / np.linalg.norm(ref)
    assert err < tol("product", dtype), f"relative error {err:.3g}"


@pytest.mark.parametrize("nv,sub_row,k", [((1, 2), 128, 1152), ((2, 4), 32, 1120)])
@pytest.mark.parametrize("glu", [None, "silu"])
def test_forced_split_k(rng, nv, sub_row, k, glu):
    """8 forced K splits of the warp-level kernel on 9 K stages: splits 5-7 get no stage
    and add zeros; with and without a fused GLU (act(gate) * up of the summed partials)."""
    cfg = sj.SparsityConfig(*nv, sub_row=sub_row)
    sw = _weight(rng, 2, k, 256, cfg, jnp.bfloat16)
    x = rand(rng, (40, k), jnp.bfloat16)
    gs = jnp.asarray([3, 30], jnp.int32)  # 7 rows past the groups stay zero
    ref = ref_ragged_dot(x, f64(sj.decode(sw)), gs)[:33]
    if glu:
        ref = ref_glu(ref, glu)
    _poison_device_memory()
    with sj.ops.force_kernel("warp", splits=8):
        y = jax.jit(lambda *a: sj.ragged_dot(*a, glu=glu))(x, sw, gs)
    y = f64(y)
    assert np.isfinite(y).all() and (y[33:] == 0).all()
    err = np.linalg.norm(y[:33] - ref) / np.linalg.norm(ref)
    assert err < tol("product", jnp.bfloat16), f"relative error {err:.3g}"


def test_vmap_and_grad(rng):
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(2, 4, 64)
    e, k, m, r = 3, 256, 128, 40
    sw = _weight(rng, e, k, m, cfg, dtype)
    xb = rand(rng, (2, r, k), dtype)
    gsb = jnp.asarray([[10, 0, 25], [1, 38, 1]], jnp.int32)
    yb = jax.jit(jax.vmap(lambda x, g: sj.ragged_dot(x, sw, g)))(xb, gsb)
    for b in range(2):
        _check(yb[b], xb[b], sw, gsb[b], None, dtype)
    f = lambda x: (sj.ragged_dot(x, sw, gsb[0]).astype(jnp.float32) ** 2).sum()
    g = jax.jit(jax.grad(f))(xb[0])
    w = f64(sj.decode(sw))
    xs = f64(xb[0])
    off = np.concatenate([[0], np.cumsum(np.asarray(gsb[0]))])
    want = np.zeros_like(xs)
    for ex in range(e):
        rows = slice(off[ex], off[ex + 1])
        want[rows] = 2 * (xs[rows] @ w[ex]) @ w[ex].T
    got = f64(g)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol("grad", dtype)


def test_matches_cpu_handler(rng):
    """The CUDA kernel and the C++ CPU handler agree on the same inputs."""
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(1, 2, 128)
    sw = _weight(rng, 4, 512, 256, cfg, dtype)
    gs = jnp.asarray([3, 60, 0, 17], jnp.int32)
    x = rand(rng, (90, 512), dtype)
    sel = jnp.asarray(rng.integers(0, 90, 85), jnp.int32)
    y_gpu = np.asarray(jax.jit(sj.ragged_dot)(x, sw, gs, sel).astype(jnp.float32))
    cpu = jax.devices("cpu")[0]
    args = jax.device_put((x, sw, gs, sel), cpu)
    y_cpu = np.asarray(jax.jit(sj.ragged_dot)(*args).astype(jnp.float32))
    bound = tol("product_row", dtype)  # two roundings of the same sums, one per handler
    np.testing.assert_allclose(y_gpu, y_cpu, rtol=bound, atol=bound)


def test_deterministic(rng):
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(1, 2, 128)
    sw = _weight(rng, 8, 1024, 512, cfg, dtype)
    gs = jnp.asarray(rng.integers(0, 100, 8), jnp.int32)
    x = rand(rng, (int(gs.sum()), 1024), dtype)
    f = jax.jit(sj.ragged_dot)
    first = np.asarray(f(x, sw, gs).view(jnp.uint16))
    for _ in range(3):
        assert (np.asarray(f(x, sw, gs).view(jnp.uint16)) == first).all()


_REPLAY = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    import samoyeds_jax as sj
    rng = np.random.default_rng(int(sys.argv[1]))
    cfg = sj.SparsityConfig(1, 2, 128)
    def make(k, m):
        sw = sj.encode(sj.prune(jnp.asarray(rng.standard_normal((4, k, m)) / np.sqrt(k / 4), jnp.bfloat16), cfg), cfg)
        return sw, np.asarray(sj.decode(sw).astype(jnp.float32), np.float64)
    up, wu = make(256, 512)
    down, wd = make(512, 256)
    @jax.jit
    def f(x, gs, sel):
        h = sj.ragged_dot(x, up, gs, sel)
        return sj.ragged_dot(jnp.tanh(h), down, gs) * 2
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)
    worst = 0.0
    for it in range(6):
        gs = rng.multinomial(96, np.ones(4) / 4).astype(np.int32)
        x = bf(rng.standard_normal((64, 256)))
        sel = rng.integers(0, 64, 96).astype(np.int32)
        y = np.asarray(f(jnp.asarray(x, jnp.bfloat16), jnp.asarray(gs), jnp.asarray(sel)).astype(jnp.float32))
        e = np.repeat(np.arange(4), gs)
        h = bf(np.tanh(bf(np.stack([x[s] @ wu[k] for s, k in zip(sel, e)]))))
        ref = np.stack([h[i] @ wd[k] for i, k in enumerate(e)]) * 2
        worst = max(worst, np.linalg.norm(y - ref) / np.linalg.norm(ref))
    print("REPLAY_MAX_ERR", worst)
""")


def test_command_buffer_replay(rng, tmp_path):
    """A jitted function replays correctly with custom calls captured in command buffers."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL"
                        " --xla_gpu_graph_min_graph_size=1"
                        f" --xla_dump_to={tmp_path} --xla_dump_hlo_as_text")
    out = subprocess.run([sys.executable, "-c", _REPLAY, str(int(rng.integers(2**31)))],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    err = float(out.stdout.split("REPLAY_MAX_ERR")[1])
    assert err < tol("product_row", jnp.bfloat16), out.stdout  # two products chained
    # The custom call must run inside a command buffer. Newer XLA (jaxlib 0.11) forms
    # command buffers from the thunk sequence after compilation, which the dump shows as
    # kCustomCall thunks nested under a kCommandBuffer thunk; older XLA did it in an HLO
    # pass, which shows as a command_buffer computation in the optimized HLO.
    hlo = "".join(p.read_text() for p in tmp_path.glob("*jit_f*after_optimizations.txt"))
    targets = set(re.findall(r'custom_call_target="([^"]+)"', hlo))
    assert targets == {"samoyeds_ragged_dot"}, targets  # the only custom calls of f
    thunks = "".join(p.read_text()
                     for p in tmp_path.glob("*jit_f*thunk_sequence_after_thunk_passes.txt"))
    nested = re.search(r"kCommandBuffer.*\n(?:\s+\d+: .*\n)*?\s+\d+: kCustomCall", thunks)
    in_hlo_buffer = "command_buffer" in hlo
    if not (nested or in_hlo_buffer):
        pytest.xfail("replay correct, but samoyeds_ragged_dot was not captured into a "
                     "command buffer; thunks after passes:\n" + thunks[:2000])
