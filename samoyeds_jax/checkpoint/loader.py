"""The loader: a converted file back to the parameter dicts of ``sj.moe``."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from samoyeds_jax import layout
from samoyeds_jax.checkpoint.safetensors_io import Reader
from samoyeds_jax.checkpoint.schema import (
    FORMAT, FORMAT_VERSION, SPARSE_PARTS, ConversionError, moe_config)
from samoyeds_jax.format import SparseWeight, SparsityConfig, validate


def load_checkpoint(path: str, top_k: int | None = None, load_other: bool = True
                    ) -> tuple[dict[int, dict], dict, dict[str, np.ndarray]]:
    """Load a file written by ``samoyeds-convert``.

    Args:
      path: the converted ``.safetensors`` file.
      top_k: overrides the stored top_k (required when the conversion did not know it).
      load_other: also return the other tensors (else ``{}``).
    Returns:
      ``(layers, info, other)``:

      * ``layers``: ``{layer index: params}`` for every MoE layer, in layer order; params
        is the dict ``sj.moe`` / ``samoyeds_jax.flax.SparseMoE(cfg, params=...)`` take
        (``sj.sparsify_moe``'s layout): ``router [d, E]``, ``gate_up``/``down``
        SparseWeights, and ``shared_gate [d, fs]``, ``shared_up``, ``shared_down [fs, d]``,
        ``shared_expert_gate [d, 1]`` when the model has them (transposed from the stored
        torch layout, dtype unchanged);
      * ``info``: the stored config (``sparsity``, ``dtype``, ``source``, ``moe``,
        ``num_hidden_layers``, ``layers``) plus ``"moe_config"``: the layer's
        :class:`~samoyeds_jax.MoEConfig` (``None`` when top_k is unknown);
      * ``other``: every other tensor (name -> numpy array), as in the source checkpoint.
    Raises:
      ConversionError (a ValueError) naming the file, for anything that is not a readable
      and well-formed converted file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path!r} does not exist")
    try:
        with Reader() as reader:
            return _load(path, top_k, load_other, reader)
    except ConversionError:
        raise
    except Exception as err:  # an untrusted file: every parse failure is this error
        raise ConversionError(f"{path}: not a readable samoyeds-convert output "
                              f"({type(err).__name__}: {err})") from None


def _load(path: str, top_k: int | None, load_other: bool, reader: Reader):
    entries, fmeta = reader.header(path)
    if fmeta.get("format") != FORMAT or "samoyeds" not in fmeta:
        raise ConversionError(f"{path}: not a samoyeds-convert output (metadata format is "
                              f"{fmeta.get('format')!r}, expected {FORMAT!r})")
    if fmeta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{path}: format_version {fmeta.get('format_version')!r} is not "
                              f"supported (expected {FORMAT_VERSION})")
    info = json.loads(fmeta["samoyeds"])
    sp = SparsityConfig(**info["sparsity"])
    layers: dict[int, dict] = {}
    used = set()

    def get(name):
        used.add(name)
        return reader.tensor(entries[name], name)

    for lm in info["layers"]:
        p = {"router": jnp.asarray(get(lm["router"]).T)}
        for key in layout.SPARSE_EXPERT_KEYS:
            parts = [get(f"{lm['prefix']}.{key}.{part}") for part in SPARSE_PARTS]
            try:  # a tampered or corrupt file is refused here, not read by a kernel
                validate(SparseWeight(*parts, sp), f"{lm['prefix']}.{key}")
            except ValueError as err:
                raise ConversionError(f"{path}: {err}") from None
            p[key] = SparseWeight(*(jnp.asarray(a) for a in parts), sp)
        for shared in layout.SHARED:  # stored under their source names, torch layout
            if shared.key in lm:
                p[shared.key] = jnp.asarray(get(lm[shared.key]).T)
        layers[lm["index"]] = p
    other = ({name: reader.tensor(entries[name], name) for name in sorted(entries)
              if name not in used} if load_other else {})
    try:
        info["moe_config"] = moe_config(info, top_k)
    except ConversionError:
        info["moe_config"] = None
    return layers, info, other
