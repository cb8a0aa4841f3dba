"""The L-layer MoE stack shared by bench_stack.py (time) and bench_memory.py (memory).

One forward: ``x <- x + layer_i(x)`` for i < L (residual, no norm), each layer with its
own weights, jitted as one program. Paths (the same routing and the same weights):

  samoyeds             sj.moe on SparseWeights
  xla_ragged_dot       sj.moe_dense (the dense twin: jax.lax.ragged_dot) on the decoded weights
  xla_capacity_einsum  GShard capacity-factor einsums (benchmarks/_baselines.py) on the
                       decoded weights; drops tokens over capacity

Every layer runs inside ``jax.named_scope("layer{i}")`` and a per-path scope (SCOPES), so
profiles and HLO op names read e.g. ``layer2/samoyeds_moe/.../samoyeds_ragged_dot``.

The flags common to both scripts are defined here once (absl refuses a flag defined by two
modules, and the smoke test imports both scripts into one process).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import app, flags

import samoyeds_jax as sj
from samoyeds_jax import _cli
from samoyeds_jax.config import MoEConfig
from samoyeds_jax.presets import preset_config

from _baselines import moe_capacity
from _weights import pruned_sparse_layer, random_sparse_layer

FLAGS = flags.FLAGS
_cli.define_preset_flag("mixtral-8x7b")
flags.DEFINE_integer("layers", 4, "MoE layers in the stack, each with its own weights")
_cli.define_sparsity_flags()
_cli.define_dtype_flag()
flags.DEFINE_list("paths", ["samoyeds", "xla_ragged_dot", "xla_capacity_einsum"],
                  "which paths (samoyeds, xla_ragged_dot, xla_capacity_einsum)")
flags.DEFINE_float("capacity_factor", 1.25, "capacity factor of xla_capacity_einsum")
flags.DEFINE_integer("seed", 0, "PRNG seed")
flags.DEFINE_string("json_out", "", "write results as JSON here")
flags.DEFINE_string("csv_out", "", "write results as CSV here")

SPARSE_PATH = "samoyeds"
DENSE_PATHS = ("xla_ragged_dot", "xla_capacity_einsum")
SCOPES = {"samoyeds": "samoyeds_moe", "xla_ragged_dot": "dense_ragged_dot_moe",
          "xla_capacity_einsum": "dense_capacity_einsum_moe"}


def check_paths() -> None:
    unknown = set(FLAGS.paths) - set(SCOPES)
    if unknown:
        raise app.UsageError(f"unknown --paths {sorted(unknown)}; expected {list(SCOPES)}")


def config_from_flags() -> tuple[MoEConfig, jnp.dtype]:
    return preset_config(FLAGS.preset, _cli.sparsity_from_flags()), jnp.dtype(FLAGS.dtype)


def describe(cfg: MoEConfig, dtype: jnp.dtype) -> str:
    sp = cfg.sparsity
    shared = f" shared={cfg.num_shared_experts}x{cfg.d_ff_shared}" if cfg.has_shared else ""
    return (f"preset {FLAGS.preset}: d={cfg.d_model} f={cfg.d_ff} E={cfg.num_experts} "
            f"top-{cfg.top_k} {cfg.router}{shared}; {FLAGS.layers} layers; "
            f"{sp.n}:{sp.v} L={sp.sub_row} {jnp.dtype(dtype).name}")


def tokens_per_expert(cfg: MoEConfig, tokens: int) -> float:
    return tokens * cfg.top_k / cfg.num_experts


# --- the stack -------------------------------------------------------------------------------

def stack_fn(path: str, cfg: MoEConfig, capacity_factor: float = 1.25) -> Callable:
    """jit(forward): (list of L layer param dicts, x [T, d]) -> (x_out [T, d], dropped int32).

    ``dropped`` counts the (token, choice) pairs over capacity (xla_capacity_einsum only)."""
    if path not in SCOPES:
        raise ValueError(f"unknown path {path!r}; expected one of {list(SCOPES)}")

    def layer(p: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if path == "samoyeds":
            return sj.moe(p, x, cfg), jnp.zeros((), jnp.int32)
        if path == "xla_ragged_dot":
            return sj.moe_dense(p, x, cfg), jnp.zeros((), jnp.int32)
        y, dropped = moe_capacity(p, x, cfg, capacity_factor)
        return y, dropped.astype(jnp.int32)

    def forward(params: list[dict], x: jax.Array) -> tuple[jax.Array, jax.Array]:
        dropped = jnp.zeros((), jnp.int32)
        for i, p in enumerate(params):
            with jax.named_scope(f"layer{i}"):
                with jax.named_scope(SCOPES[path]):
                    y, d = layer(p, x)
                x = x + y
                dropped = dropped + d
        return x, dropped

    return jax.jit(forward)


# --- weights ---------------------------------------------------------------------------------

def sparse_layers(cfg: MoEConfig, dtype, layers: int, seed: int, kind: str = "random"
                  ) -> list[dict]:
    """``layers`` sparse layers, each from its own key ("random" or "pruned" weights)."""
    make = random_sparse_layer if kind == "random" else pruned_sparse_layer
    # RBG keys (XLA's RngBitGenerator) compile ~3x faster than threefry on XLA:CPU.
    base = jax.random.key(seed, impl="rbg" if kind == "random" else None)
    return [make(jax.random.fold_in(base, i), cfg, dtype) for i in range(layers)]


def abstract_layers(cfg: MoEConfig, dtype, layers: int, sparse: bool) -> list[dict]:
    """ShapeDtypeStruct trees of ``layers`` layers; nothing is allocated.

    sj.sparsify_moe cannot run under jax.eval_shape (sj.encode is host numpy: np.asarray of
    a tracer raises), so the sparse tree is eval_shape of random_sparse_layer, which builds
    the documented encoded shapes (tests/test_benchmarks.py checks it against the real
    sparsify_moe output)."""
    key = jax.random.key(0)
    if sparse:
        one = jax.eval_shape(functools.partial(random_sparse_layer, cfg=cfg, dtype=dtype), key)
    else:
        one = jax.eval_shape(functools.partial(sj.init_dense_moe, cfg=cfg, dtype=dtype), key)
    return [one] * layers


def weight_bytes(layers: list[dict]) -> int:
    return sum(sj.moe_param_bytes(p) for p in layers)


# --- compiled programs -------------------------------------------------------------------

def memory_bytes(compiled: Any) -> dict[str, int]:
    """Bytes a compiled program needs on its device: arguments (weights, x) + outputs +
    temporaries - aliased (donated) bytes; from XLA's buffer assignment, nothing runs."""
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError("this backend's compiled executables report no memory_analysis()")
    out = dict(argument=ma.argument_size_in_bytes, output=ma.output_size_in_bytes,
               temp=ma.temp_size_in_bytes, alias=ma.alias_size_in_bytes)
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]*)"')


def op_names(compiled: Any) -> dict[str, str]:
    """HLO instruction name -> op_name metadata (the jax.named_scope path) of a compiled
    program; profiler events name the instruction they ran (``hlo_op``)."""
    out = {}
    for line in compiled.as_text().splitlines():
        m = _INSTR.match(line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


# Kernel or HLO names of the sparse custom call (CUDA kernel RaggedDot*, HLO samoyeds_*).
SPARSE_KERNEL = re.compile(r"samoyeds|RaggedDot", re.IGNORECASE)


def time_by_scope(ops: list[tuple[str, str, str, float]], names: dict[str, str], runs: int
                  ) -> dict[str, float]:
    """Microseconds per run, per ``layer{i}/<path scope>`` (or ``layer{i}`` for the
    residual add, ``other`` when an op has no scope), plus ``sparse_kernels``: the
    samoyeds custom calls (sj.ragged_dot) across all layers. ``ops`` from
    _trace.device_ops: (device, kernel name, hlo_op, us)."""
    out: dict[str, float] = {}
    scope_re = re.compile(r"(layer\d+)(?:/(" + "|".join(SCOPES.values()) + r"))?")
    for _, name, hlo_op, dur in ops:
        op_name = names.get(hlo_op, "")
        m = scope_re.search(op_name)
        key = "/".join(g for g in m.groups() if g) if m else "other"
        out[key] = out.get(key, 0.0) + dur / runs
        if SPARSE_KERNEL.search(name) or SPARSE_KERNEL.search(hlo_op) \
                or op_name.endswith("samoyeds_ragged_dot"):
            out["sparse_kernels"] = out.get("sparse_kernels", 0.0) + dur / runs
    return dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
