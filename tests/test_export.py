"""Hugging Face export: transformers' own RobertaPreLayerNorm, loaded offline from the exported folder, computes our
hidden states and MLM logits at the attended positions of right-padded batches, for full and EarlyBERT-pruned models
and from a DeepSpeed checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SCRIPTS
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from ds_pld.config_errors import ConfigError
from ds_pld.earlybert import Ticket, prune_model
from ds_pld.export.hf import export_hf
from ds_pld.models import BertForPreTraining
from ds_pld.models.io import load_pretrained, save_pretrained

sys.path.insert(0, str(SCRIPTS))
from glue_toy import VOCAB, load_script, make_model, make_tokenizer, save_toy_model  # noqa: E402

FIRST = ["good movie", "the plot was very bad and the story", "a cat", "it is the one"]
SECOND = ["a", "b cat dog of the film", "two dogs", "scene"]  # 'dogs' -> dog ##s


def padded_batch(tokenizer, **kwargs) -> dict[str, torch.Tensor]:
    """Pairs of different lengths (segment B, right padding) plus single sentences."""
    pairs = tokenizer(FIRST[:2], SECOND[:2], padding="max_length", max_length=20, return_tensors="pt", **kwargs)
    singles = tokenizer(FIRST[2:], padding="max_length", max_length=20, return_tensors="pt", **kwargs)
    return {k: torch.cat([pairs[k], singles[k]]) for k in ("input_ids", "token_type_ids", "attention_mask")}


def assert_same_outputs(ours: BertForPreTraining, folder: Path) -> dict[str, torch.Tensor]:
    """Load the export with transformers' Auto classes and compare at the attended positions."""
    hf = AutoModelForMaskedLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(hf).__name__ == "RobertaPreLayerNormForMaskedLM"
    batch = padded_batch(tokenizer)  # segment ids by default: the export records them among the model inputs
    reference = padded_batch(make_tokenizer(), return_token_type_ids=True)
    assert all(torch.equal(batch[k], reference[k]) for k in reference)
    assert batch["token_type_ids"].max() == 1 and batch["attention_mask"].min() == 0
    ours.eval()
    hf.eval()
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        mine = ours(**batch)
        theirs_hidden = hf.base_model(**batch).last_hidden_state
        theirs_logits = hf(**batch).logits
    torch.testing.assert_close(theirs_hidden[keep], mine.hidden_states[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs_logits[keep], mine.logits[keep], atol=1e-5, rtol=0)
    return batch


def test_full_model_round_trip_through_transformers(tmp_path):
    model_dir = save_toy_model(tmp_path / "final")
    out = export_hf(model_dir, tmp_path / "hf")  # the tokenizer saved beside the model comes along
    ours = load_pretrained(model_dir)
    batch = assert_same_outputs(ours, out)
    hf = AutoModelForMaskedLM.from_pretrained(out)
    assert hf.config.max_position_embeddings == 64 + 1  # our 64 positions after RoBERTa's pad_token_id + 1 offset
    assert hf.config.pad_token_id == 0 and hf.config.hidden_act == "gelu" and hf.config.layer_norm_eps == 1e-12
    assert AutoTokenizer.from_pretrained(out).model_max_length == 64
    # The sequence classifier of transformers loads the same encoder (its head is new).
    classifier = AutoModelForSequenceClassification.from_pretrained(out, num_labels=3).eval()
    with torch.no_grad():
        hidden = classifier.base_model(**batch).last_hidden_state
        logits = classifier(**batch).logits
        keep = batch["attention_mask"].bool()
        torch.testing.assert_close(hidden[keep], ours(**batch).hidden_states[keep], atol=1e-5, rtol=0)
    assert logits.shape == (4, 3)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_pruned_model_with_coefficients_exports_exactly(tmp_path):
    """Per-layer widths from EarlyBERT (one layer without FFN at all) and slimming coefficients != 1: written into
    the full-size architecture with zeros for the pruned units and the coefficients folded."""
    model = make_model(layer_heads=(1, 2), layer_intermediate=(300, 0), slimming=True)
    assert model.encoder.layers[0].head_coef[0].item() != 1.0
    out = export_hf(model, tmp_path / "hf", tokenizer=make_tokenizer())
    assert_same_outputs(model, out)
    hf = AutoModelForMaskedLM.from_pretrained(out)
    layer0 = hf.base_model.encoder.layer[0]
    head_dim = 64
    for proj in (layer0.attention.self.query, layer0.attention.self.key, layer0.attention.self.value):
        assert proj.weight.shape == (128, 128)
        assert not proj.weight[head_dim:].any() and not proj.bias[head_dim:].any()
    assert not layer0.attention.output.dense.weight[:, head_dim:].any()
    assert not layer0.intermediate.dense.weight[300:].any() and not layer0.output.dense.weight[:, 300:].any()
    assert not hf.base_model.encoder.layer[1].intermediate.dense.weight.any()


def test_model_pruned_from_a_ticket_exports_exactly(tmp_path):
    """A ticket that keeps the second head, not the first: the kept heads move to the front of the export."""
    full = make_model()
    generator = torch.Generator().manual_seed(0)
    neurons = [torch.randperm(512, generator=generator)[:n].tolist() for n in (100, 333)]
    slim = prune_model(full, Ticket(heads=[[1], [0, 1]], neurons=neurons))
    assert slim.config.layer_heads == (1, 2)
    folder = save_pretrained(slim, tmp_path / "final", make_tokenizer())
    out = export_hf(folder, tmp_path / "hf")
    assert_same_outputs(slim, out)


def test_export_from_a_deepspeed_checkpoint_with_the_cli(tmp_path, single_rank_world, capsys):
    import ds_pld

    model = make_model()
    engine, *_ = ds_pld.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1, "optimizer": {
        "type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    ds_pld.save_checkpoint(engine, tmp_path / "checkpoints")
    save_pretrained(model, tmp_path / "final", make_tokenizer())  # the run layout: final/tokenizer, checkpoints/
    cli = load_script(ROOT / "launch" / "export_hf.py")
    assert cli.main(["--model", str(tmp_path / "checkpoints"), "--output_dir", str(tmp_path / "hf")]) == 0
    assert "max |ours - transformers|" in capsys.readouterr().out
    assert_same_outputs(model, tmp_path / "hf")
    engine.destroy()


def test_bad_export_input(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        export_hf(tmp_path / "nope", tmp_path / "hf")
    small = make_model(vocab_size=len(VOCAB) - 4)
    with pytest.raises(ConfigError, match=f"tokenizer has {len(VOCAB)} tokens but the model's vocabulary only"):
        export_hf(small, tmp_path / "hf", tokenizer=make_tokenizer())
    assert not (tmp_path / "hf").exists()


def test_export_refuses_non_finite_weights(tmp_path, capsys):
    """A diverged run's NaN weights are refused by the library and the CLI, and the CLI's equivalence check cannot
    pass on NaN (it used to compare `nan > tolerance`, which is never true)."""
    model = make_model()
    with torch.no_grad():
        model.encoder.layers[0].ffn_in.weight[0, 0] = float("nan")
    folder = save_pretrained(model, tmp_path / "final", make_tokenizer())
    with pytest.raises(ConfigError, match=r"non-finite \(NaN/inf\) weights in \['encoder.layers.0.ffn_in.weight'\]"):
        export_hf(folder, tmp_path / "hf")
    cli = load_script(ROOT / "launch" / "export_hf.py")
    assert cli.main(["--model", str(folder), "--output_dir", str(tmp_path / "hf")]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    assert not cli.within_tolerance(float("nan"), 1e-4) and cli.within_tolerance(0.0, 1e-4)
