"""Small helpers shared across the package: the "N:V" parser, ranking along an axis, the
inverse permutation, mesh-axis names and sizes, and the optional progress bar."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_NV = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def parse_nv(text: Any, what: str = "N:V") -> tuple[int, int]:
    """``"1:2"`` -> ``(1, 2)``. Raises ValueError naming ``what`` (e.g. ``"--nv"``).

    Only the syntax is checked here; :class:`~samoyeds_jax.SparsityConfig` says which
    N:V are supported.
    """
    m = _NV.fullmatch(str(text))
    if not m:
        raise ValueError(f"{what} must be N:V (e.g. 1:2), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def rank(score: jax.Array) -> jax.Array:
    """Rank along the last axis by decreasing score; ties go to the lower index."""
    n = score.shape[-1]
    a = score[..., :, None]
    b = score[..., None, :]
    i = jnp.arange(n)
    earlier = i[None, :] < i[:, None]  # [me, other]: other comes first
    return ((b > a) | ((b == a) & earlier)).sum(-1)


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """``inv`` with ``inv[perm[i]] = i`` (``perm [N]`` a permutation), in perm's dtype."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def mesh_axes(entry: Any) -> tuple[str, ...]:
    """The mesh axis names of an axis argument or PartitionSpec entry: None -> (), a name
    -> (name,), a tuple of names as it is."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_size(mesh: Any, entry: Any) -> int:
    """How many devices the mesh axes of ``entry`` span together (1 for none)."""
    return int(np.prod([mesh.shape[a] for a in mesh_axes(entry)], dtype=np.int64))


def spec_entry(names: tuple[str, ...]) -> Any:
    """A PartitionSpec entry splitting one array axis over ``names`` (None: replicated)."""
    if not names:
        return None
    return names[0] if len(names) == 1 else tuple(names)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(enabled: bool, total: int, desc: str, unit: str) -> Any:
    """A tqdm bar over ``total`` units, or a bar that does nothing when disabled or when
    tqdm (optional) is not installed. Either way it has ``update(n)`` and ``close()``."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit)
