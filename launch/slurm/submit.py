"""Submit pretraining to SLURM: checks the config against the world size BEFORE anything is queued, then runs sbatch on
launch/slurm/pretrain_{single,multi}_node.sbatch with the resources filled in.

    python launch/slurm/submit.py --config ds_configs/pld.json --output_dir runs/pld \\
        --nodes 4 --gpus_per_node 8 --time 24:00:00 --partition gpu -- --max_steps 100000

World size = nodes x tasks_per_node (default: one task per GPU). Everything after `--` goes to launch/train.py
(the job adds --deepspeed_config, --output_dir and --resume itself). --dry_run prints the sbatch command only.

Two phases (docs/launching.md): `--after JOB` starts this job only once job JOB has completed successfully
(`--dependency=afterok:JOB`, which a requeue of JOB does not break), and `--parsable` prints only the job id, so a
shell can pass it on:

    JOB1=$(python launch/slurm/submit.py --parsable --config ds_configs/pld.json --output_dir /shared/runs/phase1) &&
    python launch/slurm/submit.py --after "$JOB1" --config ds_configs/pld_phase2.json \
        --output_dir /shared/runs/phase2 -- --init_from /shared/runs/phase1/final
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SCRIPTS = {"single": ROOT / "launch" / "slurm" / "pretrain_single_node.sbatch",
           "multi": ROOT / "launch" / "slurm" / "pretrain_multi_node.sbatch"}
RESERVED = ("--deepspeed_config", "--output_dir", "--resume")


class SubmitError(Exception):
    """The job would fail (or never start); the message says what to change."""


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="ds_configs JSON")
    parser.add_argument("--output_dir", required=True, help="run folder: checkpoints, metrics, the job log")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8, help="0 for CPU-only nodes")
    parser.add_argument("--tasks_per_node", type=int, help="ranks per node (default: gpus_per_node, or 1 without GPUs)")
    parser.add_argument("--cpus_per_task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00", help="time limit, any sbatch format (minutes, HH:MM:SS, D-HH)")
    parser.add_argument("--signal_secs", type=int, default=300,
                        help="seconds before the time limit at which the ranks checkpoint and the job requeues")
    parser.add_argument("--job_name", default="ds-pld-pretrain")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--launcher", choices=("srun", "deepspeed"), default="srun",
                        help="srun: one task per GPU (default); deepspeed: DeepSpeed launcher with a hostfile")
    parser.add_argument("--hostfile", help="deepspeed launcher: use this hostfile instead of the allocation's")
    parser.add_argument("--ds_launcher", choices=("pdsh", "slurm", "openmpi", "mvapich"),
                        help="deepspeed launcher on several nodes (default pdsh, needs ssh)")
    parser.add_argument("--after", metavar="JOB_ID", action="append", default=[],
                        help="start only after job JOB_ID completed successfully (sbatch --dependency=afterok); "
                             "repeatable")
    parser.add_argument("--parsable", action="store_true",
                        help="print only the job id on stdout (the sbatch command goes to stderr)")
    parser.add_argument("--sbatch_arg", action="append", default=[], help="extra sbatch option, repeatable")
    parser.add_argument("--dry_run", action="store_true", help="check and print the sbatch command, submit nothing")
    args = parser.parse_args(own)
    if args.tasks_per_node is None:
        args.tasks_per_node = args.gpus_per_node if args.gpus_per_node > 0 else 1
    return args, train_args


def train_overrides(train_args: list[str]) -> list[tuple[str, object]]:
    """The `--set key=value` flags among the train.py flags after `--`: the world-size check must see the batch the
    job will run with."""
    from ds_pld.config import parse_override

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--set", action="append", default=[])
    return [parse_override(text) for text in parser.parse_known_args(train_args)[0].set]


def train_init_from(train_args: list[str]) -> str | None:
    """The `--init_from` among the train.py flags after `--`, if any."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--init_from")
    return parser.parse_known_args(train_args)[0].init_from


def check(args: argparse.Namespace, train_args: list[str]) -> None:
    """Everything that would make the job fail at start, found before it waits in the queue."""
    for name in ("nodes", "tasks_per_node", "cpus_per_task"):
        if getattr(args, name) < 1:
            raise SubmitError(f"--{name} must be >= 1")
    if args.gpus_per_node < 0:
        raise SubmitError("--gpus_per_node must be >= 0")
    if args.gpus_per_node and args.tasks_per_node > args.gpus_per_node:
        raise SubmitError(f"--tasks_per_node {args.tasks_per_node} > --gpus_per_node {args.gpus_per_node}: "
                          f"ranks would share GPUs")
    for arg in train_args:
        if arg.split("=")[0] in RESERVED:
            raise SubmitError(f"'{arg}' after '--' is set by the job script; use --config/--output_dir")
    if args.hostfile and args.launcher != "deepspeed":
        raise SubmitError("--hostfile needs --launcher deepspeed")
    if args.hostfile and not Path(args.hostfile).is_file():
        raise SubmitError(f"hostfile {args.hostfile!r} does not exist")
    if not Path(args.config).is_file():
        raise SubmitError(f"config {args.config!r} does not exist")
    bad_jobs = [job for job in args.after if not job.isdigit()]
    if bad_jobs:
        raise SubmitError(f"--after {bad_jobs[0]!r}: expected a job id (digits), as --parsable prints it")
    init_from = train_init_from(train_args)
    if init_from is not None and not args.after and not Path(init_from).exists():
        raise SubmitError(f"--init_from {init_from!r} does not exist (and no --after job is to write it first)")

    from ds_pld.config import with_overrides
    from ds_pld.config_errors import ConfigError
    from ds_pld.training.batch_size import resolve_batch_sizes
    from ds_pld.training.config import parse_run_config

    world = args.nodes * args.tasks_per_node
    try:
        config = parse_run_config(with_overrides(args.config, train_overrides(train_args)))
        resolve_batch_sizes(dict(config.deepspeed), world)
    except ConfigError as err:
        raise SubmitError(f"{args.config}: {err} (world size {world} = --nodes {args.nodes} x --tasks_per_node "
                          f"{args.tasks_per_node})") from err


def sbatch_command(args: argparse.Namespace, train_args: list[str]) -> list[str]:
    output_dir = Path(args.output_dir).resolve()
    export = f"ALL,DS_PLD_ROOT={ROOT},DS_PLD_LAUNCHER={args.launcher}"
    if args.hostfile:
        export += f",DS_PLD_HOSTFILE={Path(args.hostfile).resolve()}"
    if args.ds_launcher:
        export += f",DS_PLD_DS_LAUNCHER={args.ds_launcher}"
    cmd = ["sbatch", "--parsable", f"--job-name={args.job_name}", f"--nodes={args.nodes}",
           f"--ntasks-per-node={args.tasks_per_node}", f"--gpus-per-node={args.gpus_per_node}",
           f"--cpus-per-task={args.cpus_per_task}", f"--time={args.time}", f"--signal=B:USR1@{args.signal_secs}",
           f"--output={output_dir / 'slurm-%j.out'}", f"--export={export}"]
    cmd += [f"--{name}={getattr(args, name)}" for name in ("partition", "account", "qos") if getattr(args, name)]
    if args.after:
        cmd.append(f"--dependency=afterok:{':'.join(args.after)}")
    cmd += args.sbatch_arg
    script = SCRIPTS["single" if args.nodes == 1 else "multi"]
    return [*cmd, str(script), str(Path(args.config).resolve()), str(output_dir), *train_args]


@contextlib.contextmanager
def stdout_to_stderr(active: bool):
    """With --parsable, stdout carries the job id only: what imports print there (DeepSpeed's accelerator notice
    goes through a handler bound to the original stdout) is sent to stderr, at the file-descriptor level."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(argv)
    try:
        with stdout_to_stderr(args.parsable):
            check(args, train_args)
    except SubmitError as err:
        print(f"submit.py: error: {err}", file=sys.stderr)
        return 2
    cmd = sbatch_command(args, train_args)
    print(shlex.join(cmd), file=sys.stderr if args.parsable else sys.stdout, flush=True)
    if args.dry_run:
        return 0
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)  # sbatch writes the log there; it must exist
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"submit.py: sbatch failed ({proc.returncode}): {proc.stderr.strip()}", file=sys.stderr)
        return proc.returncode
    job_id = proc.stdout.strip().split(";")[0]
    log = Path(args.output_dir).resolve() / f"slurm-{job_id}.out"
    if args.parsable:
        print(f"submitted job {job_id}; log: {log}", file=sys.stderr)
        print(job_id, flush=True)
    else:
        print(f"submitted job {job_id}; log: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
