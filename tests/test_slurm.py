"""The SLURM launch path on a real single-node cluster (munged + slurmctld + slurmd, started for this module by
tests/cluster/slurm_up.sh): the project's sbatch scripts and submit helper, 2 srun ranks on CPU, requeue through the
time-limit warning and through `scontrol requeue` (each start resumes from the checkpoint), one dead rank ending the
job, and bad input failing fast with the reason in the job log. Skipped, with the reason, where the machine cannot
run SLURM (not root, no apt, install failed)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, launcher_env, tiny_train_config
from wandb_records import history, logged_steps, read_records, run_files

from ds_pld.checkpoints import read_checkpoint_meta
from ds_pld.training.metrics import read_metrics

pytestmark = pytest.mark.slow

CLUSTER = ROOT / "tests" / "cluster"
SUBMIT = ROOT / "launch" / "slurm" / "submit.py"
SINGLE_NODE = ROOT / "launch" / "slurm" / "pretrain_single_node.sbatch"
MAX_STEPS = 40
TRAINING = {"max_steps": MAX_STEPS, "checkpoint_every": 10, "eval_every": 20}
JOB_TIMEOUT = 300.0  # per wait; the machine is shared with other CPU-heavy tests
CPU_RESOURCES = ["--gpus-per-node=0", "--cpus-per-task=1", "--ntasks-per-node=2", "--nodes=1", "--time=10"]


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """A running single-node cluster; yields the environment that talks to it (SLURM_CONF) and runs jobs."""
    if os.geteuid() != 0:
        pytest.skip("a SLURM test cluster needs root (munged/slurmd run as root here)")
    install = subprocess.run(["bash", str(CLUSTER / "install_slurm.sh")], capture_output=True, text=True,
                             timeout=900)
    if install.returncode != 0:
        pytest.skip(f"cannot install slurm-wlm/munge: {(install.stderr or install.stdout).strip()[-500:]}")
    state = tempfile.mkdtemp(prefix="dspld-slurm-", dir="/tmp")  # short: munge's socket path has a length limit
    try:
        up = subprocess.run(["bash", str(CLUSTER / "slurm_up.sh"), state], capture_output=True, text=True,
                            timeout=180)
        if up.returncode == 2:
            pytest.skip(f"cannot run a SLURM cluster here: {up.stderr.strip()}")
        assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
        env = launcher_env()
        env.update(SLURM_CONF=f"{state}/slurm.conf", WANDB_MODE="offline", WANDB_SILENT="true")
        for key in [k for k in env if k.startswith(("SLURM_", "PMI_", "OMPI_")) and k != "SLURM_CONF"]:
            env.pop(key)  # a test run inside someone's allocation must not leak it into these jobs
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER / "slurm_down.sh"), state], capture_output=True, timeout=180)
        shutil.rmtree(state, ignore_errors=True)


# --- talking to the cluster ------------------------------------------------------------------------------------------

def run(cmd: list[str], env: dict[str, str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


def job_info(job: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = run(["scontrol", "show", "job", "-o", job], env).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(what: str, condition: Callable[[], bool], timeout: float = JOB_TIMEOUT, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def wait_until_done(job: str, env: dict[str, str], timeout: float = JOB_TIMEOUT) -> dict[str, str]:
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
    wait_for(f"job {job} to end", lambda: job_info(job, env).get("JobState") in done, timeout, poll=0.5)
    return job_info(job, env)


def last_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    return max((r["step"] for r in records), default=0)


def log_text(out: Path, job: str) -> str:
    path = out / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.is_file() else ""


def submit(env: dict[str, str], config: Path, out: Path, *extra: str) -> str:
    proc = run([sys.executable, str(SUBMIT), "--config", str(config), "--output_dir", str(out), "--gpus_per_node",
                "0", "--tasks_per_node", "2", "--cpus_per_task", "1", "--time", "10", *extra], env)
    assert proc.returncode == 0, f"submit.py failed:\n{proc.stdout}\n{proc.stderr}"
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def sbatch(env: dict[str, str], out: Path, *args: str, export: str = "ALL") -> str:
    """The sbatch script straight, as a user would submit it (no submit.py checks)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = run(["sbatch", "--parsable", *CPU_RESOURCES, f"--output={out}/slurm-%j.out", f"--export={export}",
                str(SINGLE_NODE), *args], env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def rank_pid(job: str, rank: int) -> int | None:
    """The training process of one srun task of `job` (found by its SLURM environment; we run as root)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "launch/train.py" not in " ".join(proc.info["cmdline"] or []):
                continue
            environ = proc.environ()
        except (psutil.Error, OSError):
            continue
        if environ.get("SLURM_JOB_ID") == job and environ.get("SLURM_PROCID") == str(rank) \
                and "SLURM_STEP_ID" in environ:
            return proc.info["pid"]
    return None


def wandb_segments(out: Path) -> list[tuple[str | None, str | None, list[int]]]:
    """(run id, group, logged steps) of each start of the job, in order. A start that SLURM stopped with SIGTERM may
    have an empty file: the signal reaches W&B's service process too, which dies before it writes (see
    docs/launching.md); the next start logs those steps again from metrics.jsonl."""
    segments = []
    for path in run_files(out):
        runs = [r.run for r in read_records(path) if r.WhichOneof("record_type") == "run"]
        segments.append((runs[0].run_id if runs else None, runs[0].run_group if runs else None, logged_steps(path)))
    return segments


# --- tests -----------------------------------------------------------------------------------------------------------

def test_two_phases_chained_by_a_dependency_with_requeues(slurm, prepared, tmp_path):
    """docs/launching.md's two-phase submission: phase 2 is submitted at once with `--after <phase 1's job id>`
    (`--parsable` prints only the id) and waits (Reason=Dependency) while phase 1 runs.
    Phase 1 (two ranks under srun) is stopped twice: SIGUSR1 as the time-limit warning sends it (the job checkpoints
    and requeues itself), then `scontrol requeue` as preemption does (the ranks checkpoint on SIGTERM, SLURM
    requeues); every start resumes where the previous one stopped, and the W&B run (rank 0 only) stays one run in
    the group job-<id>. Phase 2 starts once phase 1 has completed, from phase 1's final/ (`--init_from`, next to the
    `--resume` every job start passes): 64-token sequences prepared with phase 1's tokenizer, PLD's theta continuing
    from phase 1's last step (`start_step`)."""
    from ds_pld.pld import theta_at

    steps = MAX_STEPS
    config1 = tiny_train_config(tmp_path / "phase1.json", prepared, training=TRAINING)
    phase2 = json.loads(config1.read_text())
    phase2.update(data={"max_seq_length": 64}, model={**phase2["model"], "max_position_embeddings": 64},
                  progressive_layer_drop={**phase2["progressive_layer_drop"], "start_step": steps},
                  training={"max_steps": 4, "checkpoint_every": 2, "eval_every": 2, "eval_batches": 1},
                  wandb={"enabled": False})
    config2 = tmp_path / "phase2.json"
    config2.write_text(json.dumps(phase2))
    out1, out2 = tmp_path / "phase1", tmp_path / "phase2"
    proc = run([sys.executable, str(SUBMIT), "--parsable", "--config", str(config1), "--output_dir", str(out1),
                "--gpus_per_node", "0", "--tasks_per_node", "2", "--cpus_per_task", "1", "--time", "10"], slurm)
    assert proc.returncode == 0 and proc.stdout.strip().isdigit(), (proc.stdout, proc.stderr)
    job1 = proc.stdout.strip()
    job2 = submit(slurm, config2, out2, "--after", job1, "--", "--init_from", str(out1 / "final"))
    waiting = job_info(job2, slurm)
    assert waiting["JobState"] == "PENDING" and waiting["Reason"] == "Dependency", waiting
    assert waiting["Dependency"].startswith(f"afterok:{job1}"), waiting

    wait_for("phase 1 to train 2 steps", lambda: last_step(out1) >= 2)
    warned = run(["scancel", "--batch", "--signal=USR1", job1], slurm)  # what --signal=B:USR1@<secs> sends
    assert warned.returncode == 0, warned.stderr
    wait_for("phase 1 to requeue itself", lambda: job_info(job1, slurm).get("Restarts") == "1")
    assert job_info(job2, slurm)["JobState"] == "PENDING", "a requeue is no end of phase 1"
    first_stop = int((out1 / "checkpoints" / "latest").read_text().removeprefix("global_step"))
    assert 2 <= first_stop < MAX_STEPS

    wait_for("the second start to train 2 more steps", lambda: last_step(out1) >= first_stop + 2)
    requeued = run(["scontrol", "requeue", job1], slurm)
    assert requeued.returncode == 0, requeued.stderr
    wait_for("the requeue", lambda: job_info(job1, slurm).get("Restarts") == "2")
    info1 = wait_until_done(job1, slurm)
    log = log_text(out1, job1)
    assert info1["JobState"] == "COMPLETED" and info1["ExitCode"] == "0:0", (info1, log[-4000:])
    assert info1["Restarts"] == "2"

    second_stop = int(re.findall(r"resuming from checkpoint global_step(\d+)", log)[-1])
    assert first_stop < second_stop < MAX_STEPS, log[-4000:]
    assert f"resuming from checkpoint global_step{first_stop}" in log
    assert "SIGUSR1" in log and f"requeueing job {job1}" in log
    assert f"stopped at step {first_stop}" in log and f"stopped at step {second_stop}" in log
    assert log.count("launcher slurm: world size 2") == 3, "every start runs 2 srun ranks"

    assert [r["step"] for r in read_metrics(out1 / "metrics.jsonl")] == list(range(1, MAX_STEPS + 1))
    assert (out1 / "checkpoints" / "latest").read_text() == f"global_step{MAX_STEPS}"
    meta = read_checkpoint_meta(out1 / "checkpoints")
    assert meta["world_size"] == 2 and meta["global_steps"] == MAX_STEPS
    assert json.loads((out1 / "summary.json").read_text())["steps"] == MAX_STEPS

    saved_id = json.loads((out1 / "wandb_run.json").read_text())["id"]
    segments = wandb_segments(out1)
    assert len(segments) == 3 and all(f"-{saved_id}" in p.parent.name
                                      for p in (out1 / "wandb").glob("offline-run-*/run-*.wandb")), segments
    # The time-limit path stops the ranks with SIGUSR1, which W&B's service survives: that start's history is whole
    # and the next start does not log it again.
    assert segments[0] == (saved_id, f"job-{job1}", list(range(1, first_stop + 1))), segments[0]
    # `scontrol requeue` (like preemption) sends SIGTERM to every process of the step, W&B's service included, so the
    # second start's W&B file may lack steps; unless that start closed its W&B run, the third logs them again from
    # metrics.jsonl. Either way W&B ends up with every step.
    third_from = first_stop + 1 if segments[2][2][:1] == [first_stop + 1] else second_stop + 1
    assert segments[2] == (saved_id, f"job-{job1}", list(range(third_from, MAX_STEPS + 1))), \
        "all starts of a job log into one run, grouped by job id, each continuing from the checkpoint"
    assert sorted({step for _, _, steps in segments for step in steps}) == list(range(1, MAX_STEPS + 1)), segments
    assert not list(out1.glob("wandb_run_rank*.json")), "only rank 0 logs to W&B unless log_all_ranks"

    info2 = wait_until_done(job2, slurm)
    log2 = log_text(out2, job2)
    assert info2["JobState"] == "COMPLETED" and info2["ExitCode"] == "0:0", (info2, log2[-4000:])
    assert info2["StartTime"] >= info1["EndTime"], (info1, info2)
    assert f"starting from '{out1 / 'final'}' (model folder)" in log2
    assert log2.count("position embeddings grown from 32 to 64 rows") == 1
    records = read_metrics(out2 / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["pld_theta"] == pytest.approx(theta_at(steps, 0.5, 0.2))
    assert read_checkpoint_meta(out2 / "checkpoints")["init_from"] == str((out1 / "final").resolve())


def test_deepspeed_launcher_mode_with_a_hostfile_from_the_allocation(slurm, prepared, tmp_path):
    """The alternative to srun: the DeepSpeed launcher inside the allocation, with a hostfile written from it. The
    time-limit warning still reaches its ranks (SIGUSR1 to the launcher's children), the job requeues and resumes."""
    config = tiny_train_config(tmp_path / "config.json", prepared, training=TRAINING)
    out = tmp_path / "out"
    job = submit(slurm, config, out, "--launcher", "deepspeed")
    wait_for("the first start to train 2 steps", lambda: last_step(out) >= 2)
    assert run(["scancel", "--batch", "--signal=USR1", job], slurm).returncode == 0
    wait_for("the job to requeue itself", lambda: job_info(job, slurm).get("Restarts") == "1")
    info = wait_until_done(job, slurm)
    log = log_text(out, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-4000:])
    stop = int(re.findall(r"resuming from checkpoint global_step(\d+)", log)[-1])
    assert 2 <= stop < MAX_STEPS and "sent SIGUSR1 to 2 local rank(s)" in log
    assert (out / f"hostfile.{job}").read_text().strip() == f"{job_info(job, slurm)['NodeList']} slots=2"
    assert log.count("launcher env: world size 2") == 2, "the DeepSpeed launcher starts both ranks, twice"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, MAX_STEPS + 1))
    assert read_checkpoint_meta(out / "checkpoints")["world_size"] == 2
    assert [steps for _, _, steps in wandb_segments(out)] == [list(range(1, stop + 1)),
                                                             list(range(stop + 1, MAX_STEPS + 1))]


def test_a_dead_rank_ends_the_job(slurm, prepared, tmp_path):
    """--kill-on-bad-exit: rank 1 killed mid-run takes the step down at once (no wait on the collective timeout);
    the job fails and is not requeued."""
    config = tiny_train_config(tmp_path / "config.json", prepared,
                               training={"max_steps": 100000, "checkpoint_every": 1000, "eval_every": 1000,
                                         "eval_batches": 1})
    out = tmp_path / "out"
    job = submit(slurm, config, out)
    wait_for("training to start", lambda: last_step(out) >= 2)
    pid = rank_pid(job, 1)
    assert pid is not None, "rank 1 of the job not found"
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    info = wait_until_done(job, slurm, timeout=120)
    assert time.monotonic() - killed_at < 90, "the job outlived a dead rank"
    log = log_text(out, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, log[-3000:])
    assert re.search(rf"STEP {job}\.0 ON \S+ CANCELLED", log), "srun --kill-on-bad-exit should cancel the step"
    assert "training failed with exit code" in log and "not requeueing" in log


def test_world_size_not_dividing_the_batch_fails_fast(slurm, prepared, tmp_path):
    """submit.py refuses before queueing, naming the key; the raw sbatch job fails at once with train.py's
    ConfigError in its log (no hang)."""
    config = tiny_train_config(tmp_path / "config.json", prepared, train_batch_size=9)
    del_micro = json.loads(config.read_text())
    del del_micro["train_micro_batch_size_per_gpu"]
    config.write_text(json.dumps(del_micro))
    out = tmp_path / "out"

    refused = run([sys.executable, str(SUBMIT), "--config", str(config), "--output_dir", str(out),
                   "--gpus_per_node", "0", "--tasks_per_node", "2", "--cpus_per_task", "1"], slurm)
    assert refused.returncode == 2 and "train_batch_size" in refused.stderr and "2 rank" in refused.stderr, \
        refused.stderr
    assert "submitted job" not in refused.stdout and not out.exists()

    started = time.monotonic()
    job = sbatch(slurm, out, str(config), str(out))
    info = wait_until_done(job, slurm, timeout=240)
    log = log_text(out, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, log[-3000:])
    assert "ConfigError" in log and "'train_batch_size' = 9" in log and "2 rank" in log, log[-3000:]
    assert "training failed with exit code" in log
    assert time.monotonic() - started < 200
    assert not (out / "checkpoints").exists()


def test_missing_config_and_hostfile_fail_before_srun(slurm, prepared, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "no_such_config.json"
    job = sbatch(slurm, out, str(missing), str(out))
    info = wait_until_done(job, slurm, timeout=120)
    log = log_text(out, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, log)
    assert f"config '{missing}' does not exist on node" in log
    assert "srun:" not in log and "launcher slurm" not in log, "nothing may start before the check"

    config = tiny_train_config(tmp_path / "config.json", prepared, training=TRAINING)
    hostfile = tmp_path / "no_such_hostfile"
    job = sbatch(slurm, out, str(config), str(out), export=f"ALL,DS_PLD_LAUNCHER=deepspeed,DS_PLD_HOSTFILE={hostfile}")
    info = wait_until_done(job, slurm, timeout=120)
    log = log_text(out, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, log)
    assert f"hostfile '{hostfile}' (DS_PLD_HOSTFILE) does not exist" in log

    refused = run([sys.executable, str(SUBMIT), "--config", str(config), "--output_dir", str(out),
                   "--launcher", "deepspeed", "--hostfile", str(hostfile), "--dry_run"], slurm)
    assert refused.returncode == 2 and "hostfile" in refused.stderr


def test_submit_fills_the_script_from_the_command_line(prepared, tmp_path):
    config = tiny_train_config(tmp_path / "config.json", prepared, train_batch_size=64)
    proc = run([sys.executable, str(SUBMIT), "--config", str(config), "--output_dir", str(tmp_path / "out"),
                "--nodes", "2", "--gpus_per_node", "4", "--time", "2:00:00", "--partition", "gpu", "--dry_run", "--",
                "--max_steps", "7"], launcher_env())
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.strip().splitlines()[-1]
    for part in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=2:00:00", "--partition=gpu",
                 "--signal=B:USR1@300", "pretrain_multi_node.sbatch", "--max_steps 7"):
        assert part in cmd, (part, cmd)
    assert not (tmp_path / "out").exists(), "a dry run submits nothing"
    chained = run([sys.executable, str(SUBMIT), "--config", str(config), "--output_dir", str(tmp_path / "out2"),
                   "--after", "41", "--after", "42", "--dry_run", "--", "--init_from", str(tmp_path / "later")],
                  launcher_env())
    assert chained.returncode == 0 and "--dependency=afterok:41:42" in chained.stdout, chained.stderr
    missing = run([sys.executable, str(SUBMIT), "--config", str(config), "--output_dir", str(tmp_path / "out2"),
                   "--dry_run", "--", "--init_from", str(tmp_path / "nowhere")], launcher_env())
    assert missing.returncode == 2 and "does not exist (and no --after job" in missing.stderr, missing.stderr


@pytest.mark.parametrize("log_all_ranks", [False, True])
def test_wandb_groups_ranks_by_job_and_only_rank0_logs_by_default(tmp_path, monkeypatch, log_all_ranks):
    """What every rank of a SLURM job does with W&B (real offline runs, no cluster needed): the group is job-<id>;
    rank 1 logs nothing unless `log_all_ranks`, and then into its own run of the same group."""
    from ds_pld.training.config import WandbConfig
    from ds_pld.training.tracking import WandbTracker

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = WandbConfig(enabled=True, project="ds-pld-tests", log_all_ranks=log_all_ranks)
    for rank in (0, 1):
        tracker = WandbTracker(config, tmp_path, rank, {"world_size": 2}, resuming=False)
        assert (tracker.run is None) == (rank == 1 and not log_all_ranks)
        tracker.log({"step": 1, "loss": 1.5 + rank}, step=1)
        tracker.finish()
    files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == (2 if log_all_ranks else 1)
    runs = [next(r.run for r in read_records(f, wait_s=60) if r.WhichOneof("record_type") == "run") for f in files]
    assert {run.run_group for run in runs} == {"job-4242"}
    assert (tmp_path / "wandb_run_rank1.json").is_file() == log_all_ranks
    if log_all_ranks:
        assert {run.display_name for run in runs} == {"job-4242-rank0", "job-4242-rank1"}
        assert len({run.run_id for run in runs}) == 2
    else:
        assert history(files[0], wait_s=60)[0]["loss"] == "1.5", "rank 0's metrics"
