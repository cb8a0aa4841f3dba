"""The MoE layer's parameters: every key, its shape as a function of the config, whether it
is dense or encoded (a SparseWeight), and whether it carries the expert axis.

Two layouts hold the same router and shared experts (dense, replicated): the dense layout
(``init_dense_moe``; input of ``moe_dense``) with the routed experts ``gate``, ``up``,
``down``, and the sparse layout (``sparsify_moe``; input of ``moe``) with the SparseWeights
``gate_up`` (``concat([gate, up], -1)``; or stacked ``[E, 2, d, f]``, the form tensor
parallelism splits) and ``down``. The tables below are the only statement of the keys and
shapes; the parameter checks of :mod:`samoyeds_jax.moe`, the sharding specs, the flax
modules and the checkpoint converter and loader read them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

from samoyeds_jax.format import SparseWeight

if TYPE_CHECKING:
    from samoyeds_jax.config import MoEConfig

# The sizes a shape may name, read off the config.
_SIZES: dict[str, Callable[[Any], int]] = {
    "num_experts": lambda c: c.num_experts,
    "d_model": lambda c: c.d_model,
    "d_ff": lambda c: c.d_ff,
    "2*d_ff": lambda c: 2 * c.d_ff,
    "d_ff_shared": lambda c: c.d_ff_shared,
    "1": lambda c: 1,
    "2": lambda c: 2,
}


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of the layer.

    Attributes:
      key: its name in the parameter dict.
      dims: the sizes of its axes, by name (``"num_experts"``, ``"d_model"``, ``"d_ff"``,
        ``"2*d_ff"``, ``"d_ff_shared"``, ``"1"``); for a SparseWeight the logical dense
        ``[E, K, M]``.
      sparse: encoded (a SparseWeight) rather than a dense array.
      expert_sharded: its leading axis is the expert axis E (split over an expert mesh axis).
      needs: the MoEConfig property it exists under (``"has_shared"``,
        ``"shared_expert_gate"``), or None (always).
    """

    key: str
    dims: tuple[str, ...]
    sparse: bool = False
    expert_sharded: bool = False
    needs: str | None = None

    def shape(self, cfg: MoEConfig) -> tuple[int, ...]:
        return tuple(_SIZES[d](cfg) for d in self.dims)

    def present(self, cfg: MoEConfig) -> bool:
        return self.needs is None or bool(getattr(cfg, self.needs))

    def describe(self) -> str:
        """E.g. ``"SparseWeight [num_experts, d_model, 2*d_ff]"``."""
        return ("SparseWeight " if self.sparse else "") + f"[{', '.join(self.dims)}]"


ROUTER = Param("router", ("d_model", "num_experts"))
DENSE_EXPERTS = (
    Param("gate", ("num_experts", "d_model", "d_ff"), expert_sharded=True),
    Param("up", ("num_experts", "d_model", "d_ff"), expert_sharded=True),
    Param("down", ("num_experts", "d_ff", "d_model"), expert_sharded=True),
)
# gate_up = concat([gate, up], -1): one product with the GLU fused into its epilogue.
SPARSE_EXPERTS = (
    Param("gate_up", ("num_experts", "d_model", "2*d_ff"), sparse=True, expert_sharded=True),
    Param("down", ("num_experts", "d_ff", "d_model"), sparse=True, expert_sharded=True),
)
# The same gate_up with gate and up stacked ([:, 0] gate, [:, 1] up): splitting its d_ff
# axis keeps each shard's gate and up columns together (tensor parallelism, sharding.py).
GATE_UP_STACKED = Param("gate_up", ("num_experts", "2", "d_model", "d_ff"), sparse=True,
                        expert_sharded=True)
SHARED = (
    Param("shared_gate", ("d_model", "d_ff_shared"), needs="has_shared"),
    Param("shared_up", ("d_model", "d_ff_shared"), needs="has_shared"),
    Param("shared_down", ("d_ff_shared", "d_model"), needs="has_shared"),
    Param("shared_expert_gate", ("d_model", "1"), needs="shared_expert_gate"),
)

EXPERT_KEYS = tuple(p.key for p in DENSE_EXPERTS)            # gate, up, down
SPARSE_EXPERT_KEYS = tuple(p.key for p in SPARSE_EXPERTS)    # gate_up, down
SHARED_KEYS = tuple(p.key for p in SHARED if p.needs == "has_shared")
SHARED_GATE_KEY = next(p.key for p in SHARED if p.needs == "shared_expert_gate")
EXPERT_SHARDED_KEYS = tuple(dict.fromkeys(
    p.key for p in DENSE_EXPERTS + SPARSE_EXPERTS if p.expert_sharded))


def replicated(cfg: MoEConfig) -> tuple[Param, ...]:
    """The parameters both layouts hold for ``cfg`` (router, shared experts): dense and
    replicated over the expert axis."""
    return tuple(p for p in (ROUTER, *SHARED) if p.present(cfg))


def experts(sparse: bool) -> tuple[Param, ...]:
    """The routed expert weights of the sparse or the dense layout."""
    return SPARSE_EXPERTS if sparse else DENSE_EXPERTS


def params(cfg: MoEConfig, sparse: bool) -> tuple[Param, ...]:
    """Every parameter of a layout for ``cfg``: router, routed experts, shared experts."""
    return (ROUTER, *experts(sparse), *(p for p in SHARED if p.present(cfg)))


def check(params_: Any, cfg: MoEConfig, sparse: bool) -> None:
    """Raise unless ``params_`` holds the layout's parameters with their shapes.

    TypeError for a non-dict or a routed expert of the wrong kind; ValueError naming the
    key, the expected shape and the config's sizes for a missing key, a wrong shape, or a
    SparseWeight encoded with another pattern than ``cfg.sparsity``.
    """
    if not isinstance(params_, dict):
        raise TypeError(f"params must be a dict, got {type(params_).__name__}")
    for p in replicated(cfg):
        _expect(params_, p, cfg)
    for p in experts(sparse):
        val = params_.get(p.key)
        if p.key == GATE_UP_STACKED.key and getattr(val, "ndim", 0) == len(GATE_UP_STACKED.dims):
            p = GATE_UP_STACKED
        if p.sparse and not isinstance(val, SparseWeight):
            raise TypeError(f"params[{p.key!r}] must be a {p.describe()} (from "
                            f"sj.sparsify_moe), got {type(val).__name__}; for dense "
                            f"parameters use sj.moe_dense")
        _expect(params_, p, cfg)
        if p.sparse and val.config != cfg.sparsity:
            raise ValueError(f"params[{p.key!r}] is encoded with {val.config}, but "
                             f"cfg.sparsity is {cfg.sparsity}")


def _expect(params_: dict, p: Param, cfg: MoEConfig) -> None:
    shape = p.shape(cfg)
    if p.key not in params_:
        raise ValueError(f"params is missing {p.key!r} ({p.describe()} {list(shape)}); "
                         f"it has {sorted(params_)}")
    got = tuple(params_[p.key].shape)
    if got != shape:
        raise ValueError(f"params[{p.key!r}] must be {p.describe()} {list(shape)}, got "
                         f"{list(got)}")


def stack_gate_up(sw: SparseWeight) -> SparseWeight:
    """``gate_up`` ``[E, d, 2f]`` (``concat([gate, up], -1)``) as ``[E, 2, d, f]`` (gate
    and up stacked): the same stored arrays, each ``[E, Mk, .]`` viewed as
    ``[E, 2, Mk/2, .]`` (gate's kept rows come first). Already stacked: unchanged."""
    if sw.ndim == len(GATE_UP_STACKED.dims):
        return sw
    return SparseWeight(*(a.reshape(a.shape[0], 2, a.shape[1] // 2, a.shape[2])
                          for a in (sw.values, sw.indices, sw.metadata)), sw.config)


def concat_gate_up(sw: SparseWeight) -> SparseWeight:
    """The inverse of :func:`stack_gate_up` (``[E, 2, d, f]`` -> ``[E, d, 2f]``)."""
    if sw.ndim != len(GATE_UP_STACKED.dims):
        return sw
    return SparseWeight(*(a.reshape(a.shape[0], 2 * a.shape[2], a.shape[3])
                          for a in (sw.values, sw.indices, sw.metadata)), sw.config)
