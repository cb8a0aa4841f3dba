"""Dense JAX MoE baselines shared by bench_layer.py and bench_stack.py (no flags here, so
both scripts can import it).

  moe_capacity     GShard-style capacity factor: positions from a cumsum of the one-hot
                   expert mask (first choices first), tokens over capacity dropped, dispatch
                   [E, C, d] by scatter, batched einsums, combine by gather;
  moe_all_experts  every expert on every token, masked by the routing weights.
Both run on dense parameters (sj.init_dense_moe / sj.decode_moe) with the same rounding
points as sj.moe.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import samoyeds_jax as sj
from samoyeds_jax.moe import MoEConfig, _glu, shared_experts


def _ein(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


def moe_capacity(params: dict, x: jax.Array, cfg: MoEConfig, capacity_factor: float
                 ) -> tuple[jax.Array, jax.Array]:
    """GShard-style capacity-factor MoE on dense weights; returns (out, dropped count)."""
    t, d = x.shape
    e, k = cfg.num_experts, cfg.top_k
    dt = params["gate"].dtype
    cap = max(1, math.ceil(capacity_factor * t * k / e))
    weights, experts = sj.route(params["router"], x, cfg)              # [T, k]
    e_flat = experts.T.reshape(-1)                                       # choice-major
    onehot = jax.nn.one_hot(e_flat, e, dtype=jnp.int32)                 # [kT, E]
    pos = ((jnp.cumsum(onehot, axis=0) - 1) * onehot).sum(-1)           # slot in expert
    keep = pos < cap
    slot = jnp.where(keep, e_flat * cap + pos, e * cap)                 # overflow: dump row
    tok = jnp.tile(jnp.arange(t, dtype=jnp.int32), k)
    xd = jnp.zeros((e * cap + 1, d), dt).at[slot].set(x.astype(dt)[tok])
    xd = xd[:-1].reshape(e, cap, d)                                      # [E, C, d]
    h = _glu(_ein("ecd,edf->ecf", xd, params["gate"], dt),
             _ein("ecd,edf->ecf", xd, params["up"], dt), cfg.activation, dt)
    y = _ein("ecf,efd->ecd", h, params["down"], dt).reshape(e * cap, d)
    y = jnp.concatenate([y, jnp.zeros((1, d), dt)])
    w = (weights.T.reshape(-1) * keep)[:, None]
    out = jnp.zeros((t, d), jnp.float32).at[tok].add(w * y[slot].astype(jnp.float32))
    if cfg.has_shared:
        out = out + shared_experts(params, x, cfg)
    return out.astype(x.dtype), (~keep).sum()


def moe_all_experts(params: dict, x: jax.Array, cfg: MoEConfig) -> jax.Array:
    """Every expert on every token, combined with the (mostly zero) dense routing weights."""
    t = x.shape[0]
    dt = params["gate"].dtype
    weights, experts = sj.route(params["router"], x, cfg)
    dense_w = jnp.zeros((t, cfg.num_experts), jnp.float32).at[
        jnp.arange(t)[:, None], experts].set(weights)                   # [T, E]
    xc = x.astype(dt)
    h = _glu(_ein("td,edf->etf", xc, params["gate"], dt),
             _ein("td,edf->etf", xc, params["up"], dt), cfg.activation, dt)
    y = _ein("etf,efd->etd", h, params["down"], dt)
    out = jnp.einsum("te,etd->td", dense_w, y.astype(jnp.float32))
    if cfg.has_shared:
        out = out + shared_experts(params, x, cfg)
    return out.astype(x.dtype)
