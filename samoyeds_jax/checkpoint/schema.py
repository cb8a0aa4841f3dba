"""What a converted file holds: its format tag and version, the names of the encoded
tensors, the stored layer config, and the error every reader of outside files raises."""

from __future__ import annotations

from samoyeds_jax.config import MoEConfig
from samoyeds_jax.format import SPARSE_PARTS, SparsityConfig

FORMAT = "samoyeds_jax.moe"
# Version 2 records checksums (metadata key CHECKSUMS); version 1 files, written before,
# load only unverified (load_checkpoint(..., verify=False)).
FORMAT_VERSION = "2"
UNVERIFIABLE_VERSIONS = ("1",)
CHECKSUMS = "checksums"
__all__ = ["CHECKSUMS", "FORMAT", "FORMAT_VERSION", "SPARSE_PARTS", "UNVERIFIABLE_VERSIONS",
           "ConversionError", "layer_prefix", "moe_config"]


class ConversionError(ValueError):
    """A checkpoint cannot be converted (or loaded); the message says why."""


def layer_prefix(i: int) -> str:
    """Layer i's encoded experts are ``{prefix}.{gate_up,down}.{values,indices,metadata}``."""
    return f"model.layers.{i}.moe"


def moe_config(info: dict, top_k: int | None = None) -> MoEConfig:
    """The :class:`~samoyeds_jax.MoEConfig` of a converted checkpoint's ``info`` (from
    :func:`~samoyeds_jax.checkpoint.load_checkpoint`); ``top_k`` overrides the stored one
    (needed when the conversion did not know it)."""
    m = dict(info["moe"])
    if top_k is not None:
        m["top_k"] = top_k
    if m["top_k"] is None:
        raise ConversionError("the checkpoint does not record top_k (no config.json at "
                              "conversion and no --top_k); pass top_k=")
    sp = info["sparsity"]
    return MoEConfig(**m, sparsity=SparsityConfig(sp["n"], sp["v"], sp["sub_row"]))
