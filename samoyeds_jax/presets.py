"""Real models' MoE layer shapes: the demo and the benchmarks build random layers from
these (:func:`preset_config`)."""

from __future__ import annotations

from typing import Any

from samoyeds_jax.config import MoEConfig
from samoyeds_jax.format import SparsityConfig

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
