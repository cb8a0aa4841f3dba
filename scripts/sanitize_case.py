"""Small cases for compute-sanitizer: every config and dtype, tail sizes, empty experts.

Run under the sanitizer with XLA_PYTHON_CLIENT_ALLOCATOR=platform so that every buffer is
its own allocation (out-of-bounds accesses are then caught at the buffer's edge).
    python scripts/sanitize_case.py [-v] [--kernel=auto|warp|hopper|stream] [--splits=S]
                                    [--backward] [N:V ...]
N:V: only these configs (default: all); -v prints each case as it starts; --kernel and
--splits force a kernel and a K split count on every call (sj.ops.force_kernel);
--backward runs the backward kernels instead (dx and dvalues through jax.grad, with and
without SEL, every config and dtype, tail sizes, empty experts, a fused GLU).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import samoyeds_jax as sj
from samoyeds_jax._util import parse_nv
from samoyeds_jax.format import SUPPORTED_NV

opts = dict((a[2:] + "=").split("=")[:2] for a in sys.argv[1:] if a.startswith("--"))
args = [a for a in sys.argv[1:] if a != "-v" and not a.startswith("--")]
VERBOSE = "-v" in sys.argv[1:]
# Every call of the run uses the forced kernel (the context is left at exit).
sj.ops.force_kernel(opts.get("kernel", "auto"), int(opts.get("splits", 0))).__enter__()
CONFIGS = [parse_nv(a) for a in args] or list(SUPPORTED_NV)
unknown = [nv for nv in CONFIGS if nv not in SUPPORTED_NV]
if unknown:
    sys.exit(f"unsupported N:V {unknown}; expected some of {list(SUPPORTED_NV)}")


def note(*what):
    if VERBOSE:
        print("case", *what, flush=True)


note("package", sj.__file__)
rng = np.random.default_rng(0)
cpu = jax.devices("cpu")[0]
cases = 0


def weight(cfg, shape, dtype):
    # Made on the CPU so that only our kernels touch GPU buffers.
    with jax.default_device(cpu):
        w = jnp.asarray(rng.standard_normal(shape), dtype)
        sw = sj.encode(sj.prune(w, cfg), cfg)
    return jax.device_put(sw, jax.devices()[0])


def backward_cases():
    """dx and dvalues of ``sum(ragged_dot(x, sw) * ct)`` on every config and dtype."""
    n = 0
    for dtype in (jnp.bfloat16, jnp.float16):
        for nv in CONFIGS:
            for sub_row in (32, 128):
                cfg = sj.SparsityConfig(*nv, sub_row=sub_row)
                k, m = 2 * cfg.k_multiple + (96 if sub_row < 128 else 0), 3 * cfg.m_multiple
                sw = weight(cfg, (3, k, m), dtype)
                for tokens in (1, 37):
                    for gs in ([tokens, 0, 0], [1, 0, tokens - 1] if tokens > 1 else [0, 1, 0]):
                        for use_sel in (False, True):
                            note("backward", dtype.__name__, nv, sub_row, k, m, tokens, gs, use_sel)
                            rows = tokens + 3
                            sel = (jax.device_put(rng.integers(0, tokens, rows).astype(np.int32))
                                   if use_sel else None)
                            x = jax.device_put(np.asarray(
                                rng.standard_normal((tokens if use_sel else rows, k)), dtype))
                            ct = jax.device_put(np.asarray(rng.standard_normal((rows, m)), dtype))
                            gsd = jax.device_put(np.asarray(gs, np.int32))

                            def loss(values, x):
                                w = sj.SparseWeight.unchecked(values, sw.indices, sw.metadata,
                                                              sw.config)
                                y = sj.ragged_dot(x, w, gsd, sel)
                                return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

                            dv, dx = jax.grad(loss, argnums=(0, 1))(sw.values, x)
                            jax.block_until_ready((dv, dx))
                            assert np.isfinite(np.asarray(dv, np.float32)).all()
                            assert np.isfinite(np.asarray(dx, np.float32)).all()
                            n += 2
    # The fused GLU's backward (gate and up halves of one tile).
    cfg = sj.SparsityConfig(1, 2, sub_row=32)
    sw = weight(cfg, (2, 1120, 2 * cfg.m_multiple), jnp.bfloat16)
    x = jax.device_put(np.asarray(rng.standard_normal((9, 1120)), jnp.bfloat16))
    gsd = jax.device_put(np.asarray([7, 1], np.int32))

    def glu_loss(values, x):
        w = sj.SparseWeight.unchecked(values, sw.indices, sw.metadata, sw.config)
        return jnp.sum(sj.ragged_dot(x, w, gsd, glu="silu").astype(jnp.float32))

    note("backward glu", 1120)
    jax.block_until_ready(jax.grad(glu_loss, argnums=(0, 1))(sw.values, x))
    return n + 2


if "backward" in opts:
    print(f"sanitizer cases run: {backward_cases()}")
    sys.exit(0)
for dtype in (jnp.bfloat16, jnp.float16):
    for nv in CONFIGS:
        cfg = sj.SparsityConfig(*nv, sub_row=32)
        k, m = cfg.k_multiple, cfg.m_multiple  # the format's minimum shapes
        for k, m in ((k, m), (3 * k, 5 * m)):
            sw = weight(cfg, (3, k, m), dtype)
            for tokens in (1, 7, 127):
                x = jax.device_put(np.asarray(rng.standard_normal((tokens, k)), dtype))
                for gs in ([tokens, 0, 0], [0, 0, tokens], [1, 0, tokens - 1] if tokens > 1 else [0, 1, 0]):
                    note(dtype.__name__, nv, k, m, tokens, gs)
                    gs = jax.device_put(np.asarray(gs, np.int32))
                    y = sj.ragged_dot(x, sw, gs)
                    sel = jax.device_put(rng.integers(0, tokens, tokens + 3).astype(np.int32))
                    y2 = sj.ragged_dot(x, sw, gs, sel)
                    jax.block_until_ready((y, y2))
                    assert np.isfinite(np.asarray(y, np.float32)).all()
                    cases += 2
# Long K, few tokens: K splits (automatic on sm_90, or every count through --splits), 9 K
# stages with a partial last one; and a fused GLU.
for nv in CONFIGS:
    cfg = sj.SparsityConfig(*nv, sub_row=32)
    k, m = 1120, 2 * cfg.m_multiple
    sw = weight(cfg, (2, k, m), jnp.bfloat16)
    for tokens in (1, 7):
        x = jax.device_put(np.asarray(rng.standard_normal((tokens + 2, k)), jnp.bfloat16))
        note("long K", nv, tokens)
        gs = jax.device_put(np.asarray([tokens, 1], np.int32))  # one zero-filled row
        y = sj.ragged_dot(x, sw, gs)
        y2 = sj.ragged_dot(x, sw, gs, glu="silu")  # gate and up halves of one tile
        jax.block_until_ready((y, y2))
        assert np.isfinite(np.asarray(y, np.float32)).all()
        assert np.isfinite(np.asarray(y2, np.float32)).all()
        cases += 2
# K = 2048: rows of sub-row indices in 16-byte multiples, which the serving kernel copies
# by cp.async during its prologue (with 3 or more splits the splits' windows start off the
# 16-byte chunks); SEL with repeated tokens.
for nv in CONFIGS:
    for sub_row in (32, 128):
        cfg = sj.SparsityConfig(*nv, sub_row=sub_row)
        sw = weight(cfg, (2, 2048, 2 * cfg.m_multiple), jnp.bfloat16)
        x = jax.device_put(np.asarray(rng.standard_normal((7, 2048)), jnp.bfloat16))
        note("K 2048", nv, sub_row)
        gs = jax.device_put(np.asarray([5, 1], np.int32))
        sel = jax.device_put(rng.integers(0, 7, 7).astype(np.int32))
        y = sj.ragged_dot(x, sw, gs, sel)
        jax.block_until_ready(y)
        assert np.isfinite(np.asarray(y, np.float32)).all()
        cases += 1
# Plain 2:4 past the threshold where the Hopper kernel runs 192 x 192 blocks (on an H100:
# 12 M tiles x 15 row tiles), with SEL, an empty expert and a fused GLU.
if (1, 1) in CONFIGS:
    cfg = sj.SparsityConfig(1, 1, sub_row=32)
    sw = weight(cfg, (3, 128, 2304), jnp.bfloat16)
    x = jax.device_put(np.asarray(rng.standard_normal((2150, 128)), jnp.bfloat16))
    gs = jax.device_put(np.asarray([1001, 0, 1146], np.int32))
    sel = jax.device_put(rng.integers(0, 2150, 2150).astype(np.int32))
    note("wide 1:1", 128, 2304, 2150)
    y = sj.ragged_dot(x, sw, gs, sel)
    y2 = sj.ragged_dot(x, sw, gs, sel, glu="silu")
    jax.block_until_ready((y, y2))
    assert np.isfinite(np.asarray(y, np.float32)).all()
    assert np.isfinite(np.asarray(y2, np.float32)).all()
    cases += 2
print(f"sanitizer cases run: {cases}")
