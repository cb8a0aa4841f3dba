"""The calibration-data reader: per-layer inputs for calibrated pruning.

A safetensors or ``.npz`` file with one float array per MoE layer, key
``layers.{i}.inputs`` ``[n, d_model]``: the hidden states entering layer i's MoE block
(after ``post_attention_layernorm``), e.g. collected with forward hooks on a few hundred
calibration sequences. Layers without a key fall back to magnitude pruning.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from samoyeds_jax.checkpoint.safetensors_io import Reader
from samoyeds_jax.checkpoint.schema import ConversionError

CALIB_KEY = "layers.{i}.inputs"


class Calibration:
    """Per-layer calibration inputs of one file, read lazily through ``reader``.

    Args:
      path: the ``.npz`` or safetensors file.
      layers: the MoE layer indices of the checkpoint.
      d_model: the width every input must have.
      reader: the converter's :class:`~samoyeds_jax.checkpoint.safetensors_io.Reader`.
    Attributes:
      layers: the layer indices the file has inputs for (never empty).
    """

    def __init__(self, path: str, layers: list[int], d_model: int, reader: Reader):
        self.path = path
        if not os.path.isfile(path):
            raise ConversionError(f"calibration file {path!r} does not exist")
        self._reader = reader
        self._npz = None
        self._entries = None
        if path.endswith(".npz"):
            try:
                self._npz = reader.npz(path)
            except (OSError, ValueError) as err:
                raise ConversionError(f"calibration file {path!r}: cannot read: {err}") from None
            keys = set(self._npz.files)
        else:
            self._entries, _ = reader.header(path)
            keys = set(self._entries)
            for k, ent in self._entries.items():
                if k.endswith(".inputs") and (len(ent.shape) != 2 or ent.shape[1] != d_model):
                    raise ConversionError(f"calibration {path}: {k} has shape "
                                          f"{list(ent.shape)}, expected [n, d_model={d_model}]")
        want = {CALIB_KEY.format(i=i): i for i in layers}
        self.layers = sorted(i for k, i in want.items() if k in keys)
        if not self.layers:
            raise ConversionError(
                f"calibration file {path!r} has no inputs for any MoE layer (expected keys "
                f"like {CALIB_KEY.format(i=layers[0])!r} [n, d_model]; it has "
                f"{sorted(keys)[:5]})")
        extra = sorted(k for k in keys if k not in want)
        if extra:
            print(f"samoyeds-convert: warning: calibration keys not used: {extra[:5]}",
                  file=sys.stderr)
        self.d_model = d_model

    def get(self, i: int) -> np.ndarray | None:
        """Layer i's inputs ``[n, d_model]`` float32, or None when the file has none."""
        if i not in self.layers:
            return None
        key = CALIB_KEY.format(i=i)
        if self._npz is not None:
            x = self._npz[key]
        else:
            x = self._reader.tensor(self._entries[key], key)
        if x.ndim != 2 or x.shape[1] != self.d_model or x.shape[0] == 0 or \
                not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
            raise ConversionError(f"calibration {self.path}: {key} must be a float "
                                  f"[n > 0, d_model={self.d_model}] array, got {x.dtype} "
                                  f"{list(x.shape)}")
        return x.astype(np.float32)
