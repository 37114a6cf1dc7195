"""Custom TSV tasks in the GLUE harness (task.json folders) and the WordNet part-of-speech task built from a dictd
database: task.json validation, name resolution, config overrides and the summary for a custom task, the builder on a
synthetic WordNet database and on the real one (when fetched), and an end-to-end fine-tune of a tiny model."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SCRIPTS

from ds_pld.config_errors import ConfigError
from ds_pld.glue.config import parse_glue_config
from ds_pld.glue.data import load_glue_tsv
from ds_pld.glue.finetune import RunResult
from ds_pld.glue.job import run_glue
from ds_pld.glue.metrics import compute_metrics
from ds_pld.glue.summary import summarize, summary_markdown
from ds_pld.glue.tasks import GLUE_TASKS, get_task, load_custom_task, parse_tasks
from ds_pld.glue.wordnet_pos import (
    PLACEHOLDER,
    POS_LABELS,
    bag_of_words_reference,
    build_wordnet_pos,
    headword_hash,
    parse_entry,
    read_wordnet,
    split_and_balance,
)

sys.path.insert(0, str(SCRIPTS))
from dictd_fixtures import SIZES, SPECIAL, expected_sentence, made_up_word, synthetic_entry  # noqa: E402
from glue_toy import FILLER, KEYWORDS, load_script, save_toy_model, write_sst2  # noqa: E402

REAL_WORDNET = ROOT / "runs" / "corpus" / "root" / "usr" / "share" / "dictd" / "wn.dict.dz"


def write_task(glue_dir: Path, folder_name: str = "toy", train: list[str] | None = None,
               dev: list[str] | None = None, **overrides) -> Path:
    """A custom task folder: task.json (a 3-label single-sentence task named as the folder unless overridden; a key
    given as ... is left out) and the two TSVs."""
    folder = glue_dir / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"name": folder_name, "text_columns": ["sentence"], "label_column": "label", "labels": ["x", "y", "z"],
            "metrics": ["accuracy"], **overrides}
    (folder / "task.json").write_text(json.dumps({k: v for k, v in spec.items() if v is not ...}))
    for split, rows in (("train", train), ("dev", dev)):
        if rows is not None:
            (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{row}\n" for row in rows))
    return folder / "task.json"


# --- task.json ------------------------------------------------------------------------------------------------------

def test_task_json_becomes_a_glue_task(tmp_path):
    task = load_custom_task(write_task(tmp_path, "toy", metrics=["accuracy", "matthews_correlation"]))
    assert task.name == task.folder == task.display == "toy" and task.is_custom
    assert task.text_columns == ("sentence",) and task.label_column == "label" and not task.is_pair
    assert task.labels == ("x", "y", "z") and task.num_labels == 3 and not task.is_regression
    assert task.metrics == ("accuracy", "matthews_correlation") and task.entries() == ["toy"]
    assert not get_task("rte").is_custom
    pair = load_custom_task(write_task(tmp_path, "pairs", text_columns=["a", "b"], labels=["0", "1"],
                                       metrics=["f1", "accuracy"]))
    assert pair.is_pair and pair.num_labels == 2
    regression = load_custom_task(write_task(tmp_path, "score", labels=None, metrics=["pearson", "spearman"]))
    assert regression.is_regression and regression.num_labels == 1
    # The metrics module scores it like a GLUE task.
    assert compute_metrics(task, [0, 1, 2, 2], [0, 1, 1, 2])["accuracy"] == pytest.approx(0.75)


@pytest.mark.parametrize("overrides, message", [
    ({"labels": ...}, r"missing key\(s\) \['labels'\]"),
    ({"metrics": ...}, r"missing key\(s\) \['metrics'\]"),
    ({"metrics": ["accuracy", "bleu"]}, r"'metrics' = \['accuracy', 'bleu'\]: \['bleu'\] unknown"),
    ({"metrics": ["pearson"]}, r"'metrics'.*\['pearson'\] unknown or not for a classification"),
    ({"labels": None, "metrics": ["accuracy"]}, r"'metrics'.*not for a regression"),
    ({"metrics": ["f1"]}, r"'metrics'.*f1 needs exactly 2 labels"),
    ({"metrics": []}, r"'metrics' must name at least one metric"),
    ({"labels": ["x", "x"]}, r"'labels' = \['x', 'x'\] holds duplicates"),
    ({"labels": ["x"]}, r"'labels' = \['x'\] must hold at least 2"),
    ({"text_columns": ["a", "b", "c"]}, r"'text_columns' = .* must hold 1 or 2"),
    ({"text_columns": "sentence"}, r"'text_columns' = 'sentence' must be a list"),
    ({"label_column": "sentence"}, r"'label_column' = 'sentence' is also a text column"),
    ({"name": "other"}, r"'name' = 'other' must be the name of its folder 'toy'"),
    ({"labeles": ["x", "y"]}, r"unknown key\(s\) \['labeles'\]"),
])
def test_bad_task_json_names_the_file_and_the_key(tmp_path, overrides, message):
    path = write_task(tmp_path, "toy", **overrides)
    with pytest.raises(ConfigError, match=message) as error:
        load_custom_task(path)
    text = str(error.value)
    assert f"custom task file '{path}'" in text and "\n" not in text


def test_bad_task_json_file_and_names(tmp_path):
    for folder in ("rte", "Big"):
        (tmp_path / folder).mkdir()
    (tmp_path / "rte" / "task.json").write_text(json.dumps({"name": "rte", "text_columns": ["s"],
                                                            "label_column": "l", "labels": None,
                                                            "metrics": ["pearson"]}))
    with pytest.raises(ConfigError, match="'name' = 'rte' is a GLUE task's name"):
        load_custom_task(tmp_path / "rte")
    (tmp_path / "Big" / "task.json").write_text(json.dumps({"name": "Big", "text_columns": ["s"],
                                                            "label_column": "l", "labels": ["a", "b"],
                                                            "metrics": ["accuracy"]}))
    with pytest.raises(ConfigError, match="'name' = 'Big' must be lowercase"):
        load_custom_task(tmp_path / "Big" / "task.json")
    (tmp_path / "Big" / "task.json").write_text("{'name': 1}")
    with pytest.raises(ConfigError, match=r"Big/task.json': not valid JSON"):
        load_custom_task(tmp_path / "Big" / "task.json")
    (tmp_path / "Big" / "task.json").write_text("[1]")
    with pytest.raises(ConfigError, match="must hold a JSON object, got list"):
        load_custom_task(tmp_path / "Big" / "task.json")


# --- resolution, config, data, summary --------------------------------------------------------------------------

def test_custom_tasks_resolve_through_the_glue_dir(tmp_path):
    write_task(tmp_path, "wordpos", labels=["n", "v"])
    write_task(tmp_path, "rte")  # a folder named like a GLUE task does not shadow it
    assert get_task("RTE", tmp_path) is GLUE_TASKS["rte"] and get_task("rte", tmp_path) is GLUE_TASKS["rte"]
    tasks = parse_tasks("rte, WordPos,sst-2,wordpos", tmp_path)
    assert [t.name for t in tasks] == ["rte", "wordpos", "sst2"]
    assert tasks[1].is_custom and tasks[1].labels == ("n", "v")
    with pytest.raises(ConfigError, match=r"unknown GLUE task 'wordpos'.*custom task folder.*needs --glue_dir"):
        parse_tasks("rte,wordpos")
    with pytest.raises(ConfigError, match=r"unknown GLUE task 'nope'; known tasks: cola, .*custom task folder "
                                          r"<glue_dir>/<name>/task.json \('.*nope/task.json' does not exist\)"):
        parse_tasks("rte,nope", tmp_path)
    with pytest.raises(ConfigError, match=r"unknown GLUE task '\.\./x'.*lowercase letters"):
        get_task("../x", tmp_path)
    assert len(parse_tasks("all", tmp_path)) == 9  # `all` is GLUE's nine


def test_config_overrides_and_settings_of_a_custom_task(tmp_path):
    write_task(tmp_path, "wordpos")
    block = {"glue": {"epochs": 2, "tasks": {"wordpos": {"epochs": 5, "learning_rate": 1e-4},
                                             "rte": {"epochs": 3}}}}
    glue, _ = parse_glue_config(block, tmp_path)
    assert glue.settings("wordpos").epochs == 5.0 and glue.settings("wordpos").learning_rate == 1e-4
    assert glue.settings("RTE").epochs == 3.0 and glue.settings("sst-2").epochs == 2.0
    assert glue.settings("other_custom") == glue.defaults  # a custom task without overrides: the defaults
    with pytest.raises(ConfigError, match=r"'glue\.tasks\.wordpos': unknown GLUE task 'wordpos'"):
        parse_glue_config(block)  # without the glue_dir the name is unknown, as a typo would be
    with pytest.raises(ConfigError, match=r"'glue\.tasks\.wordpos\.epochs' = 0"):
        parse_glue_config({"glue": {"tasks": {"wordpos": {"epochs": 0}}}}, tmp_path)


def test_custom_tsv_is_read_like_glue_and_checks_labels(tmp_path):
    write_task(tmp_path, "toy", train=['a "quoted b\tx', "c d\tz"], dev=["e\ty"])
    task = get_task("toy", tmp_path)
    data = load_glue_tsv(task, tmp_path)
    assert data.train["text_a"] == ['a "quoted b', "c d"] and data.train["label"] == [0, 2]
    assert list(data.dev) == ["dev"] and data.dev["dev"]["label"] == [1]
    (tmp_path / "toy" / "dev.tsv").write_text("sentence\tlabel\ne\tq\n")
    with pytest.raises(ConfigError, match=r"toy/dev\.tsv' column 'label' holds unknown label\(s\) \['q'\]; "
                                          r"expected \['x', 'y', 'z'\]"):
        load_glue_tsv(task, tmp_path)
    (tmp_path / "toy" / "dev.tsv").write_text("text\tlabel\ne\tx\n")
    with pytest.raises(ConfigError, match=r"has no column\(s\) \['sentence'\]"):
        load_glue_tsv(task, tmp_path)
    from ds_pld.glue.data import load_glue_task

    with pytest.raises(ConfigError, match="custom task 'toy' has no Hugging Face dataset"):
        load_glue_task(task, None)


def test_summary_shows_a_custom_task_and_leaves_it_out_of_the_glue_average():
    def result(task: str, seed: int, dev: dict) -> RunResult:
        return RunResult(task=task, seed=seed, dev=dev, learning_rate=1e-4, steps=1, train_loss=0.1, seconds=1.0)

    results = [result("rte", 1, {"rte": {"accuracy": 0.6}}), result("wordpos", 1, {"wordpos": {"accuracy": 0.9}}),
               result("rte", 2, {"rte": {"accuracy": 0.7}}), result("wordpos", 2, {"wordpos": {"accuracy": 0.8}})]
    summary = summarize(results, "mean")
    assert list(summary["entries"]) == ["rte", "wordpos"]
    assert summary["entries"]["wordpos"]["score"] == pytest.approx(85.0)
    assert summary["glue_average"] == pytest.approx(65.0) and summary["average_over"] == ["rte"]
    table = summary_markdown(summary)
    assert "| wordpos | acc | 90.0 | 80.0 | 85.0 | 85.0 |" in table
    assert "over RTE |" in table
    only_custom = summarize(results[1::2], "mean")
    assert math.isnan(only_custom["glue_average"]) and only_custom["average_over"] == []
    assert "over nothing" in summary_markdown(only_custom)


# --- the WordNet part-of-speech builder on a synthetic dictd database ------------------------------------------------

def test_parse_entry_takes_the_first_sense_and_masks_the_headword():
    entry = parse_entry(synthetic_entry("zorp", "v", 1))
    assert entry.headword == "zorp" and entry.label == "v"
    assert entry.sentence == "to move or ___ the river quickly"
    adj = parse_entry("Zorpish\n    adj 1: like ZORPISH things, not zorpishly;\n           \"zorpish\" [syn: "
                      "{zorpish}]\n    2: other", placeholder="[W]")
    assert adj.label == "adj" and adj.sentence == "like [W] things, not zorpishly"  # whole words, any case
    assert parse_entry(SPECIAL[0]) is None and parse_entry(SPECIAL[1]) is None and parse_entry(SPECIAL[2]) is None
    zigzag = parse_entry(SPECIAL[3])
    assert (zigzag.label, zigzag.sentence) == ("n", "a line or course that proceeds by sharp turns in alternating "
                                                    "directions")


def test_builder_balances_splits_by_headword_and_is_deterministic(tmp_path, synthetic_wordnet):
    examples = read_wordnet(synthetic_wordnet)
    assert len(examples) == sum(SIZES.values()) + 1  # + Zigzag; the skipped and repeated entries give none
    words = {e.headword: e for e in examples}
    assert words["Zigzag"].label == "n" and "zigzag" not in words
    for pos, size in SIZES.items():
        for i in range(size):
            example = words[made_up_word(pos, i)]
            assert example.label == pos and example.sentence == expected_sentence(pos, i)

    built = build_wordnet_pos(synthetic_wordnet, tmp_path / "out", train_per_class=8, dev_per_class=3,
                              dev_fraction=0.3)
    folder = tmp_path / "out" / "wordpos"
    assert built["task_dir"] == str(folder) and built["examples"] == len(examples)
    chosen, info = split_and_balance(examples, 8, 3, dev_fraction=0.3)
    assert info["available"] == built["available"]
    for split, per_class in (("train", 8), ("dev", 3)):
        rows = [line.split("\t") for line in (folder / f"{split}.tsv").read_text().splitlines()]
        assert rows[0] == ["sentence", "label"] and all(len(row) == 2 for row in rows)
        assert rows[1:] == [[e.sentence, e.label] for e in chosen[split]]
        counts = {label: sum(row[1] == label for row in rows[1:]) for label in POS_LABELS}
        assert counts == built["counts"][split] == {label: per_class for label in POS_LABELS}
        for example in chosen[split]:
            assert (headword_hash(example.headword)[0] < 0.3) == (split == "dev")
            assert not re.search(rf"\b{re.escape(example.headword)}\b", example.sentence, re.IGNORECASE)
            assert not re.search(r"\[|\{|\"|example|secondsense|otherpos", example.sentence)
    train_words = {e.headword.lower() for e in chosen["train"]}
    assert not train_words & {e.headword.lower() for e in chosen["dev"]}
    assert len(train_words) == 4 * 8
    task = load_custom_task(folder / "task.json")
    assert task.name == "wordpos" and task.labels == POS_LABELS and task.metrics == ("accuracy",)

    # Deterministic: the same files again; another seed picks other headwords.
    build_wordnet_pos(synthetic_wordnet, tmp_path / "again", train_per_class=8, dev_per_class=3, dev_fraction=0.3)
    for name in ("task.json", "train.tsv", "dev.tsv"):
        assert (tmp_path / "again" / "wordpos" / name).read_bytes() == (folder / name).read_bytes()
    build_wordnet_pos(synthetic_wordnet, tmp_path / "seed1", train_per_class=8, dev_per_class=3, dev_fraction=0.3,
                      seed=1)
    assert (tmp_path / "seed1" / "wordpos" / "train.tsv").read_text() != (folder / "train.tsv").read_text()


def test_builder_caps_every_class_at_the_smallest(tmp_path, synthetic_wordnet):
    built = build_wordnet_pos(synthetic_wordnet, tmp_path, train_per_class=1000, dev_per_class=1000)
    assert built["dev_fraction"] == pytest.approx(0.5)
    for split in ("train", "dev"):
        smallest = min(built["available"][split].values())
        assert 0 < smallest < 1000 and built["counts"][split] == {label: smallest for label in POS_LABELS}
    assert built["available"]["train"]["adv"] + built["available"]["dev"]["adv"] == SIZES["adv"]
    with pytest.raises(ConfigError, match=r"no example labelled \['adv'\]"):
        split_and_balance([e for e in read_wordnet(synthetic_wordnet) if e.label != "adv"], 5, 5)
    with pytest.raises(ConfigError, match="'train_per_class' = 0 must be an integer >= 1"):
        build_wordnet_pos(synthetic_wordnet, tmp_path, train_per_class=0)
    with pytest.raises(ConfigError, match="does not exist"):
        build_wordnet_pos(tmp_path / "missing.dict.dz", tmp_path)


def test_bag_of_words_reference_and_the_cli(tmp_path, synthetic_wordnet, capsys):
    build_wordnet_pos(synthetic_wordnet, tmp_path, train_per_class=8, dev_per_class=3, dev_fraction=0.3)
    reference = bag_of_words_reference(tmp_path / "wordpos")
    # Each label's glosses share their own words: the words alone separate them; balanced dev: a quarter each.
    assert reference["bag_of_words_accuracy"] == 1.0
    assert reference["majority_accuracy"] == pytest.approx(0.25) and reference["majority_label"] == "n"
    assert (reference["train"], reference["dev"]) == (32, 12)

    cli = load_script(ROOT / "launch" / "make_wordnet_pos.py")
    assert cli.main(["--wn", str(synthetic_wordnet), "--out", str(tmp_path / "cli"), "--train_per_class", "8",
                     "--dev_per_class", "3", "--dev_fraction", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert " train: 32 = n 8, v 8, adj 8, adv 8" in printed and "   dev: 12 = n 3, v 3, adj 3, adv 3" in printed
    assert "bag of words (TF-IDF + logistic regression) 1.0000, majority class ('n') 0.2500" in printed
    cli_train, api_train = (tmp_path / "cli" / "wordpos" / "train.tsv"), (tmp_path / "wordpos" / "train.tsv")
    assert cli_train.read_bytes() == api_train.read_bytes()
    assert cli.main(["--wn", str(tmp_path / "none.dict.dz"), "--out", str(tmp_path / "x")]) == 2
    assert "none.dict.dz' does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not REAL_WORDNET.is_file(), reason=f"the real WordNet database is not fetched ({REAL_WORDNET}; "
                                                       f"bash launch/fetch_corpus.sh runs/corpus)")
def test_builder_on_the_real_wordnet(tmp_path):
    """The first 6000 entries of the real database (a quick read) give a balanced task the harness reads."""
    built = build_wordnet_pos(REAL_WORDNET, tmp_path, train_per_class=30, dev_per_class=10, max_entries=6000)
    assert built["counts"] == {"train": dict.fromkeys(POS_LABELS, 30), "dev": dict.fromkeys(POS_LABELS, 10)}
    assert all(built["available"][split][label] >= 10 for split in ("train", "dev") for label in POS_LABELS)
    task = get_task("wordpos", tmp_path)
    data = load_glue_tsv(task, tmp_path)
    assert len(data.train) == 120 and len(data.dev["dev"]) == 40
    assert sorted(data.train["label"]) == sorted([0, 1, 2, 3] * 30)
    for sentence in list(data.train["text_a"]) + list(data.dev["dev"]["text_a"]):
        assert sentence and "[syn:" not in sentence and "[ant:" not in sentence and '"' not in sentence
        assert "  " not in sentence and "\t" not in sentence
    examples = read_wordnet(REAL_WORDNET, max_entries=6000)
    assert {e.label for e in examples} == set(POS_LABELS) and len({e.headword.lower() for e in examples}) == len(
        examples)
    assert sum(PLACEHOLDER in e.sentence for e in examples) > 10  # headwords that were in their gloss, masked
    for example in examples:
        assert " " not in example.headword
        assert not re.search(rf"(?<![\w'-]){re.escape(example.headword)}(?![\w'-])", example.sentence, re.IGNORECASE)
    reference = bag_of_words_reference(tmp_path / "wordpos")
    assert 0.25 < reference["bag_of_words_accuracy"] <= 1.0 and reference["majority_accuracy"] == 0.25


# --- end to end -----------------------------------------------------------------------------------------------------

def write_toy_custom_task(glue_dir: Path, train: int = 64, dev: int = 24, seed: int = 0) -> None:
    """Three labels a keyword decides: 'good' -> pos, 'bad' -> neg, neither -> none."""
    import random

    rng = random.Random(seed)
    rows = {}
    for split, n in (("train", train), ("dev", dev)):
        rows[split] = []
        for _ in range(n):
            label = rng.choice(("pos", "neg", "none"))
            words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
            if label != "none":
                words.insert(rng.randint(0, len(words)), KEYWORDS[label == "neg"])
            rows[split].append(f"{' '.join(words)}\t{label}")
    write_task(glue_dir, "toy_kw", rows["train"], rows["dev"], labels=["pos", "neg", "none"],
               metrics=["accuracy", "matthews_correlation"])


def test_finetune_a_custom_task_through_run_glue(tmp_path, single_rank_world):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = save_toy_model(tmp_path / "pretrained" / "final")
        glue_dir = tmp_path / "glue"
        write_toy_custom_task(glue_dir)
        write_sst2(glue_dir, train=32, dev=16)
        config = {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
                  "glue": {"learning_rate": 1e-3, "epochs": 2, "batch_size": 16, "max_seq_length": 32, "seeds": [1],
                           "tasks": {"toy_kw": {"epochs": 1, "learning_rate": 2e-3}}}}
        out = tmp_path / "out"
        summary = run_glue(model, "toy_kw,sst2", out, config, glue_dir=glue_dir, max_steps=6)
    finally:
        torch.set_num_threads(threads)
    runs = {run["task"]: run for run in summary["runs"]}
    # The per-task override reached the custom task: 1 epoch = 64 / 16 = 4 steps (not the cap of 6), its rate.
    assert runs["toy_kw"]["steps"] == 4 and runs["toy_kw"]["learning_rate"] == 2e-3
    assert runs["sst2"]["steps"] == 4 and runs["sst2"]["learning_rate"] == 1e-3  # 2 epochs of 32 / 16
    entry = summary["entries"]["toy_kw"]
    assert entry["metrics"] == ["accuracy", "matthews_correlation"]
    assert 0.0 <= entry["aggregated"]["accuracy"] <= 1.0
    accuracy = runs["toy_kw"]["dev"]["toy_kw"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0 and abs(accuracy * 24 - round(accuracy * 24)) < 1e-9  # scored on the 24 dev rows
    assert summary["average_over"] == ["sst2"]
    assert summary["glue_average"] == pytest.approx(summary["entries"]["sst2"]["score"])
    saved = json.loads((out / "glue_summary.json").read_text())
    assert saved["entries"]["toy_kw"]["aggregated"] == pytest.approx(entry["aggregated"])
    assert json.loads((out / "toy_kw" / "seed1" / "metrics.json").read_text())["dev"] == runs["toy_kw"]["dev"]
    assert "| toy_kw | acc/MCC |" in (out / "glue_summary.md").read_text()
