"""Helpers of `benchmarks/gpu_suite.sh`: run one guarded step, derive the shrunk training configs, check a training
run's metrics, profile a few training steps, and write the results as JSON + Markdown.

Why a Python helper: the suite must survive any one step failing, hanging or being killed, and still write parseable
results. Running each step in its own process group with a hard timeout, and appending one JSON line per step as
soon as it ends, keeps what finished even when a later step takes the machine down; the shell only sequences steps.

    python benchmarks/gpu_suite_tools.py run-step NAME --steps-file F --log L --timeout S -- CMD ...
    python benchmarks/gpu_suite_tools.py record NAME --steps-file F --status planned --reason WHY
    python benchmarks/gpu_suite_tools.py derive BASE.json OUT.json --set training.max_steps=30 ...
    python benchmarks/gpu_suite_tools.py train-summary RUN_DIR --out S.json --expect-last-step 30
    python benchmarks/gpu_suite_tools.py profile --device cuda --out P.json
    python benchmarks/gpu_suite_tools.py report OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("ok", "failed", "timeout", "skipped", "planned")
LOG_TAIL_CHARS = 3000
KILL_GRACE_S = 10.0


def ensure_repo_importable() -> None:
    """Run as a script from a checkout: make ds_pld importable without installing it."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


# ------------------------------------------------------------------------------------------------ step records
def append_record(steps_file: Path, record: dict[str, Any]) -> None:
    """One JSON line per step, written (and flushed) as soon as the step ends."""
    if record["status"] not in STATUSES:
        raise ValueError(f"status {record['status']!r} is not one of {STATUSES}")
    steps_file.parent.mkdir(parents=True, exist_ok=True)
    with open(steps_file, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_records(steps_file: Path) -> list[dict[str, Any]]:
    if not steps_file.exists():
        return []
    records = []
    for line in steps_file.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The end of a log; tqdm's carriage-return redraws collapsed to their last state per line."""
    if not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 4 * chars))
        text = handle.read().decode("utf-8", errors="replace")
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(lines)[-chars:]


def raise_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler: unwind like Ctrl-C so the running step is ended and recorded."""
    raise KeyboardInterrupt


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group (the DeepSpeed launcher and its ranks), SIGKILL after a grace."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(args: argparse.Namespace) -> int:
    """Run one step's command with a hard timeout in its own session; record status, time and the log's tail."""
    command = list(args.command)
    if not command:
        raise SystemExit("run-step: no command given after --")
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "wb") as handle:
        handle.write(f"$ {' '.join(command)}\n".encode())
        handle.flush()
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                start_new_session=True)
        interrupted = False
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
        try:
            rc = proc.wait(timeout=max(1.0, args.timeout))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc, status = proc.returncode if proc.returncode is not None else -9, "timeout"
        except KeyboardInterrupt:
            # The suite is being stopped: the step's own session would not get the signal, so end it here.
            kill_group(proc)
            rc, status, interrupted = proc.returncode if proc.returncode is not None else -9, "failed", True
        finally:
            signal.signal(signal.SIGTERM, previous)
    seconds = time.monotonic() - started
    record: dict[str, Any] = {
        "name": args.name, "status": status, "rc": rc,
        "seconds": round(seconds, 1), "timeout_s": round(args.timeout, 1),
        "command": args.gpu_command or " ".join(command), "ran": " ".join(command),
        "log": os.path.relpath(log, Path(args.steps_file).parent),
    }
    if args.note:
        record["note"] = args.note
    if status == "timeout":
        record["reason"] = f"killed after its {args.timeout:.0f} s time limit"
    if interrupted:
        record["reason"] = "interrupted: the suite was stopped (SIGTERM or Ctrl-C) while this step ran"
    if status != "ok":
        record["log_tail"] = tail(log)
    append_record(Path(args.steps_file), record)
    print(f"[gpu_suite] {args.name}: {status} (rc {rc}, {seconds:.1f} s)", flush=True)
    return 0 if status == "ok" else 1


def record_only(args: argparse.Namespace) -> int:
    """A step that did not run (planned in a dry run, or skipped), or whose runner broke (failed); with the reason."""
    if args.status not in ("planned", "skipped", "failed"):
        raise SystemExit("record: --status must be planned, skipped or failed")
    if not args.reason:
        raise SystemExit("record: a step recorded without running needs --reason")
    record = {"name": args.name, "status": args.status, "reason": args.reason,
              "command": args.gpu_command or "", "timeout_s": args.timeout}
    append_record(Path(args.steps_file), record)
    print(f"[gpu_suite] {args.name}: {args.status} ({args.reason})", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------ configs
def set_path(config: dict[str, Any], dotted: str, value: Any) -> None:
    """config['a']['b'] = value for 'a.b', creating blocks; a null value removes the key."""
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SystemExit(f"derive: {dotted!r}: {key!r} is not a block")
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value


def derive(args: argparse.Namespace) -> int:
    """A copy of a ds_configs file with `key.path=JSON` overrides, validated by the trainer's own parser, so a
    config key that changed name fails here (in CI's dry run) rather than on the GPU."""
    ensure_repo_importable()
    from ds_pld.training.config import parse_run_config

    config = json.loads(Path(args.base).read_text())
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"derive: --set {item!r} is not KEY=JSON")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        set_path(config, key, value)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config, indent=2) + "\n")
    parsed = parse_run_config(out)
    print(f"derive: {out} from {args.base}; model {parsed.model.to_dict() if parsed.model else None}; "
          f"training {parsed.training}; earlybert {'on' if parsed.earlybert else 'off'}; "
          f"pld {'on' if parsed.pld.enabled else 'off'}")
    return 0


# ----------------------------------------------------------------------------------------------- train summary
def train_summary(args: argparse.Namespace) -> int:
    """Check a launch/train.py run from its outputs (metrics.jsonl and the latest checkpoint's metadata) and write
    the figures worth reporting. Exit 1 with the reasons when an expectation fails."""
    ensure_repo_importable()
    from ds_pld.checkpoints import read_checkpoint_meta
    from ds_pld.training.metrics import read_metrics

    run_dir = Path(args.run_dir)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r]
    problems = []
    steps = [int(r["step"]) for r in records]
    if steps != list(range(1, len(steps) + 1)):
        problems.append(f"steps are not 1..N without gaps or repeats: {steps[:5]}...{steps[-5:]}")
    if args.expect_last_step is not None and (not steps or steps[-1] != args.expect_last_step):
        problems.append(f"last step {steps[-1] if steps else None}, expected {args.expect_last_step}")
    losses = [r.get("loss") for r in records]
    if any(loss is None or not math.isfinite(loss) for loss in losses):
        problems.append("a training loss is missing or not finite")
    drawn = [r["earlybert_drawn_step"] for r in records if r.get("earlybert_drawn_step") is not None]
    if args.expect_drawn and not drawn:
        problems.append("EarlyBERT drew no ticket")
    meta = None
    try:
        meta = read_checkpoint_meta(run_dir / "checkpoints")
    except Exception as err:  # noqa: BLE001 - an unreadable checkpoint is a finding to report, not a crash
        problems.append(f"latest checkpoint unreadable: {err}")
    if meta is None and not any("unreadable" in p for p in problems):
        problems.append("no complete checkpoint")
    model_config = (meta or {}).get("model_config") or {}
    if args.expect_pruned and model_config.get("layer_intermediate") is None:
        problems.append("the latest checkpoint's model is not pruned")
    speeds = sorted(r["samples_per_sec"] for r in records[1:] if r.get("samples_per_sec"))
    summary = {
        "run_dir": str(run_dir), "steps": len(steps), "last_step": steps[-1] if steps else None,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "val_loss": next((r["val_loss"] for r in reversed(records) if r.get("val_loss") is not None), None),
        "median_samples_per_sec": speeds[len(speeds) // 2] if speeds else None,
        "earlybert_drawn_step": drawn[0] if drawn else None,
        "checkpoint_step": (meta or {}).get("global_steps"),
        "layer_heads": model_config.get("layer_heads"), "layer_intermediate": model_config.get("layer_intermediate"),
        "problems": problems, "passed": not problems,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.copy_metrics:
        shutil.copyfile(run_dir / "metrics.jsonl", out.with_suffix(".metrics.jsonl"))
    print(json.dumps(summary, indent=2))
    return 0 if not problems else 1


# ------------------------------------------------------------------------------------------------- kernel tests
def junit_check(args: argparse.Namespace) -> int:
    """Counts of a pytest JUnit XML; exit 1 when nothing ran, something failed, or more cases were skipped than
    allowed (on a GPU every kernel case must run compiled: a skip there means the CUDA path was not tested)."""
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(args.xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors",
                                                                                 "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    problems = []
    if counts["passed"] < 1:
        problems.append("no test passed")
    if counts["failures"] or counts["errors"]:
        problems.append(f"{counts['failures']} failed, {counts['errors']} errors")
    if counts["skipped"] > args.max_skipped:
        problems.append(f"{counts['skipped']} skipped (at most {args.max_skipped} allowed)")
    summary = {**counts, "problems": problems, "passed_check": not problems}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0 if not problems else 1


# ----------------------------------------------------------------------------------------------------- profile
def profile(args: argparse.Namespace) -> int:
    """torch.profiler over a few training steps of our model (forward, backward, fused AdamW): the ops that cost the
    most device time, so docs/kernels.md can name the top costs from a measurement."""
    ensure_repo_importable()
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ds_pld.models import build_model
    from ds_pld.models.bert import IGNORE_INDEX
    from ds_pld.timing import synchronize

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("profile: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = build_model(args.preset, kernels=args.kernels).to(device)
    if args.bf16:
        model = model.to(torch.bfloat16)
    model.train()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=not fused)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, vocab, (args.batch_size, args.seq_len), generator=generator)
    masked = torch.rand(args.batch_size, args.seq_len, generator=generator) < 0.15
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    input_ids, labels = input_ids.to(device), labels.to(device)

    def step(index: int) -> None:
        out = model(input_ids, labels=labels, progressive_layer_drop=args.pld, pld_theta=0.5, pld_seed=index)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for index in range(args.warmup):
        step(index)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)  # the warm-up's queued work stays out of the profile; the steps' own is all in it
    with torch_profile(activities=activities) as prof:
        for index in range(args.steps):
            step(args.warmup + index)
        synchronize(device)
    events = prof.key_averages()
    on_device = device.type == "cuda"

    def self_time_us(event: Any) -> float:
        if not on_device:
            return float(event.self_cpu_time_total)
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, name):
                return float(getattr(event, name))
        return 0.0

    rows = sorted(((self_time_us(e), e) for e in events), key=lambda pair: pair[0], reverse=True)
    total = sum(t for t, _ in rows) or 1.0
    top = [{"op": e.key, "self_ms_per_step": round(t / 1e3 / args.steps, 4), "share": round(t / total, 4),
            "calls_per_step": round(e.count / args.steps, 2)} for t, e in rows[:args.top]]
    result = {"device": torch.cuda.get_device_name(device) if on_device else f"CPU ({platform.machine()})",
              "clock": "self device time" if on_device else "self CPU time", "preset": args.preset,
              "kernels": args.kernels, "bf16": args.bf16, "pld": args.pld, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "steps": args.steps, "total_ms_per_step": round(total / 1e3 / args.steps, 3),
              "top_ops": top}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(profile_markdown(result))
    return 0


def profile_markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['preset']} batch {result['batch_size']} x seq {result['seq_len']}, kernels "
             f"{result['kernels']}, {'bf16' if result['bf16'] else 'fp32'}, PLD {'on' if result['pld'] else 'off'}; "
             f"{result['device']}; {result['clock']} {result['total_ms_per_step']} ms per step", "",
             "| op | ms per step | share | calls per step |", "| --- | --- | --- | --- |"]
    lines += [f"| `{row['op']}` | {row['self_ms_per_step']} | {100 * row['share']:.1f}% | {row['calls_per_step']} |"
              for row in result["top_ops"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ report
THROUGHPUT_ROW = re.compile(r"^\| (ours, triton kernels|ours, torch ops|HF BertForMaskedLM \(sdpa\)) \|")


def throughput_rows(text: str) -> list[dict[str, str]]:
    """The rows of benchmarks/gpu_throughput.py's Markdown table (it prints no JSON)."""
    header = ["model", "pld", "layers_run", "sequences_per_s", "model_tflops", "mfu", "vs_matmul"]
    rows = []
    for line in text.splitlines():
        if THROUGHPUT_ROW.match(line):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
    return rows


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def report(args: argparse.Namespace) -> int:
    """results.json and results.md from the step records and each step's artifacts; exit 1 if a step failed."""
    out_dir = Path(args.out_dir)
    records = read_records(out_dir / "steps.jsonl")
    artifacts = out_dir / "artifacts"
    results: dict[str, Any] = {
        "suite": "benchmarks/gpu_suite.sh", "mode": args.mode, "started": args.started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": args.budget_s,
        "environment": load_json(artifacts / "env.json"), "steps": records,
        "lamb_vs_fused": load_json(artifacts / "lamb_vs_fused.json"),
        "training": {name: load_json(artifacts / f"{name}.json")
                     for name in ("train_pld", "train_earlybert", "train_resume")},
        "profile": load_json(artifacts / "profile.json"),
        "kernel_tests": load_json(artifacts / "kernel_tests.json"),
    }
    throughput_text = (artifacts / "throughput.md").read_text() if (artifacts / "throughput.md").exists() else ""
    if "Device:" in throughput_text:  # drop library warnings printed before the benchmark's own output
        throughput_text = throughput_text[throughput_text.index("Device:"):]
    results["throughput"] = {"table": throughput_text, "rows": throughput_rows(throughput_text)}
    results["failed_steps"] = [r["name"] for r in records if r["status"] in ("failed", "timeout")]
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_markdown(results))
    print(f"[gpu_suite] results: {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 1 if results["failed_steps"] else 0


def results_markdown(results: dict[str, Any]) -> str:
    env = results.get("environment") or {}
    lines = [f"# GPU suite results ({results['mode']})", "",
             f"Started {results['started']}, finished {results['finished']}"
             + (f", budget {results['budget_s']:.0f} s." if results["budget_s"] else " (no time budget in a dry run)."),
             f"Device: {env.get('device', 'unknown')}; torch {env.get('torch')}; triton {env.get('triton')}; "
             f"deepspeed {env.get('deepspeed')}; CUDA toolkit for DeepSpeed's JIT ops: {env.get('cuda_home')}; "
             f"commit {env.get('commit')}.", "", "## Steps", "",
             "| step | status | seconds | detail |", "| --- | --- | --- | --- |"]
    for r in results["steps"]:
        detail = r.get("reason") or r.get("note") or ""
        if r["status"] in ("failed", "timeout"):
            detail = f"rc {r.get('rc')}; {detail + '; ' if detail else ''}log: {r.get('log', '')}"
        seconds = r.get("seconds", "")
        lines.append(f"| {r['name']} | {r['status']} | {seconds} | {detail.replace('|', '/')} |")
    kernel_tests = results.get("kernel_tests")
    if kernel_tests:
        lines += ["", "## Kernel tests (compiled, vs the torch reference)", "",
                  f"{kernel_tests['passed']} passed, {kernel_tests['failures']} failed, {kernel_tests['errors']} "
                  f"errors, {kernel_tests['skipped']} skipped of {kernel_tests['tests']}."]
    lamb = results.get("lamb_vs_fused")
    if lamb:
        lines += ["", "## LAMB vs FusedLamb", ""]
        if lamb.get("error"):
            lines.append(f"Not compared: {lamb['error']}")
        else:
            lines.append(f"Reference `{lamb['reference']}` on {lamb.get('device_name', lamb['device'])}, "
                         f"{lamb['steps']} steps: max relative weight difference {lamb['max_rel_diff']:.3g} "
                         f"(tolerance {lamb['tolerance']:g}, {'pass' if lamb['passed'] else 'FAIL'}).")
            lines += [f"- {name}: {r['max_rel_diff']:.3g}" for name, r in lamb["recipes"].items()]
    training = {name: summary for name, summary in (results.get("training") or {}).items() if summary}
    if training:
        lines += ["", "## Training runs (launch/train.py through the DeepSpeed launcher)", "",
                  "| run | steps | first loss | last loss | val loss | samples/s (median) | ticket drawn at | "
                  "checks |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, s in training.items():
            checks = "pass" if s.get("passed") else "; ".join(s.get("problems", []))
            lines.append(f"| {name} | {s.get('last_step')} | {fmt(s.get('first_loss'))} | {fmt(s.get('last_loss'))} | "
                         f"{fmt(s.get('val_loss'))} | {fmt(s.get('median_samples_per_sec'))} | "
                         f"{s.get('earlybert_drawn_step') or ''} | {checks} |")
    if results["throughput"]["table"]:
        lines += ["", "## Throughput (benchmarks/gpu_throughput.py)", "", results["throughput"]["table"].strip()]
    prof = results.get("profile")
    if prof:
        lines += ["", "## Profile (torch.profiler)", "", profile_markdown(prof)]
    failed = results["failed_steps"]
    lines += ["", f"Failed steps: {', '.join(failed) if failed else 'none'}.", ""]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    return "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


# --------------------------------------------------------------------------------------------------------- env
def environment(args: argparse.Namespace) -> int:
    """What the figures were measured on: device, versions, the CUDA toolkit DeepSpeed's JIT ops need, commit."""
    info: dict[str, Any] = {"python": platform.python_version(), "host_cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
        info["cuda_runtime"] = torch.version.cuda
        from torch.utils.cpp_extension import CUDA_HOME

        info["cuda_home"] = CUDA_HOME
    except Exception as err:  # noqa: BLE001 - report what is missing instead of failing the whole suite
        info["torch"] = f"unavailable: {err}"
    for module in ("triton", "deepspeed", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except Exception as err:  # noqa: BLE001
            info[module] = f"unavailable: {type(err).__name__}: {err}"
    info["nvcc"] = shutil.which("nvcc")
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                        timeout=10, check=False).stdout.strip() or None
    except OSError:
        info["commit"] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        info["nvidia_smi"] = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30,
                                            check=False).stdout.strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


# --------------------------------------------------------------------------------------------------------- cli
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command_name", required=True)

    def step_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("name")
        p.add_argument("--steps-file", required=True)
        p.add_argument("--gpu-command", help="the command the step runs on the GPU (recorded as planned)")
        p.add_argument("--timeout", type=float, default=0.0)

    p = sub.add_parser("run-step", help="run one guarded step")
    step_options(p)
    p.add_argument("--log", required=True)
    p.add_argument("--note")
    p.set_defaults(func=run_step)

    p = sub.add_parser("record", help="record a planned or skipped step")
    step_options(p)
    p.add_argument("--status", required=True)
    p.add_argument("--reason", required=True)
    p.set_defaults(func=record_only)

    p = sub.add_parser("derive", help="write a shrunk copy of a ds_configs file")
    p.add_argument("base")
    p.add_argument("out")
    p.add_argument("--set", action="append", metavar="KEY.PATH=JSON")
    p.set_defaults(func=derive)

    p = sub.add_parser("train-summary", help="check a training run's outputs")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--expect-last-step", type=int)
    p.add_argument("--expect-drawn", action="store_true")
    p.add_argument("--expect-pruned", action="store_true")
    p.add_argument("--copy-metrics", action="store_true", help="copy metrics.jsonl next to --out")
    p.set_defaults(func=train_summary)

    p = sub.add_parser("junit-check", help="check a pytest JUnit XML")
    p.add_argument("xml")
    p.add_argument("--out", required=True)
    p.add_argument("--max-skipped", type=int, default=0)
    p.set_defaults(func=junit_check)

    p = sub.add_parser("profile", help="torch.profiler top ops of a few training steps")
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="bert-base")
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--fp32", dest="bf16", action="store_false", help="fp32 weights (default: bf16, as DeepSpeed)")
    p.add_argument("--pld", action="store_true", help="PLD at theta 0.5")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", required=True)
    p.set_defaults(func=profile)

    p = sub.add_parser("report", help="write results.json and results.md")
    p.add_argument("out_dir")
    p.add_argument("--mode", default="gpu")
    p.add_argument("--started", default="")
    p.add_argument("--budget-s", type=float, default=None)
    p.set_defaults(func=report)

    p = sub.add_parser("env", help="record the environment")
    p.add_argument("--out", required=True)
    p.set_defaults(func=environment)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # run-step's command follows `--` and may hold any option; split it off before argparse sees it.
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command_name == "run-step":
        args.command = command
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
