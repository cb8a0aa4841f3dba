"""Past one device: data-, expert- and tensor-parallel sharding of the sparse MoE layer.

Two ways to run the layer on a mesh, on the same placed parameters (:func:`shard_params`):

* ``jax.jit(sj.moe)(params, x, cfg)``: the custom call partitions itself under the
  partitioner (:mod:`samoyeds_jax.partitioning`): expert-split weights run each device's
  experts and meet in an all-reduce, d_ff-split weights run each device's columns and
  rows with one all-reduce after ``down``. Routing stays the single-device program, so
  tokens split over a data axis are gathered for the global dispatch (activations, never
  weights). Pass the placed parameters as arguments of the jitted function: arrays a
  jitted function closes over are baked in as constants, outside the partitioned program.
* :func:`moe_sharded`: the layer partitioned by hand with :func:`jax.shard_map`, so every
  call sees only its device's tokens, experts and d_ff slice and all communication is
  explicit (nothing for pure data parallel, all-to-alls for expert parallel, one
  all-reduce after combine for tensor parallel): the form for data parallelism.

Mesh and layout
---------------
A mesh with a *data* axis ``D`` (``data_axis``; a name, a tuple of names, or ``None``), an
*expert* axis ``X`` (``expert_axis``; a name or ``None``) and a *tensor* axis ``M``
(``tensor_axis``; names or ``None``). Meshes ``8x1`` (pure data parallel), ``2x4`` (both)
and ``1x8`` (pure expert parallel), with or without a tensor axis, are all the same code.

* **Tokens** (the flattened leading axes of ``x [..., d]``) are sharded over
  ``(data_axis, expert_axis)`` jointly: every device owns ``T / (D*X)`` tokens, as in
  GShard / DeepSpeed-MoE, so no expert work is duplicated along the expert axis. Input
  sharded only over ``data_axis`` (replicated over the expert axis) is fine: taking the
  expert-axis slice is local. The output has the token sharding
  ``P((data_axis, expert_axis))``. A token count that does not divide ``D*X`` is padded
  inside (padding tokens route nowhere and are sliced off; the pad itself is a reshard).
* **Routed experts** (``gate_up``/``down`` SparseWeights, or dense ``gate``/``up``/``down``)
  are sharded along E over ``expert_axis`` (``E`` must divide by ``X``): device ``j`` of
  the expert axis owns experts ``[j*E/X, (j+1)*E/X)``. Every leaf of a SparseWeight has E
  as its leading axis, so ``P(expert_axis)`` on each leaf shards it.
* **Tensor parallel** (``tensor_axis``): every routed expert's d_ff is split over it, as
  vLLM and TensorRT-LLM serve Mixtral: ``gate_up`` by columns, ``down`` by rows. The
  fused GLU needs each shard's gate columns and up columns on the same device, so
  ``gate_up`` is held stacked, ``[E, 2, d, f]`` (``gate_up[:, 0]`` gate, ``[:, 1]`` up;
  :func:`samoyeds_jax.layout.stack_gate_up`, a reshape of the stored arrays), and split
  along f: each device computes ``act(x @ gate_j) * (x @ up_j)`` for its f slice in one
  fused call, then its partial ``down`` product; the partial outputs are summed once per
  layer (after combine in :func:`moe_sharded`, in float32: ``[T, d]`` rather than
  ``[T*k, d]``; after ``down`` under plain jit). f must split into multiples of the
  format's ``m_multiple`` (gate_up) and ``sub_row`` (down). Tokens are replicated over
  the tensor axis.
* **Router and shared experts** are replicated (they are small and every token needs
  them; with a tensor axis every device computes the shared experts whole).
  :func:`param_specs` gives these rules; :func:`shard_params` places a parameter dict
  with them.

Expert parallel forward (inside ``shard_map``, per device; ``Tl`` local tokens, ``k``
choices, ``El = E/X`` local experts, ``C`` rows per (source, destination) pair)::

    route (local tokens, replicated router)            -> weights, experts [Tl, k]
    destination = expert // El, local id = expert % El, position = running count per
        destination (a cumsum over a [Tl*k, X] one-hot: earlier tokens first)
    send buffers [X*C, d] (tokens, compute dtype) and [X*C] (local expert id; El = empty)
    all_to_all over expert_axis (tiled)                -> rows from every source
    perm = argsort(received local ids)                  (empty rows sort last)
    expert_ffn(received, local gate_up/down, group_sizes, sel=perm)   two sj.ragged_dot,
        the first gathering through SEL = perm, so the received rows are never re-copied;
        empty rows sit past sum(group_sizes): zero output, no kernel work
    un-permute, all_to_all back                         -> each row at its sender's slot
    combine: out[t] = sum_j weights[t, j] * back[slot(t, j)]   (float32) + shared experts

The stages run under the named scopes of the single-device layer (route, dispatch with
the exchange, gate_up, down, combine with the way back), so profiles read the same.

*Drop-free* is the default: ``C = Tl*k`` (the worst case, every choice of every local token
going to one device), so nothing is ever dropped, at the price of send/receive buffers
``X`` times larger than balanced routing needs (the all-to-all moves whole buffers; the
expert kernels only touch real rows). ``capacity_factor=c`` sets
``C = min(Tl*k, ceil(c * Tl*k / X))``; choices past a destination's capacity (later
tokens first) are dropped, i.e. contribute zero, with the routing weights of the kept
choices unchanged. ``return_stats=True`` returns the global dropped count (zero when
drop-free) and the tokens routed to each expert. With ``X == 1`` (pure data parallel)
there is no exchange at all: each device runs exactly the single-device layer
(:func:`samoyeds_jax.moe.dispatch`, ``expert_ffn`` with SEL into its own tokens,
``combine``) on its tokens.

``jax.lax.ragged_all_to_all`` would move only the real rows, but XLA:CPU does not
implement it (``UNIMPLEMENTED``), so it could not be tested here; the fixed-size
``all_to_all`` is used on every platform.

Data-parallel primitive
-----------------------
:func:`ragged_dot_sharded` is ``jax.vmap(sj.ragged_dot)`` over a leading batch axis sharded
on ``data_axis`` (independent ragged problems, e.g. one per data shard) with the weight
replicated, or sharded along E over ``expert_axis``; then each device computes the rows
of its own experts (a dynamic roll by the rows of the experts before them) and the
partial outputs are summed over the expert axis (one all-reduce of the output; every row
has exactly one nonzero contribution, so the sum is exact).

Guarantees and limits
---------------------
* No all-gather: the compiled HLO of :func:`moe_sharded` and :func:`ragged_dot_sharded`
  contains no ``all-gather`` of tokens or weights (tests read
  ``jax.jit(...).lower(...).compile().as_text()``). Pure data parallel has no collective
  at all, expert parallel has three ``all-to-all``\\ s (rows, their local expert ids,
  results back), tensor parallel one ``all-reduce`` (float32 ``[T_local, d]``);
  ``return_stats`` adds two small ``all-reduce``\\ s.
* Numerics: data and expert parallel give the single-device result bit for bit on CPU
  (the same per-row sums); tensor parallel rounds each device's partial ``down`` output
  to the compute dtype before the float32 sum (tests/helpers.TOL["k_split"]).
* Memory: drop-free buffers hold ``X * T_local * k`` rows per device (send, receive, and
  the expert FFN's ``[rows, 2f]`` intermediate); with many expert shards or large token
  counts set ``capacity_factor`` (e.g. 2) and watch ``stats["dropped"]``.
* Multi-host: nothing reads a device array on the host and nothing assumes one process:
  routing, counting and exchange are device-side collectives over the global mesh, so
  the same code runs after ``jax.distributed.initialize`` with ``x`` a global array
  (e.g. ``jax.make_array_from_process_local_data``).
* Autodiff: ``jax.grad`` with respect to ``x`` works (the primitive's JVP/transpose,
  ``all_to_all`` and the gathers/scatters are all differentiable). ``shard_map`` runs
  with ``check_vma=False`` because the primitive's transpose rule does not track
  varying-manual-axes types.
* Meshes with ``Explicit`` axis types (``jax.make_mesh``'s default in recent JAX) are
  supported: inputs are ``jax.reshard``\\ ed to the layout above; as usual with explicit
  sharding, call ``jax.grad`` inside ``jax.set_mesh(mesh)`` (or on already placed inputs).
  ``Auto`` meshes (``jax.sharding.Mesh(devices, names)``) need nothing.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from samoyeds_jax import layout
from samoyeds_jax._util import inverse_permutation
from samoyeds_jax._util import mesh_axes as _names
from samoyeds_jax._util import mesh_size as _size
from samoyeds_jax._util import spec_entry as _spec_entry
from samoyeds_jax.format import SparseWeight
from samoyeds_jax.moe import (
    MoEConfig, combine, dispatch, expert_ffn, expert_ffn_dense, route, shared_experts)
from samoyeds_jax.ops import ragged_dot

__all__ = ["moe_sharded", "param_specs", "ragged_dot_sharded", "shard_params"]

# Parameter entries with a leading expert axis E (sparse: gate_up/down; dense: gate/up/down).
EXPERT_PARAM_KEYS = layout.EXPERT_SHARDED_KEYS  # old name, kept

AxisSpec = Any  # str | tuple[str, ...] | None


# --- mesh helpers ------------------------------------------------------------------------

def _check_axes(mesh: Any, **axes: AxisSpec) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    seen: list[str] = []
    for what, axis in axes.items():
        for name in _names(axis):
            if name not in mesh.shape:
                raise ValueError(f"{what}={axis!r}: mesh has no axis {name!r}; its axes are "
                                 f"{dict(mesh.shape)}")
            if name in seen:
                raise ValueError(f"mesh axis {name!r} is used twice ({axes})")
            seen.append(name)


def _all_explicit(mesh: Mesh, names: Sequence[str]) -> bool:
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    return bool(names) and all(types[n] == jax.sharding.AxisType.Explicit for n in names)


def _reshard(tree: Any, specs: Any, mesh: Mesh, names: Sequence[str]) -> Any:
    """Lay ``tree`` out as ``specs`` before shard_map. Explicit-axis meshes need an explicit
    ``jax.reshard``; on Auto axes shard_map reshards its inputs itself."""
    if not _all_explicit(mesh, names):
        return tree
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, P))
    return jax.reshard(tree, shardings)


# --- parameter placement -----------------------------------------------------------------

def _layout_param(key: str, val: Any) -> layout.Param | None:
    """The routed-expert entry of :mod:`samoyeds_jax.layout` that ``params[key]`` is, or
    None (router, shared experts: replicated)."""
    if isinstance(val, SparseWeight):
        if key == layout.GATE_UP_STACKED.key and val.ndim == len(layout.GATE_UP_STACKED.dims):
            return layout.GATE_UP_STACKED
        table = layout.SPARSE_EXPERTS
    else:
        table = layout.DENSE_EXPERTS
    return next((p for p in table if p.key == key), None)


def _param_spec(p: layout.Param, ex: Any, tp: Any) -> P:
    """E over the expert axis, d_ff over the tensor axis. A SparseWeight's leaves hold its
    logical ``[..., K, M]`` as ``[..., kept rows (M), K-derived]``: the last two swap."""
    if tp is not None and "2*d_ff" in p.dims:
        raise ValueError(
            f"tensor parallelism splits d_ff of a gate_up whose gate and up are stacked "
            f"({layout.GATE_UP_STACKED.describe()}); its [gate | up] form would give shards "
            f"of gate or up alone: use shard_params (it stacks) or "
            f"samoyeds_jax.layout.stack_gate_up")
    entries = [ex if d == "num_experts" else tp if d == "d_ff" else None for d in p.dims]
    if p.sparse:
        entries[-2:] = entries[-1], entries[-2]
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def param_specs(params: dict, expert_axis: AxisSpec = "expert",
                tensor_axis: AxisSpec = None) -> dict:
    """The PartitionSpec pytree of an MoE parameter dict.

    Routed experts (``gate_up``/``down`` SparseWeights, or dense ``gate``/``up``/``down``)
    are split along E over ``expert_axis`` and, with ``tensor_axis``, along d_ff over it:
    dense ``gate``/``up`` ``[E, d, f]`` by columns and ``down`` ``[E, f, d]`` by rows; a
    sparse ``gate_up`` must then be stacked (``[E, 2, d, f]``, gate and up of a shard
    together) and ``down``'s leaves are split along their K-derived axis. The router,
    the shared experts and anything else get ``P()`` (replicated).
    """
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    ex = _spec_entry(_names(expert_axis))
    tp = _spec_entry(_names(tensor_axis))
    out = {}
    for key, val in params.items():
        p = _layout_param(key, val)
        spec = P() if p is None else _param_spec(p, ex, tp)
        out[key] = jax.tree.map(lambda _: spec, val)
    return out


def _check_divisible(params: dict, mesh: Mesh, expert_axis: AxisSpec,
                     tensor_axis: AxisSpec) -> None:
    """E must split over the expert axis; d_ff over the tensor axis into whole format tiles
    (a sparse gate_up half: ``m_multiple`` columns; a sparse down: ``sub_row`` rows)."""
    n_ep, n_tp = _size(mesh, expert_axis), _size(mesh, tensor_axis)
    for key, val in params.items():
        p = _layout_param(key, val)
        if p is None:
            continue
        shape = val.shape
        e = shape[p.dims.index("num_experts")]
        if e % n_ep:
            raise ValueError(f"params[{key!r}] has {e} experts, not divisible by the "
                             f"expert axis {expert_axis!r} of size {n_ep}")
        if n_tp == 1:
            continue
        f = shape[p.dims.index("d_ff" if "d_ff" in p.dims else "2*d_ff")]
        f //= 2 if "2*d_ff" in p.dims else 1
        unit, why = 1, ""
        if isinstance(val, SparseWeight) and p.dims[-1] != "d_model":   # gate_up: columns
            unit, why = val.config.m_multiple, " (the format's m_multiple)"
        elif isinstance(val, SparseWeight):                               # down: K rows
            unit, why = val.config.sub_row, " (the format's sub_row)"
        if f % (n_tp * unit):
            raise ValueError(f"params[{key!r}]: d_ff={f} does not split over the tensor axis "
                             f"{tensor_axis!r} of size {n_tp} into shards of a multiple of "
                             f"{unit}{why}")


def _stacked(params: dict, tensor_axis: AxisSpec) -> dict:
    """``params`` with a sparse gate_up stacked when tensor parallelism splits it."""
    gu = params.get(layout.GATE_UP_STACKED.key)
    if not _names(tensor_axis) or not isinstance(gu, SparseWeight):
        return params
    return {**params, layout.GATE_UP_STACKED.key: layout.stack_gate_up(gu)}


def shard_params(params: dict, mesh: Mesh, *, expert_axis: AxisSpec = "expert",
                 tensor_axis: AxisSpec = None) -> dict:
    """``params`` placed on ``mesh`` with :func:`param_specs` (``jax.device_put`` with
    ``NamedSharding``).

    Args:
      params: an MoE parameter dict (sparse or dense).
      mesh: the mesh.
      expert_axis: mesh axis (or axes) splitting E; ``num_experts`` must divide by its
        size. None: experts replicated.
      tensor_axis: mesh axis (or axes) splitting d_ff (tensor parallelism), or None. A
        sparse ``gate_up`` is returned stacked (``[E, 2, d, f]``,
        :func:`samoyeds_jax.layout.stack_gate_up`); d_ff must split into shards of a
        multiple of the format's ``m_multiple`` (gate_up) and ``sub_row`` (down).
    Returns:
      the placed dict; usable by ``jax.jit(sj.moe)`` (the custom call partitions itself,
      :mod:`samoyeds_jax.partitioning`) and by :func:`moe_sharded`.

    Multi-host: every process passes the same (host or fully replicated) values; each
    process then holds only its devices' shards.
    """
    _check_axes(mesh, expert_axis=expert_axis, tensor_axis=tensor_axis)
    _check_divisible(params, mesh, expert_axis, tensor_axis)
    params = _stacked(params, tensor_axis)
    specs = param_specs(params, expert_axis, tensor_axis)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, P))
    return jax.device_put(params, shardings)


# --- the expert-parallel MoE layer -------------------------------------------------------

def _expert_kind(params: dict, cfg: MoEConfig) -> str:
    """"sparse" or "dense" (which layout params holds), after checking it against cfg."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    sparse = isinstance(params.get("gate_up"), SparseWeight)
    if not sparse and not all(k in params for k in layout.EXPERT_KEYS):
        raise ValueError(f"params must hold sparse experts (gate_up, down SparseWeights, from "
                         f"sj.sparsify_moe) or dense ones (gate, up, down); it has "
                         f"{sorted(params)}")
    layout.check(params, cfg, sparse)
    return "sparse" if sparse else "dense"


def _local_ffn(params: dict, kind: str, activation: str):
    """(x [T, d], group_sizes [El], sel [R]) -> [R, d] on this device's experts."""
    if kind == "sparse":
        gu, dn = params["gate_up"], params["down"]
        return lambda x, gs, sel: expert_ffn(x, gu, dn, gs, sel, activation)
    g, u, dn = params["gate"], params["up"], params["down"]
    return lambda x, gs, sel: expert_ffn_dense(x, g, u, dn, gs, sel, activation)


def _compute_dtype(params: dict, kind: str):
    return params["gate_up"].dtype if kind == "sparse" else params["gate"].dtype


def _moe_body(params, x, valid, *, cfg: MoEConfig, kind: str, n_ep: int, capacity: int,
              expert_axis: str | None, token_axes: tuple[str, ...],
              tensor_axes: tuple[str, ...], stats: bool):
    """One device's share of the layer: x [Tl, d] local tokens, valid [Tl] bool or None;
    with tensor axes, the experts' d_ff slice of this device (a partial sum until the
    all-reduce after combine)."""
    e, k, d = cfg.num_experts, cfg.top_k, cfg.d_model
    el = e // n_ep
    tl = x.shape[0]
    dt = _compute_dtype(params, kind)
    ffn = _local_ffn(params, kind, cfg.activation)
    weights, experts = route(params["router"], x, cfg)              # [Tl, k] f32 / int32
    flat_e = experts.reshape(-1)
    ok = None if valid is None else jnp.repeat(valid, k)            # [Tl*k]
    xc = x.astype(dt)
    if n_ep == 1:
        # Pure data parallel: the single-device layer on this device's tokens.
        routed = flat_e if ok is None else jnp.where(ok, flat_e, e)   # padding: past E
        sel, group_sizes, order = dispatch(routed.reshape(tl, k), e)
        out = combine(ffn(xc, group_sizes, sel), weights, order)
        dropped = jnp.zeros((), jnp.int32)
    else:
        with jax.named_scope("dispatch"):  # to the experts' devices
            pairs = tl * k
            dest = flat_e // el
            local = (flat_e % el).astype(jnp.int32)
            onehot = (dest[:, None] == jnp.arange(n_ep, dtype=dest.dtype)[None, :])
            if ok is not None:
                onehot = onehot & ok[:, None]
            running = jnp.cumsum(onehot.astype(jnp.int32), axis=0) - 1    # [P, X]
            pos = jnp.take_along_axis(running, dest[:, None], axis=1)[:, 0]
            keep = pos < capacity if ok is None else ok & (pos < capacity)
            slot = jnp.where(keep, dest * capacity + pos, n_ep * capacity)  # past the end: drop
            tok = jnp.arange(pairs, dtype=jnp.int32) // k
            send_x = jnp.zeros((n_ep * capacity, d), dt).at[slot].set(xc[tok], mode="drop")
            send_e = jnp.full((n_ep * capacity,), el, jnp.int32).at[slot].set(local, mode="drop")
            recv_x = jax.lax.all_to_all(send_x, expert_axis, 0, 0, tiled=True)
            recv_e = jax.lax.all_to_all(send_e, expert_axis, 0, 0, tiled=True)
            perm = jnp.argsort(recv_e, stable=True).astype(jnp.int32)   # empty rows last
            group_sizes = jnp.zeros((el + 1,), jnp.int32).at[recv_e].add(1)[:el]
        y = ffn(recv_x, group_sizes, perm)                           # sorted rows
        with jax.named_scope("combine"):  # back to the tokens' devices
            back = jax.lax.all_to_all(y[inverse_permutation(perm)], expert_axis, 0, 0, tiled=True)
            y_pair = back.at[slot].get(mode="fill", fill_value=0)        # dropped: zero
            out = (weights.reshape(pairs, 1) * y_pair.astype(jnp.float32)).reshape(tl, k, d)
            out = out.sum(axis=1)
            n_drop = jnp.logical_not(keep)
            if ok is not None:
                n_drop = n_drop & ok
            dropped = n_drop.sum(dtype=jnp.int32)
    if tensor_axes:
        with jax.named_scope("combine"):  # the d_ff slices' partial sums: one all-reduce
            out = jax.lax.psum(out, tensor_axes)
    if cfg.has_shared:
        out = out + shared_experts(params, x, cfg)
    out = out.astype(x.dtype)
    if not stats:
        return out
    counted = flat_e if ok is None else jnp.where(ok, flat_e, e)
    load = jnp.zeros((e + 1,), jnp.int32).at[counted].add(1)[:e]
    if token_axes:
        dropped = jax.lax.psum(dropped, token_axes)
        load = jax.lax.psum(load, token_axes)
    return out, dropped, load


def _capacity(pairs: int, n_ep: int, capacity_factor: float | None) -> int:
    if capacity_factor is None:
        return pairs
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
    return max(1, min(pairs, math.ceil(capacity_factor * pairs / n_ep)))


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "data_axis", "expert_axis",
                                             "tensor_axis", "capacity_factor",
                                             "return_stats"))
def moe_sharded(params: dict, x: jax.Array, cfg: MoEConfig, mesh: Mesh, *,
                data_axis: AxisSpec = "data", expert_axis: AxisSpec = "expert",
                tensor_axis: AxisSpec = None, capacity_factor: float | None = None,
                return_stats: bool = False):
    """The MoE layer (:func:`samoyeds_jax.moe`) data-, expert- and tensor-parallel over
    ``mesh``.

    Args:
      params: from ``sj.sparsify_moe`` (sparse experts) or dense (``gate``/``up``/``down``,
        then the experts run through ``jax.lax.ragged_dot``: the dense twin), ideally
        placed with :func:`shard_params` (otherwise they are resharded on every call).
      x: ``[..., d_model]``; the flattened tokens are sharded over
        ``(data_axis, expert_axis)``.
      cfg: the layer (static).
      mesh: a ``jax.sharding.Mesh`` holding the named axes (static).
      data_axis: mesh axis name(s) of data parallelism, or None.
      expert_axis: mesh axis name of expert parallelism, or None (experts replicated).
        ``cfg.num_experts`` must divide by its size.
      tensor_axis: mesh axis name(s) of tensor parallelism, or None: every expert's d_ff
        split over it (:func:`shard_params`' layout; tokens are replicated over it), the
        partial outputs summed by one all-reduce after combine.
      capacity_factor: None (default) is drop-free. Otherwise the rows each device sends
        to each expert-axis peer are capped at ``ceil(c * T_local * k / X)``; see the
        module docstring.
      return_stats: also return ``{"dropped": int32[], "expert_load": int32[E]}`` (global
        dropped choices, global choices routed to each expert), replicated.
    Returns:
      ``[..., d_model]`` in x's dtype (and the stats dict with ``return_stats``). Equal to
      ``sj.moe(params, x, cfg)`` up to float32 accumulation order when nothing is dropped.
    """
    _check_axes(mesh, data_axis=data_axis, expert_axis=expert_axis, tensor_axis=tensor_axis)
    if len(_names(expert_axis)) > 1:
        raise ValueError(f"expert_axis must be one mesh axis name or None, got {expert_axis!r}")
    kind = _expert_kind(params, cfg)
    if x.ndim < 1 or x.shape[-1] != cfg.d_model:
        raise ValueError(f"x must be [..., d_model={cfg.d_model}], got shape {x.shape}")
    n_ep = _size(mesh, expert_axis)
    if cfg.num_experts % n_ep:
        raise ValueError(f"cfg.num_experts={cfg.num_experts} is not divisible by the expert "
                         f"axis {expert_axis!r} of size {n_ep}")
    _check_divisible(params, mesh, expert_axis, tensor_axis)
    params = _stacked(params, tensor_axis)
    token_axes = _names(data_axis) + _names(expert_axis)
    n_tok = _size(mesh, token_axes)
    lead = x.shape[:-1]
    t = int(np.prod(lead, dtype=np.int64))
    t_pad = -(-max(t, 1) // n_tok) * n_tok
    tok_spec = P(_spec_entry(token_axes))
    x2 = x.reshape(t, cfg.d_model)
    valid = None
    if t_pad != t:
        x2 = jnp.pad(x2, ((0, t_pad - t), (0, 0)))
        valid = jnp.arange(t_pad) < t
    capacity = _capacity((t_pad // n_tok) * cfg.top_k, n_ep, capacity_factor)

    pspecs = param_specs(params, expert_axis, tensor_axis)
    used = token_axes + _names(tensor_axis)
    params = _reshard(params, pspecs, mesh, used)
    x2 = _reshard(x2, tok_spec, mesh, used)
    if valid is not None:
        valid = _reshard(valid, tok_spec, mesh, used)
    ex_name = _names(expert_axis)[0] if n_ep > 1 else None
    body = functools.partial(_moe_body, cfg=cfg, kind=kind, n_ep=n_ep, capacity=capacity,
                             expert_axis=ex_name, token_axes=token_axes,
                             tensor_axes=_names(tensor_axis), stats=return_stats)
    out_specs = (tok_spec, P(), P()) if return_stats else tok_spec
    res = jax.shard_map(body, mesh=mesh, in_specs=(pspecs, tok_spec,
                                                   None if valid is None else tok_spec),
                        out_specs=out_specs, check_vma=False)(params, x2, valid)
    out = res[0] if return_stats else res
    out = out[:t].reshape(*lead, cfg.d_model)
    if return_stats:
        return out, {"dropped": res[1], "expert_load": res[2]}
    return out


# --- the data-parallel primitive -------------------------------------------------------

def _rd_body(x, values, indices, metadata, gs, sel, *, config, has_sel: bool, n_ep: int,
             expert_axis: str | None):
    sw = SparseWeight(values, indices, metadata, config)
    if n_ep == 1:
        return jax.vmap(lambda a, g, s: ragged_dot(a, sw, g, s if has_sel else None))(
            x, gs, sel if has_sel else gs)
    el = values.shape[0]
    j = jax.lax.axis_index(expert_axis)

    def one(a, g, s):
        # My experts' rows are [start, start + sum(mine)) of the global row order: roll
        # them to the front, run the local experts, roll back (rows of others stay zero).
        mine = jax.lax.dynamic_slice_in_dim(g, j * el, el)
        start = jnp.where(jnp.arange(g.shape[0]) < j * el, g, 0).sum()
        if has_sel:
            y = ragged_dot(a, sw, mine, jnp.roll(s, -start))
        else:
            y = ragged_dot(jnp.roll(a, -start, axis=0), sw, mine)
        return jnp.roll(y, start, axis=0)

    y = jax.vmap(one)(x, gs, sel if has_sel else gs)
    return jax.lax.psum(y, expert_axis)


@functools.partial(jax.jit, static_argnames=("mesh", "data_axis", "expert_axis"))
def ragged_dot_sharded(x: jax.Array, sw: SparseWeight, group_sizes: jax.Array,
                       sel: jax.Array | None = None, *, mesh: Mesh,
                       data_axis: AxisSpec = "data", expert_axis: AxisSpec = None
                       ) -> jax.Array:
    """``jax.vmap(sj.ragged_dot)`` over a leading batch axis sharded on ``data_axis``.

    Args:
      x: ``[B, T, K]`` (with ``sel``) or ``[B, R, K]`` rows grouped by expert; B independent
        problems, sharded over ``data_axis`` (B must divide by its size).
      sw: SparseWeight ``[E, K, M]``: replicated (``expert_axis=None``) or sharded along E
        over ``expert_axis`` (E must divide by its size).
      group_sizes: int32 ``[B, E]``; sel: int32 ``[B, R]`` or None.
    Returns:
      ``[B, R, M]`` sharded over ``data_axis``: ``out[b] = sj.ragged_dot(x[b], sw,
      group_sizes[b], sel[b])``. With an expert axis the partial outputs are summed over
      it (one all-reduce); nothing is all-gathered.
    """
    _check_axes(mesh, data_axis=data_axis, expert_axis=expert_axis)
    if not isinstance(sw, SparseWeight) or sw.ndim != 3:
        raise TypeError(f"sw must be a SparseWeight [E, K, M], got {sw!r}")
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, K] (a batch axis first), got shape {x.shape}")
    b, e = x.shape[0], sw.shape[0]
    has_sel = sel is not None
    group_sizes = jnp.asarray(group_sizes).astype(jnp.int32)
    if group_sizes.shape != (b, e):
        raise ValueError(f"group_sizes must be int32[{b}, {e}], got {group_sizes.shape}")
    if has_sel:
        sel = jnp.asarray(sel).astype(jnp.int32)
        if sel.ndim != 2 or sel.shape[0] != b:
            raise ValueError(f"sel must be int32[{b}, R], got {sel.shape}")
    n_dp, n_ep = _size(mesh, data_axis), _size(mesh, expert_axis)
    if b % n_dp:
        raise ValueError(f"batch {b} is not divisible by the data axis {data_axis!r} of "
                         f"size {n_dp}")
    if e % n_ep:
        raise ValueError(f"{e} experts are not divisible by the expert axis "
                         f"{expert_axis!r} of size {n_ep}")
    dspec = P(_spec_entry(_names(data_axis)))
    wspec = P(_spec_entry(_names(expert_axis)))
    used = _names(data_axis) + _names(expert_axis)
    leaves = (sw.values, sw.indices, sw.metadata)
    leaves = _reshard(leaves, (wspec,) * 3, mesh, used)
    x = _reshard(x, dspec, mesh, used)
    group_sizes = _reshard(group_sizes, dspec, mesh, used)
    sel_in = _reshard(sel, dspec, mesh, used) if has_sel else None
    body = functools.partial(_rd_body, config=sw.config, has_sel=has_sel, n_ep=n_ep,
                             expert_axis=_names(expert_axis)[0] if n_ep > 1 else None)
    return jax.shard_map(body, mesh=mesh,
                         in_specs=(dspec, wspec, wspec, wspec, dspec,
                                   dspec if has_sel else None),
                         out_specs=dspec, check_vma=False)(x, *leaves, group_sizes, sel_in)
