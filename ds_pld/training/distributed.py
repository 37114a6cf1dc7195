"""Start the process group however the ranks were launched: the `deepspeed` launcher, torchrun, srun, mpirun, or a
plain `python` (one rank)."""
from __future__ import annotations

import os
import socket
import subprocess
from datetime import timedelta

import deepspeed

TIMEOUT_ENV = "DS_PLD_DIST_TIMEOUT_S"
MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "localhost"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return nodelist.split(",")[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_kind() -> str:
    """Which launcher started this process: env (deepspeed/torchrun), slurm (srun), mpi, or single."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "env"
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        return "slurm"
    if any(key in os.environ for key in MPI_ENV):
        return "mpi"
    return "single"


def init_distributed() -> str:
    """Initialise torch.distributed through DeepSpeed; a rank that waits on a dead peer gives up after
    $DS_PLD_DIST_TIMEOUT_S seconds (default 1800) instead of hanging."""
    kind = launch_kind()
    if kind == "slurm":
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
    elif kind == "single":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    deepspeed.init_distributed(auto_mpi_discovery=kind == "mpi", timeout=timeout)
    return kind
