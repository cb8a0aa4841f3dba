"""The sparse matmul primitive: shape rules, per-platform lowering, vmap and autodiff.

One primitive, ``samoyeds_ragged_dot``, backs :func:`dot` and :func:`ragged_dot`: ``cpu``
lowers to the C++ handler, ``cuda`` to the CUDA handler (both XLA FFI custom calls from
the ``_samoyeds`` module). Two modules build on it and register their rules on it when
the package is imported (``samoyeds_jax/__init__.py``): :mod:`samoyeds_jax.backward`,
its autodiff rules and the backward primitives (gradients w.r.t. x and the kept values),
and :mod:`samoyeds_jax.partitioning`, the lowering under jit (one call per device on
sharded operands).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from samoyeds_jax import _samoyeds
from samoyeds_jax._util import inverse_permutation
from samoyeds_jax.format import (
    INDICES_DTYPE, KEPT_PER_GROUP, METADATA_DTYPE, SUPPORTED_DTYPES, SparseWeight,
    SparsityConfig)

TARGET = "samoyeds_ragged_dot"
# The kernels' sizes, offsets and routing entries are int32.
_INT32 = np.iinfo(np.int32)

for _name, _capsule in _samoyeds.cpu_targets().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
for _name, _capsule in _samoyeds.cuda_targets().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")

ragged_dot_p = Primitive(TARGET)


def _shape_str(aval) -> str:
    return f"{jnp.dtype(aval.dtype).name}{list(aval.shape)}"


# Fused GLU epilogues: name -> the handlers' code (ffi/glu.h); "" is none.
GLU_CODES: dict[str, int] = dict(_samoyeds.GLU_CODES)


# The CUDA kernels a call may force (ffi/kernel_choice.h): name -> the handler's code.
KERNEL_CODES: dict[str, int] = dict(_samoyeds.KERNEL_CODES)


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """Which CUDA kernel a call runs ("auto": chosen from shapes) and how many K splits
    it forces (0: chosen by the launcher). A static parameter of the primitive; the CPU
    handler ignores it. Set it with :func:`force_kernel` (tests and benchmarks)."""
    kernel: str = "auto"
    splits: int = 0

    def __post_init__(self):
        if self.kernel not in KERNEL_CODES:
            raise ValueError(f"kernel={self.kernel!r} must be one of {sorted(KERNEL_CODES)}")
        s = self.splits
        if not (isinstance(s, int) and 0 <= s <= _samoyeds.MAX_FORCED_SPLITS):
            raise ValueError(f"splits={s!r} must be 0 (automatic) or a count up to "
                             f"{_samoyeds.MAX_FORCED_SPLITS}")


_AUTO = KernelChoice()
_forced = threading.local()


@contextlib.contextmanager
def force_kernel(kernel: str = "auto", splits: int = 0) -> Iterator[KernelChoice]:
    """Calls traced inside run this CUDA kernel with this many K splits.

    For tests and benchmarks that compare the kernels on the same inputs; per call (it
    becomes a static parameter of the traced primitive), unlike a process-wide switch.
    ``kernel`` is ``"auto"``, ``"warp"``, ``"hopper"`` (sm_90a) or ``"stream"`` (sm_90a
    serving kernel); ``splits`` is 0 (automatic) or a count up to 8.
    """
    choice = KernelChoice(kernel, splits)
    previous = getattr(_forced, "choice", _AUTO)
    _forced.choice = choice
    try:
        yield choice
    finally:
        _forced.choice = previous


def _kernel_choice() -> KernelChoice:
    return getattr(_forced, "choice", _AUTO)


def _glu_act(g: jax.Array, glu: str) -> jax.Array:
    """The GLU activations of ffi/glu.h, in jnp (float32 in, float32 out)."""
    if glu == "silu":
        return jax.nn.silu(g)
    return jax.nn.gelu(g, approximate=False)


def _merged_halves(a: jax.core.ShapedArray) -> jax.core.ShapedArray:
    """``[E, 2, r, c]`` (gate and up stacked) as the ``[E, 2r, c]`` it views (the stacked
    form keeps each half's rows on the device of its columns when F is split)."""
    if a.ndim != 4:
        return a
    return jax.core.ShapedArray((a.shape[0], 2 * a.shape[2], a.shape[3]), a.dtype)


def _abstract_eval(x, values, indices, metadata, sel, group_sizes, *, config: SparsityConfig,
                   has_sel: bool, glu: str = "", kernel: KernelChoice = _AUTO):
    """Shape/dtype rules; every message names the argument and what was expected."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [T, K] (rows by in_features), got {_shape_str(x)}")
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be bfloat16 or float16, got {jnp.dtype(x.dtype).name}")
    if values.ndim == 4 and values.shape[1] == 2:
        values, indices, metadata = (_merged_halves(a) for a in (values, indices, metadata))
    if values.ndim != 3:
        raise ValueError(f"sw must have an expert axis [E, K, M] (or [E, 2, K, F]); "
                         f"its values are {_shape_str(values)}, expected [E, Mk, K/2]")
    if values.dtype != x.dtype:
        raise TypeError(f"x dtype {jnp.dtype(x.dtype).name} must match the weight dtype "
                        f"{jnp.dtype(values.dtype).name}")
    t, k = x.shape
    e, mk, half_k = values.shape
    if half_k * KEPT_PER_GROUP != k:
        raise ValueError(f"x has K={k} in_features but the weight has "
                         f"K={half_k * KEPT_PER_GROUP}")
    want = config.encoded_shapes(k, mk // config.n * config.v, (e,))
    for part, arr, dt in (("indices", indices, INDICES_DTYPE),
                          ("metadata", metadata, METADATA_DTYPE)):
        if arr.shape != want[part] or arr.dtype != dt:
            raise ValueError(f"sw.{part} must be {dt.name}{list(want[part])}, got "
                             f"{_shape_str(arr)}")
    if group_sizes.shape != (e,) or group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be int32[{e}] (one size per expert), got "
                         f"{_shape_str(group_sizes)}")
    if has_sel:
        if sel.ndim != 1 or sel.dtype != jnp.int32:
            raise ValueError(f"sel must be int32[R] (a token id per output row), got "
                             f"{_shape_str(sel)}")
        r = sel.shape[0]
    else:
        r = t
    m = mk // config.n * config.v
    if max(t, r, k, m) >= 2**31:
        raise ValueError(f"sizes T={t}, R={r}, K={k}, M={m} must each be below 2**31")
    if glu:
        if glu not in GLU_CODES:
            raise ValueError(f"glu={glu!r} must be one of {sorted(GLU_CODES)} or None")
        if m % (2 * config.m_multiple) != 0:
            raise ValueError(f"glu={glu!r} needs the weight's M={m} to be [gate | up] = 2F "
                             f"with F a multiple of {config.m_multiple} for {config}")
        m //= 2
    return jax.core.ShapedArray((r, m), x.dtype)


ragged_dot_p.def_abstract_eval(_abstract_eval)


@functools.lru_cache(maxsize=None)
def _jitted(prim: Primitive, params: tuple):
    return jax.jit(lambda *a: prim.bind(*a, **dict(params)))


def _def_eager_impl(prim: Primitive) -> None:
    """An eager call of ``prim`` compiles the one-primitive computation (its shape rule
    and lowering), once per set of parameters."""
    prim.def_impl(lambda *a, **params: _jitted(prim, tuple(sorted(params.items())))(*a))


def _ffi_attrs(config: SparsityConfig, **more: int) -> dict:
    """The FFI attributes of a weight's pattern (format.h's n, v, sub_row) and ``more``,
    all int64 as the handlers bind them."""
    return dict(n=np.int64(config.n), v=np.int64(config.v),
                sub_row=np.int64(config.sub_row), **{k: np.int64(v) for k, v in more.items()})


_def_eager_impl(ragged_dot_p)


def _lowering(ctx, *args, config: SparsityConfig, has_sel: bool, glu: str = "",
              kernel: KernelChoice = _AUTO):
    return jax.ffi.ffi_lowering(TARGET)(
        ctx, *args, **_ffi_attrs(config, has_sel=has_sel, glu=GLU_CODES.get(glu, 0),
                                 kernel=KERNEL_CODES[kernel.kernel], splits=kernel.splits))


def _no_cuda_lowering(ctx, *args, **params):
    raise RuntimeError(
        "samoyeds_jax was built without its CUDA kernels; reinstall with nvcc on the PATH "
        "(SAMOYEDS_CUDA=ON makes a missing CUDA compiler a build error)")


mlir.register_lowering(ragged_dot_p, _lowering, platform="cpu")
mlir.register_lowering(ragged_dot_p, _lowering if _samoyeds.HAS_CUDA else _no_cuda_lowering,
                       platform="cuda")


# --- vmap ------------------------------------------------------------------------------

def _at_front(a, d, size):
    """`a` with its batch axis `d` first, broadcast to `size` when unbatched (d None)."""
    if d is None:
        return jnp.broadcast_to(a, (size, *a.shape))
    return jnp.moveaxis(a, d, 0)


def _clip_sizes(gs: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """The kernels' in-bounds reading of group sizes ``gs [..., E]`` for ``rows`` output
    rows (ffi/cuda/schedule.cuh, FindWork): a negative size counts as 0 and each range is
    clipped to the rows left. Returns ``(start, end) [..., E]`` int32, ``end <= rows``.

    Overflow-free for any int32 sizes: the running end saturates at ``rows`` < 2**31, so
    each partial sum is below 2**32 in uint32.
    """
    c = jnp.clip(gs, 0, rows).astype(jnp.uint32)
    end = jax.lax.associative_scan(lambda a, b: jnp.minimum(a + b, jnp.uint32(rows)), c,
                                   axis=-1).astype(jnp.int32)
    start = jnp.concatenate([jnp.zeros_like(end[..., :1]), end[..., :-1]], axis=-1)
    return start, end


def _refused_sizes(gs: jax.Array, rows: int) -> jax.Array:
    """``[...]`` bool: the CPU handler refuses these group sizes ``[..., E]`` (a negative
    size, or a sum past ``rows``), computed without summing (no overflow)."""
    start, _ = _clip_sizes(gs, rows)
    return jnp.any((gs < 0) | (gs > rows - start), axis=-1)


def _batch(args, dims, *, config: SparsityConfig, has_sel: bool, glu: str = "",
           kernel: KernelChoice = _AUTO):
    """vmap: the batched call is the loop of unbatched calls, refusals included.

    A batched weight runs one call per member. Otherwise the batch is folded into one call
    over the members' rows, sorted by expert. Each member keeps its own contract there:
    its rows are placed by its own group sizes read as the CUDA kernels read them (negative
    counts as 0, ranges clipped to its R rows), and a ``sel`` entry outside its own
    ``[0, T)`` becomes -1, outside every member's tokens (the CPU handler refuses it; the
    CUDA kernels read it as a zero row, as for the member alone). When a member's group
    sizes are ones the CPU handler refuses, one extra row with sel -1 joins expert 0's
    group, so the folded call is refused too (on CUDA that row is zero and dropped).
    """
    x, values, indices, metadata, sel, gs = args
    xd, vd, idd, md, sd, gd = dims
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    t = x.shape[0] if xd is None else x.shape[1 if xd == 0 else 0]          # member's T
    r = (sel.shape[1 if sd == 0 else 0] if has_sel else t)                 # member's R
    folded_t = t if xd is None else size * t
    if any(d is not None for d in (vd, idd, md)) or max(folded_t, size * r + 1) > _INT32.max:
        # One call per member: a batched weight (rare: scan slices stacked layers instead),
        # or a batch whose folded rows or tokens would not fit the kernels' int32 sizes.
        moved = [_at_front(a, d, size) for a, d in zip(args, dims)]
        out = jax.lax.map(
            lambda a: ragged_dot_p.bind(*a, config=config, has_sel=has_sel, glu=glu,
                                        kernel=kernel),
            tuple(moved))
        return out, 0
    e = values.shape[0]
    gs = _at_front(gs, gd, size)                              # [B, E]
    if xd is None:
        x_flat, tok_off = x, jnp.zeros((size, 1), jnp.int32)
    else:
        xb = _at_front(x, xd, size)                           # [B, T, K]
        x_flat = xb.reshape(folded_t, xb.shape[2])
        tok_off = (jnp.arange(size, dtype=jnp.int32) * t)[:, None]
    if has_sel:
        s = _at_front(sel, sd, size)                          # [B, R]
    else:
        s = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (size, t))
    # A member's token outside its own [0, T) is -1 in the folded call, never another
    # member's token (the offset sum is only kept where it cannot overflow).
    src = jnp.where((s >= 0) & (s < t), s + tok_off, -1)
    _, end = _clip_sizes(gs, r)
    row = jnp.arange(r, dtype=jnp.int32)
    expert = jax.vmap(lambda en: jnp.searchsorted(en, row, side="right"))(end)  # [B, R], E: none
    expert = expert.astype(jnp.int32).reshape(-1)
    gs_all = jnp.zeros((e + 1,), jnp.int32).at[expert].add(1)[:e]
    # The extra row: first and in expert 0's group when a member's sizes are refused,
    # else last and in no group (never read).
    refused = jnp.any(_refused_sizes(gs, r)) if e else jnp.zeros((), bool)
    key = jnp.concatenate([expert, jnp.where(refused, -1, e + 1)[None]])
    perm = jnp.argsort(key, stable=True)                      # by expert, then member, row
    if e:
        gs_all = gs_all.at[0].add(refused.astype(jnp.int32))
    folded_sel = jnp.concatenate([src.reshape(-1), jnp.full((1,), -1, jnp.int32)])[perm]
    y = ragged_dot_p.bind(x_flat, values, indices, metadata, folded_sel, gs_all,
                          config=config, has_sel=True, glu=glu, kernel=kernel)
    y = y[inverse_permutation(perm)][:size * r]
    return y.reshape(size, r, y.shape[-1]), 0


batching.primitive_batchers[ragged_dot_p] = _batch


# --- public API ------------------------------------------------------------------------

def _check_sw(sw: Any, expert_axis: bool, glu: str | None = None) -> None:
    if not isinstance(sw, SparseWeight):
        raise TypeError(f"sw must be a SparseWeight (from sj.encode), got {type(sw).__name__}")
    want = 3 if expert_axis else 2
    if expert_axis and sw.ndim == 4 and sw.shape[1] == 2 and glu:
        return  # [E, 2, K, F]: gate and up stacked
    if sw.ndim != want:
        raise ValueError(
            f"sw must be {'[E, K, M] (with an expert axis)' if expert_axis else '[K, M] (no expert axis)'}"
            f", got shape {sw.shape}")


def _fits_int32(dtype: np.dtype) -> bool:
    info = np.iinfo(dtype)
    return info.min >= _INT32.min and info.max <= _INT32.max


def _routing_array(a: Any, name: str) -> Any:
    """A routing array (``group_sizes``, ``sel``) as int32, checked rather than cast.

    int32 passes as it is. Another integer dtype is converted only when its values are
    known to fit: always for a dtype no wider than int32 (int8, uint16, ...), and for a
    wider one (int64, uint32, ...) only on concrete values, each checked; traced (under
    jit, vmap, grad) a wider dtype is refused at trace time, since its values are not
    known. Other dtypes pass unchanged for the shape rule to name.
    """
    if not isinstance(a, jax.Array):             # jax.Array includes tracers
        a = np.asarray(a)
        if a.dtype == object:                    # e.g. Python ints past int64
            raise TypeError(f"{name} must be an int32 array, got values of no integer "
                            f"dtype ({a.reshape(-1)[:3].tolist()}...)")
    dtype = np.dtype(a.dtype)
    if dtype == np.int32 or not np.issubdtype(dtype, np.integer):
        return jnp.asarray(a)                    # the shape rule names a wrong dtype
    if _fits_int32(dtype):
        return jnp.asarray(a).astype(jnp.int32)
    if isinstance(a, jax.core.Tracer):
        raise TypeError(
            f"{name} is a traced {dtype.name} array: its values are not known here (under "
            f"jit, vmap or grad), so they cannot be checked to fit int32; pass int32 "
            f"(e.g. {name}.astype(jnp.int32) where the values are known to fit)")
    host = np.asarray(a)
    outside = host > _INT32.max
    if dtype.kind == "i":
        outside |= host < _INT32.min
    if outside.any():
        at = tuple(int(i) for i in np.argwhere(outside)[0])
        raise ValueError(f"{name}{list(at)} = {int(host[at])} does not fit int32 ({name} "
                         f"must be int32; a {dtype.name} array is accepted only when every "
                         f"value fits)")
    return jnp.asarray(host.astype(np.int32))


def ragged_dot(x: jax.Array, sw: SparseWeight, group_sizes: jax.Array,
               sel: jax.Array | None = None, *, glu: str | None = None) -> jax.Array:
    """Grouped matmul with a sparse expert weight, mirroring ``jax.lax.ragged_dot``.

    Args:
      x: ``[R, K]`` rows already grouped by expert (``sel=None``), or ``[T, K]`` tokens
        gathered through ``sel``; bfloat16 or float16, the weight's dtype.
      sw: SparseWeight ``[E, K, M]``; with ``glu`` also ``[E, 2, K, F]``: gate and up
        stacked (``sw[:, 0]`` gate, ``sw[:, 1]`` up), the same product as their
        ``[E, K, 2F]`` concatenation, in the form whose F axis can be sharded
        (:mod:`samoyeds_jax.partitioning`).
      group_sizes: int32 ``[E]`` on the device (never read on the host): expert e owns
        rows ``offset[e] <= r < offset[e+1]`` (exclusive cumsum).
      sel: optional int32 ``[R]``: output row r uses token ``x[sel[r]]`` (SEL, the
        activation side of the dual-side format).
      glu: optional ``"silu"`` (SwiGLU) or ``"gelu"`` (GeGLU, exact erf): a gated linear
        unit fused into the kernel's epilogue. The weight's M = 2F outputs are
        ``concat([gate, up])`` (as ``sj.sparsify_moe`` stores ``gate_up``) and the result
        is ``act(x @ gate) * (x @ up)``, computed in float32 from the accumulators and
        rounded once; F must be a multiple of the config's ``m_multiple``.
    Returns:
      ``[R, M]`` (``[R, M/2]`` with ``glu``) in x's dtype, rows in SEL order; rows at or
      past ``sum(group_sizes)`` are zero. Accumulation is float32. Differentiable w.r.t.
      ``x`` and ``sw.values`` (the pattern, ``sw.indices`` and ``sw.metadata``, is fixed).
    """
    _check_sw(sw, expert_axis=True, glu=glu)
    x = jnp.asarray(x)
    group_sizes = _routing_array(group_sizes, "group_sizes")
    if sel is None:
        sel_arr, has_sel = jnp.zeros((0,), jnp.int32), False
    else:
        sel_arr, has_sel = _routing_array(sel, "sel"), True
    if glu is not None and glu not in GLU_CODES:
        raise ValueError(f"glu={glu!r} must be one of {sorted(GLU_CODES)} or None")
    return ragged_dot_p.bind(x, sw.values, sw.indices, sw.metadata, sel_arr, group_sizes,
                             config=sw.config, has_sel=has_sel, glu=glu or "",
                             kernel=_kernel_choice())


def dot(x: jax.Array, sw: SparseWeight, *, glu: str | None = None) -> jax.Array:
    """``x @ W`` for one sparse weight.

    Args:
      x: ``[..., K]`` bfloat16 or float16.
      sw: SparseWeight ``[K, M]`` (no expert axis).
      glu: optional fused gated linear unit, as in :func:`ragged_dot`.
    Returns:
      ``[..., M]`` (``[..., M/2]`` with ``glu``) in x's dtype (float32 accumulation).
    """
    _check_sw(sw, expert_axis=False)
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != sw.shape[0]:
        raise ValueError(f"x must be [..., K] with K={sw.shape[0]}, got shape {x.shape}")
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    expert = SparseWeight.unchecked(sw.values[None], sw.indices[None], sw.metadata[None],
                                  sw.config)
    y = ragged_dot(rows, expert, jnp.full((1,), rows.shape[0], jnp.int32), glu=glu)
    return y.reshape(*lead, y.shape[-1])
