import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs JOBS workers: one thread each (and their kernels)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


def free_port() -> int:
    """A TCP port nothing listens on now (two workers' process groups must not share one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny():
    """A tiny random-init backbone (same module tree as FLUX.1-Kontext)."""
    import labkit

    return labkit.load("tiny")


@pytest.fixture
def accelerate_launch():
    """launch(n, *args): `accelerate launch` of N CPU processes (fp32 pinned, one thread each); asserts exit 0.

    accelerate's `--cpu --num_processes 2` starts ONE process unless MPI is set up (its simple launcher);
    `--multi_gpu` with no visible GPU starts N torchrun processes that join a gloo (CPU) process group."""

    def launch(n: int, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", str(n)]
        cmd += ["--multi_gpu" if n > 1 else "--cpu", "--num_machines", "1", "--mixed_precision", "no"]
        cmd += ["--main_process_port", str(free_port())]
        cmd += ["--dynamo_backend", "no", *map(str, args)]
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    return launch
