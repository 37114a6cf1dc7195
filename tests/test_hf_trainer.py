"""PLD inside Hugging Face `Trainer` (ds_pld.integrations.transformers): real Trainer runs on the CPU with a tiny
RobertaPreLayerNormForMaskedLM and random tokens (nothing downloaded)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SCRIPTS, run_deepspeed
from transformers import (
    RobertaPreLayerNormConfig,
    RobertaPreLayerNormForMaskedLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ds_pld.export.hf import to_hf_model
from ds_pld.integrations.transformers import PLDAdapter, PLDCallback, driver_for, uses_zero3
from ds_pld.models import build_model
from ds_pld.pld import PLDConfig, drop_seed, sample_keep_mask, theta_at

VOCAB, SEQ, LAYERS = 64, 12, 4
THETA, GAMMA, SEED = 0.5, 1.0, 3  # theta falls to ~0.5 in a few steps; this seed drops a layer for whole steps


@pytest.fixture(autouse=True)
def one_thread():
    """A model this small gains nothing from intra-op threads, and on a shared 2-core machine their spinning makes a
    Trainer step take a second instead of a few milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model() -> RobertaPreLayerNormForMaskedLM:
    torch.manual_seed(0)
    config = RobertaPreLayerNormConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=SEQ + 2,
                                       type_vocab_size=1, pad_token_id=1, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)
    return RobertaPreLayerNormForMaskedLM(config)


def random_mlm(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        ids = torch.randint(5, VOCAB, (SEQ,), generator=generator)
        labels = torch.where(torch.rand(SEQ, generator=generator) < 0.3, ids, -100)
        samples.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels})
    return samples


class Recorder(TrainerCallback):
    """Per optimizer step, read just before the optimizer steps: theta, the drawn masks, which layers ran, which
    layers hold a gradient, and whether each layer's weights changed in the step."""

    def __init__(self, adapter: PLDAdapter):
        self.adapter = adapter
        self.steps: list[dict] = []
        self.eval_runs = [0] * LAYERS
        self._runs = [0] * LAYERS
        self._before: list[torch.Tensor] = []
        for index, layer in enumerate(adapter.encoder.layer):
            layer.attention.register_forward_hook(lambda *_, i=index: self._count(i))

    def _count(self, index: int) -> None:
        counts = self._runs if self.adapter.model.training else self.eval_runs
        counts[index] += 1

    def _layer_weights(self) -> list[torch.Tensor]:
        return [torch.cat([p.detach().reshape(-1) for p in layer.parameters()]).clone()
                for layer in self.adapter.encoder.layer]

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._runs = [0] * LAYERS

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        grads = [[p.grad is not None for p in layer.parameters()] for layer in self.adapter.encoder.layer]
        self.steps.append({"step": state.global_step, "theta": self.adapter.theta,
                           "masks": self.adapter.step_masks, "ran": [n > 0 for n in self._runs],
                           "has_grad": [any(g) for g in grads],
                           "whole_layers": all(all(g) or not any(g) for g in grads)})
        self._before = self._layer_weights()

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        after = self._layer_weights()
        self.steps[-1]["changed"] = [not torch.equal(a, b) for a, b in zip(self._before, after)]


def train_args(out: Path, **overrides) -> TrainingArguments:
    settings = {"output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 4,
                "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
                "weight_decay": 0.0, "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no",
                "report_to": "none", "disable_tqdm": True, "use_cpu": True, "seed": 0,
                "dataloader_num_workers": 0, **overrides}
    return TrainingArguments(**settings)


def pld_trainer(out: Path, **overrides) -> tuple[Trainer, PLDAdapter, Recorder]:
    model = tiny_model()
    adapter = PLDAdapter(model, theta=THETA, gamma=GAMMA, seed=SEED)
    recorder = Recorder(adapter)
    trainer = Trainer(model=model, args=train_args(out, **overrides), train_dataset=random_mlm(64, 1),
                      eval_dataset=random_mlm(16, 2), callbacks=[PLDCallback(adapter), recorder])
    return trainer, adapter, recorder


def expected_masks(step: int, micro_steps: int) -> tuple[tuple[bool, ...], ...]:
    theta = theta_at(step, THETA, GAMMA)
    return tuple(tuple(sample_keep_mask(theta, LAYERS, drop_seed(SEED, step, m))) for m in range(micro_steps))


# --- the adapter alone -----------------------------------------------------------------------------------------------

def test_adapter_computes_what_ds_pld_model_computes():
    """Same weights (through the export), same theta and seed: the transformers model with the adapter drops the same
    layers and scales the kept ones exactly as ds_pld's own BertForPreTraining; in eval mode it is the plain model."""
    torch.manual_seed(0)
    ours = build_model("bert-tiny", vocab_size=VOCAB, num_layers=LAYERS, hidden_dropout=0.0, attention_dropout=0.0,
                       max_position_embeddings=SEQ)
    hf = to_hf_model(ours)
    plain = hf.base_model(input_ids=torch.ones(1, SEQ, dtype=torch.long) * 7).last_hidden_state
    adapter = PLDAdapter.from_config(hf, PLDConfig(enabled=True, theta=THETA, gamma=GAMMA, seed=SEED))
    ids = torch.randint(5, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    ours.train(), hf.train()
    dropped = 0
    for step in range(4):
        adapter.start_step(step)
        for micro in range(2):
            expected = ours(ids, progressive_layer_drop=True, pld_theta=theta_at(step, THETA, GAMMA),
                            pld_seed=drop_seed(SEED, step, micro))
            got = hf.base_model(input_ids=ids).last_hidden_state
            assert sum(adapter.step_masks[micro]) == expected.layers_run
            dropped += LAYERS - expected.layers_run
            torch.testing.assert_close(got, expected.hidden_states, atol=1e-5, rtol=1e-5)
    assert dropped > 0 and adapter.step_masks == expected_masks(3, 2)
    hf.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf.base_model(input_ids=torch.ones(1, SEQ, dtype=torch.long) * 7)
                                   .last_hidden_state, plain)
    adapter.detach()
    hf.train()
    adapter.start_step(50)
    hf.base_model(input_ids=ids)
    assert adapter.step_masks == ()  # detached: nothing drawn, every layer runs


def test_gradient_checkpointing_recomputes_the_drawn_layers():
    """The decisions are made once per forward, outside the layers, so recomputation runs the same layers with the
    same scales: the gradients match those of the same step without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        if checkpointing:
            model.activation_checkpointing_enable()
        adapter = PLDAdapter(model, theta=THETA, gamma=GAMMA, seed=SEED)
        model.train()
        adapter.start_step(3)
        batch = random_mlm(4, 5)
        inputs = {key: torch.stack([sample[key] for sample in batch]) for key in batch[0]}
        model(**inputs).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        assert adapter.step_masks == expected_masks(3, 1) and not all(adapter.step_masks[0])
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        if grad is None:
            assert grads[1][name] is None, name
        else:
            torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_adapter_refuses_what_it_cannot_handle():
    model = tiny_model()
    adapter = PLDAdapter(model, theta=THETA, gamma=GAMMA, seed=SEED)
    with pytest.raises(ValueError, match="already has a PLD adapter"):
        PLDAdapter(model)
    adapter.detach()
    PLDAdapter(model).detach()  # attachable again once detached
    with pytest.raises(ValueError, match="exactly one"):
        PLDAdapter(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="theta"):
        PLDAdapter(tiny_model(), theta=0.0)
    with pytest.raises(ValueError, match="enabled = false"):
        driver_for(PLDConfig(enabled=False))
    callback = PLDCallback(PLDAdapter(tiny_model()))
    args = train_args(Path("unused"))
    with pytest.raises(ValueError, match="not attached"):
        callback.on_train_begin(args, None, None, model=tiny_model())
    assert uses_zero3(SimpleNamespace(hf_deepspeed_config=SimpleNamespace(is_zero3=lambda: True)))
    assert not uses_zero3(args)


# --- real Trainer runs -----------------------------------------------------------------------------------------------

def test_trainer_follows_the_schedule_and_dropped_layers_get_no_gradient(tmp_path):
    trainer, adapter, recorder = pld_trainer(tmp_path, eval_strategy="steps", eval_steps=2)
    trainer.train()
    assert [s["step"] for s in recorder.steps] == list(range(4))
    dropped_somewhere = False
    for record in recorder.steps:
        step = record["step"]
        assert record["theta"] == pytest.approx(theta_at(step, THETA, GAMMA), abs=0)
        # the mid-training evaluation (after step 1) drew nothing and did not shift the micro-step count
        assert record["masks"] == expected_masks(step, 2)
        ran = [any(mask[i] for mask in record["masks"]) for i in range(LAYERS)]
        assert record["ran"] == ran
        # a layer dropped from every micro-batch of the step has no gradient and is not updated (lr > 0, no decay)
        assert record["whole_layers"] and record["has_grad"] == ran and record["changed"] == ran
        dropped_somewhere |= not all(ran)
    assert dropped_somewhere
    logged = [(entry["step"], entry["pld_theta"]) for entry in trainer.state.log_history if "pld_theta" in entry]
    assert logged == [(step, theta_at(step - 1, THETA, GAMMA)) for step in range(1, 5)]


def test_evaluation_runs_every_layer_unscaled(tmp_path):
    trainer, adapter, recorder = pld_trainer(tmp_path, max_steps=3)
    trainer.train()
    assert not all(recorder.steps[-1]["masks"][-1])  # the last training forward dropped a layer
    with_pld = trainer.evaluate()["eval_loss"]
    assert recorder.eval_runs == [2] * LAYERS  # 16 samples in batches of 8: every layer on both batches
    adapter.detach()
    without = trainer.evaluate()["eval_loss"]
    assert with_pld == without


def test_resume_from_checkpoint_continues_the_schedule(tmp_path):
    full, _, full_recorder = pld_trainer(tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    resumed, adapter, recorder = pld_trainer(tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert [r["step"] for r in recorder.steps] == [2, 3]
    for record, uninterrupted in zip(recorder.steps, full_recorder.steps[2:]):
        assert record["theta"] == uninterrupted["theta"] == theta_at(record["step"], THETA, GAMMA)
        assert record["masks"] == uninterrupted["masks"]
    full_logged = [e for e in full.state.log_history if "pld_theta" in e]
    resumed_logged = [e for e in resumed.state.log_history if "pld_theta" in e]
    assert [(e["step"], e["pld_theta"]) for e in resumed_logged] == [(e["step"], e["pld_theta"]) for e in full_logged]


@pytest.mark.slow
def test_trainer_on_two_ranks_with_ddp_and_with_a_deepspeed_config(tmp_path):
    """2 CPU ranks, plain DDP and TrainingArguments(deepspeed=<ZeRO-2 dict>): both ranks draw the same layers every
    step, on schedule; under DDP a layer dropped for a whole step has no gradient on either rank. ZeRO-3, and DDP
    that expects a gradient for every parameter, are refused when the Trainer is built."""
    run_deepspeed([str(SCRIPTS / "hf_trainer_pld.py"), str(tmp_path)], timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["world_size"] == 2
        assert "ddp_find_unused_parameters=True" in (result["ddp_refusal"] or "")
        assert "does not support DeepSpeed ZeRO stage 3" in (result["zero3_refusal"] or "")
        for mode, wrapper in (("ddp", "DistributedDataParallel"), ("deepspeed", "DeepSpeedEngine")):
            run = result[mode]
            assert run["global_step"] == 4 and run["wrapper"] == wrapper
            assert [record["step"] for record in run["steps"]] == list(range(4))
            for record in run["steps"]:
                assert record["theta"] == theta_at(record["step"], THETA, GAMMA)
                assert record["masks"] == [list(m) for m in expected_masks(record["step"], 2)]
            assert [e["pld_theta"] for e in run["logged"]] == [theta_at(s, THETA, GAMMA) for s in range(4)]
        for record in result["ddp"]["steps"]:
            assert record["has_grad"] == [any(mask[i] for mask in record["masks"]) for i in range(LAYERS)]
    for mode in ("ddp", "deepspeed"):
        assert ranks[0][mode]["steps"] == ranks[1][mode]["steps"]
    assert any(not all(record["has_grad"]) for record in ranks[0]["ddp"]["steps"])
