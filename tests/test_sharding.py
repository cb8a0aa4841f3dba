"""samoyeds_jax.sharding and samoyeds_jax.partitioning: the layer and the product on a
mesh against one device.

Runs on 8 virtual CPU devices (conftest adds ``--xla_force_host_platform_device_count=8``
to XLA_FLAGS before jax starts); skipped when fewer than 8 CPU devices exist.

Reference: ``sj.moe`` (and ``sj.ragged_dot``, ``jax.vmap(sj.ragged_dot)``) on one device,
same parameters, same tokens. Routing is made uneven on purpose: a constant feature that
one router column loves makes one expert take every token's first choice, and two router
columns that hate it leave those experts empty. Data and expert parallelism run the same
per-row kernels on the same rows, so on CPU they match bit for bit (measured: max error
0; some tests assert exact equality, the others allow float32 accumulation-order
differences, ``reordered`` of tests/helpers.py). Tensor parallelism and any K split round
each device's partial product before the sum (``k_split``). Gradients w.r.t. x differ by
bf16 rounding of partial sums (``sharded_grad``).

Plain jax.jit on sharded operands (the primitive's partitioning rule) is checked in its
compiled HLO: the collectives each layout needs and no all-gather of a weight, under
Shardy and, for one case of each kind, GSPMD.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import samoyeds_jax as sj
from helpers import (BASE_SEED, collectives, dense_layer, f64, rand, rel_err, seed_for,
                     sparse_weight, tol, weight_gathers)
from samoyeds_jax import layout
from samoyeds_jax import sharding as sh
from samoyeds_jax.moe import expert_ffn

MESHES = [(8, 1), (2, 4), (1, 8)]
D = F = 64
SP = sj.SparsityConfig(1, 2, 32)
TOL = tol("reordered", jnp.bfloat16)
GRAD_TOL = tol("sharded_grad", jnp.bfloat16)
K_SPLIT_TOL = tol("k_split", jnp.bfloat16)
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


def _loss_grad(f):
    """d/dx of sum(f(x, ...)^2) (float32), jitted; the weights are arguments."""
    return jax.jit(jax.grad(lambda x, *a: jnp.sum(f(x, *a).astype(jnp.float32) ** 2)))


@contextlib.contextmanager
def partitioner(name: str):
    """Compile with Shardy (JAX's default) or GSPMD (skipped where JAX no longer has it)."""
    if not hasattr(jax.config, "jax_use_shardy_partitioner"):
        if name == "gspmd":
            pytest.skip("this JAX has no GSPMD partitioner switch")
        yield
        return
    prev = jax.config.jax_use_shardy_partitioner
    try:
        jax.config.update("jax_use_shardy_partitioner", name == "shardy")
    except Exception as e:  # noqa: BLE001 (a JAX that refuses GSPMD)
        pytest.skip(f"cannot select {name}: {e}")
    try:
        yield
    finally:
        jax.config.update("jax_use_shardy_partitioner", prev)


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


# Tensor parallel: d_ff=256 splits 8 ways into whole 1:2 tiles (32 gate + 32 up columns).
TP_MESHES = {  # name: (mesh shape, axis names, expert axis, Explicit axis types)
    "tp8": ((1, 8), ("data", "model"), None, False),
    "dp2-tp4": ((2, 4), ("data", "model"), None, False),
    "dp2-ep2-tp2": ((2, 2, 2), ("data", "expert", "model"), "expert", False),
    "ep2-tp4-explicit": ((2, 4), ("expert", "model"), "expert", True),
}
# (mesh, how the layer runs, partitioner, check grad w.r.t. x). "jit": jax.jit(sj.moe) on
# the placed parameters, x replicated; "jit-dp": the same with x split over data (the
# global dispatch then moves activations, never weights); "moe_sharded": tokens split over
# data (and expert); "twin": the dense twin through moe_sharded.
TP_CASES = [("tp8", "jit", "shardy", True), ("tp8", "moe_sharded", "shardy", True),
            ("dp2-tp4", "jit-dp", "shardy", False), ("dp2-tp4", "moe_sharded", "shardy", False),
            ("dp2-ep2-tp2", "jit", "shardy", True), ("dp2-ep2-tp2", "jit", "gspmd", True),
            ("dp2-ep2-tp2", "moe_sharded", "shardy", True),
            ("dp2-ep2-tp2", "twin", "shardy", False),
            ("ep2-tp4-explicit", "jit", "shardy", False)]


@pytest.fixture(scope="module")
def tp_layer():
    """One layer for the tensor-parallel cases: parameters (sparse and the decoded twin),
    tokens, and the one-device outputs and gradients."""
    cfg = cfg_of(d_ff=256)
    dense, x = make_layer(np.random.default_rng(seed_for("tp-layer")), cfg, (32, D))
    params = sj.sparsify_moe(dense, cfg)
    twin = sj.decode_moe(params, cfg)
    grad = _loss_grad(lambda x, p: sj.moe(p, x, cfg))
    return dict(cfg=cfg, x=x, params=params, twin=twin, ref=sj.moe(params, x, cfg),
                g_ref=grad(x, params), twin_ref=sj.moe_dense(twin, x, cfg),
                seed=f"seed_for('tp-layer'), base SAMOYEDS_TEST_SEED={BASE_SEED}")


@pytest.mark.parametrize("mesh_name,how,part,check_grad", TP_CASES,
                         ids=[f"{m}-{h}-{p}" for m, h, p, _ in TP_CASES])
def test_tensor_parallel_layer(mesh_name, how, part, check_grad, tp_layer):
    """gate_up split by columns (gate and up paired per shard), down by rows, one
    all-reduce per layer; through plain jax.jit(sj.moe) and through moe_sharded."""
    shape, names, ex, explicit = TP_MESHES[mesh_name]
    cfg, x = tp_layer["cfg"], tp_layer["x"]
    types = (jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto,)
    mesh = Mesh(np.array(cpus[:8]).reshape(shape), names, axis_types=types * len(names))
    params = tp_layer["twin" if how == "twin" else "params"]
    ps = sh.shard_params(params, mesh, expert_axis=ex, tensor_axis="model")
    n_ep = 1 if ex is None else mesh.shape[ex]
    if how != "twin":
        gu = ps["gate_up"]
        assert gu.shape == (8, 2, D, 256) and gu.values.sharding.spec == P(ex, None, "model")
        assert ps["down"].values.sharding.spec == P(ex, None, "model")
    xs = jax.device_put(x, NamedSharding(mesh, P("data"))) if "data" in names else x
    # The parameters are arguments of the jitted function: closed-over arrays would be
    # baked in as constants, outside the partitioned program.
    if how.startswith("jit"):
        def fn(p, x):
            return sj.moe(p, x, cfg)
        arg = xs if how == "jit-dp" else x
        want = None if how == "jit-dp" else {"all-reduce": 1 if n_ep == 1 else 2}
    else:
        def fn(p, x):
            return sh.moe_sharded(p, x, cfg, mesh, expert_axis=ex, tensor_axis="model")
        arg, want = xs, {"all-reduce": 1, **({"all-to-all": 3} if n_ep > 1 else {})}
    msg = f"seed {tp_layer['seed']} {mesh_name} {how} ({part})"
    with partitioner(part):
        compiled = jax.jit(fn).lower(ps, arg).compile()
        out = compiled(ps, arg)
        g = _loss_grad(lambda x, p: fn(p, x))(arg, ps) if check_grad else None
    ref = tp_layer["twin_ref" if how == "twin" else "ref"]
    assert rel_err(out, ref) <= K_SPLIT_TOL, f"{msg}: relative error {rel_err(out, ref):.3g}"
    if g is not None:
        err = rel_err(g, tp_layer["g_ref"])
        assert err <= GRAD_TOL, f"{msg}: grad relative error {err:.3g}"
    hlo = compiled.as_text()
    assert not weight_gathers(hlo), f"{msg}: weights gathered {weight_gathers(hlo)}"
    if want is not None:
        assert collectives(hlo) == want, f"{msg}: {collectives(hlo)}, expected {want}"


def test_stacked_layout_is_the_same_layer(tp_layer):
    """The stacked gate_up passes the layout checks, decodes to the same dense twin and
    gives the same layer, bit for bit; concat_gate_up undoes stack_gate_up."""
    cfg, params = tp_layer["cfg"], tp_layer["params"]
    stacked = {**params, "gate_up": layout.stack_gate_up(params["gate_up"])}
    np.testing.assert_array_equal(f64(sj.moe(stacked, tp_layer["x"], cfg)),
                                  f64(tp_layer["ref"]))
    for key, val in sj.decode_moe(stacked, cfg).items():
        np.testing.assert_array_equal(f64(val), f64(tp_layer["twin"][key]), err_msg=key)
    back = layout.concat_gate_up(stacked["gate_up"])
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params["gate_up"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_plain_jit_expert_parallel_is_exact(tp_layer):
    """jax.jit(sj.moe) on expert-sharded parameters: each device runs its experts' rows,
    the partial outputs meet in an all-reduce of exact zeros: bit-identical."""
    cfg, x, params = tp_layer["cfg"], tp_layer["x"], tp_layer["params"]
    ps = sh.shard_params(params, mesh_of((1, 8)))
    compiled = jax.jit(sj.moe, static_argnums=2).lower(ps, x, cfg).compile()
    msg = tp_layer["seed"]
    np.testing.assert_array_equal(f64(compiled(ps, x)), f64(tp_layer["ref"]), err_msg=msg)
    g = _loss_grad(lambda x, p: sj.moe(p, x, cfg))(x, ps)
    np.testing.assert_array_equal(f64(g), f64(tp_layer["g_ref"]), err_msg=msg)
    hlo = compiled.as_text()
    assert collectives(hlo) == {"all-reduce": 2}, f"{msg}: {collectives(hlo)}"


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


# --- plain jit: the primitive's partitioning rule ------------------------------------------

# 2:4, L=32: M=256 splits 4 ways into 2 x m_multiple columns, K=128 into 1 x sub_row.
PSP = sj.SparsityConfig(2, 4, 32)
PE, PK, PM, PT, PTOP = 4, 128, 256, 16, 2
W3, W4 = "[E,K,M]", "[E,2,K,F]"   # the weight as encoded, and gate/up stacked (GLU)

# name: (weight form, glu, x spec, weight-leaf spec, sel spec or "grouped" (no SEL, x rows
# split like that), collectives the layout needs, bit-identical to one device)
PLAIN_JIT = {
    "rows": (W3, None, P(), P(), P("a"), {}, True),
    "M": (W3, None, P(), P(None, "b"), P(), {}, True),
    "M+rows": (W3, None, P(), P(None, "b"), P("a"), {}, True),
    "K": (W3, None, P(None, "b"), P(None, None, "b"), P(), {"all-reduce": 1}, False),
    "E": (W3, None, P(), P("b"), P(), {"all-reduce": 1}, True),
    "E+M": (W3, None, P(), P("a", "b"), P(), {"all-reduce": 1}, True),
    "E+rows-grouped": (W3, None, P("a"), P("b"), "grouped", {"all-reduce": 1}, True),
    "glu-F+rows": (W4, "silu", P(), P(None, None, "b"), P("a"), {}, True),
    "glu-E+F": (W4, "gelu", P(), P("a", None, "b"), P(), {"all-reduce": 1}, True),
    "glu-K": (W4, "silu", P(None, "b"), P(None, None, None, "b"), P(), {"all-reduce": 1},
              False),
}


@pytest.fixture(scope="module")
def prim_inputs():
    """One weight (both forms), tokens and top-k routing shared by the layouts, drawn from
    the run's seed; expert 1 gets no rows, expert 2 most of them."""
    rng = np.random.default_rng(seed_for("plain-jit-inputs"))
    sw = sparse_weight(rng, PSP, jnp.bfloat16, (PE, PK, PM))
    ex = rng.integers(0, PE, (PT * PTOP,))
    ex[ex == 1] = 2
    order = np.argsort(ex, kind="stable")
    return {W3: sw, W4: layout.stack_gate_up(sw), "x": rand(rng, (PT, PK), jnp.bfloat16),
            "x_grouped": rand(rng, (PT * PTOP, PK), jnp.bfloat16),
            "sel": jnp.asarray(order // PTOP, jnp.int32),
            "gs": jnp.asarray(np.bincount(ex, minlength=PE), jnp.int32)}


def _prim_case(inputs, form, glu, x_spec, w_spec, sel_spec, mesh):
    """(f(x, sw, sel), its arguments sharded, the same on one device)."""
    grouped = isinstance(sel_spec, str)
    sw, gs = inputs[form], inputs["gs"]
    x = inputs["x_grouped" if grouped else "x"]
    sel = None if grouped else inputs["sel"]

    def f(x, w, s):
        return sj.ragged_dot(x, w, gs, s, glu=glu)

    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    sharded = (put(x, x_spec), jax.tree.map(lambda a: put(a, w_spec), sw),
               None if grouped else put(sel, sel_spec))
    return f, sharded, (x, sw, sel)


# Every layout under Shardy; under GSPMD one of each kind of collective and of GLU.
PLAIN_JIT_CASES = ([(name, "shardy") for name in PLAIN_JIT] +
                   [(name, "gspmd") for name in ("M+rows", "K", "E+rows-grouped", "glu-K")])


@pytest.mark.parametrize("name,part", PLAIN_JIT_CASES,
                         ids=[f"{n}-{p}" for n, p in PLAIN_JIT_CASES])
def test_primitive_partitions_under_jit(name, part, prim_inputs):
    """jax.jit(sj.ragged_dot) on sharded operands: one call per device, only the
    collectives the layout needs, the weights never gathered, the one-device result."""
    form, glu, x_spec, w_spec, sel_spec, want, exact = PLAIN_JIT[name]
    mesh = Mesh(np.array(cpus[:8]).reshape(2, 4), ("a", "b"))
    f, args, args1 = _prim_case(prim_inputs, form, glu, x_spec, w_spec, sel_spec, mesh)
    msg = f"{name} ({part}), data seed_for('plain-jit-inputs'), base seed {BASE_SEED}"
    with partitioner(part):
        compiled = jax.jit(f).lower(*args).compile()
        y = compiled(*args)
        g_compiled = _loss_grad(f).lower(*args).compile()
        g = g_compiled(*args)
    y_ref, g_ref = jax.jit(f)(*args1), _loss_grad(f)(*args1)
    if exact:
        np.testing.assert_array_equal(f64(y), f64(y_ref), err_msg=msg)
    else:
        assert rel_err(y, y_ref) <= K_SPLIT_TOL, f"{msg}: relative error {rel_err(y, y_ref):.3g}"
    grad_tol = TOL if exact else GRAD_TOL
    assert rel_err(g, g_ref) <= grad_tol, f"{msg}: grad relative error {rel_err(g, g_ref):.3g}"
    hlo, g_hlo = compiled.as_text(), g_compiled.as_text()
    assert collectives(hlo) == want, f"{msg}: {collectives(hlo)}, expected {want}"
    assert not weight_gathers(g_hlo), f"{msg}: grad gathers weights {weight_gathers(g_hlo)}"
    assert "samoyeds_ragged_dot" in hlo and "CustomSPMDPartitioning" not in hlo, msg


def test_stacked_gate_up_is_the_same_product(prim_inputs):
    """On one device the stacked [E, 2, K, F] weight is the [E, K, 2F] one: the same fused
    GLU bit for bit (jit and vmap), gradients equal up to rounding (two half-width
    transposes instead of one: each half's dx is rounded to bf16 before the two are
    added, as a K split's partials are), refused without a GLU."""
    x, gs, sel = prim_inputs["x"], prim_inputs["gs"], prim_inputs["sel"]

    def f(x, w):
        return sj.ragged_dot(x, w, gs, sel, glu="silu")

    y3, y4 = jax.jit(f)(x, prim_inputs[W3]), jax.jit(f)(x, prim_inputs[W4])
    np.testing.assert_array_equal(f64(y4), f64(y3))
    xb = jnp.stack([x, -x])
    np.testing.assert_array_equal(f64(jax.vmap(f, (0, None))(xb, prim_inputs[W4])),
                                  f64(jax.vmap(f, (0, None))(xb, prim_inputs[W3])))
    g3, g4 = (_loss_grad(f)(x, prim_inputs[w]) for w in (W3, W4))
    assert rel_err(g4, g3) <= tol("k_split", jnp.bfloat16), \
        f"grad relative error {rel_err(g4, g3):.3g}"
    with pytest.raises(ValueError, match=r"\[E, K, M\]"):
        sj.ragged_dot(x, prim_inputs[W4], gs, sel)


def test_vmap_and_dot_under_jit_split_along_m(prim_inputs, seed):
    """vmap (the batch folded into rows: one call) and sj.dot keep the M split local."""
    mesh = Mesh(np.array(cpus[:8]).reshape(2, 4), ("a", "b"))
    sw, gs, sel = prim_inputs[W3], prim_inputs["gs"], prim_inputs["sel"]
    sw_s = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "b"))), sw)
    xb = jnp.stack([prim_inputs["x"], -prim_inputs["x"]])
    cases = {"vmap": (jax.vmap(lambda x, w: sj.ragged_dot(x, w, gs, sel), (0, None)), xb),
             "dot": (lambda x, w: sj.dot(x, w[2]), prim_inputs["x"])}
    for name, (f, x) in cases.items():
        compiled = jax.jit(f).lower(x, sw_s).compile()
        np.testing.assert_array_equal(f64(compiled(x, sw_s)), f64(jax.jit(f)(x, sw)),
                                      err_msg=f"seed={seed} {name}")
        assert collectives(compiled.as_text()) == {}, f"seed={seed} {name}"


def test_refused_layouts_under_jit(prim_inputs):
    """Layouts that would need the weights gathered are refused at compile time."""
    mesh = Mesh(np.array(cpus[:8]).reshape(2, 4), ("a", "b"))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    x, gs, sel = prim_inputs["x"], prim_inputs["gs"], prim_inputs["sel"]
    f = jax.jit(sj.ragged_dot, static_argnames="glu")

    def run(form, *specs, glu=None):
        sw = prim_inputs[form]
        specs = specs * 3 if len(specs) == 1 else specs
        leaves = [put(a, s) for a, s in zip((sw.values, sw.indices, sw.metadata), specs)]
        return f(x, sj.SparseWeight(*leaves, sw.config), gs, sel, glu=glu)

    with pytest.raises(Exception, match="would put gate and up columns on different devices"):
        run(W3, P(None, "b"), glu="silu")
    with pytest.raises(Exception, match="split between gate and up"):
        run(W4, P(None, "a"), glu="silu")
    with pytest.raises(Exception, match="multiple of 32 output columns"):
        narrow = prim_inputs[W3]     # M=256 over 8 devices: 32 columns, one m_multiple each
        half = sj.SparseWeight(*(put(a[:, : a.shape[1] // 2], P(None, ("a", "b")))
                                 for a in (narrow.values, narrow.indices, narrow.metadata)),
                               narrow.config)              # M=128 over 8: 16 columns each
        f(x, half, gs, sel)
    with pytest.raises(Exception, match="sharded alike"):
        run(W3, P(None, "b"), P(), P())
    # Bad routing still fails on every device's call, as the unsplit call does.
    with pytest.raises(Exception, match="exceeds the R=16 output rows"):
        f(x, prim_inputs[W3], gs.at[0].add(1), put(sel, P("a"))).block_until_ready()
