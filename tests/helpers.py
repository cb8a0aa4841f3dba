"""What the tests share: seeds, random inputs, the float64 references, the tolerances and
the readers of compiled HLO (collective counts, weight all-gathers).

Tolerances (:data:`TOL`) are relative Frobenius errors, ``|y - ref| / |ref|`` over a whole
output or per row, keyed by what is compared and by dtype. They all come from one fact:
rounding a float32 result to the dtype changes it by at most the unit roundoff, 2^-8 =
3.9e-3 for bfloat16 (8-bit significand) and 2^-11 = 4.9e-4 for float16 (11 bits); float32
accumulation adds ~1e-5 at these sizes. Each bound is that many roundings, with a margin
of 2-5x over the largest error measured:

* ``product``: one product (``ragged_dot``, ``dot``) against float64 on the decoded
  weight, whole output: one rounding (measured on the CPU handler over every config:
  bf16 <= 1.7e-3, fp16 <= 2.1e-4).
* ``product_row``: the same, for the worst single row (measured bf16 <= 2.2e-3, fp16
  <= 2.7e-4); also a whole output that went through two roundings (a gradient w.r.t. x:
  the rounded cotangent, then dx).
* ``grad``: a gradient whose cotangent is itself a rounded output (a quadratic loss, or
  through the whole layer), against float64 or the dense twin.
* ``layer``/``layer_row``: the MoE layer against float64, whole / worst token: rounded
  after gate/up, after the GLU and after down (measured bf16 ~4e-3 / ~8e-3, fp16
  ~6e-4 / ~9e-4).
* ``twin``: the sparse layer against its dense twin on the same pruned weights: the twin
  rounds gate and up before the GLU, the fused epilogue takes them from the float32 sums
  (measured bf16 ~4.6e-3, fp16 ~5.8e-4).
* ``reordered``: the same computation with float32 sums in another order (two programs,
  a module around the function, the sharded layer against one device): a rounding flips
  here and there (measured <= 6e-5).
* ``sharded_grad``: the sharded layer's gradient w.r.t. x against one device: the
  data-parallel primitive sums the expert shards' bf16 partial dx (measured 2e-3).
* ``k_split``: a product (or the layer) whose K is split over devices against one device:
  each device's partial product is rounded to the dtype before the float32 sum, so a few
  roundings of partial sums the size of the output (measured bf16 <= 3.3e-3 over 4 and 8
  splits).
"""

from __future__ import annotations

import math
import os
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import samoyeds_jax as sj
from samoyeds_jax import layout
from samoyeds_jax.format import swap_metadata

BF16, F16 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)
DTYPES = [jnp.bfloat16, jnp.float16]

TOL = {
    "product": {BF16: 1e-2, F16: 2e-3},
    "product_row": {BF16: 2e-2, F16: 5e-3},
    "grad": {BF16: 3e-2},
    "layer": {BF16: 1.5e-2, F16: 2.5e-3},
    "layer_row": {BF16: 3e-2, F16: 5e-3},
    "twin": {BF16: 1e-2, F16: 1.5e-3},
    "reordered": {BF16: 3e-3, F16: 5e-4},
    "sharded_grad": {BF16: 1e-2},
    "k_split": {BF16: 1e-2},
}


def tol(kind: str, dtype: Any) -> float:
    """The bound of :data:`TOL` for comparing ``kind`` outputs of ``dtype``."""
    return TOL[kind][jnp.dtype(dtype)]


# --- seeds ----------------------------------------------------------------------------------

def _base_seed() -> int:
    env = os.environ.get("SAMOYEDS_TEST_SEED")
    if env:
        return int(env) % 2**32
    return int(np.random.SeedSequence().entropy % 2**32)


BASE_SEED = _base_seed()


def seed_for(name: str) -> int:
    """A seed from the run's base seed and a name (a test's node id, or the name of data
    that several tests share), so that SAMOYEDS_TEST_SEED replays it."""
    ss = np.random.SeedSequence([BASE_SEED, zlib.crc32(name.encode())])
    return int(ss.generate_state(1)[0])


def has_gpu() -> bool:
    """True when JAX sees a GPU (platform 'gpu')."""
    try:
        return any(d.platform == "gpu" for d in jax.devices("gpu"))
    except RuntimeError:
        return False


# --- inputs ---------------------------------------------------------------------------------

def rand(rng: np.random.Generator, shape: Any, dtype: Any = jnp.float32,
         scale: float = 1.0) -> jax.Array:
    """Random normal values times ``scale`` in ``dtype``, no exact zeros (a zero would hide
    an unwritten row; one becomes ``scale``)."""
    a = (rng.standard_normal(shape) * scale).astype(jnp.dtype(dtype))
    return jnp.asarray(np.where(a == 0, np.asarray(scale, a.dtype), a))


def sparse_weight(rng: np.random.Generator, cfg: sj.SparsityConfig, dtype: Any,
                  shape: tuple[int, ...], scale: float = 1.0) -> sj.SparseWeight:
    """A random weight ``[..., K, M]``, magnitude-pruned and encoded."""
    return sj.encode(sj.prune(rand(rng, shape, dtype, scale), cfg), cfg)


def dense_layer(rng: np.random.Generator, cfg: sj.MoEConfig, dtype: Any) -> dict:
    """Random dense MoE parameters (samoyeds_jax.layout's dense layout): std
    1/sqrt(fan_in), the routed down projection 2/sqrt(fan_in)."""
    out = {}
    for p in layout.params(cfg, sparse=False):
        shape = p.shape(cfg)
        gain = 2.0 if p.key == "down" else 1.0
        out[p.key] = rand(rng, shape, dtype, gain / math.sqrt(shape[-2]))
    return out


# --- the float64 references -------------------------------------------------------------------

def f64(a: Any) -> np.ndarray:
    """Any array (jax or numpy, bf16/fp16 included) as float64 numpy."""
    return np.asarray(a).astype(np.float64)


def rel_err(y: Any, ref: Any) -> float:
    """``|y - ref| / |ref|`` (Frobenius, float64)."""
    y, ref = f64(y), f64(ref)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def ref_ragged_dot(x: Any, w64: np.ndarray, group_sizes: Any, sel: Any = None,
                   rows: int | None = None, only: Any = None) -> np.ndarray:
    """The float64 grouped product: ``out[r] = x[sel[r] or r] @ w64[e(r)]`` for the rows
    ``r < sum(group_sizes)`` (clipped to the ``rows`` that exist), zero after; ``e(r)``
    is the expert whose group holds row r.

    Args:
      x: ``[T, K]``; w64: ``[E, K, M]`` float64 (e.g. ``f64(sj.decode(sw))``).
      group_sizes: ``[E]``; sel: ``[R]`` or None.
      rows: R (default: ``len(sel)``, or T without sel).
      only: row indices below ``sum(group_sizes)``: return just those rows.
    Returns:
      ``[R, M]`` float64, or ``[len(only), M]``.
    """
    x64 = f64(x)
    ends = np.cumsum(np.asarray(group_sizes).astype(np.int64))
    rows = (x64.shape[0] if sel is None else len(sel)) if rows is None else rows
    valid = min(int(ends[-1]) if len(ends) else 0, rows)
    r = np.arange(valid) if only is None else np.asarray(only, np.int64)
    expert = np.searchsorted(ends, r, side="right")
    src = r if sel is None else np.asarray(sel).astype(np.int64)[r]
    got = np.zeros((len(r), w64.shape[-1]))
    for e in np.unique(expert):
        hit = expert == e
        got[hit] = x64[src[hit]] @ w64[e]
    if only is not None:
        return got
    out = np.zeros((rows, w64.shape[-1]))
    out[:valid] = got
    return out


def routed_rows(group_sizes: Any, rows: int, sel: Any = None, tokens: int | None = None):
    """The ``(expert, row, token)`` of every row a call reads, for any routing, as the
    CUDA kernels read it (docs/bad_inputs.md): a negative size counts as 0, each range is
    clipped to the rows left, and a sel entry outside ``[0, tokens)`` is a zero row (left
    out)."""
    start = 0
    for e, g in enumerate(np.asarray(group_sizes).tolist()):
        size = min(max(g, 0), rows - start)
        for r in range(start, start + size):
            t = r if sel is None else int(sel[r])
            if tokens is None or 0 <= t < tokens:
                yield e, r, t
        start += size


def kept_positions(sw: sj.SparseWeight) -> tuple[np.ndarray, np.ndarray]:
    """Where each stored value sits in the dense weight, read from the format's
    specification (docs/format.md) in numpy, independently of ``sj.decode``: ``(k, m)``,
    each int64 ``[..., Mk, K/2]``, so that ``decode(sw)[..., k, m] == sw.values``."""
    cfg = sw.config
    meta = swap_metadata(np.asarray(sw.metadata))                  # canonical order
    idx = np.asarray(sw.indices).astype(np.int64)
    mk, words = meta.shape[-2:]
    j = np.arange(words * 16)                   # kept value j: word j // 16, slot j % 16
    pos = (meta[..., j // 16] >> (2 * (j % 16)).astype(np.uint32)) & np.uint32(3)
    k = (j // 2) * 4 + pos.astype(np.int64)
    window = j // (cfg.sub_row // 2)
    m = (np.arange(mk) // cfg.n * cfg.v)[:, None] + idx[..., window]
    return k, m


def ref_dvalues(x: Any, ct: Any, sw: sj.SparseWeight, group_sizes: Any, sel: Any = None
                ) -> np.ndarray:
    """The float64 gradient of ``sum(ragged_dot(x, sw, group_sizes, sel) * ct)`` w.r.t.
    ``sw.values``: ``dW_e = sum_r x[src(r)]^T ct[r]`` over expert e's rows (clipped as the
    kernels read group sizes; a sel entry outside ``[0, T)`` is a zero row), read at the
    stored positions (:func:`kept_positions`). ``sw [E, K, M]``; returns ``[E, Mk, K/2]``."""
    x64, ct64 = f64(x), f64(ct)
    e_count, k_dim, m_dim = sw.shape
    dw = np.zeros((e_count, k_dim, m_dim))
    for e, r, t in routed_rows(group_sizes, ct64.shape[0], sel, x64.shape[0]):
        dw[e] += np.outer(x64[t], ct64[r])
    k, m = kept_positions(sw)
    return np.stack([dw[e][k[e], m[e]] for e in range(e_count)])


def act(h: np.ndarray, activation: str) -> np.ndarray:
    """The GLU activations in float64: silu, or gelu with the exact erf."""
    if activation == "silu":
        return h / (1 + np.exp(-h))
    return 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))


def ref_glu(y64: np.ndarray, glu: str) -> np.ndarray:
    """``act(gate) * up`` over the halves ``[gate | up]`` of a ``[..., 2F]`` product."""
    f = y64.shape[-1] // 2
    return act(y64[..., :f], glu) * y64[..., f:]


# --- compiled HLO ----------------------------------------------------------------------------

_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|all-to-all|collective-permute|"
                         r"reduce-scatter)(?:-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def collectives(hlo: str) -> dict[str, int]:
    """How many collectives of each kind a compiled HLO text holds (async ones once)."""
    out: dict[str, int] = {}
    for _, op in _COLLECTIVE.findall(hlo):
        out[op] = out.get(op, 0) + 1
    return out


def weight_gathers(hlo: str) -> list[str]:
    """The all-gathers that move weights: results of rank >= 3 (the SparseWeight leaves
    and dense expert weights; the layer's activations and routing arrays are at most 2-D)
    or of the index / metadata dtypes."""
    found = []
    for shape, op in _COLLECTIVE.findall(hlo):
        if op == "all-gather" and any(dt in ("u8", "u32") or len(dims.split(",")) >= 3
                                      for dt, dims in _ARRAY.findall(shape)):
            found.append(shape)
    return found
