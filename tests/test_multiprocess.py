"""The sharded layer across two processes: ``jax.distributed.initialize`` on a localhost
coordinator, 4 virtual CPU devices per process, meshes spanning both (data, expert and
tensor parallel; moe_sharded and plain jax.jit). Each process checks its shards against
the one-device layer (tests/multiprocess_worker.py). This is how the layer runs past one
host: the same program on every host, each holding its devices' shards.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
PROCESSES, DEVICES_EACH = 2, 4
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_layer_across_two_processes(seed):
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={DEVICES_EACH}".strip())
    coordinator = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(PROCESSES), coordinator,
                               str(seed)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(PROCESSES)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"seed={seed}: the processes did not finish in {TIMEOUT_S} s")
    for i, (p, out) in enumerate(zip(procs, outputs)):
        tail = out[-6000:]
        assert p.returncode == 0, f"seed={seed}: process {i} exited {p.returncode}:\n{tail}"
        assert re.search(r"\d+ cases checked, 0 failures", out), f"seed={seed}: {i}:\n{tail}"
