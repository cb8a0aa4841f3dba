"""The conversion: a Hugging Face MoE checkpoint in, one converted safetensors file out.

Layer by layer (peak memory about one MoE layer): the routed experts are read, transposed
to ``[E, in, out]``, cast to the sparse dtype, pruned (magnitude, or
:func:`~samoyeds_jax.calibrate_moe` where calibration inputs exist) and encoded
(:func:`samoyeds_jax.moe.encode_experts`, the loop of ``sj.sparsify_moe``); every other
tensor is copied byte for byte.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from samoyeds_jax import layout
from samoyeds_jax._util import parse_nv
from samoyeds_jax._util import progress as _progress
from samoyeds_jax.calibrate import calibrate_moe
from samoyeds_jax.checkpoint import hf
from samoyeds_jax.checkpoint.calibration import Calibration
from samoyeds_jax.checkpoint.publish import atomic_output, check_output, stop_on_signals
from samoyeds_jax.checkpoint.safetensors_io import NP_TO_ST, ST_DTYPES, Entry, Reader, Writer
from samoyeds_jax.checkpoint.safetensors_io import nbytes as _nbytes
from samoyeds_jax.checkpoint.schema import (
    CHECKSUMS, FORMAT, FORMAT_VERSION, SPARSE_PARTS, ConversionError, layer_prefix)
from samoyeds_jax.checkpoint.summary import print_summary
from samoyeds_jax.config import MoEConfig
from samoyeds_jax.format import INDICES_DTYPE, METADATA_DTYPE, SparsityConfig
from samoyeds_jax.moe import EXPERT_KEYS, encode_experts

DTYPES = ("auto", "bfloat16", "float16")


def convert(input_path: str, output_path: str, pattern: str = "1:2", sub_row: int = 128,
            calibration: str | None = None, top_k: int | None = None,
            dtype: str = "auto", damp: float = 0.01, block: int | None = None,
            progress: bool = True, verbose: bool = True) -> dict:
    """Convert a Hugging Face MoE safetensors checkpoint (see :mod:`samoyeds_jax.checkpoint`).

    Args:
      input_path: directory, index JSON or ``.safetensors`` file.
      output_path: the output ``.safetensors`` file (must not exist; its directory must).
      pattern: ``"N:V"``; sub_row: L.
      calibration: optional calibration file (``layers.{i}.inputs [n, d_model]``).
      top_k: experts per token (default: ``num_experts_per_tok`` of config.json).
      dtype: sparse value dtype: ``"auto"`` (the checkpoint's bf16/fp16, else bfloat16),
        ``"bfloat16"`` or ``"float16"``.
      damp, block: calibrated pruning (:func:`samoyeds_jax.calibrate.prune_calibrated`).
      progress: tqdm bar over layers; verbose: print the summary.
    Returns:
      a summary dict (layers, bytes before/after, seconds, per-layer calibration reports).
    Raises:
      ConversionError (a ValueError) with a clear message naming the file (and the
      tensor); nothing is left behind. SIGINT, SIGTERM and SIGHUP (in the main thread)
      stop the conversion with :class:`~samoyeds_jax.checkpoint.publish.Interrupted` (a
      KeyboardInterrupt), the partial output removed.
    """
    with stop_on_signals():
        return _convert(input_path, output_path, pattern, sub_row, calibration, top_k, dtype,
                        damp, block, progress, verbose)


def _convert(input_path, output_path, pattern, sub_row, calibration, top_k, dtype, damp,
             block, progress, verbose) -> dict:
    import ml_dtypes

    t0 = time.perf_counter()
    output_path = os.fspath(output_path)
    check_output(output_path)
    try:
        n, v = parse_nv(pattern, "pattern")
        sp = SparsityConfig(n, v, int(sub_row))
    except (TypeError, ValueError) as err:
        raise ConversionError(str(err)) from None
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be auto, bfloat16 or float16, got {dtype!r}")

    with Reader() as reader:
        entries, cfg_dir = hf.index_source(os.fspath(input_path), reader)
        plan = hf.detect(entries)
        hf_cfg = hf.read_config(cfg_dir, reader)
        if dtype == "auto":
            dtype = {"BF16": "bfloat16", "F16": "float16"}.get(plan.src_dtype, "bfloat16")
        if plan.src_dtype not in ("BF16", "F16", "F32", "F64"):
            raise ConversionError(f"expert weights are {plan.src_dtype}; only BF16, F16, F32 "
                                  f"and F64 checkpoints can be converted")
        vdtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
        moe_info = hf.moe_info(plan, hf_cfg, top_k)
        try:  # the format's shape rules, with a message naming the layer's shapes
            cfg = MoEConfig(**{**moe_info, "top_k": moe_info["top_k"] or 1}, sparsity=sp)
        except (ValueError, TypeError) as err:
            raise ConversionError(f"{plan.layers[0].experts['gate'][0]} (d_model="
                                  f"{plan.d_model}, d_ff={plan.d_ff}): {err}") from None
        calib = None
        if calibration is not None:
            if moe_info["top_k"] is None:
                raise ConversionError("calibrated pruning routes the calibration inputs and "
                                      "needs top_k: pass --top_k (no num_experts_per_tok in a "
                                      "config.json next to the input)")
            calib = Calibration(os.fspath(calibration), [l.index for l in plan.layers],
                                plan.d_model, reader)

        # The output's tensors, in file order: each layer's sparse experts, then everything
        # that is not a routed expert weight (unchanged).
        expert_names = {n for l in plan.layers for names in l.experts.values() for n in names}
        sparse = [(name, dt, shape) for l in plan.layers
                  for name, dt, shape in _sparse_tensors(l.index, cfg, vdtype)]
        clash = [name for name, _, _ in sparse if name in entries]
        if clash:
            raise ConversionError(f"input already has tensor {clash[0]!r} (already converted?)")
        copied = [name for name in sorted(entries) if name not in expert_names]
        writer = Writer(sparse + [(name, entries[name].dtype, entries[name].shape)
                                  for name in copied],
                        {"format": FORMAT, "format_version": FORMAT_VERSION,
                         "samoyeds": _metadata(plan, hf_cfg, moe_info, sp, dtype, calib,
                                               entries, input_path)},
                        checksums=CHECKSUMS)

        reports: dict[int, dict] = {}
        bar = _progress(progress, len(plan.layers) + 1, "samoyeds-convert", "layer")
        try:
            with atomic_output(output_path) as dst:
                writer.begin(dst)
                for l in plan.layers:
                    arrays, rep = _convert_layer(l, entries, reader, cfg, vdtype, calib, damp,
                                                 block)
                    if rep is not None:
                        reports[l.index] = rep
                    for key, sw in arrays.items():
                        for part in SPARSE_PARTS:
                            writer.array(f"{layer_prefix(l.index)}.{key}.{part}",
                                         np.asarray(getattr(sw, part)))
                    del arrays
                    bar.update(1)
                for name in copied:
                    writer.copy(name, reader.chunks(entries[name], name))
                bar.update(1)
                writer.finish()
        finally:
            bar.close()

    summary = {
        "output": output_path, "naming": plan.naming, "moe_layers": len(plan.layers),
        "num_experts": cfg.num_experts, "d_model": cfg.d_model, "d_ff": cfg.d_ff,
        "pattern": f"{n}:{v}", "sub_row": sp.sub_row, "dtype": dtype,
        "tensors_copied": len(copied),
        "bytes_before": sum(ent.nbytes for ent in entries.values()),
        "bytes_after": writer.size,
        "expert_bytes_before": sum(entries[name].nbytes for name in expert_names),
        "expert_bytes_after": sum(_nbytes(dt, shape) for _, dt, shape in sparse),
        "seconds": time.perf_counter() - t0, "calibration": reports,
    }
    if verbose:
        print_summary(summary)
    return summary


def _sparse_tensors(i: int, cfg: MoEConfig, vdtype: np.dtype
                    ) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of layer i's encoded experts, in file order."""
    dtypes = {"values": vdtype, "indices": INDICES_DTYPE, "metadata": METADATA_DTYPE}
    out = []
    for p in layout.SPARSE_EXPERTS:
        e, k, m = p.shape(cfg)
        for part, shape in cfg.sparsity.encoded_shapes(k, m, (e,)).items():
            out.append((f"{layer_prefix(i)}.{p.key}.{part}", NP_TO_ST[dtypes[part].name],
                        shape))
    return out


def _metadata(plan: hf.Plan, hf_cfg: dict, moe_info: dict, sp: SparsityConfig, dtype: str,
              calib: Calibration | None, entries: dict[str, Entry], input_path: Any) -> str:
    """The ``samoyeds`` metadata string (JSON) that the loader reads back."""
    layers_meta = []
    for l in plan.layers:
        lm = {"index": l.index, "prefix": layer_prefix(l.index), "router": l.router,
              "pruning": "calibrated" if calib and l.index in calib.layers else "magnitude"}
        lm.update(l.shared)
        layers_meta.append(lm)
    return json.dumps({
        "sparsity": {"n": sp.n, "v": sp.v, "sub_row": sp.sub_row},
        "dtype": dtype,
        "source": {"naming": plan.naming, "input": os.path.basename(os.path.abspath(
            os.fspath(input_path))), "dtype": ST_DTYPES.get(plan.src_dtype, plan.src_dtype),
            "config": {k: hf_cfg[k] for k in hf.CONFIG_FIELDS if k in hf_cfg}},
        "moe": moe_info,
        "num_hidden_layers": hf_cfg.get("num_hidden_layers",
                                        max(hf.layer_numbers(entries), default=-1) + 1),
        "layers": layers_meta,
    })


def _finite(w: np.ndarray, entry: Entry, name: str) -> np.ndarray:
    """An expert weight, refused when it holds NaN or infinity (nothing to prune by)."""
    if not np.isfinite(w.astype(np.float32)).all():
        raise ConversionError(f"{entry.file}: tensor {name!r} holds NaN or infinite values")
    return w


def _convert_layer(layer: hf.Layer, entries: dict[str, Entry], reader: Reader,
                   cfg: MoEConfig, vdtype: np.dtype, calib: Calibration | None, damp: float,
                   block: int | None) -> tuple[dict[str, Any], dict | None]:
    """One layer's encoded experts ``{"gate_up": SparseWeight, "down": SparseWeight}`` and
    its calibration report (None when pruned by magnitude)."""
    dense = {}
    for key in EXPERT_KEYS:
        # torch [out, in] -> ours [in, out], stacked over experts.
        dense[key] = np.stack([_finite(reader.tensor(entries[n], n), entries[n], n).T
                               for n in layer.experts[key]]).astype(vdtype)
    x = calib.get(layer.index) if calib is not None else None
    report = None
    if x is not None:
        router = reader.tensor(entries[layer.router], layer.router).T.astype(np.float32)
        params = {"router": jnp.asarray(router), **{k: jnp.asarray(w) for k, w in dense.items()}}
        for key, name in layer.shared.items():
            params[key] = jnp.asarray(reader.tensor(entries[name], name).T)
        pruned, report = calibrate_moe(params, cfg, x, damp=damp, block=block,
                                       return_report=True)
        dense = {k: pruned[k] for k in EXPERT_KEYS}
        del params, pruned
    gate_up, down = encode_experts(dense["gate"], dense["up"], dense["down"], cfg.sparsity,
                                   pruned=x is not None)
    return {"gate_up": gate_up, "down": down}, report
