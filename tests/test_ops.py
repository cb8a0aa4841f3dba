"""samoyeds_jax.ops: ragged_dot and dot on the CPU handler, under jit, vmap and grad.

Reference: float64 numpy on the decoded weight (tests/helpers.py: ref_ragged_dot, and the
gradient reference here). There is no out= argument to poison, so every output is checked
for: finite everywhere, rows at or past sum(group_sizes) exactly zero, rows before it not
all zero, and the error against the reference within the tolerances of tests/helpers.py.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samoyeds_jax as sj
from helpers import (
    DTYPES, f64, rand, ref_glu, ref_ragged_dot, rel_err, routed_rows, sparse_weight, tol)

ALL_CONFIGS = [sj.SparsityConfig(n, v, L) for (n, v) in [(1, 1), (1, 2), (1, 4), (2, 4)]
               for L in (32, 64, 128)]
# Default problem: E experts, K in_features, M out_features (M fits every config).
E, K, M = 4, 256, 128

decode_jit = jax.jit(sj.decode)


def cfg_id(cfg):
    return f"{cfg.n}:{cfg.v}-L{cfg.sub_row}"


def dtype_id(dt):
    return jnp.dtype(dt).name


# --- inputs and the float64 references (tests/helpers.py: ref_ragged_dot) ----------------

def make_sw(rng, cfg, dtype, e=E, k=K, m=M):
    return sparse_weight(rng, cfg, dtype, (e, k, m) if e else (k, m))


def dense64(sw) -> np.ndarray:
    return f64(decode_jit(sw))


def ref_grad_x(ct, w64, group_sizes, sel, tokens) -> np.ndarray:
    """d/dx of sum(out * ct): dx[src(r)] += ct[r] @ W[e(r)]^T over the valid rows."""
    ct = np.asarray(ct, np.float64)
    dx = np.zeros((tokens, w64.shape[1]))
    start = 0
    for e, g in enumerate(np.asarray(group_sizes).tolist()):
        for r in range(start, start + g):
            t = r if sel is None else int(sel[r])
            dx[t] += w64[e] @ ct[r]
        start += g
    return dx


def check_out(y, ref, valid_rows, dtype, msg):
    """The poisoning substitute: dtype/shape, finite, zero tail, non-zero head, error of
    the whole output (``product``) and of every row (``product_row``)."""
    dtype = jnp.dtype(dtype)
    assert y.dtype == dtype, f"{msg}: dtype {y.dtype} != {dtype}"
    assert y.shape == ref.shape, f"{msg}: shape {y.shape} != {ref.shape}"
    y64 = np.asarray(y, np.float64)
    assert np.isfinite(y64).all(), f"{msg}: non-finite output"
    assert (y64[valid_rows:] == 0).all(), f"{msg}: rows >= {valid_rows} are not zero"
    head = y64[:valid_rows]
    assert (np.abs(head).sum(-1) > 0).all(), \
        f"{msg}: all-zero valid rows {np.nonzero(np.abs(head).sum(-1) == 0)[0]}"
    if valid_rows:
        err, bound = rel_err(head, ref[:valid_rows]), tol("product", dtype)
        assert err <= bound, f"{msg}: relative error {err:.3g} > {bound}"
        row_err = (np.linalg.norm(head - ref[:valid_rows], axis=-1)
                   / np.linalg.norm(ref[:valid_rows], axis=-1))
        bound = tol("product_row", dtype)
        assert row_err.max() <= bound, \
            f"{msg}: row {int(row_err.argmax())} relative error {row_err.max():.3g} > {bound}"


def random_partition(rng, e, total) -> np.ndarray:
    """e sizes summing to `total`, with random cut points (zeros and ones are common)."""
    cuts = np.sort(rng.integers(0, total + 1, size=e - 1))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int32)


def group_sizes_case(case, rng, e, rows) -> np.ndarray:
    if case == "random":
        gs = random_partition(rng, e, rows)
    elif case == "zero_one_odd":            # a 0, a 1, an odd size, the rest
        assert e >= 4
        odd = 2 * int(rng.integers(1, rows // 4)) + 1
        gs = np.zeros(e, np.int32)
        gs[:4] = [0, 1, odd, rows - 1 - odd - int(rng.integers(0, 3))]
        gs = rng.permutation(gs)
    elif case == "one_expert_all":
        gs = np.zeros(e, np.int32)
        gs[rng.integers(0, e)] = rows
    elif case == "short":                   # sum(group_sizes) < R
        gs = random_partition(rng, e, int(rng.integers(1, rows)))
    elif case == "short_one_row":
        gs = np.zeros(e, np.int32)
        gs[rng.integers(0, e)] = 1
    elif case == "all_zero":
        gs = np.zeros(e, np.int32)
    else:
        raise AssertionError(case)
    assert gs.sum() <= rows and (gs >= 0).all()
    return jnp.asarray(gs, jnp.int32)


def random_sel(rng, rows, tokens):
    return jnp.asarray(rng.integers(0, tokens, size=rows), jnp.int32)


# --- forward ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=cfg_id)
def test_ragged_dot_every_config(cfg, dtype, rng, seed):
    sw = make_sw(rng, cfg, dtype)
    w64 = dense64(sw)
    rows, tokens = 37, 23
    gs = group_sizes_case("random" if rng.random() < 0.5 else "short", rng, E, rows)
    msg = f"seed={seed} cfg={cfg_id(cfg)} dtype={dtype_id(dtype)} gs={gs.tolist()}"
    x = rand(rng, (rows, K), dtype)
    y = sj.ragged_dot(x, sw, gs)
    check_out(y, ref_ragged_dot(x, w64, gs), int(gs.sum()), dtype, msg + " sel=None")
    xt = rand(rng, (tokens, K), dtype)
    sel = random_sel(rng, rows, tokens)
    y = sj.ragged_dot(xt, sw, gs, sel=sel)
    check_out(y, ref_ragged_dot(xt, w64, gs, sel), int(gs.sum()), dtype, msg + " with sel")


CASES = ["zero_one_odd", "one_expert_all", "short", "short_one_row", "all_zero", "random"]


@pytest.mark.parametrize("use_sel", [False, True], ids=["nosel", "sel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES)
def test_ragged_dot_group_sizes(case, dtype, use_sel, rng, seed):
    cfg = ALL_CONFIGS[(CASES.index(case) * 5 + use_sel) % len(ALL_CONFIGS)]
    e, rows, tokens = 8, 45, 19
    sw = make_sw(rng, cfg, dtype, e=e)
    gs = group_sizes_case(case, rng, e, rows)
    msg = f"seed={seed} cfg={cfg_id(cfg)} case={case} gs={gs.tolist()} sel={use_sel}"
    if use_sel:
        x, sel = rand(rng, (tokens, K), dtype), random_sel(rng, rows, tokens)
    else:
        x, sel = rand(rng, (rows, K), dtype), None
    y = sj.ragged_dot(x, sw, gs, sel=sel)
    check_out(y, ref_ragged_dot(x, dense64(sw), gs, sel), int(gs.sum()), dtype, msg)


@pytest.mark.parametrize("glu", ["silu", "gelu"])
@pytest.mark.parametrize("cfg", [sj.SparsityConfig(1, 2, 128), sj.SparsityConfig(2, 4, 32),
                                 sj.SparsityConfig(1, 1, 64)], ids=cfg_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_ragged_dot_fused_glu(glu, cfg, dtype, rng, seed):
    """glu= fuses act(x @ gate) * (x @ up) over the halves of M (float32, rounded once)."""
    f = 2 * cfg.m_multiple
    sw = make_sw(rng, cfg, dtype, m=2 * f)
    tokens, rows = 40, 33
    x = rand(rng, (tokens, K), dtype)
    sel = random_sel(rng, rows, tokens)
    gs = group_sizes_case("short", rng, E, rows)
    y = sj.ragged_dot(x, sw, gs, sel, glu=glu)
    ref = ref_glu(ref_ragged_dot(np.asarray(x, np.float64), dense64(sw), gs, sel), glu)
    check_out(y, ref, int(gs.sum()), dtype, f"seed={seed} glu={glu}")
    # The same through dot, jit and vmap.
    y1 = jax.jit(lambda a: sj.dot(a, sw[1], glu=glu))(x)
    check_out(y1, ref_glu(np.asarray(x, np.float64) @ dense64(sw[1]), glu), tokens, dtype,
              f"seed={seed} dot")
    yb = jax.vmap(lambda a: sj.ragged_dot(a, sw, gs, sel, glu=glu))(jnp.stack([x, -x]))
    np.testing.assert_array_equal(np.asarray(yb[0]), np.asarray(y))


def test_fused_glu_grad_and_refusals(rng, seed):
    cfg = sj.SparsityConfig(1, 2, 128)
    sw = make_sw(rng, cfg, jnp.float16, m=128)
    x = rand(rng, (12, K), jnp.float16)
    gs = jnp.asarray([5, 0, 7, 0], jnp.int32)

    def unfused(a):
        gu = sj.ragged_dot(a, sw, gs).astype(jnp.float32)
        return jax.nn.silu(gu[:, :64]) * gu[:, 64:]

    ct = rand(rng, (12, 64), jnp.float32)
    g_fused = jax.grad(lambda a: (sj.ragged_dot(a, sw, gs, glu="silu") * ct).sum())(x)
    g_ref = jax.grad(lambda a: (unfused(a) * ct).sum())(x)
    assert rel_err(g_fused, g_ref) < tol("product_row", jnp.float16), seed
    with pytest.raises(ValueError, match=re.escape("glu='relu' must be one of ['gelu', 'silu']")):
        sj.ragged_dot(x, sw, gs, glu="relu")
    odd = make_sw(rng, cfg, jnp.float16, m=96)  # F = 48 is not a multiple of 32
    with pytest.raises(ValueError, match=re.escape("needs the weight's M=96 to be [gate | up]")):
        sj.ragged_dot(x, odd, gs, glu="silu")


def test_ragged_dot_single_expert_and_more_tokens_than_rows(rng, seed):
    cfg = sj.SparsityConfig(1, 4, 128)
    sw = make_sw(rng, cfg, jnp.float16, e=1, k=512, m=64)
    x = rand(rng, (50, 512), jnp.float16)
    sel = random_sel(rng, 9, 50)
    gs = jnp.asarray([7], jnp.int32)
    y = sj.ragged_dot(x, sw, gs, sel)
    check_out(y, ref_ragged_dot(x, dense64(sw), gs, sel), 7, jnp.float16, f"seed={seed}")


def test_sel_entries_past_the_groups_are_not_read(rng, seed):
    """Rows at or past sum(group_sizes) are padding: their sel entries may hold anything."""
    cfg = sj.SparsityConfig(2, 4, 32)
    sw = make_sw(rng, cfg, jnp.bfloat16)
    tokens, rows = 16, 30
    gs = jnp.asarray([3, 0, 5, 4], jnp.int32)
    sel = np.asarray(rng.integers(0, tokens, rows), np.int32)
    sel[12:] = np.where(np.arange(rows - 12) % 2, -1, tokens + 7)
    x = rand(rng, (tokens, K), jnp.bfloat16)
    y = sj.ragged_dot(x, sw, gs, jnp.asarray(sel))
    check_out(y, ref_ragged_dot(x, dense64(sw), gs, sel), 12, jnp.bfloat16, f"seed={seed}")


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["vec", "mat", "batch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dot(lead, dtype, rng, seed):
    cfg = ALL_CONFIGS[int(rng.integers(0, len(ALL_CONFIGS)))]
    sw = make_sw(rng, cfg, dtype, e=0, k=384, m=192)
    assert sw.shape == (384, 192)
    x = rand(rng, (*lead, 384), dtype)
    y = sj.dot(x, sw)
    assert y.shape == (*lead, 192)
    x64 = np.asarray(x, np.float64).reshape(-1, 384)
    ref = x64 @ dense64(sw)
    check_out(y.reshape(-1, 192), ref, ref.shape[0], dtype, f"seed={seed} cfg={cfg_id(cfg)}")


# --- jit --------------------------------------------------------------------------------

@pytest.mark.parametrize("use_sel", [False, True], ids=["nosel", "sel"])
def test_jit_matches_eager(use_sel, rng, seed):
    cfg, dtype = sj.SparsityConfig(1, 2, 64), jnp.float16
    sw = make_sw(rng, cfg, dtype)
    rows, tokens = 40, 33
    gs = group_sizes_case("short", rng, E, rows)
    sel = random_sel(rng, rows, tokens) if use_sel else None
    x = rand(rng, (tokens if use_sel else rows, K), dtype)
    f = jax.jit(lambda x, sw, gs, sel: sj.ragged_dot(x, sw, gs, sel=sel))
    y = f(x, sw, gs, sel)
    msg = f"seed={seed} gs={gs.tolist()}"
    np.testing.assert_array_equal(np.asarray(y), np.asarray(sj.ragged_dot(x, sw, gs, sel)),
                                  err_msg=msg)
    check_out(y, ref_ragged_dot(x, dense64(sw), gs, sel), int(gs.sum()), dtype, msg)
    # New group sizes reuse the compiled function (they are data, not shapes).
    gs2 = group_sizes_case("one_expert_all", rng, E, rows)
    check_out(f(x, sw, gs2, sel), ref_ragged_dot(x, dense64(sw), gs2, sel), rows, dtype,
              msg + f" gs2={gs2.tolist()}")
    yd = jax.jit(sj.dot)(x, sw[1])
    check_out(yd, np.asarray(x, np.float64) @ dense64(sw[1]), x.shape[0], dtype, msg + " dot")


# --- vmap -------------------------------------------------------------------------------

def _take(a, axis, b):
    if axis is None:
        return a
    return jax.tree_util.tree_map(lambda leaf: jnp.take(leaf, b, axis=axis), a)


def check_vmapped(f, args, in_axes, size, dtype, msg, clip=False):
    """vmap(f)(*args) equals f on each batch member exactly (same kernel, same rows) and
    the float64 reference of each member."""
    y = jax.vmap(f, in_axes=in_axes)(*args)
    for b in range(size):
        x, sw, gs, sel = (_take(a, ax, b) for a, ax in zip(args, in_axes))
        rows = x.shape[0] if sel is None else sel.shape[0]
        valid = min(int(np.sum(gs)), rows)
        ref = ref_ragged_dot(x, dense64(sw), gs, sel, rows=rows)
        check_out(y[b], ref, valid, dtype, f"{msg} batch {b} gs={np.asarray(gs).tolist()}")
        if not clip:
            np.testing.assert_array_equal(np.asarray(y[b]),
                                          np.asarray(f(x, sw, gs, sel)),
                                          err_msg=f"{msg} batch {b}")
    return y


def rd(x, sw, gs, sel):
    return sj.ragged_dot(x, sw, gs, sel=sel)


def rd_nosel(x, sw, gs, sel=None):
    return sj.ragged_dot(x, sw, gs)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_vmap_batched_x(dtype, rng, seed):
    sw = make_sw(rng, sj.SparsityConfig(1, 2, 128), dtype)
    b, rows = 3, 21
    x = rand(rng, (b, rows, K), dtype)
    gs = group_sizes_case("short", rng, E, rows)
    check_vmapped(rd_nosel, (x, sw, gs, None),
                  (0, None, None, None), b, dtype, f"seed={seed}")


def test_vmap_batched_x_and_group_sizes(rng, seed):
    dtype = jnp.bfloat16
    sw = make_sw(rng, sj.SparsityConfig(2, 4, 64), dtype)
    b, rows = 4, 19
    x = rand(rng, (b, rows, K), dtype)
    gs = jnp.stack([group_sizes_case(c, rng, E, rows)
                    for c in ("random", "short", "all_zero", "one_expert_all")])
    f = lambda x, sw, gs: rd_nosel(x, sw, gs)
    y = jax.vmap(f, in_axes=(0, None, 0))(x, sw, gs)
    for i in range(b):
        check_out(y[i], ref_ragged_dot(x[i], dense64(sw), gs[i]), int(gs[i].sum()), dtype,
                  f"seed={seed} batch {i} gs={gs[i].tolist()}")
        np.testing.assert_array_equal(np.asarray(y[i]), np.asarray(f(x[i], sw, gs[i])))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_vmap_batched_sel(dtype, rng, seed):
    sw = make_sw(rng, sj.SparsityConfig(1, 4, 32), dtype)
    b, rows, tokens = 3, 26, 11
    x = rand(rng, (tokens, K), dtype)
    sel = jnp.asarray(rng.integers(0, tokens, (b, rows)), jnp.int32)
    gs = group_sizes_case("zero_one_odd", rng, E, rows)
    check_vmapped(rd, (x, sw, gs, sel), (None, None, None, 0), b, dtype, f"seed={seed}")


def test_vmap_everything_batched(rng, seed):
    dtype = jnp.float16
    sw = make_sw(rng, sj.SparsityConfig(1, 1, 64), dtype)
    b, rows, tokens = 3, 24, 13
    x = rand(rng, (b, tokens, K), dtype)
    sel = jnp.asarray(rng.integers(0, tokens, (b, rows)), jnp.int32)
    gs = jnp.stack([group_sizes_case(c, rng, E, rows) for c in ("random", "short", "zero_one_odd")])
    check_vmapped(rd, (x, sw, gs, sel), (0, None, 0, 0), b, dtype, f"seed={seed}")


def test_vmap_mixed_axes(rng, seed):
    """Batch axes that are not leading, and None axes mixed with batched ones."""
    dtype = jnp.bfloat16
    sw = make_sw(rng, sj.SparsityConfig(1, 2, 32), dtype)
    b, rows, tokens = 2, 17, 9
    # x batched on axis 1, group sizes batched on axis 1 ([E, B]), no sel.
    x = rand(rng, (rows, b, K), dtype)
    gs = jnp.stack([group_sizes_case("short", rng, E, rows),
                    group_sizes_case("random", rng, E, rows)], axis=1)
    check_vmapped(rd_nosel, (x, sw, gs, None),
                  (1, None, 1, None), b, dtype, f"seed={seed} x axis 1")
    # x unbatched, sel batched on axis 1 ([R, B]), group sizes batched on axis 0.
    xt = rand(rng, (tokens, K), dtype)
    sel = jnp.asarray(rng.integers(0, tokens, (rows, b)), jnp.int32)
    gs2 = jnp.stack([group_sizes_case("zero_one_odd", rng, E, rows),
                     group_sizes_case("one_expert_all", rng, E, rows)])
    check_vmapped(rd, (xt, sw, gs2, sel), (None, None, 0, 1), b, dtype,
                  f"seed={seed} sel axis 1")


def test_vmap_batched_weight(rng, seed):
    """A stacked-layers weight [B, E, K, M] mapped over its leading axis."""
    dtype = jnp.float16
    cfg = sj.SparsityConfig(2, 4, 128)
    b, rows, tokens = 2, 20, 15
    w = rand(rng, (b, E, K, M), dtype)
    sw = sj.encode(sj.prune(w, cfg), cfg)
    assert sw.shape == (b, E, K, M)
    x = rand(rng, (b, tokens, K), dtype)
    sel = jnp.asarray(rng.integers(0, tokens, (rows,)), jnp.int32)
    gs = group_sizes_case("random", rng, E, rows)
    check_vmapped(rd, (x, sw, gs, sel), (0, 0, None, None), b, dtype, f"seed={seed}")


def test_vmap_nested_and_jitted(rng, seed):
    dtype = jnp.bfloat16
    sw = make_sw(rng, sj.SparsityConfig(1, 2, 128), dtype)
    b1, b2, rows = 2, 3, 14
    x = rand(rng, (b1, b2, rows, K), dtype)
    gs = jnp.asarray(rng.integers(0, 5, (b2, E)), jnp.int32)
    gs = jnp.minimum(gs, rows // E)
    f = jax.jit(jax.vmap(jax.vmap(lambda x, gs: sj.ragged_dot(x, sw, gs), (0, 0)), (0, None)))
    y = f(x, gs)
    w64 = dense64(sw)
    for i in range(b1):
        for j in range(b2):
            check_out(y[i, j], ref_ragged_dot(x[i, j], w64, gs[j]), int(gs[j].sum()), dtype,
                      f"seed={seed} batch {i},{j} gs={gs[j].tolist()}")


# Routings that one batch member's unbatched call refuses on the CPU: (what, the member's
# group sizes for E=4 experts and R=12 rows, the sel entry to plant and where, or None).
BAD_MEMBER_ROUTING = {
    "sel_T": ([3, 2, 4, 1], (5, "T")),               # the next member's first token
    "sel_minus_1": ([3, 2, 4, 1], (0, -1)),          # the previous member's last token
    "sel_huge": ([3, 2, 4, 1], (9, 2**31 - 1)),      # overflows sel + member offset
    "negative_size": ([3, -2, 4, 1], None),
    "size_past_rows": ([3, 2, 4, 9], None),          # sum 18 > R
    "size_near_2_31": ([3, 2**31 - 1, 4, 2**31 - 1], None),   # the int32 sum wraps
}


def cuda_meaning(x, w64, gs, sel, rows):
    """What the CUDA kernels compute for any routing (docs/bad_inputs.md): a negative size
    counts as 0, each range is clipped to the rows left, a sel entry outside [0, T) reads
    a zero row. float64 ``[rows, M]``."""
    x64 = f64(x)
    out = np.zeros((rows, w64.shape[-1]))
    for e, r, t in routed_rows(gs, rows, sel, x64.shape[0]):
        out[r] = x64[t] @ w64[e]
    return out


def eval_with_cuda_meaning(fn, *args):
    """``fn(*args)`` with every sparse product computed as the CUDA kernels would
    (:func:`cuda_meaning`): the vmap rule's folded call runs as the GPU would run it."""
    from jax.extend.core import Literal
    from samoyeds_jax.ops import ragged_dot_p

    closed = jax.make_jaxpr(fn)(*args)

    def product(x, values, indices, metadata, sel, gs, *, config, has_sel, glu, kernel):
        assert not glu
        w64 = f64(decode_jit(sj.SparseWeight.tree_unflatten(config, (values, indices,
                                                                    metadata))))
        rows = sel.shape[0] if has_sel else x.shape[0]
        y = cuda_meaning(x, w64, gs, np.asarray(sel) if has_sel else None, rows)
        return jnp.asarray(y, x.dtype)

    env = dict(zip(closed.jaxpr.constvars, closed.consts))
    env.update(zip(closed.jaxpr.invars, jax.tree_util.tree_leaves(args)))
    read = lambda v: v.val if isinstance(v, Literal) else env[v]
    for eqn in closed.jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if eqn.primitive is ragged_dot_p:
            outs = [product(*ins, **eqn.params)]
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in closed.jaxpr.outvars]


def _bad_member_inputs(case, rng, x_batched):
    dtype = jnp.bfloat16
    sw = make_sw(rng, sj.SparsityConfig(1, 2, 32), dtype)
    b, rows, tokens = 3, 12, 7
    x = rand(rng, (b, tokens, K) if x_batched else (tokens, K), dtype)
    sel = np.asarray(rng.integers(0, tokens, (b, rows)), np.int32)
    gs = np.stack([random_partition(rng, E, rows - 2) for _ in range(b)])
    sizes, plant = BAD_MEMBER_ROUTING[case]
    gs[1] = np.asarray(sizes, np.int64).astype(np.int32)
    if plant is not None:
        sel[1, plant[0]] = tokens if plant[1] == "T" else plant[1]
    return sw, x, jnp.asarray(gs), jnp.asarray(sel), rows


@pytest.mark.parametrize("x_batched", [False, True], ids=["x_shared", "x_batched"])
def test_vmap_refuses_what_a_member_refuses(x_batched, rng, seed):
    """A member's bad routing (checked against its own T and R) is refused under vmap as
    the member's own call refuses it, eager and jitted, on the CPU handler."""
    refused = (jax.errors.JaxRuntimeError, ValueError)
    one = jax.jit(lambda x, sw, g, s: sj.ragged_dot(x, sw, g, s))
    batched = jax.jit(jax.vmap(lambda x, sw, g, s: sj.ragged_dot(x, sw, g, s),
                               (0 if x_batched else None, None, 0, 0)))
    for i, case in enumerate(BAD_MEMBER_ROUTING):
        sw, x, gs, sel, rows = _bad_member_inputs(case, rng, x_batched)
        msg = f"seed={seed} {case}"
        with pytest.raises(refused, match="INVALID_ARGUMENT"):
            jax.block_until_ready(one(x[1] if x_batched else x, sw, gs[1], sel[1]))
        with pytest.raises(refused, match="INVALID_ARGUMENT"):
            jax.block_until_ready(batched(x, sw, gs, sel))
            pytest.fail(f"{msg}: jit(vmap) accepted it")
        if i == 0:
            with pytest.raises(refused, match="INVALID_ARGUMENT"):
                jax.block_until_ready(jax.vmap(lambda x, g, s: sj.ragged_dot(x, sw, g, s),
                                               (0 if x_batched else None, 0, 0))(x, gs, sel))
        # The well-routed members, batched, still give their own results exactly.
        ok = jnp.asarray([0, 2])
        y = batched(x[ok] if x_batched else x, sw, gs[ok], sel[ok])
        for j, m in enumerate([0, 2]):
            np.testing.assert_array_equal(
                np.asarray(y[j]), np.asarray(one(x[m] if x_batched else x, sw, gs[m], sel[m])),
                err_msg=msg)


@pytest.mark.parametrize("x_batched", [False, True], ids=["x_shared", "x_batched"])
@pytest.mark.parametrize("case", list(BAD_MEMBER_ROUTING))
def test_vmap_keeps_each_members_cuda_meaning(case, x_batched, rng, seed):
    """Where the CUDA kernels cannot refuse, the vmap rule's folded call gives every
    member exactly its own call's meaning: no member reads another member's tokens or
    rows (checked by running the folded call as the GPU would, on the CPU)."""
    sw, x, gs, sel, rows = _bad_member_inputs(case, rng, x_batched)
    f = jax.vmap(lambda x, g, s: sj.ragged_dot(x, sw, g, s), (0 if x_batched else None, 0, 0))
    (y,) = eval_with_cuda_meaning(f, x, gs, sel)
    w64 = dense64(sw)
    for m in range(gs.shape[0]):
        want = cuda_meaning(x[m] if x_batched else x, w64, gs[m], np.asarray(sel[m]), rows)
        np.testing.assert_array_equal(np.asarray(y[m]), np.asarray(want.astype(jnp.bfloat16)),
                                      err_msg=f"seed={seed} member {m} gs={gs[m].tolist()}")


def test_transpose_of_bad_routing_stays_in_bounds(rng, seed):
    """The gradient w.r.t. x shares the CUDA meaning of bad routing: a sel entry outside
    [0, T) (a zero row) receives nothing, never a token at the other end; negative or
    oversized group sizes are read as the kernels read them. linear_transpose runs only
    the transpose rule (no forward that the CPU would refuse)."""
    dtype = jnp.bfloat16
    sw = make_sw(rng, sj.SparsityConfig(1, 2, 64), dtype)
    rows, tokens = 14, 9
    x = rand(rng, (tokens, K), dtype)
    sel = np.asarray(rng.integers(0, tokens, rows), np.int32)
    sel[[1, 4]] = [-1, tokens]
    ct = rand(rng, (rows, M), dtype)
    w64 = dense64(sw)
    for gs in ([4, -3, 6, 2], [5, 2**31 - 1, 3, 1], [3, 3, 3, 3]):
        gs = jnp.asarray(gs, jnp.int32)
        f = lambda x: sj.ragged_dot(x, sw, gs, jnp.asarray(sel))
        (dx,) = jax.linear_transpose(f, x)(ct)
        want = np.zeros((tokens, K))
        start = 0
        for e, g in enumerate(np.asarray(gs).tolist()):
            size = min(max(g, 0), rows - start)
            for r in range(start, start + size):
                if 0 <= sel[r] < tokens:
                    want[sel[r]] += w64[e] @ f64(ct[r])
            start += size
        err = rel_err(dx, want)
        assert err <= tol("product_row", dtype), f"seed={seed} gs={gs.tolist()}: {err:.3g}"
        assert not np.asarray(dx, np.float64)[np.abs(want).sum(-1) == 0].any(), \
            f"seed={seed} gs={gs.tolist()}: gradient reached a token no valid row reads"


# --- routing arrays: any integer dtype whose values fit int32, checked -----------------

def test_routing_arrays_of_other_integer_dtypes(rng, seed):
    sw = make_sw(rng, sj.SparsityConfig(1, 2, 128), jnp.bfloat16)
    x = rand(rng, (10, K), jnp.bfloat16)
    gs32 = jnp.asarray([3, 0, 4, 2], jnp.int32)
    sel32 = jnp.asarray(rng.integers(0, 10, 12), jnp.int32)
    want = np.asarray(sj.ragged_dot(x, sw, gs32, sel32))
    for dt in (np.int64, np.uint64, np.uint32, np.int16, np.uint8):
        got = sj.ragged_dot(x, sw, np.asarray(gs32).astype(dt), np.asarray(sel32).astype(dt))
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{np.dtype(dt).name}")
    np.testing.assert_array_equal(
        np.asarray(sj.ragged_dot(x, sw, [3, 0, 4, 2], np.asarray(sel32).tolist())), want)
    # Values that do not fit int32 are refused, never wrapped ([2**32 + 3, ...] is not 3).
    for bad, name, where in (
            (np.asarray([2**32 + 3, 0, 4, 2], np.int64), "group_sizes", "[0] = 4294967299"),
            (np.asarray([3, 0, -2**31 - 1, 2], np.int64), "group_sizes", "[2] = -2147483649"),
            (np.asarray([3, 0, 4, 2**31], np.uint32), "group_sizes", "[3] = 2147483648")):
        with pytest.raises(ValueError, match=re.escape(f"{name}{where} does not fit int32")):
            sj.ragged_dot(x, sw, bad, sel32)
    big_sel = np.asarray(sel32).astype(np.uint64)
    big_sel[5] = 2**32 + 1
    with pytest.raises(ValueError, match=re.escape("sel[5] = 4294967297 does not fit int32")):
        sj.ragged_dot(x, sw, gs32, big_sel)
    with pytest.raises(TypeError, match="group_sizes must be an int32 array"):
        sj.ragged_dot(x, sw, [2**70, 0, 4, 2], sel32)


def test_routing_arrays_under_jit(rng, seed):
    """Traced, a dtype no wider than int32 is converted exactly; a wider one is refused at
    trace time (its values are unknown), naming the argument."""
    sw = make_sw(rng, sj.SparsityConfig(1, 2, 128), jnp.bfloat16)
    x = rand(rng, (10, K), jnp.bfloat16)
    gs = jnp.asarray([3, 0, 4, 2], jnp.int32)
    sel = jnp.asarray(rng.integers(0, 10, 12), jnp.int32)
    want = np.asarray(sj.ragged_dot(x, sw, gs, sel))
    f = jax.jit(lambda g, s: sj.ragged_dot(x, sw, g, s))
    np.testing.assert_array_equal(np.asarray(f(gs.astype(jnp.uint8), sel.astype(jnp.int16))),
                                  want)
    with pytest.raises(TypeError, match="sel is a traced uint32 array"):
        f(gs, sel.astype(jnp.uint32))
    with pytest.raises(TypeError, match="group_sizes is a traced uint32 array"):
        jax.vmap(lambda g: sj.ragged_dot(x, sw, g, sel))(gs[None].astype(jnp.uint32))
    with jax.enable_x64(True):
        with pytest.raises(TypeError, match="group_sizes is a traced int64 array"):
            f(gs.astype(jnp.int64), sel)
        np.testing.assert_array_equal(np.asarray(f(gs, sel)), want)


def test_vmap_dot(rng, seed):
    dtype = jnp.bfloat16
    sw = make_sw(rng, sj.SparsityConfig(1, 2, 128), dtype, e=0)
    x = rand(rng, (4, 3, K), dtype)
    y = jax.vmap(sj.dot, in_axes=(1, None))(x, sw)
    assert y.shape == (3, 4, M)
    ref = np.einsum("bik,km->ibm", np.asarray(x, np.float64), dense64(sw))
    check_out(y.reshape(-1, M), ref.reshape(-1, M), 12, dtype, f"seed={seed}")


# --- autodiff (w.r.t. x; w.r.t. the kept values: test_grad.py) -------------------------

@pytest.mark.parametrize("use_sel", [False, True], ids=["nosel", "sel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_grad_wrt_x(dtype, use_sel, rng, seed):
    cfg = sj.SparsityConfig(1, 2, 64) if use_sel else sj.SparsityConfig(2, 4, 128)
    sw = make_sw(rng, cfg, dtype)
    rows, tokens = 31, 17
    gs = group_sizes_case("short", rng, E, rows)
    x = rand(rng, (tokens if use_sel else rows, K), dtype)
    sel = random_sel(rng, rows, tokens) if use_sel else None
    ct = rng.standard_normal((rows, M)).astype(np.float32)
    loss = lambda x: jnp.sum(sj.ragged_dot(x, sw, gs, sel=sel).astype(jnp.float32) * ct)
    ref = ref_grad_x(ct, dense64(sw), gs, sel, x.shape[0])
    msg = f"seed={seed} gs={gs.tolist()}"
    for name, g in [("grad", jax.grad(loss)(x)), ("jit(grad)", jax.jit(jax.grad(loss))(x))]:
        assert g.dtype == jnp.dtype(dtype) and g.shape == x.shape, f"{msg} {name}"
        g64 = np.asarray(g, np.float64)
        assert np.isfinite(g64).all(), f"{msg} {name}"
        untouched = np.abs(ref).sum(-1) == 0      # tokens/rows that no valid row reads
        assert (g64[untouched] == 0).all(), f"{msg} {name}: gradient leaks into unused rows"
        err = rel_err(g64, ref)
        assert err <= tol("product_row", dtype), f"{msg} {name}: relative error {err:.3g}"


def test_jvp_wrt_x(rng, seed):
    dtype = jnp.bfloat16
    sw = make_sw(rng, sj.SparsityConfig(1, 4, 128), dtype)
    rows, tokens = 22, 30
    gs = group_sizes_case("zero_one_odd", rng, E, rows)
    sel = random_sel(rng, rows, tokens)
    x, tx = rand(rng, (tokens, K), dtype), rand(rng, (tokens, K), dtype)
    f = lambda x: sj.ragged_dot(x, sw, gs, sel)
    y, ty = jax.jvp(f, (x,), (tx,))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(f(x)))
    np.testing.assert_array_equal(np.asarray(ty), np.asarray(f(tx)))
    check_out(ty, ref_ragged_dot(tx, dense64(sw), gs, sel), int(gs.sum()), dtype,
              f"seed={seed}")


def test_vmap_of_grad(rng, seed):
    dtype = jnp.float16
    sw = make_sw(rng, sj.SparsityConfig(1, 1, 32), dtype)
    b, rows, tokens = 3, 18, 12
    x = rand(rng, (b, tokens, K), dtype)
    sel = jnp.asarray(rng.integers(0, tokens, (b, rows)), jnp.int32)
    gs = jnp.stack([group_sizes_case(c, rng, E, rows) for c in ("random", "short", "all_zero")])
    ct = rng.standard_normal((b, rows, M)).astype(np.float32)
    loss = lambda x, gs, sel, ct: jnp.sum(sj.ragged_dot(x, sw, gs, sel).astype(jnp.float32) * ct)
    g = jax.vmap(jax.grad(loss))(x, gs, sel, ct)
    w64 = dense64(sw)
    for i in range(b):
        ref = ref_grad_x(ct[i], w64, gs[i], sel[i], tokens)
        err = rel_err(g[i], ref)
        assert err <= tol("product_row", dtype), f"seed={seed} batch {i}: relative error {err:.3g}"
        assert (np.asarray(g[i], np.float64)[np.abs(ref).sum(-1) == 0] == 0).all()


def test_second_order_wrt_x(rng, seed):
    """loss = |y|^2 / 2 has Hessian-vector product H v = J^T J v: forward-over-reverse,
    reverse-over-reverse and jax.hessian (vmap of forward-over-reverse) all give it."""
    dtype = jnp.float16
    sw = make_sw(rng, sj.SparsityConfig(1, 2, 32), dtype)
    rows, tokens = 16, 12
    gs = group_sizes_case("short", rng, E, rows)
    sel = random_sel(rng, rows, tokens)
    x, v = rand(rng, (tokens, K), dtype), rand(rng, (tokens, K), dtype)
    loss = lambda x: 0.5 * jnp.sum(sj.ragged_dot(x, sw, gs, sel).astype(jnp.float32) ** 2)
    w64 = dense64(sw)
    ref = ref_grad_x(ref_ragged_dot(v, w64, gs, sel), w64, gs, sel, tokens)
    msg = f"seed={seed} gs={gs.tolist()}"
    fwd_rev = jax.jit(lambda x, v: jax.jvp(jax.grad(loss), (x,), (v,))[1])(x, v)
    rev_rev = jax.jit(jax.grad(lambda x, v: jnp.vdot(jax.grad(loss)(x).astype(jnp.float32),
                                                     v.astype(jnp.float32))))(x, v)
    for name, hv in [("fwd-over-rev", fwd_rev), ("rev-over-rev", rev_rev)]:
        err = rel_err(hv, ref)
        assert err <= tol("product_row", dtype), f"{msg} {name}: relative error {err:.3g}"
    # jax.hessian on a few coordinates of x (it vmaps forward-over-reverse).
    sub = lambda z: loss(x.at[0, :3].set(z.astype(dtype)))
    h = np.asarray(jax.jit(jax.hessian(sub))(jnp.asarray(x[0, :3], jnp.float32)), np.float64)
    src = np.asarray(sel)[: int(gs.sum())]
    e_of = np.repeat(np.arange(E), np.asarray(gs))
    want = sum(w64[e][:3] @ w64[e][:3].T for e, t in zip(e_of, src) if t == 0)
    want = np.zeros((3, 3)) if np.isscalar(want) else want
    bound = 2 * tol("product_row", dtype)  # two products: J^T J v
    assert np.abs(h - want).max() <= bound * max(np.abs(want).max(), 1), msg


def test_grad_through_dot(rng, seed):
    dtype = jnp.bfloat16
    sw = make_sw(rng, sj.SparsityConfig(2, 4, 32), dtype, e=0)
    x = rand(rng, (2, 5, K), dtype)
    ct = rng.standard_normal((2, 5, M)).astype(np.float32)
    g = jax.grad(lambda x: jnp.sum(sj.dot(x, sw).astype(jnp.float32) * ct))(x)
    ref = np.asarray(ct, np.float64) @ dense64(sw).T
    err = rel_err(g, ref)
    assert err <= tol("product_row", dtype), f"seed={seed}: relative error {err:.3g}"


# --- bad inputs: clear Python errors before any kernel runs ----------------------------

def _bad_cases():
    def c(fn, exc, pattern):
        return fn, exc, pattern

    return {
        "x_float32": c(lambda d: sj.ragged_dot(d.x.astype(jnp.float32), d.sw, d.gs),
                       TypeError, "x must be bfloat16 or float16, got float32"),
        "x_int32": c(lambda d: sj.ragged_dot(d.x.astype(jnp.int32), d.sw, d.gs),
                     TypeError, "x must be bfloat16 or float16, got int32"),
        "x_weight_dtype_mismatch": c(lambda d: sj.ragged_dot(d.x.astype(jnp.float16), d.sw, d.gs),
                                     TypeError, "x dtype float16 must match the weight dtype bfloat16"),
        "x_rank3": c(lambda d: sj.ragged_dot(d.x[None], d.sw, d.gs),
                     ValueError, re.escape("x must be 2-D [T, K]")),
        "x_rank1": c(lambda d: sj.ragged_dot(d.x[0], d.sw, d.gs),
                     ValueError, re.escape("x must be 2-D [T, K]")),
        "k_mismatch": c(lambda d: sj.ragged_dot(d.x[:, :128], d.sw, d.gs),
                        ValueError, f"x has K=128 in_features but the weight has K={K}"),
        "group_sizes_length": c(lambda d: sj.ragged_dot(d.x, d.sw, d.gs[:3]),
                                ValueError, re.escape(f"group_sizes must be int32[{E}]")),
        "group_sizes_float": c(lambda d: sj.ragged_dot(d.x, d.sw, d.gs.astype(jnp.float32)),
                               (ValueError, TypeError), re.escape(f"group_sizes must be int32[{E}]")),
        "group_sizes_rank2": c(lambda d: sj.ragged_dot(d.x, d.sw, d.gs[None]),
                               ValueError, re.escape(f"group_sizes must be int32[{E}]")),
        "sel_float": c(lambda d: sj.ragged_dot(d.x, d.sw, d.gs, d.sel.astype(jnp.float32)),
                       (ValueError, TypeError), re.escape("sel must be int32[R]")),
        "sel_rank2": c(lambda d: sj.ragged_dot(d.x, d.sw, d.gs, d.sel.reshape(2, -1)),
                       (ValueError, TypeError), re.escape("sel must be int32[R]")),
        "sw_no_expert_axis_to_ragged_dot": c(
            lambda d: sj.ragged_dot(d.x, d.sw[0], d.gs),
            ValueError, re.escape("sw must be [E, K, M] (with an expert axis)")),
        "sw_dense_to_ragged_dot": c(lambda d: sj.ragged_dot(d.x, decode_jit(d.sw), d.gs),
                                    TypeError, "sw must be a SparseWeight"),
        "sw_expert_axis_to_dot": c(lambda d: sj.dot(d.x, d.sw),
                                   ValueError, re.escape("sw must be [K, M] (no expert axis)")),
        "dot_k_mismatch": c(lambda d: sj.dot(d.x[:, :128], d.sw[0]),
                            ValueError, re.escape(f"x must be [..., K] with K={K}")),
        "dot_scalar_x": c(lambda d: sj.dot(d.x[0, 0], d.sw[0]),
                          ValueError, re.escape(f"x must be [..., K] with K={K}")),
        "dot_x_float32": c(lambda d: sj.dot(d.x.astype(jnp.float32), d.sw[0]),
                           TypeError, "x must be bfloat16 or float16, got float32"),
        "dot_dtype_mismatch": c(lambda d: sj.dot(d.x.astype(jnp.float16), d.sw[0]),
                                TypeError, "must match the weight dtype"),
        "indices_dtype": c(lambda d: sj.ragged_dot(d.x, sj.SparseWeight(
            d.sw.values, d.sw.indices.astype(jnp.int32), d.sw.metadata, d.sw.config), d.gs),
            ValueError, re.escape("sw.indices must be uint8")),
        "metadata_shape": c(lambda d: sj.ragged_dot(d.x, sj.SparseWeight(
            d.sw.values, d.sw.indices, d.sw.metadata[:, :, :4], d.sw.config), d.gs),
            ValueError, re.escape("sw.metadata must be uint32")),
    }


BAD = _bad_cases()


class _Inputs:
    def __init__(self, rng):
        self.sw = make_sw(rng, sj.SparsityConfig(1, 2, 128), jnp.bfloat16)
        self.x = rand(rng, (24, K), jnp.bfloat16)
        self.gs = jnp.asarray([5, 0, 6, 7], jnp.int32)
        self.sel = random_sel(rng, 24, 24)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_before_any_kernel(case, rng):
    fn, exc, pattern = BAD[case]
    d = _Inputs(rng)
    with pytest.raises(exc, match=pattern):
        fn(d)
    # The same error comes from shape evaluation alone (no kernel can run there) and
    # from tracing under jit.
    with pytest.raises(exc, match=pattern):
        jax.eval_shape(lambda: fn(d))
    with pytest.raises(exc, match=pattern):
        jax.jit(lambda: fn(d)).lower()


# --- edge sizes and non-finite inputs (the reliability matrix, docs/bad_inputs.md) ------

def test_zero_rows_and_zero_tokens(rng):
    sw = make_sw(rng, sj.SparsityConfig(1, 2, 128), jnp.bfloat16)
    gs0 = jnp.zeros((E,), jnp.int32)
    x = rand(rng, (5, K), jnp.bfloat16)
    y = jax.jit(sj.ragged_dot)(x, sw, gs0, jnp.zeros((0,), jnp.int32))        # R = 0
    assert y.shape == (0, M)
    y = jax.jit(sj.ragged_dot)(x[:0], sw, gs0)                                # T = R = 0
    assert y.shape == (0, M)
    sel = jnp.zeros((7,), jnp.int32)
    y = jax.jit(sj.ragged_dot)(x, sw, gs0, sel)             # rows exist, no group owns them
    assert y.shape == (7, M) and not np.asarray(y, np.float64).any()
    assert jax.jit(sj.dot)(x[:0], sw[0]).shape == (0, M)


def test_nan_and_inf_propagate_without_crashing(rng):
    cfg = sj.SparsityConfig(1, 2, 128)
    sw = make_sw(rng, cfg, jnp.bfloat16)
    x = np.asarray(rand(rng, (12, K), jnp.bfloat16)).copy()
    x[3, :] = np.nan                     # a whole NaN token
    x[7, 5] = np.inf                     # one infinite feature
    gs = jnp.asarray([4, 4, 0, 4], jnp.int32)
    y = np.asarray(jax.jit(sj.ragged_dot)(jnp.asarray(x), sw, gs), np.float64)
    # NaN reaches every output whose stored weights read the token (as in a sparse matmul:
    # an output column with no stored weight stays 0, where a dense matmul gives NaN).
    touched = dense64(sw)[0].any(axis=0)
    assert np.isnan(y[3][touched]).all()
    assert (np.isnan(y[3]) | (y[3] == 0)).all()
    assert not np.isfinite(y[7]).all()   # Inf reaches the rows whose stored weights read it
    clean = [r for r in range(12) if r not in (3, 7)]
    ref = ref_ragged_dot(np.where(np.isfinite(x), x, 0), dense64(sw), gs)
    bound = tol("product_row", jnp.bfloat16)
    np.testing.assert_allclose(y[clean], ref[clean], rtol=bound, atol=bound * np.abs(ref).max())


def test_concurrent_use_from_two_jitted_functions(rng):
    """Two different jitted programs on the primitive, driven from two threads at once,
    each checked against its own reference on every call."""
    import concurrent.futures

    cfg_a, cfg_b = sj.SparsityConfig(1, 2, 128), sj.SparsityConfig(2, 4, 64)
    sw_a, sw_b = make_sw(rng, cfg_a, jnp.bfloat16), make_sw(rng, cfg_b, jnp.float16)
    fa = jax.jit(lambda x, gs, sel: sj.ragged_dot(x, sw_a, gs, sel))
    fb = jax.jit(lambda x, gs: sj.ragged_dot(x, sw_b, gs))
    cases = []
    for i in range(6):
        gs = jnp.asarray(random_partition(rng, E, 20), jnp.int32)
        sel = random_sel(rng, 24, 16)
        xa, xb = rand(rng, (16, K), jnp.bfloat16), rand(rng, (24, K), jnp.float16)
        cases.append((xa, xb, gs, sel, ref_ragged_dot(xa, dense64(sw_a), gs, sel),
                      ref_ragged_dot(xb, dense64(sw_b), gs)))

    def run(which):
        worst = 0.0
        for _ in range(3):
            for xa, xb, gs, sel, ra, rb in cases:
                y, r = ((fa(xa, gs, sel), ra) if which == "a" else (fb(xb, gs), rb))
                y = np.asarray(y, np.float64)
                worst = max(worst, np.linalg.norm(y - r) / np.linalg.norm(r))
        return worst

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        errs = list(pool.map(run, ["a", "b"]))
    assert errs[0] < tol("product", jnp.bfloat16) and errs[1] < tol("product", jnp.float16), errs


def test_forced_kernel_choice_is_checked():
    assert sj.ops.KernelChoice("stream", 3).splits == 3
    for bad in (9, -1, 2.0):
        with pytest.raises(ValueError, match=r"splits=.* must be 0 \(automatic\) or a count up to 8"):
            sj.ops.KernelChoice("stream", bad)
    with pytest.raises(ValueError, match="kernel='fast' must be one of"):
        sj.ops.KernelChoice("fast")
