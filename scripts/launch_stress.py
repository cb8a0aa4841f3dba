"""Launches small cases many times to look for rare hangs (run with a timeout).

    timeout 120 python scripts/launch_stress.py [launches per case] [--kernel=hopper|stream|...]
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import samoyeds_jax as sj

opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
args = [a for a in sys.argv[1:] if not a.startswith("--")]
launches = int(args[0]) if args else 5000
# Every launch of the run uses the forced kernel (the context is left at exit).
sj.ops.force_kernel(opts.get("kernel", "auto")).__enter__()
rng = np.random.default_rng(0)
cpu = jax.devices("cpu")[0]
# (N, V, K, M, dtype, tokens, group sizes, sub_row): the cases racecheck stopped in, one per
# config, and 1:2 at sub_row 128 (its own loop: two N halves, 8 stages per drain; K = 1152
# is 9 stages, so the loop and its remainder both run).
cases = [(1, 4, 96, 320, jnp.float16, 1, [0, 0, 1], 32),
         (2, 4, 96, 160, jnp.bfloat16, 7, [7, 0, 0], 32),
         (1, 1, 256, 384, jnp.bfloat16, 127, [1, 0, 126], 32),
         (1, 2, 1120, 256, jnp.bfloat16, 7, [3, 4, 0], 32),
         (1, 2, 1152, 256, jnp.float16, 130, [3, 127, 0], 128)]
for n, v, k, m, dtype, tokens, gs, sub_row in cases:
    cfg = sj.SparsityConfig(n, v, sub_row=sub_row)
    with jax.default_device(cpu):
        sw = sj.encode(sj.prune(jnp.asarray(rng.standard_normal((3, k, m)), dtype), cfg), cfg)
    sw = jax.device_put(sw, jax.devices()[0])
    x = jax.device_put(np.asarray(rng.standard_normal((tokens, k)), dtype))
    gs = jax.device_put(np.asarray(gs, np.int32))
    f = jax.jit(lambda x, gs: sj.ragged_dot(x, sw, gs))
    ref = np.asarray(f(x, gs), np.float32)
    t0 = time.time()
    for i in range(launches):
        y = f(x, gs)
        if i % 500 == 499:
            assert np.array_equal(np.asarray(y, np.float32), ref), (n, v, i)
    jax.block_until_ready(y)
    print(f"{n}:{v} L={sub_row} K={k} M={m} T={tokens}: {launches} launches in {time.time() - t0:.1f} s",
          flush=True)
print("STRESS_OK")
