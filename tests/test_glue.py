"""GLUE fine-tuning: metrics on known predictions, the TSV layouts, tokenization, bad input, end-to-end fine-tuning
of toy tasks a tiny model learns, EarlyBERT's fine-tuning mode, and a 2-rank run through the launcher."""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SCRIPTS, run_deepspeed

from ds_pld.config_errors import ConfigError
from ds_pld.glue.config import TaskSettings, parse_glue_config
from ds_pld.glue.data import collator, load_glue_tsv, read_glue_tsv, tokenize
from ds_pld.glue.finetune import RunResult
from ds_pld.glue.job import run_glue
from ds_pld.glue.metrics import compute_metrics, glue_average, task_score
from ds_pld.glue.model import SequenceClassifier, check_vocabulary, prune_classifier
from ds_pld.glue.optimization import deepspeed_config, linear_warmup_decay
from ds_pld.glue.summary import summarize, summary_markdown, write_summary
from ds_pld.glue.tasks import get_task, parse_tasks
from ds_pld.models.config import build_bert_config
from ds_pld.optim.moments import full_precision_state

sys.path.insert(0, str(SCRIPTS))
from glue_toy import (  # noqa: E402
    VOCAB,
    load_script,
    make_model,
    make_tokenizer,
    save_toy_model,
    write_cola,
    write_mnli,
    write_rte,
    write_sst2,
    write_stsb,
)


def glue_config(**glue) -> dict:
    """Tiny-model settings: torch's AdamW (no op to load), a learning rate a random-init tiny model learns with."""
    block = {"learning_rate": 1e-3, "epochs": 2, "batch_size": 16, "max_seq_length": 32, "warmup_ratio": 0.1,
             "seeds": [1], **glue}
    return {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            "glue": block}


@pytest.fixture
def one_thread():
    """Tiny matrices run faster on one thread than split over two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    return save_toy_model(tmp_path_factory.mktemp("pretrained") / "final")


# --- metrics --------------------------------------------------------------------------------------------------------

GOLD = [1, 1, 0, 0, 1, 0]
PRED = [1, 0, 0, 1, 1, 0]  # tp = 2, fn = 1, fp = 1, tn = 2


def test_classification_metrics_match_hand_computed_values():
    tp, fn, fp, tn = 2, 1, 1, 2
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics(get_task("cola"), PRED, GOLD) == pytest.approx({"matthews_correlation": mcc})
    assert mcc == pytest.approx(1 / 3)
    assert compute_metrics(get_task("mrpc"), PRED, GOLD) == pytest.approx(
        {"f1": 2 * tp / (2 * tp + fp + fn), "accuracy": 4 / 6})
    assert compute_metrics(get_task("qqp"), PRED, GOLD) == pytest.approx({"f1": 2 / 3, "accuracy": 2 / 3})
    assert compute_metrics(get_task("sst2"), PRED, GOLD) == pytest.approx({"accuracy": 4 / 6})
    assert compute_metrics(get_task("mnli"), [0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx({"accuracy": 0.75})


def test_regression_metrics_match_hand_computed_values():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.5]
    mx, my = sum(x) / 4, sum(y) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    pearson = cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    spearman = 1 - 6 * (0 + 0 + 1 + 1) / (4 * (4 ** 2 - 1))  # ranks of y: 1, 2, 4, 3
    metrics = compute_metrics(get_task("stsb"), x, y)
    assert metrics == pytest.approx({"pearson": pearson, "spearman": spearman})
    assert task_score(metrics) == pytest.approx(100 * (pearson + spearman) / 2)
    # A collapsed regressor has no correlation: 0, not NaN.
    assert compute_metrics(get_task("stsb"), [3.0] * 4, y) == {"pearson": 0.0, "spearman": 0.0}


def test_glue_average_counts_mnli_twice_and_leaves_out_wnli():
    scores = {"rte": 60.0, "mrpc": 80.0, "mnli-m": 70.0, "mnli-mm": 72.0, "wnli": 10.0}
    assert glue_average(scores) == pytest.approx((60 + 80 + 70 + 72) / 4)
    assert math.isnan(glue_average({"wnli": 50.0}))


def _result(task: str, seed: int, dev: dict) -> RunResult:
    return RunResult(task=task, seed=seed, dev=dev, learning_rate=1e-4, steps=10, train_loss=0.1, seconds=1.0)


def test_summary_aggregates_seeds_and_writes_table(tmp_path):
    results = []
    for seed, acc, (f1, mrpc_acc), (m, mm) in ((1, 0.5, (0.8, 0.6), (0.70, 0.71)), (2, 0.6, (0.9, 0.7), (0.72, 0.73)),
                                               (3, 0.9, (0.7, 0.9), (0.74, 0.69))):
        results += [_result("rte", seed, {"rte": {"accuracy": acc}}),
                    _result("mrpc", seed, {"mrpc": {"f1": f1, "accuracy": mrpc_acc}}),
                    _result("mnli", seed, {"mnli-m": {"accuracy": m}, "mnli-mm": {"accuracy": mm}}),
                    _result("wnli", seed, {"wnli": {"accuracy": 0.1}})]
    median = summarize(results, "median", "model")
    entries = median["entries"]
    assert list(entries) == ["rte", "mrpc", "mnli-m", "mnli-mm", "wnli"]  # the PLD paper's column order
    assert entries["rte"]["score"] == pytest.approx(60.0)
    assert entries["mrpc"]["aggregated"] == pytest.approx({"f1": 0.8, "accuracy": 0.7})
    assert entries["mrpc"]["score"] == pytest.approx(80.0)  # median of the per-seed means 70, 80, 80
    assert entries["mnli-mm"]["score"] == pytest.approx(71.0)
    assert median["glue_average"] == pytest.approx((60 + 80 + 72 + 71) / 4)
    assert median["average_over"] == ["rte", "mrpc", "mnli-m", "mnli-mm"]
    mean = summarize(results, "mean")
    assert mean["entries"]["rte"]["score"] == pytest.approx(100 * (0.5 + 0.6 + 0.9) / 3)
    assert mean["entries"]["mrpc"]["score"] == pytest.approx((70 + 80 + 80) / 3)

    json_path, md_path = write_summary(median, tmp_path)
    assert json.loads(json_path.read_text())["glue_average"] == pytest.approx(median["glue_average"])
    table = md_path.read_text()
    assert table == summary_markdown(median)
    assert "| Task | Metric | seed 1 | seed 2 | seed 3 | median | score |" in table
    assert "| RTE | acc | 50.0 | 60.0 | 90.0 | 60.0 | 60.0 |" in table
    assert "| MRPC | F1/acc | 80.0/60.0 | 90.0/70.0 | 70.0/90.0 | 80.0/70.0 | 80.0 |" in table
    assert "| MNLI-mm | acc |" in table
    assert f"| {median['glue_average']:.1f} |" in table.splitlines()[-1]


# --- data -----------------------------------------------------------------------------------------------------------

def test_tsv_layouts_cola_without_header_mnli_two_dev_sets_and_quotes(tmp_path):
    write_cola(tmp_path, train=10, dev=6)
    cola = load_glue_tsv(get_task("CoLA"), tmp_path)
    assert len(cola.train) == 10 and list(cola.dev) == ["dev"] and len(cola.dev["dev"]) == 6
    first = (tmp_path / "CoLA" / "train.tsv").read_text().splitlines()[0].split("\t")
    assert cola.train[0] == {"text_a": first[3], "label": int(first[1])}

    write_mnli(tmp_path, n=9)
    mnli = load_glue_tsv(get_task("mnli"), tmp_path)
    assert list(mnli.dev) == ["m", "mm"] and get_task("mnli").entries() == ["mnli-m", "mnli-mm"]
    assert mnli.dev["mm"]["label"] == [0, 1, 2] * 3  # entailment, neutral, contradiction: the hub's ids
    assert set(mnli.train.column_names) == {"text_a", "text_b", "label"}

    sst = tmp_path / "SST-2" / "train.tsv"
    sst.parent.mkdir()
    sst.write_text('sentence\tlabel\nhe said "good\t1\n\' a film \'\t0\n')
    data = read_glue_tsv(get_task("sst-2"), sst)
    assert data["text_a"] == ['he said "good', "' a film '"] and data["label"] == [1, 0]

    write_stsb(tmp_path, train=5, dev=5)
    stsb = load_glue_tsv(get_task("sts-b"), tmp_path)
    assert all(isinstance(v, float) and 0 <= v <= 5 for v in stsb.train["label"])


def test_pairs_get_segment_ids_and_batches_are_right_padded(tmp_path):
    tokenizer = make_tokenizer()
    write_rte(tmp_path, train=4, dev=2)
    data = tokenize(load_glue_tsv(get_task("rte"), tmp_path).train, tokenizer, max_seq_length=12)
    for example in data:
        ids, types = example["input_ids"], example["token_type_ids"]
        assert len(ids) <= 12 and ids[0] == tokenizer.cls_token_id
        first_sep = ids.index(tokenizer.sep_token_id)
        assert set(types[:first_sep + 1]) == {0} and set(types[first_sep + 1:]) == {1}
        assert ids[-1] == tokenizer.sep_token_id  # truncation keeps the closing [SEP]
    long = tokenize(load_glue_tsv(get_task("rte"), tmp_path).train, tokenizer, max_seq_length=32)
    batch = collator(tokenizer)([long[i] for i in range(4)])
    lengths = [len(long[i]["input_ids"]) for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths)) and batch["labels"].dtype == torch.long
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert set(batch["input_ids"][row, length:].tolist()) <= {tokenizer.pad_token_id}


# --- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("glue, key", [
    ({"learning_rate": -1}, "glue.learning_rate"),
    ({"tasks": {"foo": {}}}, "glue.tasks.foo"),
    ({"tasks": {"rte": {"lr": 1e-4}}}, "lr"),
    ({"tasks": {"rte": {"epochs": 0}}}, "glue.tasks.rte.epochs"),
    ({"aggregate": "max"}, "glue.aggregate"),
    ({"seeds": []}, "glue.seeds"),
    ({"batch_sise": 8}, "batch_sise"),
    ({"earlybert": {"lambda_head": -1}}, "glue.earlybert.lambda_head"),
])
def test_bad_glue_block_names_the_key(glue, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_glue_config({"glue": glue})


@pytest.mark.parametrize("extra, key", [({"train_batch_size": 32}, "train_batch_size"),
                                        ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
                                        ({"earlybert": {"draw_at_step": 2}}, "glue.earlybert")])
def test_keys_the_glue_block_owns_are_rejected(extra, key):
    with pytest.raises(ConfigError, match=key):
        parse_glue_config({**extra, "glue": {}})


def test_shipped_config_has_the_papers_learning_rates():
    glue, rest = parse_glue_config(ROOT / "ds_configs" / "glue.json")
    paper = {"rte": 7e-5, "mrpc": 9e-5, "stsb": 7e-5, "cola": 5e-5, "sst2": 7e-5, "qnli": 9e-5, "qqp": 2e-4,
             "mnli": 3e-5}
    assert {task: glue.settings(task).learning_rate for task in paper} == paper
    assert "glue" not in rest and glue.aggregate == "median"


def test_batch_size_must_split_into_micro_batches():
    with pytest.raises(ConfigError, match="glue.batch_size.*train_micro_batch_size_per_gpu"):
        deepspeed_config({"train_micro_batch_size_per_gpu": 5}, TaskSettings(batch_size=32), 0.0, world_size=1)
    config = deepspeed_config({"train_micro_batch_size_per_gpu": 4}, TaskSettings(batch_size=32), 0.01, 2)
    assert (config["train_batch_size"], config["gradient_accumulation_steps"]) == (32, 4)
    assert config["optimizer"]["params"] == {"lr": 5e-5, "weight_decay": 0.01}


def test_task_names():
    assert [t.name for t in parse_tasks("RTE, sst-2,STS-B,rte")] == ["rte", "sst2", "stsb"]
    assert len(parse_tasks("all")) == 9
    with pytest.raises(ConfigError, match="unknown GLUE task 'sst3'"):
        parse_tasks("rte,sst3")


def test_vocabulary_must_match_the_tokenizer():
    tokenizer = make_tokenizer()
    check_vocabulary(build_bert_config("bert-tiny", vocab_size=len(VOCAB)), tokenizer, "m")
    check_vocabulary(build_bert_config("bert-tiny", vocab_size=-(-len(VOCAB) // 8) * 8), tokenizer, "m")  # padded
    for size in (len(VOCAB) - 3, len(VOCAB) + 50):
        with pytest.raises(ConfigError, match=f"vocabulary has {size} entries but the tokenizer has {len(VOCAB)}"):
            check_vocabulary(build_bert_config("bert-tiny", vocab_size=size), tokenizer, "m")


def _bad_input(tmp_path: Path, toy_model: Path, case: str) -> tuple[dict, str]:
    """Arguments of run_glue for one broken input, and the message it must fail with."""
    glue_dir = tmp_path / "glue"
    write_rte(glue_dir, train=8, dev=4)
    args = {"model": toy_model, "tasks": "rte", "glue_dir": glue_dir, "deepspeed_config": glue_config()}
    if case == "unknown task":
        return {**args, "tasks": "rte,qnlii"}, "unknown GLUE task 'qnlii'"
    if case == "missing file":
        (glue_dir / "RTE" / "dev.tsv").unlink()
        return args, r"RTE.*dev\.tsv' does not exist"
    if case == "missing column":
        path = glue_dir / "RTE" / "train.tsv"
        lines = path.read_text().splitlines()
        path.write_text("\n".join(["index\tsentence1\thypothesis\tlabel", *lines[1:]]) + "\n")
        return args, r"train\.tsv' has no column\(s\) \['sentence2'\]"
    if case == "unknown label":
        path = glue_dir / "RTE" / "dev.tsv"
        path.write_text(path.read_text() + "99\ta cat\ta dog\tcontradiction\n")
        return args, "unknown label.*contradiction"
    if case == "missing folder":
        return {**args, "tasks": "sst2"}, r"SST-2' does not exist"
    if case == "vocabulary":
        model = save_toy_model(tmp_path / "other", vocab_size=len(VOCAB) + 50)
        return {**args, "model": model}, "vocabulary has 81 entries but the tokenizer has 31"
    if case == "sequence length":
        return {**args, "deepspeed_config": glue_config(max_seq_length=128)}, "max_seq_length' = 128.*64 position"
    if case == "missing model":
        return {**args, "model": tmp_path / "no_such_model"}, r"model folder '.*no_such_model' does not exist"
    if case == "no tokenizer":
        return {**args, "model": toy_model / "ds_pld_model.json"}, "no tokenizer folder"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unknown task", "missing file", "missing column", "unknown label", "missing folder",
                                  "vocabulary", "sequence length", "missing model"])
def test_bad_input_fails_before_training(tmp_path, toy_model, case):
    """Each error comes from the checks before training: nothing is written."""
    args, message = _bad_input(tmp_path, toy_model, case)
    with pytest.raises(ConfigError, match=message):
        run_glue(output_dir=tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_input(tmp_path, toy_model, capsys, single_rank_world):
    cli = load_script(ROOT / "launch" / "finetune.py")
    code = cli.main(["--model", str(toy_model), "--tasks", "rte,foo", "--glue_dir", str(tmp_path),
                     "--output_dir", str(tmp_path / "out")])
    assert code == 2 and "unknown GLUE task 'foo'" in capsys.readouterr().err


def test_cli_names_a_missing_model_folder(tmp_path, capsys, single_rank_world):
    """`--model <missing>` is reported as the missing model in one line, not as a missing tokenizer."""
    cli = load_script(ROOT / "launch" / "finetune.py")
    missing = tmp_path / "runs" / "bert" / "final"
    code = cli.main(["--model", str(missing), "--tasks", "rte", "--glue_dir", str(tmp_path),
                     "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: pretrained model folder '{missing}' does not exist (--model)"
    assert not (tmp_path / "out").exists()


# --- model ----------------------------------------------------------------------------------------------------------

def test_classifier_reads_cls_and_passes_pld_keywords_through():
    model = SequenceClassifier(make_model(num_layers=4), num_labels=3, dropout=0.0)
    runs = [0] * 4
    for i, layer in enumerate(model.bert.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    ids = torch.randint(5, len(VOCAB), (2, 7))
    labels = torch.tensor([0, 2])
    out = model(ids, labels=labels, progressive_layer_drop=True, pld_theta=0.1, pld_seed=3)
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    assert sum(runs) < 4  # PLD dropped layers in training
    model.eval()
    runs[:] = [0] * 4
    with torch.no_grad():
        first = model(ids).logits
        ids[:, 1:] = torch.randint(5, len(VOCAB), (2, 6))
        assert not torch.allclose(first, model(ids).logits)  # the whole sequence reaches [CLS]
    assert runs == [2] * 4
    # Pretraining heads are frozen: the optimizer gets the encoder and the classifier only.
    trainable = {name.split(".")[0] + "." + name.split(".")[1] for name, p in model.named_parameters()
                 if p.requires_grad}
    assert trainable == {"bert.embeddings", "bert.encoder", "classifier.dense", "classifier.out_proj"}


def test_regressor_uses_mse():
    model = SequenceClassifier(make_model(), num_labels=1, dropout=0.0).eval()
    ids, target = torch.randint(5, len(VOCAB), (3, 5)), torch.tensor([0.0, 2.5, 5.0])
    out = model(ids, labels=target)
    assert out.logits.shape == (3, 1)
    assert out.loss.item() == pytest.approx(((out.logits.squeeze(-1) - target) ** 2).mean().item(), rel=1e-6)


# --- fine-tuning ----------------------------------------------------------------------------------------------------

def test_finetune_learns_toy_tasks_and_writes_the_summary(tmp_path, toy_model, single_rank_world, one_thread):
    """SST-2 (single sentences), STS-B (regression on pairs), RTE (pairs): a keyword decides the label, so a tiny
    model fine-tuned for 32 steps must get them right; two seeds, median."""
    glue_dir = tmp_path / "glue"
    for write in (write_sst2, write_stsb, write_rte):
        write(glue_dir)
    out = tmp_path / "out"
    summary = run_glue(toy_model, "sst2,stsb,rte", out, glue_config(seeds=[1, 2]), glue_dir=glue_dir)

    runs = {(r["task"], r["seed"]): r for r in summary["runs"]}
    assert set(runs) == {(t, s) for t in ("sst2", "stsb", "rte") for s in (1, 2)}
    for (task, seed), run in runs.items():
        # 256 examples / micro-batch 8 = 32 micro-batches per epoch, 2 epochs, 2 micro-batches per step.
        assert run["steps"] == 32 and len(run["losses"]) == 32
        warmup = int(0.1 * 32)
        assert run["learning_rates"] == pytest.approx([1e-3 * linear_warmup_decay(s, warmup, 32) for s in range(32)])
        assert sum(run["losses"][-4:]) < sum(run["losses"][:4])
        if task == "stsb":
            assert run["dev"]["stsb"]["pearson"] > 0.7, run["dev"]
        else:
            assert run["dev"][task]["accuracy"] >= 0.9, run["dev"]
        saved = json.loads((out / task / f"seed{seed}" / "metrics.json").read_text())
        assert saved["dev"] == run["dev"]
    assert runs[("sst2", 1)]["losses"] != runs[("sst2", 2)]["losses"]  # seeds differ

    saved = json.loads((out / "glue_summary.json").read_text())
    assert list(saved["entries"]) == ["rte", "stsb", "sst2"]
    for item in saved["entries"].values():
        assert item["score"] == pytest.approx(statistics.median(item["per_seed_score"].values()))
    scores = [item["score"] for item in saved["entries"].values()]
    assert saved["glue_average"] == pytest.approx(sum(scores) / 3)
    table = (out / "glue_summary.md").read_text()
    assert "| STS-B | Pearson/Spearman |" in table and "**GLUE average**" in table


def test_earlybert_finetuning_searches_draws_and_trains_the_pruned_model(tmp_path, toy_model, single_rank_world,
                                                                         one_thread):
    glue_dir = tmp_path / "glue"
    write_sst2(glue_dir)
    earlybert = {"draw_at_step": 4, "check_every": 2, "window": 2, "head_prune_ratio": 0.5, "ffn_prune_ratio": 0.5}
    summary = run_glue(toy_model, "sst2", tmp_path / "out", glue_config(earlybert=earlybert), glue_dir=glue_dir)
    run = summary["runs"][0]
    info = run["earlybert"]
    assert info["drawn_at_step"] == 4
    # bert-tiny: 2 layers x 2 heads, 512 neurons each; half the heads per layer, half the neurons overall.
    assert info["layer_heads"] == [1, 1] and sum(info["layer_intermediate"]) == 512
    assert [len(h) for h in info["ticket"]["heads"]] == [1, 1]
    # Training went on to the end of the budget with the pruned model, on the same schedule.
    assert run["steps"] == 32 and len(run["losses"]) == 32
    assert run["learning_rates"] == pytest.approx([1e-3 * linear_warmup_decay(s, 3, 32) for s in range(32)])
    assert run["dev"]["sst2"]["accuracy"] >= 0.9


def test_finetuning_shares_the_divergence_check_and_stops_naming_task_and_seed(tmp_path, toy_model,
                                                                               single_rank_world, one_thread):
    """The pretraining loop's DivergenceGuard runs in fine-tuning too: a run whose loss or gradient norm stops being
    finite ends with an error naming the task, the seed, the step and the key to change, not a NaN score."""
    glue_dir = tmp_path / "glue"
    write_sst2(glue_dir)
    with pytest.raises(RuntimeError, match=r"fine-tuning .* with seed 1 diverged at step \d+.*'glue.learning_rate'"):
        run_glue(toy_model, "sst2", tmp_path / "out", glue_config(learning_rate=1e30, epochs=0.5), glue_dir=glue_dir)


def test_pruned_classifier_computes_what_the_masked_one_does(single_rank_world):
    """The draw keeps the classifier head and the kept units' weights; coefficients of pruned units set to 0 give
    the function the pruned model must reproduce."""
    from ds_pld.earlybert import EarlyBertConfig, EarlyBird

    torch.manual_seed(0)
    model = SequenceClassifier(make_model(slimming=True), num_labels=2, dropout=0.0).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layers:
            layer.head_coef.uniform_(0.2, 1.5)
            layer.ffn_coef.uniform_(0.2, 1.5)
    ticket = EarlyBird(EarlyBertConfig(head_prune_ratio=0.5, ffn_prune_ratio=0.5)).ticket(model)
    pruned = prune_classifier(model, ticket, full_precision_state(model)).eval()
    assert [layer.num_heads for layer in pruned.bert.encoder.layers] == [1, 1]
    with torch.no_grad():
        for layer, heads, neurons in zip(model.bert.encoder.layers, ticket.head_masks(), ticket.ffn_masks()):
            layer.head_coef.mul_(heads)
            layer.ffn_coef.mul_(neurons)
        ids = torch.randint(5, len(VOCAB), (2, 9))
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        torch.testing.assert_close(pruned(ids, mask).logits, model(ids, mask).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_two_ranks_through_the_launcher(tmp_path, toy_model, stage):
    """Two data-parallel ranks: dev predictions are gathered from both (an odd dev size checks that the padded
    shares are not counted twice) and rank 0 writes the summary. Under ZeRO-3 the classifier's output must be a
    dict-like ModelOutput, which ZeRO-3 walks to hook the backward."""
    glue_dir = tmp_path / "glue"
    write_rte(glue_dir, train=64, dev=33)
    config = tmp_path / "glue.json"
    config.write_text(json.dumps({**glue_config(batch_size=16, seeds=[1]), "zero_optimization": {"stage": stage}}))
    run_deepspeed([str(ROOT / "launch" / "finetune.py"), "--model", str(toy_model), "--tasks", "rte",
                   "--glue_dir", str(glue_dir), "--output_dir", str(tmp_path / "out"), "--deepspeed_config",
                   str(config), "--seeds", "3", "--max_steps", "6"])
    summary = json.loads((tmp_path / "out" / "glue_summary.json").read_text())
    run = summary["runs"][0]
    assert summary["seeds"] == [3] and run["steps"] == 6
    correct = run["dev"]["rte"]["accuracy"] * 33
    assert abs(correct - round(correct)) < 1e-9
