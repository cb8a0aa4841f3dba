"""samoyeds-convert (samoyeds_jax.checkpoint): Hugging Face MoE safetensors -> sparse format.

Tiny checkpoints (d_model 64, d_ff 96, 4 experts, sub_row 32, pattern 1:2) in the Mixtral,
Qwen2-MoE and DeepSeek-MoE namings are written with ``safetensors.numpy.save_file``
(bfloat16 through ml_dtypes, float16, and float32 that the converter casts to bfloat16).
Checked: the loaded SparseWeights decode exactly to the pruned dense weights, ``sj.moe``
on the loaded layer matches ``sj.moe_dense`` on the pruned dense layer (``twin`` of
tests/helpers.py), every tensor that is not a
routed expert weight is byte-identical in the output, and every bad input fails with a
clear message and leaves nothing behind.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import samoyeds_jax as sj
from helpers import rand, tol
from samoyeds_jax import checkpoint as ck
from samoyeds_jax.checkpoint import converter
from samoyeds_jax.checkpoint.safetensors_io import Reader

D, F, E, FS = 64, 96, 4, 64
SP = sj.SparsityConfig(1, 2, 32)
ARGS = ["--nv", "1:2", "--sub_row", "32", "--quiet"]
BF16 = np.dtype(ml_dtypes.bfloat16)


def tensor(rng, shape, dtype):
    """A checkpoint tensor: numpy (safetensors.numpy writes numpy), values ~0.1."""
    return np.asarray(rand(rng, shape, dtype, 0.1))


def hf_checkpoint(naming, rng, dtype, layers=2, d=D, f=F, e=E):
    """HF-named tensors of a tiny model. naming: mixtral | qwen2 | deepseek (layer 0 of
    deepseek is a dense MLP, as with first_k_dense_replace=1)."""
    t = {"model.embed_tokens.weight": tensor(rng, (32, d), dtype),
         "model.norm.weight": tensor(rng, (d,), dtype),
         "lm_head.weight": tensor(rng, (32, d), dtype),
         "model.extra_int_buffer": np.arange(10, dtype=np.int32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = tensor(rng, (d,), dtype)
        t[p + "post_attention_layernorm.weight"] = tensor(rng, (d,), dtype)
        t[p + "self_attn.q_proj.weight"] = tensor(rng, (d, d), dtype)
        if naming == "mixtral":
            m = p + "block_sparse_moe."
            t[m + "gate.weight"] = tensor(rng, (e, d), dtype)
            for j in range(e):
                t[m + f"experts.{j}.w1.weight"] = tensor(rng, (f, d), dtype)
                t[m + f"experts.{j}.w3.weight"] = tensor(rng, (f, d), dtype)
                t[m + f"experts.{j}.w2.weight"] = tensor(rng, (d, f), dtype)
            continue
        m = p + "mlp."
        if naming == "deepseek" and i == 0:
            t[m + "gate_proj.weight"] = tensor(rng, (2 * f, d), dtype)
            t[m + "up_proj.weight"] = tensor(rng, (2 * f, d), dtype)
            t[m + "down_proj.weight"] = tensor(rng, (d, 2 * f), dtype)
            continue
        t[m + "gate.weight"] = tensor(rng, (e, d), dtype)
        for j in range(e):
            t[m + f"experts.{j}.gate_proj.weight"] = tensor(rng, (f, d), dtype)
            t[m + f"experts.{j}.up_proj.weight"] = tensor(rng, (f, d), dtype)
            t[m + f"experts.{j}.down_proj.weight"] = tensor(rng, (d, f), dtype)
        s = m + ("shared_expert." if naming == "qwen2" else "shared_experts.")
        t[s + "gate_proj.weight"] = tensor(rng, (FS, d), dtype)
        t[s + "up_proj.weight"] = tensor(rng, (FS, d), dtype)
        t[s + "down_proj.weight"] = tensor(rng, (d, FS), dtype)
        if naming == "qwen2":
            t[m + "shared_expert_gate.weight"] = tensor(rng, (1, d), dtype)
    return t


def hf_config(naming):
    return {"mixtral": {"model_type": "mixtral", "num_experts_per_tok": 2,
                        "num_local_experts": E, "hidden_act": "silu"},
            "qwen2": {"model_type": "qwen2_moe", "num_experts_per_tok": 2, "num_experts": E,
                      "norm_topk_prob": False, "shared_expert_intermediate_size": FS},
            "deepseek": {"model_type": "deepseek", "num_experts_per_tok": 2,
                         "n_routed_experts": E, "n_shared_experts": 1,
                         "first_k_dense_replace": 1}}[naming]


def write_model(tmp_path, tensors, config=None, shards=1, name="model"):
    """Save tensors as one file or `shards` shards with an index JSON; returns the dir."""
    d = tmp_path / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
        return d
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, str(d / fname))
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def expert_weights(tensors, naming, i, dtype):
    """Our [E, in, out] gate/up/down of layer i, cast to the sparse dtype."""
    if naming == "mixtral":
        fmt = f"model.layers.{i}.block_sparse_moe.experts.{{j}}.{{p}}.weight"
        proj = {"gate": "w1", "up": "w3", "down": "w2"}
    else:
        fmt = f"model.layers.{i}.mlp.experts.{{j}}.{{p}}.weight"
        proj = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    return {k: jnp.asarray(np.stack([tensors[fmt.format(j=j, p=p)].T for j in range(E)]
                                    ).astype(dtype)) for k, p in proj.items()}


def raw_tensors(path):
    """name -> raw bytes of every tensor of a safetensors file."""
    with Reader() as reader:
        entries, _ = reader.header(str(path))
    out = {}
    with open(path, "rb") as f:
        for name, ent in entries.items():
            f.seek(ent.offset)
            out[name] = (ent.dtype, ent.shape, f.read(ent.nbytes))
    return out


def check_converted(out, src_dir, tensors, naming, dtype, rng, pruned_override=None):
    """Round trip, layer output vs the dense twin, and byte-identical pass-through."""
    layers, info, other = sj.load_checkpoint(str(out))
    cfg = info["moe_config"]
    assert cfg is not None and cfg.sparsity == SP and cfg.top_k == 2
    assert info["dtype"] == jnp.dtype(dtype).name
    moe_ids = [1, 2] if naming == "deepseek" else [0, 1]
    assert list(layers) == moe_ids
    src = {}
    for fname in sorted(os.listdir(src_dir)):
        if fname.endswith(".safetensors"):
            src.update(raw_tensors(src_dir / fname))
    dst = raw_tensors(out)
    expert_tag = "block_sparse_moe.experts." if naming == "mixtral" else "mlp.experts."
    copied = [n for n in src if expert_tag not in n]
    for n in copied:                                   # byte-identical pass-through
        assert dst[n] == src[n], n
    assert not [n for n in dst if expert_tag in n]
    consumed = {v for lm in info["layers"] for k, v in lm.items()
                if k == "router" or k.startswith("shared")}
    assert set(other) == set(copied) - consumed
    for n, a in other.items():
        np.testing.assert_array_equal(a, tensors[n])
        assert a.dtype == tensors[n].dtype
    x = rand(rng, (24, D))
    for i, p in layers.items():
        w = expert_weights(tensors, naming, i, dtype)
        pruned = (pruned_override or {}).get(i) or {k: sj.prune(v, SP) for k, v in w.items()}
        gu = sj.decode(p["gate_up"])
        np.testing.assert_array_equal(np.asarray(gu[..., :F]), np.asarray(pruned["gate"]))
        np.testing.assert_array_equal(np.asarray(gu[..., F:]), np.asarray(pruned["up"]))
        np.testing.assert_array_equal(np.asarray(sj.decode(p["down"])),
                                      np.asarray(pruned["down"]))
        assert p["gate_up"].dtype == jnp.dtype(dtype)
        dense = {k: v for k, v in p.items() if k not in ("gate_up", "down")} | pruned
        y = sj.moe(p, x, cfg)
        y_ref = sj.moe_dense(dense, x, cfg)
        err = float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref))
        assert err < tol("twin", dtype), (i, err)
    return layers, info, cfg


def test_mixtral_bf16_single_file(tmp_path, rng, capsys, monkeypatch):
    # 2 experts at a time (samoyeds_jax.moe the module: sj.moe is the layer function)
    monkeypatch.setattr(importlib.import_module("samoyeds_jax.moe"), "_CHUNK_ELEMS",
                        2 * 3 * D * F)
    tensors = hf_checkpoint("mixtral", rng, BF16)
    src = write_model(tmp_path, tensors, hf_config("mixtral"))
    out = tmp_path / "out" / "sparse.safetensors"
    out.parent.mkdir()
    # The older flag spellings stay accepted.
    assert ck.main(["--input", str(src), "--output", str(out), "--pattern", "1:2",
                    "--sub-row", "32"]) == 0
    summary = capsys.readouterr().out
    assert "2 MoE layers (mixtral)" in summary and "MiB" in summary
    assert os.listdir(out.parent) == ["sparse.safetensors"]      # no temp file left
    layers, info, cfg = check_converted(out, src, tensors, "mixtral", jnp.bfloat16, rng)
    assert cfg.router == "mixtral" and not cfg.has_shared
    assert info["source"]["naming"] == "mixtral"
    assert all(lm["pruning"] == "magnitude" for lm in info["layers"])
    np.testing.assert_array_equal(
        np.asarray(layers[0]["router"]),
        tensors["model.layers.0.block_sparse_moe.gate.weight"].T)
    flax = pytest.importorskip("samoyeds_jax.flax")
    x = rand(rng, (8, D))
    np.testing.assert_array_equal(np.asarray(flax.SparseMoE(cfg, params=layers[1])(x)),
                                  np.asarray(sj.moe(layers[1], x, cfg)))


def test_qwen2_sharded_float32_via_subprocess(tmp_path, rng):
    """Sharded with an index JSON, float32 checkpoint cast to bfloat16, shared expert with
    its sigmoid gate; run as `python -m samoyeds_jax.checkpoint`."""
    tensors = hf_checkpoint("qwen2", rng, np.float32)
    src = write_model(tmp_path, tensors, hf_config("qwen2"), shards=3)
    out = tmp_path / "qwen.safetensors"
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(sj.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [pkg_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "samoyeds_jax.checkpoint", "--input",
                          str(src), "--output", str(out), *ARGS], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    layers, info, cfg = check_converted(out, src, tensors, "qwen2", jnp.bfloat16, rng)
    assert info["source"]["naming"] == "qwen2_moe" and info["source"]["dtype"] == "float32"
    assert cfg.router == "softmax_topk" and cfg.shared_expert_gate and cfg.d_ff_shared == FS
    assert cfg.num_shared_experts == 1
    p = layers[1]
    np.testing.assert_array_equal(
        np.asarray(p["shared_expert_gate"]),
        tensors["model.layers.1.mlp.shared_expert_gate.weight"].T)
    np.testing.assert_array_equal(np.asarray(p["shared_down"]),
                                  tensors["model.layers.1.mlp.shared_expert.down_proj.weight"].T)


def test_deepseek_fp16_calibrated(tmp_path, rng):
    """Dense first layer copied through; layer 1 calibrated from an npz, layer 2 (no inputs)
    magnitude-pruned; the calibrated layer reconstructs better than magnitude pruning."""
    tensors = hf_checkpoint("deepseek", rng, np.float16, layers=3)
    src = write_model(tmp_path, tensors, hf_config("deepseek"))
    x1 = rng.standard_normal((192, D)).astype(np.float32)
    x1[:, :3] *= 20.0                                            # outlier channels
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{"layers.1.inputs": x1})
    out = tmp_path / "ds.safetensors"
    assert ck.main(["--input", str(src), "--output", str(out), *ARGS,
                    "--calibration", str(calib)]) == 0
    _, info, _ = sj.load_checkpoint(str(out), load_other=False)
    cfg = info["moe_config"]
    assert [lm["pruning"] for lm in info["layers"]] == ["calibrated", "magnitude"]
    assert info["source"]["naming"] == "deepseek_moe" and cfg.num_shared_experts == 1
    dense = {"router": jnp.asarray(tensors["model.layers.1.mlp.gate.weight"].T)}
    for k, n in (("shared_gate", "gate_proj"), ("shared_up", "up_proj"),
                 ("shared_down", "down_proj")):
        dense[k] = jnp.asarray(tensors[f"model.layers.1.mlp.shared_experts.{n}.weight"].T)
    dense |= expert_weights(tensors, "deepseek", 1, np.float16)
    dense["router"] = dense["router"].astype(jnp.float32)
    want, rep = sj.calibrate_moe(dense, cfg, x1, return_report=True)
    assert rep["layer_error"] < rep["layer_error_magnitude"], rep
    check_converted(out, src, tensors, "deepseek", jnp.float16, rng,
                    pruned_override={1: {k: want[k] for k in ("gate", "up", "down")}})


# --- bad inputs ------------------------------------------------------------------------

def _drop(t, name):
    t = dict(t)
    del t[name]
    return t


BAD = {
    # case: (tensors edit, extra args, message fragment)
    "missing_expert": (lambda t: _drop(t, "model.layers.1.block_sparse_moe.experts.2.w3.weight"),
                       [], "experts.2.w3.weight' is missing"),
    "missing_router": (lambda t: _drop(t, "model.layers.0.block_sparse_moe.gate.weight"), [],
                       "router tensor"),
    "missing_whole_expert": (
        lambda t: {k: v for k, v in t.items() if ".experts.1." not in k}, [],
        "experts [1] are missing"),
    "bad_expert_shape": (
        lambda t: t | {"model.layers.0.block_sparse_moe.experts.3.w2.weight":
                       np.zeros((D, F + 32), BF16)}, [], "experts.3.w2.weight: shape"),
    "non_moe": (lambda t: {k: v for k, v in t.items() if "block_sparse_moe" not in k}, [],
                "not a MoE checkpoint"),
    "bad_pattern": (lambda t: t, ["--pattern", "3:4"], "3:4 is not supported"),
    "bad_pattern_text": (lambda t: t, ["--pattern", "half"], "N:V"),
    "bad_sub_row": (lambda t: t, ["--sub-row", "48"], "sub_row=48"),
    "calib_no_keys": (lambda t: t, ["--calibration", "CALIB"], "no inputs for any MoE layer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_clearly_and_leaves_nothing(case, tmp_path, rng, capsys):
    edit, extra, msg = BAD[case]
    tensors = edit(hf_checkpoint("mixtral", rng, BF16))
    src = write_model(tmp_path, tensors, hf_config("mixtral"))
    np.savez(tmp_path / "calib.npz", **{"layers.7.inputs": np.ones((4, D), np.float32)})
    extra = [str(tmp_path / "calib.npz") if a == "CALIB" else a for a in extra]
    outdir = tmp_path / "out"
    outdir.mkdir()
    args = ["--input", str(src), "--output", str(outdir / "o.safetensors"),
            *ARGS]
    assert ck.main(args + extra) == 2
    err = capsys.readouterr().err
    assert "samoyeds-convert: error:" in err and msg in err, err
    assert os.listdir(outdir) == []


def test_shapes_breaking_the_format(tmp_path, rng, capsys):
    tensors = hf_checkpoint("mixtral", rng, BF16, layers=1, d=48)
    src = write_model(tmp_path, tensors, hf_config("mixtral"))
    out = tmp_path / "o.safetensors"
    assert ck.main(["--input", str(src), "--output", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "d_model=48" in err and "multiple of" in err, err
    assert not out.exists()


def test_output_exists_and_sharded_problems(tmp_path, rng, capsys):
    tensors = hf_checkpoint("mixtral", rng, BF16, layers=1)
    src = write_model(tmp_path, tensors, hf_config("mixtral"), shards=2)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert ck.main(["--input", str(src), "--output", str(out), *ARGS]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    # An index that points at a missing shard, and one that names a tensor not in its shard.
    index = json.loads((src / "model.safetensors.index.json").read_text())
    (src / "model-00002-of-00002.safetensors").rename(src / "moved.safetensors")
    new = tmp_path / "new.safetensors"
    assert ck.main(["--input", str(src), "--output", str(new), *ARGS]) == 2
    assert "model-00002-of-00002.safetensors' (holding" in capsys.readouterr().err
    (src / "moved.safetensors").rename(src / "model-00002-of-00002.safetensors")
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert ck.main(["--input", str(src / "model.safetensors.index.json"), "--output",
                    str(new), *ARGS]) == 2
    assert "'model.ghost.weight' is not in shard" in capsys.readouterr().err
    assert ck.main(["--input", str(tmp_path / "nope"), "--output", str(new), *ARGS]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ck.main(["--input", str(src), "--output", str(tmp_path / "no" / "o"), *ARGS]) == 2
    assert "output directory" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["model", "o.safetensors"]


def test_failure_mid_write_leaves_nothing(tmp_path, rng, monkeypatch):
    tensors = hf_checkpoint("mixtral", rng, BF16)
    src = write_model(tmp_path, tensors, hf_config("mixtral"))
    real = converter._convert_layer

    def flaky(layer, *a, **kw):
        if layer.index == 1:
            raise RuntimeError("disk on fire")
        return real(layer, *a, **kw)

    monkeypatch.setattr(converter, "_convert_layer", flaky)
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(RuntimeError, match="disk on fire"):
        ck.convert(str(src), str(outdir / "o.safetensors"), "1:2", 32, progress=False,
                   verbose=False)
    assert os.listdir(outdir) == []


def test_load_checkpoint_rejects_unconverted_and_needs_top_k(tmp_path, rng):
    tensors = hf_checkpoint("mixtral", rng, BF16, layers=1)
    src = write_model(tmp_path, tensors)                         # no config.json: no top_k
    with pytest.raises(ValueError, match="not a samoyeds-convert output"):
        sj.load_checkpoint(str(src / "model.safetensors"))
    out = tmp_path / "o.safetensors"
    ck.convert(str(src / "model.safetensors"), str(out), "1:2", 32, progress=False,
               verbose=False)
    layers, info, _ = sj.load_checkpoint(str(out))
    assert info["moe_config"] is None and info["moe"]["top_k"] is None
    layers, info, _ = sj.load_checkpoint(str(out), top_k=3)
    assert info["moe_config"].top_k == 3
    # Calibrated pruning routes its inputs, so it needs top_k up front.
    with pytest.raises(ValueError, match="needs top_k"):
        ck.convert(str(src), str(tmp_path / "c.safetensors"), "1:2", 32,
                   calibration=str(tmp_path / "missing.npz"), progress=False, verbose=False)


def test_load_checkpoint_refuses_garbage_with_its_own_error(tmp_path):
    # Found by scripts/fuzz_checkpoint.py: a 4-byte file leaked a raw SafetensorError.
    from samoyeds_jax.checkpoint import ConversionError
    bad = tmp_path / "garbage.safetensors"
    for blob in (b"\x01\x00N\n", b"", b"\xff" * 64):
        bad.write_bytes(blob)
        with pytest.raises(ConversionError, match="garbage.safetensors"):
            sj.load_checkpoint(str(bad))
