"""The loader: a converted file back to the parameter dicts of ``sj.moe``."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from samoyeds_jax import layout
from samoyeds_jax.checkpoint.safetensors_io import (
    DIGEST, Reader, header_digest, parse_json)
from samoyeds_jax.checkpoint.schema import (
    CHECKSUMS, FORMAT, FORMAT_VERSION, SPARSE_PARTS, UNVERIFIABLE_VERSIONS, ConversionError,
    moe_config)
from samoyeds_jax.format import SparseWeight, SparsityConfig, validate


def load_checkpoint(path: str, top_k: int | None = None, load_other: bool = True,
                    verify: bool = True
                    ) -> tuple[dict[int, dict], dict, dict[str, np.ndarray]]:
    """Load a file written by ``samoyeds-convert``.

    Args:
      path: the converted ``.safetensors`` file.
      top_k: overrides the stored top_k (required when the conversion did not know it).
      load_other: also return the other tensors (else ``{}``).
      verify: check the recorded checksums (:data:`~samoyeds_jax.checkpoint.safetensors_io.
        DIGEST`) of the header and of every tensor read, so that any corrupted byte is
        refused with the tensor's name. ``False`` skips the hashing (about 1 s per 1.4 GB
        on one core) and is needed for files written before checksums were recorded
        (``format_version`` 1). Either way the header is checked against the file and
        every SparseWeight against the format (:func:`samoyeds_jax.validate`).
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
      ConversionError (a ValueError) naming the file (and the tensor), for anything that
      is not a readable, intact and well-formed converted file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path!r} does not exist")
    try:
        with Reader() as reader:
            return _load(path, top_k, load_other, verify, reader)
    except ConversionError:
        raise
    except Exception as err:  # an untrusted file: every parse failure is this error
        raise ConversionError(f"{path}: not a readable samoyeds-convert output "
                              f"({type(err).__name__}: {err})") from None


def _checksums(path: str, text: str, raw_header: bytes, names: set[str]) -> dict[str, str]:
    """The recorded tensor digests, after checking the header's own."""
    rec = parse_json(text.encode(), f"{path}: {CHECKSUMS}")
    tensors = rec.get("tensors") if isinstance(rec, dict) else None
    if not isinstance(tensors, dict) or rec.get("algorithm") != DIGEST or \
            not all(isinstance(d, str) for d in tensors.values()):
        raise ConversionError(f"{path}: the {CHECKSUMS} metadata is malformed (the file is "
                              f"corrupt)")
    header_digest(raw_header, rec.get("header"), path)
    if set(tensors) != names:
        raise ConversionError(f"{path}: checksums are recorded for other tensors than the "
                              f"file holds (the file is corrupt)")
    return tensors


def _load(path: str, top_k: int | None, load_other: bool, verify: bool, reader: Reader):
    entries, fmeta, raw_header = reader.header_bytes(path)
    if fmeta.get("format") != FORMAT or "samoyeds" not in fmeta:
        raise ConversionError(f"{path}: not a samoyeds-convert output (metadata format is "
                              f"{fmeta.get('format')!r}, expected {FORMAT!r})")
    version = fmeta.get("format_version")
    if version != FORMAT_VERSION and version not in UNVERIFIABLE_VERSIONS:
        raise ConversionError(f"{path}: format_version {version!r} is not supported "
                              f"(expected {FORMAT_VERSION})")
    digests = None
    if verify:
        if CHECKSUMS not in fmeta:
            raise ConversionError(
                f"{path}: format_version {version} records no checksums (written before "
                f"they were, or stripped); load_checkpoint(..., verify=False) loads it "
                f"unverified, or convert the checkpoint again")
        digests = _checksums(path, fmeta[CHECKSUMS], raw_header, set(entries))
    info = parse_json(fmeta["samoyeds"].encode(), f"{path}: samoyeds metadata")
    sp = SparsityConfig(**info["sparsity"])
    layers: dict[int, dict] = {}
    used = set()

    def get(name):
        if not isinstance(name, str) or name not in entries:
            raise ConversionError(f"{path}: tensor {str(name)[:200]!r} is missing")
        used.add(name)
        return reader.tensor(entries[name], name, None if digests is None else digests[name])

    for lm in info["layers"]:
        p = {"router": jnp.asarray(get(lm["router"]).T)}
        for key in layout.SPARSE_EXPERT_KEYS:
            parts = [get(f"{lm['prefix']}.{key}.{part}") for part in SPARSE_PARTS]
            try:  # a tampered or corrupt file is refused here, not read by a kernel
                validate(SparseWeight.unchecked(*parts, sp), f"{lm['prefix']}.{key}")
            except ValueError as err:
                raise ConversionError(f"{path}: {err}") from None
            p[key] = SparseWeight.unchecked(*(jnp.asarray(a) for a in parts), sp)
        for shared in layout.SHARED:  # stored under their source names, torch layout
            if shared.key in lm:
                p[shared.key] = jnp.asarray(get(lm[shared.key]).T)
        layers[lm["index"]] = p
    other = ({name: get(name) for name in sorted(entries) if name not in used}
             if load_other else {})
    try:
        info["moe_config"] = moe_config(info, top_k)
    except ConversionError:
        info["moe_config"] = None
    return layers, info, other
