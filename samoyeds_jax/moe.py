"""The sparse MoE layer: router, dispatch (SEL), expert FFN, combine, and its dense twin.

Data flow (``T`` tokens after flattening leading axes, ``k = top_k``, ``E`` experts), each
stage under a ``jax.named_scope`` of its name (route, dispatch, gate_up, down, combine,
shared_experts), so that profiles and HLO op names read like this::

    x [T, d] --route--> weights [T, k] f32, experts [T, k] int32
             --dispatch--> sel [T*k], group_sizes [E], order [T*k]   (rows sorted by expert)
    h = act(x[sel] @ W_gate) * (x[sel] @ W_up)   gate_up: one sj.ragged_dot on the fused
                                                 gate_up [E, d, 2f], the GLU in its epilogue
    y = h @ W_down                               down: sj.ragged_dot on the compact rows
    out[t] = sum_j weights[t, j] * y[row(t, j)]  combine: inverse permutation of ``order``,
                                                 float32
           + shared experts (dense, always on, optionally sigmoid-gated)

Parameter dicts: :mod:`samoyeds_jax.layout` lists every key with its shape. The dense
layout (``init_dense_moe``, ``prune_moe``, ``decode_moe``; input of ``moe_dense``) holds
``router [d, E]``, ``gate``/``up [E, d, f]``, ``down [E, f, d]``; the sparse layout
(``sparsify_moe``; input of ``moe``) holds ``router``, the SparseWeights
``gate_up [E, d, 2f]`` (encoded from ``concat([gate, up], -1)``) and ``down [E, f, d]``;
both hold the dense shared experts when ``num_shared_experts > 0``.

Every function here is pure and jit-able with static shapes; nothing reads a device array
on the host (``sparsify_moe``/``prune_moe`` are the one-time host-side conversions).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from samoyeds_jax import layout
from samoyeds_jax._util import inverse_permutation, progress as _progress
from samoyeds_jax.config import ACTIVATIONS, ROUTERS, MoEConfig  # noqa: F401 (old home)
from samoyeds_jax.format import (
    SPARSE_PARTS, SUPPORTED_DTYPES, SparseWeight, SparsityConfig, decode, encode, prune)
from samoyeds_jax.layout import EXPERT_KEYS, SHARED_GATE_KEY, SHARED_KEYS  # noqa: F401
from samoyeds_jax.ops import _glu_act, ragged_dot
from samoyeds_jax.presets import PRESETS, preset_config  # noqa: F401 (old home)

# --- parameters ------------------------------------------------------------------------

def _normal(key, shape, dtype, fan_in):
    return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)


_normal_jit = jax.jit(_normal, static_argnums=(1, 2, 3))


def init_dense_moe(key: jax.Array, cfg: MoEConfig, dtype: Any = jnp.bfloat16
                   ) -> dict[str, jax.Array]:
    """Random dense MoE parameters (normal, std ``1/sqrt(fan_in)``).

    Args:
      key: a PRNG key.
      cfg: the layer.
      dtype: parameter dtype (bfloat16 or float16 for :func:`sparsify_moe`).
    Returns:
      ``{"router" [d, E], "gate" [E, d, f], "up" [E, d, f], "down" [E, f, d]}`` plus
      ``shared_gate [d, fs]``, ``shared_up [d, fs]``, ``shared_down [fs, d]`` (and
      ``shared_expert_gate [d, 1]``) when the config has shared experts.
    """
    _check_cfg(cfg)
    dtype = jnp.dtype(dtype)
    keys = iter(jax.random.split(key, 8))
    out = {}
    for p in layout.params(cfg, sparse=False):
        shape = p.shape(cfg)
        out[p.key] = _normal_jit(next(keys), shape, dtype, shape[-2])  # fan_in: axis -2
    return out


def _check_cfg(cfg: Any) -> None:
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")


def _check_dense(params: Any, cfg: MoEConfig) -> None:
    _check_cfg(cfg)
    layout.check(params, cfg, sparse=False)


def _check_sparse(params: Any, cfg: MoEConfig) -> None:
    _check_cfg(cfg)
    layout.check(params, cfg, sparse=True)


# Largest number of weight elements pruned/encoded in one host call (experts are chunked).
_CHUNK_ELEMS = 1 << 26


def _expert_chunks(num_experts: int, per_expert: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMS // max(per_expert, 1))
    return [(s, min(s + step, num_experts)) for s in range(0, num_experts, step)]


def _concat_sw(parts: list[SparseWeight]) -> SparseWeight:
    if len(parts) == 1:
        return parts[0]
    return SparseWeight(*(jnp.concatenate([getattr(p, a) for p in parts], axis=0)
                          for a in SPARSE_PARTS), parts[0].config)


def _check_encodable(params: dict, cfg: MoEConfig) -> None:
    for key in EXPERT_KEYS:
        dt = jnp.dtype(params[key].dtype)
        if dt not in SUPPORTED_DTYPES:
            raise TypeError(f"params[{key!r}] is {dt.name}; sparse experts must be bfloat16 "
                            f"or float16 (cast the dense params first, e.g. "
                            f"jax.tree.map(lambda a: a.astype(jnp.bfloat16), dense))")


def prune_moe(dense: dict, cfg: MoEConfig) -> dict:
    """The dense parameters whose dense twin equals the sparse layer.

    Expert weights ``gate``, ``up``, ``down`` are replaced by ``sj.prune(w, cfg.sparsity)``
    (gate and up separately: exactly what :func:`sparsify_moe` encodes as
    ``prune(gate) || prune(up)``); router and shared experts are returned unchanged.
    ``moe_dense(prune_moe(dense), x, cfg)`` matches ``moe(sparsify_moe(dense), x, cfg)``
    up to float32 accumulation order.
    """
    _check_dense(dense, cfg)
    out = dict(dense)
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
    for key in EXPERT_KEYS:
        w = dense[key]
        out[key] = jnp.concatenate(
            [prune(w[a:b], cfg.sparsity) for a, b in _expert_chunks(e, d * f)], axis=0)
    return out


def encode_experts(gate: Any, up: Any, down: Any, sparsity: SparsityConfig, *,
                   pruned: bool = False, bar: Any = None
                   ) -> tuple[SparseWeight, SparseWeight]:
    """Prune and encode one layer's routed experts, a few experts at a time.

    Runs on the host (``sj.encode``), so that large layers never hold more than ~64M weight
    elements of temporaries.

    Args:
      gate, up: ``[E, d, f]``; down: ``[E, f, d]``; bfloat16 or float16 (numpy or jax).
      sparsity: the pattern.
      pruned: the weights already follow the pattern (e.g. from
        :func:`~samoyeds_jax.calibrate_moe`): encode them as they are.
      bar: a progress bar to advance by the experts done (``update(n)``).
    Returns:
      ``(gate_up, down)``: SparseWeights ``[E, d, 2f]`` (``prune(gate) || prune(up)``) and
      ``[E, f, d]``.
    """
    e, d, f = gate.shape
    keep = (lambda w: w) if pruned else (lambda w: prune(w, sparsity))
    gate_up, down_parts = [], []
    for a, b in _expert_chunks(e, 3 * d * f):
        gu = jnp.concatenate([keep(gate[a:b]), keep(up[a:b])], axis=-1)
        gate_up.append(encode(gu, sparsity))
        del gu
        down_parts.append(encode(keep(down[a:b]), sparsity))
        if bar is not None:
            bar.update(b - a)
    return _concat_sw(gate_up), _concat_sw(down_parts)


def sparsify_moe(dense: dict, cfg: MoEConfig, progress: bool = False,
                 verbose: bool = False) -> dict:
    """Prune and encode every routed expert weight; router and shared experts stay dense.

    Runs once on the host (``sj.encode``), expert chunk by expert chunk so that large
    layers never hold more than ~64M weight elements of temporaries.

    Args:
      dense: dense parameters (see the module docstring); expert weights bfloat16 or
        float16. Already-pruned weights are fine (pruning is idempotent).
      cfg: the layer.
      progress: show a tqdm progress bar over experts (when tqdm is installed).
      verbose: print the stored bytes before and after.
    Returns:
      ``{"router", "gate_up": SparseWeight [E, d, 2f], "down": SparseWeight [E, f, d],
      shared_*...}``.
    """
    _check_dense(dense, cfg)
    _check_encodable(dense, cfg)
    sp = cfg.sparsity
    bar = _progress(progress, cfg.num_experts, "sparsify experts", "expert")
    gate_up, down = encode_experts(dense["gate"], dense["up"], dense["down"], sp, bar=bar)
    bar.close()
    out = {k: v for k, v in dense.items() if k not in EXPERT_KEYS}
    out["gate_up"], out["down"] = gate_up, down
    if verbose:
        before = moe_param_bytes({k: dense[k] for k in EXPERT_KEYS})
        after = moe_param_bytes({"gate_up": out["gate_up"], "down": out["down"]})
        print(f"sparsify_moe: experts {before / 2**20:.1f} MiB dense -> "
              f"{after / 2**20:.1f} MiB sparse ({before / after:.2f}x smaller; "
              f"{sp.n}:{sp.v} + 2:4, sub_row={sp.sub_row}); layer "
              f"{moe_param_bytes(dense) / 2**20:.1f} -> {moe_param_bytes(out) / 2**20:.1f} MiB")
    return out


def decode_moe(sparse: dict, cfg: MoEConfig) -> dict:
    """The dense parameters of a sparse layer (``gate``/``up`` split from ``gate_up``).

    ``decode_moe(sparsify_moe(dense)) == prune_moe(dense)`` exactly.
    """
    _check_sparse(sparse, cfg)
    out = {k: v for k, v in sparse.items() if k not in layout.SPARSE_EXPERT_KEYS}
    gu = _decode_jit(layout.concat_gate_up(sparse["gate_up"]))
    out["gate"], out["up"] = gu[..., :cfg.d_ff], gu[..., cfg.d_ff:]
    out["down"] = _decode_jit(sparse["down"])
    return out


_decode_jit = jax.jit(decode)


def moe_param_bytes(params: Any) -> int:
    """Bytes stored by a parameter pytree (dense arrays, SparseWeights: all their arrays)."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree_util.tree_leaves(params))


# --- the layer's pieces ----------------------------------------------------------------

@jax.named_scope("route")
def route(router_w: jax.Array, x: jax.Array, cfg: MoEConfig) -> tuple[jax.Array, jax.Array]:
    """Top-k routing, in float32.

    Args:
      router_w: ``[d, E]``.
      x: ``[T, d]`` (leading axes are flattened).
      cfg: ``cfg.router`` picks the weights: ``"mixtral"`` softmax over the k selected
        logits; ``"softmax_topk"`` the selected entries of the softmax over all E.
    Returns:
      ``weights [T, k]`` float32 and ``experts [T, k]`` int32, in decreasing logit order
      (ties go to the lower expert id).
    """
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    logits = jnp.dot(x2, router_w.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)  # [T, E]
    top, experts = jax.lax.top_k(logits, cfg.top_k)
    if cfg.router == "mixtral":
        weights = jax.nn.softmax(top, axis=-1)
    else:
        probs = jax.nn.softmax(logits, axis=-1)
        weights = jnp.take_along_axis(probs, experts, axis=-1)
    return weights.astype(jnp.float32), experts.astype(jnp.int32)


@jax.named_scope("dispatch")
def dispatch(experts: jax.Array, num_experts: int
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sort the routed (token, choice) pairs by expert.

    Args:
      experts: ``[T, k]`` int expert ids in ``[0, num_experts)``.
      num_experts: E (static).
    Returns:
      ``sel [T*k]`` int32: the token of each sorted row (SEL);
      ``group_sizes [E]`` int32: rows per expert (sum ``T*k``);
      ``order [T*k]`` int32: sorted row i is the flat pair ``order[i] = t*k + j``
      (a stable argsort of ``experts.reshape(-1)``).
    """
    k = experts.shape[-1]
    flat = experts.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sel = order // k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return sel, group_sizes, order


@jax.named_scope("combine")
def combine(y: jax.Array, weights: jax.Array, order: jax.Array) -> jax.Array:
    """``out[t] = sum_j weights[t, j] * y[row(t, j)]`` with ``row`` the inverse of ``order``.

    Args:
      y: ``[T*k, d]`` expert outputs in sorted (SEL) order.
      weights: ``[T, k]`` routing weights.
      order: ``[T*k]`` from :func:`dispatch`.
    Returns:
      ``[T, d]`` float32.
    """
    t, k = weights.shape
    yt = y[inverse_permutation(order)].reshape(t, k, y.shape[-1]).astype(jnp.float32)
    return (weights.astype(jnp.float32)[..., None] * yt).sum(axis=1)


def _glu(g: jax.Array, u: jax.Array, activation: str, dtype) -> jax.Array:
    """act(g) * u in float32, rounded to the compute dtype (the down projection's input)."""
    return (_glu_act(g.astype(jnp.float32), activation) * u.astype(jnp.float32)).astype(dtype)


def expert_ffn(x: jax.Array, gate_up: SparseWeight, down: SparseWeight,
               group_sizes: jax.Array, sel: jax.Array, activation: str = "silu") -> jax.Array:
    """The routed experts on the sparse weights: two ``sj.ragged_dot`` calls, the GLU
    fused into the first one's epilogue.

    Args:
      x: ``[T, d]`` tokens (the weights' dtype).
      gate_up: SparseWeight ``[E, d, 2f]``; down: SparseWeight ``[E, f, d]``.
      group_sizes: ``[E]`` int32; sel: ``[R]`` int32 token per sorted row.
    Returns:
      ``[R, d]`` in x's dtype, rows in SEL order.
    """
    with jax.named_scope("gate_up"):
        h = ragged_dot(x, gate_up, group_sizes, sel, glu=activation)     # [R, f]
    with jax.named_scope("down"):
        return ragged_dot(h, down, group_sizes)                           # [R, d]


def expert_ffn_dense(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                     group_sizes: jax.Array, sel: jax.Array, activation: str = "silu"
                     ) -> jax.Array:
    """The dense twin of :func:`expert_ffn`: ``jax.lax.ragged_dot`` on gathered rows, with
    the same rounding points (each projection accumulates in float32 and rounds to the
    compute dtype)."""
    dt = gate.dtype

    def rdot(a, w):
        return jax.lax.ragged_dot(a, w, group_sizes,
                                  preferred_element_type=jnp.float32).astype(dt)

    with jax.named_scope("gate_up"):
        xs = x[sel]
        h = _glu(rdot(xs, gate), rdot(xs, up), activation, dt)
    with jax.named_scope("down"):
        return rdot(h, down)


@jax.named_scope("shared_experts")
def shared_experts(params: dict, x: jax.Array, cfg: MoEConfig) -> jax.Array:
    """The dense shared experts (fused into one GLU MLP of width ``d_ff_shared``), with the
    optional sigmoid gate. ``x [T, d]`` -> ``[T, d]`` float32."""
    dt = params["shared_gate"].dtype
    xs = x.astype(dt)

    def mm(a, w):
        return jnp.dot(a, w, preferred_element_type=jnp.float32)

    h = _glu(mm(xs, params["shared_gate"]), mm(xs, params["shared_up"]), cfg.activation, dt)
    out = mm(h, params["shared_down"])
    if cfg.shared_expert_gate:
        gate = jax.nn.sigmoid(jnp.dot(x.astype(jnp.float32),
                                      params[SHARED_GATE_KEY].astype(jnp.float32),
                                      precision=jax.lax.Precision.HIGHEST))   # [T, 1]
        out = out * gate
    return out


def _layer(params: dict, x: jax.Array, cfg: MoEConfig, ffn: Callable, compute_dtype
           ) -> jax.Array:
    if x.ndim < 1 or x.shape[-1] != cfg.d_model:
        raise ValueError(f"x must be [..., d_model={cfg.d_model}], got shape {x.shape}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cfg.d_model)
    weights, experts = route(params["router"], x2, cfg)
    sel, group_sizes, order = dispatch(experts, cfg.num_experts)
    y = ffn(x2.astype(compute_dtype), group_sizes, sel)               # [T*k, d]
    out = combine(y, weights, order)
    if cfg.has_shared:
        out = out + shared_experts(params, x2, cfg)
    return out.astype(x.dtype).reshape(*lead, cfg.d_model)


@functools.partial(jax.jit, static_argnames=("cfg",))
def moe(params: dict, x: jax.Array, cfg: MoEConfig) -> jax.Array:
    """The sparse MoE layer (jitted; ``cfg`` is static).

    Args:
      params: from :func:`sparsify_moe`.
      x: ``[..., d_model]``, any float dtype; the experts run in the weights' dtype
        (bfloat16 or float16), routing and combine in float32.
    Returns:
      ``[..., d_model]`` in x's dtype.
    """
    _check_sparse(params, cfg)
    gu, dn = params["gate_up"], params["down"]
    return _layer(params, x, cfg,
                  lambda xc, gs, sel: expert_ffn(xc, gu, dn, gs, sel, cfg.activation),
                  gu.dtype)


@functools.partial(jax.jit, static_argnames=("cfg",))
def moe_dense(params: dict, x: jax.Array, cfg: MoEConfig) -> jax.Array:
    """The dense twin of :func:`moe`: same routing, dispatch and combine, experts through
    ``jax.lax.ragged_dot`` on dense ``gate``/``up``/``down`` (any float dtype).

    Args:
      params: dense parameters (:func:`init_dense_moe`, :func:`prune_moe`,
        :func:`decode_moe`).
      x: ``[..., d_model]``.
    Returns:
      ``[..., d_model]`` in x's dtype.
    """
    _check_dense(params, cfg)
    g, u, dn = params["gate"], params["up"], params["down"]
    return _layer(params, x, cfg,
                  lambda xc, gs, sel: expert_ffn_dense(xc, g, u, dn, gs, sel, cfg.activation),
                  g.dtype)
