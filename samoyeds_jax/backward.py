"""The autodiff rules of the sparse matmul and its backward products, with the weight's
pattern fixed.

Training a pruned model keeps each weight's pattern (sub-row indices, 2:4 metadata) and
updates its kept values. This module registers the JVP and transpose rules of
``ops.ragged_dot_p`` (the package's ``__init__`` imports it). Besides the forward
product, the gradient of ``y = ragged_dot(x, sw, group_sizes, sel)`` needs:

* **dx rows** ``dxr[r] = ct[r] @ W_e(r)^T``, ``[R, K]`` float32 (then summed into the
  tokens through SEL);
* **dvalues**, the SDDMM of the pattern: ``dW_e = sum_r x[src(r)]^T ct[r]`` at the stored
  positions only. Kept value ``j`` of kept row ``kr`` lies in window ``w = j // (L/2)``
  at column ``k(kr, j) = w*L + 4*(j'//2) + position`` (its 2:4 position from the
  metadata, ``j' = j mod L/2``) and belongs to output column ``m(kr, w) = (kr // N) * V +
  indices[kr, w]``; so ``dvalues[e, kr, j] = sum_r ct[r, m(kr, w)] * x[src(r), k(kr,
  j)]`` over the rows ``r`` of expert ``e``. ``[E, Mk, K/2]`` float32.

Both are primitives with one lowering per platform:

==============================  ==========================  ================================
primitive                       CPU                         CUDA
==============================  ==========================  ================================
``samoyeds_ragged_dot_dx``      C++ handler on the          CUDA handler on the compressed
                                compressed weight           weight, tensor cores
                                (``ffi/cpu_backward.cc``)   (``ffi/cuda_backward.cu``)
``samoyeds_ragged_dot_dvalues`` C++ handler: the SDDMM      CUDA handler: the SDDMM over
                                over the stored positions   the stored positions
==============================  ==========================  ================================

Both CUDA handlers are called through the hook: when the compiled module exports a CUDA
target of the primitive's name (``_samoyeds.cuda_targets()``), the ``cuda`` lowering calls
it with the CPU handler's signature and attributes. Without it (a build without CUDA), on
other platforms, and inside :func:`xla_backward_on_cuda` (benchmarks compare the two),
the XLA path runs instead: :func:`dx_xla` (the decoded weight through
``jax.lax.ragged_dot``) and :func:`dvalues_xla` (the SDDMM in XLA ops, in blocks of rows),
correct and deterministic but not sparse kernels (they compute whole kept sub-rows and
decode the weight).

Routing: both take ``group_sizes`` as the forward kernels read them (:func:`dx_rows`
and :func:`dvalues` clip them: negative sizes count as 0, ranges end at R), and a
``sel`` entry outside ``[0, T)`` is a zero row (the CUDA forward's meaning; the CPU
forward refuses it). Each output element is summed in one fixed order: the same bits on
every run.

``dvalues`` is bilinear in ``x`` and ``ct``; its JVP, vmap and transpose rules (the
transposes are the forward product and ``dx``) make higher derivatives and ``vmap`` of
gradients work.
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from samoyeds_jax import _samoyeds
from samoyeds_jax.format import (
    GROUP_WIDTH, KEPT_PER_GROUP, SUPPORTED_DTYPES, SparseWeight, SparsityConfig, decode,
    group_positions)
from samoyeds_jax.ops import (
    _AUTO, TARGET, KernelChoice, _clip_sizes, _def_eager_impl, _ffi_attrs, _glu_act,
    _merged_halves, _shape_str, ragged_dot_p)

__all__ = ["block_rows", "dvalues", "dvalues_xla", "dx_rows", "dx_xla", "expert_blocks",
           "xla_backward_on_cuda"]

DX_TARGET = TARGET + "_dx"
DVALUES_TARGET = TARGET + "_dvalues"

dx_p = Primitive(DX_TARGET)
dvalues_p = Primitive(DVALUES_TARGET)

# Elements of one temporary of the XLA dvalues path (the windows are processed in chunks).
_XLA_CHUNK_ELEMS = 1 << 24


def _clipped(gs: jax.Array, rows: int) -> jax.Array:
    """Group sizes as the forward kernels read them: none negative, ranges ending at
    ``rows``."""
    start, end = _clip_sizes(gs, rows)
    return end - start


# --- dx rows ---------------------------------------------------------------------------

def dx_rows(ct: jax.Array, values: jax.Array, indices: jax.Array, metadata: jax.Array,
            gs: jax.Array, *, config: SparsityConfig) -> jax.Array:
    """``dxr [R, K]`` float32: ``dxr[r] = ct[r] @ W_e(r)^T`` for the rows of the groups,
    zero after.

    Args:
      ct: ``[R, M]`` the output cotangent, the weight's dtype.
      values, indices, metadata: the stored arrays of ``sw [E, K, M]``.
      gs: ``[E]`` int32 group sizes (clipped here as the forward kernels read them).
      config: the weight's pattern.
    """
    return dx_p.bind(ct, values, indices, metadata, _clipped(gs, ct.shape[0]), config=config)


def dx_xla(ct, values, indices, metadata, gs, *, config: SparsityConfig) -> jax.Array:
    """:func:`dx_rows` in XLA ops, on every platform: the decoded weight through
    ``jax.lax.ragged_dot`` (``gs`` already clipped)."""
    w = decode(SparseWeight.unchecked(values, indices, metadata, config))       # [E, K, M]
    dxr = jax.lax.ragged_dot(ct, jnp.swapaxes(w, -1, -2), gs,
                             preferred_element_type=jnp.float32)               # [R, K]
    valid = jnp.arange(ct.shape[0]) < jnp.sum(gs)
    return jnp.where(valid[:, None], dxr, 0.0)


def _dx_abstract(ct, values, indices, metadata, gs, *, config):
    if jnp.dtype(ct.dtype) not in SUPPORTED_DTYPES or ct.dtype != values.dtype:
        raise TypeError(f"dx: ct {_shape_str(ct)} must have the weight's dtype "
                        f"({jnp.dtype(values.dtype).name})")
    return jax.core.ShapedArray((ct.shape[0], values.shape[-1] * KEPT_PER_GROUP), jnp.float32)


dx_p.def_abstract_eval(_dx_abstract)


# --- dvalues ---------------------------------------------------------------------------

def dvalues(x: jax.Array, ct: jax.Array, indices: jax.Array, metadata: jax.Array,
            sel: jax.Array, gs: jax.Array, *, config: SparsityConfig,
            has_sel: bool) -> jax.Array:
    """The gradient of the kept values, ``[E, Mk, K/2]`` float32 (module docstring).

    Args:
      x: ``[T, K]`` the product's input; ct: ``[R, M]`` its output cotangent (x's dtype).
      indices, metadata: the stored pattern of ``sw [E, K, M]``.
      sel: ``[R]`` int32 token of each row (``has_sel``), else empty and ``T == R``.
      gs: ``[E]`` int32 group sizes (clipped here as the forward kernels read them).
    """
    ct = ct.astype(x.dtype)
    return dvalues_p.bind(x, ct, indices, metadata, sel, _clipped(gs, ct.shape[0]),
                          config=config, has_sel=has_sel)


def _dvalues_abstract(x, ct, indices, metadata, sel, gs, *, config, has_sel):
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES or ct.dtype != x.dtype:
        raise TypeError(f"dvalues: x {_shape_str(x)} and ct {_shape_str(ct)} must be "
                        f"bfloat16 or float16, the same dtype")
    e, mk, _ = indices.shape
    if ct.ndim != 2 or ct.shape[1] != mk // config.n * config.v:
        raise ValueError(f"dvalues: ct {_shape_str(ct)} must be "
                         f"[R, M={mk // config.n * config.v}]")
    if has_sel and sel.shape != (ct.shape[0],):
        raise ValueError(f"dvalues: sel {_shape_str(sel)} must be [R={ct.shape[0]}]")
    if not has_sel and x.shape[0] != ct.shape[0]:
        raise ValueError(f"dvalues: without sel, x {_shape_str(x)} and ct {_shape_str(ct)} "
                         f"must have the same rows")
    return jax.core.ShapedArray((e, mk, x.shape[1] // KEPT_PER_GROUP), jnp.float32)


def block_rows(rows: int, experts: int) -> int:
    """Rows per block of :func:`expert_blocks` for ``rows`` rows over ``experts``: about
    one expert's share, a power of 2 in [8, 128]."""
    share = -(-rows // max(experts, 1))
    return int(min(128, max(8, 1 << max(0, (share - 1).bit_length()))))


def expert_blocks(gs: jax.Array, rows: int, block: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The rows of the groups cut into blocks of ``block`` rows, each inside one expert's
    rows (static shapes: at most ``(rows + E * (block - 1)) // block`` blocks), for XLA
    formulations of grouped products that need neither a ragged op nor E times the work.

    Args:
      gs: ``[E]`` int32 group sizes, non-negative with ``sum(gs) <= rows`` (clipped).
      rows: R, the rows of the grouped operand.
      block: rows per block.
    Returns:
      ``expert [nb]`` int32 (the block's expert, clipped to ``E - 1`` for unused blocks),
      ``row [nb, block]`` int32 (the operand row of each slot, 0 where unused) and
      ``valid [nb, block]`` bool.
    """
    e = gs.shape[0]
    nb = max(1, (rows + e * (block - 1)) // block)
    blocks = (gs + block - 1) // block
    bend = jnp.cumsum(blocks)
    rend = jnp.cumsum(gs)
    blk = jnp.arange(nb, dtype=jnp.int32)
    be = jnp.searchsorted(bend, blk, side="right").astype(jnp.int32)      # E: unused
    bec = jnp.minimum(be, e - 1)
    row = ((rend - gs)[bec] + (blk - (bend - blocks)[bec]) * block)[:, None] + jnp.arange(
        block, dtype=jnp.int32)
    valid = (be < e)[:, None] & (row < rend[bec][:, None])
    return bec, jnp.where(valid, row, 0), valid


def dvalues_xla(x, ct, indices, metadata, sel, gs, *, config: SparsityConfig,
                has_sel: bool) -> jax.Array:
    """:func:`dvalues` in XLA ops, on every platform (``gs`` already clipped).

    The rows are cut into blocks of B rows inside one expert (at most ``R/B + E``
    blocks). Per block and K window, the block's x columns of the window ``[B, L]`` meet
    the cotangent columns its kept sub-rows select, ``[B, Mk]`` (a gather through the
    block's expert's sub-row indices): a batched matmul gives the kept sub-rows' window
    ``[L, Mk]``. A 0/1 matrix of block membership sums the blocks of each expert (a
    matmul: deterministic), and the metadata picks the two stored positions of each 2:4
    group. Work: the kept sub-rows (N/V of the dense dW), in window chunks of bounded
    size.
    """
    n, v, L = config.n, config.v, config.sub_row
    e, mk, windows = indices.shape
    r, t, k = ct.shape[0], x.shape[0], x.shape[1]
    if min(e, r, t) == 0:
        return jnp.zeros((e, mk, k // KEPT_PER_GROUP), jnp.float32)
    b = block_rows(r, e)
    bec, row, ok = expert_blocks(gs, r, b)                                 # [nb], [nb, B]
    nb = bec.shape[0]
    hi = jax.lax.Precision.HIGHEST
    src = sel[row] if has_sel else row
    ok &= (src >= 0) & (src < t)
    xb = jnp.where(ok[..., None], x[jnp.where(ok, src, 0)], 0).astype(jnp.float32)
    cb = jnp.where(ok[..., None], ct[row], 0).astype(jnp.float32)
    # Block membership (a block with no valid row adds zeros wherever it is counted).
    member = (bec[None, :] == jnp.arange(e)[:, None]).astype(jnp.float32)  # [E, nb]
    first, second = group_positions(metadata)                             # [E, Mk, K/4]
    pos = jnp.stack([first, second], -1).astype(jnp.int32)
    pos = pos.reshape(e, mk, windows, L // GROUP_WIDTH, KEPT_PER_GROUP)
    base = (jnp.arange(mk, dtype=jnp.int32) // n * v)[None, :, None]
    cols = base + indices[bec].astype(jnp.int32)                          # [nb, Mk, W]
    # Windows per chunk: a divisor of W keeping the gathered cotangents and the block
    # products within _XLA_CHUNK_ELEMS.
    per_window = nb * mk * max(b, L)
    c = max(1, min(windows, _XLA_CHUNK_ELEMS // max(per_window, 1)))
    while windows % c:
        c -= 1

    def chunk(args):
        xw, colw, posw = args          # [nb, B, c*L], [nb, Mk, c], [E, Mk, c, L/4, 2]
        cg = jnp.take_along_axis(cb, colw.reshape(nb, 1, mk * c), axis=2)   # [nb, B, Mk*c]
        cg = cg.reshape(nb, b, mk, c)
        prod = jnp.einsum("nbjl,nbkj->njlk", xw.reshape(nb, b, c, L), cg, precision=hi,
                          preferred_element_type=jnp.float32)             # [nb, c, L, Mk]
        red = jnp.einsum("en,njlk->ekjl", member, prod, precision=hi,
                         preferred_element_type=jnp.float32)              # [E, Mk, c, L]
        red = red.reshape(e, mk, c, L // GROUP_WIDTH, GROUP_WIDTH)
        return jnp.take_along_axis(red, posw, axis=-1).reshape(e, mk, c * L // 2)

    steps = windows // c
    xs = jnp.moveaxis(xb.reshape(nb, b, steps, c * L), 2, 0)
    cs = jnp.moveaxis(cols.reshape(nb, mk, steps, c), 2, 0)
    ps = jnp.moveaxis(pos.reshape(e, mk, steps, c, L // GROUP_WIDTH, KEPT_PER_GROUP), 2, 0)
    if steps == 1:
        return chunk((xs[0], cs[0], ps[0]))
    out = jax.lax.map(chunk, (xs, cs, ps))                               # [steps, E, Mk, .]
    return jnp.moveaxis(out, 0, 2).reshape(e, mk, k // KEPT_PER_GROUP)


dvalues_p.def_abstract_eval(_dvalues_abstract)


def _dvalues_jvp(primals, tangents, *, config, has_sel):
    x, ct = primals[:2]
    tx, tct = (None if type(t) is ad.Zero else t for t in tangents[:2])
    out = dvalues_p.bind(*primals, config=config, has_sel=has_sel)
    parts = []
    if tx is not None:
        parts.append(dvalues_p.bind(tx, *primals[1:], config=config, has_sel=has_sel))
    if tct is not None:
        parts.append(dvalues_p.bind(x, tct, *primals[2:], config=config, has_sel=has_sel))
    if not parts:
        return out, ad.Zero.from_primal_value(out)
    return out, parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _dvalues_transpose(g, x, ct, indices, metadata, sel, gs, *, config, has_sel):
    x_lin = ad.is_undefined_primal(x)
    lin = x if x_lin else ct
    if type(g) is ad.Zero:
        zero = ad.Zero(lin.aval)
        return (zero, None, None, None, None, None) if x_lin else \
            (None, zero, None, None, None, None)
    dtype = lin.aval.dtype
    gv = g.astype(dtype)     # a values-shaped array: the product's weight
    if x_lin:
        # sum <g, dvalues(x, ct)> over x: dx[src(r)] += ct[r] @ W(g)_e(r)^T.
        dxr = ragged_dot_t_p.bind(ct, gv, indices, metadata, gs, config=config)
        dx = _scatter_rows(dxr, sel, x.aval.shape[0], has_sel)
        return (dx.astype(dtype), None, None, None, None, None)
    # ... over ct: dct[r] = x[src(r)] @ W(g)_e(r), the forward product.
    dct = ragged_dot_p.bind(x, gv, indices, metadata, sel, gs, config=config,
                            has_sel=has_sel, glu="", kernel=_AUTO)
    return (None, dct, None, None, None, None)


# --- autodiff (bilinear in x and the kept values; the pattern is fixed) -----------------
#
# The product is linear in x and in sw.values (decode places the stored values, it never
# combines them); the sub-row indices and metadata are integers with no gradient. Each
# rule below binds one call per linear operand, so every transpose sees exactly one
# undefined input: dx goes through ragged_dot_t_p (below), dvalues through
# dvalues_p above (an SDDMM that computes the stored positions only).

def _bind_like(a, values, indices, metadata, sel, gs, *, config, has_sel, kernel):
    """The unfused product of another x (``a``) or another values array."""
    return ragged_dot_p.bind(a, values, indices, metadata, sel, gs, config=config,
                             has_sel=has_sel, glu="", kernel=kernel)


def _add_tangents(parts):
    """The sum of the tangents that are not symbolic zeros (None when all are)."""
    parts = [p for p in parts if p is not None]
    return functools.reduce(lambda a, b: a + b, parts) if parts else None


def _jvp(primals, tangents, *, config: SparsityConfig, has_sel: bool, glu: str = "",
         kernel: KernelChoice = _AUTO):
    x, values, indices, metadata, sel, gs = primals
    tx, tv = (None if type(t) is ad.Zero else t for t in tangents[:2])
    bind = functools.partial(_bind_like, indices=indices, metadata=metadata, sel=sel, gs=gs,
                             config=config, has_sel=has_sel, kernel=kernel)
    if glu:
        # Differentiated through the unfused product: y = act(g) * u of [g | u] = x @ W,
        # whose tangent is linear in [dg | du] (the GLU's derivative is elementwise).
        def gate_up(a, vals):
            if vals.ndim == 4:  # gate and up stacked: one product per half
                return tuple(_bind_like(
                    a, vals[:, h], indices[:, h], metadata[:, h], sel, gs, config=config,
                    has_sel=has_sel, kernel=kernel).astype(jnp.float32) for h in (0, 1))
            gu = bind(a, vals).astype(jnp.float32)
            return gu[:, :gu.shape[-1] // 2], gu[:, gu.shape[-1] // 2:]

        g, u = gate_up(x, values)
        act, dact = jax.jvp(lambda z: _glu_act(z, glu), (g,), (jnp.ones_like(g),))
        y = (act * u).astype(x.dtype)
        halves = [gate_up(tx, values) if tx is not None else None,
                  gate_up(x, tv) if tv is not None else None]
        halves = [h for h in halves if h is not None]
        if not halves:
            return y, ad.Zero.from_primal_value(y)
        dg = _add_tangents([h[0] for h in halves])
        du = _add_tangents([h[1] for h in halves])
        return y, (dact * u * dg + act * du).astype(x.dtype)
    y = ragged_dot_p.bind(*primals, config=config, has_sel=has_sel, glu="", kernel=kernel)
    ty = _add_tangents([bind(tx, values) if tx is not None else None,
                        bind(x, tv) if tv is not None else None])
    return y, ad.Zero.from_primal_value(y) if ty is None else ty


def _scatter_rows(dxr: jax.Array, sel: jax.Array, tokens: int, has_sel: bool) -> jax.Array:
    """``dx [T, K]`` float32 from the rows' ``dxr [R, K]``: ``dx[sel[r]] += dxr[r]`` (or
    ``dxr`` itself without SEL). A sel entry outside ``[0, T)`` reads a zero row (CUDA): it
    receives no gradient. An explicit bound, since .at[] would wrap a negative index
    around to the last tokens."""
    if not has_sel:
        return dxr
    dst = jnp.where((sel >= 0) & (sel < tokens), sel, tokens)
    return jnp.zeros((tokens, dxr.shape[1]), jnp.float32).at[dst].add(dxr, mode="drop")


def _transpose(ct, x, values, indices, metadata, sel, gs, *, config: SparsityConfig,
               has_sel: bool, glu: str = "", kernel: KernelChoice = _AUTO):
    assert not glu, "a fused GLU is not linear; its JVP uses the unfused product"
    x_lin, v_lin = ad.is_undefined_primal(x), ad.is_undefined_primal(values)
    assert x_lin != v_lin, "each call of the JVP is linear in x or in the values, not both"
    if type(ct) is ad.Zero:
        zero = ad.Zero(x.aval) if x_lin else ad.Zero(values.aval)
        return (zero, None, None, None, None, None) if x_lin else \
            (None, zero, None, None, None, None)
    if x_lin:
        # dx[src(r)] += ct[r] @ W_e(r)^T.
        dxr = ragged_dot_t_p.bind(ct, values, indices, metadata, gs, config=config)  # [R, K]
        dx = _scatter_rows(dxr, sel, x.aval.shape[0], has_sel)
        return (dx.astype(x.aval.dtype), None, None, None, None, None)
    # dvalues: the stored positions of sum_r x[src(r)]^T ct[r], per expert.
    aval = values.aval
    if aval.ndim == 4:  # [E, 2, Mk/2, .] (gate and up stacked) is the [E, Mk, .] it views
        indices, metadata = (a.reshape(_merged_halves(a).shape) for a in (indices, metadata))
    dv = dvalues(x, ct, indices, metadata, sel, gs, config=config, has_sel=has_sel)
    return (None, dv.reshape(aval.shape).astype(aval.dtype), None, None, None, None)


ad.primitive_jvps[ragged_dot_p] = _jvp
ad.primitive_transposes[ragged_dot_p] = _transpose


# The rows of dx, dxr[r] = ct[r] @ W_e(r)^T (float32, zero at or past sum(group_sizes)),
# are their own primitive: jax.lax.ragged_dot has no vmap rule for operands batched on
# different axes, so vmap(grad) and jax.hessian need this one's batching rule. It is
# bilinear in ct and the values, like the product.
ragged_dot_t_p = Primitive(TARGET + "_transpose")


def _t_rows(ct, values, indices, metadata, gs, *, config: SparsityConfig):
    """One device's ``dxr [R, K]`` (:func:`dx_rows`: per-platform handlers)."""
    return dx_rows(ct, values, indices, metadata, gs, config=config)


ragged_dot_t_p.def_abstract_eval(lambda ct, values, *_, config: jax.core.ShapedArray(
    (ct.shape[0], values.shape[-1] * KEPT_PER_GROUP), jnp.float32))
_def_eager_impl(ragged_dot_t_p)
mlir.register_lowering(ragged_dot_t_p, mlir.lower_fun(_t_rows, multiple_results=False))


def map_batch(prim: Primitive):
    """A batching rule for ``prim``: one call per batch member (``jax.lax.map``), the
    batch axis of the result first. A correct, not fast, rule for the backward
    primitives, which only meet vmap through vmap(grad) or higher derivatives."""
    def rule(args, dims, **params):
        mapped = tuple(jnp.moveaxis(a, d, 0) for a, d in zip(args, dims) if d is not None)

        def one(sliced):
            it = iter(sliced)
            full = [a if d is None else next(it) for a, d in zip(args, dims)]
            return prim.bind(*full, **params)

        return jax.lax.map(one, mapped), 0
    return rule


def _t_jvp(primals, tangents, *, config: SparsityConfig):
    ct, values = primals[:2]
    tct, tv = (None if type(t) is ad.Zero else t for t in tangents[:2])
    out = ragged_dot_t_p.bind(*primals, config=config)
    parts = [ragged_dot_t_p.bind(tct, *primals[1:], config=config) if tct is not None else None,
             ragged_dot_t_p.bind(ct, tv, *primals[2:], config=config) if tv is not None
             else None]
    tout = _add_tangents(parts)
    return out, ad.Zero.from_primal_value(out) if tout is None else tout


def _t_transpose(cdx, ct, values, indices, metadata, gs, *, config: SparsityConfig):
    ct_lin = ad.is_undefined_primal(ct)
    if type(cdx) is ad.Zero:
        return ((ad.Zero(ct.aval), None, None, None, None) if ct_lin else
                (None, ad.Zero(values.aval), None, None, None))
    if ct_lin:
        # The transpose of ct -> dxr is the forward product, rows past sum(gs) zero.
        dct = ragged_dot_p.bind(cdx.astype(ct.aval.dtype), values, indices, metadata,
                                jnp.zeros((0,), jnp.int32), gs, config=config,
                                has_sel=False, glu="")
        return (dct, None, None, None, None)
    # dxr[r] = ct[r] @ W^T is, in the values, the product's own form with x := cdx.
    dv = dvalues(cdx.astype(values.aval.dtype), ct, indices, metadata,
                          jnp.zeros((0,), jnp.int32), gs, config=config, has_sel=False)
    return (None, dv.astype(values.aval.dtype), None, None, None)


batching.primitive_batchers[ragged_dot_t_p] = map_batch(ragged_dot_t_p)
ad.primitive_jvps[ragged_dot_t_p] = _t_jvp
ad.primitive_transposes[ragged_dot_t_p] = _t_transpose


ad.primitive_jvps[dvalues_p] = _dvalues_jvp
ad.primitive_transposes[dvalues_p] = _dvalues_transpose
batching.primitive_batchers[dvalues_p] = map_batch(dvalues_p)


# --- eager calls and lowerings ----------------------------------------------------------

_def_eager_impl(dx_p)
_def_eager_impl(dvalues_p)


# Whether CUDA lowerings take the XLA path although the module has CUDA handlers
# (xla_backward_on_cuda; the environment sets the process's default).
_xla_on_cuda = os.environ.get("SAMOYEDS_XLA_BACKWARD", "") not in ("", "0")


@contextlib.contextmanager
def xla_backward_on_cuda(enabled: bool = True):
    """Inside, computations lowered for CUDA run the backward primitives' XLA path
    (:func:`dx_xla`, :func:`dvalues_xla`) instead of the CUDA handlers; the benchmarks
    compare the two. It applies where a computation is lowered: a jitted function's
    first call (or ``.lower()``), not later calls of an already compiled one.
    ``SAMOYEDS_XLA_BACKWARD=1`` makes it the process's default."""
    global _xla_on_cuda
    before, _xla_on_cuda = _xla_on_cuda, enabled
    try:
        yield
    finally:
        _xla_on_cuda = before


def _platform_lowerings(prim: Primitive, target: str, xla_fn, attr_names: tuple[str, ...]):
    """CPU: the C++ handler; CUDA: the CUDA handler when the module has one (the hook)
    and :func:`xla_backward_on_cuda` is off, else ``xla_fn``; any other platform:
    ``xla_fn``."""
    def ffi_lowering(ctx, *args, config, **params):
        return jax.ffi.ffi_lowering(target)(ctx, *args,
                                            **_ffi_attrs(config, **{a: params[a] for a in attr_names}))

    xla = mlir.lower_fun(xla_fn, multiple_results=False)
    mlir.register_lowering(prim, xla)
    if target in _samoyeds.cpu_targets():
        mlir.register_lowering(prim, ffi_lowering, platform="cpu")
    if target in _samoyeds.cuda_targets():
        mlir.register_lowering(
            prim, lambda ctx, *a, **p: (xla if _xla_on_cuda else ffi_lowering)(ctx, *a, **p),
            platform="cuda")
    else:
        mlir.register_lowering(prim, xla, platform="cuda")


_platform_lowerings(dx_p, DX_TARGET, dx_xla, ())
_platform_lowerings(dvalues_p, DVALUES_TARGET, dvalues_xla, ("has_sel",))
