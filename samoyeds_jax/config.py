"""The static description of one MoE layer: :class:`MoEConfig`, and the routers and
activations it may name."""

from __future__ import annotations

import dataclasses

import numpy as np

from samoyeds_jax.format import SparsityConfig
from samoyeds_jax.ops import GLU_CODES

ROUTERS = ("mixtral", "softmax_topk")
ACTIVATIONS = tuple(GLU_CODES)  # the GLU activations the kernels fuse (ffi/glu.h)


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
