"""GPU tests of the serving-path kernel (ffi/cuda/hopper/stream_kernel.cuh): 1 to 512
routed rows per expert, forced with sj.ops.force_kernel("stream") and through the
automatic choice, against a float64 reference on decode(sw), on poisoned output memory.

Covers every N:V config, sub-row length and dtype; the narrow (<= 16 rows per expert) and
wide blocks; K with a partial last stage; partial M tiles; sub-row indices copied in
16-byte chunks during the prologue (K = 2048, splits off the chunk boundaries); empty experts and one expert
taking every row; SEL; fused GLUs; forced K splits (clusters), with splits that get no
K stage; bit-identical reruns. Needs an sm_90 GPU (skipped elsewhere). References and
tolerances are those of tests/helpers.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samoyeds_jax as sj
from helpers import DTYPES, f64, has_gpu, rand, ref_glu, ref_ragged_dot, seed_for, tol
from samoyeds_jax.format import SUPPORTED_NV, SUPPORTED_SUB_ROWS
from test_gpu import _check, _glu_check, _glu_inputs, _poison_device_memory, _weight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU"),
]


def _hopper_or_skip():
    dev = jax.devices("gpu")[0]
    if str(getattr(dev, "compute_capability", "")) != "9.0":
        pytest.skip(f"the serving kernel needs an sm_90 GPU, not {dev.device_kind}")


def _stream(f, splits=0):
    def g(*a):
        with sj.ops.force_kernel("stream", splits=splits):
            return f(*a)
    return jax.jit(g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nv", SUPPORTED_NV)
@pytest.mark.parametrize("sub_row", SUPPORTED_SUB_ROWS)
@pytest.mark.parametrize("sizes", [[5, 0, 11], [40, 0, 90]], ids=["narrow", "wide"])
def test_configs(rng, dtype, nv, sub_row, sizes):
    """Every config; K = 7 windows of sub_row 32 / 64 leaves a partial last K stage; M
    leaves a partial M tile of both blocks (the wide block: 128 kept rows)."""
    _hopper_or_skip()
    cfg = sj.SparsityConfig(*nv, sub_row=sub_row)
    k = 7 * sub_row if sub_row < 128 else 3 * 128
    m = 5 * cfg.m_multiple * (1 if cfg.m_multiple >= 64 else 3)
    sw = _weight(rng, 3, k, m, cfg, dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    r = int(gs.sum()) + 3
    x = rand(rng, (r, k), dtype)
    _poison_device_memory()
    _check(_stream(sj.ragged_dot)(x, sw, gs), x, sw, gs, None, dtype)
    t = 37
    xt = rand(rng, (t, k), dtype)
    sel = jnp.asarray(rng.integers(0, t, r), jnp.int32)
    _poison_device_memory()
    _check(_stream(sj.ragged_dot)(xt, sw, gs, sel), xt, sw, gs, sel, dtype)


@pytest.mark.parametrize("nv,sub_row", [((1, 2), 128), ((1, 4), 32), ((2, 4), 64), ((1, 1), 128)])
@pytest.mark.parametrize("splits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("tokens", [3, 16, 70])
def test_forced_splits(rng, nv, sub_row, splits, tokens):
    """K split over clusters of 1-8 blocks: 9 K stages (the last partial for sub_row 32 /
    64), so with 8 splits some blocks get one stage and none of the spare ones."""
    _hopper_or_skip()
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(*nv, sub_row=sub_row)
    k = {32: 1120, 64: 1088, 128: 1152}[sub_row]
    sw = _weight(rng, 2, k, 320 if cfg.m_multiple <= 64 else 384, cfg, dtype)
    gs = jnp.asarray([tokens // 3, tokens - tokens // 3], jnp.int32)
    x = rand(rng, (tokens + 2, k), dtype)
    _poison_device_memory()
    _check(_stream(sj.ragged_dot, splits)(x, sw, gs), x, sw, gs, None, dtype)


@pytest.mark.parametrize("nv,sub_row", [((1, 2), 128), ((1, 4), 32), ((2, 4), 64), ((1, 2), 32)])
@pytest.mark.parametrize("splits", [1, 3, 5])
@pytest.mark.parametrize("tokens", [5, 40])
def test_index_span(rng, nv, sub_row, splits, tokens):
    """K = 2048 (16-byte rows of sub-row indices: 16 to 64 windows), where the kernel
    copies the indices during its prologue as 16-byte chunks: with 3 and 5 K splits the
    splits' windows start off the chunk boundaries; SEL with repeated tokens."""
    _hopper_or_skip()
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(*nv, sub_row=sub_row)
    k = 2048
    sw = _weight(rng, 3, k, 320 if cfg.m_multiple <= 64 else 384, cfg, dtype)
    gs = jnp.asarray([tokens // 2, 0, tokens - tokens // 2], jnp.int32)
    x = rand(rng, (tokens + 1, k), dtype)
    sel = jnp.asarray(rng.integers(0, tokens + 1, tokens + 1), jnp.int32)
    _poison_device_memory()
    _check(_stream(sj.ragged_dot, splits)(x, sw, gs, sel), x, sw, gs, sel, dtype)


@pytest.mark.parametrize("glu", ["silu", "gelu"])
@pytest.mark.parametrize("nv,sub_row", [((1, 2), 128), ((1, 4), 32), ((2, 4), 64), ((1, 1), 128)])
@pytest.mark.parametrize("tokens,splits", [(5, 0), (5, 4), (100, 0), (100, 2)])
def test_fused_glu(rng, glu, nv, sub_row, tokens, splits):
    """glu= with the gate and up halves of a tile in one block; with and without K splits
    (the fused GLU is applied after the cluster's sum); F leaves a partial last tile."""
    _hopper_or_skip()
    x, sw, gs, sel = _glu_inputs(rng, nv, sub_row, tokens)
    _poison_device_memory()
    y = _stream(lambda *a: sj.ragged_dot(*a, glu=glu), splits)(x, sw, gs, sel)
    _glu_check(y, x, sw, gs, sel, glu, jnp.bfloat16)


@pytest.mark.parametrize("layout", ["one_expert_all", "zeros", "many_small", "tail"])
def test_group_layouts(rng, layout):
    """64 experts with 0-3 rows each, every row on one expert, no rows at all, odd sizes."""
    _hopper_or_skip()
    dtype = jnp.float16
    cfg = sj.SparsityConfig(1, 2, 128)
    e, k, m = 64 if layout == "many_small" else 6, 256, 192
    sw = _weight(rng, e, k, m, cfg, dtype)
    gs = {"one_expert_all": [0, 0, 200, 0, 0, 0], "zeros": [0] * 6,
          "many_small": list(rng.integers(0, 4, 64)), "tail": [7, 0, 0, 129, 0, 2]}[layout]
    gs = jnp.asarray(gs, jnp.int32)
    r = max(int(gs.sum()), 1) + 5
    x = rand(rng, (r, k), dtype)
    sel = jnp.asarray(rng.integers(0, r, r), jnp.int32)
    _poison_device_memory()
    _check(_stream(sj.ragged_dot)(x, sw, gs, sel), x, sw, gs, sel, dtype)


_MODEL = {}


def _model_weight(k, m, nv):
    # One per shape per session, from its own seed (a replayed test gets the same weight).
    if (k, m, nv) not in _MODEL:
        rng = np.random.default_rng(seed_for(f"stream model weight {k}x{m} {nv}"))
        _MODEL[(k, m, nv)] = _weight(rng, 8, k, m, sj.SparsityConfig(*nv, sub_row=128),
                                     jnp.bfloat16)
    return _MODEL[(k, m, nv)]


@pytest.mark.parametrize("k,m", [(4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("nv", [(1, 2), (1, 1), (1, 4)])
@pytest.mark.parametrize("tokens", [1, 16, 64, 256])
def test_model_shapes_single(rng, k, m, nv, tokens):
    """One Mixtral-8x7B expert at serving sizes, through the automatic choice."""
    _hopper_or_skip()
    dtype = jnp.bfloat16
    sw = _model_weight(k, m, nv)
    x = rand(rng, (tokens, k), dtype)
    _poison_device_memory()
    y = jax.jit(sj.dot)(x, sw[3])
    _check(y, x, sw[3:4], jnp.asarray([tokens], jnp.int32), None, dtype, sample_rows=32, rng=rng)


@pytest.mark.parametrize("tokens", [1, 16, 128, 512])
def test_model_shapes_grouped(rng, tokens):
    """8 experts, top-2 with one hot expert, fused SwiGLU gate_up (4096 x 2 * 14336)."""
    _hopper_or_skip()
    dtype = jnp.bfloat16
    sw = _model_weight(4096, 2 * 14336, (1, 2))
    x = rand(rng, (tokens, 4096), dtype)
    choice = rng.integers(0, 8, (tokens, 2))
    choice[: tokens // 3, 0] = 0
    flat = choice.reshape(-1)
    order = np.argsort(flat, kind="stable")
    sel = jnp.asarray(order // 2, jnp.int32)
    gs = jnp.asarray(np.bincount(flat, minlength=8), jnp.int32)
    _poison_device_memory()
    y = f64(jax.jit(lambda *a: sj.ragged_dot(*a, glu="silu"))(x, sw, gs, sel))
    assert np.isfinite(y).all()
    rows = np.sort(rng.choice(2 * tokens, min(2 * tokens, 24), replace=False))
    ref = ref_glu(ref_ragged_dot(x, f64(sj.decode(sw)), gs, sel, only=rows), "silu")
    err = np.linalg.norm(y[rows] - ref) / np.linalg.norm(ref)
    assert err < tol("product", dtype), f"relative error {err:.3g}"


@pytest.mark.parametrize("rows_per_expert,m", [(1, 384), (8, 384), (16, 384), (17, 384),
                                               (48, 384), (100, 384), (250, 384), (300, 384),
                                               (512, 384), (300, 1536), (512, 3072)])
def test_automatic_choice_agrees(rng, rows_per_expert, m):
    """Around every threshold of the automatic choice (warp, stream narrow / wide,
    Hopper prefill; past 128 rows per expert the prefill kernel only where its blocks
    fill a quarter of the SMs: not at M = 384, at M = 1536 and 3072), the chosen kernel
    agrees with the reference."""
    _hopper_or_skip()
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(1, 2, 128)
    e, k = 4, 512
    sw = _weight(rng, e, k, m, cfg, dtype)
    gs = jnp.asarray(rng.multinomial(rows_per_expert * e, np.ones(e) / e), jnp.int32)
    x = rand(rng, (rows_per_expert * e, k), dtype)
    _poison_device_memory()
    _check(jax.jit(sj.ragged_dot)(x, sw, gs), x, sw, gs, None, dtype, sample_rows=64, rng=rng)


@pytest.mark.parametrize("splits", [0, 6, 8])
def test_deterministic(rng, splits):
    """The same inputs give the same bits on every run, K splits included."""
    _hopper_or_skip()
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(1, 2, 128)
    sw = _weight(rng, 8, 2048, 512, cfg, dtype)
    gs = jnp.asarray(rng.integers(0, 12, 8), jnp.int32)
    x = rand(rng, (int(gs.sum()), 2048), dtype)
    f = _stream(lambda *a: sj.ragged_dot(*a, glu="silu"), splits)
    first = np.asarray(f(x, sw, gs).view(jnp.uint16))
    for _ in range(5):
        assert (np.asarray(f(x, sw, gs).view(jnp.uint16)) == first).all()
