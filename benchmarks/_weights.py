"""Random MoE layer weights for the benchmarks, drawn directly in the encoded format.

No absl flags here, so every benchmark script can import it.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp

import samoyeds_jax as sj
from samoyeds_jax import layout
from samoyeds_jax.config import MoEConfig
from samoyeds_jax.format import (
    GROUP_WIDTH, KEPT_PER_GROUP, META_BITS_PER_GROUP, META_COLS_PER_WORD, SparseWeight,
    swap_metadata)


def _normal(key: jax.Array, shape: tuple[int, ...], dtype, std: float) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def _pick(key: jax.Array, shape: tuple[int, ...], choices: list[tuple[int, ...]]
          ) -> jax.Array:
    """A uniformly drawn row of `choices` per position: [*shape, len(choices[0])] uint32."""
    table = jnp.array(choices, jnp.uint32)
    # Random bits modulo the choice count (bias < 1e-8: irrelevant) compile faster than
    # randint or an argsort of uniforms on XLA:CPU.
    draw = jax.random.bits(key, shape, jnp.uint32) % jnp.uint32(len(choices))
    return table[draw]


# random_sparse_weight packs 2 positions per group of 4 columns into a nibble.
assert KEPT_PER_GROUP == 2 and GROUP_WIDTH == 4, "format constants changed"


def random_sparse_weight(key: jax.Array, lead: tuple[int, ...], k: int, m: int, dtype,
                         sp: sj.SparsityConfig) -> SparseWeight:
    """A random valid SparseWeight of logical shape ``[*lead, K, M]``, built on the device.

    The format's documented arrays (Mk = M * N / V): values ``[*lead, Mk, K/2]``, indices
    uint8 ``[*lead, Mk, K/L]`` (N distinct increasing sub-rows of V per block and window),
    metadata uint32 ``[*lead, Mk, K/32]`` (an ordered 2:4 pair per group of 4 columns,
    swapped into hardware order). The kernels do the same work whatever the values are, and
    this takes milliseconds where sj.encode (host numpy) takes about a minute per Mixtral
    layer. Values have std 1/sqrt(K * density), so that outputs keep unit scale.
    """
    mk = sp.kept_rows(m)
    kv, ki, km = jax.random.split(key, 3)
    values = _normal(kv, (*lead, mk, k // 2), dtype, 1.0 / math.sqrt(k * sp.density))
    # N of V sub-rows per (block, window), increasing: one of the N-subsets of range(V).
    kept = _pick(ki, (*lead, m // sp.v, k // sp.sub_row),
                 list(itertools.combinations(range(sp.v), sp.n)))   # [.., M/V, K/L, N]
    indices = jnp.moveaxis(kept, -1, -2).reshape(*lead, mk, k // sp.sub_row).astype(jnp.uint8)
    # One of the 6 ordered pairs (first < second) of positions in each group of 4 columns.
    pos = _pick(km, (*lead, mk, k // GROUP_WIDTH),
                list(itertools.combinations(range(GROUP_WIDTH), KEPT_PER_GROUP)))
    nib = pos[..., 0] | (pos[..., 1] << 2)                           # [.., Mk, K/4]
    groups = META_COLS_PER_WORD // GROUP_WIDTH
    shifts = jnp.arange(groups, dtype=jnp.uint32) * META_BITS_PER_GROUP
    words = (nib.reshape(*lead, mk, k // META_COLS_PER_WORD, groups) << shifts).sum(
        -1, dtype=jnp.uint32)
    return SparseWeight(values, indices, swap_metadata(words), sp)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def random_sparse_layer(key: jax.Array, cfg: MoEConfig, dtype) -> dict:
    """Sparse layer parameters with the tree structure, shapes and dtypes of
    ``sj.sparsify_moe(sj.init_dense_moe(...))``, drawn directly in the encoded format
    (jit-able, so ``jax.eval_shape`` of it is the abstract sparse layer)."""
    keys = iter(jax.random.split(key, 8))
    p = {}
    for param in layout.params(cfg, sparse=True):
        shape = param.shape(cfg)
        if param.sparse:
            e, k, m = shape
            p[param.key] = random_sparse_weight(next(keys), (e,), k, m, dtype, cfg.sparsity)
        else:
            p[param.key] = _normal(next(keys), shape, dtype, shape[-2] ** -0.5)  # 1/sqrt(fan_in)
    return p


def pruned_sparse_layer(key: jax.Array, cfg: MoEConfig, dtype) -> dict:
    """The library's own path: random dense weights, magnitude-pruned and encoded on the
    host (sj.sparsify_moe; ~1 min per Mixtral-8x7B layer)."""
    return sj.sparsify_moe(sj.init_dense_moe(key, cfg, dtype), cfg)
