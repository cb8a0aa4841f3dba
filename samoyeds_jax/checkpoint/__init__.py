"""Convert Hugging Face MoE safetensors checkpoints to the dual-side sparse format, and
load the result.

Command line (``pip install "samoyeds_jax[convert]"``)::

    samoyeds-convert --input DIR_OR_FILE --output OUT.safetensors --nv 1:2 \\
        [--sub_row 128] [--calibration CALIB.safetensors|.npz] [--top_k K] \\
        [--dtype auto|bfloat16|float16] [--damp 0.01] [--block 128] [--quiet]

(or ``python -m samoyeds_jax.checkpoint ...``; in Python :func:`convert`).

**Input.** A directory (``model.safetensors.index.json`` and its shards, another single
``*.safetensors.index.json``, or every ``*.safetensors`` in it), an index JSON, or one
``.safetensors`` file. ``config.json`` next to it is read when present (``top_k``, router,
activation). The Mixtral and the Qwen2-MoE / DeepSeek-MoE namings are recognised
(:mod:`~samoyeds_jax.checkpoint.hf`).

**Conversion** (:mod:`~samoyeds_jax.checkpoint.converter`). Layer by layer (peak memory
about one MoE layer): the routed experts are transposed to ``[E, in, out]``, cast to the
sparse dtype (``--dtype auto``: the checkpoint's bfloat16/float16, else bfloat16), pruned
(``sj.prune``; or ``sj.calibrate_moe`` when ``--calibration`` has inputs for the layer)
and encoded as ``sj.sparsify_moe`` does.

Every input file is untrusted: it is read through the one
:class:`~samoyeds_jax.checkpoint.safetensors_io.Reader`, which refuses a malformed or
hostile file with a :class:`ConversionError` naming it (and the tensor).

**Output** (one safetensors file, written to a temporary file in the output directory and
renamed at the end; on any error or SIGINT/SIGTERM/SIGHUP nothing is left behind; an
existing output is refused):

* ``model.layers.{i}.moe.gate_up.{values,indices,metadata}``: SparseWeight
  ``[E, d, 2f]`` of ``concat([gate, up], -1)`` (exactly ``sj.sparsify_moe``'s gate_up);
* ``model.layers.{i}.moe.down.{values,indices,metadata}``: SparseWeight ``[E, f, d]``;
* every other tensor (router, shared experts, attention, norms, embeddings, dense MLPs,
  ...) byte for byte under its original name and layout;
* file metadata: ``format = "samoyeds_jax.moe"``, ``format_version = "2"``,
  ``checksums`` (sha256 of every tensor and of the header) and
  ``samoyeds`` = a JSON string with ``sparsity`` (n, v, sub_row), ``dtype``, ``source``
  (naming, input, config.json fields), ``moe`` (num_experts, top_k, d_model, d_ff,
  router, activation, num_shared_experts, d_ff_shared, shared_expert_gate),
  ``num_hidden_layers`` and ``layers`` (per MoE layer: index, pruning method, and the
  names of its router / shared tensors).

**Calibration file** (``--calibration``): see :mod:`~samoyeds_jax.checkpoint.calibration`.

**Loading**: :func:`load_checkpoint` returns the per-layer parameter dicts of
``sj.moe`` (``sj.sparsify_moe``'s layout), the config and the other tensors, after
verifying the checksums (``verify=False`` skips them).

Modules, one job each: ``safetensors_io`` (the one reader of input files and the one
writer), ``hf`` (input discovery, namings, config.json), ``calibration``, ``converter``,
``publish`` (atomic output), ``summary``, ``loader``, ``schema`` (what a converted file
holds), ``cli``.
"""

from samoyeds_jax.checkpoint.calibration import CALIB_KEY
from samoyeds_jax.checkpoint.cli import main
from samoyeds_jax.checkpoint.converter import convert
from samoyeds_jax.checkpoint.loader import load_checkpoint
from samoyeds_jax.checkpoint.schema import (
    FORMAT, FORMAT_VERSION, SPARSE_PARTS, ConversionError, moe_config)

__all__ = ["CALIB_KEY", "FORMAT", "FORMAT_VERSION", "SPARSE_PARTS", "ConversionError",
           "convert", "load_checkpoint", "main", "moe_config"]
