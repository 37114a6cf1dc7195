"""Config parsing: typed blocks with one-line errors naming the key, the core/trainer split, `--set` overrides, and
the review's regressions (a string `wandb.tags`, the unread `training.log_every`, `--model` replacing the model
block, `model.next_sentence_head` without labels)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import ds_pld
from ds_pld.config import parse_config, parse_override, with_overrides
from ds_pld.config_errors import ConfigError
from ds_pld.earlybert.config import EarlyBertConfig
from ds_pld.glue.config import parse_glue_config
from ds_pld.models.config import build_bert_config
from ds_pld.pld import PLDConfig
from ds_pld.training.config import RunConfig, TrainingConfig, WandbConfig, parse_run_config

sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from glue_toy import load_script  # noqa: E402

TRAINER_BLOCKS = {"data": {"max_seq_length": 64}, "lr_schedule": {"type": "constant"},
                  "training": {"max_steps": 5}, "wandb": {"enabled": False}}


def write(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


# --- the plugin core apart from the trainer ------------------------------------------------------------------------

def test_core_imports_nothing_from_the_applications():
    """`import ds_pld` (the plugin: initialize, engine, PLD, models, optim) loads no trainer, data or GLUE module."""
    code = ("import sys, ds_pld, ds_pld.plugin, ds_pld.optim, ds_pld.earlybert; "
            "print(sorted(m for m in sys.modules if m.startswith(('ds_pld.training', 'ds_pld.data', 'ds_pld.glue'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_core_parse_accepts_and_strips_the_trainers_blocks_but_not_unknown_keys():
    parsed = parse_config({"train_batch_size": 2, "progressive_layer_drop": {"theta": 0.5, "gamma": 0.1},
                           "glue": {}, **TRAINER_BLOCKS})
    assert parsed.deepspeed == {"train_batch_size": 2} and parsed.pld.enabled
    assert not hasattr(parsed, "training")
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['trainig'\].*did you mean 'training'"):
        parse_config({"train_batch_size": 2, "trainig": {}})


def test_initialize_accepts_a_trainer_config(single_rank_world):
    """The contract: one file serves launch/train.py and ds_pld.initialize; the trainer's blocks never reach
    DeepSpeed, and the engine carries the core config."""
    model = build_bert_config("bert-tiny", num_layers=2, vocab_size=64, max_position_embeddings=16)
    from ds_pld.models import BertForPreTraining

    config = {"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "progressive_layer_drop": {"theta": 0.5, "gamma": 0.1}, **TRAINER_BLOCKS}
    engine, *_ = ds_pld.initialize(model=BertForPreTraining(model), config=config)
    plugin = ds_pld.plugin_of(engine)
    assert isinstance(plugin.config, ds_pld.DsPldConfig) and plugin.pld_theta() == 1.0
    assert set(plugin.config.deepspeed) == {"train_batch_size", "optimizer"}
    with pytest.raises(ConfigError, match="wandbb"):
        ds_pld.initialize(model=BertForPreTraining(model), config={**config, "wandbb": {}})


def test_run_config_composes_the_core_and_the_trainers_blocks(tmp_path):
    path = write(tmp_path / "run.json", {"train_batch_size": 2, "model": {"preset": "bert-tiny"}, **TRAINER_BLOCKS})
    run = parse_run_config(path)
    assert isinstance(run, RunConfig) and isinstance(run, ds_pld.DsPldConfig)
    assert run.training.max_steps == 5 and run.lr_schedule.type == "constant" and run.data.max_seq_length == 64
    assert run.model.num_layers == 2 and run.source == str(path) and run.deepspeed == {"train_batch_size": 2}
    assert parse_config(run) is run, "ds_pld.initialize takes the run config as it is"
    for name in ("cpu_small", "baseline", "pld", "pld_lamb", "earlybert", "pld_earlybert", "random_ltd",
                 "pld_random_ltd"):
        assert parse_run_config(ROOT / "ds_configs" / f"{name}.json").model is not None
    both = parse_run_config(ROOT / "ds_configs" / "pld_random_ltd.json")
    assert both.pld.enabled and both.random_ltd.layers == tuple(range(1, 11))
    assert parse_run_config(ROOT / "ds_configs" / "random_ltd.json").pld.enabled is False


# --- typed blocks: one line naming the key (and the file) ----------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ({"training": {"max_steps": 0}}, "'training.max_steps' = 0 must be >= 1"),
    ({"training": {"max_steps": True}}, "'training.max_steps' must be an integer, got True"),
    ({"training": {"max_steps": 10.0}}, "'training.max_steps' must be an integer"),
    ({"training": {"max_stepz": 3}}, "unknown key(s) ['max_stepz'] in 'training' ('max_stepz': did you mean "
                                     "'max_steps'?)"),
    ({"training": {"on_divergence": "ignore"}}, "'training.on_divergence' = 'ignore' must be one of ('stop'"),
    ({"training": [1]}, "'training' must be a JSON object, got list"),
    ({"data": {"mlm_probability": "0.15"}}, "'data.mlm_probability' must be a number, got '0.15'"),
    ({"data": {"validation_fraction": float("nan")}}, "'data.validation_fraction' must be a finite number"),
    ({"data": {"encoding_errors": "ignore"}}, "'data.encoding_errors' = 'ignore' must be one of ('strict', 'replace')"),
    ({"lr_schedule": {"warmup_proportion": 0.1}}, "missing required key(s) ['type'] in 'lr_schedule'"),
    ({"lr_schedule": {"type": "cosine"}}, "'lr_schedule.type' = 'cosine' must be one of"),
    ({"wandb": {"enabled": "yes"}}, "'wandb.enabled' must be true or false, got 'yes'"),
    ({"wandb": {"tags": ["pld", 3]}}, "'wandb.tags.1' must be a string, got 3"),
    ({"model": {"preset": "bert-tiny", "num_heads": 3}}, "'model.num_heads' = 3 must divide hidden_size = 128"),
    ({"model": {"kernels": "cuda"}}, "'model.kernels' = 'cuda' must be one of ('auto', 'triton', 'torch')"),
    ({"model": {"preset": "bert-huge"}}, "'model.preset' = 'bert-huge' is not one of"),
    ({"earlybert": {"window": 1}}, "'earlybert.window' = 1 must be >= 2"),
    ({"progressive_layer_drop": {"theta": 0.5}}, "missing required key(s) ['gamma'] in 'progressive_layer_drop'"),
])
def test_errors_name_the_key_and_the_file(tmp_path, config, message):
    path = write(tmp_path / "bad.json", {"train_batch_size": 2, **config})
    with pytest.raises(ConfigError) as err:
        parse_run_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_blocks_stay_dataclasses_and_validate_on_replace():
    """Users of the blocks call dataclasses.replace/asdict; pydantic validates those copies too."""
    pld = PLDConfig.from_dict({"theta": 0.5, "gamma": 0.1})
    assert dataclasses.asdict(pld) == {"enabled": True, "theta": 0.5, "gamma": 0.1, "seed": 0, "start_step": 0}
    assert dataclasses.replace(TrainingConfig(), max_steps=7).max_steps == 7
    with pytest.raises(ValueError):
        dataclasses.replace(TrainingConfig(), max_steps=0)
    with pytest.raises(ConfigError, match=r"'model\.layer_heads' = \(1, 0\) leaves a layer without heads"):
        build_bert_config("bert-tiny").with_updates(layer_heads=(1, 0))
    assert EarlyBertConfig.from_dict({"enabled": False, "window": 3}) is None
    with pytest.raises(ConfigError, match=r"glue\.earlybert\.window"):
        parse_glue_config({"glue": {"earlybert": {"window": "3"}}})


# --- the review's regressions ----------------------------------------------------------------------------------------

def test_a_single_wandb_tag_string_is_one_tag():
    """Was ('p', 'l', 'd'): a string is one tag, as `data.corpus` is one file."""
    assert WandbConfig.from_dict({"tags": "pld"}).tags == ("pld",)
    assert WandbConfig.from_dict({"tags": ["pld", "lamb"]}).tags == ("pld", "lamb")


def test_log_every_was_removed_with_a_message_naming_it():
    """`training.log_every` was documented and parsed but never read: now an error that says so."""
    assert not hasattr(TrainingConfig(), "log_every")
    with pytest.raises(ConfigError, match=r"'training\.log_every' was removed: every step is written"):
        parse_run_config({"train_batch_size": 2, "training": {"log_every": 10}})


def test_next_sentence_head_is_refused_for_pretraining():
    """The data pipeline makes no next-sentence labels; the core model keeps the head for callers that do."""
    with pytest.raises(ConfigError, match=r"'model\.next_sentence_head' = true: .*no next-sentence labels"):
        parse_run_config({"train_batch_size": 2, "model": {"preset": "bert-tiny", "next_sentence_head": True}})
    assert parse_config({"train_batch_size": 2, "model": {"next_sentence_head": True}}).model.next_sentence_head


def test_model_flag_sets_the_preset_and_keeps_the_rest_of_the_block(tmp_path):
    """Was a whole new block: `--model bert-tiny` lost max_position_embeddings, kernels, gradient_checkpointing."""
    train = load_script(ROOT / "launch" / "train.py")
    model = {"preset": "bert-base", "max_position_embeddings": 128, "kernels": "torch", "gradient_checkpointing": True}
    path = write(tmp_path / "c.json", {"train_batch_size": 2, "model": model, **TRAINER_BLOCKS})
    config = train.load_config(train.parse_args(["--deepspeed_config", str(path), "--output_dir", "x",
                                                 "--model", "bert-tiny", "--max_steps", "9", "--seed", "4",
                                                 "--data", "/d"]))
    assert (config.model.num_layers, config.model.hidden_size) == (2, 128)
    assert (config.model.max_position_embeddings, config.model.kernels, config.model.gradient_checkpointing) == (
        128, "torch", True)
    assert (config.training.max_steps, config.training.seed, config.data.path) == (9, 4, "/d")
    assert config.data.max_seq_length == 64, "the rest of the data block is kept too"


# --- --set ---------------------------------------------------------------------------------------------------------

def test_set_merges_into_the_config(tmp_path):
    train = load_script(ROOT / "launch" / "train.py")
    path = write(tmp_path / "c.json", {"train_batch_size": 2, "model": {"preset": "bert-tiny", "kernels": "torch"},
                                       **TRAINER_BLOCKS})
    args = ["--deepspeed_config", str(path), "--output_dir", "x", "--set", "model.num_layers=4",
            "--set", "wandb.tags=[\"a\", \"b\"]", "--set", "earlybert.draw_at_step=null", "--set", "data.path=/d x",
            "--set", "training.max_steps=50", "--max_steps", "60", "--set", "gradient_clipping=1.0"]
    config = train.load_config(train.parse_args(args))
    assert (config.model.num_layers, config.model.hidden_size, config.model.kernels) == (4, 128, "torch")
    assert config.wandb.tags == ("a", "b") and config.earlybert.draw_at_step is None and config.data.path == "/d x"
    assert config.training.max_steps == 60, "the short flag is applied after --set"
    assert config.deepspeed["gradient_clipping"] == 1.0 and config.data.max_seq_length == 64


def test_set_values_are_json_else_strings():
    assert parse_override("a.b=4") == ("a.b", 4) and parse_override("a=true") == ("a", True)
    assert parse_override("a=bert-tiny") == ("a", "bert-tiny") and parse_override("a=x=y") == ("a", "x=y")
    assert parse_override("a=") == ("a", "") and parse_override("a=null") == ("a", None)


@pytest.mark.parametrize("item, message", [
    ("training.max_steps", "--set 'training.max_steps': expected key.path=value"),
    ("training..max_steps=1", "expected key.path=value"),
    ("model.preset.name=1", "--set model.preset.name: 'model.preset' is not a JSON object"),
])
def test_bad_set_syntax_is_named(tmp_path, item, message):
    path = write(tmp_path / "c.json", {"train_batch_size": 2, "model": {"preset": "bert-tiny"}})
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        with_overrides(path, [parse_override(item)])


def test_bad_set_value_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path / "c.json", {"train_batch_size": 2, **TRAINER_BLOCKS})
    with pytest.raises(ConfigError) as err:
        parse_run_config(with_overrides(path, [parse_override("training.max_steps=many")]))
    assert str(err.value) == (f"{path} (overrides: training.max_steps): 'training.max_steps' must be an integer, "
                              "got 'many'")
    glue = write(tmp_path / "glue.json", {"glue": {"learning_rate": 1e-4}})
    with pytest.raises(ConfigError, match=r"glue\.json \(overrides: glue\.tasks\.rte\.epochs\): "
                                          r"'glue\.tasks\.rte\.epochs' = 0 must be > 0"):
        parse_glue_config(with_overrides(glue, [parse_override("glue.tasks.rte.epochs=0")]))
    settings, _ = parse_glue_config(with_overrides(glue, [parse_override("glue.tasks.rte.epochs=7")]))
    assert settings.settings("rte").epochs == 7.0 and settings.settings("rte").learning_rate == 1e-4


def test_cli_reports_a_bad_set_in_one_line(tmp_path, capsys):
    train = load_script(ROOT / "launch" / "train.py")
    config = write(tmp_path / "c.json", {"train_batch_size": 2})
    assert train.main(["--deepspeed_config", str(config), "--output_dir", str(tmp_path / "o"),
                       "--set", "training"]) == 2
    assert capsys.readouterr().err.strip() == "ConfigError: --set 'training': expected key.path=value, e.g. " \
                                              "training.max_steps=100"
    finetune = load_script(ROOT / "launch" / "finetune.py")
    assert finetune.main(["--model", str(tmp_path), "--tasks", "rte", "--output_dir", str(tmp_path / "o"),
                          "--set", "glue.seeds"]) == 2
    assert "--set 'glue.seeds': expected key.path=value" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
