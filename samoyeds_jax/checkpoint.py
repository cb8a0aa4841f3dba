"""Convert Hugging Face MoE safetensors checkpoints to the dual-side sparse format.

Command line (``pip install "samoyeds_jax[convert]"``)::

    samoyeds-convert --input DIR_OR_FILE --output OUT.safetensors --pattern 1:2 \\
        [--sub-row 128] [--calibration CALIB.safetensors|.npz] [--top-k K] \\
        [--dtype auto|bfloat16|float16] [--damp 0.01] [--block 128] [--quiet]

(or ``python -m samoyeds_jax.checkpoint ...``; in Python :func:`convert`).

**Input.** A directory (``model.safetensors.index.json`` and its shards, another single
``*.safetensors.index.json``, or every ``*.safetensors`` in it), an index JSON, or one
``.safetensors`` file. ``config.json`` next to it is read when present (``top_k``, router,
activation). Recognised namings (torch ``Linear`` layout ``[out, in]``):

* Mixtral: ``model.layers.{i}.block_sparse_moe.experts.{j}.w1/w3/w2.weight`` (gate, up
  ``[f, d]``; down ``[d, f]``), router ``model.layers.{i}.block_sparse_moe.gate.weight``
  ``[E, d]``;
* Qwen2-MoE / DeepSeek-MoE: ``model.layers.{i}.mlp.experts.{j}.gate_proj/up_proj/
  down_proj.weight``, router ``model.layers.{i}.mlp.gate.weight``, shared experts
  ``mlp.shared_expert.*`` (Qwen2-MoE, with ``mlp.shared_expert_gate.weight [1, d]``) or
  ``mlp.shared_experts.*`` (DeepSeek-MoE). Layers without routed experts (DeepSeek's
  first dense layer) are not MoE layers and are copied through.

**Conversion.** Layer by layer (peak memory about one MoE layer; tensors are read with
``safetensors.safe_open``, never the whole model): the routed experts are transposed to
``[E, in, out]``, cast to the sparse dtype (``--dtype auto``: the checkpoint's bf16/fp16,
else bfloat16), pruned (``sj.prune``; or ``samoyeds_jax.calibrate.calibrate_moe`` when
``--calibration`` has inputs for the layer) and encoded (``sj.encode``).

**Output** (one safetensors file, written to a temporary file in the output directory and
renamed at the end; on any error nothing is left behind; an existing output is refused):

* ``model.layers.{i}.moe.gate_up.{values,indices,metadata}``: SparseWeight
  ``[E, d, 2f]`` of ``concat([gate, up], -1)`` (exactly ``sj.sparsify_moe``'s gate_up);
* ``model.layers.{i}.moe.down.{values,indices,metadata}``: SparseWeight ``[E, f, d]``;
* every other tensor (router, shared experts, attention, norms, embeddings, dense MLPs,
  ...) byte for byte under its original name and layout;
* file metadata: ``format = "samoyeds_jax.moe"``, ``format_version = "1"`` and
  ``samoyeds`` = a JSON string with ``sparsity`` (n, v, sub_row), ``dtype``, ``source``
  (naming, input, config.json fields), ``moe`` (num_experts, top_k, d_model, d_ff,
  router, activation, num_shared_experts, d_ff_shared, shared_expert_gate),
  ``num_hidden_layers`` and ``layers`` (per MoE layer: index, pruning method, and the
  names of its router / shared tensors).

**Calibration file** (``--calibration``): safetensors or ``.npz`` with one float array per
MoE layer, key ``layers.{i}.inputs`` ``[n, d_model]``: the hidden states entering layer i's
MoE block (after ``post_attention_layernorm``), e.g. collected with forward hooks on a few
hundred calibration sequences. Layers without a key fall back to magnitude pruning.

**Loading**: :func:`load_checkpoint` returns the per-layer parameter dicts of
``sj.moe`` (``sj.sparsify_moe``'s layout), the config and the other tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import struct
import sys
import tempfile
import time
from typing import Any, Iterator

import numpy as np

FORMAT = "samoyeds_jax.moe"
FORMAT_VERSION = "1"
SPARSE_PARTS = ("values", "indices", "metadata")
CALIB_KEY = "layers.{i}.inputs"

_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
              "U8": "uint8", "U32": "uint32", "I8": "int8", "I32": "int32", "I64": "int64"}
_NP_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "uint8": "U8",
             "uint32": "U32"}
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
             "F4": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
             "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_COPY_CHUNK = 64 << 20
_ENCODE_CHUNK_ELEMS = 1 << 26   # expert weight elements pruned and encoded at a time

_MIXTRAL_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(.+)$")
_MLP_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")
_NAMINGS = {
    # naming: (expert regex, {our key: projection name}, router name, shared prefixes)
    "mixtral": (_MIXTRAL_EXPERT, {"gate": "w1.weight", "up": "w3.weight",
                                  "down": "w2.weight"},
                "model.layers.{i}.block_sparse_moe.gate.weight", ()),
    "mlp_experts": (_MLP_EXPERT, {"gate": "gate_proj.weight", "up": "up_proj.weight",
                                  "down": "down_proj.weight"},
                    "model.layers.{i}.mlp.gate.weight",
                    ("model.layers.{i}.mlp.shared_expert.",
                     "model.layers.{i}.mlp.shared_experts.")),
}
_SHARED_PROJ = {"shared_gate": "gate_proj.weight", "shared_up": "up_proj.weight",
                "shared_down": "down_proj.weight"}
_SHARED_GATE = "model.layers.{i}.mlp.shared_expert_gate.weight"


class ConversionError(ValueError):
    """A checkpoint cannot be converted (or loaded); the message says why."""


# --- reading safetensors headers --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
    file: str
    dtype: str             # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int            # absolute byte offset of the data in `file`
    nbytes: int


def _read_header(path: str) -> tuple[dict[str, _Entry], dict[str, str]]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ConversionError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > min(size - 8, 1 << 30):
                raise ConversionError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConversionError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (bad header)")
    meta = header.pop("__metadata__", None) or {}
    entries = {}
    for name, info in header.items():
        try:
            b, e = info["data_offsets"]
            entries[name] = _Entry(path, info["dtype"], tuple(int(s) for s in info["shape"]),
                                   8 + n + int(b), int(e) - int(b))
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: bad header entry for tensor {name!r}") from None
    return entries, meta


def _resolve_input(path: str) -> tuple[list[str], str | None, str]:
    """(safetensors files, index json or None, directory of config.json)."""
    if not os.path.exists(path):
        raise ConversionError(f"input {path!r} does not exist")
    if os.path.isdir(path):
        std = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(std):
            return [], std, path
        idx = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
        if len(idx) == 1:
            return [], os.path.join(path, idx[0]), path
        if len(idx) > 1:
            raise ConversionError(f"input directory {path!r} holds several index files "
                                  f"{idx}; pass the one to use as --input")
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(".safetensors"))
        if not files:
            raise ConversionError(f"input directory {path!r} has no *.safetensors files")
        return files, None, path
    if path.endswith(".json"):
        return [], path, os.path.dirname(os.path.abspath(path))
    return [path], None, os.path.dirname(os.path.abspath(path))


def _index_source(path: str) -> tuple[dict[str, _Entry], str]:
    """All tensors of the input (name -> entry) and the directory to look for config.json."""
    files, index, cfg_dir = _resolve_input(path)
    entries: dict[str, _Entry] = {}
    if index is not None:
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConversionError(f"{index}: not a safetensors index (needs a "
                                  f"'weight_map'): {err}") from None
        base = os.path.dirname(os.path.abspath(index))
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(os.path.join(base, fname), []).append(name)
        for fpath, names in sorted(by_file.items()):
            if not os.path.isfile(fpath):
                raise ConversionError(f"{index}: shard {os.path.basename(fpath)!r} (holding "
                                      f"{names[0]!r}, ...) is missing")
            shard, _ = _read_header(fpath)
            for name in names:
                if name not in shard:
                    raise ConversionError(f"{index}: tensor {name!r} is not in shard "
                                          f"{os.path.basename(fpath)!r}")
                entries[name] = shard[name]
    else:
        for fpath in files:
            shard, _ = _read_header(fpath)
            for name, entry in shard.items():
                if name in entries:
                    raise ConversionError(f"tensor {name!r} is in both {entries[name].file} "
                                          f"and {fpath}")
                entries[name] = entry
    return entries, cfg_dir


# --- the model's MoE structure ---------------------------------------------------------

@dataclasses.dataclass
class _Layer:
    index: int
    experts: dict[str, list[str]]          # gate/up/down -> per-expert tensor names
    router: str
    shared: dict[str, str]                  # shared_gate/up/down (+ shared_expert_gate)


@dataclasses.dataclass
class _Plan:
    naming: str
    layers: list[_Layer]
    num_experts: int
    d_model: int
    d_ff: int
    d_ff_shared: int
    shared_expert_gate: bool
    src_dtype: str


def _detect(entries: dict[str, _Entry]) -> _Plan:
    found = {nm: [n for n in entries if rx.match(n)]
             for nm, (rx, *_rest) in _NAMINGS.items()}
    present = [nm for nm, names in found.items() if names]
    if not present:
        raise ConversionError(
            "not a MoE checkpoint: no routed-expert tensors found (expected Mixtral "
            "'model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight' or Qwen2-MoE / "
            "DeepSeek-MoE 'model.layers.{i}.mlp.experts.{j}.gate_proj.weight'); "
            f"{len(entries)} tensors, e.g. {sorted(entries)[:3]}")
    if len(present) > 1:
        raise ConversionError("checkpoint mixes the Mixtral and the mlp.experts namings")
    naming = present[0]
    rx, proj, router_fmt, shared_fmts = _NAMINGS[naming]
    by_layer: dict[int, dict[int, dict[str, str]]] = {}
    proj_key = {v: k for k, v in proj.items()}
    for name in found[naming]:
        i, j, rest = rx.match(name).groups()
        if rest not in proj_key:
            raise ConversionError(f"unsupported expert tensor {name!r} (expected only "
                                  f"{', '.join(sorted(proj.values()))}; quantized or "
                                  f"biased experts are not supported)")
        by_layer.setdefault(int(i), {}).setdefault(int(j), {})[proj_key[rest]] = name
    layers = []
    shapes = set()
    shared_dims = set()
    has_gate = set()
    dtypes = set()
    for i in sorted(by_layer):
        experts = by_layer[i]
        e = max(experts) + 1
        missing = [j for j in range(e) if j not in experts]
        if missing:
            raise ConversionError(f"layer {i}: experts {missing} are missing (found experts "
                                  f"up to {e - 1})")
        lists = {}
        for key, pname in proj.items():
            names = []
            for j in range(e):
                if key not in experts[j]:
                    raise ConversionError(
                        f"layer {i}: tensor {_expert_name(naming, i, j, pname)!r} is missing")
                names.append(experts[j][key])
            lists[key] = names
        f_, d_ = _shape2(entries, lists["gate"][0])
        for j in range(e):
            for key, want in (("gate", (f_, d_)), ("up", (f_, d_)), ("down", (d_, f_))):
                got = entries[lists[key][j]]
                if got.shape != want:
                    raise ConversionError(f"{lists[key][j]}: shape {list(got.shape)}, expected "
                                          f"{list(want)} (like {lists['gate'][0]})")
                dtypes.add(got.dtype)
        router = router_fmt.format(i=i)
        if router not in entries:
            raise ConversionError(f"layer {i}: router tensor {router!r} is missing")
        if entries[router].shape != (e, d_):
            raise ConversionError(f"{router}: shape {list(entries[router].shape)}, expected "
                                  f"[num_experts={e}, d_model={d_}]")
        shared = {}
        for fmt in shared_fmts:
            pre = fmt.format(i=i)
            got = {key: pre + p for key, p in _SHARED_PROJ.items() if pre + p in entries}
            if got:
                if len(got) != 3:
                    miss = [pre + p for key, p in _SHARED_PROJ.items() if key not in got]
                    raise ConversionError(f"layer {i}: shared expert tensor {miss[0]!r} is "
                                          f"missing")
                shared = got
        if shared:
            fs, d2 = _shape2(entries, shared["shared_gate"])
            for key, want in (("shared_gate", (fs, d_)), ("shared_up", (fs, d_)),
                              ("shared_down", (d_, fs))):
                if entries[shared[key]].shape != want:
                    raise ConversionError(f"{shared[key]}: shape "
                                          f"{list(entries[shared[key]].shape)}, expected "
                                          f"{list(want)}")
            shared_dims.add(fs)
            sg = _SHARED_GATE.format(i=i)
            if sg in entries:
                if entries[sg].shape != (1, d_):
                    raise ConversionError(f"{sg}: shape {list(entries[sg].shape)}, expected "
                                          f"[1, {d_}]")
                shared["shared_expert_gate"] = sg
        else:
            shared_dims.add(0)
        has_gate.add("shared_expert_gate" in shared)
        shapes.add((e, d_, f_))
        layers.append(_Layer(i, lists, router, shared))
    if len(shapes) > 1 or len(shared_dims) > 1 or len(has_gate) > 1:
        raise ConversionError(f"MoE layers differ in shape (E, d_model, d_ff) {sorted(shapes)} "
                              f"or shared experts; only uniform layers are supported")
    if len(dtypes) > 1:
        raise ConversionError(f"expert weights have mixed dtypes {sorted(dtypes)}")
    (e, d_, f_), = shapes
    if naming == "mlp_experts":
        naming = ("deepseek_moe" if any(".shared_experts." in s for l in layers
                                        for s in l.shared.values()) else "qwen2_moe")
    return _Plan(naming, layers, e, d_, f_, shared_dims.pop(), has_gate.pop(), dtypes.pop())


def _expert_name(naming: str, i: int, j: int, pname: str) -> str:
    if naming == "mixtral":
        return f"model.layers.{i}.block_sparse_moe.experts.{j}.{pname}"
    return f"model.layers.{i}.mlp.experts.{j}.{pname}"


def _shape2(entries, name) -> tuple[int, int]:
    shape = entries[name].shape
    if len(shape) != 2:
        raise ConversionError(f"{name}: expected a 2-D weight, got shape {list(shape)}")
    return shape


def _hf_config(cfg_dir: str) -> dict:
    path = os.path.join(cfg_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: cannot read: {err}") from None
    return cfg if isinstance(cfg, dict) else {}


_CONFIG_FIELDS = ("model_type", "architectures", "num_hidden_layers", "hidden_size",
                  "num_experts_per_tok", "num_local_experts", "num_experts", "n_routed_experts",
                  "n_shared_experts", "moe_intermediate_size", "intermediate_size",
                  "shared_expert_intermediate_size", "norm_topk_prob", "scoring_func",
                  "hidden_act", "first_k_dense_replace", "routed_scaling_factor",
                  "torch_dtype")


def _moe_info(plan: _Plan, hf: dict, top_k: int | None) -> dict:
    if top_k is None:
        top_k = hf.get("num_experts_per_tok")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or \
                not 1 <= top_k <= plan.num_experts:
            raise ConversionError(f"top_k={top_k!r} must be an int in [1, "
                                  f"num_experts={plan.num_experts}]")
    if plan.naming == "mixtral" or hf.get("norm_topk_prob", False):
        router = "mixtral"   # softmax over the k selected logits (= renormalised top-k)
    else:
        router = "softmax_topk"
    if hf.get("scoring_func", "softmax") != "softmax":
        print(f"samoyeds-convert: warning: scoring_func={hf['scoring_func']!r} is not "
              f"modelled by sj.moe's routers; the router is recorded as {router!r}",
              file=sys.stderr)
    act = {"silu": "silu", "swish": "silu", "gelu": "gelu"}.get(hf.get("hidden_act", "silu"))
    if act is None:
        print(f"samoyeds-convert: warning: hidden_act={hf.get('hidden_act')!r} is not "
              f"supported by sj.moe; recorded as 'silu'", file=sys.stderr)
        act = "silu"
    num_shared = 0
    if plan.d_ff_shared and plan.naming == "qwen2_moe":
        num_shared = 1       # one shared expert of width shared_expert_intermediate_size
    elif plan.d_ff_shared:   # DeepSeek: n_shared_experts fused, each as wide as a routed one
        num_shared = hf.get("n_shared_experts") or (
            plan.d_ff_shared // plan.d_ff if plan.d_ff_shared % plan.d_ff == 0 else 1)
    return dict(num_experts=plan.num_experts, top_k=top_k, d_model=plan.d_model,
                d_ff=plan.d_ff, router=router, activation=act, num_shared_experts=num_shared,
                d_ff_shared=plan.d_ff_shared if num_shared else None,
                shared_expert_gate=plan.shared_expert_gate)


def moe_config(info: dict, top_k: int | None = None):
    """The :class:`~samoyeds_jax.MoEConfig` of a converted checkpoint's ``info`` (from
    :func:`load_checkpoint`); ``top_k`` overrides the stored one (needed when the
    conversion did not know it)."""
    from samoyeds_jax.format import SparsityConfig
    from samoyeds_jax.moe import MoEConfig
    m = dict(info["moe"])
    if top_k is not None:
        m["top_k"] = top_k
    if m["top_k"] is None:
        raise ConversionError("the checkpoint does not record top_k (no config.json at "
                              "conversion and no --top-k); pass top_k=")
    sp = info["sparsity"]
    return MoEConfig(**m, sparsity=SparsityConfig(sp["n"], sp["v"], sp["sub_row"]))


# --- calibration inputs ----------------------------------------------------------------

class _Calibration:
    """Per-layer calibration inputs from a safetensors or npz file (read lazily)."""

    def __init__(self, path: str, layers: list[int], d_model: int):
        self.path = path
        if not os.path.isfile(path):
            raise ConversionError(f"calibration file {path!r} does not exist")
        self._npz = None
        self._st = None
        if path.endswith(".npz"):
            try:
                self._npz = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ConversionError(f"calibration file {path!r}: cannot read: {err}") from None
            keys = set(self._npz.files)
        else:
            entries, _ = _read_header(path)
            keys = set(entries)
            for k, ent in entries.items():
                if k.endswith(".inputs") and (len(ent.shape) != 2 or ent.shape[1] != d_model):
                    raise ConversionError(f"calibration {path}: {k} has shape "
                                          f"{list(ent.shape)}, expected [n, d_model={d_model}]")
            self._st = path
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
        if i not in self.layers:
            return None
        key = CALIB_KEY.format(i=i)
        if self._npz is not None:
            x = self._npz[key]
        else:
            from safetensors import safe_open
            with safe_open(self._st, framework="numpy") as f:
                x = f.get_tensor(key)
        if x.ndim != 2 or x.shape[1] != self.d_model or x.shape[0] == 0 or \
                not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
            raise ConversionError(f"calibration {self.path}: {key} must be a float "
                                  f"[n > 0, d_model={self.d_model}] array, got {x.dtype} "
                                  f"{list(x.shape)}")
        return x.astype(np.float32)

    def close(self):
        if self._npz is not None:
            self._npz.close()


# --- writing ---------------------------------------------------------------------------

def _sparse_shapes(e: int, k: int, m: int, n: int, v: int, L: int, vdt: str
                   ) -> dict[str, tuple[str, tuple[int, ...]]]:
    mk = m // v * n
    return {"values": (vdt, (e, mk, k // 2)), "indices": ("U8", (e, mk, k // L)),
            "metadata": ("U32", (e, mk, k // 32))}


def _layer_prefix(i: int) -> str:
    return f"model.layers.{i}.moe"


def _nbytes(dtype: str, shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]


def _parse_pattern(pattern: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise ConversionError(f"--pattern must be N:V (e.g. 1:2), got {pattern!r}")
    return int(m.group(1)), int(m.group(2))


class _Reader:
    """Reads tensors through safetensors.safe_open, one open handle per shard."""

    def __init__(self, stack: contextlib.ExitStack):
        self._stack = stack
        self._handles: dict[str, Any] = {}

    def get(self, entry: _Entry, name: str) -> np.ndarray:
        from safetensors import safe_open
        h = self._handles.get(entry.file)
        if h is None:
            h = self._stack.enter_context(safe_open(entry.file, framework="numpy"))
            self._handles[entry.file] = h
        return h.get_tensor(name)


def _copy_bytes(dst, entry: _Entry) -> None:
    with open(entry.file, "rb") as src:
        src.seek(entry.offset)
        left = entry.nbytes
        while left:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise ConversionError(f"{entry.file}: truncated (tensor data ends early)")
            dst.write(chunk)
            left -= len(chunk)


def _write_array(dst, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.astype(a.dtype.newbyteorder("<"))
    dst.write(a.reshape(-1).view(np.uint8).data)


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="samoyeds-convert", unit="layer")


def _convert_layer(layer: _Layer, plan: _Plan, entries, reader: _Reader, sp, vdtype,
                   calib: _Calibration | None, moe_info: dict, damp: float,
                   block: int | None) -> tuple[dict[str, np.ndarray], dict | None]:
    """Prune and encode one layer's experts: {'gate_up.values': ..., ...}, report."""
    import jax.numpy as jnp

    from samoyeds_jax.format import encode, prune

    dense = {}
    for key in ("gate", "up", "down"):
        # torch [out, in] -> ours [in, out], stacked over experts.
        dense[key] = np.stack([reader.get(entries[n], n).T for n in layer.experts[key]]
                              ).astype(vdtype)
    x = calib.get(layer.index) if calib is not None else None
    report = None
    if x is not None:
        from samoyeds_jax.calibrate import calibrate_moe
        router = reader.get(entries[layer.router], layer.router).T.astype(np.float32)
        cfg = moe_config({"moe": moe_info, "sparsity": {"n": sp.n, "v": sp.v,
                                                        "sub_row": sp.sub_row}})
        params = {"router": jnp.asarray(router), **{k: jnp.asarray(w) for k, w in dense.items()}}
        for key, name in layer.shared.items():
            params[key] = jnp.asarray(reader.get(entries[name], name).T)
        pruned, report = calibrate_moe(params, cfg, x, damp=damp, block=block,
                                       return_report=True)
        dense = {k: pruned[k] for k in ("gate", "up", "down")}
        del params, pruned
    # Prune by magnitude (calibrated weights already follow the pattern) and encode a few
    # experts at a time: encode's host temporaries are several times the weights' size.
    e, d, f = dense["down"].shape[0], dense["down"].shape[2], dense["down"].shape[1]
    step = max(1, _ENCODE_CHUNK_ELEMS // (3 * d * f))
    parts: dict[str, list[np.ndarray]] = {}
    for a in range(0, e, step):
        b = min(a + step, e)
        if x is None:
            g, u, dn = (prune(jnp.asarray(dense[k][a:b]), sp) for k in ("gate", "up", "down"))
        else:
            g, u, dn = (jnp.asarray(dense[k][a:b]) for k in ("gate", "up", "down"))
        for wname, sw in (("gate_up", encode(jnp.concatenate([g, u], axis=-1), sp)),
                          ("down", encode(dn, sp))):
            for part in SPARSE_PARTS:
                parts.setdefault(f"{wname}.{part}", []).append(np.asarray(getattr(sw, part)))
        del g, u, dn
    del dense
    out = {k: v[0] if len(v) == 1 else np.concatenate(v, axis=0) for k, v in parts.items()}
    return out, report


def convert(input_path: str, output_path: str, pattern: str = "1:2", sub_row: int = 128,
            calibration: str | None = None, top_k: int | None = None,
            dtype: str = "auto", damp: float = 0.01, block: int | None = None,
            progress: bool = True, verbose: bool = True) -> dict:
    """Convert a Hugging Face MoE safetensors checkpoint (see the module docstring).

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
      ConversionError (a ValueError) with a clear message; nothing is left behind.
    """
    import ml_dtypes

    from samoyeds_jax.format import SparsityConfig
    from samoyeds_jax.moe import MoEConfig

    t0 = time.perf_counter()
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise ConversionError("samoyeds-convert needs safetensors: "
                              "pip install 'samoyeds_jax[convert]'") from None
    output_path = os.fspath(output_path)
    if os.path.lexists(output_path):
        raise ConversionError(f"output {output_path!r} already exists; refusing to "
                              f"overwrite it")
    out_dir = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(out_dir):
        raise ConversionError(f"output directory {out_dir!r} does not exist")
    n, v = _parse_pattern(pattern)
    try:
        sp = SparsityConfig(n, v, int(sub_row))
    except (TypeError, ValueError) as err:
        raise ConversionError(str(err)) from None
    if dtype not in ("auto", "bfloat16", "float16"):
        raise ConversionError(f"--dtype must be auto, bfloat16 or float16, got {dtype!r}")

    entries, cfg_dir = _index_source(os.fspath(input_path))
    plan = _detect(entries)
    hf = _hf_config(cfg_dir)
    if dtype == "auto":
        dtype = {"BF16": "bfloat16", "F16": "float16"}.get(plan.src_dtype, "bfloat16")
    if plan.src_dtype not in ("BF16", "F16", "F32", "F64"):
        raise ConversionError(f"expert weights are {plan.src_dtype}; only BF16, F16, F32 and "
                              f"F64 checkpoints can be converted")
    vdtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    moe_info = _moe_info(plan, hf, top_k)
    try:  # the format's shape rules, with a message naming the layer's shapes
        MoEConfig(**{**moe_info, "top_k": moe_info["top_k"] or 1}, sparsity=sp)
    except ValueError as err:
        raise ConversionError(f"{plan.layers[0].experts['gate'][0]} (d_model={plan.d_model}, "
                              f"d_ff={plan.d_ff}): {err}") from None
    layer_ids = [l.index for l in plan.layers]
    calib = None
    if calibration is not None:
        if moe_info["top_k"] is None:
            raise ConversionError("calibrated pruning routes the calibration inputs and "
                                  "needs top_k: pass --top-k (no num_experts_per_tok in a "
                                  "config.json next to the input)")
        calib = _Calibration(os.fspath(calibration), layer_ids, plan.d_model)

    # The output's tensors, in file order: each layer's sparse experts, then everything
    # that is not a routed expert weight (unchanged).
    expert_names = {n for l in plan.layers for names in l.experts.values() for n in names}
    vst = _NP_TO_ST[vdtype.name]
    e, d, f = plan.num_experts, plan.d_model, plan.d_ff
    tensors: list[tuple[str, str, tuple[int, ...], Any]] = []
    for l in plan.layers:
        for wname, (k, m) in (("gate_up", (d, 2 * f)), ("down", (f, d))):
            for part, (dt, shape) in _sparse_shapes(e, k, m, n, v, sp.sub_row, vst).items():
                tensors.append((f"{_layer_prefix(l.index)}.{wname}.{part}", dt, shape,
                                (l, f"{wname}.{part}")))
    clash = [t[0] for t in tensors if t[0] in entries]
    if clash:
        raise ConversionError(f"input already has tensor {clash[0]!r} (already converted?)")
    for name in sorted(entries):
        if name not in expert_names:
            ent = entries[name]
            tensors.append((name, ent.dtype, ent.shape, ent))

    layers_meta = []
    for l in plan.layers:
        lm = {"index": l.index, "prefix": _layer_prefix(l.index), "router": l.router,
              "pruning": "calibrated" if calib and l.index in calib.layers else "magnitude"}
        lm.update(l.shared)
        layers_meta.append(lm)
    meta = {
        "sparsity": {"n": n, "v": v, "sub_row": sp.sub_row},
        "dtype": dtype,
        "source": {"naming": plan.naming, "input": os.path.basename(os.path.abspath(
            os.fspath(input_path))), "dtype": _ST_DTYPES.get(plan.src_dtype, plan.src_dtype),
            "config": {k: hf[k] for k in _CONFIG_FIELDS if k in hf}},
        "moe": moe_info,
        "num_hidden_layers": hf.get("num_hidden_layers",
                                    max(_layer_numbers(entries), default=-1) + 1),
        "layers": layers_meta,
    }
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT,
                                               "format_version": FORMAT_VERSION,
                                               "samoyeds": json.dumps(meta)}}
    offset = 0
    for name, dt, shape, _ in tensors:
        nb = _nbytes(dt, shape)
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nb]}
        offset += nb
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)

    bytes_before = sum(ent.nbytes for ent in entries.values())
    expert_before = sum(entries[n].nbytes for n in expert_names)
    expert_after = sum(_nbytes(dt, shape) for _, dt, shape, src in tensors
                       if not isinstance(src, _Entry))
    reports: dict[int, dict] = {}
    bar = _progress(progress, len(plan.layers) + 1)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output_path)}.", suffix=".tmp",
                               dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as dst, contextlib.ExitStack() as stack:
            reader = _Reader(stack)
            dst.write(struct.pack("<Q", len(hbytes)))
            dst.write(hbytes)
            current: tuple[int, dict] | None = None
            for name, dt, shape, src in tensors:
                if isinstance(src, _Entry):
                    if current is not None:
                        current = None
                        if bar is not None:
                            bar.update(1)
                    _copy_bytes(dst, src)
                    continue
                layer, part = src
                if current is None or current[0] != layer.index:
                    if current is not None and bar is not None:
                        bar.update(1)
                    arrays, rep = _convert_layer(layer, plan, entries, reader, sp, vdtype,
                                                 calib, moe_info, damp, block)
                    if rep is not None:
                        reports[layer.index] = rep
                    current = (layer.index, arrays)
                a = current[1][part]
                if a.dtype.name != _ST_DTYPES[dt] or tuple(a.shape) != tuple(shape):
                    raise AssertionError(f"{name}: produced {a.dtype} {a.shape}, planned "
                                         f"{dt} {shape}")
                _write_array(dst, a)
            if bar is not None:
                bar.update(1)
            dst.flush()
            os.fsync(dst.fileno())
        if bar is not None:
            bar.close()
            bar = None
        if os.path.getsize(tmp) != 8 + len(hbytes) + offset:
            raise AssertionError("output size does not match its header")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes it 0600
        _publish(tmp, output_path)
    except BaseException:
        if bar is not None:
            bar.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        if calib is not None:
            calib.close()
    seconds = time.perf_counter() - t0
    summary = {
        "output": output_path, "naming": plan.naming, "moe_layers": len(plan.layers),
        "num_experts": e, "d_model": d, "d_ff": f, "pattern": f"{n}:{v}",
        "sub_row": sp.sub_row, "dtype": dtype, "tensors_copied": sum(
            isinstance(t[3], _Entry) for t in tensors),
        "bytes_before": bytes_before, "bytes_after": 8 + len(hbytes) + offset,
        "expert_bytes_before": expert_before, "expert_bytes_after": expert_after,
        "seconds": seconds, "calibration": reports,
    }
    if verbose:
        _print_summary(summary)
    return summary


def _layer_numbers(entries) -> Iterator[int]:
    for name in entries:
        m = re.match(r"^model\.layers\.(\d+)\.", name)
        if m:
            yield int(m.group(1))


def _publish(tmp: str, out: str) -> None:
    """Rename tmp to out without ever replacing an existing out."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise ConversionError(f"output {out!r} appeared during the conversion; refusing to "
                              f"overwrite it") from None
    except OSError:  # no hard links on this file system
        if os.path.lexists(out):
            raise ConversionError(f"output {out!r} appeared during the conversion") from None
        os.replace(tmp, out)
        return
    os.unlink(tmp)


def _mib(b: int) -> str:
    return f"{b / 2**20:,.1f} MiB"


def _print_summary(s: dict) -> None:
    print(f"samoyeds-convert: {s['output']}")
    print(f"  {s['moe_layers']} MoE layers ({s['naming']}), {s['num_experts']} experts, "
          f"d_model={s['d_model']}, d_ff={s['d_ff']}; N:V {s['pattern']} + 2:4, "
          f"sub_row={s['sub_row']}, {s['dtype']}")
    print(f"  experts {_mib(s['expert_bytes_before'])} -> {_mib(s['expert_bytes_after'])} "
          f"({s['expert_bytes_before'] / max(s['expert_bytes_after'], 1):.2f}x smaller); "
          f"file {_mib(s['bytes_before'])} -> {_mib(s['bytes_after'])}; "
          f"{s['tensors_copied']} other tensors copied")
    for i, rep in sorted(s["calibration"].items()):
        print(f"  layer {i}: calibrated on {rep['tokens']} tokens: layer output error "
              f"{rep['layer_error']:.4f} (magnitude {rep['layer_error_magnitude']:.4f}); "
              f"gate/up/down {rep['gate_error']:.4f}/{rep['up_error']:.4f}/"
              f"{rep['down_error']:.4f} (magnitude {rep['gate_error_magnitude']:.4f}/"
              f"{rep['up_error_magnitude']:.4f}/{rep['down_error_magnitude']:.4f})")
    print(f"  {s['seconds']:.1f} s")


# --- loading ---------------------------------------------------------------------------

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
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path!r} does not exist")
    try:
        return _load_checkpoint(path, top_k, load_other)
    except ConversionError:
        raise
    except Exception as err:  # an untrusted file: every parse failure is this error
        raise ConversionError(f"{path}: not a readable samoyeds-convert output "
                              f"({type(err).__name__}: {err})") from None


def _load_checkpoint(path: str, top_k: int | None, load_other: bool):
    import jax.numpy as jnp
    from safetensors import safe_open

    from samoyeds_jax.format import SparseWeight, SparsityConfig, validate

    _, fmeta = _read_header(path)
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
    with safe_open(path, framework="numpy") as fh:
        def get(name):
            used.add(name)
            return fh.get_tensor(name)

        for lm in info["layers"]:
            p = {"router": jnp.asarray(get(lm["router"]).T)}
            for wname in ("gate_up", "down"):
                parts = [get(f"{lm['prefix']}.{wname}.{part}") for part in SPARSE_PARTS]
                try:  # a tampered or corrupt file is refused here, not read by a kernel
                    validate(SparseWeight(*parts, sp), f"{lm['prefix']}.{wname}")
                except ValueError as err:
                    raise ConversionError(f"{path}: {err}") from None
                p[wname] = SparseWeight(*(jnp.asarray(a) for a in parts), sp)
            for key in ("shared_gate", "shared_up", "shared_down", "shared_expert_gate"):
                if key in lm:
                    p[key] = jnp.asarray(get(lm[key]).T)
            layers[lm["index"]] = p
        other = ({name: fh.get_tensor(name) for name in fh.keys() if name not in used}
                 if load_other else {})
    try:
        info["moe_config"] = moe_config(info, top_k)
    except ConversionError:
        info["moe_config"] = None
    return layers, info, other


# --- command line ----------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="samoyeds-convert",
        description="Convert a Hugging Face MoE safetensors checkpoint (Mixtral, Qwen2-MoE, "
                    "DeepSeek-MoE) to samoyeds_jax's dual-side sparse format (N:V + 2:4).")
    p.add_argument("--input", required=True,
                   help="checkpoint directory, index JSON or .safetensors file")
    p.add_argument("--output", required=True, help="output .safetensors file (must not exist)")
    p.add_argument("--pattern", required=True, help="N:V, e.g. 1:2 (1:1, 1:2, 1:4, 2:4)")
    p.add_argument("--sub-row", type=int, default=128, help="sub-row length L (32, 64, 128)")
    p.add_argument("--calibration", default=None,
                   help="safetensors/npz with layers.{i}.inputs [n, d_model] for calibrated "
                        "(SparseGPT) pruning; default: magnitude pruning")
    p.add_argument("--top-k", type=int, default=None,
                   help="experts per token (default: num_experts_per_tok of config.json)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16"),
                   help="dtype of the sparse values (auto: the checkpoint's 16-bit dtype)")
    p.add_argument("--damp", type=float, default=0.01, help="calibration Hessian dampening")
    p.add_argument("--block", type=int, default=None, help="calibration column block")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p


def main(argv: list[str] | None = None) -> int:
    """``samoyeds-convert`` entry point; returns the exit status (0 on success)."""
    args = _parser().parse_args(argv)
    try:
        convert(args.input, args.output, pattern=args.pattern, sub_row=args.sub_row,
                calibration=args.calibration, top_k=args.top_k, dtype=args.dtype,
                damp=args.damp, block=args.block, progress=not args.quiet,
                verbose=not args.quiet)
    except (ValueError, TypeError, OSError) as err:  # ConversionError is a ValueError
        print(f"samoyeds-convert: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
