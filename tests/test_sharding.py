"""samoyeds_jax.sharding: the data/expert-parallel layer against the single-device layer.

Runs on 8 virtual CPU devices (conftest adds ``--xla_force_host_platform_device_count=8``
to XLA_FLAGS before jax starts); skipped when fewer than 8 CPU devices exist.

Reference: ``sj.moe`` (and ``jax.vmap(sj.ragged_dot)``) on one device, same parameters,
same tokens. Routing is made uneven on purpose: a constant feature that one router
column loves makes one expert take every token's first choice, and two router columns
that hate it leave those experts empty. The sharded layer runs the same per-row kernels
on the same rows, so on CPU it matches bit for bit (measured: max error 0); the bound
allows float32 accumulation-order differences (``reordered`` of tests/helpers.py, bf16).
Gradients w.r.t. x differ by bf16 rounding of partial sums (``sharded_grad``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import samoyeds_jax as sj
from helpers import dense_layer, f64, rand, rel_err, sparse_weight, tol
from samoyeds_jax import sharding as sh
from samoyeds_jax.moe import expert_ffn

MESHES = [(8, 1), (2, 4), (1, 8)]
D = F = 64
SP = sj.SparsityConfig(1, 2, 32)
TOL = tol("reordered", jnp.bfloat16)
GRAD_TOL = tol("sharded_grad", jnp.bfloat16)
HOT, EMPTY = 2, (6, 7)

cpus = jax.devices("cpu")
pytestmark = pytest.mark.skipif(
    len(cpus) < 8, reason="needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 "
    "before jax starts; tests/conftest.py sets it)")


def mesh_of(shape, axis_types=None):
    devs = np.array(cpus[:8]).reshape(shape)
    if axis_types is None:
        return Mesh(devs, ("data", "expert"))
    return Mesh(devs, ("data", "expert"), axis_types=axis_types)


def make_layer(rng, cfg, tokens, dtype=jnp.bfloat16, x_dtype=None):
    """Dense params and x with uneven routing: expert HOT gets every first choice,
    experts EMPTY get nothing."""
    dense = dense_layer(rng, cfg, dtype)
    dense["router"] = dense["router"].at[0, HOT].set(5.0)
    for j in EMPTY:
        dense["router"] = dense["router"].at[0, j].set(-5.0)
    x = np.asarray(rng.standard_normal(tokens), np.float32)
    x[..., 0] = 4.0
    x = jnp.asarray(x, x_dtype or dtype)
    return dense, x


def cfg_of(**kw):
    base = dict(num_experts=8, top_k=2, d_model=D, d_ff=F, sparsity=SP)
    base.update(kw)
    return sj.MoEConfig(**base)


def loads(params, x, cfg):
    _, experts = sj.route(params["router"], x.reshape(-1, cfg.d_model), cfg)
    return np.bincount(np.asarray(experts).reshape(-1), minlength=cfg.num_experts)


def grad_x(fn, x):
    return jax.jit(jax.grad(lambda x: jnp.sum(fn(x).astype(jnp.float32) ** 2)))(x)


# --- the expert-parallel layer ---------------------------------------------------------

@pytest.mark.parametrize("shape", MESHES, ids=[f"{a}x{b}" for a, b in MESHES])
def test_layer_matches_single_device(shape, rng, seed):
    cfg = cfg_of()
    dense, x = make_layer(rng, cfg, (64, D))
    params = sj.sparsify_moe(dense, cfg)
    load = loads(params, x, cfg)
    assert load[HOT] >= 64 and (load[list(EMPTY)] == 0).all(), f"seed={seed} load {load}"
    ref = sj.moe(params, x, cfg)

    mesh = mesh_of(shape)
    ps = sh.shard_params(params, mesh)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    compiled = sh.moe_sharded.lower(ps, xs, cfg, mesh).compile()
    out = compiled(ps, xs)
    msg = f"seed={seed} mesh {shape}"
    assert out.shape == x.shape and out.dtype == x.dtype, msg
    assert rel_err(out, ref) <= TOL, f"{msg}: relative error {rel_err(out, ref):.3g}"

    # jit + grad w.r.t. x through shard_map, the all-to-alls and the primitive.
    g = grad_x(lambda x: sh.moe_sharded(ps, x, cfg, mesh), xs)
    g_ref = grad_x(lambda x: sj.moe(params, x, cfg), x)
    assert rel_err(g, g_ref) <= GRAD_TOL, f"{msg}: grad relative error {rel_err(g, g_ref):.3g}"

    # Compiled HLO: partitioned, not gathered. Expert parallel = all-to-alls only.
    hlo = compiled.as_text()
    assert "all-gather" not in hlo, f"{msg}: all-gather in the compiled layer"
    assert "all-reduce" not in hlo, f"{msg}: all-reduce in the compiled layer"
    n_a2a = hlo.count("all-to-all(")
    assert (n_a2a == 0) if shape[1] == 1 else (n_a2a >= 2), f"{msg}: {n_a2a} all-to-alls"
    # The shard_map body sees only its shard: local tokens and local experts.
    n_tok, el = 64 // 8, 8 // shape[1]
    assert f"bf16[{n_tok},{D}]" in hlo, msg
    vals = ps["gate_up"].values
    assert vals.addressable_shards[0].data.shape[0] == el, msg


def _expected_drops(experts, n_dev, n_ep, capacity, e):
    """Per source device (tokens in order), per destination: choices past capacity."""
    el = e // n_ep
    dropped = np.zeros(experts.shape, bool)
    tl = experts.shape[0] // n_dev
    for s in range(n_dev):
        count = np.zeros(n_ep, int)
        for t in range(s * tl, (s + 1) * tl):
            for j in range(experts.shape[1]):
                dst = experts[t, j] // el
                dropped[t, j] = count[dst] >= capacity
                count[dst] += 1
    return dropped


def test_capacity_drops_are_reported(rng, seed):
    cfg = cfg_of()
    dense, x = make_layer(rng, cfg, (64, D))
    params = sj.sparsify_moe(dense, cfg)
    mesh = mesh_of((2, 4))
    ps = sh.shard_params(params, mesh)
    cf = 1.0
    out, stats = sh.moe_sharded(ps, x, cfg, mesh, capacity_factor=cf, return_stats=True)
    weights, experts = sj.route(params["router"], x, cfg)
    capacity = math.ceil(cf * (64 // 8) * 2 / 4)
    drop = _expected_drops(np.asarray(experts), 8, 4, capacity, 8)
    msg = f"seed={seed}"
    assert drop.sum() > 0, f"{msg}: the hot expert should overflow capacity {capacity}"
    assert int(stats["dropped"]) == int(drop.sum()), msg
    # Reference: the single-device layer's pieces with the dropped choices weighted 0.
    sel, gs, order = sj.dispatch(experts, 8)
    y = expert_ffn(x, params["gate_up"], params["down"], gs, sel)
    ref = sj.combine(y, jnp.where(jnp.asarray(drop), 0.0, weights), order).astype(x.dtype)
    assert rel_err(out, ref) <= TOL, f"{msg}: relative error {rel_err(out, ref):.3g}"
    # Drop-free (the default) drops nothing and routes exactly like the single device.
    out2, st2 = sh.moe_sharded(ps, x, cfg, mesh, return_stats=True)
    assert int(st2["dropped"]) == 0, msg
    np.testing.assert_array_equal(np.asarray(st2["expert_load"]), loads(params, x, cfg),
                                  err_msg=msg)
    assert rel_err(out2, sj.moe(params, x, cfg)) <= TOL, msg


@pytest.mark.parametrize("shape", [(2, 4), (8, 1)], ids=["2x4", "8x1"])
def test_shared_experts_padding_batch_dims_float32(shape, rng, seed):
    """Qwen-style shared expert with sigmoid gate, softmax_topk, float32 x of shape
    [3, 7, d] (21 tokens: padded to 24 inside; padding routes nowhere)."""
    cfg = cfg_of(top_k=4, router="softmax_topk", num_shared_experts=1, d_ff_shared=128,
                 shared_expert_gate=True)
    dense, x = make_layer(rng, cfg, (3, 7, D), x_dtype=jnp.float32)
    params = sj.sparsify_moe(dense, cfg)
    mesh = mesh_of(shape)
    out = sh.moe_sharded(sh.shard_params(params, mesh), x, cfg, mesh)
    ref = sj.moe(params, x, cfg)
    assert out.shape == (3, 7, D) and out.dtype == jnp.float32
    assert rel_err(out, ref) <= TOL, f"seed={seed}: relative error {rel_err(out, ref):.3g}"


def test_dense_twin_and_explicit_mesh(rng, seed):
    """Dense experts (the twin) expert-parallel on a mesh with Explicit axis types."""
    cfg = cfg_of(activation="gelu")
    dense, x = make_layer(rng, cfg, (32, D))
    mesh = mesh_of((2, 4), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    ps = sh.shard_params(dense, mesh)
    assert ps["gate"].sharding.spec == P("expert") and ps["router"].sharding.spec == P()
    out = sh.moe_sharded(ps, x, cfg, mesh)
    ref = sj.moe_dense(dense, x, cfg)
    assert rel_err(out, ref) <= TOL, f"seed={seed}: relative error {rel_err(out, ref):.3g}"
    with jax.set_mesh(mesh):  # explicit sharding: grad of a replicated x needs the mesh
        g = grad_x(lambda x: sh.moe_sharded(ps, x, cfg, mesh), x)
    g_ref = grad_x(lambda x: sj.moe_dense(dense, x, cfg), x)
    err = rel_err(g, g_ref)
    assert err <= GRAD_TOL, f"seed={seed}: grad relative error {err:.3g}"


def test_errors():
    cfg = cfg_of(num_experts=6)
    mesh = mesh_of((2, 4))
    params = {"router": jnp.zeros((D, 6), jnp.bfloat16),
              "gate": jnp.zeros((6, D, F), jnp.bfloat16), "up": jnp.zeros((6, D, F), jnp.bfloat16),
              "down": jnp.zeros((6, F, D), jnp.bfloat16)}
    x = jnp.zeros((8, D), jnp.bfloat16)
    with pytest.raises(ValueError, match="not divisible by the expert axis"):
        sh.moe_sharded(params, x, cfg, mesh)
    with pytest.raises(ValueError, match="not divisible by the expert axis"):
        sh.shard_params(params, mesh)
    with pytest.raises(ValueError, match="mesh has no axis 'model'"):
        sh.moe_sharded(params, x, cfg, mesh, expert_axis="model")
    with pytest.raises(ValueError, match="capacity_factor"):
        sh.moe_sharded(params, x, cfg, mesh, expert_axis=None, capacity_factor=0.0)
    with pytest.raises(ValueError, match="d_model"):
        sh.moe_sharded(params, jnp.zeros((8, D + 1)), cfg, mesh, expert_axis=None)
    assert sh.param_specs(params, "expert")["up"] == P("expert")


# --- the data-parallel primitive -------------------------------------------------------

@pytest.mark.parametrize("shape,expert_axis", [((8, 1), None), ((2, 4), "expert")],
                         ids=["8x1-replicated", "2x4-expert-sharded"])
def test_ragged_dot_sharded(shape, expert_axis, rng, seed):
    e, k_in, m, b, t, top = 8, 64, 64, 8, 6, 2
    sw = sparse_weight(rng, SP, jnp.bfloat16, (e, k_in, m))
    x = rand(rng, (b, t, k_in), jnp.bfloat16)
    ex = rng.integers(0, e, (b, t * top))
    ex[0] = HOT                              # one problem sends everything to one expert
    ex[1] = np.where(ex[1] >= 6, 0, ex[1])   # and one leaves experts 6, 7 empty
    sel = jnp.asarray(np.argsort(ex, axis=1, kind="stable") // top, jnp.int32)
    gs = jnp.asarray(np.stack([np.bincount(r, minlength=e) for r in ex]), jnp.int32)
    mesh = mesh_of(shape)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))

    def ours(x):
        return sh.ragged_dot_sharded(x, sw, gs, sel, mesh=mesh, expert_axis=expert_axis)

    @jax.jit
    def ref(x):
        return jax.vmap(sj.ragged_dot, in_axes=(0, None, 0, 0))(x, sw, gs, sel)

    msg = f"seed={seed} mesh {shape}"
    compiled = jax.jit(ours).lower(xs).compile()
    np.testing.assert_array_equal(f64(compiled(xs)), f64(ref(x)), err_msg=msg)
    hlo = compiled.as_text()
    assert "all-gather" not in hlo, f"{msg}: all-gather in the compiled primitive"
    if expert_axis is None:
        assert "all-reduce" not in hlo and "all-to-all" not in hlo, msg
    else:  # grouped rows (no SEL) through the per-shard roll; experts 2-4, 6, 7 empty
        gs2 = jnp.zeros((b, e), jnp.int32).at[:, :2].set(2).at[:, 5].set(1)  # 5 of 6 rows
        y2 = sh.ragged_dot_sharded(xs, sw, gs2, mesh=mesh, expert_axis=expert_axis)
        y2_ref = jax.vmap(sj.ragged_dot, in_axes=(0, None, 0))(x, sw, gs2)
        np.testing.assert_array_equal(f64(y2), f64(y2_ref), err_msg=msg)
    g, g_ref = grad_x(ours, xs), grad_x(ref, x)
    assert rel_err(g, g_ref) <= GRAD_TOL, f"{msg}: grad relative error {rel_err(g, g_ref):.3g}"
