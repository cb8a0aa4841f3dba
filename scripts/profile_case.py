"""Two kernel launches for ncu: Mixtral up-projection, one expert, 16 and 4096 tokens."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import samoyeds_jax as sj

k, m = 4096, 14336
nv = tuple(map(int, (sys.argv[1] if len(sys.argv) > 1 else "1:2").split(":")))
cfg = sj.SparsityConfig(*nv, sub_row=128)
rng = np.random.default_rng(0)
w = jnp.asarray(rng.standard_normal((k, m), np.float32) / 64, jnp.bfloat16)
sw = sj.encode(sj.prune(w, cfg), cfg)
f = jax.jit(sj.dot)
for t in (16, 4096):
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    jax.block_until_ready(f(x, sw))
