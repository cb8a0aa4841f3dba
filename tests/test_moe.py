"""samoyeds_jax.moe: the sparse MoE layer against a float64 numpy MoE written here.

The reference routes with its own softmax/top-k, loops over tokens and choices, and uses
the decoded weights np.asarray(sj.decode(...)); it never calls the library's dispatch.
Inputs are fresh random normals (no zeros) from the per-test seed printed by conftest.
Tolerances: ``layer`` / ``layer_row`` against float64, ``twin`` against the dense twin,
``reordered`` between two programs (tests/helpers.py says why each).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import samoyeds_jax as sj
from helpers import DTYPES, act, dense_layer, f64, rand, tol

# d = f = 128 fits every pattern (K a multiple of 128, M of 64); tests cycle through them.
SPARSITY = [sj.SparsityConfig(1, 2, 64), sj.SparsityConfig(2, 4, 32),
            sj.SparsityConfig(1, 4, 128), sj.SparsityConfig(1, 1, 32)]
D, F = 128, 128
EK = [(1, 1), (8, 1), (8, 2), (8, 4), (8, 8), (64, 1), (64, 2), (64, 4), (64, 8)]

decode_jit = jax.jit(sj.decode)


def dtype_id(dt):
    return jnp.dtype(dt).name


# --- the float64 reference of the layer -------------------------------------------------

def softmax(z):
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def ref_route(router, x2, cfg):
    """Per token: (expert ids, weights) and the logit gap at the top-k boundary."""
    logits = f64(x2) @ f64(router)
    out, gaps = [], []
    for t in range(logits.shape[0]):
        idx = np.argsort(-logits[t], kind="stable")[:cfg.top_k]
        if cfg.router == "mixtral":
            w = softmax(logits[t, idx])
        else:
            w = softmax(logits[t])[idx]
        out.append((idx, w))
        srt = np.sort(logits[t])[::-1]
        gaps.append(srt[cfg.top_k - 1] - srt[cfg.top_k] if cfg.top_k < len(srt) else np.inf)
    return out, np.asarray(gaps)


def ref_moe(sparse, x, cfg):
    """float64 MoE on the decoded sparse weights: loops over tokens and choices."""
    d, f = cfg.d_model, cfg.d_ff
    gate_up = f64(decode_jit(sparse["gate_up"]))
    gate, up = gate_up[..., :f], gate_up[..., f:]
    down = f64(decode_jit(sparse["down"]))
    x2 = f64(x).reshape(-1, d)
    routes, _ = ref_route(sparse["router"], x2, cfg)
    out = np.zeros_like(x2)
    for t, (idx, w) in enumerate(routes):
        for j, e in enumerate(idx):
            h = act(x2[t] @ gate[e], cfg.activation) * (x2[t] @ up[e])
            out[t] += w[j] * (h @ down[e])
    if cfg.has_shared:
        h = act(x2 @ f64(sparse["shared_gate"]), cfg.activation) * (x2 @ f64(sparse["shared_up"]))
        s = h @ f64(sparse["shared_down"])
        if cfg.shared_expert_gate:
            s = s / (1 + np.exp(-(x2 @ f64(sparse["shared_expert_gate"]))))
        out += s
    return out.reshape(np.shape(x))


def check(y, ref, dtype, msg, whole=None, row_tol=None):
    dtype = jnp.dtype(dtype)
    assert y.dtype == dtype, f"{msg}: dtype {y.dtype} != {dtype}"
    assert y.shape == ref.shape, f"{msg}: shape {y.shape} != {ref.shape}"
    y64 = f64(y).reshape(-1, ref.shape[-1])
    r = ref.reshape(-1, ref.shape[-1])
    assert np.isfinite(y64).all(), f"{msg}: non-finite output"
    bound = tol("layer", dtype) if whole is None else whole
    err = np.linalg.norm(y64 - r) / np.linalg.norm(r)
    assert err <= bound, f"{msg}: relative error {err:.3g} > {bound}"
    row_tol = tol("layer_row", dtype) if row_tol is None else row_tol
    rows = np.linalg.norm(y64 - r, axis=-1) / np.linalg.norm(r, axis=-1)
    assert rows.max() <= row_tol, \
        f"{msg}: token {int(rows.argmax())} relative error {rows.max():.3g} > {row_tol}"


def draw_layer(rng, cfg, dtype, tokens, hot=None):
    """Dense params and x whose routing has a clear top-k boundary (so float32 and float64
    pick the same experts): the router is redrawn until every token's gap > 1e-3."""
    for _ in range(50):
        dense = dense_layer(rng, cfg, dtype)
        x = rand(rng, tokens, dtype)
        if hot is not None:  # a constant feature that the hot expert's router column loves
            x = x.at[..., 0].set(4.0)
            dense["router"] = dense["router"].at[0, hot].set(5.0)
        _, gaps = ref_route(dense["router"], f64(x).reshape(-1, cfg.d_model), cfg)
        if gaps.min() > 1e-3:
            return dense, x
    raise AssertionError("could not draw a router without near-ties")


def make_cfg(e, k, router="mixtral", sparsity=SPARSITY[0], **kw):
    return sj.MoEConfig(num_experts=e, top_k=k, d_model=D, d_ff=F, router=router,
                        sparsity=sparsity, **kw)


# --- the layer against the reference ------------------------------------------------------

@pytest.mark.parametrize("ek", EK, ids=[f"E{e}-k{k}" for e, k in EK])
@pytest.mark.parametrize("router", ["mixtral", "softmax_topk"])
def test_layer_vs_numpy(router, ek, rng, seed):
    e, k = ek
    # The pattern follows E and the dtype the router, so that prune/decode compile once
    # per (E, dtype) while every pattern and both dtypes are covered.
    dtype = DTYPES[router == "mixtral"]
    cfg = make_cfg(e, k, router, SPARSITY[(e.bit_length() + (router == "mixtral")) % 4])
    dense, x = draw_layer(rng, cfg, dtype, (24, D))
    sparse = sj.sparsify_moe(dense, cfg)
    y = sj.moe(sparse, x, cfg)
    check(y, ref_moe(sparse, x, cfg), dtype,
          f"seed={seed} {router} E={e} k={k} {dtype_id(dtype)} {cfg.sparsity}")


SHARED_CASES = {
    "deepseek-like": dict(router="softmax_topk", num_shared_experts=2),
    "qwen-like": dict(router="softmax_topk", num_shared_experts=1, d_ff_shared=256,
                      shared_expert_gate=True),
    "mixtral-gelu-shared": dict(router="mixtral", activation="gelu", num_shared_experts=1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(SHARED_CASES))
def test_shared_experts_vs_numpy(case, dtype, rng, seed):
    cfg = make_cfg(8, 2, sparsity=SPARSITY[1], **SHARED_CASES[case])
    dense, x = draw_layer(rng, cfg, dtype, (20, D))
    sparse = sj.sparsify_moe(dense, cfg)
    assert sparse["shared_gate"].shape == (D, cfg.d_ff_shared)
    check(sj.moe(sparse, x, cfg), ref_moe(sparse, x, cfg), dtype,
          f"seed={seed} {case} {dtype_id(dtype)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("router", ["mixtral", "softmax_topk"])
def test_uneven_routing_hot_expert(router, dtype, rng, seed):
    cfg = make_cfg(8, 2, router, SPARSITY[2])
    hot = int(rng.integers(0, 8))
    dense, x = draw_layer(rng, cfg, dtype, (32, D), hot=hot)
    _, experts = sj.route(dense["router"], x, cfg)
    assert (np.asarray(experts)[:, 0] == hot).all(), f"seed={seed}: expert {hot} is not hot"
    sparse = sj.sparsify_moe(dense, cfg)
    check(sj.moe(sparse, x, cfg), ref_moe(sparse, x, cfg), dtype,
          f"seed={seed} hot={hot} {router} {dtype_id(dtype)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_batch_dims_under_outer_jit(dtype, rng, seed):
    cfg = make_cfg(8, 2, "mixtral", SPARSITY[3], num_shared_experts=1)
    dense, x = draw_layer(rng, cfg, dtype, (3, 5, D))
    sparse = sj.sparsify_moe(dense, cfg)

    @jax.jit
    def block(p, x):  # the layer inside a bigger jitted program, cfg closed over
        return x + sj.moe(p, x, cfg)

    y = block(sparse, x)
    assert y.shape == (3, 5, D)
    ref = f64(x) + ref_moe(sparse, x, cfg)
    check(y, ref, dtype, f"seed={seed} [B,S,d] {dtype_id(dtype)}")
    # The same tokens flattened give the same result (up to summation order: another
    # program may order float32 sums differently).
    flat = sj.moe(sparse, x.reshape(15, D), cfg)
    check(sj.moe(sparse, x, cfg).reshape(15, D), f64(flat), dtype, f"seed={seed} flat",
          whole=tol("reordered", dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_sparse_equals_dense_twin_on_pruned(dtype, rng, seed):
    cfg = make_cfg(8, 4, "softmax_topk", SPARSITY[0], num_shared_experts=1,
                   shared_expert_gate=True)
    dense, x = draw_layer(rng, cfg, dtype, (2, 16, D))
    sparse = sj.sparsify_moe(dense, cfg)
    pruned = sj.prune_moe(dense, cfg)
    # decode(encode(prune)) is exact, gate and up pruned separately.
    dec = sj.decode_moe(sparse, cfg)
    for key in pruned:
        np.testing.assert_array_equal(np.asarray(dec[key]), np.asarray(pruned[key]),
                                      err_msg=f"seed={seed} {key}")
    np.testing.assert_array_equal(np.asarray(pruned["gate"]),
                                  np.asarray(sj.prune(dense["gate"], cfg.sparsity)))
    y = sj.moe(sparse, x, cfg)
    y_twin = sj.moe_dense(pruned, x, cfg)
    check(y, f64(y_twin), dtype, f"seed={seed} sparse vs twin {dtype_id(dtype)}",
          whole=tol("twin", dtype), row_tol=tol("layer_row", dtype))
    # The twin on pruned weights is itself right; on the unpruned weights it differs a lot.
    check(y_twin, ref_moe(sparse, x, cfg), dtype, f"seed={seed} twin vs numpy")
    y_orig = f64(sj.moe_dense(dense, x, cfg))
    assert np.linalg.norm(y_orig - f64(y_twin)) > 0.05 * np.linalg.norm(y_orig)


def test_float32_input_and_grad(rng, seed):
    """x in float32 runs the experts in the weights' dtype and returns float32; gradients
    w.r.t. x and the router flow through the sparse layer like through its twin."""
    cfg = make_cfg(8, 2, "mixtral", SPARSITY[0])
    dense, x = draw_layer(rng, cfg, jnp.bfloat16, (8, D))
    sparse, pruned = sj.sparsify_moe(dense, cfg), sj.prune_moe(dense, cfg)
    x32 = x.astype(jnp.float32)
    y = sj.moe(sparse, x32, cfg)
    assert y.dtype == jnp.float32
    ct = jnp.asarray(rng.standard_normal((8, D)), jnp.float32)

    def loss(fn, params):
        def f(x, router):
            return (fn({**params, "router": router}, x, cfg) * ct).sum()
        return jax.grad(f, argnums=(0, 1))(x32, params["router"].astype(jnp.float32))

    gx, gr = loss(sj.moe, sparse)
    gx_ref, gr_ref = loss(sj.moe_dense, pruned)
    for name, a, b in (("dx", gx, gx_ref), ("drouter", gr, gr_ref)):
        a, b = f64(a), f64(b)
        assert np.isfinite(a).all() and np.abs(a).sum() > 0, f"seed={seed} {name}"
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert err < tol("grad", jnp.bfloat16), f"seed={seed} {name} relative error {err:.3g}"


# --- dispatch invariants (hypothesis) -------------------------------------------------------

@st.composite
def routings(draw):
    # A few shapes only: every new shape compiles dispatch again.
    e = draw(st.sampled_from([1, 3, 8]))
    k = draw(st.sampled_from([j for j in (1, 2, 4) if j <= e]))
    t = draw(st.sampled_from([1, 5, 12]))
    distinct = draw(st.booleans())
    rows = []
    for _ in range(t):
        if distinct:  # top-k style: k distinct experts per token
            rows.append(draw(st.permutations(range(e)))[:k])
        else:
            rows.append(draw(st.lists(st.integers(0, e - 1), min_size=k, max_size=k)))
    return np.asarray(rows, np.int32).reshape(t, k), e


HYP = settings(deadline=None, max_examples=30)
dispatch_jit = jax.jit(sj.dispatch, static_argnums=1)


@functools.partial(jax.jit, static_argnums=3)
def identity_layer(experts, x, w, num_experts):
    """dispatch -> identity experts (y = x[sel]) -> combine."""
    sel, _, order = sj.dispatch(experts, num_experts)
    return sj.combine(x[sel], w, order)


@HYP
@given(routings())
def test_dispatch_invariants(case):
    experts, e = case
    t, k = experts.shape
    sel, gs, order = (np.asarray(a) for a in dispatch_jit(jnp.asarray(experts), e))
    assert sel.dtype == gs.dtype == np.int32 and sel.shape == (t * k,) and gs.shape == (e,)
    # order is a permutation of the flat (token, choice) pairs; sel is their token.
    assert sorted(order.tolist()) == list(range(t * k))
    pairs = sorted(zip(sel.tolist(), (order % k).tolist()))
    assert pairs == [(tt, j) for tt in range(t) for j in range(k)]
    np.testing.assert_array_equal(sel, order // k)
    # Rows are grouped by expert, stably, and group sizes count them.
    assert gs.sum() == t * k
    np.testing.assert_array_equal(gs, np.bincount(experts.reshape(-1), minlength=e))
    sorted_experts = experts.reshape(-1)[order]
    np.testing.assert_array_equal(sorted_experts, np.repeat(np.arange(e), gs))
    for ex in range(e):
        rows = order[sorted_experts == ex]
        assert (np.diff(rows) > 0).all(), "dispatch is not stable"


@HYP
@given(routings(), st.integers(1, 2**31 - 1))
def test_combine_of_identity_experts_is_weighted_input(case, s):
    experts, e = case
    t, k = experts.shape
    rng = np.random.default_rng(s)
    x = rng.standard_normal((t, 5)).astype(np.float32) + 3.0
    w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    out = np.asarray(identity_layer(jnp.asarray(experts), jnp.asarray(x), jnp.asarray(w), e))
    want = np.zeros_like(x)
    for j in range(k):
        want += w[:, j:j + 1] * x
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_route_matches_definitions(rng, seed):
    cfg = make_cfg(8, 3, "mixtral")
    router = rand(rng, (D, 8), jnp.float32, 0.1)
    x = rand(rng, (10, D), jnp.float32)
    w_mix, ex = sj.route(router, x, cfg)
    w_soft, ex2 = sj.route(router, x, dataclasses.replace(cfg, router="softmax_topk"))
    np.testing.assert_array_equal(np.asarray(ex), np.asarray(ex2))
    assert w_mix.dtype == jnp.float32 and ex.dtype == jnp.int32
    np.testing.assert_allclose(np.asarray(w_mix).sum(-1), 1.0, rtol=1e-5)
    assert (np.asarray(w_soft).sum(-1) < 1.0).all()
    routes, _ = ref_route(router, np.asarray(x), cfg)
    for t, (idx, w) in enumerate(routes):
        np.testing.assert_array_equal(np.asarray(ex[t]), idx, err_msg=f"seed={seed}")
        np.testing.assert_allclose(np.asarray(w_mix[t]), w, rtol=1e-4)


# --- config, params, errors ------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    (dict(top_k=9), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(router="topk"), "router"),
    (dict(activation="relu"), "activation"),
    (dict(d_model=96), "d_model"),
    (dict(d_ff=100), "d_ff"),
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(d_ff_shared=64), "d_ff_shared"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),
])
def test_config_validation(kw, field):
    base = dict(num_experts=8, top_k=2, d_model=128, d_ff=128)
    with pytest.raises(ValueError, match=field):
        sj.MoEConfig(**{**base, **kw})


def test_config_defaults_and_hash():
    a = sj.MoEConfig(num_experts=8, top_k=2, d_model=128, d_ff=256, num_shared_experts=2)
    b = sj.MoEConfig(num_experts=8, top_k=2, d_model=128, d_ff=256, num_shared_experts=2,
                     d_ff_shared=512)
    assert a.d_ff_shared == 512 and a == b and hash(a) == hash(b)
    assert sj.MoEConfig(num_experts=1, top_k=1, d_model=128, d_ff=128).d_ff_shared == 0
    assert a.sparsity == sj.SparsityConfig(1, 2, 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.top_k = 3


def test_init_sparsify_bytes_and_errors(capsys):
    cfg = make_cfg(4, 2, num_shared_experts=1, shared_expert_gate=True)
    dense = sj.init_dense_moe(jax.random.key(0), cfg, jnp.float16)
    assert {k: v.shape for k, v in dense.items()} == {
        "router": (D, 4), "gate": (4, D, F), "up": (4, D, F), "down": (4, F, D),
        "shared_gate": (D, F), "shared_up": (D, F), "shared_down": (F, D),
        "shared_expert_gate": (D, 1)}
    sparse = sj.sparsify_moe(dense, cfg, progress=True, verbose=True)
    out = capsys.readouterr()
    assert "sparsify_moe" in out.out and "MiB" in out.out
    assert sparse["gate_up"].shape == (4, D, 2 * F) and sparse["down"].shape == (4, F, D)
    assert sparse["router"] is dense["router"]
    expert_dense = sj.moe_param_bytes({k: dense[k] for k in ("gate", "up", "down")})
    expert_sparse = sparse["gate_up"].nbytes + sparse["down"].nbytes
    assert expert_dense == 3 * 4 * D * F * 2
    assert sj.moe_param_bytes(sparse) == sj.moe_param_bytes(dense) - expert_dense + expert_sparse
    assert expert_sparse < expert_dense / 3
    with pytest.raises(TypeError, match="moe_dense"):
        sj.moe(dense, jnp.ones((2, D), jnp.float16), cfg)
    with pytest.raises(ValueError, match="gate"):
        sj.moe_dense(sparse, jnp.ones((2, D), jnp.float16), cfg)
    with pytest.raises(ValueError, match="d_model"):
        sj.moe(sparse, jnp.ones((2, D + 1), jnp.float16), cfg)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        sj.sparsify_moe(jax.tree.map(lambda a: a.astype(jnp.float32), dense), cfg)
    other = dataclasses.replace(cfg, sparsity=sj.SparsityConfig(2, 4, 32))
    with pytest.raises(ValueError, match="encoded with"):
        sj.moe(sparse, jnp.ones((2, D), jnp.float16), other)
