"""The CPU handler's work split (ffi/cpu_ops.cc, cpu_kernel.h, cpu_threads.h).

Every output element is summed in one fixed order by one thread, so the bits must not
depend on the number of threads (SAMOYEDS_CPU_THREADS), on the width of the routed-row
tiles (chosen per call from the group sizes) or on how the tiles fall into panel chunks.
Shapes are picked so that the splits do not divide evenly: odd window counts, kept-row
blocks with a remainder, empty experts, a single-row expert, SEL with repeated tokens.
Results are checked against the float64 reference (tests/helpers.py) with the checks of
tests/test_ops.py; outputs written into a NaN-filled (donated) buffer show that every
element is written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samoyeds_jax as sj
from helpers import DTYPES, rand, ref_glu, ref_ragged_dot
from test_ops import check_out, dense64, dtype_id, make_sw, random_sel


def run_with_threads(monkeypatch, threads, fn, *args):
    """fn(*args) with the handler capped at `threads` threads (None: XLA's pool)."""
    if threads is None:
        monkeypatch.delenv("SAMOYEDS_CPU_THREADS", raising=False)
    else:
        monkeypatch.setenv("SAMOYEDS_CPU_THREADS", str(threads))
    return np.asarray(jax.block_until_ready(fn(*args)))


@pytest.mark.parametrize("glu", ["", "silu", "gelu"], ids=["plain", "silu", "gelu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_same_bits_for_any_thread_count(glu, dtype, monkeypatch, rng, seed):
    # K = 3 windows of 32; Mk = 80 kept rows (2:4: M = 160), blocks of 64 + 16; with a GLU
    # each half has 80 kept rows too.
    cfg = sj.SparsityConfig(2, 4, 32)
    k, m = 96, 320 if glu else 160
    sw = make_sw(rng, cfg, dtype, e=5, k=k, m=m)
    gs = jnp.asarray([0, 37, 1, 0, 90], jnp.int32)
    tokens, rows = 61, 140  # 12 padding rows past sum(group_sizes)
    x = rand(rng, (tokens, k), dtype)
    sel = random_sel(rng, rows, tokens)
    f = jax.jit(lambda a, s: sj.ragged_dot(a, sw, gs, s, glu=glu or None))
    ys = {t: run_with_threads(monkeypatch, t, f, x, sel) for t in (1, 2, 3, 7, 0, None)}
    for t, y in ys.items():
        np.testing.assert_array_equal(y, ys[1], err_msg=f"seed={seed} threads={t}")
    ref = ref_ragged_dot(x, dense64(sw), gs, sel)
    check_out(ys[None], ref_glu(ref, glu) if glu else ref, 128, dtype,
              f"seed={seed} glu={glu!r}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_same_bits_for_any_tile_width(dtype, monkeypatch, rng, seed):
    """The first rows of expert 0 come out the same whether its group is small (narrow
    tiles) or large (wide tiles), and whatever the other experts hold."""
    cfg = sj.SparsityConfig(1, 2, 64)
    k, m = 192, 96
    sw = make_sw(rng, cfg, dtype, e=3, k=k, m=m)
    x = rand(rng, (300, k), dtype)
    f = jax.jit(lambda a, g: sj.ragged_dot(a, sw, g))
    outs = []
    # Expert 0 owns 5, 12, 40 or 250 rows; the others take some of the rest.
    for sizes in ([5, 0, 0], [12, 0, 3], [40, 17, 0], [250, 1, 49]):
        gs = jnp.asarray(sizes, jnp.int32)
        for threads in (1, None):
            y = run_with_threads(monkeypatch, threads, f, x, gs)
            check_out(y, ref_ragged_dot(x, dense64(sw), gs), sum(sizes), dtype,
                      f"seed={seed} gs={sizes} threads={threads}")
            outs.append((sizes, y[:5]))
    for sizes, head in outs:
        np.testing.assert_array_equal(head, outs[0][1], err_msg=f"seed={seed} gs={sizes}")


def test_panel_chunks_and_row_block_remainders(rng, seed):
    """Enough routed rows at a large K that the panels are built in several chunks, with
    one expert's tiles on both sides of a chunk boundary; Mk = 80 kept rows (64 + 16)."""
    cfg = sj.SparsityConfig(1, 2, 128)
    k, m = 4096, 160
    sw = make_sw(rng, cfg, jnp.bfloat16, e=3, k=k, m=m)
    gs = jnp.asarray([610, 0, 97], jnp.int32)
    tokens, rows = 500, 710
    x = rand(rng, (tokens, k), jnp.bfloat16)
    sel = random_sel(rng, rows, tokens)
    y = jax.jit(lambda a, s: sj.ragged_dot(a, sw, gs, s))(x, sel)
    check_out(y, ref_ragged_dot(x, dense64(sw), gs, sel), 707, jnp.bfloat16, f"seed={seed}")


@pytest.mark.parametrize("glu", ["", "silu"], ids=["plain", "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_every_output_element_is_written(glu, dtype, rng, seed):
    """The output buffer starts as NaN (a donated buffer that XLA reuses for the result):
    every element of the valid rows must be written, and the rows past the groups zeroed."""
    cfg = sj.SparsityConfig(1, 4, 64)
    k, m = 128, 256
    sw = make_sw(rng, cfg, dtype, e=4, k=k, m=m)
    gs = jnp.asarray([9, 0, 33, 1], jnp.int32)
    tokens, rows = 29, 50
    x = rand(rng, (tokens, k), dtype)
    sel = random_sel(rng, rows, tokens)
    f = jax.jit(lambda poison, a, s: sj.ragged_dot(a, sw, gs, s, glu=glu or None),
                donate_argnums=0, keep_unused=True)
    poison = jnp.full((rows, m // 2 if glu else m), jnp.nan, dtype)
    where = poison.unsafe_buffer_pointer()
    y = f(poison, x, sel)
    if y.unsafe_buffer_pointer() != where:
        pytest.skip("XLA did not reuse the donated NaN buffer for the output")
    ref = ref_ragged_dot(x, dense64(sw), gs, sel)
    check_out(y, ref_glu(ref, glu) if glu else ref, 43, dtype, f"seed={seed} glu={glu!r}")
