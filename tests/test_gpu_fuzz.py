"""Hypothesis property tests of the CUDA ragged_dot against a float64 reference.

Skipped cleanly without a GPU, exactly like tests/test_gpu.py (marker ``gpu`` plus the
same skipif). Each example draws a config (every N:V x sub_row, bf16/fp16), a shape from a
small fixed grid (so the jit cache stays small: at most one program per example), a group
layout (free sizes with empty experts and a padded tail, one expert taking every row, all
empty) and, with SEL, a routing (uniform, a few hot tokens, the bounds of x) with garbage
in the padding entries that must not be read. Array contents come from a drawn seed, so
the falsifying example printed by hypothesis is enough to replay a failure; the run's seed
follows SAMOYEDS_TEST_SEED (tests/conftest.py). The reference and the tolerances
(``product`` whole, ``product_row`` worst row) are those of tests/helpers.py.

There is no CPU property test of ragged_dot to share a strategy with (tests/test_ops.py
enumerates cases; test_format.py's hypothesis tests cover prune/encode only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import samoyeds_jax as sj
from helpers import f64, has_gpu, rand, ref_ragged_dot, sparse_weight, tol
from samoyeds_jax.format import SUPPORTED_NV, SUPPORTED_SUB_ROWS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU"),
]

# The shape grid: K and M as multiples of the config's minimum, R rows, T tokens.
EXPERTS, K_MULTS, M_MULTS, ROWS, TOKENS = (1, 3, 8), (1, 3), (1, 4), (1, 45, 300), (7, 64)
LAYOUTS = ("free", "free", "free", "one_expert_all", "all_empty")
SEL_KINDS = ("none", "uniform", "few_tokens", "bounds")
# deadline=None: an example's first compile is slow. Health checks time data generation
# only (draws touch no device), so they are left on: a 3 s first example passed them.
HYP = settings(max_examples=60, deadline=None)

RD = jax.jit(sj.ragged_dot)


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    v: int
    sub_row: int
    dtype: str
    e: int
    k: int
    m: int
    rows: int
    group_sizes: tuple[int, ...]
    sel_kind: str
    tokens: int
    garbage_padding: bool
    seed: int

    @property
    def cfg(self) -> sj.SparsityConfig:
        return sj.SparsityConfig(self.n, self.v, self.sub_row)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n, v = draw(st.sampled_from(SUPPORTED_NV), label="nv")
    sub_row = draw(st.sampled_from(SUPPORTED_SUB_ROWS), label="sub_row")
    cfg = sj.SparsityConfig(n, v, sub_row)
    e = draw(st.sampled_from(EXPERTS), label="E")
    rows = draw(st.sampled_from(ROWS), label="R")
    layout = draw(st.sampled_from(LAYOUTS), label="layout")
    if layout == "free":
        counts = np.asarray(draw(st.lists(st.integers(0, rows), min_size=e, max_size=e)))
        fill = draw(st.one_of(st.just(rows), st.integers(0, rows)), label="fill")
        gs = np.diff(np.minimum(np.cumsum(counts), fill), prepend=0)
    else:
        gs = np.zeros(e, np.int64)
        if layout == "one_expert_all":
            gs[draw(st.integers(0, e - 1), label="hot expert")] = rows
    sel_kind = draw(st.sampled_from(SEL_KINDS), label="sel")
    return Case(
        n, v, sub_row, draw(st.sampled_from(["bfloat16", "float16"]), label="dtype"), e,
        cfg.k_multiple * draw(st.sampled_from(K_MULTS), label="K mult"),
        cfg.m_multiple * draw(st.sampled_from(M_MULTS), label="M mult"),
        rows, tuple(int(g) for g in gs), sel_kind,
        draw(st.sampled_from(TOKENS), label="T") if sel_kind != "none" else 0,
        draw(st.booleans(), label="garbage padding") if sel_kind != "none" else False,
        draw(st.integers(0, 2**32 - 1), label="seed"))


def make_inputs(c: Case) -> tuple[sj.SparseWeight, np.ndarray, np.ndarray, np.ndarray | None]:
    """(weight, x, group_sizes, sel or None) of a case, numpy except the weight."""
    rng = np.random.default_rng(c.seed)
    sw = sparse_weight(rng, c.cfg, c.dtype, (c.e, c.k, c.m), scale=1 / np.sqrt(c.k / 4))
    x = np.asarray(rand(rng, (c.tokens or c.rows, c.k), c.dtype))
    gs = np.asarray(c.group_sizes, np.int32)
    if c.sel_kind == "none":
        return sw, x, gs, None
    sel = {"uniform": lambda: rng.integers(0, c.tokens, c.rows),
           "few_tokens": lambda: rng.integers(0, min(c.tokens, 2), c.rows),
           "bounds": lambda: np.where(rng.random(c.rows) < 0.5, 0, c.tokens - 1)}[c.sel_kind]()
    if c.garbage_padding:  # entries past sum(group_sizes) are not read
        total = int(gs.sum())
        sel[total:] = np.asarray([-1, c.tokens, 2**31 - 1])[np.arange(c.rows - total) % 3]
    return sw, x, gs, sel.astype(np.int32)


@HYP
@given(cases())
def test_ragged_dot_matches_float64_reference(c: Case):
    sw, x, gs, sel = make_inputs(c)
    args = (jnp.asarray(x), sw, jnp.asarray(gs), None if sel is None else jnp.asarray(sel))
    y = RD(*args)
    assert y.shape == (c.rows, c.m) and y.dtype == jnp.dtype(c.dtype), (y.shape, y.dtype)
    y = np.asarray(y)
    y64 = y.astype(np.float64)
    total = int(gs.sum())
    assert np.isfinite(y64).all(), "non-finite output (an unwritten row?)"
    assert not y64[total:].any(), f"rows at or past sum(group_sizes)={total} are not zero"
    ref = ref_ragged_dot(x, f64(sj.decode(sw)), gs, sel)[:total]
    head = y64[:total]
    if total:
        err, bound = np.linalg.norm(head - ref) / np.linalg.norm(ref), tol("product", c.dtype)
        assert err <= bound, f"relative error {err:.3g} > {bound}"
        row = np.linalg.norm(head - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
        bound = tol("product_row", c.dtype)
        assert row.max() <= bound, \
            f"row {int(row.argmax())} relative error {row.max():.3g} > {bound}"
    # Same inputs, same bits (no atomics in the kernel).
    np.testing.assert_array_equal(np.asarray(RD(*args)).view(np.uint16), y.view(np.uint16))
