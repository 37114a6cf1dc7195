"""Starting a run from existing weights (issue 20): `model.init_from` / `--init_from` from each source (a final/
folder, a DeepSpeed checkpoint of ours, a Hugging Face RobertaPreLayerNormForMaskedLM or BertForMaskedLM folder),
the exact HF import/export round trip, position-table growth, the refusal of mismatched sizes, PLD's `start_step`,
and (slow) two phases through the launcher and a continued pretraining whose validation loss starts at the source's."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, SCRIPTS, launcher_env, run_deepspeed, tiny_train_config
from transformers import BertConfig as HFBertConfig
from transformers import BertForMaskedLM

from ds_pld.config import parse_config
from ds_pld.config_errors import ConfigError
from ds_pld.earlybert import Ticket, prune_model
from ds_pld.export.hf import export_hf, to_hf_model
from ds_pld.models import BertForPreTraining, build_bert_config
from ds_pld.models.config import InitFrom
from ds_pld.models.hf_import import import_hf
from ds_pld.models.init_from import find_source, initial_model, run_model_config
from ds_pld.models.io import load_pretrained, save_pretrained
from ds_pld.pld import PLDConfig, ProgressiveLayerDrop, theta_at
from ds_pld.training.metrics import read_metrics

sys.path.insert(0, str(SCRIPTS))
from glue_toy import VOCAB, make_model, make_tokenizer  # noqa: E402

TRAIN = str(ROOT / "launch" / "train.py")


def inputs(vocab: int = len(VOCAB), seq: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows with both segment ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, seq), generator=generator)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, seq - 6:] = 0
    types = torch.zeros(3, seq, dtype=torch.long)
    types[:, seq // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@torch.no_grad()
def mlm_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """MLM logits at the attended positions, in eval mode (ours or transformers')."""
    model.eval()
    return model(**batch).logits[batch["attention_mask"].bool()]


def random_bert(folder: Path, **config) -> BertForMaskedLM:
    """A small random transformers BERT (weights moved off the init, so every parameter matters), saved locally."""
    torch.manual_seed(0)
    hf = BertForMaskedLM(HFBertConfig(**{
        "vocab_size": len(VOCAB), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 48, "max_position_embeddings": 40, **config}))
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    hf.save_pretrained(folder)
    make_tokenizer().save_pretrained(str(folder))
    return hf.eval()


# --- Hugging Face import ---------------------------------------------------------------------------------------------

def test_hf_import_is_the_exact_inverse_of_the_export(tmp_path):
    model = make_model()
    folder = export_hf(model, tmp_path / "hf", tokenizer=make_tokenizer())
    back = import_hf(folder)
    assert back.config == model.config
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), "bit for bit"
    batch = inputs()
    assert (mlm_logits(model, batch) - mlm_logits(back, batch)).abs().max() <= 1e-6


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_pruned_model_comes_back_at_full_width_computing_the_same_function(tmp_path):
    """The export writes pruned heads and neurons as zeros at full width (coefficients folded); the import gives the
    full-width model with those zeros, which computes what the pruned model computes."""
    generator = torch.Generator().manual_seed(0)
    neurons = [torch.randperm(512, generator=generator)[:n].tolist() for n in (100, 333)]
    slim = prune_model(make_model(), Ticket(heads=[[1], [0, 1]], neurons=neurons))
    back = import_hf(export_hf(slim, tmp_path / "ticket", tokenizer=make_tokenizer()))
    assert back.config.layer_heads is None and back.config.layer_intermediate is None
    assert back.config.num_heads == 2 and back.config.intermediate_size == 512
    head_dim = back.config.head_dim
    qkv = back.encoder.layers[0].qkv.weight.view(3, 2 * head_dim, -1)
    assert not qkv[:, head_dim:].any() and not back.encoder.layers[0].ffn_in.weight[100:].any()
    batch = inputs()
    assert (mlm_logits(slim, batch) - mlm_logits(back, batch)).abs().max() <= 1e-6

    # Slimming coefficients != 1 are folded by the export (float rounding, 1e-5 there); the import of what it wrote
    # computes what transformers computes from the same folder, to 1e-6.
    coef = make_model(layer_heads=(1, 2), layer_intermediate=(300, 0), slimming=True)
    folder = export_hf(coef, tmp_path / "coefficients", tokenizer=make_tokenizer())
    back = import_hf(folder)
    from transformers import AutoModelForMaskedLM

    hf = AutoModelForMaskedLM.from_pretrained(folder)
    assert (mlm_logits(hf, batch) - mlm_logits(back, batch)).abs().max() <= 1e-6
    assert (mlm_logits(coef, batch) - mlm_logits(back, batch)).abs().max() <= 1e-5


def test_bert_for_masked_lm_imports_as_a_post_ln_model(tmp_path):
    """transformers' BERT (positions from 0, segment ids, the MLM head's transform, tied decoder and its bias) is our
    post-LN model; logits agree to 1e-5 in eval mode, with and without segment ids and padding."""
    hf = random_bert(tmp_path / "bert", type_vocab_size=2)
    ours = import_hf(tmp_path / "bert")
    config = ours.config
    assert config.layer_norm == "post" and config.max_position_embeddings == 40 and config.intermediate_size == 48
    assert not any(isinstance(p, torch.nn.LayerNorm) for p in [ours.encoder.final_norm])
    batch = inputs()
    assert (mlm_logits(hf, batch) - mlm_logits(ours, batch)).abs().max() <= 1e-5
    plain = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["attention_mask"])}
    assert (mlm_logits(hf, plain) - mlm_logits(ours, plain)).abs().max() <= 1e-5
    long = inputs(seq=40)  # the whole table: position 39 is the last row, as in BERT
    assert (mlm_logits(hf, long) - mlm_logits(ours, long)).abs().max() <= 1e-5


def test_models_the_import_cannot_compute_are_refused(tmp_path):
    random_bert(tmp_path / "tanh", hidden_act="gelu_new")
    with pytest.raises(ConfigError, match="hidden_act = 'gelu_new'"):
        import_hf(tmp_path / "tanh")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"init_from' = .*gpt': a transformers 'gpt2' model"):
        find_source(tmp_path / "gpt")


# --- the sources -----------------------------------------------------------------------------------------------------

def _source(kind: str, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """(a folder of the given kind, a module computing what it holds) for the same toy model."""
    model = make_model()
    if kind == "final":
        return save_pretrained(model, tmp_path / "final", make_tokenizer()), model
    if kind == "checkpoint":  # one rank, ZeRO-0 here; the launcher test below reads a 2-rank ZeRO-2 one
        import ds_pld

        engine, *_ = ds_pld.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1, "optimizer": {
            "type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
        ds_pld.save_checkpoint(engine, tmp_path / "checkpoints")
        engine.destroy()
        make_tokenizer().save_pretrained(str(tmp_path / "tokenizer"))  # the run layout: <run>/tokenizer
        return tmp_path / "checkpoints", model
    if kind == "RobertaPreLayerNormForMaskedLM":
        return export_hf(model, tmp_path / "hf", tokenizer=make_tokenizer()), model
    return tmp_path / "bert", random_bert(tmp_path / "bert")


@pytest.mark.parametrize("kind", ["final", "checkpoint", "RobertaPreLayerNormForMaskedLM", "BertForMaskedLM"])
def test_init_from_each_source(kind, single_rank_world, tmp_path):
    """The run's model computes what the source computes; the source decides the sizes (a run block that sets
    none of them), and ds_pld.initialize honours `model.init_from` as the trainer does."""
    import ds_pld

    path, reference = _source(kind, tmp_path)
    source = find_source(path)
    assert source.kind == {"final": "model folder", "checkpoint": "DeepSpeed checkpoint"}.get(kind, kind)
    assert source.tokenizer is not None, "the tokenizer saved with it is found"
    model, notes = initial_model(build_bert_config({}), InitFrom(str(path), frozenset()))
    assert notes == []
    batch = inputs()
    assert (mlm_logits(reference, batch) - mlm_logits(model, batch)).abs().max() <= 1e-5

    engine, *_ = ds_pld.initialize(config={"train_micro_batch_size_per_gpu": 1, "model": {"init_from": str(path)},
                                           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    assert (mlm_logits(reference, batch) - mlm_logits(engine.module, batch)).abs().max() <= 1e-5
    engine.destroy()


def test_position_table_grows_from_128_to_512(tmp_path, capsys):
    """Rows 0-127 are the source's; rows 128-511 are what the model's own init draws (normal, std
    initializer_range), as if the source had had the larger table and never reached those positions."""
    source_model = make_model(max_position_embeddings=128)
    path = save_pretrained(source_model, tmp_path / "final", make_tokenizer())
    run = build_bert_config({"max_position_embeddings": 512})
    init = parse_config({"model": {"init_from": str(path), "max_position_embeddings": 512}}).init_from
    assert init.model_keys == {"max_position_embeddings"}
    torch.manual_seed(7)
    model, notes = initial_model(run, init)
    torch.manual_seed(7)
    fresh = BertForPreTraining(run_model_config(find_source(path), run, init.model_keys))
    table = model.embeddings.position.weight
    assert table.shape == (512, 128)
    assert torch.equal(table[:128], source_model.embeddings.position.weight)
    assert torch.equal(table[128:], fresh.embeddings.position.weight[128:])
    assert 0.015 < float(table[128:].detach().std()) < 0.025, "the model's init: normal, std 0.02"
    assert notes == [f"model.init_from: position embeddings grown from 128 to 512 rows: rows 0-127 from '{path}' "
                     "(model folder), rows 128-511 initialized as the model's init does (normal, std 0.02)"]
    batch = inputs(seq=128)
    assert (mlm_logits(source_model, batch) - mlm_logits(model, batch)).abs().max() <= 1e-6
    assert model(torch.ones(1, 512, dtype=torch.long)).logits.shape == (1, 512, len(VOCAB))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_pruned_source_keeps_its_widths(tmp_path):
    slim = prune_model(make_model(), Ticket(heads=[[1], [0, 1]], neurons=[list(range(100)), list(range(333))]))
    path = save_pretrained(slim, tmp_path / "final", make_tokenizer())
    init = parse_config({"model": {"preset": "bert-tiny", "init_from": str(path), "hidden_dropout": 0.0}}).init_from
    model, _ = initial_model(build_bert_config({"preset": "bert-tiny", "hidden_dropout": 0.0}), init)
    assert model.config.layer_heads == (1, 2) and model.config.layer_intermediate == (100, 333)
    assert model.config.hidden_dropout == 0.0 and model.config.attention_dropout == 0.1
    batch = inputs()
    assert (mlm_logits(slim, batch) - mlm_logits(model, batch)).abs().max() <= 1e-6


def test_mismatched_sizes_are_refused_naming_both_sizes_and_the_source(tmp_path):
    path = save_pretrained(make_model(), tmp_path / "final", make_tokenizer())  # bert-tiny: 128 wide, 2 layers
    init = parse_config({"model": {"preset": "bert-mini", "init_from": str(path)}}).init_from
    with pytest.raises(ConfigError) as err:
        initial_model(build_bert_config("bert-mini"), init)
    message = str(err.value)
    assert "\n" not in message and f"'{path}' (model folder)" in message
    for theirs, mine in (("hidden_size = 128", "'model.hidden_size' = 256"),
                         ("num_layers = 2", "'model.num_layers' = 4"), ("num_heads = 2", "'model.num_heads' = 4"),
                         ("intermediate_size = 512", "'model.intermediate_size' = 1024")):
        assert theirs in message and mine in message, message
    post = parse_config({"model": {"layer_norm": "post", "init_from": str(path)}}).init_from
    with pytest.raises(ConfigError, match=r"layer_norm = pre, but the run's config sets 'model.layer_norm' = post"):
        initial_model(build_bert_config({"layer_norm": "post"}), post)

    # The trainer's vocabulary check: the data's ids must index the source's embeddings, with its meaning.
    from ds_pld.training.inputs import check_source_vocabulary

    source = find_source(path)
    bigger = SimpleNamespace(vocab_size=len(VOCAB) + 10, tokenizer=make_tokenizer(), path=tmp_path / "data")
    with pytest.raises(ConfigError, match=rf"vocabulary of {len(VOCAB)} tokens, but the data in .* was tokenized "
                                          rf"with {len(VOCAB) + 10}"):
        check_source_vocabulary(source, bigger)
    other = make_tokenizer()
    other.add_tokens(["zebra"])
    with pytest.raises(ConfigError, match="another vocabulary than the one saved with 'model.init_from'"):
        check_source_vocabulary(source, SimpleNamespace(vocab_size=len(VOCAB), tokenizer=other, path="data"))


def test_the_trainer_takes_the_sources_sizes_and_the_runs_settings(tmp_path):
    """ds_pld.training.inputs.model_config for a fresh run from a model: the source's sizes, the run's positions,
    dropout and slimming (EarlyBERT); a post-LN source with PLD on and sequences beyond the table are refused."""
    from ds_pld.training.config import parse_run_config
    from ds_pld.training.inputs import model_config

    path = save_pretrained(make_model(max_position_embeddings=32), tmp_path / "final", make_tokenizer())
    data = SimpleNamespace(vocab_size=len(VOCAB), tokenizer=make_tokenizer(), max_seq_length=64, path="data")
    base = {"train_batch_size": 4, "model": {"init_from": str(path), "max_position_embeddings": 64,
                                             "attention_dropout": 0.0, "kernels": "torch"}}
    config = parse_run_config({**base, "earlybert": {"lambda_head": 1e-4}})
    model = model_config(config, data, None, find_source(path))
    assert (model.hidden_size, model.num_layers, model.vocab_size) == (128, 2, len(VOCAB))
    assert (model.max_position_embeddings, model.attention_dropout, model.kernels) == (64, 0.0, "torch")
    assert model.slimming and model.hidden_dropout == 0.1
    with pytest.raises(ConfigError, match=r"'data.max_seq_length' = 64 exceeds the 32 positions of "
                                          r"'model.init_from' = .*: set 'model.max_position_embeddings' to 64"):
        model_config(parse_run_config({"train_batch_size": 4, "model": {"init_from": str(path)}}), data, None,
                     find_source(path))
    random_bert(tmp_path / "bert")
    pld = parse_run_config({"train_batch_size": 4, "model": {"init_from": str(tmp_path / "bert")},
                            "progressive_layer_drop": {"theta": 0.5, "gamma": 0.01}})
    with pytest.raises(ConfigError, match=r"\(BertForMaskedLM\) is a post-LN model and 'progressive_layer_drop' is "
                                          r"enabled"):
        model_config(pld, data, None, find_source(tmp_path / "bert"))


def test_the_config_key_and_the_flag(tmp_path):
    from ds_pld.cli.train import load_config, parse_args

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"train_batch_size": 4, "model": {"preset": "bert-tiny"}}))
    parsed = load_config(parse_args(["--deepspeed_config", str(config), "--output_dir", "x", "--init_from", "m"]))
    assert parsed.init_from == InitFrom("m", frozenset({"hidden_size", "num_layers", "num_heads",
                                                        "intermediate_size"}))
    assert parsed.model == build_bert_config("bert-tiny"), "init_from is no field of the model's shape"
    off = load_config(parse_args(["--deepspeed_config", str(config), "--output_dir", "x", "--set",
                                  "model.init_from=null"]))
    assert off.init_from is None
    config.write_text(json.dumps({"train_batch_size": 4, "model": {"init_from": 3}}))
    with pytest.raises(ConfigError, match=rf"{config}: 'model.init_from' must be a folder path \(a string\), got 3"):
        load_config(parse_args(["--deepspeed_config", str(config), "--output_dir", "x"]))
    with pytest.raises(ConfigError, match=r"'model.init_from' = '.*nowhere' does not exist"):
        find_source(tmp_path / "nowhere")
    (tmp_path / "run" / "final").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"not a model: .*\(did you mean '.*run/final'\?\)"):
        find_source(tmp_path / "run")


def test_a_resume_never_reinitializes():
    from ds_pld.training.resume import check_resumed_init

    meta = {"tag": "global_step4", "init_from": str(Path("phase1/final").resolve())}
    check_resumed_init(meta, InitFrom("phase1/final", frozenset()), Path("ckpt"), rank=1)  # the same: resumes
    check_resumed_init(meta, None, Path("ckpt"), rank=1)
    with pytest.raises(ConfigError, match=r"started from '.*phase1/final', but 'model.init_from' = 'other'"):
        check_resumed_init(meta, InitFrom("other", frozenset()), Path("ckpt"), rank=1)
    with pytest.raises(ConfigError, match="of a run started from random weights"):
        check_resumed_init({**meta, "init_from": None}, InitFrom("x", frozenset()), Path("ckpt"), rank=1)


# --- PLD in phase 2 --------------------------------------------------------------------------------------------------

def test_pld_start_step_continues_theta_everywhere():
    """theta(t + start_step): the driver (engine hook, trainer, GLUE) and the Hugging Face adapter."""
    from ds_pld.integrations.transformers import PLDAdapter, driver_for

    config = PLDConfig.from_dict({"theta": 0.5, "gamma": 0.01, "start_step": 300})
    driver = ProgressiveLayerDrop.from_config(config)
    assert driver.theta_at(0) == theta_at(300, 0.5, 0.01) and driver.theta_at(5) == theta_at(305, 0.5, 0.01)
    assert driver.state_dict()["step_offset"] == 300 and driver.state_dict()["global_step"] == 0
    assert driver_for(config).theta_at(0) == theta_at(300, 0.5, 0.01)
    adapter = PLDAdapter(to_hf_model(make_model()), theta=0.5, gamma=0.01, step_offset=300)
    adapter.start_step(2)
    assert adapter.theta == theta_at(302, 0.5, 0.01)
    with pytest.raises(ConfigError, match=r"'progressive_layer_drop.start_step' = -1 must be >= 0"):
        PLDConfig.from_dict({"theta": 0.5, "gamma": 0.01, "start_step": -1})
    assert PLDConfig.from_dict({"theta": 0.5, "gamma": 0.01}).start_step == 0


def test_the_phase2_configs_parse_and_continue_phase1():
    from ds_pld.training.config import parse_run_config

    phase1, phase2 = (parse_run_config(ROOT / "ds_configs" / f"{name}.json") for name in ("pld", "pld_phase2"))
    baseline = parse_run_config(ROOT / "ds_configs" / "baseline_phase2.json")
    assert phase2.pld.start_step == phase1.training.max_steps and not baseline.pld.enabled
    assert phase2.data.max_seq_length == 512 == phase2.model.max_position_embeddings
    assert {k: v for k, v in phase2.deepspeed.items()} == baseline.deepspeed
    assert phase2.pld.theta == phase1.pld.theta and phase2.pld.gamma == phase1.pld.gamma


# --- through the launcher (2 real ranks) -----------------------------------------------------------------------------

PHASE1_STEPS = 40
PLD = {"enabled": True, "theta": 0.5, "gamma": 0.05}  # theta(40) = 0.568: a restart (1.0) would show


def train(config: Path, out: Path, *flags: str) -> str:
    """A 2-rank run through the deepspeed launcher; its stdout."""
    env = {**launcher_env(), "WANDB_MODE": "disabled"}
    proc = run_deepspeed([TRAIN, "--deepspeed_config", str(config), "--output_dir", str(out), *flags], env=env)
    return proc.stdout


def config_file(path: Path, data_path: Path | None, **changes) -> Path:
    """The tiny launcher config (bert-tiny, 3 layers, 32 positions) with top-level blocks replaced or merged."""
    config = json.loads(tiny_train_config(path, data_path or Path("unused")).read_text())
    config["wandb"] = {"enabled": False}
    if data_path is None:
        del config["data"]
    for key, value in changes.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def phase1(prepared, tmp_path_factory) -> Path:
    """Phase 1: sequences of 32 tokens, ZeRO-2 on 2 ranks, PLD on."""
    tmp = tmp_path_factory.mktemp("phase1")
    config = config_file(tmp / "phase1.json", prepared, zero_optimization={"stage": 2}, progressive_layer_drop=PLD,
                         training={"max_steps": PHASE1_STEPS, "checkpoint_every": 20, "eval_every": 20,
                                   "eval_batches": 8})
    train(config, tmp / "out")
    return tmp / "out"


@pytest.mark.slow
def test_two_phases_through_the_launcher(phase1, tmp_path):
    """Phase 2 from phase 1's final/: 64-token sequences prepared with phase 1's tokenizer (found beside the source),
    the position table grown from 32 to 64 rows (one notice), PLD continuing theta from phase 1's last step; a
    stop and `--resume --init_from` (what a requeued job does) resumes phase 2's own checkpoint. Phase 1's ZeRO-2
    checkpoint of 2 ranks holds the same weights as its final/."""
    final = phase1 / "final"
    consolidated = find_source(phase1 / "checkpoints")
    assert consolidated.kind == "DeepSpeed checkpoint" and consolidated.tokenizer == phase1 / "tokenizer"
    from_checkpoint, from_final = consolidated.state_dict(), load_pretrained(final).state_dict()
    assert from_checkpoint.keys() == from_final.keys()
    assert all(torch.equal(from_checkpoint[k], from_final[k]) for k in from_final)

    # Phase 2 warms the learning rate up again (Adam's moments start fresh): without it, the first full-size step
    # throws the loaded model off (the recipe's 12.8%; here 3 of 6 steps).
    config = config_file(tmp_path / "phase2.json", None, data={"max_seq_length": 64},
                         model={"max_position_embeddings": 64},
                         lr_schedule={"type": "warmup_linear", "warmup_proportion": 0.5},
                         progressive_layer_drop={**PLD, "start_step": PHASE1_STEPS},
                         training={"max_steps": 6, "checkpoint_every": 3, "eval_every": 3})
    out = tmp_path / "phase2"
    first = train(config, out, "--init_from", str(final), "--stop_at_step", "3")
    assert first.count(f"starting from '{final}' (model folder)") == 1, first[-3000:]
    assert first.count("position embeddings grown from 32 to 64 rows: rows 0-31 from") == 1, "rank 0 says it once"
    second = train(config, out, "--init_from", str(final), "--resume")
    assert "starting from" not in second and "is not applied again" in second, second[-3000:]

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[0]["pld_theta"] == pytest.approx(theta_at(PHASE1_STEPS, 0.5, 0.05)), "theta continues"
    assert records[-1]["pld_theta"] == pytest.approx(theta_at(PHASE1_STEPS + 5, 0.5, 0.05))
    phase1_records = read_metrics(phase1 / "metrics.jsonl")
    first_losses = sum(r["loss"] for r in records[:3]) / 3
    assert first_losses < sum(r["loss"] for r in phase1_records[:3]) / 3 - 0.3, "phase 2 starts from trained weights"
    model = load_pretrained(out / "final")
    assert model.config.max_position_embeddings == 64 and model.config.num_layers == 3
    meta = json.loads((out / "checkpoints" / "global_step6" / "ds_pld_meta.json").read_text())
    assert meta["init_from"] == str(final.resolve()), "the resumed start keeps the record of where the run began"
    from ds_pld.data import load_pretraining_data
    from ds_pld.data.tokenizer import load_tokenizer

    data = load_pretraining_data(out / "data")
    assert data.max_seq_length == 64
    assert data.tokenizer.get_vocab() == load_tokenizer(final / "tokenizer").get_vocab(), "phase 1's vocabulary"


@pytest.mark.slow
def test_continued_pretraining_starts_at_the_source_loss(phase1, prepared, tmp_path):
    """From phase 1 exported to Hugging Face: the first validation loss (after one small step; the same validation
    sequences and masks as phase 1's) is the source's, about 1 nat below that of the same run from random weights."""
    hf = export_hf(phase1 / "final", tmp_path / "hf")
    source_loss = [r["val_loss"] for r in read_metrics(phase1 / "metrics.jsonl") if "val_loss" in r][-1]
    losses = {}
    for name, flags in (("continued", ("--init_from", str(hf))), ("random", ())):
        config = config_file(tmp_path / f"{name}.json", prepared, optimizer={"type": "AdamW", "params": {"lr": 1e-5}},
                             training={"max_steps": 1, "eval_every": 1, "checkpoint_every": 1, "eval_batches": 8})
        train(config, tmp_path / name, *flags)
        losses[name] = read_metrics(tmp_path / name / "metrics.jsonl")[0]["val_loss"]
    assert abs(losses["continued"] - source_loss) < 0.05, (losses, source_loss)
    assert losses["random"] - losses["continued"] > 0.7, (losses, source_loss)
    assert losses["random"] == pytest.approx(math.log(1024), abs=0.3)
