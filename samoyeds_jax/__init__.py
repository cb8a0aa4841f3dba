"""samoyeds_jax: dual-side sparse (2:4 + N:V weights x routed activations) MoE for JAX."""

from samoyeds_jax.calibrate import calibrate_moe, prune_calibrated, reconstruction_error
from samoyeds_jax.checkpoint import load_checkpoint
from samoyeds_jax.format import (
    SparseWeight, SparsityConfig, decode, encode, prune, validate)
from samoyeds_jax.moe import (
    MoEConfig, combine, decode_moe, dispatch, init_dense_moe, moe, moe_dense,
    moe_param_bytes, prune_moe, route, sparsify_moe)
from samoyeds_jax.ops import dot, ragged_dot
from samoyeds_jax.sharding import moe_sharded, ragged_dot_sharded, shard_params

# The product's autodiff rules and its lowering under jit are registered on the primitive
# of `ops` by these two modules; importing the package imports them.
from samoyeds_jax import backward as _backward  # noqa: E402,F401  (isort: skip)
from samoyeds_jax import partitioning as _partitioning  # noqa: E402,F401  (isort: skip)

# The flax modules live in `samoyeds_jax.flax` (imported on demand: flax is optional).
__all__ = ["MoEConfig", "SparseWeight", "SparsityConfig", "combine", "decode", "decode_moe",
           "dispatch", "dot", "encode", "init_dense_moe", "moe", "moe_dense",
           "moe_param_bytes", "prune", "prune_moe", "ragged_dot", "route", "sparsify_moe",
           "calibrate_moe", "load_checkpoint", "prune_calibrated", "reconstruction_error",
           "moe_sharded", "ragged_dot_sharded", "shard_params", "validate"]
__version__ = "0.1.0"

