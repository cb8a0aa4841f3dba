"""samoyeds_jax: dual-side sparse (2:4 + N:V weights x routed activations) MoE for JAX."""

from samoyeds_jax.format import SparseWeight, SparsityConfig, decode, encode, prune
from samoyeds_jax.ops import dot, ragged_dot

__all__ = ["SparseWeight", "SparsityConfig", "decode", "dot", "encode", "prune",
           "ragged_dot"]
__version__ = "0.1.0"
