"""Time to quality under a fixed budget: do PLD and EarlyBERT make pretraining cheaper, measured with seeds?

    python benchmarks/time_to_quality.py --data runs/data_v4k_s64 --wordnet WN --out runs/ttq_study   # the study
    python benchmarks/time_to_quality.py --out runs/ttq_study --report_only --publish docs/figures    # tables/PNGs
    python benchmarks/time_to_quality.py --smoke --out /tmp/ttq                                       # CI
    python benchmarks/time_to_quality.py --device cuda --bf16 --data DIR --out DIR --layers 12 --hidden 768 \\
        --heads 12 --batch 256 --budget_s 3600                                                        # a GPU

The protocol (docs/benchmarks.md, "Time to quality under a budget"): every arm gets the same training budget on its
own clock and plans its learning rate (warmup, then linear decay to 0) and PLD's theta for that budget, so an arm
with cheaper steps takes more of them (ttq/budget.py says why the schedule is driven by the clock). Regimes:
data-rich (one epoch of a real corpus; PLD's theta_bar swept over --thetas), data-limited (--limited_sequences of it
repeated for many epochs, dropout on) and the PLD paper's framing (a post-LN baseline at the best learning rate of
its sweep against pre-LN + PLD at the pre-LN one). Every (regime, arm) runs with every seed of --seeds; the data-rich
final models are fine-tuned on the WordNet part-of-speech task (--wordnet). Every finished run is written at once
and a rerun skips it, so the study can run in the background across sessions (ttq/plan.py has the order).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from ttq.plan import ARMS, LTD_ARMS, Group, RunSpec, StudySettings, count_runs  # noqa: E402
from ttq.store import CALIBRATION, DOWNSTREAM, RESULTS, mark_running, read_folder, read_json, write_atomic  # noqa: E402

STUDY_DATA = {"vocab_size": 1024, "max_seq_length": 64}


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _floats(text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="study folder (results accumulate here; a rerun resumes)")
    parser.add_argument("--data", help="a folder from launch/prepare_data.py (default: prepare --corpus or the "
                                       "embedded corpus into <out>/data, vocabulary 1024, sequence 64)")
    parser.add_argument("--corpus", action="append", help="corpus files / glob patterns to prepare when no --data")
    parser.add_argument("--encoding_errors", default="strict", choices=("strict", "replace"))
    parser.add_argument("--wordnet", help="WordNet's dictd database (wn.dict.dz from launch/fetch_corpus.sh) for the "
                                          "downstream task; without it the fine-tuning is skipped")
    parser.add_argument("--downstream_per_class", type=_ints, default=(1500, 400), help="train,dev examples a class")
    parser.add_argument("--finetune_max_steps", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="what a budget second is: cpu = process CPU time, one torch thread (default on the CPU: "
                             "not inflated by other jobs); wall = synchronized wall time (default on a GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1 on the CPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes at once (default: one per core on the CPU, 1 on a GPU)")
    parser.add_argument("--budget_s", type=float, default=240.0, help="training seconds per arm")
    parser.add_argument("--minutes", type=float, default=None,
                        help="size --budget_s so the whole study fits in about this many minutes of wall time "
                             "(evaluation, start-up and fine-tuning take the other 25%%)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="sequences per optimizer step")
    parser.add_argument("--lr_grid", type=_floats, default=(5e-4, 1e-3, 2e-3, 4e-3),
                        help="peak learning rates swept for the pre-LN and the post-LN baseline")
    parser.add_argument("--thetas", type=_floats, default=(0.5, 0.75, 0.9), help="PLD theta_bar sweep (data-rich)")
    parser.add_argument("--seeds", type=_ints, default=(0, 1, 2), help="initial weights and data order")
    parser.add_argument("--warmup", type=float, default=0.06, help="share of the budget spent warming up")
    parser.add_argument("--dropout", type=float, default=0.0, help="data-rich and post-LN regimes (one epoch)")
    parser.add_argument("--limited_dropout", type=float, default=0.1, help="the data-limited regime")
    parser.add_argument("--limited_sequences", type=int, default=2048,
                        help="training sequences of the data-limited regime (repeated for many epochs)")
    parser.add_argument("--steps_factor", action="append", default=[], metavar="ARM=F",
                        help="manual override: ARM gets F x the budget (its schedules stretched alike)")
    parser.add_argument("--eval_batches", type=int, default=24, help="micro-batches per evaluation")
    parser.add_argument("--report_only", action="store_true", help="write the report from the results so far")
    parser.add_argument("--publish", help="also copy study.json, study.md and the PNGs into this folder")
    parser.add_argument("--smoke", action="store_true",
                        help="CI: tiny model, 1.5 s budgets, 2 seeds, the whole protocol on the embedded corpus; no "
                             "timing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.forwarded = list(argv if argv is not None else sys.argv[1:])
    if args.smoke:
        # 3 layers: random-LTD needs a middle one; the budgets are seconds, so a layer more costs no time
        args.layers, args.hidden, args.heads, args.batch, args.budget_s = 3, 32, 2, 8, 1.5
        args.lr_grid, args.thetas, args.limited_sequences, args.eval_batches = (2e-3,), (0.5, 0.9), 32, 2
        args.downstream_per_class, args.finetune_max_steps, args.seeds = (4, 2), 3, (0, 1)
    factors = {}
    for item in args.steps_factor:
        arm, _, value = item.partition("=")
        if arm not in ARMS + LTD_ARMS or not value:
            parser.error(f"--steps_factor {item!r}: expected ARM=F with ARM in {ARMS + LTD_ARMS}")
        factors[arm] = float(value)
    args.clock = args.clock or ("wall" if args.device == "cuda" else "cpu")
    args.threads = args.threads or (None if args.device == "cuda" else 1)
    args.workers = args.workers or (1 if args.device == "cuda" else 2)
    if args.minutes is not None:
        probe = StudySettings(budget_s=1.0, layers=args.layers, hidden=args.hidden, heads=args.heads,
                              batch=args.batch, lr_grid=args.lr_grid, thetas=args.thetas, seeds=args.seeds)
        args.budget_s = round(0.75 * args.minutes * 60 * args.workers / count_runs(probe), 1)
    args.settings = StudySettings(
        budget_s=args.budget_s, layers=args.layers, hidden=args.hidden, heads=args.heads, batch=args.batch,
        lr_grid=args.lr_grid, thetas=args.thetas, seeds=args.seeds, warmup=args.warmup, dropout=args.dropout,
        limited_dropout=args.limited_dropout, limited_sequences=args.limited_sequences, budget_factors=factors,
        # the smoke run exercises random-LTD through the arm that has all three speed-ups
        ltd_arms=LTD_ARMS[-1:] if args.smoke else LTD_ARMS)
    return args


def data_folder(args: argparse.Namespace, out: Path) -> Path:
    """--data, else a dataset prepared once into <out>/data (the embedded corpus in --smoke)."""
    if args.data:
        return Path(args.data)
    if (out / "data" / "meta.json").is_file():
        return out / "data"
    from ds_pld.data import prepare_dataset

    kwargs = {"vocab_size": 2048, "max_seq_length": 32} if args.smoke else STUDY_DATA
    return prepare_dataset(out / "data", corpus_files=args.corpus, encoding_errors=args.encoding_errors,
                           num_proc=1, **kwargs)


def worker(args: argparse.Namespace, out: Path) -> int:
    """The units given to this process, one after the other: the calibration, groups of runs, fine-tunings."""
    from ttq import runner

    runner._setup(args.device, args.threads)
    data = data_folder(args, out)
    for task in json.loads(args.worker):
        if task["kind"] == "calibrate":
            write_atomic(out / CALIBRATION, runner.calibrate(args.settings, data, out, args))
        elif task["kind"] == "group":
            group = Group(task["name"], tuple(RunSpec(**run) for run in task["runs"]))
            runner.run_group(group, args.settings, data, out, args)
        else:
            finetune_all(task["keys"], out, args)
    return 0


def finetune_all(keys: list[str], out: Path, args: argparse.Namespace) -> None:
    from ttq.downstream import finetune

    results = read_folder(out / RESULTS)
    seq = read_json(out / CALIBRATION)["seq"]
    for key in keys:
        marker = mark_running(out, f"ft-{key}")
        spec = results[key]["spec"]
        scored = finetune(results[key]["final_dir"], out / "downstream_task", out / "finetune" / key, seq,
                          seed=spec["seed"] + 1, max_steps=args.finetune_max_steps)
        write_atomic(out / DOWNSTREAM / f"{key}.json", {"spec": spec, **scored})
        marker.unlink(missing_ok=True)


def report(args: argparse.Namespace, out: Path) -> dict:
    from ttq.report import build_report, markdown, plot

    results = read_folder(out / RESULTS)
    summary = build_report(args.settings, results, read_folder(out / DOWNSTREAM), read_json(out / CALIBRATION),
                           read_json(out / "downstream_task" / "reference.json"))
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("settings", "forwarded", "worker")}
    summary["results"] = results  # every curve, seed and setting
    write_atomic(out / "study.json", summary)
    text = markdown(summary)
    (out / "study.md").write_text(text)
    pictures = plot(args.settings, summary, results, out)
    print(text)
    if args.publish:
        publish(out, Path(args.publish), pictures)
    return summary


def publish(out: Path, target: Path, pictures: list[Path]) -> None:
    """The report (`ttq_study.json`, `ttq_study.md`, the PNGs) into `target`, and the raw results into
    `target/ttq_study/`: copied back into an --out folder, they let another machine continue the study."""
    target.mkdir(parents=True, exist_ok=True)
    for path in [out / "study.json", out / "study.md", *pictures]:
        shutil.copy(path, target / (path.name if path.name.startswith("ttq_") else f"ttq_{path.name}"))
    raw = target / "ttq_study"
    for name in (RESULTS, DOWNSTREAM):
        if (out / name).is_dir():
            shutil.copytree(out / name, raw / name, dirs_exist_ok=True)
    for name in (CALIBRATION, SETTINGS_FILE, "downstream_task/reference.json"):
        if (out / name).is_file():
            (raw / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / name, raw / name)


SETTINGS_FILE = "settings.json"
RESULT_SETTINGS = ("data", "corpus", "device", "bf16", "clock", "threads", "settings_dict", "eval_batches")


def check_settings(args: argparse.Namespace, out: Path) -> None:
    """A study folder holds the results of one set of settings: a rerun with others would mix them into one table."""
    current = {key: getattr(args, key) for key in RESULT_SETTINGS if key != "settings_dict"}
    current["settings_dict"] = json.loads(json.dumps(vars(args.settings), default=list))
    current = json.loads(json.dumps(current, default=list))
    saved = read_json(out / SETTINGS_FILE)
    if saved is None:
        write_atomic(out / SETTINGS_FILE, current)
        return
    # A study setting added to the script since the folder was started (random-LTD's arms) extends the study: runs are
    # keyed by their own spec, so the finished ones stay valid. It is recorded, and said.
    added = sorted(set(current["settings_dict"]) - set(saved.get("settings_dict", {})))
    if added:
        saved["settings_dict"] = {**saved["settings_dict"], **{key: current["settings_dict"][key] for key in added}}
        print(f"[ttq] settings added since this study started: {', '.join(added)}; the finished runs are kept")
    changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    if not changed and added:
        write_atomic(out / SETTINGS_FILE, current)
    if changed:
        raise SystemExit(f"error: '{out}' holds a study with other settings ({', '.join(changed)} differ; see "
                         f"{out / SETTINGS_FILE}); use another --out or the same settings")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args, out)
    if not args.report_only:
        from ttq import runner

        check_settings(args, out)
        data_folder(args, out)  # prepared once, before the workers read it
        if args.wordnet:
            from ttq.downstream import build_task

            build_task(args.wordnet, out, args.downstream_per_class)
        runner.study(args.settings, out, args)
    report(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
