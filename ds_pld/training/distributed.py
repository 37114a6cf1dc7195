"""Start the process group however the ranks were launched: the `deepspeed` launcher, torchrun, srun, mpirun, or a
plain `python` (one rank). See docs/launching.md for the commands."""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import deepspeed

from ds_pld.config_errors import ConfigError
from ds_pld.training.build_locks import check_build_locks

TIMEOUT_ENV = "DS_PLD_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
MPI_SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
DEFAULT_PORT = 29500


def _scontrol(*args: str) -> str | None:
    try:
        out = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _first_slurm_host() -> str:
    """The first node of the job (rank 0 runs there: srun places tasks in block order)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "localhost"
    out = _scontrol("show", "hostnames", nodelist)  # expands vm[01-04] locally, no call to slurmctld
    return out.split()[0] if out and out.split() else nodelist.split(",")[0]


def _reachable_address(host: str) -> str:
    """`host` if it resolves; otherwise the node's NodeAddr from slurmctld (clusters whose node names are not DNS
    names). Only ranks on such clusters pay for the extra RPC."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    out = _scontrol("show", "node", "-o", host) or ""
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return host


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_master_port(job_id: str | None = None) -> int:
    """A port every rank of a job derives alike without talking to the others: from the job id, so two jobs that
    share a first node rarely collide (29500-30499)."""
    job = job_id if job_id is not None else os.environ.get("SLURM_JOB_ID", "0")
    return DEFAULT_PORT + int(job) % 1000 if job.isdigit() else DEFAULT_PORT


def launch_kind() -> str:
    """Which launcher started this process: env (deepspeed/torchrun), slurm (srun), mpi, or single.

    srun is recognised by a job step with more than one task; an `mpirun` run inside an allocation (its ranks also see
    SLURM_* variables, one task per node) is told apart by an MPI world size that differs from SLURM_NTASKS."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "env"
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1")) if "SLURM_PROCID" in os.environ \
        and "SLURM_STEP_ID" in os.environ else 0
    mpi_size = next((int(os.environ[key]) for key in MPI_SIZE_ENV if key in os.environ), None)
    if slurm_tasks > 1 and mpi_size in (None, slurm_tasks):
        return "slurm"
    if any(key in os.environ for key in MPI_ENV):
        return "mpi"
    return "single"


def collective_timeout() -> timedelta:
    """How long a rank waits in a collective for a peer before giving up (a dead rank must not hang the job)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"${TIMEOUT_ENV} = {raw!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def _default_group_timeout(timeout: timedelta) -> None:
    """DeepSpeed builds its data-parallel group with `new_group()` and no timeout, which torch then takes from its
    module defaults (30 min gloo, 10 min NCCL), not from init_process_group: the gradient all-reduce would wait on a
    hung peer for that long whatever we configure. Make the defaults ours, so every group gets the same bound."""
    import torch.distributed.distributed_c10d as c10d

    if isinstance(getattr(c10d, "default_pg_timeout", None), timedelta):
        c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


def _finalize_mpi_only_after_success() -> None:
    """mpi4py calls MPI_Finalize at exit, and MPI_Finalize waits for every rank: a rank leaving on an error (its peer
    timed out or died) would block there for good and the job would hang instead of failing. Finalize only when the
    process ends without an uncaught exception; after one, exiting unfinalized tells mpirun to end the other ranks.
    Must run before DeepSpeed imports mpi4py.MPI."""
    import mpi4py

    if "mpi4py.MPI" in sys.modules:
        return  # initialised by someone else, who owns its finalisation
    mpi4py.rc.finalize = False
    failed: list[bool] = []
    previous_hook = sys.excepthook

    def note_failure(*exc_info) -> None:
        failed.append(True)
        previous_hook(*exc_info)

    def finalize() -> None:
        from mpi4py import MPI

        if not failed and MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()

    sys.excepthook = note_failure
    atexit.register(finalize)


def init_distributed() -> str:
    """Initialise torch.distributed through DeepSpeed; a rank that waits on a dead peer gives up after
    $DS_PLD_DIST_TIMEOUT_S seconds (default 1800) instead of hanging. Returns the launch kind."""
    kind = launch_kind()
    timeout = collective_timeout()
    if kind == "slurm":
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = _reachable_address(_first_slurm_host())
        os.environ.setdefault("MASTER_PORT", str(slurm_master_port()))
    elif kind == "single":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # MPI: DeepSpeed asks mpi4py for rank/size and rank 0's address; the port is $MASTER_PORT if set (two mpirun jobs
    # on one machine need different ones), else 29500.
    port = int(os.environ.get("MASTER_PORT", DEFAULT_PORT))
    _default_group_timeout(timeout)
    if kind == "mpi":
        _finalize_mpi_only_after_success()
    check_build_locks()  # a lock left by a killed build would hang the op build below, silently
    deepspeed.init_distributed(auto_mpi_discovery=kind == "mpi", distributed_port=port, timeout=timeout)
    release_shm_names()
    if deepspeed.comm.get_rank() == 0:
        print(f"[ds_pld] launcher {kind}: world size {deepspeed.comm.get_world_size()}, master "
              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, collective timeout "
              f"{timeout.total_seconds():.0f} s", flush=True)
    return kind


def release_shm_names() -> None:
    """Unlink this rank's /dev/shm segment of DeepSpeed's CPU shared-memory all-reduce, once every rank has mapped it.

    DeepSpeed 0.19.8 creates one 66 MB segment per rank (deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, when
    the launcher sets LOCAL_SIZE) and never unlinks it, so every CPU run leaks it until reboot; a test suite or a
    sweep fills the node's memory. The mappings stay valid after the unlink and the memory is returned when the last
    rank exits, however it exits. Each rank maps all peers' segments inside init_distributed, hence the barrier."""
    backend = getattr(deepspeed.comm.comm, "cdb", None)
    world = deepspeed.comm.get_world_size() if deepspeed.comm.is_initialized() else 0
    if getattr(backend, "shm_comm_op", None) is None or os.environ.get("LOCAL_SIZE") != str(world):
        return  # the same answer on every rank: no segment was made, no barrier
    deepspeed.comm.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{deepspeed.comm.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        (Path("/dev/shm") / name).unlink()


def shutdown_distributed() -> None:
    """Destroy the process group while the interpreter is still whole. Left to interpreter shutdown, gloo's worker
    threads can still hold async work (ZeRO-3 gathers asynchronously) and the rank dies with SIGABRT ("terminate
    called without an active exception", pytorch/pytorch#190489): a failed exit code for a job that succeeded. Call it
    on the success path only; after a failure a peer may be gone, and the exit is already an error. The barrier
    first: gloo's barrier waits for every piece of work still pending on the group, so none is left to the
    destructor (without it: one such abort in a full suite run on 2026-12-07, none in 15 reruns of that test)."""
    if deepspeed.comm.is_initialized():
        deepspeed.comm.barrier()
        deepspeed.comm.destroy_process_group()
