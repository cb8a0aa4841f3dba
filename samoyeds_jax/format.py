"""The dual-side sparse weight format: SparsityConfig, prune, encode, decode, SparseWeight.

A weight ``W [..., K, M]`` (flax's ``[in_features, out_features]``, leading axes such as
the expert axis E) is used as ``y = x @ W``. The sparse tensor cores see ``A = W^T
[M, K]``, sparse along K:

* N:V -- A's rows form blocks of V consecutive rows, K forms windows of L = ``sub_row``
  columns; in every (block, window) exactly N of the V *sub-rows* are stored.
* 2:4 -- inside a kept sub-row every aligned group of 4 columns holds at most 2 nonzeros.

Stored arrays (``Mk = M * N / V`` kept rows):

* ``values``   ``[..., Mk, K/2]`` the two kept values of every 2:4 group, increasing column;
* ``indices``  ``[..., Mk, K/L]`` uint8 sub-row index: kept row ``r = b*N + j`` holds, in
  window ``w``, row ``b*V + indices[r, w]`` of A (distinct and increasing within a block);
* ``metadata`` ``[..., Mk, K/32]`` uint32, 2 bits per kept value, in hardware order: the
  canonical word (row, c) holds group g of columns ``[32c, 32c+32)`` in bits
  ``[4g, 4g+4)`` (low 2 bits: first kept position, high 2 bits: second); the hardware
  order swaps 16-bit halves between rows r and r+8 of every 16-row tile (ffi/format.h
  says why). :func:`swap_metadata` converts either way.

The constants come from the compiled module, which takes them from ``ffi/format.h``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from samoyeds_jax import _samoyeds
from samoyeds_jax._util import rank

SUPPORTED_NV: tuple[tuple[int, int], ...] = tuple(tuple(p) for p in _samoyeds.SUPPORTED_NV)
SUPPORTED_SUB_ROWS: tuple[int, ...] = tuple(_samoyeds.SUPPORTED_SUB_ROWS)
GROUP_WIDTH: int = _samoyeds.GROUP_WIDTH
KEPT_PER_GROUP: int = _samoyeds.KEPT_PER_GROUP
META_COLS_PER_WORD: int = _samoyeds.META_COLS_PER_WORD
META_BITS_PER_GROUP: int = _samoyeds.META_BITS_PER_GROUP
ROW_TILE: int = _samoyeds.ROW_TILE
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The stored arrays of a SparseWeight, in pytree order, and the dtypes of the last two.
SPARSE_PARTS: tuple[str, ...] = ("values", "indices", "metadata")
INDICES_DTYPE = np.dtype(np.uint8)
METADATA_DTYPE = np.dtype(np.uint32)


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """The N:V + 2:4 pattern: keep ``n`` of every ``v`` sub-rows of length ``sub_row``.

    Density is ``n / v / 2``. Supported: (n, v) in SUPPORTED_NV and sub_row in
    SUPPORTED_SUB_ROWS; anything else raises ValueError.
    """

    n: int = 1
    v: int = 2
    sub_row: int = 128

    def __post_init__(self):
        for name in ("n", "v", "sub_row"):
            val = getattr(self, name)
            if not isinstance(val, (int, np.integer)) or isinstance(val, bool):
                raise TypeError(f"SparsityConfig.{name} must be an int, got {val!r}")
        if (self.n, self.v) not in SUPPORTED_NV:
            raise ValueError(
                f"SparsityConfig: N:V = {self.n}:{self.v} is not supported; "
                f"supported N:V are {', '.join(f'{n}:{v}' for n, v in SUPPORTED_NV)}")
        if self.sub_row not in SUPPORTED_SUB_ROWS:
            raise ValueError(
                f"SparsityConfig: sub_row={self.sub_row} is not supported; "
                f"expected one of {SUPPORTED_SUB_ROWS}")

    @property
    def density(self) -> float:
        return self.n / self.v / KEPT_PER_GROUP

    @property
    def k_multiple(self) -> int:
        """K (in_features) must be a multiple of this."""
        return self.sub_row

    @property
    def m_multiple(self) -> int:
        """M (out_features) must be a multiple of this (Mk a multiple of ROW_TILE)."""
        return ROW_TILE * self.v // self.n

    def kept_rows(self, m: int) -> int:
        return m // self.v * self.n

    def encoded_shapes(self, k: int, m: int, lead: tuple[int, ...] = ()
                       ) -> dict[str, tuple[int, ...]]:
        """The stored arrays' shapes of a ``[*lead, K, M]`` weight (``Mk = M * N / V``):
        values ``[*lead, Mk, K/2]``, indices ``[*lead, Mk, K/L]``, metadata
        ``[*lead, Mk, K/32]``."""
        mk = self.kept_rows(m)
        return {"values": (*lead, mk, k // GROUP_WIDTH * KEPT_PER_GROUP),
                "indices": (*lead, mk, k // self.sub_row),
                "metadata": (*lead, mk, k // META_COLS_PER_WORD)}

    def check_shape(self, k: int, m: int, name: str = "w") -> None:
        """Raise ValueError unless a [K, M] weight meets this config's multiples."""
        if k % self.k_multiple:
            raise ValueError(f"{name}: K (in_features, axis -2) = {k} must be a multiple of "
                             f"sub_row={self.k_multiple}")
        if m % self.m_multiple:
            raise ValueError(f"{name}: M (out_features, axis -1) = {m} must be a multiple of "
                             f"{self.m_multiple} for N:V = {self.n}:{self.v}")


def _check_weight(w: Any, cfg: SparsityConfig, name: str = "w") -> None:
    if not isinstance(cfg, SparsityConfig):
        raise TypeError(f"cfg must be a SparsityConfig, got {type(cfg).__name__}")
    if np.ndim(w) < 2:
        raise ValueError(f"{name} must be [..., K, M], got shape {np.shape(w)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype, got {w.dtype}")
    cfg.check_shape(*w.shape[-2:], name=name)


@functools.partial(jax.jit, static_argnums=1)
def _prune(w: jax.Array, cfg: SparsityConfig) -> jax.Array:
    k, m = w.shape[-2:]
    lead = w.shape[:-2]
    a = jnp.swapaxes(w, -1, -2)  # [..., M, K]
    mag = jnp.abs(a.astype(jnp.float32)).reshape(*lead, m, k // GROUP_WIDTH, GROUP_WIDTH)
    keep24 = rank(mag) < KEPT_PER_GROUP
    # A sub-row's score is the energy it keeps after 2:4.
    energy = jnp.where(keep24, mag * mag, 0.0)
    seg = energy.reshape(*lead, m // cfg.v, cfg.v, k // cfg.sub_row, -1).sum(-1)
    keep_nv = rank(jnp.moveaxis(seg, -2, -1)) < cfg.n          # [..., M/V, K/L, V]
    keep_nv = jnp.moveaxis(keep_nv, -1, -2)                       # [..., M/V, V, K/L]
    mask = keep24.reshape(*lead, m // cfg.v, cfg.v, k // cfg.sub_row, -1) & keep_nv[..., None]
    return jnp.swapaxes(jnp.where(mask.reshape(a.shape), a, jnp.zeros((), a.dtype)), -1, -2)



def prune(w: jax.Array, cfg: SparsityConfig) -> jax.Array:
    """Magnitude pruning to the N:V + 2:4 pattern.

    In every 2:4 group the 2 largest |w| are kept; in every (block of V rows, window of
    ``sub_row`` columns) of ``A = W^T`` the N sub-rows keeping the most energy survive.
    Ties go to the lower index.

    Args:
      w: ``[..., K, M]`` float weight (K a multiple of sub_row, M of ``cfg.m_multiple``).
      cfg: the pattern.
    Returns:
      ``[..., K, M]`` in w's dtype: kept values unchanged, the rest zero.
    """
    w = jnp.asarray(w)
    _check_weight(w, cfg)
    return _prune(w, cfg)


def swap_metadata(meta: Any) -> Any:
    """Canonical <-> hardware metadata order (an involution). ``meta [..., Mk, K/32]``.

    Works on numpy and jax arrays alike.
    """
    xp = np if isinstance(meta, np.ndarray) else jnp
    *lead, mk, words = meta.shape
    t = meta.reshape(*lead, mk // ROW_TILE, 2, ROW_TILE // 2, words)
    lo, hi = t[..., 0, :, :], t[..., 1, :, :]
    mask = xp.uint32(0xFFFF)
    new_lo = (lo & mask) | (hi << xp.uint32(16))
    new_hi = (lo >> xp.uint32(16)) | (hi & ~mask)
    return xp.stack([new_lo, new_hi], axis=-3).reshape(meta.shape)


@jax.tree_util.register_pytree_node_class
class SparseWeight:
    """An encoded weight: a pytree of (values, indices, metadata) with a static config.

    Shapes (``Mk = M * N / V``): values ``[..., Mk, K/2]`` (bf16 or fp16), indices
    ``[..., Mk, K/L]`` uint8, metadata ``[..., Mk, K/32]`` uint32 (hardware order).
    ``shape`` is the logical dense ``(..., K, M)``.

    Built by hand, a SparseWeight is checked here (:func:`validate`): dtypes and shapes
    always, the sub-row indices and metadata as well when their values are known (numpy
    or concrete jax arrays; not tracers under jit, whose values do not exist yet). Raises
    ValueError naming the first bad place. The library's own weights (``encode``,
    ``load_checkpoint``, pytree unflattening) are built by :meth:`unchecked`.
    """

    def __init__(self, values: Any, indices: Any, metadata: Any, config: SparsityConfig):
        if not isinstance(config, SparsityConfig):
            raise TypeError(f"config must be a SparsityConfig, got {type(config).__name__}")
        self.values = values
        self.indices = indices
        self.metadata = metadata
        self.config = config
        _check_layout(self, "sw")
        _check_pattern(self, "sw", known_only=True)

    @classmethod
    def unchecked(cls, values: Any, indices: Any, metadata: Any,
                  config: SparsityConfig) -> "SparseWeight":
        """A SparseWeight without the constructor's check: for arrays that are valid by
        construction (``encode``'s output, slices or copies of a checked weight). The
        kernels must only ever see valid weights (docs/bad_inputs.md)."""
        sw = cls.__new__(cls)
        sw.values, sw.indices, sw.metadata, sw.config = values, indices, metadata, config
        return sw

    def tree_flatten(self):
        return (self.values, self.indices, self.metadata), self.config

    @classmethod
    def tree_unflatten(cls, config, children):
        # Leaves of a flattened weight (or placeholders of tree utilities): no check.
        return cls.unchecked(*children, config)

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, mk, half_k = self.values.shape
        return (*lead, half_k * KEPT_PER_GROUP, mk // self.config.n * self.config.v)

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (values + sub-row indices + metadata)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.values, self.indices, self.metadata))

    def __getitem__(self, i) -> "SparseWeight":
        """Index the leading (e.g. expert) axes: ``sw[e]`` is expert e's weight."""
        if self.ndim <= 2:
            raise IndexError("SparseWeight without leading axes cannot be indexed")
        return SparseWeight.unchecked(self.values[i], self.indices[i], self.metadata[i],
                                      self.config)

    def __repr__(self):
        c = self.config
        return (f"SparseWeight(shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, "
                f"config={c.n}:{c.v}/L={c.sub_row}, nbytes={self.nbytes})")


def _locate(lead_shape: tuple[int, ...], flat: int) -> str:
    return f"[{', '.join(map(str, np.unravel_index(flat, lead_shape)))}]" if lead_shape else ""


def encode(wp: Any, cfg: SparsityConfig) -> SparseWeight:
    """Encode a weight that already follows the pattern (e.g. from :func:`prune`).

    Runs once, on the host. Raises ValueError naming the first place that breaks 2:4 or
    N:V. ``decode(encode(wp)) == wp`` exactly.

    Args:
      wp: ``[..., K, M]`` bfloat16 or float16 weight.
      cfg: the pattern.
    Returns:
      a SparseWeight with ``shape == wp.shape``.
    """
    wp = np.asarray(wp)
    _check_weight(wp, cfg, "wp")
    if wp.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"wp must be bfloat16 or float16 for encoding, got {wp.dtype} "
                        f"(cast first, e.g. w.astype(jnp.bfloat16))")
    *lead, k, m = wp.shape
    lead = tuple(lead)
    n, v, L = cfg.n, cfg.v, cfg.sub_row
    # Work on the 16-bit patterns: exact, and far faster than ml_dtypes arithmetic.
    a = np.ascontiguousarray(np.swapaxes(wp, -1, -2)).view(np.uint16).reshape(-1, m, k)
    nb, nw = m // v, k // L
    a5 = a.reshape(-1, nb, v, nw, L)
    nonzero = (a5 & np.uint16(0x7FFF)) != 0        # +0 and -0 are zero
    sub_nz = nonzero.any(-1)                       # [B, M/V, V, K/L]
    count = sub_nz.sum(2)
    if (count > n).any():
        e, b, w = np.argwhere(count > n)[0]
        raise ValueError(
            f"wp{_locate(lead, e)} breaks N:V = {n}:{v}: out_features {b * v}..{b * v + v - 1}, "
            f"in_features {w * L}..{w * L + L - 1} have {count[e, b, w]} nonzero sub-rows, "
            f"at most {n} allowed")
    # Keep the nonzero sub-rows, then fill up with the lowest-index zero ones.
    key = np.where(sub_nz, 0, v) + np.arange(v)[None, None, :, None]
    kept = np.sort(np.argsort(key, axis=2, kind="stable")[:, :, :n], axis=2)  # [B,M/V,N,K/L]
    sel_sub = kept[..., None]                                                  # [B,M/V,N,K/L,1]
    segs = np.take_along_axis(a5, sel_sub, axis=2)                             # [B,M/V,N,K/L,L]
    mk = nb * n
    g = segs.reshape(-1, mk, k // GROUP_WIDTH, GROUP_WIDTH)
    gnz = np.take_along_axis(nonzero, sel_sub, axis=2).reshape(g.shape)
    gcount = gnz.sum(-1)
    if (gcount > KEPT_PER_GROUP).any():
        e, r, c = np.argwhere(gcount > KEPT_PER_GROUP)[0]
        row = (r // n) * v + kept[e, r // n, r % n, (c * GROUP_WIDTH) // L]
        raise ValueError(
            f"wp{_locate(lead, e)} breaks 2:4: out_feature {row}, in_features "
            f"{c * GROUP_WIDTH}..{c * GROUP_WIDTH + 3} hold {gcount[e, r, c]} nonzeros, "
            f"at most {KEPT_PER_GROUP} allowed")
    # The two slots: the nonzero positions, filled up with the lowest zero ones.
    gkey = (np.where(gnz, 0, GROUP_WIDTH) + np.arange(GROUP_WIDTH)).astype(np.int8)
    first = gkey.argmin(-1)
    np.put_along_axis(gkey, first[..., None], np.int8(2 * GROUP_WIDTH), axis=-1)
    second = gkey.argmin(-1)
    pos = np.stack([np.minimum(first, second), np.maximum(first, second)], axis=-1)
    values = np.take_along_axis(g, pos, axis=-1).reshape(-1, mk, k // 2).view(wp.dtype)
    nib = (pos[..., 0] | (pos[..., 1] << 2)).astype(np.uint32)     # [B, Mk, K/4]
    groups = META_COLS_PER_WORD // GROUP_WIDTH
    shifts = (np.arange(groups, dtype=np.uint32) * META_BITS_PER_GROUP)
    words = (nib.reshape(-1, mk, k // META_COLS_PER_WORD, groups) << shifts).sum(
        -1, dtype=np.uint32)
    indices = kept.reshape(-1, mk, nw).astype(INDICES_DTYPE)  # kept row r = b*N + j
    shapes = cfg.encoded_shapes(k, m, lead)
    arrays = {"values": values, "indices": indices, "metadata": swap_metadata(words)}
    return SparseWeight.unchecked(
        *(jnp.asarray(arrays[p].reshape(shapes[p])) for p in SPARSE_PARTS), cfg)


def group_positions(metadata: Any) -> tuple[jax.Array, jax.Array]:
    """The 2:4 positions of the stored values, from ``metadata [..., Mk, K/32]`` (hardware
    order): ``(first, second)``, each uint32 ``[..., Mk, K/4]`` in ``[0, 4)``. Kept
    value ``2g + s`` of a kept row sits at column ``4g + (first, second)[s][g]``."""
    meta = jnp.asarray(metadata)
    *lead, mk, words = meta.shape
    canon = swap_metadata(meta)
    groups = META_COLS_PER_WORD // GROUP_WIDTH
    shifts = jnp.arange(groups, dtype=jnp.uint32) * META_BITS_PER_GROUP
    nib = ((canon[..., None] >> shifts) & jnp.uint32(0xF)).reshape(*lead, mk, words * groups)
    return nib & 3, nib >> 2


def decode(sw: SparseWeight) -> jax.Array:
    """The dense weight ``[..., K, M]`` of a SparseWeight (jit-able, differentiable).

    On a valid weight (:func:`validate`) this is exactly what the kernels multiply by.
    Arrays that break the rule cannot make it index out of bounds (positions stay inside
    their group, indices are taken modulo V), but the kernels are not bound to agree.
    """
    if not isinstance(sw, SparseWeight):
        raise TypeError(f"sw must be a SparseWeight, got {type(sw).__name__}")
    return _decode(sw)


@jax.jit  # one compiled program per shape instead of dozens of eager ops
def _decode(sw: SparseWeight) -> jax.Array:
    cfg = sw.config
    n, v, L = cfg.n, cfg.v, cfg.sub_row
    *lead, k, m = sw.shape
    mk = cfg.kept_rows(m)
    first, second = group_positions(sw.metadata)
    vals = jnp.asarray(sw.values).reshape(*lead, mk, k // GROUP_WIDTH, KEPT_PER_GROUP)
    slot = jnp.arange(GROUP_WIDTH, dtype=jnp.uint32)
    zero = jnp.zeros((), vals.dtype)
    rows = jnp.where(slot == first[..., None], vals[..., 0:1], zero)
    rows = jnp.where(slot == second[..., None], vals[..., 1:2], rows)
    segs = rows.reshape(*lead, m // v, n, k // L, L)
    idx = (jnp.asarray(sw.indices).astype(jnp.int32) % v).reshape(*lead, m // v, n, k // L)
    a5 = jnp.zeros((*lead, m // v, v, k // L, L), vals.dtype)
    for j in range(n):
        hit = idx[..., j, None, :] == jnp.arange(v)[:, None]      # [..., M/V, V, K/L]
        a5 = jnp.where(hit[..., None], segs[..., j, None, :, :], a5)
    return jnp.swapaxes(a5.reshape(*lead, m, k), -1, -2)


def validate(sw: SparseWeight, name: str = "sw") -> SparseWeight:
    """Refuse a SparseWeight whose arrays :func:`encode` could not have produced.

    The format's one validity rule, shared by the kernels, :func:`decode` and the gradient:
    dtypes and shapes match ``sw.config``; every sub-row index is below V and the N
    indices of each block are increasing; every metadata nibble is an ordered 2:4 pair
    (first position < second). On such a weight the kernels, ``decode`` and the gradient
    agree; other arrays are refused where they enter (the SparseWeight constructor, the
    flax modules, ``load_checkpoint``), since the sparse tensor cores leave other metadata
    undefined.

    Reads the arrays' values (a vectorised pass over indices and metadata, on the arrays'
    device; never over ``values``), so it needs concrete arrays, not tracers under jit.
    Raises ValueError naming the array and the first bad place; returns ``sw`` unchanged.
    """
    if not isinstance(sw, SparseWeight):
        raise TypeError(f"{name} must be a SparseWeight, got {type(sw).__name__}")
    _check_layout(sw, name)
    _check_pattern(sw, name, known_only=False)
    return sw


def _check_layout(sw: SparseWeight, name: str) -> None:
    """Dtypes and shapes of the three arrays against ``sw.config`` (no values read).
    Skipped for leaves that are not arrays (tree utilities' placeholders)."""
    cfg = sw.config
    parts = (sw.values, sw.indices, sw.metadata)
    if not all(hasattr(a, "shape") and hasattr(a, "dtype") for a in parts):
        return
    vals = sw.values
    if len(vals.shape) < 2 or jnp.dtype(vals.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}.values must be bfloat16/float16 [..., Mk, K/2], got "
                         f"{jnp.dtype(vals.dtype).name}{list(vals.shape)}")
    *lead, mk, half_k = vals.shape
    k = half_k * KEPT_PER_GROUP
    if mk % ROW_TILE or mk % cfg.n or k % cfg.sub_row:
        raise ValueError(f"{name}.values {list(vals.shape)}: Mk must be a multiple of "
                         f"{ROW_TILE} and of N={cfg.n}, K=2*{half_k} a multiple of "
                         f"sub_row={cfg.sub_row}")
    want = cfg.encoded_shapes(k, mk // cfg.n * cfg.v, tuple(lead))
    for part, arr, dt in (("indices", sw.indices, INDICES_DTYPE),
                          ("metadata", sw.metadata, METADATA_DTYPE)):
        if jnp.dtype(arr.dtype) != dt or tuple(arr.shape) != want[part]:
            raise ValueError(f"{name}.{part} must be {dt.name}{list(want[part])}, got "
                             f"{jnp.dtype(arr.dtype).name}{list(arr.shape)}")


def _known(a: Any) -> bool:
    """An array whose values exist: numpy, or a jax array that is not a tracer."""
    return isinstance(a, np.ndarray) or (isinstance(a, jax.Array)
                                         and not isinstance(a, jax.core.Tracer))


# Every 2-bit field of a metadata word, read as the low (first) and high (second) position
# of its nibble: a nibble is ordered when high > low. (high | 4) - low - 1 is in [0, 6]
# per nibble (no borrow between nibbles), and its bit 2 is set exactly when high > low.
# The hardware order swaps whole 16-bit halves, so the check needs no unswap.
_LOW_FIELDS, _NIBBLE_BIT2, _NIBBLE_ONES = 0x33333333, 0x44444444, 0x11111111


def _ordered_pairs(meta: Any, xp: Any) -> Any:
    """``[...]`` bool per metadata word: all of its nibbles are ordered 2:4 pairs."""
    lo = meta & xp.uint32(_LOW_FIELDS)
    hi = (meta >> xp.uint32(2)) & xp.uint32(_LOW_FIELDS)
    d = (hi | xp.uint32(_NIBBLE_BIT2)) - lo - xp.uint32(_NIBBLE_ONES)
    return (d & xp.uint32(_NIBBLE_BIT2)) == xp.uint32(_NIBBLE_BIT2)


def _increasing_indices(idx: Any, n: int, v: int, xp: Any) -> Any:
    """``[...]`` bool per (block, window): the N sub-row indices are below V, increasing."""
    blocks = idx.reshape(*idx.shape[:-2], idx.shape[-2] // n, n, idx.shape[-1])
    ok = (blocks < v).all(axis=-2)
    if n > 1:
        ok &= (blocks[..., 1:, :] > blocks[..., :-1, :]).all(axis=-2)
    return ok


@functools.partial(jax.jit, static_argnums=(2, 3))
def _pattern_ok_on_device(idx: jax.Array, meta: jax.Array, n: int, v: int) -> jax.Array:
    return _increasing_indices(idx, n, v, jnp).all() & _ordered_pairs(meta, jnp).all()


def _on_host(a: Any) -> bool:
    return isinstance(a, np.ndarray) or all(d.platform == "cpu" for d in a.devices())


def _check_pattern(sw: SparseWeight, name: str, known_only: bool) -> None:
    """The value checks of :func:`validate`: one vectorised pass where the arrays live
    (numpy on the host, one jitted reduction on an accelerator); the place is located on
    the host only when something is wrong. ``known_only`` skips arrays whose values do
    not exist yet (tracers) instead of refusing them."""
    cfg = sw.config
    idx, meta = sw.indices, sw.metadata
    known = [_known(a) for a in (idx, meta)]
    if not all(known):
        if known_only:
            idx = idx if known[0] else None
            meta = meta if known[1] else None
        else:
            raise TypeError(f"{name}: validate reads the arrays' values; call it on "
                            f"concrete arrays (not under jax.jit / vmap / grad)")
    if idx is not None and meta is not None and not (_on_host(idx) and _on_host(meta)):
        if bool(_pattern_ok_on_device(idx, meta, cfg.n, cfg.v)):
            return
    elif all(a is None or _pattern_ok_host(a, part, cfg)
             for a, part in ((idx, "indices"), (meta, "metadata"))):
        return
    _locate_bad_pattern(None if idx is None else np.asarray(idx),
                        None if meta is None else np.asarray(meta), cfg, name)


def _pattern_ok_host(a: Any, part: str, cfg: SparsityConfig) -> bool:
    a = np.asarray(a)
    if part == "indices":
        return bool(_increasing_indices(a, cfg.n, cfg.v, np).all())
    return bool(_ordered_pairs(a, np).all())


def _locate_bad_pattern(idx: np.ndarray | None, meta: np.ndarray | None,
                        cfg: SparsityConfig, name: str) -> None:
    """Raise ValueError naming the first bad index or metadata nibble."""
    if idx is not None:
        if (idx >= cfg.v).any():
            at = tuple(int(i) for i in np.argwhere(idx >= cfg.v)[0])
            raise ValueError(f"{name}.indices{list(at)} = {idx[at]} is not below V={cfg.v}")
        blocks = idx.reshape(*idx.shape[:-2], idx.shape[-2] // cfg.n, cfg.n, -1)
        step = np.diff(blocks.astype(np.int16), axis=-2)
        if (step <= 0).any():
            at = tuple(int(i) for i in np.argwhere(step <= 0)[0])
            raise ValueError(f"{name}.indices: the N={cfg.n} sub-row indices of block "
                             f"{list(at[:-2])} in window {at[-1]} are not distinct and "
                             f"increasing")
    if meta is not None:
        canon = swap_metadata(meta)
        groups = META_COLS_PER_WORD // GROUP_WIDTH
        shifts = np.arange(groups, dtype=np.uint32) * META_BITS_PER_GROUP
        nib = (canon[..., None] >> shifts) & np.uint32(0xF)
        bad = (nib & 3) >= (nib >> 2)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            col = at[-2] * META_COLS_PER_WORD + at[-1] * GROUP_WIDTH
            raise ValueError(f"{name}.metadata: kept row {list(at[:-2])}, columns "
                             f"{col}..{col + 3} hold positions ({int(nib[at] & 3)}, "
                             f"{int(nib[at] >> 2)}); a 2:4 group needs two increasing "
                             f"positions")
    raise AssertionError(f"{name}: the pattern check failed but no bad place was found")
