"""samoyeds_jax.flax: nnx and linen modules around sj.moe.

The layer math is checked in test_moe.py; here module outputs are compared with sj.moe /
sj.moe_dense on the same parameters. The module calls the very same jitted function on the
very same arrays, so module vs function is bit-exact; a swapped block (sparse MoE vs the
dense twin on the pruned weights) differs only by float32 accumulation order inside the
experts (``reordered`` of tests/helpers.py, bf16 experts; measured ~1e-5).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samoyeds_jax as sj
from helpers import rand, rel_err, tol

flax = pytest.importorskip("flax")
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

from samoyeds_jax.flax import (  # noqa: E402
    DenseMoE, SparseMoE, SparseMoELinen, SparseParam, SparseValues)

D = F = 128
CFG = sj.MoEConfig(num_experts=4, top_k=2, d_model=D, d_ff=F, router="softmax_topk",
                   num_shared_experts=1, shared_expert_gate=True,
                   sparsity=sj.SparsityConfig(1, 2, 64))
SWAP_TOL = tol("reordered", jnp.bfloat16)


def assert_same(a, b, msg=""):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=msg)


def test_import_samoyeds_jax_does_not_import_flax():
    code = "import sys, samoyeds_jax; assert 'flax' not in sys.modules, 'flax imported'"
    root = os.path.dirname(os.path.dirname(sj.__file__))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_nnx_init_apply_split_merge_jit(rng, seed):
    model = SparseMoE(CFG, nnx.Rngs(int(rng.integers(2**31))))
    x = rand(rng, (2, 6, D), jnp.bfloat16)
    y = model(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y32 = np.asarray(y, np.float32)
    assert np.isfinite(y32).all() and np.abs(y32).sum() > 0
    assert_same(y, sj.moe(model.params(), x, CFG), f"seed={seed}")
    # Router, shared experts and the kept values are Params; the pattern is SparseParams.
    params = nnx.state(model, nnx.Param)
    sparse = nnx.state(model, SparseParam)
    assert set(params.keys()) == {"router", "shared_gate", "shared_up", "shared_down",
                                  "shared_expert_gate", "gate_up_values", "down_values"}
    assert set(nnx.state(model, SparseValues).keys()) == {"gate_up_values", "down_values"}
    assert set(sparse.keys()) == {f"{w}_{p}" for w in ("gate_up", "down")
                                  for p in ("indices", "metadata")}
    assert sparse["gate_up_indices"][...].dtype == jnp.uint8
    assert sparse["down_metadata"][...].dtype == jnp.uint32
    # split / merge round trip, then nnx.jit.
    graphdef, state = nnx.split(model)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
    merged = nnx.merge(graphdef, state)
    assert_same(merged(x), y)
    assert_same(nnx.jit(lambda m, x: m(x))(merged, x), y)
    # Grads exist for Params only (the kept values with the pattern fixed).
    grads = nnx.grad(lambda m: m(x).astype(jnp.float32).sum())(model)
    assert set(grads.keys()) == set(params.keys())
    for name in ("router", "gate_up_values", "down_values"):
        assert np.abs(np.asarray(grads[name][...], np.float32)).sum() > 0, name
    # The router alone.
    router_only = nnx.All(nnx.Param, nnx.Not(SparseValues))
    grads = nnx.grad(lambda m: m(x).astype(jnp.float32).sum(),
                     argnums=nnx.DiffState(0, router_only))(model)
    assert "down_values" not in grads.keys() and "router" in grads.keys()
    # float32 master values: rounded to the encoded dtype in the call.
    master = SparseMoE(CFG, params=model.params(), param_dtype=jnp.float32)
    assert master.down_values[...].dtype == jnp.float32
    assert_same(master(x), y)


def test_nnx_from_dense_equals_moe(rng, seed):
    dense = sj.init_dense_moe(jax.random.key(int(rng.integers(2**31))), CFG, jnp.float16)
    x = rand(rng, (9, D), jnp.float16)
    model = SparseMoE.from_dense(dense, CFG)
    assert_same(model(x), sj.moe(sj.sparsify_moe(dense, CFG), x, CFG), f"seed={seed}")
    dmod = DenseMoE(CFG, params=dense)
    assert_same(dmod(x), sj.moe_dense(dense, x, CFG))
    assert_same(SparseMoE.from_dense(dmod)(x), model(x))
    assert_same(dmod.to_sparse()(x), model(x))
    with pytest.raises(ValueError, match="rngs"):
        SparseMoE(CFG)
    with pytest.raises(RuntimeError, match="eagerly"):
        nnx.eval_shape(lambda: SparseMoE(CFG, nnx.Rngs(0)))


def test_nnx_orbax_round_trip(tmp_path, rng, seed):
    ocp = pytest.importorskip("orbax.checkpoint")
    model = SparseMoE(CFG, nnx.Rngs(int(rng.integers(2**31))))
    x = rand(rng, (5, D), jnp.bfloat16)
    y = model(x)
    _, state = nnx.split(model)
    path = tmp_path / "moe"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, state)
        ckptr.wait_until_finished()
        # The restore target: an abstract module, nothing encoded.
        abstract = nnx.eval_shape(lambda: SparseMoE.empty(CFG, jnp.bfloat16))
        graphdef, abstract_state = nnx.split(abstract)
        restored = ckptr.restore(path, abstract_state)
    model2 = nnx.merge(graphdef, restored)
    for (ka, a), (kb, b) in zip(sorted(nnx.to_flat_state(state)),
                                sorted(nnx.to_flat_state(nnx.state(model2)))):
        assert ka == kb and a[...].dtype == b[...].dtype
        assert_same(a[...], b[...], f"seed={seed} {ka}")
    assert_same(model2(x), y)
    # The empty module itself runs (zero routed experts, zero shared experts).
    assert_same(SparseMoE.empty(CFG)(x), jnp.zeros_like(x))


def test_linen_init_apply(rng, seed):
    model = SparseMoELinen(CFG, dtype=jnp.bfloat16)
    x = rand(rng, (3, 4, D), jnp.bfloat16)
    variables = model.init(jax.random.key(int(rng.integers(2**31))), x)
    assert set(variables) == {"params", "sparse"}
    assert set(variables["params"]) == {"router", "shared_gate", "shared_up", "shared_down",
                                        "shared_expert_gate"}
    assert variables["sparse"]["gate_up_values"].shape == (4, 2 * F // 2, D // 2)  # [E, Mk, K/2]
    y = jax.jit(model.apply)(variables, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    params = {**variables["params"]}
    for w in ("gate_up", "down"):
        params[w] = sj.SparseWeight(*(variables["sparse"][f"{w}_{p}"]
                                      for p in ("values", "indices", "metadata")),
                                    CFG.sparsity)
    assert_same(y, sj.moe(params, x, CFG), f"seed={seed}")
    # From dense weights; gradient w.r.t. "params" only.
    dense = sj.init_dense_moe(jax.random.key(int(rng.integers(2**31))), CFG, jnp.bfloat16)
    v2 = SparseMoELinen.variables_from_dense(dense, CFG)
    assert_same(model.apply(v2, x), sj.moe(sj.sparsify_moe(dense, CFG), x, CFG))
    g = jax.grad(lambda p: model.apply({"params": p, "sparse": v2["sparse"]}, x)
                 .astype(jnp.float32).sum())(v2["params"])
    assert np.abs(np.asarray(g["router"], np.float32)).sum() > 0
    with pytest.raises(RuntimeError, match="eagerly"):
        jax.jit(model.init)(jax.random.key(0), x)


# --- swapping the dense MoE of a transformer block for the sparse one --------------------

class Block(nnx.Module):
    """Pre-norm block: self-attention, then an MoE (dense or sparse) as the FFN."""

    def __init__(self, cfg: sj.MoEConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.norm1 = nnx.RMSNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=d, decode=False,
                                           rngs=rngs)
        self.norm2 = nnx.RMSNorm(d, rngs=rngs)
        self.moe = DenseMoE(cfg, rngs, dtype=jnp.bfloat16)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.moe(self.norm2(x)).astype(x.dtype)


class LinenBlock(nn.Module):
    """The linen version: a token mixer (dense over the sequence) and the sparse MoE."""

    cfg: sj.MoEConfig

    @nn.compact
    def __call__(self, x):
        x = x + nn.Dense(x.shape[-2], name="mix")(jnp.swapaxes(nn.RMSNorm()(x), -1, -2)
                                                  ).swapaxes(-1, -2)
        return x + SparseMoELinen(self.cfg, name="moe")(nn.RMSNorm()(x)).astype(x.dtype)


def test_swap_dense_moe_for_sparse_in_block(rng, seed):
    block = Block(CFG, nnx.Rngs(int(rng.integers(2**31))))
    x = rand(rng, (2, 8, D))
    fwd = nnx.jit(lambda m, x: m(x))
    y_dense = fwd(block, x)
    dense_moe = block.moe
    # The reference: the same block with the dense twin on the pruned weights.
    block.moe = DenseMoE(CFG, params=sj.prune_moe(dense_moe.params(), CFG))
    y_twin = fwd(block, x)
    block.moe = dense_moe.to_sparse()
    assert isinstance(block.moe, SparseMoE)
    y_sparse = fwd(block, x)
    assert y_sparse.shape == x.shape and y_sparse.dtype == jnp.float32
    err = rel_err(y_sparse - x, y_twin - x)
    assert err <= SWAP_TOL, f"seed={seed}: sparse block vs twin {err:.3g}"
    assert rel_err(y_sparse - x, y_dense - x) > 10 * SWAP_TOL  # pruning did change the layer
    # The swapped block still splits/merges.
    graphdef, state = nnx.split(block)
    assert_same(fwd(nnx.merge(graphdef, state), x), y_sparse)


def test_linen_block_under_jit(rng, seed):
    model = LinenBlock(CFG)
    x = rand(rng, (2, 8, D))
    variables = model.init(jax.random.key(int(rng.integers(2**31))), x)
    assert set(variables) == {"params", "sparse"}
    y = jax.jit(model.apply)(variables, x)
    assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()


def test_modules_refuse_weights_breaking_the_format(rng, seed):
    """Encoded arrays from outside a module (params, linen variables, a restored state) are
    checked once where they enter; the module's calls never see a weight that sj.decode and
    the gradient would read differently."""
    params = SparseMoE(CFG, nnx.Rngs(int(rng.integers(2**31)))).params()
    leaves, treedef = jax.tree_util.tree_flatten(params["gate_up"])
    meta = np.asarray(leaves[2]).copy()
    meta[1, 7, 0] = (meta[1, 7, 0] & ~np.uint32(0xF)) | np.uint32(0x5)   # positions (1, 1)
    bad = dict(params, gate_up=jax.tree_util.tree_unflatten(
        treedef, [leaves[0], leaves[1], jnp.asarray(meta)]))
    with pytest.raises(ValueError, match=r"params\['gate_up'\].metadata: kept row \[1, "):
        SparseMoE(CFG, params=bad)
    with pytest.raises(ValueError, match=r"params\['gate_up'\].metadata"):
        SparseMoELinen.variables_from_sparse(bad, CFG)
    # A state filled in by other means (e.g. an orbax restore): model.validate().
    model = SparseMoE(CFG, params=params)
    assert model.validate() is model
    graphdef, state = nnx.split(model)
    state["gate_up_indices"][...] = state["gate_up_indices"][...].at[0, 3, 1].set(7)
    with pytest.raises(ValueError, match=r"gate_up.indices\[0, 3, 1\] = 7 is not below V=2"):
        nnx.merge(graphdef, state).validate()
