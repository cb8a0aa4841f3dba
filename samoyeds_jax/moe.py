"""The sparse MoE layer: router, dispatch (SEL), expert FFN, combine, and its dense twin.

Data flow (``T`` tokens after flattening leading axes, ``k = top_k``, ``E`` experts)::

    x [T, d] --route--> weights [T, k] f32, experts [T, k] int32
             --dispatch--> sel [T*k], group_sizes [E], order [T*k]   (rows sorted by expert)
    h = act(x[sel] @ W_gate) * (x[sel] @ W_up)   one sj.ragged_dot on the fused gate_up [E, d, 2f],
                                                 the GLU in its epilogue
    y = h @ W_down                               sj.ragged_dot on the compact rows (no SEL)
    out[t] = sum_j weights[t, j] * y[row(t, j)]  (inverse permutation of ``order``, float32)
           + shared experts (dense, always on, optionally sigmoid-gated)

Parameter dicts (``d = d_model``, ``f = d_ff``, ``fs = d_ff_shared``), weights stored
``[in, out]`` like flax:

* dense (``init_dense_moe``, ``prune_moe``, ``decode_moe``; input of ``moe_dense``):
  ``router [d, E]``, ``gate [E, d, f]``, ``up [E, d, f]``, ``down [E, f, d]``;
* sparse (``sparsify_moe``; input of ``moe``): ``router [d, E]``,
  ``gate_up`` SparseWeight ``[E, d, 2f]`` (encoded from ``concat([gate, up], -1)``),
  ``down`` SparseWeight ``[E, f, d]``;
* both, when ``num_shared_experts > 0``: ``shared_gate [d, fs]``, ``shared_up [d, fs]``,
  ``shared_down [fs, d]`` and, with ``shared_expert_gate``, ``shared_expert_gate [d, 1]``.
  These stay dense.

Every function here is pure and jit-able with static shapes; nothing reads a device array
on the host (``sparsify_moe``/``prune_moe`` are the one-time host-side conversions).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from samoyeds_jax.format import (
    SUPPORTED_DTYPES, SparseWeight, SparsityConfig, decode, encode, prune)
from samoyeds_jax.ops import GLU_CODES, _glu_act, ragged_dot

ROUTERS = ("mixtral", "softmax_topk")
ACTIVATIONS = tuple(GLU_CODES)  # the GLU activations the kernels fuse (ffi/glu.h)
EXPERT_KEYS = ("gate", "up", "down")
SHARED_KEYS = ("shared_gate", "shared_up", "shared_down")
SHARED_GATE_KEY = "shared_expert_gate"


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Static description of one MoE layer (hashable: pass it as a static argument).

    Attributes:
      num_experts: routed experts E.
      top_k: experts per token k, ``1 <= top_k <= num_experts``.
      d_model: model width d.
      d_ff: hidden width f of one routed expert.
      router: ``"mixtral"``: top-k of the logits, then softmax over those k (weights sum to
        1); ``"softmax_topk"``: softmax over all E, then the top-k probabilities as they
        are (no renormalisation; Qwen2-MoE / DeepSeek-MoE with ``norm_topk_prob=False``).
      activation: ``"silu"`` (SwiGLU) or ``"gelu"`` (exact erf GELU, GeGLU).
      num_shared_experts: dense experts every token goes through (DeepSeek-MoE: 2,
        Qwen2-MoE: 1). They are stored fused as one MLP of hidden width ``d_ff_shared``.
      d_ff_shared: total hidden width of the fused shared experts. ``None`` means
        ``d_ff * num_shared_experts`` (DeepSeek-MoE's convention: shared experts as wide as
        routed ones); Qwen1.5-MoE-A2.7B sets 5632 for its single shared expert. Normalised
        in ``__post_init__`` (0 without shared experts).
      shared_expert_gate: multiply the shared output by ``sigmoid(x @ w [d, 1])``
        (Qwen2-MoE).
      sparsity: the N:V + 2:4 pattern of the routed expert weights.

    Shape rules (raising ValueError): gate/up ``[d_model, d_ff]`` and down
    ``[d_ff, d_model]`` must both meet ``sparsity.check_shape``, i.e. d_model and d_ff are
    multiples of ``sub_row`` and of ``16 * V / N``.
    """

    num_experts: int
    top_k: int
    d_model: int
    d_ff: int
    router: str = "mixtral"
    activation: str = "silu"
    num_shared_experts: int = 0
    d_ff_shared: int | None = None
    shared_expert_gate: bool = False
    sparsity: SparsityConfig = dataclasses.field(default_factory=SparsityConfig)

    def __post_init__(self):
        def need_int(name, lo):
            val = getattr(self, name)
            if not isinstance(val, (int, np.integer)) or isinstance(val, bool):
                raise TypeError(f"MoEConfig.{name} must be an int, got {val!r}")
            if val < lo:
                raise ValueError(f"MoEConfig.{name} must be >= {lo}, got {val}")

        for name in ("num_experts", "top_k", "d_model", "d_ff"):
            need_int(name, 1)
        need_int("num_shared_experts", 0)
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} must be <= "
                             f"num_experts={self.num_experts}")
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router={self.router!r} must be one of {ROUTERS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEConfig.activation={self.activation!r} must be one of "
                             f"{ACTIVATIONS}")
        if not isinstance(self.sparsity, SparsityConfig):
            raise TypeError(f"MoEConfig.sparsity must be a SparsityConfig, got "
                            f"{type(self.sparsity).__name__}")
        if not isinstance(self.shared_expert_gate, (bool, np.bool_)):
            raise TypeError(f"MoEConfig.shared_expert_gate must be a bool, got "
                            f"{self.shared_expert_gate!r}")
        if self.num_shared_experts == 0:
            if self.d_ff_shared not in (None, 0):
                raise ValueError(f"MoEConfig.d_ff_shared={self.d_ff_shared} needs "
                                 f"num_shared_experts > 0")
            if self.shared_expert_gate:
                raise ValueError("MoEConfig.shared_expert_gate=True needs "
                                 "num_shared_experts > 0")
            object.__setattr__(self, "d_ff_shared", 0)
        else:
            if self.d_ff_shared is None:
                object.__setattr__(self, "d_ff_shared", self.d_ff * self.num_shared_experts)
            need_int("d_ff_shared", 1)
        sp = self.sparsity
        try:
            sp.check_shape(self.d_model, self.d_ff, "gate/up weight [d_model, d_ff]")
            sp.check_shape(self.d_ff, self.d_model, "down weight [d_ff, d_model]")
        except ValueError as err:
            raise ValueError(
                f"MoEConfig.d_model={self.d_model} / d_ff={self.d_ff} do not fit "
                f"sparsity {sp.n}:{sp.v} sub_row={sp.sub_row}: {err}") from None

    @property
    def has_shared(self) -> bool:
        return self.num_shared_experts > 0


# Real models' MoE layer shapes (benchmarks and the demo build random layers from these).
# Every real preset meets the format's multiples for all supported N:V with sub_row=128
# (d_model and d_ff multiples of 128, hence of 16 * V / N <= 64), so none is padded.
PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": dict(num_experts=8, top_k=2, d_model=4096, d_ff=14336),
    "mixtral-8x22b": dict(num_experts=8, top_k=2, d_model=6144, d_ff=16384),
    # Qwen1.5-MoE-A2.7B (Qwen2MoeForCausalLM): top-4 of 60, one sigmoid-gated shared expert.
    "qwen2-moe": dict(num_experts=60, top_k=4, d_model=2048, d_ff=1408,
                      router="softmax_topk", num_shared_experts=1, d_ff_shared=5632,
                      shared_expert_gate=True),
    # DeepSeek-MoE 16B: top-6 of 64, two shared experts as wide as the routed ones.
    "deepseek-moe": dict(num_experts=64, top_k=6, d_model=2048, d_ff=1408,
                         router="softmax_topk", num_shared_experts=2),
    # OpenMoE-8B (OrionZheng/openmoe-8b): top-2 of 32, SwiGLU. Its router (ColossalAI's
    # Top2Router) keeps the top-2 softmax probabilities unrenormalised; the capacity
    # factor it trains with is not modelled (drop-free). 2048 = 16*128, 8192 = 64*128.
    "openmoe-8b": dict(num_experts=32, top_k=2, d_model=2048, d_ff=8192,
                       router="softmax_topk"),
    # MiniCPM-MoE-8x2B (openbmb/MiniCPM-MoE-8x2B): top-2 of 8, SwiGLU, Mixtral-style router.
    # 2304 = 18*128 and 5760 = 45*128: no padding needed for any N:V at sub_row=128.
    "minicpm-moe-8x2b": dict(num_experts=8, top_k=2, d_model=2304, d_ff=5760),
    "tiny": dict(num_experts=8, top_k=2, d_model=256, d_ff=512),
}


def preset_config(name: str, sparsity: SparsityConfig | None = None) -> MoEConfig:
    """The MoEConfig of a :data:`PRESETS` entry, with ``sparsity`` (default 1:2, L=128)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return MoEConfig(**PRESETS[name], sparsity=sparsity or SparsityConfig())


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
    e, d, f, fs = cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.d_ff_shared
    keys = iter(jax.random.split(key, 8))
    p = {"router": _normal_jit(next(keys), (d, e), dtype, d),
         "gate": _normal_jit(next(keys), (e, d, f), dtype, d),
         "up": _normal_jit(next(keys), (e, d, f), dtype, d),
         "down": _normal_jit(next(keys), (e, f, d), dtype, f)}
    if cfg.has_shared:
        p["shared_gate"] = _normal_jit(next(keys), (d, fs), dtype, d)
        p["shared_up"] = _normal_jit(next(keys), (d, fs), dtype, d)
        p["shared_down"] = _normal_jit(next(keys), (fs, d), dtype, fs)
        if cfg.shared_expert_gate:
            p[SHARED_GATE_KEY] = _normal_jit(next(keys), (d, 1), dtype, d)
    return p


def _check_cfg(cfg: Any) -> None:
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")


def _expect(params: dict, key: str, shape: tuple[int, ...], what: str) -> None:
    if key not in params:
        raise ValueError(f"params is missing {key!r} ({what} {list(shape)}); "
                         f"it has {sorted(params)}")
    got = tuple(params[key].shape)
    if got != tuple(shape):
        raise ValueError(f"params[{key!r}] must be {what} {list(shape)}, got {list(got)}")


def _check_common(params: Any, cfg: MoEConfig) -> None:
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    d, e, fs = cfg.d_model, cfg.num_experts, cfg.d_ff_shared
    _expect(params, "router", (d, e), "[d_model, num_experts]")
    if cfg.has_shared:
        _expect(params, "shared_gate", (d, fs), "[d_model, d_ff_shared]")
        _expect(params, "shared_up", (d, fs), "[d_model, d_ff_shared]")
        _expect(params, "shared_down", (fs, d), "[d_ff_shared, d_model]")
        if cfg.shared_expert_gate:
            _expect(params, SHARED_GATE_KEY, (d, 1), "[d_model, 1]")


def _check_dense(params: Any, cfg: MoEConfig) -> None:
    _check_cfg(cfg)
    _check_common(params, cfg)
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
    _expect(params, "gate", (e, d, f), "[num_experts, d_model, d_ff]")
    _expect(params, "up", (e, d, f), "[num_experts, d_model, d_ff]")
    _expect(params, "down", (e, f, d), "[num_experts, d_ff, d_model]")


def _check_sparse(params: Any, cfg: MoEConfig) -> None:
    _check_cfg(cfg)
    _check_common(params, cfg)
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
    for key, shape, what in (("gate_up", (e, d, 2 * f), "SparseWeight [E, d_model, 2*d_ff]"),
                             ("down", (e, f, d), "SparseWeight [E, d_ff, d_model]")):
        sw = params.get(key)
        if not isinstance(sw, SparseWeight):
            raise TypeError(f"params[{key!r}] must be a {what} (from sj.sparsify_moe), got "
                            f"{type(sw).__name__}; for dense parameters use sj.moe_dense")
        _expect(params, key, shape, what)
        if sw.config != cfg.sparsity:
            raise ValueError(f"params[{key!r}] is encoded with {sw.config}, but "
                             f"cfg.sparsity is {cfg.sparsity}")


# Largest number of weight elements pruned/encoded in one host call (experts are chunked).
_CHUNK_ELEMS = 1 << 26


def _expert_chunks(num_experts: int, per_expert: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMS // max(per_expert, 1))
    return [(s, min(s + step, num_experts)) for s in range(0, num_experts, step)]


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(enabled: bool, total: int, desc: str):
    """A tqdm bar over `total` experts, or a no-op when disabled or tqdm is missing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="expert")


def _concat_sw(parts: list[SparseWeight]) -> SparseWeight:
    if len(parts) == 1:
        return parts[0]
    return SparseWeight(*(jnp.concatenate([getattr(p, a) for p in parts], axis=0)
                          for a in ("values", "indices", "metadata")), parts[0].config)


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
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
    chunks = _expert_chunks(e, 3 * d * f)
    gate_up, down = [], []
    bar = _progress(progress, e, "sparsify experts")
    for a, b in chunks:
        gu = jnp.concatenate([prune(dense["gate"][a:b], sp), prune(dense["up"][a:b], sp)],
                             axis=-1)
        gate_up.append(encode(gu, sp))
        del gu
        down.append(encode(prune(dense["down"][a:b], sp), sp))
        bar.update(b - a)
    bar.close()
    out = {k: v for k, v in dense.items() if k not in EXPERT_KEYS}
    out["gate_up"] = _concat_sw(gate_up)
    out["down"] = _concat_sw(down)
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
    out = {k: v for k, v in sparse.items() if k not in ("gate_up", "down")}
    gu = _decode_jit(sparse["gate_up"])
    out["gate"], out["up"] = gu[..., :cfg.d_ff], gu[..., cfg.d_ff:]
    out["down"] = _decode_jit(sparse["down"])
    return out


_decode_jit = jax.jit(decode)


def moe_param_bytes(params: Any) -> int:
    """Bytes stored by a parameter pytree (dense arrays, SparseWeights: all their arrays)."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree_util.tree_leaves(params))


# --- the layer's pieces ----------------------------------------------------------------

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
    inv = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    yt = y[inv].reshape(t, k, y.shape[-1]).astype(jnp.float32)
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
    h = ragged_dot(x, gate_up, group_sizes, sel, glu=activation)     # [R, f]
    return ragged_dot(h, down, group_sizes)                           # [R, d]


def expert_ffn_dense(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                     group_sizes: jax.Array, sel: jax.Array, activation: str = "silu"
                     ) -> jax.Array:
    """The dense twin of :func:`expert_ffn`: ``jax.lax.ragged_dot`` on gathered rows, with
    the same rounding points (each projection accumulates in float32 and rounds to the
    compute dtype)."""
    dt = gate.dtype
    xs = x[sel]

    def rdot(a, w):
        return jax.lax.ragged_dot(a, w, group_sizes,
                                  preferred_element_type=jnp.float32).astype(dt)

    h = _glu(rdot(xs, gate), rdot(xs, up), activation, dt)
    return rdot(h, down)


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
