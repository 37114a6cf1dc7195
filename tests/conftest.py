"""Shared fixtures: a single-process DeepSpeed world for in-process engine tests, and a launcher runner."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def single_rank_world():
    """Initialise a 1-rank gloo world once per test process (torch.distributed can be initialised only once)."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    import deepspeed

    from ds_pld.training.distributed import release_shm_names

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    release_shm_names()
    yield


def launcher_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    # WANDB_SERVICE: an in-process wandb.init (tests of the tracker) exports its service's address, and a child
    # that inherits it logs through this process's service, which outlives a killed rank and keeps its run id busy.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "WANDB_SERVICE"):
        env.pop(key, None)
    return env


def run_deepspeed(args: list[str], num_ranks: int = 2, timeout: float = 600, cwd: Path = ROOT,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Start real ranks through the `deepspeed` launcher (CPU: gloo). A run that succeeds must not leave DeepSpeed's
    shared-memory all-reduce segments behind in /dev/shm (66 MB per rank; see release_shm_names)."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
           "--master_port", str(port), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env or launcher_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"deepspeed launcher failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
                             f"{proc.stderr[-6000:]}")
    leaked = sorted(path.name for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"the run left shared memory behind: {leaked}"
    return proc


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """The embedded default corpus packed to 32 tokens with a 1024-word vocabulary, prepared once per session."""
    from ds_pld.data import prepare_dataset

    return prepare_dataset(tmp_path_factory.mktemp("data"), vocab_size=1024, max_seq_length=32, num_proc=1)


def tiny_train_config(path: Path, data: Path, training: dict[str, Any] | None = None, **top: Any) -> Path:
    """A launch/train.py config for jobs of real ranks that take seconds: bert-tiny with 3 layers on 32-token
    sequences, global batch 16 (micro-batch 4), PLD decaying fast enough to drop layers within a few steps."""
    config = {
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
        "steps_per_print": 10**6,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
        "lr_schedule": {"type": "warmup_linear", "warmup_proportion": 0.1},
        "progressive_layer_drop": {"enabled": True, "theta": 0.5, "gamma": 0.2},
        "model": {"preset": "bert-tiny", "num_layers": 3, "max_position_embeddings": 32},
        "data": {"path": str(data)},
        "training": {"max_steps": 12, "checkpoint_every": 4, "eval_every": 6, "eval_batches": 2, "seed": 3,
                     **(training or {})},
        "wandb": {"enabled": True, "project": "ds-pld-tests"},
        **top,
    }
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def synthetic_wordnet(tmp_path: Path) -> Path:
    """wn.dict.dz of a small synthetic WordNet (tests/dictd_fixtures.py)."""
    from dictd_fixtures import make_synthetic_wordnet

    return make_synthetic_wordnet(tmp_path / "dictd")


def default_sigint() -> None:
    """preexec_fn for a launched job: SIGINT back to its default. A suite started from a background job (`nohup ...
    &`, a script's `&`) inherits SIGINT ignored, and the launcher would then ignore the tests' Ctrl-C too."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)

