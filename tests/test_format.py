"""samoyeds_jax.format: SparsityConfig, prune, encode, decode, swap_metadata, SparseWeight.

The checks here do not trust the library's own helpers: the pattern checker, the
hardware -> canonical metadata conversion and the decoder below are written from the
format's statement (docs/format.md, ffi/format.h) in plain numpy.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import samoyeds_jax as sj
from helpers import DTYPES, f64, rand, rel_err, sparse_weight, tol
from samoyeds_jax import _samoyeds
from samoyeds_jax import format as F

# The spec's supported set (checked against what the module reports).
SPEC_NV = {(1, 1), (1, 2), (1, 4), (2, 4)}
SPEC_SUB_ROWS = {32, 64, 128}
ALL_CONFIGS = [sj.SparsityConfig(n, v, L) for (n, v) in sorted(SPEC_NV)
               for L in sorted(SPEC_SUB_ROWS)]
# Shape limits of the property tests (the suite must stay fast on 2 CPU cores).
MAX_K, MAX_M, MAX_LEAD_AXES, MAX_LEAD_SIZE, MAX_ELEMENTS = 512, 256, 3, 3, 1 << 20
HYP = settings(deadline=None, max_examples=25)
HYP_PER_CONFIG = settings(deadline=None, max_examples=4)

decode_jit = jax.jit(sj.decode)


def cfg_id(cfg: sj.SparsityConfig) -> str:
    return f"{cfg.n}:{cfg.v}-L{cfg.sub_row}"


def dtype_id(dt) -> str:
    return jnp.dtype(dt).name


# --- independent numpy helpers ----------------------------------------------------------

def nonzero_normal(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Random normal values in `dtype` at a random scale, with no exact zeros."""
    return np.asarray(rand(rng, shape, dtype, float(np.exp(rng.uniform(-2.0, 2.0)))))


def as_a(w: np.ndarray) -> np.ndarray:
    """A = W^T per matrix, leading axes flattened: [B, M, K] float64."""
    w = np.asarray(w, np.float64)
    return np.swapaxes(w, -1, -2).reshape(-1, w.shape[-1], w.shape[-2])


def pattern_counts(w: np.ndarray, cfg: sj.SparsityConfig):
    """(nonzeros per 2:4 group [B, M, K/4], nonzero sub-rows per block/window [B, M/V, K/L])."""
    a = as_a(w)
    b, m, k = a.shape
    nz = a != 0
    per_group = nz.reshape(b, m, k // 4, 4).sum(-1)
    per_block = nz.reshape(b, m // cfg.v, cfg.v, k // cfg.sub_row, cfg.sub_row).any(-1).sum(2)
    return per_group, per_block


def hw_to_canonical(hw: np.ndarray) -> np.ndarray:
    """Hardware -> canonical metadata order, from the mma.sp statement in ffi/format.h.

    In every 16-row tile, the hardware word at tile row g + 8t (g < 8, t in {0, 1})
    holds in its low half the canonical bits [16t, 16t + 16) of row g and in its high
    half the same bits of row g + 8.
    """
    hw = np.asarray(hw, np.uint32)
    *lead, mk, words = hw.shape
    t = hw.reshape(-1, mk // 16, 16, words)
    canon = np.zeros_like(t)
    for g in range(8):
        for half in range(2):
            word = t[:, :, g + 8 * half, :]
            canon[:, :, g, :] |= (word & np.uint32(0xFFFF)) << np.uint32(16 * half)
            canon[:, :, g + 8, :] |= (word >> np.uint32(16)) << np.uint32(16 * half)
    return canon.reshape(hw.shape)


def np_decode(sw: sj.SparseWeight) -> np.ndarray:
    """Dense [..., K, M] float64 from the stored arrays, written from the format spec."""
    n, v, L = sw.config.n, sw.config.v, sw.config.sub_row
    values = np.asarray(sw.values, np.float64)
    *lead, mk, half_k = values.shape
    k, m = 2 * half_k, mk // n * v
    bsz = int(np.prod(lead, dtype=np.int64))
    values = values.reshape(bsz, mk, k // 4, 2)
    idx = np.asarray(sw.indices).reshape(bsz, mk, k // L).astype(np.int64)
    canon = hw_to_canonical(np.asarray(sw.metadata)).reshape(bsz, mk, k // 32)
    nib = (canon[..., None] >> (np.uint32(4) * np.arange(8, dtype=np.uint32))) & np.uint32(0xF)
    nib = nib.reshape(bsz, mk, k // 4).astype(np.int64)
    rows = np.zeros((bsz, mk, k // 4, 4))
    np.put_along_axis(rows, (nib & 3)[..., None], values[..., 0:1], axis=-1)
    np.put_along_axis(rows, (nib >> 2)[..., None], values[..., 1:2], axis=-1)
    segs = rows.reshape(bsz, mk, k // L, L)
    a = np.zeros((bsz, m, k // L, L))
    bi = np.arange(bsz)[:, None, None]
    wi = np.arange(k // L)[None, None, :]
    dest = (np.arange(mk) // n * v)[None, :, None] + idx      # A row of kept row r, window w
    a[bi, dest, wi] = segs
    return np.swapaxes(a.reshape(bsz, m, k), -1, -2).reshape(*lead, k, m)


def random_pattern_weight(rng, shape, cfg, dtype) -> np.ndarray:
    """A weight that follows the pattern but is often sparser than it (fewer sub-rows,
    groups with 0 or 1 nonzeros), built directly in numpy (not through prune)."""
    *lead, k, m = shape
    n, v, L = cfg.n, cfg.v, cfg.sub_row
    bsz = int(np.prod(lead, dtype=np.int64))
    rank = rng.random((bsz, m // v, v, k // L)).argsort(2).argsort(2)
    cnt = np.where(rng.random((bsz, m // v, 1, k // L)) < 0.3,
                   rng.integers(0, n + 1, (bsz, m // v, 1, k // L)), n)
    sub_mask = rank < cnt
    grank = rng.random((bsz, m, k // 4, 4)).argsort(-1).argsort(-1)
    gcnt = np.where(rng.random((bsz, m, k // 4, 1)) < 0.3,
                    rng.integers(0, 3, (bsz, m, k // 4, 1)), 2)
    gmask = (grank < gcnt).reshape(bsz, m // v, v, k // L, L)
    mask = (gmask & sub_mask[..., None]).reshape(bsz, m, k)
    a = np.where(mask, nonzero_normal(rng, (bsz, m, k), dtype), np.zeros((), jnp.dtype(dtype)))
    return np.swapaxes(a, -1, -2).reshape(shape)


@st.composite
def weight_shapes(draw, cfg: sj.SparsityConfig):
    k = cfg.sub_row * draw(st.integers(1, MAX_K // cfg.sub_row))
    m = cfg.m_multiple * draw(st.integers(1, MAX_M // cfg.m_multiple))
    lead = tuple(draw(st.lists(st.integers(1, MAX_LEAD_SIZE), max_size=MAX_LEAD_AXES)))
    assume(math.prod(lead) * k * m <= MAX_ELEMENTS)
    return (*lead, k, m)


# --- SparsityConfig ---------------------------------------------------------------------

def test_supported_set_matches_spec():
    assert set(F.SUPPORTED_NV) == SPEC_NV
    assert set(F.SUPPORTED_SUB_ROWS) == SPEC_SUB_ROWS
    assert F.ROW_TILE == 16 and F.GROUP_WIDTH == 4 and F.KEPT_PER_GROUP == 2
    assert F.META_COLS_PER_WORD == 32 and F.META_BITS_PER_GROUP == 4


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=cfg_id)
def test_config_derived_quantities(cfg):
    assert cfg.density == pytest.approx(cfg.n / cfg.v / 2)
    assert cfg.k_multiple == cfg.sub_row
    assert cfg.m_multiple == 16 * cfg.v // cfg.n
    assert cfg.kept_rows(4 * cfg.m_multiple) == 4 * 16
    # Frozen and hashable: it is a static argument of jit.
    assert hash(cfg) == hash(sj.SparsityConfig(cfg.n, cfg.v, cfg.sub_row))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n = 2


def test_config_default_is_1_2_128():
    assert sj.SparsityConfig() == sj.SparsityConfig(n=1, v=2, sub_row=128)


@pytest.mark.parametrize("n,v", [(2, 2), (1, 3), (3, 4), (2, 8), (0, 1), (4, 4), (-1, 2)])
def test_config_rejects_unsupported_nv(n, v):
    with pytest.raises(ValueError, match=re.escape(f"N:V = {n}:{v} is not supported")):
        sj.SparsityConfig(n=n, v=v, sub_row=128)


@pytest.mark.parametrize("sub_row", [0, 16, 96, 256, -32])
def test_config_rejects_unsupported_sub_row(sub_row):
    with pytest.raises(ValueError, match=re.escape(f"sub_row={sub_row} is not supported")):
        sj.SparsityConfig(n=1, v=2, sub_row=sub_row)


@pytest.mark.parametrize("field,value", [("n", 1.0), ("v", "2"), ("sub_row", True),
                                         ("sub_row", None)])
def test_config_rejects_non_int(field, value):
    kw = dict(n=1, v=2, sub_row=128)
    kw[field] = value
    with pytest.raises(TypeError, match=f"SparsityConfig.{field} must be an int"):
        sj.SparsityConfig(**kw)


def test_config_accepts_numpy_ints():
    assert sj.SparsityConfig(np.int64(2), np.int32(4), np.int64(64)) == sj.SparsityConfig(2, 4, 64)


# --- prune ------------------------------------------------------------------------------

@settings(deadline=None, max_examples=15)
@given(data=st.data())
def test_prune_keeps_the_best_pattern(data):
    """prune(w): same shape/dtype, kept values unchanged, the full pattern (every group of
    a kept sub-row keeps 2, N sub-rows per block/window), 2:4 and N:V magnitude-optimal."""
    cfg = data.draw(st.sampled_from(ALL_CONFIGS), label="cfg")
    shape = data.draw(weight_shapes(cfg), label="shape")
    dtype = data.draw(st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32]), label="dtype")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    msg = f"seed={seed} cfg={cfg} shape={shape} dtype={jnp.dtype(dtype).name}"
    w = nonzero_normal(np.random.default_rng(seed), shape, dtype)
    wp = sj.prune(jnp.asarray(w), cfg)
    assert wp.shape == w.shape and wp.dtype == w.dtype, msg
    wp = np.asarray(wp)
    kept = wp != 0
    np.testing.assert_array_equal(wp[kept], w[kept], err_msg=msg)
    per_group, per_block = pattern_counts(wp, cfg)
    assert (per_block == cfg.n).all(), msg           # inputs have no zeros: the pattern is full
    a_w, a_p = as_a(w), as_a(wp)
    b, m, k = a_w.shape
    g_w = np.abs(a_w).reshape(b, m, k // 4, 4)
    g_kept = (a_p != 0).reshape(b, m, k // 4, 4)
    sub_kept = g_kept.any(-1)                        # [B, M, K/4]: group of a kept sub-row
    assert (per_group[sub_kept] == 2).all() and (per_group[~sub_kept] == 0).all(), msg
    # 2:4 optimality inside kept sub-rows: every kept |w| >= every dropped |w| of its group.
    min_kept = np.where(g_kept, g_w, np.inf).min(-1)
    max_drop = np.where(~g_kept, g_w, -np.inf).max(-1)
    assert (min_kept[sub_kept] >= max_drop[sub_kept]).all(), msg
    # N:V optimality: the kept sub-rows have the most energy after 2:4 (float32 sums in
    # the library, float64 here: compare with a small relative slack).
    top2 = np.sort(g_w, -1)[..., 2:]
    energy = (top2 ** 2).sum(-1).reshape(b, m // cfg.v, cfg.v, k // cfg.sub_row, -1).sum(-1)
    sub_is_kept = sub_kept.reshape(b, m // cfg.v, cfg.v, k // cfg.sub_row, -1).any(-1)
    min_kept_e = np.where(sub_is_kept, energy, np.inf).min(2)
    max_drop_e = np.where(~sub_is_kept, energy, -np.inf).max(2)
    assert (min_kept_e >= max_drop_e * (1 - 1e-5)).all(), msg


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=cfg_id)
def test_prune_ties_go_to_lower_index(cfg, rng, seed):
    """Equal magnitudes everywhere: positions 0, 1 of each group and sub-rows 0..N-1."""
    k, m = cfg.sub_row * 2, cfg.m_multiple * 2
    sign = np.where(rng.random((k, m)) < 0.5, -1.0, 1.0)
    w = jnp.asarray(sign * 0.75, jnp.bfloat16)
    wp = np.asarray(sj.prune(w, cfg), np.float64)
    a = wp.T.reshape(m // cfg.v, cfg.v, k // 4, 4)
    want = np.zeros_like(a, dtype=bool)
    want[:, :cfg.n, :, :2] = True
    np.testing.assert_array_equal(a != 0, want, err_msg=f"seed={seed}")


@pytest.mark.parametrize("cfg", [ALL_CONFIGS[0], ALL_CONFIGS[-1]], ids=cfg_id)
def test_prune_is_idempotent_and_jittable(cfg, rng, seed):
    w = jnp.asarray(nonzero_normal(rng, (2, cfg.sub_row * 2, cfg.m_multiple * 2), jnp.float16))
    wp = sj.prune(w, cfg)
    np.testing.assert_array_equal(np.asarray(sj.prune(wp, cfg)), np.asarray(wp),
                                  err_msg=f"seed={seed}")
    np.testing.assert_array_equal(
        np.asarray(jax.jit(sj.prune, static_argnums=1)(w, cfg)), np.asarray(wp),
        err_msg=f"seed={seed}")


@pytest.mark.parametrize("fn", ["prune", "encode"])
def test_shape_errors_name_the_axis(fn, rng):
    cfg = sj.SparsityConfig(1, 2, 128)
    f = getattr(sj, fn)
    bad_k = nonzero_normal(rng, (2, 100, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=re.escape("K (in_features, axis -2) = 100 must be a "
                                                   "multiple of sub_row=128")):
        f(bad_k, cfg)
    bad_m = nonzero_normal(rng, (256, 48), jnp.bfloat16)
    with pytest.raises(ValueError, match=re.escape("M (out_features, axis -1) = 48 must be a "
                                                   "multiple of 32 for N:V = 1:2")):
        f(bad_m, cfg)
    with pytest.raises(ValueError, match=r"must be \[\.\.\., K, M\]"):
        f(nonzero_normal(rng, (256,), jnp.bfloat16), cfg)


def test_prune_rejects_bad_dtype_and_config(rng):
    cfg = sj.SparsityConfig(1, 2, 128)
    with pytest.raises(TypeError, match="w must be a floating dtype, got int32"):
        sj.prune(np.ones((128, 32), np.int32), cfg)
    with pytest.raises(TypeError, match="cfg must be a SparsityConfig"):
        sj.prune(nonzero_normal(rng, (128, 32), jnp.bfloat16), (1, 2, 128))


# --- encode / decode --------------------------------------------------------------------

@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=cfg_id)
@HYP_PER_CONFIG
@given(data=st.data())
def test_round_trip_exact(cfg, data):
    """decode(encode(prune(w))) == prune(w) exactly, for every config and random shapes."""
    shape = data.draw(weight_shapes(cfg), label="shape")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    msg = f"seed={seed} cfg={cfg} shape={shape} dtype={jnp.dtype(dtype).name}"
    w = nonzero_normal(np.random.default_rng(seed), shape, dtype)
    wp = sj.prune(jnp.asarray(w), cfg)
    sw = sj.encode(wp, cfg)
    *lead, k, m = shape
    mk = m * cfg.n // cfg.v
    assert sw.shape == tuple(shape) and sw.dtype == jnp.dtype(dtype) and sw.config == cfg, msg
    assert sw.values.shape == (*lead, mk, k // 2) and sw.values.dtype == jnp.dtype(dtype), msg
    assert sw.indices.shape == (*lead, mk, k // cfg.sub_row), msg
    assert sw.indices.dtype == jnp.uint8, msg
    assert sw.metadata.shape == (*lead, mk, k // 32) and sw.metadata.dtype == jnp.uint32, msg
    dense = decode_jit(sw)
    assert dense.shape == tuple(shape) and dense.dtype == jnp.dtype(dtype), msg
    np.testing.assert_array_equal(np.asarray(dense, np.float64), np.asarray(wp, np.float64),
                                  err_msg=msg)


@HYP
@given(data=st.data())
def test_encode_matches_the_format_statement(data):
    """Weights that follow the pattern loosely (missing sub-rows, groups with 0 or 1
    nonzeros), encoded: the stored arrays decode (by the spec, in numpy) to the weight,
    indices are increasing per block and below V, and each metadata nibble names two
    increasing positions."""
    cfg = data.draw(st.sampled_from(ALL_CONFIGS), label="cfg")
    shape = data.draw(weight_shapes(cfg), label="shape")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    msg = f"seed={seed} cfg={cfg} shape={shape} dtype={jnp.dtype(dtype).name}"
    wp = random_pattern_weight(np.random.default_rng(seed), shape, cfg, dtype)
    sw = sj.encode(wp, cfg)
    want = np.asarray(wp, np.float64)
    np.testing.assert_array_equal(np_decode(sw), want, err_msg=msg)
    np.testing.assert_array_equal(np.asarray(decode_jit(sw), np.float64), want, err_msg=msg)
    *lead, k, m = shape
    idx = np.asarray(sw.indices).astype(np.int64).reshape(-1, m // cfg.v, cfg.n, k // cfg.sub_row)
    assert (idx < cfg.v).all() and (np.diff(idx, axis=2) > 0).all(), msg
    canon = hw_to_canonical(np.asarray(sw.metadata))
    nib = (canon[..., None] >> (np.uint32(4) * np.arange(8, dtype=np.uint32))) & np.uint32(0xF)
    assert ((nib & 3) < (nib >> 2)).all(), msg


@pytest.mark.parametrize("lead", [(), (2, 3)], ids=["2d", "lead2x3"])
@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=cfg_id)
def test_encode_rejects_broken_2_4_and_names_where(cfg, lead, rng, seed):
    k, m = cfg.sub_row * 2, cfg.m_multiple * 2
    w = nonzero_normal(rng, (*lead, k, m), jnp.bfloat16)
    wp = np.array(sj.prune(jnp.asarray(w), cfg))
    loc = tuple(int(rng.integers(0, s)) for s in lead)
    mat = wp[loc]                                           # [K, M] view
    ks, ms = np.nonzero(mat)
    i = rng.integers(0, len(ks))
    kk, mm = int(ks[i]), int(ms[i])                         # a kept value
    g0 = kk - kk % 4
    zero_pos = [c for c in range(g0, g0 + 4) if mat[c, mm] == 0]
    mat[zero_pos[0], mm] = 1.5                              # a 3rd nonzero in its group
    where = f"wp[{', '.join(map(str, loc))}]" if lead else "wp"
    want = (f"{where} breaks 2:4: out_feature {mm}, in_features {g0}..{g0 + 3} hold 3 "
            f"nonzeros, at most 2 allowed")
    with pytest.raises(ValueError, match=re.escape(want)):
        sj.encode(wp, cfg)


@pytest.mark.parametrize("lead", [(), (3,)], ids=["2d", "lead3"])
@pytest.mark.parametrize("cfg", [c for c in ALL_CONFIGS if c.n < c.v], ids=cfg_id)
def test_encode_rejects_broken_nv_and_names_where(cfg, lead, rng, seed):
    n, v, L = cfg.n, cfg.v, cfg.sub_row
    k, m = L * 2, cfg.m_multiple * 2
    w = nonzero_normal(rng, (*lead, k, m), jnp.float16)
    wp = np.array(sj.prune(jnp.asarray(w), cfg))
    loc = tuple(int(rng.integers(0, s)) for s in lead)
    mat = wp[loc]
    b, win = int(rng.integers(0, m // v)), int(rng.integers(0, k // L))
    seg = mat[win * L:(win + 1) * L, b * v:(b + 1) * v]      # [L, V]
    dropped = [j for j in range(v) if not seg[:, j].any()]
    assert len(dropped) == v - n, f"seed={seed}"
    mat[win * L + int(rng.integers(0, L)), b * v + dropped[0]] = -2.0
    where = f"wp[{', '.join(map(str, loc))}]" if lead else "wp"
    want = (f"{where} breaks N:V = {n}:{v}: out_features {b * v}..{b * v + v - 1}, "
            f"in_features {win * L}..{win * L + L - 1} have {n + 1} nonzero sub-rows, "
            f"at most {n} allowed")
    with pytest.raises(ValueError, match=re.escape(want)):
        sj.encode(wp, cfg)


def test_encode_rejects_non_16_bit_dtypes(rng):
    cfg = sj.SparsityConfig(1, 2, 64)
    wp = sj.prune(jnp.asarray(nonzero_normal(rng, (128, 64), jnp.float32)), cfg)
    with pytest.raises(TypeError, match="wp must be bfloat16 or float16 for encoding, got float32"):
        sj.encode(wp, cfg)
    with pytest.raises(TypeError, match="wp must be a floating dtype"):
        sj.encode(np.ones((128, 64), np.int8), cfg)
    with pytest.raises(TypeError, match="cfg must be a SparsityConfig"):
        sj.encode(np.asarray(wp, jnp.bfloat16), "1:2")


def test_decode_rejects_non_sparse_weight(rng):
    with pytest.raises(TypeError, match="sw must be a SparseWeight"):
        sj.decode(nonzero_normal(rng, (128, 64), jnp.bfloat16))


# --- swap_metadata ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, 1), (32, 4), (3, 48, 16), (2, 2, 16, 8)])
def test_swap_metadata_is_the_hardware_order_and_an_involution(shape, rng, seed):
    meta = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
    sw_np = F.swap_metadata(meta)
    assert isinstance(sw_np, np.ndarray) and sw_np.dtype == np.uint32
    np.testing.assert_array_equal(sw_np, hw_to_canonical(meta), err_msg=f"seed={seed}")
    np.testing.assert_array_equal(F.swap_metadata(sw_np), meta, err_msg=f"seed={seed}")
    sw_jnp = F.swap_metadata(jnp.asarray(meta))
    assert isinstance(sw_jnp, jax.Array)
    np.testing.assert_array_equal(np.asarray(sw_jnp), sw_np, err_msg=f"seed={seed}")
    # The C++ converter (format.h's SwappedMetaWord, used by the handlers) agrees.
    flat = meta.reshape(-1, shape[-1])
    mats = flat.reshape(-1, shape[-2], shape[-1])
    for i, src in enumerate(mats):
        dst = np.full_like(src, 0xDEADBEEF)
        _samoyeds.swap_metadata(np.ascontiguousarray(src), dst)
        np.testing.assert_array_equal(dst, sw_np.reshape(mats.shape)[i], err_msg=f"seed={seed}")


def test_swap_metadata_cpp_argument_checks(rng):
    src = rng.integers(0, 2**32, size=(24, 2), dtype=np.uint32)
    with pytest.raises(ValueError, match="rows must be a multiple of ROW_TILE"):
        _samoyeds.swap_metadata(src, np.empty_like(src))
    src = rng.integers(0, 2**32, size=(16, 2), dtype=np.uint32)
    with pytest.raises(ValueError, match="dst must have src's shape"):
        _samoyeds.swap_metadata(src, np.empty((16, 3), np.uint32))


# --- SparseWeight -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_sparse_weight_properties(dtype, rng, seed):
    cfg = sj.SparsityConfig(2, 4, 64)
    e, k, m = 3, 192, 96
    wp = sj.prune(jnp.asarray(nonzero_normal(rng, (e, k, m), dtype)), cfg)
    sw = sj.encode(wp, cfg)
    mk = m * 2 // 4
    assert sw.shape == (e, k, m) and sw.ndim == 3
    assert sw.dtype == jnp.dtype(dtype) and sw.config == cfg
    assert sw.nbytes == e * mk * (k // 2 * 2 + k // 64 * 1 + k // 32 * 4)
    assert sw.nbytes < wp.nbytes
    assert "SparseWeight(shape=(3, 192, 96)" in repr(sw)
    # Indexing the expert axis.
    one = sw[1]
    assert one.shape == (k, m) and one.config == cfg
    np.testing.assert_array_equal(np.asarray(decode_jit(one), np.float64),
                                  np.asarray(wp[1], np.float64), err_msg=f"seed={seed}")
    with pytest.raises(IndexError):
        one[0]
    # A pytree: three array leaves, config in the static part, survives jit.
    leaves, treedef = jax.tree_util.tree_flatten(sw)
    assert len(leaves) == 3
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(again, sj.SparseWeight) and again.config == cfg
    again_jit = jax.jit(lambda s: jax.tree_util.tree_map(lambda a: a, s))(sw)
    assert isinstance(again_jit, sj.SparseWeight) and again_jit.config == cfg
    np.testing.assert_array_equal(np.asarray(decode_jit(again_jit), np.float64),
                                  np.asarray(wp, np.float64), err_msg=f"seed={seed}")


# --- validate: arrays from outside (a checkpoint) are refused before any kernel ---------

@pytest.mark.parametrize("nv", [(1, 2), (2, 4)])
def test_validate_accepts_encoded_and_refuses_tampering(nv, rng):
    cfg = sj.SparsityConfig(*nv, sub_row=32)
    sw = sparse_weight(rng, cfg, jnp.bfloat16, (2, 64, cfg.m_multiple * 2))
    assert sj.validate(sw) is sw
    idx = np.asarray(sw.indices).copy()
    idx[1, 3, 0] = cfg.v  # out of range
    with pytest.raises(ValueError, match=r"sw\.indices\[1, 3, 0\] = .* not below V"):
        sj.validate(sj.SparseWeight(sw.values, idx, sw.metadata, cfg))
    if cfg.n > 1:
        idx = np.asarray(sw.indices).copy()
        idx[0, 1, 0] = idx[0, 0, 0]  # two kept rows of a block name the same sub-row
        with pytest.raises(ValueError, match="not distinct and increasing"):
            sj.validate(sj.SparseWeight(sw.values, idx, sw.metadata, cfg))
    meta = np.asarray(sw.metadata).copy()
    meta[0, 5, 1] = np.uint32(0x44444444) | np.uint32(0x5)  # group 0: positions (1, 1)
    canon_bad = sj.format.swap_metadata(meta)
    assert canon_bad.shape == meta.shape
    with pytest.raises(ValueError, match="two increasing positions"):
        sj.validate(sj.SparseWeight(sw.values, sw.indices, meta, cfg))
    with pytest.raises(ValueError, match=r"sw\.metadata must be uint32"):
        sj.validate(sj.SparseWeight(sw.values, sw.indices, np.asarray(sw.metadata)[..., :1], cfg))


# --- one validity rule: kernel, decode and gradient agree, or the weight is refused -----

def _tampered(sw, part, flat, value):
    """``sw`` with one element of ``part`` set, rebuilt through the pytree (no check)."""
    leaves, treedef = jax.tree_util.tree_flatten(sw)
    i = sj.format.SPARSE_PARTS.index(part)
    a = np.asarray(leaves[i]).copy()
    a.reshape(-1)[flat] = value
    leaves[i] = jnp.asarray(a)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def test_sparse_weight_built_by_hand_is_checked(rng):
    cfg = sj.SparsityConfig(2, 4, 32)
    sw = sparse_weight(rng, cfg, jnp.bfloat16, (2, 64, cfg.m_multiple))
    vals, idx, meta = sw.values, np.asarray(sw.indices), np.asarray(sw.metadata)
    assert sj.SparseWeight(vals, idx, meta, cfg).shape == sw.shape       # numpy parts
    bad_idx = idx.copy()
    bad_idx[1, 3, 0] = bad_idx[1, 2, 0]           # the block's two sub-rows coincide
    with pytest.raises(ValueError, match="not distinct and increasing"):
        sj.SparseWeight(vals, bad_idx, meta, cfg)
    with pytest.raises(ValueError, match=r"sw\.indices\[0, 0, 1\] = 9 is not below V=4"):
        sj.SparseWeight(vals, jnp.asarray(idx).at[0, 0, 1].set(9), meta, cfg)
    bad_meta = meta.copy()
    bad_meta[0, 4, 1] = (bad_meta[0, 4, 1] & ~np.uint32(0xF0)) | np.uint32(0x20)  # (0, 0)
    with pytest.raises(ValueError, match="two increasing positions"):
        sj.SparseWeight(vals, idx, jnp.asarray(bad_meta), cfg)
    with pytest.raises(ValueError, match=r"sw\.metadata must be uint32"):
        sj.SparseWeight(vals, idx, meta.astype(np.int32), cfg)
    with pytest.raises(TypeError, match="config must be a SparsityConfig"):
        sj.SparseWeight(vals, idx, meta, (2, 4, 32))
    # Traced parts (values unknown) get the dtype and shape checks only.
    jax.jit(lambda i: sj.SparseWeight(vals, i, meta, cfg).indices)(bad_idx)
    with pytest.raises(ValueError, match=r"sw\.indices must be uint8"):
        jax.jit(lambda i: sj.SparseWeight(vals, i, meta, cfg))(idx.astype(np.int32))
    with pytest.raises(TypeError, match="call it on concrete arrays"):
        jax.jit(lambda i: sj.validate(sj.SparseWeight(vals, i, meta, cfg)))(idx)


@pytest.mark.parametrize("nv", [(1, 2), (2, 4)])
def test_kernel_decode_and_gradient_agree_or_refuse(nv, rng, seed):
    """Arrays tampered one element at a time, reaching the kernel without the
    constructor's check (a pytree rebuilt under jit): the CPU handler refuses exactly the
    weights sj.validate refuses, and on every weight it accepts its product and the
    gradient equal the float64 product on sj.decode's dense weight."""
    cfg = sj.SparsityConfig(*nv, sub_row=32)
    e, k, m = 2, 64, cfg.m_multiple
    sw = sparse_weight(rng, cfg, jnp.bfloat16, (e, k, m))
    x = rand(rng, (6, k), jnp.bfloat16)
    gs = jnp.asarray([3, 3], jnp.int32)
    ct = rand(rng, (6, m), jnp.float32)
    f = jax.jit(lambda x, sw: sj.ragged_dot(x, sw, gs))
    g = jax.jit(jax.grad(lambda x, sw: jnp.sum(f(x, sw).astype(jnp.float32) * ct)))
    accepted = refused = 0
    for trial in range(24):
        part = ("indices", "metadata")[trial % 2]
        size = int(np.prod(getattr(sw, part).shape))
        if part == "indices":
            value = int(rng.integers(0, 2 * cfg.v))
        elif trial % 4 == 1:                  # any word (almost never 8 ordered pairs)
            value = int(rng.integers(0, 2**32, dtype=np.uint64))
        else:                                 # 8 ordered pairs: another valid weight
            pairs = [a | b << 2 for a in range(4) for b in range(a + 1, 4)]
            value = sum(pairs[int(rng.integers(0, 6))] << 4 * g for g in range(8))
        bad = _tampered(sw, part, int(rng.integers(0, size)), value)
        msg = f"seed={seed} trial {trial}: {part} = {value:#x}"
        try:
            sj.validate(bad)
            valid = True
        except ValueError:
            valid = False
        try:
            y = np.asarray(f(x, bad), np.float64)
        except (jax.errors.JaxRuntimeError, ValueError) as err:
            assert "INVALID_ARGUMENT" in str(err), msg
            assert not valid, f"{msg}: the kernel refused a valid weight"
            refused += 1
            continue
        assert valid, f"{msg}: the kernel accepted a weight sj.validate refuses"
        accepted += 1
        w64 = np.asarray(decode_jit(bad), np.float64)
        ref = np.concatenate([f64(x[:3]) @ w64[0], f64(x[3:]) @ w64[1]])
        assert rel_err(y, ref) <= tol("product", jnp.bfloat16), msg
        dref = np.concatenate([f64(ct[:3]) @ w64[0].T, f64(ct[3:]) @ w64[1].T])
        assert rel_err(g(x, bad), dref) <= tol("product_row", jnp.bfloat16), msg
    assert refused > 0 and accepted > 0, f"seed={seed}: {refused} refused, {accepted} accepted"
