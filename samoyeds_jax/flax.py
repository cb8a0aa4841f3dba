"""Flax modules for the sparse MoE layer (needs flax; ``import samoyeds_jax`` does not).

* :class:`SparseMoE` (``flax.nnx``): the router and the shared experts are ``nnx.Param``
  (trainable); the encoded routed experts are one variable per array: the kept values
  ``gate_up_values``, ``down_values`` are :class:`SparseValues` (an ``nnx.Param``:
  trainable with the pattern fixed, see :mod:`samoyeds_jax.backward`), the pattern
  ``gate_up_indices``, ``gate_up_metadata``, ``down_indices``, ``down_metadata`` are
  :class:`SparseParam` (not ``nnx.Param``, so ``nnx.grad``/optimizers leave them alone).
  The state is a plain pytree of arrays, so ``nnx.split``/``nnx.merge``, ``nnx.jit`` and
  orbax work unchanged. Fine-tuning (``param_dtype=jnp.float32`` keeps float32 master
  values, rounded to the encoded dtype in every call)::

      model = SparseMoE.from_dense(dense, cfg, param_dtype=jnp.float32)
      opt = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)
      grads = nnx.grad(loss_fn)(model)           # router, shared experts, kept values
      opt.update(model, grads)

  To train the router alone, ``wrt=nnx.All(nnx.Param, nnx.Not(SparseValues))``.
* :class:`DenseMoE` (``flax.nnx``): the dense twin (``sj.moe_dense``) with the same
  parameter names as the dense dict; ``.to_sparse()`` swaps it for a :class:`SparseMoE`.
* :class:`SparseMoELinen` (``flax.linen``): router/shared experts in ``"params"``, the
  encoded arrays in the ``"sparse"`` collection (``jax.grad`` w.r.t. its ``*_values``
  entries works like w.r.t. any SparseWeight's values).

Encoding runs on the host (``sj.sparsify_moe``), so modules that draw random weights must
be built eagerly: not under ``jax.jit``/``nnx.jit``/``eval_shape``. For an abstract module
(e.g. as an orbax restore target) use :meth:`SparseMoE.empty` (cheap, works under
``nnx.eval_shape``).

Orbax round trip::

    graphdef, state = nnx.split(model)
    ocp.StandardCheckpointer().save(path, state)
    abstract = nnx.eval_shape(lambda: SparseMoE.empty(cfg, jnp.bfloat16))
    graphdef, abstract_state = nnx.split(abstract)
    model = nnx.merge(graphdef, ocp.StandardCheckpointer().restore(path, abstract_state))
    model.validate()        # restored arrays come from a file: check their format once
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from samoyeds_jax import layout
from samoyeds_jax.format import SPARSE_PARTS as _PARTS
from samoyeds_jax.format import SparseWeight, _check_pattern, encode, validate
from samoyeds_jax.moe import (
    MoEConfig, _check_dense, _check_sparse, init_dense_moe, moe, moe_dense, sparsify_moe)

__all__ = ["DenseMoE", "SparseMoE", "SparseMoELinen", "SparseParam", "SparseValues"]

_SPARSE_KEYS = layout.SPARSE_EXPERT_KEYS


class SparseParam(nnx.Variable):
    """One array of an encoded expert weight's pattern (sub-row indices, metadata); not
    trainable."""


class SparseValues(nnx.Param):
    """The kept values of an encoded expert weight: trainable (an ``nnx.Param``) with the
    pattern fixed."""


def _dense_names(cfg: MoEConfig) -> list[str]:
    """The dense (trainable) parameters: router and shared experts."""
    return [p.key for p in layout.replicated(cfg)]


def _sparse_names() -> list[str]:
    return [f"{key}_{part}" for key in _SPARSE_KEYS for part in _PARTS]


def _split(params: dict, cfg: MoEConfig) -> tuple[dict, dict]:
    """sj.moe params -> (dense arrays by name, encoded arrays by '<weight>_<part>')."""
    dense = {name: params[name] for name in _dense_names(cfg)}
    sparse = {f"{key}_{part}": getattr(params[key], part)
              for key in _SPARSE_KEYS for part in _PARTS}
    return dense, sparse


def _join(dense: dict, sparse: dict, cfg: MoEConfig) -> dict:
    """The inverse of :func:`_split`: the params dict of :func:`samoyeds_jax.moe`."""
    out = dict(dense)
    for key in _SPARSE_KEYS:
        # Checked where the arrays entered the module (_check_params), not on every call.
        out[key] = SparseWeight.unchecked(*(sparse[f"{key}_{part}"] for part in _PARTS),
                                          cfg.sparsity)
    return out


def _check_params(params: Any, cfg: MoEConfig) -> None:
    """The layout's keys and shapes, and every encoded weight's format
    (:func:`samoyeds_jax.validate`, on the arrays whose values exist): the module's
    kernels then never see a weight that ``decode`` and the gradient would read otherwise.
    Runs once, where parameters enter a module, not in ``__call__``."""
    _check_sparse(params, cfg)
    for key in _SPARSE_KEYS:
        sw = params[key]
        _check_pattern(sw, f"params[{key!r}]", known_only=True)


def _refuse_traced(key: Any, where: str) -> None:
    if isinstance(key, jax.core.Tracer):
        raise RuntimeError(
            f"{where} encodes its sparse weights on the host and cannot draw them under "
            f"jax.jit / nnx.jit / eval_shape. Build it eagerly, or use "
            f"SparseMoE.empty(cfg, dtype) (works under nnx.eval_shape) as a restore target.")


def _placeholder_params(cfg: MoEConfig, dtype: Any) -> dict:
    """Zero weights with the exact shapes/dtypes of sparsify_moe's output (one expert's
    all-zero weight encoded on the host and broadcast over the expert axis)."""
    dtype = jnp.dtype(dtype)

    def zero_sw(e, k, m):
        sw = encode(np.zeros((k, m), dtype), cfg.sparsity)
        return SparseWeight.unchecked(
            *(jnp.broadcast_to(getattr(sw, p), (e, *getattr(sw, p).shape)) for p in _PARTS),
            cfg.sparsity)

    return {p.key: zero_sw(*p.shape(cfg)) if p.sparse else jnp.zeros(p.shape(cfg), dtype)
            for p in layout.params(cfg, sparse=True)}


class SparseMoE(nnx.Module):
    """The sparse MoE layer as an ``nnx.Module``: ``y = sj.moe(params, x, cfg)``.

    Args:
      cfg: the layer (static).
      rngs: draws random dense weights (``sj.init_dense_moe``) that are then pruned and
        encoded; ignored when ``params`` is given.
      dtype: parameter dtype (bfloat16 or float16).
      params: ready sparse parameters (``sj.sparsify_moe`` output) instead of random ones.
      progress: tqdm progress bar while encoding.
      param_dtype: dtype of the kept values held by the module (default: the encoded
        dtype). ``jnp.float32`` keeps float32 master values for training; every call
        rounds them to the encoded dtype, which the kernels read.

    ``__call__(x [..., d_model]) -> [..., d_model]`` in x's dtype.
    """

    def __init__(self, cfg: MoEConfig, rngs: nnx.Rngs | None = None, *,
                 dtype: Any = jnp.bfloat16, params: dict | None = None,
                 progress: bool = False, param_dtype: Any = None):
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        if params is None:
            if rngs is None:
                raise ValueError("SparseMoE needs rngs (random weights) or params "
                                 "(sj.sparsify_moe output); see also SparseMoE.from_dense")
            key = rngs.params()
            _refuse_traced(key, "SparseMoE(cfg, rngs)")
            params = sparsify_moe(init_dense_moe(key, cfg, dtype), cfg, progress=progress)
        _check_params(params, cfg)
        self.cfg = cfg
        # The dtype the kernels read (the module may hold the values in another).
        self.dtype = jnp.dtype(params[_SPARSE_KEYS[0]].dtype)
        dense, sparse = _split(params, cfg)
        for name, value in dense.items():
            setattr(self, name, nnx.Param(value))
        for name, value in sparse.items():
            if name.endswith("_values"):
                value = value if param_dtype is None else value.astype(param_dtype)
                setattr(self, name, SparseValues(value))
            else:
                setattr(self, name, SparseParam(value))

    @classmethod
    def from_dense(cls, dense: "dict | DenseMoE", cfg: MoEConfig | None = None, *,
                   progress: bool = False, param_dtype: Any = None) -> "SparseMoE":
        """Prune and encode dense parameters (a dict or a :class:`DenseMoE`; already
        pruned ones, e.g. from ``sj.calibrate_moe``, keep their pattern)."""
        if isinstance(dense, DenseMoE):
            cfg = dense.cfg if cfg is None else cfg
            dense = dense.params()
        if cfg is None:
            raise ValueError("SparseMoE.from_dense(dict, cfg): cfg is required for a dict")
        return cls(cfg, params=sparsify_moe(dense, cfg, progress=progress),
                   param_dtype=param_dtype)

    @classmethod
    def empty(cls, cfg: MoEConfig, dtype: Any = jnp.bfloat16,
              param_dtype: Any = None) -> "SparseMoE":
        """A module with zero weights of the right shapes: an orbax restore target (cheap;
        works under ``nnx.eval_shape``)."""
        return cls(cfg, params=_placeholder_params(cfg, dtype), param_dtype=param_dtype)

    def validate(self) -> "SparseMoE":
        """Check the encoded weights (:func:`samoyeds_jax.validate`) and return the module.

        The constructor checks its ``params``; call this after filling a module by other
        means, e.g. ``nnx.merge`` of a state restored by orbax (the state's arrays come
        from a file)."""
        params = self.params()
        for key in _SPARSE_KEYS:
            validate(params[key], key)
        return self

    def params(self) -> dict:
        """The parameter dict of :func:`samoyeds_jax.moe` (SparseWeights rebuilt)."""
        dense = {name: getattr(self, name)[...] for name in _dense_names(self.cfg)}
        sparse = {name: getattr(self, name)[...] for name in _sparse_names()}
        sparse = {name: a.astype(self.dtype) if name.endswith("_values") else a
                  for name, a in sparse.items()}
        return _join(dense, sparse, self.cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        return moe(self.params(), x, self.cfg)


class DenseMoE(nnx.Module):
    """The dense twin as an ``nnx.Module``: ``y = sj.moe_dense(params, x, cfg)``; every
    weight (``router``, ``gate``, ``up``, ``down``, ``shared_*``) is an ``nnx.Param``.

    Args:
      cfg: the layer; rngs: random init (``sj.init_dense_moe``); dtype: parameter dtype;
      params: a ready dense dict instead (e.g. ``sj.prune_moe(dense, cfg)``).
    """

    def __init__(self, cfg: MoEConfig, rngs: nnx.Rngs | None = None, *,
                 dtype: Any = jnp.bfloat16, params: dict | None = None):
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        if params is None:
            if rngs is None:
                raise ValueError("DenseMoE needs rngs (random weights) or params")
            params = init_dense_moe(rngs.params(), cfg, dtype)
        _check_dense(params, cfg)
        self.cfg = cfg
        for name in self._names():
            setattr(self, name, nnx.Param(params[name]))

    def _names(self) -> list[str]:
        return _dense_names(self.cfg) + list(layout.EXPERT_KEYS)

    def params(self) -> dict:
        return {name: getattr(self, name)[...] for name in self._names()}

    def to_sparse(self, progress: bool = False, param_dtype: Any = None) -> SparseMoE:
        """This layer pruned and encoded (call eagerly, outside jit)."""
        return SparseMoE.from_dense(self.params(), self.cfg, progress=progress,
                                    param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return moe_dense(self.params(), x, self.cfg)


class SparseMoELinen(nn.Module):
    """The sparse MoE layer as a ``flax.linen`` module.

    Variables: ``"params"``: ``router`` (+ ``shared_*``), trainable; ``"sparse"``:
    ``gate_up_values``, ``gate_up_indices``, ``gate_up_metadata``, ``down_*``. ``init``
    draws dense weights with ``init_fn(key, cfg, dtype)`` (default ``sj.init_dense_moe``)
    and encodes them on the host: call ``model.init`` eagerly (not under ``jax.jit``).
    To start from existing dense weights use :meth:`variables_from_dense`.

    Attributes:
      cfg: the layer. dtype: parameter dtype. init_fn: dense initialiser.
    """

    cfg: MoEConfig
    dtype: Any = jnp.bfloat16
    init_fn: Callable[[jax.Array, MoEConfig, Any], dict] = init_dense_moe

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        made: dict[str, tuple[dict, dict]] = {}

        def build(key=None):
            if "p" not in made:
                _refuse_traced(key, "SparseMoELinen.init")
                dense = self.init_fn(key, cfg, self.dtype)
                made["p"] = _split(sparsify_moe(dense, cfg), cfg)
            return made["p"]

        if not self.is_initializing():
            # Read the variables (self.param would trace the initialiser to check shapes).
            dense = {name: self.get_variable("params", name) for name in _dense_names(cfg)}
            sparse = {name: self.get_variable("sparse", name) for name in _sparse_names()}
            missing = [n for n, v in {**dense, **sparse}.items() if v is None]
            if missing:
                raise ValueError(f"SparseMoELinen.apply: variables {missing} are missing; "
                                 f"pass {{'params': ..., 'sparse': ...}} from init or "
                                 f"SparseMoELinen.variables_from_dense")
            return moe(_join(dense, sparse, cfg), x, cfg)
        # The router is created first: its init key seeds the whole layer's dense init.
        dense = {"router": self.param("router", lambda key: build(key)[0]["router"])}
        for name in _dense_names(cfg)[1:]:
            dense[name] = self.param(name, lambda _, n=name: build()[0][n])
        sparse = {name: self.variable("sparse", name, lambda n=name: build()[1][n]).value
                  for name in _sparse_names()}
        return moe(_join(dense, sparse, cfg), x, cfg)

    @staticmethod
    def variables_from_dense(dense: dict, cfg: MoEConfig, progress: bool = False) -> dict:
        """``{"params": ..., "sparse": ...}`` for ``apply``, from dense parameters."""
        return SparseMoELinen.variables_from_sparse(
            sparsify_moe(dense, cfg, progress=progress), cfg)

    @staticmethod
    def variables_from_sparse(params: dict, cfg: MoEConfig) -> dict:
        """``{"params": ..., "sparse": ...}`` for ``apply``, from ``sj.sparsify_moe``
        output."""
        _check_params(params, cfg)
        dense, sparse = _split(params, cfg)
        return {"params": dense, "sparse": sparse}
