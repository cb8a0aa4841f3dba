"""The C++ handler's own argument checks (ffi/problem.h, ffi/cpu_ops.cc).

The FFI target is called directly with jax.ffi.ffi_call, bypassing the Python shape rules,
with one inconsistent buffer or attribute at a time; the handler must refuse it with an
INVALID_ARGUMENT error whose message carries its own words.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samoyeds_jax as sj
from helpers import rand, sparse_weight
from samoyeds_jax import ops  # noqa: F401  (registers the FFI target)

TARGET = "samoyeds_ragged_dot"
CFG = sj.SparsityConfig(1, 2, 128)
E, K, M = 2, 256, 64          # Mk = 32, K/L = 2, K/32 = 8
T, R = 24, 30                 # tokens of x, rows of out (with sel)
DT = jnp.bfloat16


def _buffers(rng, has_sel: bool):
    sw = sparse_weight(rng, CFG, DT, (E, K, M))
    x = rand(rng, (T, K), DT)
    rows = R if has_sel else T
    gs = jnp.asarray([rows // 3, rows // 2], jnp.int32)
    sel = (jnp.asarray(rng.integers(0, T, R), jnp.int32) if has_sel
           else jnp.zeros((0,), jnp.int32))
    return dict(x=x, values=sw.values, indices=sw.indices, metadata=sw.metadata, sel=sel,
                group_sizes=gs, n=CFG.n, v=CFG.v, sub_row=CFG.sub_row, has_sel=int(has_sel),
                glu=0, kernel=0, splits=0, out=jax.ShapeDtypeStruct((rows, M), DT)), sw


def call(b):
    f = jax.ffi.ffi_call(TARGET, b["out"])
    y = f(b["x"], b["values"], b["indices"], b["metadata"], b["sel"], b["group_sizes"],
          n=np.int64(b["n"]), v=np.int64(b["v"]), sub_row=np.int64(b["sub_row"]),
          has_sel=np.int64(b["has_sel"]), glu=np.int64(b["glu"]),
          kernel=np.int64(b["kernel"]), splits=np.int64(b["splits"]))
    return jax.block_until_ready(y)


def expect_refusal(b, words: str):
    # XLA reports the handler's INVALID_ARGUMENT as a JaxRuntimeError, or as a ValueError
    # when the call goes through the C++ dispatch fast path (a cached executable).
    with pytest.raises((jax.errors.JaxRuntimeError, ValueError), match=re.escape(words)) as info:
        call(b)
    assert "INVALID_ARGUMENT" in str(info.value) and "samoyeds_ragged_dot: " in str(info.value)


@pytest.mark.parametrize("has_sel", [0, 1], ids=["nosel", "sel"])
def test_direct_call_matches_ragged_dot(has_sel, rng, seed):
    """Control: consistent buffers are accepted and give the library's result exactly."""
    b, sw = _buffers(rng, bool(has_sel))
    y = call(b)
    want = sj.ragged_dot(b["x"], sw, b["group_sizes"], b["sel"] if has_sel else None)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want), err_msg=f"seed={seed}")
    assert np.isfinite(np.asarray(y, np.float32)).all()
    assert (np.asarray(y, np.float32)[int(b["group_sizes"].sum()):] == 0).all()


def _tamper(b, case, rng):
    """Make buffer set `b` inconsistent in one way; return the handler's words for it."""
    if case == "unsupported_v":
        b["v"] = 3
        return "unsupported config n=1 v=3 sub_row=128"
    if case == "unsupported_sub_row":
        b["sub_row"] = 256
        return "unsupported config n=1 v=2 sub_row=256"
    if case == "unsupported_n":
        b["n"] = 2
        return "unsupported config n=2 v=2 sub_row=128"
    if case == "x_rank":
        b["x"] = b["x"][None]
        return f"x must be [T, K], got [1, {T}, {K}]"
    if case == "x_dtype":
        b["x"] = b["x"].astype(jnp.float32)
        return "x must be bfloat16 or float16"
    if case == "values_dtype":
        b["values"] = b["values"].astype(jnp.float16)
        return "values and out must have x's dtype"
    if case == "out_dtype":
        b["out"] = jax.ShapeDtypeStruct(b["out"].shape, jnp.float16)
        return "values and out must have x's dtype"
    if case == "values_rank":
        b["values"] = b["values"][0]
        return f"values must be [E, Mk, K/2], got [32, {K // 2}]"
    if case == "values_k":
        b["values"] = b["values"][:, :, : K // 4]
        return f"values [{E}, 32, {K // 4}] do not match K={K}"
    if case == "x_k_not_multiple_of_sub_row":
        b["x"] = b["x"][:, :192]
        b["values"] = b["values"][:, :, :96]
        return "do not match K=192 (K must be a multiple of sub_row=128)"
    if case == "kept_rows":
        b["values"] = b["values"][:, :8]
        return "kept rows Mk=8 must be a multiple of 16"
    if case == "indices_shape":
        b["indices"] = b["indices"][:, :, :1]
        return f"indices must be [E, Mk, K/L] = [{E}, 32, 2], got [{E}, 32, 1]"
    if case == "indices_experts":
        b["indices"] = jnp.concatenate([b["indices"]] * 2)
        return f"indices must be [E, Mk, K/L] = [{E}, 32, 2], got [{2 * E}, 32, 2]"
    if case == "metadata_shape":
        b["metadata"] = b["metadata"][:, :16]
        return f"metadata must be [E, Mk, K/32] = [{E}, 32, 8], got [{E}, 16, 8]"
    if case == "group_sizes_shape":
        b["group_sizes"] = jnp.asarray([1, 1, 1], jnp.int32)
        return f"group_sizes must be [E] = [{E}], got [3]"
    if case == "sel_rank":
        b["sel"] = b["sel"].reshape(2, -1)
        return f"sel must be [R], got [2, {R // 2}]"
    if case == "sel_without_has_sel":
        b["has_sel"] = 0
        return "sel must be empty when has_sel=0"
    if case == "out_rows":
        b["out"] = jax.ShapeDtypeStruct((R + 1, M), DT)
        return f"out must be [R, M] = [{R}, {M}], got [{R + 1}, {M}]"
    if case == "out_cols":
        b["out"] = jax.ShapeDtypeStruct((R, M // 2), DT)
        return f"out must be [R, M] = [{R}, {M}], got [{R}, {M // 2}]"
    if case == "negative_group_size":
        b["group_sizes"] = jnp.asarray([5, -1], jnp.int32)
        return "group_sizes[1] is negative"
    if case == "group_sizes_exceed_rows":
        b["group_sizes"] = jnp.asarray([R - 3, 4], jnp.int32)
        return f"sum(group_sizes)={R + 1} exceeds the R={R} output rows"
    if case == "sel_too_large":
        i = int(rng.integers(0, int(b["group_sizes"].sum())))
        b["sel"] = b["sel"].at[i].set(T)
        return f"sel[{i}]={T} is not a token id in [0, {T})"
    if case == "sel_negative":
        i = int(rng.integers(0, int(b["group_sizes"].sum())))
        b["sel"] = b["sel"].at[i].set(-3)
        return f"sel[{i}]=-3 is not a token id in [0, {T})"
    if case == "glu_unknown":
        b["glu"] = 3
        return "unknown glu=3"
    if case == "glu_out_cols":  # a fused GLU writes [R, M/2]
        b["glu"] = 1
        return f"out must be [R, M/2] = [{R}, {M // 2}], got [{R}, {M}]"
    if case == "glu_half_not_whole_tiles":  # M = 2F with F = 16: Mk/2 = 8 kept rows
        b["glu"] = 1
        b["values"], b["indices"], b["metadata"] = (
            b[k][:, :16] for k in ("values", "indices", "metadata"))
        b["out"] = jax.ShapeDtypeStruct((R, 16), DT)
        return "a fused GLU needs M=32 = 2F with F a multiple of 32"
    if case == "kernel_unknown":
        b["kernel"] = 7
        return "unknown kernel=7"
    if case == "splits_too_many":
        b["splits"] = 9
        return "splits=9 must be 0 (automatic) or at most 8"
    if case == "indices_value_ge_v":
        e, r, w = int(rng.integers(0, E)), int(rng.integers(0, 32)), int(rng.integers(0, 2))
        bad = int(rng.integers(CFG.v, 256))
        b["indices"] = b["indices"].at[e, r, w].set(bad)
        b["group_sizes"] = jnp.asarray([5, 6], jnp.int32)   # both experts have rows
        return f"indices value {bad} at expert {e}, kept row {r}, window {w} is not below V=2"
    raise AssertionError(case)


CASES = ["unsupported_v", "unsupported_sub_row", "unsupported_n", "x_rank", "x_dtype",
         "values_dtype", "out_dtype", "values_rank", "values_k", "x_k_not_multiple_of_sub_row",
         "kept_rows", "indices_shape", "indices_experts", "metadata_shape",
         "group_sizes_shape", "sel_rank", "sel_without_has_sel", "out_rows", "out_cols",
         "negative_group_size", "group_sizes_exceed_rows", "sel_too_large", "sel_negative",
         "glu_unknown", "glu_out_cols", "glu_half_not_whole_tiles", "kernel_unknown",
         "splits_too_many", "indices_value_ge_v"]


@pytest.mark.parametrize("case", CASES)
def test_handler_refuses_inconsistent_buffers(case, rng, seed):
    b, _ = _buffers(rng, has_sel=True)
    words = _tamper(b, case, rng)
    print(f"seed={seed} expecting: {words}")
    expect_refusal(b, words)


@pytest.mark.parametrize("case", ["negative_group_size", "out_rows", "indices_value_ge_v"])
def test_handler_refuses_without_sel(case, rng):
    b, _ = _buffers(rng, has_sel=False)
    if case == "negative_group_size":
        b["group_sizes"] = jnp.asarray([-2, 3], jnp.int32)
        words = "group_sizes[0] is negative"
    elif case == "out_rows":
        b["out"] = jax.ShapeDtypeStruct((T - 1, M), DT)
        words = f"out must be [R, M] = [{T}, {M}], got [{T - 1}, {M}]"
    else:
        b["indices"] = b["indices"].at[1, 31, 1].set(2)
        words = "indices value 2 at expert 1, kept row 31, window 1 is not below V=2"
    expect_refusal(b, words)


def test_handler_ignores_sel_past_the_groups(rng, seed):
    """sel is only checked (and read) for rows below sum(group_sizes)."""
    b, sw = _buffers(rng, has_sel=True)
    used = int(b["group_sizes"].sum())
    b["sel"] = b["sel"].at[used:].set(-7)
    y = call(b)
    assert (np.asarray(y, np.float32)[used:] == 0).all(), f"seed={seed}"


@pytest.mark.parametrize("case", ["indices_not_increasing", "metadata_unordered"])
def test_handler_refuses_weights_breaking_the_format(case, rng, seed):
    """The CPU handler refuses, on every call, what sj.validate refuses (here for a weight
    whose arrays never went through a check): the kernel never computes a product that
    sj.decode and the gradient would read differently."""
    b, _ = _buffers(rng, has_sel=True)
    e, r, w = int(rng.integers(0, E)), int(rng.integers(0, 16)) * 2, int(rng.integers(0, 2))
    if case == "indices_not_increasing":      # 2:4: kept rows 2b, 2b+1 share a block
        sw = sparse_weight(rng, sj.SparsityConfig(2, 4, 128), DT, (E, K, M))
        b.update(values=sw.values, indices=sw.indices, metadata=sw.metadata, n=2, v=4)
        b["indices"] = b["indices"].at[e, r + 1, w].set(b["indices"][e, r, w])
        words = (f"indices value {int(b['indices'][e, r, w])} at expert {e}, kept row "
                 f"{r + 1}, window {w} does not increase over the previous kept row")
    else:
        word = int(b["metadata"][e, r, w])
        b["metadata"] = b["metadata"].at[e, r, w].set((word & ~0xF00) | 0xA00)  # (2, 2)
        words = (f"metadata word of expert {e}, row {r}, column {w} (hardware order) holds "
                 f"a 2:4 group whose two positions are not increasing")
    print(f"seed={seed} expecting: {words}")
    expect_refusal(b, words)
