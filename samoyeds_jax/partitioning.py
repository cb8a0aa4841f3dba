"""The partitioning rule of the sparse matmul primitive: how ``samoyeds_ragged_dot`` (and
the transpose primitive of its gradient) run under a plain ``jax.jit`` on sharded arrays.

XLA cannot see inside a custom call. Without a rule, the SPMD partitioner replicates
every operand of one (all-gathers ``x`` and the weights onto every device). Here both
primitives lower through :func:`jax.experimental.custom_partitioning`: a Shardy sharding
rule (Shardy is JAX's default partitioner) and GSPMD's sharding callbacks describe how the
operands' axes relate, and the partition callbacks turn the shardings the partitioner
chose into one per-device call of the same kernel plus the collectives the layout needs
(:func:`plan`). On one device, and inside ``shard_map`` (every axis manual), the call
lowers directly. Both partitioners are supported: Shardy and, where JAX still has it,
GSPMD (``jax_use_shardy_partitioner=False``).

The roles (``W`` = the stored arrays ``values [E, Mk, K/2]``, ``indices [E, Mk, K/L]``,
``metadata [E, Mk, K/32]``; ``Mk = M * N / V`` kept rows; a fused GLU's weight may be
``[E, 2, Mk/2, .]``, gate and up stacked):

=================  ====================================  ==============================
W sharded along    per device                            collectives
=================  ====================================  ==============================
nothing            the rows of ``sel`` (or of ``x``      none
                   without SEL) it owns, every expert
M (kept rows)      its output columns; shards of         none; output sharded along M
                   ``m_multiple`` columns (a GLU weight
                   must be stacked: each shard then
                   holds its gate and its up columns)
K (input)          a partial product over its K slice    one all-reduce of the output
                   (``x`` sharded the same way); shards  (float32)
                   of ``sub_row`` columns
E (experts)        the rows of its experts (a dynamic    one all-reduce of the output
                   roll of the row window)               (exact: one nonzero term per row)
=================  ====================================  ==============================

Roles combine (rows x E x M x K over distinct mesh axes). The weights decide: their
sharding is never changed (nothing gathers a weight). Activations follow them, and what
they cannot follow is resharded explicitly by the partitioner:

* with SEL, ``x`` (tokens in any order) is replicated over every axis (an all-gather of
  ``x`` when it arrives sharded along its tokens);
* ``x``'s K axis takes the weight's K sharding (a gather or a slice of ``x``);
* the output rows are split over the axes the partitioner proposes that the weights do not
  use, when they divide the rows; otherwise the rows are replicated.

Refused while compiling (a ``ValueError`` whose message JAX passes on in the compile
error), never gathered: a shard of M or K that is not a whole number of format tiles, a
fused GLU whose ``[E, K, 2F]`` weight is split along M (the shards would hold gate or up
alone: stack it with :func:`samoyeds_jax.layout.stack_gate_up`), a stacked weight split
between gate and up, and the leaves of one SparseWeight sharded differently.

Routing with rows or experts split: each device derives its own group sizes from the
replicated ``group_sizes`` (the rows of its window and its experts), so nothing about
routing is communicated. Bad routing (a negative size, sizes past the rows) makes every
per-device call fail on the CPU handler, as the unsplit call does.

Numerics: rows, M and E splits are bit-identical to one device (same per-row, per-column
sums; the E all-reduce adds exact zeros). A K split rounds each device's partial product
to the output dtype before the float32 sum (bfloat16: within a few units of roundoff, see
tests/helpers.TOL["k_split"]); a fused GLU with K split sums the unfused partials and
applies the GLU in float32 after the reduction.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax._src import dispatch as _jax_dispatch  # the set of primitives lowered with devices
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo as hlo
from jax.interpreters import mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from samoyeds_jax import _samoyeds, backward, ops
from samoyeds_jax._util import mesh_axes, mesh_size, spec_entry
from samoyeds_jax.format import ROW_TILE, SparsityConfig

__all__ = ["PartitionPlan", "plan"]

Axes = tuple[str, ...]

# --- the per-device calls ----------------------------------------------------------------

def _local_lowering(ctx, x, values, indices, metadata, *rest, **params):
    """The kernel's custom call; a stacked ``[E, 2, Mk/2, .]`` weight is passed as the
    ``[E, Mk, .]`` it views (a reshape in the IR: no copy, no sharding to type)."""
    if ctx.avals_in[1].ndim == 4:
        merged = [ops._merged_halves(a) for a in ctx.avals_in[1:4]]
        values, indices, metadata = (
            hlo.reshape(mlir.aval_to_ir_type(ctx.module_context, a), v)
            for a, v in zip(merged, (values, indices, metadata)))
        ctx = ctx.replace(avals_in=[ctx.avals_in[0], *merged, *ctx.avals_in[4:]])
    return ops._lowering(ctx, x, values, indices, metadata, *rest, **params)


# What one device runs: the same shape rule and kernel as the primitive, no partitioning.
local_p = Primitive(ops.TARGET + "_local")
local_p.def_abstract_eval(ops._abstract_eval)
mlir.register_lowering(local_p, _local_lowering, platform="cpu")
mlir.register_lowering(local_p, _local_lowering if _samoyeds.HAS_CUDA else ops._no_cuda_lowering,
                       platform="cuda")

local_t_p = Primitive(ops.TARGET + "_transpose_local")
local_t_p.def_effectful_abstract_eval(backward.ragged_dot_t_p.abstract_eval)
mlir.register_lowering(local_t_p, mlir.lower_fun(backward._t_rows, multiple_results=False))


# --- the plan: which mesh axes split which role --------------------------------------------

def _dim_axes(sharding: Any, ndim: int) -> list[Axes]:
    """The mesh axes of each dimension of a NamedSharding (replicated: ())."""
    if not isinstance(sharding, NamedSharding):
        return [()] * ndim
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return [mesh_axes(e) for e in spec[:ndim]]


def _spec(*dims: Axes) -> P:
    return P(*(spec_entry(d) for d in dims))


@dataclasses.dataclass(frozen=True)
class PartitionPlan:
    """The mesh axes that split each role of one call (empty: not split).

    Attributes:
      rows: the output rows (``sel``'s rows, or ``x``'s without SEL; the transpose's
        cotangent rows).
      experts: the weight's E axis.
      out: the output features (the product's M; the transpose's K).
      contract: the summed features (the product's K; the transpose's M): one all-reduce.
    """
    rows: Axes = ()
    experts: Axes = ()
    out: Axes = ()
    contract: Axes = ()


def _weight_dims(shapes: Sequence[Any]) -> tuple[Axes, Axes, Axes, Axes]:
    """(E, halves, kept rows, K) axes of the SparseWeight leaves; all three must agree."""
    dims = [_dim_axes(s.sharding, len(s.shape)) for s in shapes]
    if any(d != dims[0] for d in dims[1:]):
        raise ValueError(
            "samoyeds_ragged_dot: sw.values, sw.indices and sw.metadata must be sharded "
            f"alike (got {[_spec(*d) for d in dims]}); give every leaf of the SparseWeight "
            "the same PartitionSpec (sj.shard_params does)")
    d = dims[0]
    return (d[0], d[1], d[2], d[3]) if len(d) == 4 else (d[0], (), d[1], d[2])


def plan(transpose: bool, config: SparsityConfig, glu: str, mesh: Any,
         weight: Sequence[Any], rows_hint: Axes, num_rows: int) -> PartitionPlan:
    """The partition of one call from its weight's sharding (``weight``: the three leaves
    as ShapeDtypeStructs with shardings) and the axes proposed for its rows.

    Raises ValueError for a layout that would need the weights gathered (module
    docstring)."""
    e_ax, h_ax, mk_ax, k_ax = _weight_dims(weight)
    vals = weight[0].shape
    e, mk = vals[0], (vals[1] * vals[2] if len(vals) == 4 else vals[1])
    k = vals[-1] * 2
    what = "the transpose of samoyeds_ragged_dot" if transpose else "samoyeds_ragged_dot"
    if h_ax:
        raise ValueError(f"{what}: the stacked [E, 2, K, F] weight is split between gate and "
                         f"up over {h_ax}; split its F axis (axis 2 of each leaf) instead")
    if glu and len(vals) == 3 and mk_ax:
        raise ValueError(
            f"{what}: glu={glu!r} with the [E, K, 2F] weight split along M over {mk_ax} "
            f"would put gate and up columns on different devices; stack gate and up "
            f"([E, 2, K, F]: samoyeds_jax.layout.stack_gate_up, or sj.shard_params with "
            f"tensor_axis) and split F")
    halves = 2 if len(vals) == 4 else 1
    n_e, n_m, n_k = mesh_size(mesh, e_ax), mesh_size(mesh, mk_ax), mesh_size(mesh, k_ax)
    if e % n_e:
        raise ValueError(f"{what}: {e} experts do not split over {e_ax} (size {n_e})")
    if (mk // halves) % (n_m * ROW_TILE):
        raise ValueError(
            f"{what}: M split over {mk_ax} (size {n_m}) must leave each device a multiple of "
            f"{config.m_multiple} output columns{' per half' if halves == 2 else ''} "
            f"(m_multiple of {config}); the weight has "
            f"M={mk // config.n * config.v}")
    if k % (n_k * config.sub_row):
        raise ValueError(
            f"{what}: K={k} split over {k_ax} (size {n_k}) must leave each device a multiple "
            f"of sub_row={config.sub_row} input features")
    used = set(e_ax) | set(mk_ax) | set(k_ax)
    rows = tuple(a for a in rows_hint if a not in used)
    if num_rows % mesh_size(mesh, rows):
        rows = ()
    if transpose:
        return PartitionPlan(rows=rows, experts=e_ax, out=k_ax, contract=mk_ax)
    return PartitionPlan(rows=rows, experts=e_ax, out=mk_ax, contract=k_ax)


def _weight_spec(pl: PartitionPlan, transpose: bool, ndim: int) -> P:
    mk, k = (pl.contract, pl.out) if transpose else (pl.out, pl.contract)
    return _spec(pl.experts, mk, k) if ndim == 3 else _spec(pl.experts, (), mk, k)


# --- the per-device computation ------------------------------------------------------------

def _local_groups(gs: jax.Array, pl: PartitionPlan, rows_local: int, experts_local: int,
                  num_rows: int | None):
    """This device's group sizes and the offset of its experts' rows in its row window.

    Returns ``(group_sizes [El], offset)``; offset is None when the window starts with
    this device's first expert (no experts axis). With ``num_rows`` (the rows of the
    whole call), bad routing is passed on to the kernel's checks.
    """
    ends = jnp.cumsum(gs)
    starts = ends - gs
    lo = jax.lax.axis_index(pl.rows) * rows_local if pl.rows else 0
    if pl.experts:
        first = jax.lax.axis_index(pl.experts) * experts_local
        starts = jax.lax.dynamic_slice_in_dim(starts, first, experts_local)
        ends = jax.lax.dynamic_slice_in_dim(ends, first, experts_local)
    a = jnp.clip(starts - lo, 0, rows_local)
    b = jnp.clip(ends - lo, 0, rows_local)
    local = (b - a).astype(jnp.int32)
    offset = a[0] if pl.experts else None
    if num_rows is None:
        return local, offset
    # Bad routing makes every per-device call fail on the CPU handler, as the whole call
    # would (the message names this device's sizes).
    first_size = jnp.where((gs < 0).any(), -1,
                           jnp.where(jnp.sum(gs) > num_rows, rows_local + 1, local[0]))
    return local.at[0].set(first_size), offset


def _reduce(y: jax.Array, pl: PartitionPlan) -> jax.Array:
    """Sum the partial products: float32 over the contracted axes, exact over experts."""
    if pl.contract:
        return jax.lax.psum(y.astype(jnp.float32), pl.contract + pl.experts)
    if pl.experts:
        return jax.lax.psum(y, pl.experts)
    return y


def _product_fn(pl: PartitionPlan, config: SparsityConfig, has_sel: bool, glu: str,
                kernel: Any, num_rows: int, rows_local: int):
    def local(x, values, indices, metadata, sel, gs):
        el = values.shape[0]
        if pl.rows or pl.experts:
            gs, shift = _local_groups(gs, pl, rows_local, el, num_rows)
        else:
            shift = None
        if shift is not None:  # this device's experts' rows to the front of the window
            if has_sel:
                sel = jnp.roll(sel, -shift)
            else:
                x = jnp.roll(x, -shift, axis=0)
        fused = glu if not pl.contract else ""
        y = local_p.bind(x, values, indices, metadata, sel, gs, config=config, has_sel=has_sel,
                         glu=fused, kernel=kernel)
        if shift is not None:
            y = jnp.roll(y, shift, axis=0)
        y = _reduce(y, pl)
        if glu and not fused:  # the GLU after the K reduction, from the float32 sums
            f = y.shape[-1] // 2
            y = ops._glu_act(y[:, :f], glu) * y[:, f:]
        return y.astype(x.dtype)
    return local


def _transpose_fn(pl: PartitionPlan, config: SparsityConfig, rows_local: int):
    def local(ct, values, indices, metadata, gs):
        el = values.shape[0]
        if pl.rows or pl.experts:
            gs, shift = _local_groups(gs, pl, rows_local, el, None)
        else:
            shift = None
        if shift is not None:
            ct = jnp.roll(ct, -shift, axis=0)
        y = local_t_p.bind(ct, values, indices, metadata, gs, config=config)
        if shift is not None:
            y = jnp.roll(y, shift, axis=0)
        return _reduce(y, pl)
    return local


# --- the partitioner's callbacks -----------------------------------------------------------

def _rows_hint(result: Any, rows_operand: Any) -> Axes:
    """The rows' axes: the result's when the partitioner proposes some, else the operand's
    that carries the rows."""
    hint = _dim_axes(getattr(result, "sharding", None), 2)[0]
    return hint or _dim_axes(rows_operand.sharding, len(rows_operand.shape))[0]


def _product_partition(config, has_sel, glu, kernel, mesh, arg_shapes, result_shape):
    x, values, indices, metadata, sel, gs = arg_shapes
    rows_op = sel if has_sel else x
    r = rows_op.shape[0]
    pl = plan(False, config, glu, mesh, (values, indices, metadata),
              _rows_hint(result_shape, rows_op), r)
    w = NamedSharding(mesh, _weight_spec(pl, False, len(values.shape)))
    rep = NamedSharding(mesh, P())
    x_s = NamedSharding(mesh, _spec((), pl.contract) if has_sel else _spec(pl.rows, pl.contract))
    sel_s = NamedSharding(mesh, _spec(pl.rows)) if has_sel else rep
    out = NamedSharding(mesh, _spec(pl.rows, pl.out))
    fn = _product_fn(pl, config, has_sel, glu, kernel, r, r // mesh_size(mesh, pl.rows))
    return mesh, fn, out, (x_s, w, w, w, sel_s, rep)


def _inferred(transpose, config, glu, mesh, weight, rows_op) -> NamedSharding:
    """GSPMD's guess of the output sharding. It must not raise (XLA aborts the process on
    an error here): a refused layout is reported by the partition callback."""
    try:
        pl = plan(transpose, config, glu, mesh, weight,
                  _dim_axes(rows_op.sharding, len(rows_op.shape))[0], rows_op.shape[0])
    except ValueError:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, _spec(pl.rows, pl.out))


def _product_infer(config, has_sel, glu, kernel, mesh, arg_shapes, result_shape):
    x, values, indices, metadata, sel, gs = arg_shapes
    return _inferred(False, config, glu, mesh, (values, indices, metadata), sel if has_sel else x)


def _transpose_partition(config, mesh, arg_shapes, result_shape):
    ct, values, indices, metadata, gs = arg_shapes
    r = ct.shape[0]
    pl = plan(True, config, "", mesh, (values, indices, metadata),
              _rows_hint(result_shape, ct), r)
    w = NamedSharding(mesh, _weight_spec(pl, True, len(values.shape)))
    rep = NamedSharding(mesh, P())
    ct_s = NamedSharding(mesh, _spec(pl.rows, pl.contract))
    out = NamedSharding(mesh, _spec(pl.rows, pl.out))
    fn = _transpose_fn(pl, config, r // mesh_size(mesh, pl.rows))
    return mesh, fn, out, (ct_s, w, w, w, rep)


def _transpose_infer(config, mesh, arg_shapes, result_shape):
    ct, values, indices, metadata, gs = arg_shapes
    return _inferred(True, config, "", mesh, (values, indices, metadata), ct)


# --- the Shardy rules ---------------------------------------------------------------------

class _Rule:
    """Builds an einsum-like Shardy rule whose dimensions are products of named factors;
    factors of size 1 are left out, and only factors that never span a whole dimension
    get their size declared."""

    def __init__(self):
        self.sizes: dict[str, int] = {}
        self.whole: set[str] = set()

    def dim(self, *factors: tuple[str, int]) -> str:
        kept = [(f, s) for f, s in factors if s != 1] or [factors[0]]
        for f, s in kept:
            self.sizes[f] = s
        if len(kept) == 1:
            self.whole.add(kept[0][0])
            return kept[0][0]
        return "(" + " ".join(f for f, _ in kept) + ")"

    def build(self, operands: list[list[str]], results: list[list[str]], **kinds):
        text = ", ".join(" ".join(d) for d in operands) + " -> " + ", ".join(
            " ".join(d) for d in results)
        sizes = {f: s for f, s in self.sizes.items() if f not in self.whole}
        # Special factors listed in the order they appear (Shardy wants them sorted).
        order = list(dict.fromkeys(re.findall(r"[a-z]+", text)))
        kinds = {k: tuple(f for f in order if f in v) for k, v in kinds.items()}
        return text, {**sizes, **{k: v for k, v in kinds.items() if v}}


def _shape(t: Any) -> tuple[int, ...]:
    """The shape of an MLIR tensor type (what the rule callback receives)."""
    return tuple(ir.RankedTensorType(t).shape)


def _weight_factors(rule: _Rule, config: SparsityConfig, values_shape, glu: str):
    """The factors of the weight leaves ``[E, ([2,] kept rows), K-derived]``, of the output
    features M (F with a GLU) and of K: kept rows = b n and M = b v for ``b`` blocks of V
    output columns, K = w l for ``w`` windows of ``L`` columns (values hold ``w * L/2``,
    indices ``w``, metadata ``w * L/32`` of them). The factors inside a tile (n, v, l, ...)
    are never split. A fused GLU's ``[E, K, 2F]`` weight relates its kept rows to nothing:
    split, they would separate gate from up (refused by :func:`plan`)."""
    n, v, L = config.n, config.v, config.sub_row
    stacked = len(values_shape) == 4
    b = ("b", (values_shape[2] if stacked else values_shape[1]) // n)
    w = ("w", values_shape[-1] * 2 // L)
    e = rule.dim(("e", values_shape[0]))
    if stacked:
        kept = [rule.dim(("h", 2)), rule.dim(b, ("n", n))]
        out = rule.dim(b, ("v", v))
    elif glu:
        kept = [rule.dim(("mk", values_shape[1]))]
        out = rule.dim(("f", values_shape[1] // 2 // n * v))
    else:
        kept = [rule.dim(b, ("n", n))]
        out = rule.dim(b, ("v", v))
    leaves = [[e, *kept, rule.dim(w, ("lv", L // 2))],
              [e, *kept, rule.dim(w)],
              [e, *kept, rule.dim(w, ("lm", L // 32))]]
    return leaves, out, rule.dim(w, ("l", L))


_TILE_FACTORS = ("n", "v", "l", "lv", "lm")


def _product_rule(config, has_sel, glu, kernel, mesh, operand_types, result_types):
    x, values, _, _, sel, _ = (_shape(t) for t in operand_types)
    rule = _Rule()
    leaves, out_m, k_dim = _weight_factors(rule, config, values, glu)
    r = rule.dim(("r", sel[0] if has_sel else x[0]))
    x_rows = rule.dim(("t", x[0])) if has_sel else r
    sel_dim = r if has_sel else rule.dim(("z", 0))
    # group_sizes gets a factor of its own: it stays replicated whatever splits E.
    gs = rule.dim(("g", values[0]))
    return rule.build([[x_rows, k_dim], *leaves, [sel_dim], [gs]], [[r, out_m]],
                      reduction_factors=("w", "e"),
                      need_replication_factors=("t", "z", "g", *_TILE_FACTORS))


def _transpose_rule(config, mesh, operand_types, result_types):
    ct, values, _, _, _ = (_shape(t) for t in operand_types)
    rule = _Rule()
    leaves, out_m, k_dim = _weight_factors(rule, config, values, "")
    r = rule.dim(("r", ct[0]))
    gs = rule.dim(("g", values[0]))
    return rule.build([[r, out_m], *leaves, [gs]], [[r, k_dim]],
                      reduction_factors=("b", "e"),
                      need_replication_factors=("g", *_TILE_FACTORS))


# --- registration --------------------------------------------------------------------------

def _product(x, values, indices, metadata, sel, gs, config, has_sel, glu, kernel):
    return local_p.bind(x, values, indices, metadata, sel, gs, config=config, has_sel=has_sel,
                        glu=glu, kernel=kernel)


def _transpose(ct, values, indices, metadata, gs, config):
    return local_t_p.bind(ct, values, indices, metadata, gs, config=config)


_product_cp = custom_partitioning(_product, static_argnums=(6, 7, 8, 9))
_product_cp.def_partition(partition=_product_partition,
                          infer_sharding_from_operands=_product_infer,
                          sharding_rule=_product_rule)
_transpose_cp = custom_partitioning(_transpose, static_argnums=(5,))
_transpose_cp.def_partition(partition=_transpose_partition,
                            infer_sharding_from_operands=_transpose_infer,
                            sharding_rule=_transpose_rule)


def _product_lowering(ctx, *args, config, has_sel, glu="", kernel=ops._AUTO):
    return mlir.lower_fun(
        lambda *a: _product_cp(*a, config, has_sel, glu, kernel), multiple_results=False)(
            ctx, *args)


def _transpose_lowering(ctx, *args, config):
    return mlir.lower_fun(lambda *a: _transpose_cp(*a, config), multiple_results=False)(
        ctx, *args)


# Replace the primitives' direct lowerings (ops.py) with the partitioned ones. A custom
# partitioning needs the device assignment while it lowers (JAX's own primitive is in
# the same set).
for _platform in ("cpu", "cuda"):
    mlir.register_lowering(ops.ragged_dot_p, _product_lowering, platform=_platform)
mlir.register_lowering(backward.ragged_dot_t_p, _transpose_lowering)
_jax_dispatch.prim_requires_devices_during_lowering.update((ops.ragged_dot_p, backward.ragged_dot_t_p))
