"""Gradients with the pattern fixed: jax.grad w.r.t. a SparseWeight's kept values (and x)
through sj.ragged_dot, sj.dot, the fused GLU and sj.moe, under jit, vmap and higher
derivatives; the backward primitives (samoyeds_jax.backward) on the CPU handler and on
the XLA path; training the nnx module with optax.

Reference: float64 numpy on the decoded weight (tests/helpers.py: ``ref_dvalues`` reads
``sum_r x^T ct`` at the stored positions, which ``kept_positions`` finds from the format's
specification, independently of ``sj.decode``). A gradient of ``sum(y * ct)`` w.r.t. the
values went through two roundings (the cotangent into the dtype, then the result):
``product_row``; through the whole layer: ``grad``.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samoyeds_jax as sj
from helpers import (
    DTYPES, act, dense_layer, f64, kept_positions, rand, ref_dvalues, ref_ragged_dot,
    rel_err, routed_rows, sparse_weight, tol)
from samoyeds_jax import _samoyeds, backward

E, K, M = 4, 256, 128
CONFIGS = [sj.SparsityConfig(1, 1, 64), sj.SparsityConfig(1, 2, 32),
           sj.SparsityConfig(1, 4, 128), sj.SparsityConfig(2, 4, 64)]

decode_jit = jax.jit(sj.decode)


def cfg_id(cfg):
    return f"{cfg.n}:{cfg.v}-L{cfg.sub_row}"


def dtype_id(dt):
    return jnp.dtype(dt).name


def dense64(sw) -> np.ndarray:
    return f64(decode_jit(sw))


def with_values(sw, values):
    return sj.SparseWeight.unchecked(values, sw.indices, sw.metadata, sw.config)


def routing(rng, rows, tokens, use_sel, e=E, short=True):
    """Group sizes with an empty expert (and fewer rows than R when ``short``), and SEL."""
    total = int(rng.integers(rows // 2, rows)) if short else rows
    cuts = np.sort(rng.integers(0, total + 1, size=e - 1))
    gs = np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int32)
    zero = int(rng.integers(0, e))
    gs[(zero + 1) % e] += gs[zero]
    gs[zero] = 0
    sel = jnp.asarray(rng.integers(0, tokens, rows), jnp.int32) if use_sel else None
    return jnp.asarray(gs), sel


def check_grad(g, ref, dtype, kind, msg):
    assert g.dtype == jnp.dtype(dtype), f"{msg}: dtype {g.dtype}"
    assert g.shape == ref.shape, f"{msg}: shape {g.shape} != {ref.shape}"
    g64 = f64(g)
    assert np.isfinite(g64).all(), f"{msg}: non-finite gradient"
    err = rel_err(g64, ref)
    assert err <= tol(kind, dtype), f"{msg}: relative error {err:.3g} > {tol(kind, dtype)}"


# --- the format helper the references rest on ---------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_kept_positions_match_decode(cfg, rng):
    sw = sparse_weight(rng, cfg, jnp.bfloat16, (2, K, M))
    k, m = kept_positions(sw)
    dense = np.asarray(decode_jit(sw), np.float32)
    got = np.stack([dense[e][k[e], m[e]] for e in range(2)])
    np.testing.assert_array_equal(got, np.asarray(sw.values, np.float32))
    # Every stored value has its own place.
    flat = k * M + m
    assert all(len(np.unique(flat[e])) == flat[e].size for e in range(2))


# --- ragged_dot, dot ------------------------------------------------------------------

@pytest.mark.parametrize("use_sel", [False, True], ids=["nosel", "sel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_grad_wrt_values_and_x(cfg, dtype, use_sel, rng, seed):
    sw = sparse_weight(rng, cfg, dtype, (E, K, M))
    rows, tokens = 37, 23
    gs, sel = routing(rng, rows, tokens, use_sel)
    x = rand(rng, (tokens if use_sel else rows, K), dtype)
    ct = rand(rng, (rows, M), dtype)

    def loss(x, values):
        y = sj.ragged_dot(x, with_values(sw, values), gs, sel)
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

    want_v = ref_dvalues(x, ct, sw, gs, sel)
    want_x = ref_dx(ct, dense64(sw), gs, sel, x.shape[0])
    msg = f"seed={seed} {cfg_id(cfg)} gs={gs.tolist()}"
    for name, fn in [("grad", jax.grad(loss, (0, 1))), ("jit", jax.jit(jax.grad(loss, (0, 1))))]:
        gx, gv = fn(x, sw.values)
        check_grad(gv, want_v, dtype, "product_row", f"{msg} {name} dvalues")
        check_grad(gx, want_x, dtype, "product_row", f"{msg} {name} dx")


def ref_dx(ct, w64, gs, sel, tokens):
    """float64 d/dx of sum(ragged_dot(x, W, gs, sel) * ct)."""
    dx = np.zeros((tokens, w64.shape[1]))
    for e, r, t in routed_rows(gs, len(ct), sel, tokens):
        dx[t] += w64[e] @ f64(ct[r])
    return dx


def test_grad_wrt_values_through_dot(rng, seed):
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(2, 4, 32)
    sw = sparse_weight(rng, cfg, dtype, (K, M))
    x, ct = rand(rng, (3, 5, K), dtype), rand(rng, (3, 5, M), dtype)
    g = jax.jit(jax.grad(lambda v: jnp.sum(sj.dot(x, with_values(sw, v)).astype(jnp.float32)
                                           * ct.astype(jnp.float32))))(sw.values)
    one = lambda a: a[None]
    sw1 = sj.SparseWeight.unchecked(one(sw.values), one(sw.indices), one(sw.metadata), cfg)
    want = ref_dvalues(x.reshape(15, K), ct.reshape(15, M), sw1, np.array([15]))[0]
    check_grad(g, want, dtype, "product_row", f"seed={seed}")


def test_grad_wrt_the_sparse_weight_pytree(rng, seed):
    """jax.grad of a SparseWeight argument (allow_int): the values get their gradient, the
    sub-row indices and metadata a float0 zero."""
    dtype = jnp.float16
    cfg = sj.SparsityConfig(1, 2, 64)
    sw = sparse_weight(rng, cfg, dtype, (E, K, M))
    gs, sel = routing(rng, 30, 20, True)
    x, ct = rand(rng, (20, K), dtype), rand(rng, (30, M), dtype)
    g = jax.grad(lambda s: jnp.sum(sj.ragged_dot(x, s, gs, sel).astype(jnp.float32)
                                   * ct.astype(jnp.float32)), allow_int=True)(sw)
    assert isinstance(g, sj.SparseWeight)
    assert g.indices.dtype == jax.dtypes.float0 and g.metadata.dtype == jax.dtypes.float0
    check_grad(g.values, ref_dvalues(x, ct, sw, gs, sel), dtype, "product_row", f"seed={seed}")


# --- the fused GLU ------------------------------------------------------------------------

@pytest.mark.parametrize("stacked", [False, True], ids=["concat", "stacked"])
@pytest.mark.parametrize("glu", ["silu", "gelu"])
def test_grad_wrt_values_fused_glu(glu, stacked, rng, seed):
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(1, 2, 64)
    f = 64
    sw = sparse_weight(rng, cfg, dtype, (E, K, 2 * f))
    rows, tokens = 29, 19
    gs, sel = routing(rng, rows, tokens, True)
    x = rand(rng, (tokens, K), dtype)
    ct = rand(rng, (rows, f), dtype)
    w = sj.layout.stack_gate_up(sw) if stacked else sw

    def loss(values):
        y = sj.ragged_dot(x, with_values(w, values), gs, sel, glu=glu)
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

    g = jax.jit(jax.grad(loss))(w.values)
    # float64: d/d[g|u] of sum(act(g) * u * ct), then the values' gradient of the product.
    y64 = ref_ragged_dot(x, dense64(sw), gs, sel)
    g64, u64, ct64 = y64[:, :f], y64[:, f:], f64(ct)
    dgu = np.concatenate([act_grad(g64, glu) * u64 * ct64, act(g64, glu) * ct64], axis=1)
    want = ref_dvalues(x, dgu, sw, gs, sel)
    check_grad(g.reshape(want.shape), want, dtype, "grad", f"seed={seed} {glu} {stacked}")


def act_grad(h: np.ndarray, activation: str) -> np.ndarray:
    """The derivative of helpers.act in float64."""
    if activation == "silu":
        s = 1 / (1 + np.exp(-h))
        return s * (1 + h * (1 - s))
    cdf = 0.5 * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    return cdf + h * np.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)


# --- the layer ------------------------------------------------------------------------------

def _layer_case(rng, activation="silu", shared=0):
    cfg = sj.MoEConfig(num_experts=4, top_k=2, d_model=128, d_ff=128, router="mixtral",
                       activation=activation, num_shared_experts=shared,
                       sparsity=sj.SparsityConfig(1, 2, 32))
    dense = dense_layer(rng, cfg, jnp.bfloat16)
    return cfg, sj.sparsify_moe(dense, cfg)


def test_grad_through_the_layer(rng, seed):
    """jax.grad of the sparse layer w.r.t. its kept values (gate_up, down), the router and
    x, against JAX's gradient of the dense twin in float32 on the decoded weights (the
    same routing), read at the stored positions."""
    cfg, sparse = _layer_case(rng)
    x = rand(rng, (40, cfg.d_model), jnp.bfloat16)
    ct = rng.standard_normal((40, cfg.d_model)).astype(np.float32)

    def loss(p, x):
        return jnp.sum(sj.moe(p, x, cfg).astype(jnp.float32) * ct)

    g, gx = jax.jit(jax.grad(loss, (0, 1), allow_int=True))(sparse, x)
    dense32 = jax.tree.map(lambda a: a.astype(jnp.float32), sj.decode_moe(sparse, cfg))

    def loss_dense(p, x):
        return jnp.sum(sj.moe_dense(p, x, cfg) * ct)

    gd, gxd = jax.grad(loss_dense, (0, 1))(dense32, x.astype(jnp.float32))
    msg = f"seed={seed}"
    gu_dense = np.concatenate([np.asarray(gd["gate"]), np.asarray(gd["up"])], axis=-1)
    for key, dw in (("gate_up", gu_dense), ("down", np.asarray(gd["down"]))):
        k, m = kept_positions(sparse[key])
        want = np.stack([dw[e][k[e], m[e]] for e in range(cfg.num_experts)])
        check_grad(g[key].values, want, jnp.bfloat16, "grad", f"{msg} {key}")
        assert g[key].indices.dtype == jax.dtypes.float0
    check_grad(g["router"], np.asarray(gd["router"]), jnp.bfloat16, "grad", f"{msg} router")
    check_grad(gx, np.asarray(gxd), jnp.bfloat16, "grad", f"{msg} x")


def test_grad_through_the_layer_on_a_mesh(rng, seed):
    """jax.jit(jax.grad) of the layer on placed parameters (data x expert x tensor mesh of
    8 CPU devices): the same values' gradients as on one device, bit for bit (the CPU
    dvalues handler has no partitioning rule: it runs whole on every device)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if len(jax.devices("cpu")) < 8:
        pytest.skip("needs 8 CPU devices (tests/conftest.py sets them)")
    cfg, sparse = _layer_case(rng)
    x = rand(rng, (32, cfg.d_model), jnp.bfloat16)
    ct = rng.standard_normal((32, cfg.d_model)).astype(np.float32)
    loss = lambda p, x: jnp.sum(sj.moe(p, x, cfg).astype(jnp.float32) * ct)
    grad = jax.jit(jax.grad(loss, allow_int=True))
    want = grad(sparse, x)
    mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 2, 2), ("data", "expert", "model"))
    placed = sj.shard_params(sparse, mesh, expert_axis="expert", tensor_axis="model")
    got = grad(placed, jax.device_put(x, NamedSharding(mesh, P("data"))))
    for key in ("gate_up", "down"):
        np.testing.assert_array_equal(
            np.asarray(got[key].values).reshape(want[key].values.shape),
            np.asarray(want[key].values), err_msg=f"seed={seed} {key}")


# --- jit, vmap, higher derivatives -----------------------------------------------------

def test_vmap_of_grad_wrt_values(rng, seed):
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(1, 4, 64)
    sw = sparse_weight(rng, cfg, dtype, (E, K, M))
    b, rows, tokens = 3, 18, 12
    x = rand(rng, (b, tokens, K), dtype)
    ct = rand(rng, (b, rows, M), dtype)
    pairs = [routing(rng, rows, tokens, True) for _ in range(b)]
    gs = jnp.stack([p[0] for p in pairs])
    sel = jnp.stack([p[1] for p in pairs])

    def loss(values, x, gs, sel, ct):
        y = sj.ragged_dot(x, with_values(sw, values), gs, sel)
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

    g = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0, 0)))(sw.values, x, gs, sel, ct)
    assert g.shape == (b, *sw.values.shape)
    for i in range(b):
        check_grad(g[i], ref_dvalues(x[i], ct[i], sw, gs[i], sel[i]), dtype, "product_row",
                   f"seed={seed} member {i}")


def test_second_order_wrt_values_and_x(rng, seed):
    """loss = |y|^2 / 2 with y = P(x, V) bilinear: the Hessian-vector product in V is
    D(x, P(x, U)) (forward-over-reverse and reverse-over-reverse), and the mixed one
    d/dx <grad_V loss, U> = dx of <P(x, V), P(x, U)>: the dvalues primitive's JVP and
    both of its transposes."""
    dtype = jnp.float16
    cfg = sj.SparsityConfig(1, 2, 32)
    sw = sparse_weight(rng, cfg, dtype, (E, K, M), scale=0.5)
    rows, tokens = 16, 12
    gs, sel = routing(rng, rows, tokens, True)
    x = rand(rng, (tokens, K), dtype, 0.5)
    u = with_values(sw, rand(rng, sw.values.shape, dtype, 0.5))

    def loss(values, x):
        y = sj.ragged_dot(x, with_values(sw, values), gs, sel).astype(jnp.float32)
        return 0.5 * jnp.sum(y ** 2)

    grad_v = jax.grad(loss)
    w64, u64 = dense64(sw), dense64(u)
    yu = ref_ragged_dot(x, u64, gs, sel)
    want_hv = ref_dvalues(x, yu, sw, gs, sel)
    fwd_rev = jax.jit(lambda v, t: jax.jvp(lambda a: grad_v(a, x), (v,), (t,))[1])(
        sw.values, u.values)
    rev_rev = jax.jit(jax.grad(lambda v: jnp.vdot(grad_v(v, x).astype(jnp.float32),
                                                  u.values.astype(jnp.float32))))(sw.values)
    msg = f"seed={seed} gs={gs.tolist()}"
    bound = 2 * tol("product_row", dtype)  # two products: D(x, P(x, U))
    for name, hv in (("fwd-over-rev", fwd_rev), ("rev-over-rev", rev_rev)):
        err = rel_err(hv, want_hv)
        assert err <= bound, f"{msg} {name}: relative error {err:.3g}"
    mixed = jax.jit(jax.grad(lambda x: jnp.vdot(grad_v(sw.values, x).astype(jnp.float32),
                                                u.values.astype(jnp.float32))))(x)
    yw = ref_ragged_dot(x, w64, gs, sel)
    want_mixed = ref_dx(yu, w64, gs, sel, tokens) + ref_dx(yw, u64, gs, sel, tokens)
    err = rel_err(mixed, want_mixed)
    assert err <= bound, f"{msg} mixed: relative error {err:.3g}"


# --- the backward primitives: CPU handler, XLA path, bad routing, determinism -------------

@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_cpu_handler_and_xla_path_agree(cfg, rng, seed):
    """dvalues and dx rows on the CPU handler and on the XLA path (what CUDA runs today),
    with the in-bounds meaning of bad routing: a sel entry outside [0, T) is a zero row,
    negative or oversized group sizes are clipped."""
    dtype = jnp.bfloat16
    sw = sparse_weight(rng, cfg, dtype, (E, K, M))
    rows, tokens = 45, 21
    x, ct = rand(rng, (tokens, K), dtype), rand(rng, (rows, M), dtype)
    sel = np.asarray(rng.integers(0, tokens, rows), np.int32)
    sel[[2, 7]] = [-1, tokens]
    args = (sw.indices, sw.metadata, jnp.asarray(sel))
    for gs in ([10, 0, 25, 7], [6, -3, 40, 9], [3, 2**31 - 1, 1, 1]):
        gs = jnp.asarray(gs, jnp.int32)
        msg = f"seed={seed} {cfg_id(cfg)} gs={gs.tolist()}"
        want = ref_dvalues(x, ct, sw, gs, sel)
        cpu = jax.jit(backward.dvalues, static_argnames=("config", "has_sel"))(
            x, ct, *args, gs, config=cfg, has_sel=True)
        clipped = backward._clipped(gs, rows)
        xla = jax.jit(backward.dvalues_xla, static_argnames=("config", "has_sel"))(
            x, ct, *args, clipped, config=cfg, has_sel=True)
        for name, got in (("cpu", cpu), ("xla", xla)):
            assert got.dtype == jnp.float32 and got.shape == want.shape, f"{msg} {name}"
            err = rel_err(got, want)
            assert err <= 1e-5, f"{msg} {name} dvalues: relative error {err:.3g}"
        dx = jax.jit(backward.dx_rows, static_argnames="config")(
            ct, sw.values, sw.indices, sw.metadata, gs, config=cfg)
        dx_xla = jax.jit(backward.dx_xla, static_argnames="config")(
            ct, sw.values, sw.indices, sw.metadata, clipped, config=cfg)
        valid = int(np.asarray(clipped).sum())
        assert not np.asarray(dx)[valid:].any(), f"{msg}: dx rows past the groups"
        np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_xla), rtol=1e-5, atol=1e-4,
                                   err_msg=msg)


def test_backward_is_deterministic_over_threads(rng, seed, monkeypatch):
    """The same bits on every run and for any thread count of the CPU handler."""
    dtype = jnp.bfloat16
    cfg = sj.SparsityConfig(1, 2, 64)
    sw = sparse_weight(rng, cfg, dtype, (E, K, M))
    rows, tokens = 200, 90
    gs, sel = routing(rng, rows, tokens, True, short=False)
    x, ct = rand(rng, (tokens, K), dtype), rand(rng, (rows, M), dtype)

    def grads():
        f = lambda x, v: jnp.sum(sj.ragged_dot(x, with_values(sw, v), gs, sel)
                                 .astype(jnp.float32) * ct.astype(jnp.float32))
        return [np.asarray(a) for a in jax.jit(jax.grad(f, (0, 1)))(x, sw.values)]

    first = grads()
    monkeypatch.setenv("SAMOYEDS_CPU_THREADS", "1")
    for a, b in zip(first, grads()):
        np.testing.assert_array_equal(a, b, err_msg=f"seed={seed}")


def test_backward_refuses_bad_shapes():
    cfg = sj.SparsityConfig(1, 2, 32)
    sw = sj.encode(sj.prune(jnp.ones((2, 64, 32), jnp.bfloat16), cfg), cfg)
    x = jnp.ones((4, 64), jnp.bfloat16)
    gs = jnp.asarray([2, 2], jnp.int32)
    no_sel = jnp.zeros((0,), jnp.int32)
    with pytest.raises(ValueError, match=r"dvalues: ct bfloat16\[4, 16\] must be \[R, M=32\]"):
        backward.dvalues(x, jnp.ones((4, 16), jnp.bfloat16), sw.indices, sw.metadata, no_sel,
                         gs, config=cfg, has_sel=False)
    with pytest.raises(ValueError, match="without sel, x .* and ct .* must have the same rows"):
        backward.dvalues(x, jnp.ones((3, 32), jnp.bfloat16), sw.indices, sw.metadata, no_sel,
                         gs, config=cfg, has_sel=False)
    with pytest.raises(TypeError, match="dx: ct float32"):
        backward.dx_rows(jnp.ones((4, 32), jnp.float32), sw.values, sw.indices, sw.metadata,
                         gs, config=cfg)


@pytest.mark.skipif(not _samoyeds.HAS_CUDA, reason="a build without the CUDA handlers")
def test_cuda_lowering_calls_the_cuda_handlers_unless_switched_off(rng):
    """Lowered for CUDA (no GPU needed): the gradient calls the backward CUDA targets
    with the CPU handlers' operands; inside xla_backward_on_cuda it runs the XLA path."""
    from jax import export

    cfg = sj.SparsityConfig(1, 2, 32)
    sw = sparse_weight(rng, cfg, jnp.bfloat16, (2, 64, 32))
    x, ct = rand(rng, (10, 64), jnp.bfloat16), rand(rng, (10, 32), jnp.bfloat16)
    gs = jnp.asarray([4, 5], jnp.int32)
    targets = (backward.DX_TARGET, backward.DVALUES_TARGET)

    def called():
        loss = lambda x, v: jnp.sum(sj.ragged_dot(x, with_values(sw, v), gs).astype(
            jnp.float32) * ct.astype(jnp.float32))
        checks = [export.DisabledSafetyCheck.custom_call(t) for t in targets]
        text = export.export(jax.jit(jax.grad(loss, (0, 1))), platforms=["cuda"],
                             disabled_checks=checks)(x, sw.values).mlir_module()
        return set(re.findall(r"custom_call @(\w+)", text))

    assert set(targets) <= called()
    with backward.xla_backward_on_cuda():
        assert not set(targets) & called()
    assert set(targets) <= called()


def _backward_buffers(rng):
    """Consistent buffers of both backward FFI targets (E=2, K=64, M=32, 1:2, L=32)."""
    cfg = sj.SparsityConfig(1, 2, 32)
    sw = sparse_weight(rng, cfg, jnp.bfloat16, (2, 64, 32))
    rows, tokens = 10, 7
    return dict(
        x=rand(rng, (tokens, 64), jnp.bfloat16), ct=rand(rng, (rows, 32), jnp.bfloat16),
        values=sw.values, indices=sw.indices, metadata=sw.metadata,
        sel=jnp.asarray(rng.integers(0, tokens, rows), jnp.int32),
        gs=jnp.asarray([4, 5], jnp.int32), n=1, v=2, sub_row=32, has_sel=1,
        dx_out=jax.ShapeDtypeStruct((rows, 64), jnp.float32),
        dv_out=jax.ShapeDtypeStruct((2, 16, 32), jnp.float32)), sw


def _call_dx(b):
    f = jax.ffi.ffi_call(backward.DX_TARGET, b["dx_out"])
    return jax.block_until_ready(f(b["ct"], b["values"], b["indices"], b["metadata"], b["gs"],
                                   n=np.int64(b["n"]), v=np.int64(b["v"]),
                                   sub_row=np.int64(b["sub_row"])))


def _call_dvalues(b):
    f = jax.ffi.ffi_call(backward.DVALUES_TARGET, b["dv_out"])
    return jax.block_until_ready(f(b["x"], b["ct"], b["indices"], b["metadata"], b["sel"],
                                   b["gs"], n=np.int64(b["n"]), v=np.int64(b["v"]),
                                   sub_row=np.int64(b["sub_row"]),
                                   has_sel=np.int64(b["has_sel"])))


BACKWARD_REFUSALS = {
    "config": (dict(v=3), "unsupported config n=1 v=3 sub_row=32", "both"),
    "ct_columns": (dict(ct=jnp.ones((10, 16), jnp.bfloat16)),
                   "ct must be [R, M] with M=32, got [10, 16]", "both"),
    "dtype_mix": (dict(ct=jnp.ones((10, 32), jnp.float16)), "must both be bfloat16 or both "
                  "float16", "both"),
    "metadata_shape": (dict(metadata=jnp.zeros((2, 16, 1), jnp.uint32)),
                       "metadata must be [E, Mk, K/32] = [2, 16, 2], got [2, 16, 1]", "both"),
    "negative_size": (dict(gs=jnp.asarray([-1, 5], jnp.int32)),
                      "group_sizes[0] is negative", "both"),
    "sizes_past_rows": (dict(gs=jnp.asarray([6, 5], jnp.int32)),
                        "sum(group_sizes)=11 exceeds the R=10 rows", "both"),
    "index_ge_v": (dict(indices=None), "is not below V=2", "both"),
    "dx_out": (dict(dx_out=jax.ShapeDtypeStruct((10, 32), jnp.float32)),
               "out must be float32 [R, K], got [10, 32]", "dx"),
    "sel_rows": (dict(sel=jnp.zeros((9,), jnp.int32)), "sel must be [R] = [10], got [9]",
                 "dvalues"),
    "dv_out": (dict(dv_out=jax.ShapeDtypeStruct((2, 16, 16), jnp.float32)),
               "out must be float32 [E, Mk, K/2], got [2, 16, 16]", "dvalues"),
}


@pytest.mark.parametrize("case", list(BACKWARD_REFUSALS))
def test_backward_handlers_refuse_inconsistent_buffers(case, rng, seed):
    """The CPU handlers called directly (bypassing the shape rules): INVALID_ARGUMENT
    naming the buffer, never a read out of bounds; consistent buffers give the library's
    result."""
    b, sw = _backward_buffers(rng)
    cfg = sw.config
    dx = _call_dx(b)
    want = backward.dx_xla(b["ct"], sw.values, sw.indices, sw.metadata, b["gs"], config=cfg)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(want), rtol=1e-5, atol=1e-5)
    dv = _call_dvalues(b)
    np.testing.assert_allclose(np.asarray(dv), ref_dvalues(b["x"], b["ct"], sw, b["gs"], b["sel"]),
                               rtol=1e-5, atol=1e-5)
    change, words, which = BACKWARD_REFUSALS[case]
    if "indices" in change:
        change = dict(indices=sw.indices.at[1, 3, 0].set(2))
    b.update(change)
    for name, fn in (("dx", _call_dx), ("dvalues", _call_dvalues)):
        if which not in ("both", name):
            continue
        with pytest.raises((jax.errors.JaxRuntimeError, ValueError),
                           match=re.escape(words)) as info:
            fn(b)
        assert "INVALID_ARGUMENT" in str(info.value), f"seed={seed} {name}"


# --- training the nnx module ---------------------------------------------------------------

def test_nnx_module_trains_with_optax(rng, seed):
    """A few hundred Adam steps on the kept values (and the router) of a SparseMoE fit a
    target layer's outputs: the loss falls well below where it started."""
    flax = pytest.importorskip("flax")
    optax = pytest.importorskip("optax")
    from flax import nnx
    from samoyeds_jax.flax import SparseMoE, SparseParam, SparseValues

    del flax
    cfg = sj.MoEConfig(num_experts=4, top_k=2, d_model=64, d_ff=64,
                       sparsity=sj.SparsityConfig(1, 2, 32))
    target = SparseMoE(cfg, nnx.Rngs(int(rng.integers(2**31))))
    model = SparseMoE(cfg, nnx.Rngs(int(rng.integers(2**31))), param_dtype=jnp.float32)
    # The same pattern as the target's: only the values can reach it.
    for key in ("gate_up", "down"):
        for part in ("indices", "metadata"):
            name = f"{key}_{part}"
            getattr(model, name)[...] = getattr(target, name)[...]
    x = rand(rng, (64, cfg.d_model), jnp.bfloat16)
    y = target(x).astype(jnp.float32)
    before = {n: np.asarray(getattr(model, f"{n}_indices")[...]) for n in ("gate_up", "down")}
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean((m(x).astype(jnp.float32) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(300)]
    msg = f"seed={seed} loss {losses[0]:.4g} -> {losses[-1]:.4g}"
    assert np.isfinite(losses).all(), msg
    assert losses[-1] < 0.2 * losses[0], msg
    assert isinstance(model.down_values, SparseValues)
    assert isinstance(model.down_indices, SparseParam)
    for n, idx in before.items():   # the pattern is state, never trained
        np.testing.assert_array_equal(np.asarray(getattr(model, f"{n}_indices")[...]), idx)


# --- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_gpu_grad_wrt_values_and_x(cfg, rng, seed):
    """On the GPU: the forward kernels, dx and dvalues (the CUDA handlers of
    samoyeds_jax.backward where the build has them) against float64."""
    dtype = jnp.bfloat16
    gpu = jax.devices("gpu")[0]
    sw = jax.device_put(sparse_weight(rng, cfg, dtype, (E, K, M)), gpu)
    rows, tokens = 300, 170
    gs, sel = routing(rng, rows, tokens, True)
    x, ct = rand(rng, (tokens, K), dtype), rand(rng, (rows, M), dtype)

    def loss(x, values):
        y = sj.ragged_dot(x, with_values(sw, values), gs, sel)
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

    with jax.default_device(gpu):
        gx, gv = jax.jit(jax.grad(loss, (0, 1)))(jax.device_put(x, gpu), sw.values)
    assert gv.devices() == {gpu}
    msg = f"seed={seed} {cfg_id(cfg)}"
    check_grad(gv, ref_dvalues(x, ct, sw, gs, sel), dtype, "product_row", f"{msg} dvalues")
    check_grad(gx, ref_dx(ct, dense64(sw), gs, sel, tokens), dtype, "product_row", f"{msg} dx")


@pytest.mark.gpu
def test_gpu_grad_through_the_layer_matches_cpu(rng, seed):
    cfg, sparse = _layer_case(rng)
    x = rand(rng, (64, cfg.d_model), jnp.bfloat16)
    ct = rng.standard_normal((64, cfg.d_model)).astype(np.float32)
    loss = lambda p, x: jnp.sum(sj.moe(p, x, cfg).astype(jnp.float32) * ct)
    g_cpu = jax.jit(jax.grad(loss, allow_int=True))(sparse, x)
    gpu = jax.devices("gpu")[0]
    g_gpu = jax.jit(jax.grad(loss, allow_int=True))(jax.device_put(sparse, gpu),
                                                    jax.device_put(x, gpu))
    for key in ("gate_up", "down"):
        err = rel_err(g_gpu[key].values, f64(g_cpu[key].values))
        assert err <= tol("grad", jnp.bfloat16), f"seed={seed} {key}: {err:.3g}"

