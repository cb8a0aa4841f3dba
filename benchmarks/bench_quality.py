"""Quality benchmark: what the N:V + 2:4 pattern costs a real model, and what a short
sparse fine-tune recovers.

  python benchmarks/bench_quality.py --size=full --json_out=quality.json --plot=quality.png
  python benchmarks/bench_quality.py --size=smoke           # the pipeline in seconds, CPU
  python benchmarks/bench_quality.py --from_json=quality.json --plot=quality.png  # redraw

The model: a byte-level language model, a pre-norm transformer (causal attention with
rotary positions) whose feed-forward is a routed MoE (``--experts``, ``--top_k``, SwiGLU
experts, a Switch load-balancing loss), written with flax nnx and trained from scratch
here on the Python standard library's own source (every machine has it; nobody here
wrote it). Whole top-level modules are held out for evaluation (``--eval_every``: one
module in N, chosen by a hash of its name); test suites and site-packages are left out.

Reported, as held-out perplexity per byte:

* ``dense``: the trained model, its experts rounded to bfloat16 (the experts' dtype in
  every sparse variant; ``dense_f32`` is the float32 model as trained);
* ``magnitude`` and ``calibrated`` at each ``--nv`` pattern: the routed experts pruned
  with ``sj.prune`` (through ``sj.sparsify_moe``) or with ``sj.calibrate_moe``
  (SparseGPT for the pattern; layer by layer, each layer calibrated on its inputs in the
  model whose earlier layers are already pruned, over ``--calib_batches`` training
  batches), then encoded and run through ``sj.moe``;
* ``... +recovery``: each pruned model after ``--recover_frac`` of the pretraining steps
  of sparse fine-tuning with the pattern fixed (``samoyeds_jax.flax.SparseMoE`` with
  trainable kept values, float32 master copies; every other weight trained too), by
  self-distillation: the KL divergence to the dense model's next-byte distribution;
* ``dense+continued``, the control: the dense model trained as many more steps at the
  same learning rate (what the extra steps alone are worth).

The dense model's experts run through ``sj.backward.expert_blocks`` (blocks of rows
inside one expert, batched matmuls): on the CPU ``jax.lax.ragged_dot`` would multiply
every row by every expert.

Sizes (``--size``; every flag below overrides its preset): ``smoke`` runs the whole
pipeline in seconds (its numbers mean nothing); ``cpu`` is the reduced size recorded in
BENCHMARKS.md from a 2-core CPU (~20 minutes); ``full`` is for a GPU (a few minutes).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import sys
import sysconfig
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import samoyeds_jax as sj
from samoyeds_jax import _cli
from samoyeds_jax._util import parse_nv
from samoyeds_jax.backward import block_rows, expert_blocks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Size:
    layers: int
    d_model: int
    d_ff: int
    heads: int
    experts: int
    seq: int
    batch: int
    steps: int
    eval_tokens: int
    calib_batches: int
    lr: float


SIZES = {
    "smoke": Size(layers=2, d_model=64, d_ff=64, heads=2, experts=4, seq=32, batch=4,
                  steps=20, eval_tokens=2048, calib_batches=1, lr=3e-3),
    "cpu": Size(layers=4, d_model=128, d_ff=256, heads=4, experts=8, seq=128, batch=16,
                steps=800, eval_tokens=65536, calib_batches=4, lr=3e-3),
    "full": Size(layers=6, d_model=256, d_ff=512, heads=8, experts=8, seq=256, batch=32,
                 steps=3000, eval_tokens=1 << 20, calib_batches=8, lr=2e-3),
}

flags.DEFINE_enum("size", "cpu", list(SIZES), "preset of the sizes below")
for _field in dataclasses.fields(Size):
    _kind = flags.DEFINE_float if _field.type in (float, "float") else flags.DEFINE_integer
    _kind(_field.name, None, f"override the --size preset's {_field.name}")
_cli.define_top_k_flag("experts per token (default 2)")
_cli.define_sub_row_flag()
flags.DEFINE_list("nv", ["1:1", "1:2", "1:4"], "N:V patterns of the routed experts")
flags.DEFINE_float("recover_frac", 0.1, "sparse fine-tune steps, as a fraction of --steps")
flags.DEFINE_float("recover_lr_scale", 0.3, "fine-tune peak learning rate / --lr")
flags.DEFINE_float("aux_loss", 0.01, "weight of the Switch load-balancing loss")
flags.DEFINE_integer("eval_every", 8, "hold out one top-level stdlib module in N")
flags.DEFINE_integer("seed", 0, "initialisation and data order")
flags.DEFINE_string("json_out", "", "write the results here (JSON)")
flags.DEFINE_string("plot", "", "write the perplexity plot here (PNG; needs matplotlib)")
flags.DEFINE_string("from_json", "", "redraw --plot / reprint the table from this JSON "
                    "instead of running")
FLAGS.set_default("sub_row", 32)

VOCAB = 256


# --- the corpus ------------------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


def corpus(eval_every: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The standard library's ``*.py`` bytes: ``(train, held_out, info)``. A file belongs
    to its top-level module (``json/decoder.py`` -> ``json``); one module in
    ``eval_every`` (by crc32 of its name) is held out."""
    root = sysconfig.get_paths()["stdlib"]
    train, held, held_names = [], [], set()
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(d, f), root)
            top = rel.split(os.sep)[0].removesuffix(".py")
            with open(os.path.join(d, f), "rb") as fh:
                data = fh.read() + b"\n\n"
            if zlib.crc32(top.encode()) % eval_every == 0:
                held.append(data)
                held_names.add(top)
            else:
                train.append(data)
    if not train or not held:
        raise app.UsageError(f"the standard library at {root} gave no train or held-out "
                             f"files (--eval_every={eval_every})")
    tr = np.frombuffer(b"".join(train), np.uint8)
    ho = np.frombuffer(b"".join(held), np.uint8)
    info = dict(stdlib=root, python=platform.python_version(), train_bytes=int(tr.size),
                held_out_bytes=int(ho.size), held_out_modules=sorted(held_names))
    return tr, ho, info


def train_batches(data: np.ndarray, batch: int, seq: int, seed: int):
    """Endless random windows ``[batch, seq + 1]`` int32 of the training bytes."""
    rng = np.random.default_rng(seed)
    while True:
        start = rng.integers(0, data.size - seq - 1, batch)
        yield jnp.asarray(data[start[:, None] + np.arange(seq + 1)], jnp.int32)


def eval_batches(data: np.ndarray, tokens: int, batch: int, seq: int) -> list[jax.Array]:
    """Fixed windows spread evenly over the held-out bytes, ``tokens`` predictions."""
    n = max(batch, tokens // seq // batch * batch)
    start = np.linspace(0, data.size - seq - 2, n).astype(np.int64)
    w = data[start[:, None] + np.arange(seq + 1)].astype(np.int32)
    return [jnp.asarray(w[i:i + batch]) for i in range(0, n, batch)]


# --- the model ---------------------------------------------------------------------------

def grouped(a: jax.Array, w: jax.Array, gs: jax.Array) -> jax.Array:
    """``out[r] = a[r] @ w[e(r)]`` float32 for rows ``a [R, K]`` grouped by expert, ``w
    [E, K, N]``: batched matmuls over blocks of rows inside one expert."""
    r, e = a.shape[0], w.shape[0]
    expert, row, valid = expert_blocks(gs, r, block_rows(r, e))
    ab = jnp.where(valid[..., None], a[row], 0)
    yb = jnp.einsum("nbk,nkm->nbm", ab, w[expert], preferred_element_type=jnp.float32)
    dst = jnp.where(valid, row, r)
    return jnp.zeros((r, w.shape[-1]), jnp.float32).at[dst].set(yb, mode="drop")


def moe_blocked(p: dict, x: jax.Array, cfg: sj.MoEConfig, dtype: Any) -> jax.Array:
    """The dense MoE layer (``sj.moe_dense``'s stages and rounding points) with the
    experts through :func:`grouped`; experts in ``dtype``. ``x [T, d]`` -> ``[T, d]``."""
    weights, experts = sj.route(p["router"], x, cfg)
    sel, gs, order = sj.dispatch(experts, cfg.num_experts)
    xs = x.astype(dtype)[sel]
    g = grouped(xs, p["gate"].astype(dtype), gs).astype(dtype)
    u = grouped(xs, p["up"].astype(dtype), gs).astype(dtype)
    h = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(dtype)
    y = grouped(h, p["down"].astype(dtype), gs).astype(dtype)
    return sj.combine(y, weights, order).astype(x.dtype)


def build_modules():
    """The nnx modules (flax is imported here, not at module import)."""
    from flax import nnx

    class BlockedMoE(nnx.Module):
        def __init__(self, cfg: sj.MoEConfig, rngs: nnx.Rngs, dtype=jnp.float32):
            p = sj.init_dense_moe(rngs.params(), cfg, jnp.float32)
            self.cfg, self.dtype = cfg, jnp.dtype(dtype)
            for k, v in p.items():
                setattr(self, k, nnx.Param(v))

        def params(self) -> dict:
            return {k: getattr(self, k)[...] for k in ("router", "gate", "up", "down")}

        def __call__(self, x):
            return moe_blocked(self.params(), x, self.cfg, self.dtype)

    class Attention(nnx.Module):
        def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
            self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
            self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
            self.heads = heads

        def __call__(self, x):
            b, s, d = x.shape
            q, k, v = (t[:, :, 0] for t in jnp.split(
                self.qkv(x).reshape(b, s, 3, self.heads, d // self.heads), 3, axis=2))
            q, k = rope(q), rope(k)
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            return self.out(y.reshape(b, s, d))

    class Block(nnx.Module):
        def __init__(self, cfg: sj.MoEConfig, heads: int, rngs: nnx.Rngs):
            d = cfg.d_model
            self.norm1 = nnx.RMSNorm(d, rngs=rngs)
            self.attn = Attention(d, heads, rngs)
            self.norm2 = nnx.RMSNorm(d, rngs=rngs)
            self.moe = BlockedMoE(cfg, rngs)

        def __call__(self, x, capture: bool = False):
            x = x + self.attn(self.norm1(x))
            h = self.norm2(x)
            if capture:
                return h
            b, s, d = h.shape
            h2 = h.reshape(-1, d)
            aux = balance_loss(self.moe.router[...], h2, self.moe.cfg)
            return x + self.moe(h2).reshape(b, s, d).astype(x.dtype), aux

    class LM(nnx.Module):
        def __init__(self, cfg: sj.MoEConfig, layers: int, heads: int, rngs: nnx.Rngs):
            self.embed = nnx.Embed(VOCAB, cfg.d_model, rngs=rngs)
            self.blocks = nnx.List([Block(cfg, heads, rngs) for _ in range(layers)])
            self.norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)

        def __call__(self, tokens, capture: int | None = None):
            x = self.embed(tokens)
            aux = 0.0
            for i, blk in enumerate(self.blocks):
                if capture == i:
                    return blk(x, capture=True)
                x, a = blk(x)
                aux = aux + a
            return self.embed.attend(self.norm(x)), aux / len(self.blocks)

    return LM


def rope(x: jax.Array) -> jax.Array:
    """Rotary positions on ``[B, S, H, Dh]`` (pairs of the last axis' halves)."""
    s, dh = x.shape[1], x.shape[-1]
    freq = 10000.0 ** (-jnp.arange(dh // 2, dtype=jnp.float32) / (dh // 2))
    ang = jnp.arange(s, dtype=jnp.float32)[:, None] * freq            # [S, Dh/2]
    cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
    a, b = x[..., :dh // 2], x[..., dh // 2:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], -1).astype(x.dtype)


def balance_loss(router: jax.Array, x: jax.Array, cfg: sj.MoEConfig) -> jax.Array:
    """Switch load balancing: E * sum_e (share of routed slots) * (mean probability)."""
    logits = x.astype(jnp.float32) @ router.astype(jnp.float32)
    probs = jax.nn.softmax(logits, -1)
    _, top = jax.lax.top_k(logits, cfg.top_k)
    share = jax.nn.one_hot(top, cfg.num_experts).sum((0, 1)) / top.size
    return cfg.num_experts * jnp.sum(jax.lax.stop_gradient(share) * probs.mean(0))


# --- training and evaluation ----------------------------------------------------------

def nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                targets[..., None], -1).mean()


@functools.lru_cache(maxsize=None)
def _schedule_tx(lr: float, steps: int):
    """AdamW with warmup and cosine decay, clipped; one object per (lr, steps), so that
    the jitted steps of models with the same structure share their compiled program."""
    import optax

    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2),
                                               end_value=lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))


def _run(step, batches, steps: int, what: str) -> list[float]:
    """``steps`` calls of ``step`` on fresh batches; prints the time per step after the
    first (compiling) one."""
    losses = [float(step(next(batches)))]
    t = time.perf_counter()
    losses += [float(step(next(batches))) for _ in range(steps - 1)]
    if steps > 1:
        print(f"  {what}: {(time.perf_counter() - t) / (steps - 1) * 1e3:.0f} ms/step")
    return losses


def jitted_steps():
    """The three jitted programs (built once: nnx.jit caches per model structure)."""
    from flax import nnx

    @nnx.jit
    def pretrain_step(model, opt, w, aux_w):
        def loss_fn(m):
            logits, aux = m(w[:, :-1])
            return nll(logits, w[:, 1:]) + aux_w * aux
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    @nnx.jit
    def distill_step(student, teacher, opt, w, aux_w):
        """KL(teacher || student) per next byte, the pattern fixed."""
        t_logits, _ = teacher(w[:, :-1])
        t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(t_logits).astype(jnp.float32))

        def loss_fn(m):
            logits, aux = m(w[:, :-1])
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            kl = jnp.sum(jnp.exp(t_logp) * (t_logp - logp), -1).mean()
            return kl + aux_w * aux
        loss, grads = nnx.value_and_grad(loss_fn)(student)
        opt.update(student, grads)
        return loss

    @nnx.jit
    def eval_loss(model, w):
        return nll(model(w[:, :-1])[0], w[:, 1:])

    return pretrain_step, distill_step, eval_loss


def check_blocked(cfg: sj.MoEConfig) -> None:
    """The dense model's experts (:func:`moe_blocked`) against ``sj.moe_dense`` on random
    weights, float32: the same layer, or the run stops here."""
    p = sj.init_dense_moe(jax.random.key(1), cfg, jnp.float32)
    x = jax.random.normal(jax.random.key(2), (96, cfg.d_model), jnp.float32)
    got = jax.jit(moe_blocked, static_argnums=(2, 3))(p, x, cfg, jnp.float32)
    want = sj.moe_dense(p, x, cfg)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    if not err < 1e-5:
        raise RuntimeError(f"moe_blocked differs from sj.moe_dense: relative error {err:.3g}")


def device_name() -> str:
    d = jax.devices()[0]
    if d.platform != "cpu":
        return f"{d.platform}: {d.device_kind}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"


class Runner:
    """Training, recovery and evaluation with the jitted steps."""

    def __init__(self, batches, aux_w: float):
        from flax import nnx

        self.nnx = nnx
        self.batches = batches
        self.aux_w = jnp.float32(aux_w)
        self.pretrain_step, self.distill_step, self.eval_loss = jitted_steps()

    def pretrain(self, model, steps: int, lr: float) -> list[float]:
        opt = self.nnx.Optimizer(model, _schedule_tx(lr, steps), wrt=self.nnx.Param)
        return _run(lambda w: self.pretrain_step(model, opt, w, self.aux_w), self.batches,
                    steps, "pretrain")

    def distill(self, student, teacher, steps: int, lr: float) -> list[float]:
        opt = self.nnx.Optimizer(student, _schedule_tx(lr, steps), wrt=self.nnx.Param)
        return _run(lambda w: self.distill_step(student, teacher, opt, w, self.aux_w),
                    self.batches, steps, "recovery")

    def perplexity(self, model, batches: list[jax.Array]) -> float:
        return float(math.exp(np.mean([float(self.eval_loss(model, w)) for w in batches])))


# --- pruning -----------------------------------------------------------------------------

def _moe_params_bf16(block) -> dict:
    """A dense layer's params with the experts in bfloat16 (the router stays float32, so
    every variant routes as the dense model does)."""
    return {k: v if k == "router" else v.astype(jnp.bfloat16)
            for k, v in block.moe.params().items()}


def sparse_model(dense, pruned: list[dict], cfg: sj.MoEConfig):
    """A copy of ``dense`` whose MoE layers are ``SparseMoE`` modules on ``pruned``
    (per layer: dense bf16 params following the pattern), float32 master values."""
    from flax import nnx
    from samoyeds_jax.flax import SparseMoE

    model = nnx.clone(dense)
    for blk, p in zip(model.blocks, pruned):
        blk.moe = SparseMoE.from_dense(p, cfg, param_dtype=jnp.float32)
    return model


def prune_magnitude(dense, cfg: sj.MoEConfig) -> list[dict]:
    return [sj.prune_moe(_moe_params_bf16(b), cfg) for b in dense.blocks]


def prune_calibrated(dense, cfg: sj.MoEConfig, calib: list[jax.Array]) -> list[dict]:
    """Layer by layer: each layer calibrated on its MoE inputs in the model whose earlier
    layers are already pruned (their pruned weights in the dense twin)."""
    from flax import nnx

    work = nnx.clone(dense)
    out = []
    for i, blk in enumerate(work.blocks):
        xs = jnp.concatenate([work(w[:, :-1], capture=i).reshape(-1, cfg.d_model)
                              for w in calib])
        p = sj.calibrate_moe(_moe_params_bf16(blk), cfg, xs)
        out.append(p)
        for k in ("gate", "up", "down"):
            getattr(blk.moe, k)[...] = p[k].astype(jnp.float32)
    return out


# --- report ------------------------------------------------------------------------------

def summary(rows: list[dict]) -> dict[str, Any]:
    """The quality bars, per pattern: calibrated's perplexity increase over dense as a
    fraction of magnitude's, and the fraction of each pruned model's gap that the
    recovery closes."""
    ppl = {(r["variant"], r["nv"]): r["ppl"] for r in rows}
    dense = ppl[("dense", "")]
    out = {}
    for nv in sorted({r["nv"] for r in rows if r["nv"]}):
        mag, cal = ppl.get(("magnitude", nv)), ppl.get(("calibrated", nv))
        entry = {}
        if mag is not None and cal is not None and mag > dense:
            entry["calibrated_over_magnitude_increase"] = (cal - dense) / (mag - dense)
        for base in ("magnitude", "calibrated"):
            pruned, rec = ppl.get((base, nv)), ppl.get((base + "+recovery", nv))
            if pruned is not None and rec is not None and pruned > dense:
                entry[f"{base}_gap_closed"] = (pruned - rec) / (pruned - dense)
        out[nv] = entry
    return out


def table(rows: list[dict], bars: dict[str, Any]) -> str:
    dense = next(r["ppl"] for r in rows if r["variant"] == "dense")
    lines = ["| variant | N:V | density | held-out ppl | vs dense |", "|---|---|---|---|---|"]
    for r in rows:
        dens = f"{r['density']:.3f}" if r["nv"] else "1"
        lines.append(f"| {r['variant']} | {r['nv'] or '-'} | {dens} | {r['ppl']:.3f} | "
                     f"{r['ppl'] / dense - 1:+.1%} |")
    lines.append("")
    lines.append("| N:V | calibrated / magnitude increase | gap closed (magnitude) | "
                 "gap closed (calibrated) |")
    lines.append("|---|---|---|---|")
    fmt = lambda v, p=False: "-" if v is None else (f"{v:.0%}" if p else f"{v:.2f}")
    for nv, e in bars.items():
        lines.append(f"| {nv} | {fmt(e.get('calibrated_over_magnitude_increase'))} | "
                     f"{fmt(e.get('magnitude_gap_closed'), True)} | "
                     f"{fmt(e.get('calibrated_gap_closed'), True)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    _report.require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    dense = next(r["ppl"] for r in rows if r["variant"] == "dense")
    patterns = sorted({r["nv"] for r in rows if r["nv"]},
                      key=lambda nv: -next(r["density"] for r in rows if r["nv"] == nv))
    variants = ["magnitude", "calibrated", "magnitude+recovery", "calibrated+recovery"]
    width = 0.8 / len(variants)
    for i, var in enumerate(variants):
        ys = [next((r["ppl"] for r in rows if r["variant"] == var and r["nv"] == nv),
                   float("nan")) for nv in patterns]
        ax.bar(np.arange(len(patterns)) + (i - 1.5) * width, ys, width, label=var)
    ax.axhline(dense, color="black", linestyle="--", label=f"dense ({dense:.2f})")
    cont = next((r["ppl"] for r in rows if r["variant"] == "dense+continued"), None)
    if cont is not None:
        ax.axhline(cont, color="gray", linestyle=":",
                   label=f"dense + as many steps ({cont:.2f})")
    ax.set_xticks(np.arange(len(patterns)),
                  [f"{nv} + 2:4\n(density {next(r['density'] for r in rows if r['nv'] == nv):.3g})"
                   for nv in patterns])
    ax.set_ylabel("held-out perplexity per byte (log scale)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_ylim(bottom=min(r["ppl"] for r in rows) * 0.9)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# --- main ----------------------------------------------------------------------------------

def resolved_size() -> Size:
    base = SIZES[FLAGS.size]
    return Size(**{f.name: (getattr(FLAGS, f.name) if getattr(FLAGS, f.name) is not None
                            else getattr(base, f.name)) for f in dataclasses.fields(Size)})


def report(data: dict) -> None:
    print(table(data["rows"], data["bars"]))
    if FLAGS.plot:
        s = data["size"]
        plot(data["rows"], FLAGS.plot,
             f"byte-level MoE LM, Python stdlib: {s['layers']} layers, d={s['d_model']}, "
             f"{s['experts']} experts top-{data['top_k']}, {s['steps']} steps "
             f"(+{data['recover_frac']:.0%} recovery), L={data['sub_row']}\n"
             f"{data['device']}, {data['date']}")
        print(f"wrote {FLAGS.plot}")


def main(argv):
    del argv
    _report.check_plot_flag(FLAGS.plot)
    if FLAGS.from_json:
        with open(FLAGS.from_json) as fh:
            report(json.load(fh))
        return
    size = resolved_size()
    top_k = FLAGS.top_k or 2
    if FLAGS.size == "smoke" and not FLAGS["nv"].present:
        FLAGS.nv = ["1:2"]       # one pattern: each one compiles its own programs
    try:
        patterns = [sj.SparsityConfig(*parse_nv(nv, "--nv"), FLAGS.sub_row) for nv in FLAGS.nv]
        cfgs = {nv: sj.MoEConfig(num_experts=size.experts, top_k=top_k,
                                 d_model=size.d_model, d_ff=size.d_ff, sparsity=sp)
                for nv, sp in zip(FLAGS.nv, patterns)}
        base_cfg = sj.MoEConfig(num_experts=size.experts, top_k=top_k, d_model=size.d_model,
                                d_ff=size.d_ff, sparsity=patterns[0] if patterns else
                                sj.SparsityConfig(1, 1, FLAGS.sub_row))
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    from flax import nnx

    t0 = time.perf_counter()
    check_blocked(base_cfg)
    train, held, info = corpus(FLAGS.eval_every)
    print(f"corpus: {info['train_bytes'] / 1e6:.1f} MB train, {info['held_out_bytes'] / 1e6:.1f}"
          f" MB held out ({len(info['held_out_modules'])} modules) from {info['stdlib']}")
    evals = eval_batches(held, size.eval_tokens, size.batch, size.seq)
    batches = train_batches(train, size.batch, size.seq, FLAGS.seed)

    LM = build_modules()
    run = Runner(batches, FLAGS.aux_loss)
    dense = LM(base_cfg, size.layers, size.heads, nnx.Rngs(FLAGS.seed))
    losses = run.pretrain(dense, size.steps, size.lr)
    t_train = time.perf_counter() - t0
    print(f"pretrained {size.steps} steps in {t_train:.0f} s (with the corpus): loss {losses[0]:.3f} -> "
          f"{np.mean(losses[-10:]):.3f}")
    rows = []

    def record(variant, nv, model, extra=None):
        ppl = run.perplexity(model, evals)
        dens = cfgs[nv].sparsity.density if nv else 1.0
        rows.append(dict(variant=variant, nv=nv, density=dens, ppl=ppl, **(extra or {})))
        print(f"  {variant:22s} {nv or '-':4s} ppl {ppl:.3f}  "
              f"({time.perf_counter() - t0:.0f} s)")

    record("dense_f32", "", dense)
    dense_bf16 = nnx.clone(dense)
    for blk in dense_bf16.blocks:
        blk.moe.dtype = jnp.dtype(jnp.bfloat16)
    record("dense", "", dense_bf16)
    recover_steps = max(1, int(round(FLAGS.recover_frac * size.steps)))
    recover_lr = size.lr * FLAGS.recover_lr_scale
    # The control: the dense model trained as many more steps (cross-entropy, the
    # recovery's learning rate), i.e. what the extra steps alone give.
    control = nnx.clone(dense)
    run.pretrain(control, recover_steps, recover_lr)
    record("dense+continued", "", control)
    del control
    calib = [next(batches) for _ in range(size.calib_batches)]
    for nv, cfg in cfgs.items():
        for method in ("magnitude", "calibrated"):
            pruned = (prune_magnitude(dense, cfg) if method == "magnitude"
                      else prune_calibrated(dense, cfg, calib))
            model = sparse_model(dense, pruned, cfg)
            record(method, nv, model)
            t1 = time.perf_counter()
            fl = run.distill(model, dense, recover_steps, recover_lr)
            record(method + "+recovery", nv, model,
                   dict(recover_steps=recover_steps, recover_seconds=time.perf_counter() - t1,
                        kl_start=fl[0], kl_end=float(np.mean(fl[-min(10, len(fl)):]))))
    bars = summary(rows)
    data = dict(bench="quality", date=datetime.date.today().isoformat(),
                device=device_name(),
                jax=jax.__version__, command=" ".join(sys.argv), size=dataclasses.asdict(size),
                top_k=top_k, sub_row=FLAGS.sub_row, recover_frac=FLAGS.recover_frac,
                seconds=time.perf_counter() - t0, train_loss_end=float(np.mean(losses[-10:])),
                corpus=info, rows=rows, bars=bars)
    if FLAGS.json_out:
        _report.write_json(FLAGS.json_out, {k: v for k, v in data.items() if k != "rows"},
                           rows)
        print(f"wrote {FLAGS.json_out}")
    report(data)


if __name__ == "__main__":
    app.run(main)
