"""Hugging Face checkpoints: finding the input's tensors (a directory, an index JSON and
its shards, or one file), recognising the MoE naming, and translating ``config.json``.

Recognised namings (torch ``Linear`` layout ``[out, in]``):

* Mixtral: ``model.layers.{i}.block_sparse_moe.experts.{j}.w1/w3/w2.weight`` (gate, up
  ``[f, d]``; down ``[d, f]``), router ``model.layers.{i}.block_sparse_moe.gate.weight``
  ``[E, d]``;
* Qwen2-MoE / DeepSeek-MoE: ``model.layers.{i}.mlp.experts.{j}.gate_proj/up_proj/
  down_proj.weight``, router ``model.layers.{i}.mlp.gate.weight``, shared experts
  ``mlp.shared_expert.*`` (Qwen2-MoE, with ``mlp.shared_expert_gate.weight [1, d]``) or
  ``mlp.shared_experts.*`` (DeepSeek-MoE). Layers without routed experts (DeepSeek's
  first dense layer) are not MoE layers.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Iterator

from samoyeds_jax.checkpoint.safetensors_io import Entry, Reader
from samoyeds_jax.checkpoint.schema import ConversionError
from samoyeds_jax.layout import SHARED_GATE_KEY

_MIXTRAL_EXPERT = re.compile(
    r"^model\.layers\.([0-9]+)\.block_sparse_moe\.experts\.([0-9]+)\.(.+)$", re.S)
_MLP_EXPERT = re.compile(r"^model\.layers\.([0-9]+)\.mlp\.experts\.([0-9]+)\.(.+)$", re.S)
_LAYER = re.compile(r"^model\.layers\.([0-9]+)\.")
# Layer and expert numbers in tensor names: canonical decimals (no leading zeros, which
# would make two names one) below this bound, checked before anything is sized by them.
MAX_NAME_NUMBER = 1 << 20
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

# --- input discovery ----------------------------------------------------------------

def _resolve_input(path: str, reader: Reader) -> tuple[list[str], str | None, str]:
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
        files = sorted(reader.member(path, f, f"input directory {path!r}")
                       for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ConversionError(f"input directory {path!r} has no *.safetensors files")
        return files, None, path
    if path.endswith(".json"):
        return [], path, os.path.dirname(os.path.abspath(path))
    return [path], None, os.path.dirname(os.path.abspath(path))


def index_source(path: str, reader: Reader) -> tuple[dict[str, Entry], str]:
    """All tensors of the input (name -> entry) and the directory to look for config.json.

    An index's ``weight_map`` must map tensor names to shard file names inside the index's
    directory (:meth:`Reader.member`)."""
    files, index, cfg_dir = _resolve_input(path, reader)
    entries: dict[str, Entry] = {}
    if index is not None:
        doc = reader.json(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index}: not a safetensors index (needs a non-empty "
                                  f"'weight_map' object of tensor name -> shard file)")
        base = os.path.dirname(os.path.abspath(index))
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            shard = reader.member(base, fname, f"{index}: tensor {name!r}")
            by_file.setdefault(shard, []).append(name)
        for fpath, names in sorted(by_file.items()):
            if not os.path.isfile(fpath):
                raise ConversionError(f"{index}: shard {os.path.basename(fpath)!r} (holding "
                                      f"{names[0]!r}, ...) is missing")
            shard, _ = reader.header(fpath)
            for name in names:
                if name not in shard:
                    raise ConversionError(f"{index}: tensor {name!r} is not in shard "
                                          f"{os.path.basename(fpath)!r}")
                entries[name] = shard[name]
    else:
        for fpath in files:
            shard, _ = reader.header(fpath)
            for name, entry in shard.items():
                if name in entries:
                    raise ConversionError(f"tensor {name!r} is in both {entries[name].file} "
                                          f"and {fpath}")
                entries[name] = entry
    return entries, cfg_dir


@dataclasses.dataclass
class Layer:
    """One MoE layer of the input: the names of its tensors."""

    index: int
    experts: dict[str, list[str]]          # gate/up/down -> per-expert tensor names
    router: str
    shared: dict[str, str]                  # shared_gate/up/down (+ shared_expert_gate)


@dataclasses.dataclass
class Plan:
    """The input's MoE structure: naming, layers, and the sizes all its layers share."""

    naming: str
    layers: list[Layer]
    num_experts: int
    d_model: int
    d_ff: int
    d_ff_shared: int
    shared_expert_gate: bool
    src_dtype: str


def detect(entries: dict[str, Entry]) -> Plan:
    """The MoE layers of a checkpoint (ConversionError unless it holds uniform ones)."""
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
            raise ConversionError(f"unsupported expert tensor {name[:200]!r} (expected only "
                                  f"{', '.join(sorted(proj.values()))}; quantized or "
                                  f"biased experts are not supported)")
        i, j = _number(i, "layer", name), _number(j, "expert", name)
        by_layer.setdefault(i, {}).setdefault(j, {})[proj_key[rest]] = name
    layers = []
    shapes = set()
    shared_dims = set()
    has_gate = set()
    dtypes = set()
    for i in sorted(by_layer):
        experts = by_layer[i]
        e = max(experts) + 1
        # Ids are distinct, so when the largest is past the count one of 0..count is
        # missing: look no further than that (never as far as a hostile id).
        missing = [j for j in range(min(e, len(experts) + 1)) if j not in experts][:8]
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
                    raise ConversionError(f"{_at(entries, lists[key][j])}: shape "
                                          f"{list(got.shape)}, expected {list(want)} (like "
                                          f"{lists['gate'][0]})")
                dtypes.add(got.dtype)
        router = router_fmt.format(i=i)
        if router not in entries:
            raise ConversionError(f"layer {i}: router tensor {router!r} is missing")
        if entries[router].shape != (e, d_):
            raise ConversionError(f"{_at(entries, router)}: shape "
                                  f"{list(entries[router].shape)}, expected "
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
                    raise ConversionError(f"{_at(entries, shared[key])}: shape "
                                          f"{list(entries[shared[key]].shape)}, expected "
                                          f"{list(want)}")
            shared_dims.add(fs)
            sg = _SHARED_GATE.format(i=i)
            if sg in entries:
                if entries[sg].shape != (1, d_):
                    raise ConversionError(f"{_at(entries, sg)}: shape "
                                          f"{list(entries[sg].shape)}, expected [1, {d_}]")
                shared[SHARED_GATE_KEY] = sg
        else:
            shared_dims.add(0)
        has_gate.add(SHARED_GATE_KEY in shared)
        shapes.add((e, d_, f_))
        layers.append(Layer(i, lists, router, shared))
    if len(shapes) > 1 or len(shared_dims) > 1 or len(has_gate) > 1:
        raise ConversionError(f"MoE layers differ in shape (E, d_model, d_ff) {sorted(shapes)} "
                              f"or shared experts; only uniform layers are supported")
    if len(dtypes) > 1:
        raise ConversionError(f"expert weights have mixed dtypes {sorted(dtypes)}")
    (e, d_, f_), = shapes
    if naming == "mlp_experts":
        naming = ("deepseek_moe" if any(".shared_experts." in s for l in layers
                                        for s in l.shared.values()) else "qwen2_moe")
    return Plan(naming, layers, e, d_, f_, shared_dims.pop(), has_gate.pop(), dtypes.pop())


def _number(text: str, what: str, name: str) -> int:
    """A layer or expert number of tensor ``name``: canonical and bounded."""
    if len(text) > len(str(MAX_NAME_NUMBER)) or (len(text) > 1 and text[0] == "0") or \
            int(text) >= MAX_NAME_NUMBER:
        raise ConversionError(f"tensor {name[:200]!r}: {what} number {text[:20]!r} must be "
                              f"a decimal below {MAX_NAME_NUMBER} without leading zeros")
    return int(text)


def _expert_name(naming: str, i: int, j: int, pname: str) -> str:
    if naming == "mixtral":
        return f"model.layers.{i}.block_sparse_moe.experts.{j}.{pname}"
    return f"model.layers.{i}.mlp.experts.{j}.{pname}"


def _at(entries: dict[str, Entry], name: str) -> str:
    """``file: tensor`` for messages about an input tensor."""
    return f"{entries[name].file}: {name}"


def _shape2(entries, name) -> tuple[int, int]:
    shape = entries[name].shape
    if len(shape) != 2:
        raise ConversionError(f"{_at(entries, name)}: expected a 2-D weight, got shape "
                              f"{list(shape)}")
    return shape


# The config.json fields the converter reads, and the JSON types each may have.
_FIELD_TYPES = {"num_experts_per_tok": int, "num_hidden_layers": int, "n_shared_experts": int,
                "norm_topk_prob": bool, "scoring_func": str, "hidden_act": str}


def read_config(cfg_dir: str, reader: Reader) -> dict:
    """``config.json`` in cfg_dir ({} when there is none); ConversionError naming the
    field when a field the converter reads has the wrong JSON type."""
    if not os.path.lexists(os.path.join(cfg_dir, "config.json")):
        return {}
    path = reader.member(cfg_dir, "config.json", cfg_dir)
    cfg = reader.json(path)
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: must be a JSON object")
    for key, typ in _FIELD_TYPES.items():
        val = cfg.get(key)
        ok = val is None or (isinstance(val, typ) and
                             (typ is bool or not isinstance(val, bool)))
        if not ok or (typ is int and val is not None and not 0 <= val < MAX_NAME_NUMBER):
            kind = ("a non-negative int" if typ is int else
                    {bool: "a boolean", str: "a string"}[typ])
            raise ConversionError(f"{path}: {key} must be {kind}, got {str(val)[:40]!r}")
    return cfg


CONFIG_FIELDS = ("model_type", "architectures", "num_hidden_layers", "hidden_size",
                  "num_experts_per_tok", "num_local_experts", "num_experts", "n_routed_experts",
                  "n_shared_experts", "moe_intermediate_size", "intermediate_size",
                  "shared_expert_intermediate_size", "norm_topk_prob", "scoring_func",
                  "hidden_act", "first_k_dense_replace", "routed_scaling_factor",
                  "torch_dtype")


def moe_info(plan: Plan, hf: dict, top_k: int | None) -> dict:
    """The MoEConfig fields (but sparsity) of the input; ``top_k`` None when neither the
    caller nor config.json gives it."""
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


def layer_numbers(entries) -> Iterator[int]:
    """The i of every ``model.layers.{i}.`` tensor name."""
    for name in entries:
        m = _LAYER.match(name)
        if m:
            yield _number(m.group(1), "layer", name)
