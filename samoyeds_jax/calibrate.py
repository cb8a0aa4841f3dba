"""Calibrated (SparseGPT / OBS) pruning to the dual-side N:V + 2:4 pattern.

Magnitude pruning (:func:`samoyeds_jax.prune`) looks at the weights only. Given
calibration inputs ``X [n, K]`` (the activations that reach a weight ``W [K, M]``,
``y = x @ W``), :func:`prune_calibrated` chooses the pattern and updates the kept weights so
that ``X @ W_sparse`` stays close to ``X @ W`` -- SparseGPT (Frantar & Alistarh, 2023)
adapted to the vector-wise pattern:

* ``H = X^T X + lambda * mean(diag(H)) * I`` (``lambda = damp``); inputs that are always
  zero get ``H[i, i] = 1`` (their weights are kept as they are, not zeroed);
* ``U = cholesky(H^-1)``, upper triangular (``H^-1 = U^T U``);
* the sparse operand ``A = W^T [M, K]`` is processed along K in column blocks of ``block``
  columns (a multiple of ``sub_row``). At the start of every window of ``L = sub_row``
  columns, with the current (already compensated) weights, the OBS saliency
  ``s = a^2 / diag(U)^2`` decides the window's N:V choice: in every group of 4 the 2
  largest saliencies would be kept, and in every block of V rows of A the N sub-rows whose
  kept 2:4 entries retain the most saliency survive (this minimises the summed OBS error of
  the window). At the start of every group of 4 columns the 2:4 choice inside the kept
  sub-rows is re-made with the then-current weights. Every column is then pruned and its
  error ``(a - q) / U[j, j]`` spread onto the later columns of the block through row j of
  ``U``; the block's errors reach the columns after the block in one lazy batched update
  ``A[:, i2:] -= Err @ U[i1:i2, i2:]``.

Everything runs in float32 under ``jax.jit`` (on the default device: the GPU when there is
one); the result is cast back to the weight's dtype, so pruned entries are exact zeros and
:func:`samoyeds_jax.encode` accepts it.

Public functions: :func:`prune_calibrated` (one weight, or a stack with per-matrix
inputs), :func:`reconstruction_error`, :func:`hessian` and :func:`prune_hessian` (to
accumulate H over batches yourself), and :func:`calibrate_moe` for a whole MoE layer.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from samoyeds_jax._util import progress as _progress
from samoyeds_jax._util import rank
from samoyeds_jax.config import MoEConfig
from samoyeds_jax.format import GROUP_WIDTH, KEPT_PER_GROUP, SparsityConfig, prune
from samoyeds_jax.layout import EXPERT_KEYS
from samoyeds_jax.moe import _check_dense, moe_dense, prune_moe, route
from samoyeds_jax.ops import _glu_act

__all__ = ["calibrate_moe", "hessian", "prune_calibrated", "prune_hessian",
           "reconstruction_error"]

DEFAULT_BLOCK = 128
_HIGHEST = jax.lax.Precision.HIGHEST
# Largest number of float32 elements of Hessians (E * K * K) handled in one batched call.
_HESSIAN_CHUNK_ELEMS = 1 << 28
# Largest number of weight elements (B * K * M) pruned in one batched call.
_CHUNK_ELEMS = 1 << 28


# --- checks ----------------------------------------------------------------------------

def _check_cfg(cfg: Any) -> None:
    if not isinstance(cfg, SparsityConfig):
        raise TypeError(f"cfg must be a SparsityConfig, got {type(cfg).__name__}")


def _check_w(w: Any, cfg: SparsityConfig) -> None:
    if np.ndim(w) < 2:
        raise ValueError(f"w must be [..., K, M], got shape {tuple(np.shape(w))}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w must be a floating dtype, got {w.dtype}")
    cfg.check_shape(*w.shape[-2:], name="w")


def _check_damp(damp: Any) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.floating, np.integer)):
        raise TypeError(f"damp must be a float, got {damp!r}")
    damp = float(damp)
    if not (damp > 0 and math.isfinite(damp)):
        raise ValueError(f"damp must be a positive finite float (e.g. 0.01), got {damp}")
    return damp


def _resolve_block(block: Any, k: int, cfg: SparsityConfig) -> int:
    """The column block: a multiple of sub_row that divides K (at most ``block``)."""
    L = cfg.sub_row
    if block is None:
        block = max(DEFAULT_BLOCK, L)
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
        raise TypeError(f"block must be an int, got {block!r}")
    if block <= 0 or block % L:
        raise ValueError(f"block={block} must be a positive multiple of sub_row={L} (N:V "
                         f"decisions are made per window of sub_row columns)")
    return math.gcd(int(block), k)  # both are multiples of L, so the gcd is too


# --- the core (one matrix; vmapped over stacks) -----------------------------------------


def _hinv_chol(h: jax.Array, damp: float) -> jax.Array:
    """Upper Cholesky factor U of (H + damping)^-1 (H^-1 = U^T U).

    With the reversal permutation P and ``P H P = L L^T``, ``U = P L^-1 P`` (one Cholesky
    and one triangular solve; no explicit inverse).
    """
    k = h.shape[-1]
    h = h.astype(jnp.float32)
    eye = jnp.eye(k, dtype=jnp.float32)
    dead = jnp.diag(h) <= 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    h = h + damp * jnp.mean(jnp.diag(h)) * eye
    low = jnp.linalg.cholesky(h[::-1, ::-1])
    linv = jax.scipy.linalg.solve_triangular(low, eye, lower=True)
    # Exact zeros below the diagonal: the lazy updates rely on them to leave finished
    # columns (and their pruned zeros) untouched.
    return jnp.triu(linv[::-1, ::-1])


def _prune_block(w1: jax.Array, u1: jax.Array, cfg: SparsityConfig
                 ) -> tuple[jax.Array, jax.Array]:
    """SparseGPT inside one column block. w1 [M, B] (rows of A), u1 [B, B] upper.

    One loop over the block's columns; the N:V choice is made at the first column of every
    window and the 2:4 choice at the first column of every group of 4, each from the
    then-current weights. Returns (q1, err1): the pruned block and the scaled errors.
    """
    m, b = w1.shape
    n, v, L = cfg.n, cfg.v, cfg.sub_row
    d = jnp.diag(u1)
    d2 = d * d

    def choose_nv(w1, j):
        ww = jax.lax.dynamic_slice(w1, (0, j), (m, L))
        dw = jax.lax.dynamic_slice(d2, (j,), (L,))
        score = (ww * ww / dw).reshape(m, L // GROUP_WIDTH, GROUP_WIDTH)
        keep24 = rank(score) < KEPT_PER_GROUP
        sal = jnp.where(keep24, score, 0.0).sum((-1, -2)).reshape(m // v, v)
        return (rank(sal) < n).reshape(m)

    def choose_24(w1, j, keep_nv):
        wg = jax.lax.dynamic_slice(w1, (0, j), (m, GROUP_WIDTH))
        dg = jax.lax.dynamic_slice(d2, (j,), (GROUP_WIDTH,))
        return (rank(wg * wg / dg) < KEPT_PER_GROUP) & keep_nv[:, None]

    def column(j, carry):
        w1, err1, mask, keep_nv, keep = carry
        keep_nv = jax.lax.cond(j % L == 0, lambda: choose_nv(w1, j), lambda: keep_nv)
        keep = jax.lax.cond(j % GROUP_WIDTH == 0, lambda: choose_24(w1, j, keep_nv),
                            lambda: keep)
        kept = jax.lax.dynamic_index_in_dim(keep, j % GROUP_WIDTH, axis=1, keepdims=False)
        col = jax.lax.dynamic_index_in_dim(w1, j, axis=1, keepdims=False)
        err = jnp.where(kept, 0.0, col) / d[j]
        urow = jax.lax.dynamic_index_in_dim(u1, j, axis=0, keepdims=False)
        w1 = w1 - err[:, None] * urow[None, :]
        err1 = jax.lax.dynamic_update_index_in_dim(err1, err, j, axis=1)
        mask = jax.lax.dynamic_update_index_in_dim(mask, kept, j, axis=1)
        return w1, err1, mask, keep_nv, keep

    init = (w1, jnp.zeros((m, b), jnp.float32), jnp.zeros((m, b), bool),
            jnp.zeros((m,), bool), jnp.zeros((m, GROUP_WIDTH), bool))
    w1, err1, mask, _, _ = jax.lax.fori_loop(0, b, column, init)
    # Kept entries have zero error, so w1 holds them unchanged; pruned ones become exact 0.
    return jnp.where(mask, w1, 0.0), err1


def _prune_one(w: jax.Array, u: jax.Array, cfg: SparsityConfig, block: int) -> jax.Array:
    """w [K, M] (any float), u [K, K] upper Cholesky factor of H^-1 -> pruned [K, M] f32."""
    k, m = w.shape
    a = w.astype(jnp.float32).T  # [M, K]

    def body(bi, a):
        i1 = bi * block
        w1 = jax.lax.dynamic_slice(a, (0, i1), (m, block))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (block, block))
        q1, err1 = _prune_block(w1, u1, cfg)
        # Lazy batched update of the later columns. U is upper triangular, so the rows
        # [i1, i2) of U are zero before i1; the block's own columns are overwritten below.
        urows = jax.lax.dynamic_slice(u, (i1, 0), (block, k))
        a = a - jnp.dot(err1, urows, precision=_HIGHEST)
        return jax.lax.dynamic_update_slice(a, q1, (0, i1))

    a = jax.lax.fori_loop(0, k // block, body, a)
    return a.T


@jax.jit
def _hinv_chol_batch(h: jax.Array, damp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """h [B, K, K] -> (U [B, K, K], finite flag per matrix)."""
    u = jax.vmap(_hinv_chol, in_axes=(0, None))(h, damp)
    return u, jnp.isfinite(u).all(axis=(-1, -2))


@functools.partial(jax.jit, static_argnames=("cfg", "block"))
def _prune_batch(w: jax.Array, u: jax.Array, cfg: SparsityConfig, block: int) -> jax.Array:
    """w [B, K, M], u [B, K, K] (or one [K, K] for all) -> pruned, in w's dtype."""
    out = jax.vmap(lambda wi, ui: _prune_one(wi, ui, cfg, block),
                   in_axes=(0, 0 if u.ndim == 3 else None))(w, u)
    return out.astype(w.dtype)


@jax.jit
def _hessian(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.einsum("...nk,...nl->...kl", x, x, precision=_HIGHEST)


# --- public API ------------------------------------------------------------------------

def hessian(x: Any) -> jax.Array:
    """``X^T X`` in float32: ``x [..., n, K] -> [..., K, K]``.

    Sum it over calibration batches yourself and pass it to :func:`prune_hessian` when the
    inputs do not fit in memory at once (zero rows add nothing, so padding is harmless).
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x_calib must be [..., n, K], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x_calib must be a floating dtype, got {x.dtype}")
    return _hessian(x)


def _hessian_chunk(k: int) -> int:
    return max(1, _HESSIAN_CHUNK_ELEMS // (k * k))


def _chol(h: jax.Array, damp: float, first: int = 0) -> jax.Array:
    """Upper Cholesky factors of the damped inverse Hessians h [B, K, K]; the damping is
    multiplied by 10 (up to 3 times) while a factorisation fails."""
    d = damp
    for _ in range(4):
        u, ok = _hinv_chol_batch(h, jnp.float32(d))
        ok = np.asarray(ok)
        if ok.all():
            return u
        d *= 10
    bad = first + int(np.argmin(ok))
    raise ValueError(f"prune_calibrated: the damped Hessian of matrix {bad} is not positive "
                     f"definite even with damp={d / 10:g} (non-finite calibration inputs?)")


def prune_hessian(w: Any, h: Any, cfg: SparsityConfig, damp: float = 0.01,
                  block: int | None = None) -> jax.Array:
    """:func:`prune_calibrated` from the Hessian ``h = X^T X`` instead of the inputs.

    Args:
      w: ``[..., K, M]`` float weight.
      h: ``[K, K]`` (shared by every matrix of w) or ``[..., K, K]`` (one per matrix).
      cfg, damp, block: as in :func:`prune_calibrated`.
    Returns:
      the pruned weight, same shape and dtype as w.
    """
    _check_cfg(cfg)
    w = jnp.asarray(w)
    _check_w(w, cfg)
    damp = _check_damp(damp)
    *lead, k, m = w.shape
    block = _resolve_block(block, k, cfg)
    h = jnp.asarray(h)
    if h.ndim < 2 or h.shape[-2:] != (k, k):
        raise ValueError(f"h must be [..., K, K] with K={k} (w's axis -2), got shape {h.shape}")
    if h.ndim > 2 and tuple(h.shape[:-2]) != tuple(lead):
        raise ValueError(f"h's leading axes {tuple(h.shape[:-2])} must match w's "
                         f"{tuple(lead)} (or give one [K, K] Hessian for all)")
    wf = w.reshape(-1, k, m)
    if h.ndim == 2:  # one Hessian for every matrix: factor it once
        return _prune_u(wf, _chol(h[None], damp)[0], cfg, block).reshape(w.shape)
    hf = h.reshape(-1, k, k)
    step = _hessian_chunk(k)
    outs = [_prune_batch(wf[s:s + step], _chol(hf[s:s + step], damp, s), cfg, block)
            for s in range(0, wf.shape[0], step)]
    return jnp.concatenate(outs, axis=0).reshape(w.shape)


def _prune_u(wf: jax.Array, u: jax.Array, cfg: SparsityConfig, block: int) -> jax.Array:
    """wf [B, K, M] with one factor u [K, K] for all, or u [B, K, K]."""
    step = max(1, _CHUNK_ELEMS // (wf.shape[1] * wf.shape[2]))
    return jnp.concatenate(
        [_prune_batch(wf[s:s + step], u if u.ndim == 2 else u[s:s + step], cfg, block)
         for s in range(0, wf.shape[0], step)], axis=0)


def prune_calibrated(w: Any, x_calib: Any, cfg: SparsityConfig, damp: float = 0.01,
                     block: int | None = None) -> jax.Array:
    """Calibrated (SparseGPT / OBS) pruning to the N:V + 2:4 pattern.

    Args:
      w: ``[K, M]`` float weight (``y = x @ w``), or a stack ``[..., K, M]``.
      x_calib: ``[n, K]`` calibration inputs of that weight (shared by every matrix of a
        stack), or ``[..., n, K]`` with w's leading axes (one set per matrix, e.g. per
        expert; pad with zero rows to a common n -- they change nothing).
      cfg: the pattern (:class:`~samoyeds_jax.SparsityConfig`).
      damp: dampening ``lambda``: ``lambda * mean(diag(H))`` is added to ``diag(H)``
        (multiplied by 10, up to 3 times, when the Cholesky still fails).
      block: column block of the lazy updates, a multiple of ``cfg.sub_row`` (default
        ``max(128, sub_row)``; reduced to the largest divisor of K that is a multiple).
    Returns:
      ``[..., K, M]`` in w's dtype, following the pattern exactly (``sj.encode`` accepts
      it): pruned entries are zero, kept entries are updated to compensate.
    """
    _check_cfg(cfg)
    w = jnp.asarray(w)
    _check_w(w, cfg)
    x = jnp.asarray(x_calib)
    k = w.shape[-2]
    if x.ndim < 2:
        raise ValueError(f"x_calib must be [n, K] or [..., n, K], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x_calib must be a floating dtype, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x_calib's last axis ({x.shape[-1]}) must be K={k} (w's "
                         f"in_features, axis -2); w has shape {w.shape}")
    if x.shape[-2] == 0:
        raise ValueError("x_calib has no rows (n = 0)")
    if x.ndim > 2 and tuple(x.shape[:-2]) != tuple(w.shape[:-2]):
        raise ValueError(f"x_calib's leading axes {tuple(x.shape[:-2])} must match w's "
                         f"{tuple(w.shape[:-2])} (or give one [n, K] set for all)")
    return prune_hessian(w, _hessian(x), cfg, damp=damp, block=block)


@jax.jit
def _recon_error(x, w, ws):
    x = x.astype(jnp.float32)
    y = jnp.matmul(x, w.astype(jnp.float32), precision=_HIGHEST)
    ys = jnp.matmul(x, ws.astype(jnp.float32), precision=_HIGHEST)
    axes = (-1, -2)
    return jnp.sqrt(((y - ys) ** 2).sum(axes)) / jnp.sqrt((y * y).sum(axes))


def reconstruction_error(x: Any, w: Any, w_sparse: Any) -> jax.Array:
    """``||X W - X W_sparse||_F / ||X W||_F`` in float32.

    ``x [..., n, K]``, ``w``/``w_sparse [..., K, M]`` (leading axes broadcast); returns one
    value per matrix (a scalar for 2-D inputs).
    """
    x, w, ws = jnp.asarray(x), jnp.asarray(w), jnp.asarray(w_sparse)
    if w.shape != ws.shape:
        raise ValueError(f"w {w.shape} and w_sparse {ws.shape} must have the same shape")
    if x.ndim < 2 or w.ndim < 2 or x.shape[-1] != w.shape[-2]:
        raise ValueError(f"x [..., n, K] and w [..., K, M] do not fit: {x.shape} @ {w.shape}")
    return _recon_error(x, w, ws)


# --- a whole MoE layer -----------------------------------------------------------------

def _expert_inputs(x: np.ndarray, experts: np.ndarray, num_experts: int
                   ) -> list[np.ndarray]:
    """Token indices routed to each expert (any of its top-k choices)."""
    return [np.nonzero((experts == e).any(-1))[0] for e in range(num_experts)]


@functools.partial(jax.jit, static_argnames=("activation",))
def _glu_hidden(x, gate, up, activation):
    x = x.astype(jnp.float32)
    g = jnp.matmul(x, gate.astype(jnp.float32), precision=_HIGHEST)
    u = jnp.matmul(x, up.astype(jnp.float32), precision=_HIGHEST)
    return _glu_act(g, activation) * u


def calibrate_moe(dense: dict, cfg: Any, x_calib: Any, damp: float = 0.01,
                  block: int | None = None, sequential: bool = True,
                  progress: bool = False, return_report: bool = False):
    """Calibrated pruning of every routed expert of a dense MoE layer.

    ``x_calib [T, d_model]`` (the hidden states entering the layer) is routed through the
    dense router (``sj.route``, top-k); expert e is calibrated on the tokens that chose
    it: ``gate``/``up`` on those tokens, ``down`` on the expert's hidden activations
    ``act(x @ gate) * (x @ up)`` -- computed with the already-pruned gate/up when
    ``sequential`` (the inputs the sparse layer will really see; SparseGPT's sequential
    mode), else with the dense ones. Experts that no token chose fall back to magnitude
    pruning (``sj.prune``). Router and shared experts are returned unchanged.

    Args:
      dense: dense layer parameters (``sj.init_dense_moe`` layout).
      cfg: the layer's :class:`~samoyeds_jax.MoEConfig` (``cfg.sparsity`` is the pattern).
      x_calib: ``[..., d_model]`` calibration hidden states.
      damp, block: as in :func:`prune_calibrated`.
      sequential: calibrate down on the pruned gate/up's activations (default).
      progress: tqdm progress bar over experts.
      return_report: also return a report dict.
    Returns:
      the pruned dense parameters (same layout and dtypes as ``sj.prune_moe``'s output;
      feed them to ``sj.sparsify_moe`` / ``sj.encode``), and with ``return_report`` a dict:
      ``tokens_per_expert``, ``layer_error`` / ``layer_error_magnitude`` (relative
      Frobenius error of ``moe_dense`` on x_calib against the dense layer, calibrated and
      magnitude-pruned), and per weight (``gate_error``, ``up_error``, ``down_error`` and
      their ``*_magnitude`` twins) the mean over calibrated experts of
      :func:`reconstruction_error` on the inputs the weight was calibrated with.
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    _check_dense(dense, cfg)
    damp = _check_damp(damp)
    sp = cfg.sparsity
    blk_in = _resolve_block(block, cfg.d_model, sp)
    blk_hidden = _resolve_block(block, cfg.d_ff, sp)
    x = jnp.asarray(x_calib)
    if x.ndim < 1 or x.shape[-1] != cfg.d_model:
        raise ValueError(f"x_calib must be [..., d_model={cfg.d_model}], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x_calib must be a floating dtype, got {x.dtype}")
    x = x.reshape(-1, cfg.d_model).astype(jnp.float32)
    if x.shape[0] == 0:
        raise ValueError("x_calib has no tokens")
    _, experts = route(dense["router"], x, cfg)
    token_ids = _expert_inputs(np.asarray(x), np.asarray(experts), cfg.num_experts)
    counts = [len(t) for t in token_ids]

    out = dict(dense)
    new = {key: [None] * cfg.num_experts for key in EXPERT_KEYS}
    errs = {key: [] for key in EXPERT_KEYS}
    errs_mag = {key: [] for key in EXPERT_KEYS}
    width = max(cfg.d_model, cfg.d_ff)
    n_all = 1 << max(0, (max(counts) - 1).bit_length())
    step = max(1, min(_hessian_chunk(width), _CHUNK_ELEMS // (n_all * width)))
    xnp = np.asarray(x)
    live = [e for e in range(cfg.num_experts) if counts[e] > 0]
    dead = [e for e in range(cfg.num_experts) if counts[e] == 0]
    bar = _progress(progress, cfg.num_experts, "calibrate experts", "expert")
    for e in dead:
        for key in EXPERT_KEYS:
            new[key][e] = prune(dense[key][e], sp)
        bar.update(1)
    for s in range(0, len(live), step):
        ids = live[s:s + step]
        n_max = max(counts[e] for e in ids)
        n_pad = 1 << max(0, (n_max - 1).bit_length())  # fewer shapes to compile
        xs = np.zeros((len(ids), n_pad, cfg.d_model), np.float32)
        for i, e in enumerate(ids):
            xs[i, :counts[e]] = xnp[token_ids[e]]
        xs = jnp.asarray(xs)
        sel = np.asarray(ids)
        g, u, dn = (dense[key][sel] for key in EXPERT_KEYS)
        ux = _chol(_hessian(xs), damp)          # gate and up share their inputs
        gp = _prune_u(g, ux, sp, blk_in)
        up = _prune_u(u, ux, sp, blk_in)
        del ux
        h = _glu_hidden(xs, gp, up, cfg.activation) if sequential else \
            _glu_hidden(xs, g, u, cfg.activation)
        dp = _prune_u(dn, _chol(_hessian(h), damp), sp, blk_hidden)
        if return_report:
            for key, xin, w, wp in (("gate", xs, g, gp), ("up", xs, u, up),
                                    ("down", h, dn, dp)):
                errs[key] += list(np.asarray(reconstruction_error(xin, w, wp)))
                errs_mag[key] += list(np.asarray(reconstruction_error(xin, w, prune(w, sp))))
        for i, e in enumerate(ids):
            new["gate"][e], new["up"][e], new["down"][e] = gp[i], up[i], dp[i]
        bar.update(len(ids))
    bar.close()
    for key in EXPERT_KEYS:
        out[key] = jnp.stack(new[key]).astype(dense[key].dtype)
    if not return_report:
        return out

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    ref = moe_dense(dense, x, cfg)
    report = {
        "tokens": int(x.shape[0]),
        "tokens_per_expert": counts,
        "magnitude_fallback_experts": dead,
        "layer_error": rel(moe_dense(out, x, cfg), ref),
        "layer_error_magnitude": rel(moe_dense(prune_moe(dense, cfg), x, cfg), ref),
    }
    for key in EXPERT_KEYS:
        report[f"{key}_error"] = float(np.mean(errs[key])) if errs[key] else float("nan")
        report[f"{key}_error_magnitude"] = (float(np.mean(errs_mag[key])) if errs_mag[key]
                                            else float("nan"))
    return out, report
