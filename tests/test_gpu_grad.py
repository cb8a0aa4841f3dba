"""GPU tests of the CUDA backward handlers (ffi/cuda_backward.cu): dx rows and dvalues
against the float64 references of tests/helpers.py, the CPU handler and the XLA path.

Skipped cleanly without a GPU. Inputs come from the seeded ``rng`` of tests/conftest.py
(SAMOYEDS_TEST_SEED replays a failure). Outputs land in poisoned device memory, so an
element a kernel forgets to write shows up as non-finite. The kernels sum in float32 over
16-bit products that are exact in float32: against float64 only the summation order
differs (``_EXACT``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samoyeds_jax as sj
from helpers import (
    DTYPES, f64, has_gpu, rand, ref_dvalues, ref_ragged_dot, rel_err, sparse_weight, tol)
from samoyeds_jax import _samoyeds, backward
from samoyeds_jax.format import SUPPORTED_NV, SUPPORTED_SUB_ROWS
from test_gpu import _poison_device_memory
from test_grad import check_grad, dense64, ref_dx, routing, with_values

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU"),
]

_EXACT = 1e-4  # float32 sums of exact products, in another order than the reference

dx_jit = jax.jit(backward.dx_rows, static_argnames="config")
dvalues_jit = jax.jit(backward.dvalues, static_argnames=("config", "has_sel"))


def _gpu():
    return jax.devices("gpu")[0]


def _cpu():
    return jax.devices("cpu")[0]


def _ref_dx_rows(ct, sw, gs):
    """float64 ``dxr [R, K]``: ``ct[r] @ W_e(r)^T``, zero past the groups."""
    return ref_ragged_dot(ct, np.swapaxes(dense64(sw), -1, -2), gs)


def _shape(cfg):
    # K leaves a partial 128-column tile for L < 128; Mk = 80 leaves partial 32- and
    # 64-row chunks.
    k = {32: 288, 64: 320, 128: 384}[cfg.sub_row]
    return k, 80 * cfg.v // cfg.n


def _sel_with_zero_rows(rng, rows, tokens):
    sel = rng.integers(0, tokens, rows).astype(np.int32)
    sel[[1, rows // 2]] = [-1, tokens]  # outside [0, T): zero rows
    return jnp.asarray(sel)


def test_module_exports_the_cuda_targets():
    assert {backward.DX_TARGET, backward.DVALUES_TARGET} <= set(_samoyeds.cuda_targets())


@pytest.mark.parametrize("use_sel", [False, True], ids=["nosel", "sel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("sub_row", SUPPORTED_SUB_ROWS)
@pytest.mark.parametrize("nv", SUPPORTED_NV, ids=lambda nv: f"{nv[0]}:{nv[1]}")
def test_dx_and_dvalues_against_float64(nv, sub_row, dtype, use_sel, rng, seed):
    cfg = sj.SparsityConfig(*nv, sub_row=sub_row)
    k, m = _shape(cfg)
    e, rows, tokens = 5, 203, 131
    sw = sparse_weight(rng, cfg, dtype, (e, k, m))
    gs, _ = routing(rng, rows, tokens, False, e=e)        # an empty expert, sum < R
    sel = _sel_with_zero_rows(rng, rows, tokens) if use_sel else None
    x = rand(rng, (tokens if use_sel else rows, k), dtype)
    ct = rand(rng, (rows, m), dtype)
    msg = f"seed={seed} {nv[0]}:{nv[1]} L={sub_row} gs={gs.tolist()}"
    g = _gpu()
    put = lambda a: jax.device_put(a, g)
    _poison_device_memory()
    dxr = dx_jit(put(ct), put(sw.values), put(sw.indices), put(sw.metadata), put(gs),
                 config=cfg)
    assert dxr.devices() == {g} and dxr.dtype == jnp.float32 and dxr.shape == (rows, k)
    got = f64(dxr)
    assert np.isfinite(got).all(), f"{msg}: unwritten dx rows"
    assert not got[int(gs.sum()):].any(), f"{msg}: dx rows past the groups must be zero"
    assert rel_err(got, _ref_dx_rows(ct, sw, gs)) <= _EXACT, msg

    _poison_device_memory()
    no_sel = jnp.zeros((0,), jnp.int32)
    dv = dvalues_jit(put(x), put(ct), put(sw.indices), put(sw.metadata),
                     put(sel if use_sel else no_sel), put(gs), config=cfg, has_sel=use_sel)
    assert dv.devices() == {g} and dv.shape == sw.values.shape
    got = f64(dv)
    assert np.isfinite(got).all(), f"{msg}: unwritten dvalues"
    empty = np.flatnonzero(np.asarray(gs) == 0)
    assert not got[empty].any(), f"{msg}: an expert without rows must get zeros"
    assert rel_err(got, ref_dvalues(x, ct, sw, gs, sel)) <= _EXACT, msg


@pytest.mark.parametrize("gs", [[10, 0, 25, 7], [6, -3, 400, 9], [0, 0, 0, 0], [45, 0, 0, 0]])
def test_bad_routing_reads_as_the_cpu_handler(gs, rng, seed):
    """Unclipped sizes reach the handlers clipped (backward.py), and a sel entry outside
    [0, T) is a zero row: CUDA and the CPU handler agree."""
    cfg = sj.SparsityConfig(2, 4, 64)
    sw = sparse_weight(rng, cfg, jnp.bfloat16, (4, 256, 128))
    rows, tokens = 45, 21
    x, ct = rand(rng, (tokens, 256), jnp.bfloat16), rand(rng, (rows, 128), jnp.bfloat16)
    sel = _sel_with_zero_rows(rng, rows, tokens)
    gs = jnp.asarray(gs, jnp.int32)
    args = (sw.indices, sw.metadata, sel, gs)
    out = {}
    for name, dev in (("cpu", _cpu()), ("gpu", _gpu())):
        put = lambda a, d=dev: jax.device_put(a, d)
        out[name] = (f64(dvalues_jit(put(x), put(ct), *map(put, args), config=cfg,
                                     has_sel=True)),
                     f64(dx_jit(put(ct), put(sw.values), put(sw.indices), put(sw.metadata),
                                put(gs), config=cfg)))
    for i, what in enumerate(("dvalues", "dx")):
        a, b = out["cpu"][i], out["gpu"][i]
        assert ((a == 0) == (b == 0)).all(), f"seed={seed} {what}: zeros differ"
        assert rel_err(b, a) <= _EXACT, f"seed={seed} {what}"


_MIXTRALISH = [  # (E, K, M, rows): a fused gate_up and a down projection, scaled down
    (8, 1024, 2 * 1792, 1024),
    (8, 1792, 1024, 1024),
]


@pytest.mark.parametrize("e,k,m,rows", _MIXTRALISH)
def test_mixtralish_shapes_match_the_cpu_handler_and_are_deterministic(e, k, m, rows, rng,
                                                                       seed):
    cfg = sj.SparsityConfig(1, 2, 128)
    dtype = jnp.bfloat16
    sw = sparse_weight(rng, cfg, dtype, (e, k, m), scale=1 / np.sqrt(k / 4))
    tokens = rows // 2
    choice = rng.integers(0, e, rows)
    choice[: rows // 3] = 0                                  # one hot expert
    order = np.argsort(choice, kind="stable")
    sel = jnp.asarray(order // 2, jnp.int32)
    gs = jnp.asarray(np.bincount(choice, minlength=e), jnp.int32)
    x, ct = rand(rng, (tokens, k), dtype), rand(rng, (rows, m), dtype)
    args = (sw.indices, sw.metadata, sel, gs)

    def both(dev):
        put = lambda a: jax.device_put(a, dev)
        return (np.asarray(dvalues_jit(put(x), put(ct), *map(put, args), config=cfg,
                                       has_sel=True)),
                np.asarray(dx_jit(put(ct), put(sw.values), put(sw.indices), put(sw.metadata),
                                  put(gs), config=cfg)))

    _poison_device_memory()
    first = both(_gpu())
    _poison_device_memory()
    second = both(_gpu())
    cpu = both(_cpu())
    for i, what in enumerate(("dvalues", "dx")):
        np.testing.assert_array_equal(first[i], second[i], err_msg=f"seed={seed} {what}: "
                                      "two runs differ")
        assert np.isfinite(first[i]).all(), f"seed={seed} {what}"
        assert rel_err(first[i], cpu[i]) <= _EXACT, f"seed={seed} {what} vs the CPU handler"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("glu", [None, "silu"], ids=["plain", "silu"])
def test_grad_of_ragged_dot_and_the_fused_glu_match_cpu(glu, dtype, rng, seed):
    cfg = sj.SparsityConfig(1, 2, 64)
    e, k, f = 4, 256, 96
    sw = sparse_weight(rng, cfg, dtype, (e, k, 2 * f))
    rows, tokens = 300, 170
    gs, sel = routing(rng, rows, tokens, True, e=e)
    x = rand(rng, (tokens, k), dtype)
    ct = rand(rng, (rows, f if glu else 2 * f), dtype)

    def loss(x, values):
        y = sj.ragged_dot(x, with_values(sw, values), gs, sel, glu=glu)
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, (0, 1)))
    want = grad(jax.device_put(x, _cpu()), jax.device_put(sw.values, _cpu()))
    with jax.default_device(_gpu()):
        got = grad(jax.device_put(x, _gpu()), jax.device_put(sw.values, _gpu()))
    for name, a, b in zip(("dx", "dvalues"), got, want):
        assert a.devices() == {_gpu()}
        check_grad(a, f64(b), dtype, "product_row", f"seed={seed} glu={glu!r} {name}")


def test_grad_wrt_values_and_x_against_float64(rng, seed):
    """jax.grad through sj.ragged_dot on the GPU (CUDA forward and backward) against the
    float64 references."""
    cfg, dtype = sj.SparsityConfig(1, 4, 32), jnp.float16
    e, k, m = 4, 256, 128
    sw = sparse_weight(rng, cfg, dtype, (e, k, m))
    rows, tokens = 300, 170
    gs, sel = routing(rng, rows, tokens, True, e=e)
    x, ct = rand(rng, (tokens, k), dtype), rand(rng, (rows, m), dtype)

    def loss(x, values):
        y = sj.ragged_dot(x, with_values(sw, values), gs, sel)
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

    with jax.default_device(_gpu()):
        gx, gv = jax.jit(jax.grad(loss, (0, 1)))(jax.device_put(x, _gpu()),
                                                 jax.device_put(sw.values, _gpu()))
    msg = f"seed={seed}"
    check_grad(gv, ref_dvalues(x, ct, sw, gs, sel), dtype, "product_row", f"{msg} dvalues")
    check_grad(gx, ref_dx(ct, dense64(sw), gs, sel, tokens), dtype, "product_row", f"{msg} dx")


def test_layer_grad_cuda_and_xla_backward_agree(rng, seed):
    """jax.grad of sj.moe on the GPU through the CUDA handlers and through the XLA path
    (xla_backward_on_cuda), and the switch really changes the compiled program."""
    cfg = sj.MoEConfig(num_experts=4, top_k=2, d_model=256, d_ff=256,
                       sparsity=sj.SparsityConfig(1, 2, 128))
    dense = {key: jax.device_put(v, _gpu()) for key, v in
             sj.init_dense_moe(jax.random.key(int(rng.integers(2**31))), cfg).items()}
    sparse = sj.sparsify_moe(dense, cfg)
    x = jax.device_put(rand(rng, (96, cfg.d_model), jnp.bfloat16), _gpu())
    ct = jax.device_put(rng.standard_normal((96, cfg.d_model)).astype(np.float32), _gpu())

    def grads():
        loss = lambda p, x: jnp.sum(sj.moe(p, x, cfg).astype(jnp.float32) * ct)
        fn = jax.jit(jax.grad(loss, (0, 1), allow_int=True))
        return fn.lower(sparse, x).as_text(), fn(sparse, x)

    text, (g, gx) = grads()
    with backward.xla_backward_on_cuda():
        text_xla, (g_xla, gx_xla) = grads()
    assert backward.DX_TARGET in text and backward.DVALUES_TARGET in text
    assert backward.DX_TARGET not in text_xla and backward.DVALUES_TARGET not in text_xla
    msg = f"seed={seed}"
    for key in ("gate_up", "down"):
        check_grad(g[key].values, f64(g_xla[key].values), jnp.bfloat16, "grad", f"{msg} {key}")
    check_grad(gx, f64(gx_xla), jnp.bfloat16, "grad", f"{msg} x")


@pytest.mark.parametrize("case", ["no_rows", "no_experts_rows"])
def test_degenerate_shapes(case, rng):
    """R = 0 (nothing to write) and every group empty (all zeros)."""
    cfg = sj.SparsityConfig(1, 2, 32)
    sw = sparse_weight(rng, cfg, jnp.bfloat16, (2, 64, 32))
    rows = 0 if case == "no_rows" else 9
    ct = rand(rng, (rows, 32), jnp.bfloat16) if rows else jnp.zeros((0, 32), jnp.bfloat16)
    x = rand(rng, (rows, 64), jnp.bfloat16) if rows else jnp.zeros((0, 64), jnp.bfloat16)
    gs = jnp.zeros((2,), jnp.int32)
    put = lambda a: jax.device_put(a, _gpu())
    _poison_device_memory()
    dxr = f64(dx_jit(put(ct), put(sw.values), put(sw.indices), put(sw.metadata), put(gs),
                     config=cfg))
    dv = f64(dvalues_jit(put(x), put(ct), put(sw.indices), put(sw.metadata),
                         put(jnp.zeros((0,), jnp.int32)), put(gs), config=cfg, has_sel=False))
    assert dxr.shape == (rows, 64) and not dxr.any()
    assert dv.shape == (2, 16, 32) and not dv.any()
