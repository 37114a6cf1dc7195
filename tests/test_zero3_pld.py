"""ZeRO-3 under PLD (issues 14, 19): each PreLNLayer is a ZeRO-3 leaf, so its hooks fetch all of its parameters and
none goes through DeepSpeed's external-parameter path (a gather on first access, one parameter at a time); and with
PLD, `prepare_zero3_pld` makes the encoder one leaf, the only layout ds_pld allows there: PLD's drops no longer
invalidate ZeRO-3's prefetch trace, and DeepSpeed's leaf hook gives a dropped layer the zero gradient stages 0-2 give
it (with no private buffer cleared by ds_pld)."""
from __future__ import annotations

import deepspeed
import pytest
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import z3_leaf_module

import ds_pld
from ds_pld.compat import zero_accumulation_problem
from ds_pld.config_errors import ConfigError
from ds_pld.models import build_model
from ds_pld.models.bert import PreLNLayer
from ds_pld.models.zero3 import prepare_zero3_pld
from ds_pld.pld import drop_seed

VOCAB, STEPS = 64, 4


def zero_config(stage: int, pld: bool = True) -> dict:
    """Persistence threshold 0: every parameter of the tiny model is partitioned, as a real model's large ones are.
    DeepSpeed prints "Invalidate trace cache" each time PLD's drops break its prefetch trace."""
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                  "log_trace_cache_warnings": True},
            "progressive_layer_drop": {"enabled": pld, "theta": 0.5, "gamma": 0.5, "seed": 7}}


def tiny_model(checkpointing: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("bert-tiny", vocab_size=VOCAB, num_layers=4, hidden_dropout=0.0, attention_dropout=0.0,
                       gradient_checkpointing=checkpointing)


def train(stage: int, checkpointing: bool = False, on_layer_start=None
          ) -> tuple[list[float], torch.nn.Module, int]:
    """(losses, model, layers run) of STEPS optimizer steps; `on_layer_start(layer)` runs as each layer's forward
    starts, after DeepSpeed's own hooks."""
    model = tiny_model(checkpointing)
    engine, *_ = ds_pld.initialize(model=model, config=zero_config(stage))
    if stage == 3:
        assert z3_leaf_module(model.encoder), "ds_pld.initialize makes the encoder one ZeRO-3 leaf under PLD"
    if on_layer_start is not None:
        for layer in model.encoder.layers:
            layer.register_forward_pre_hook(lambda module, _: on_layer_start(module))
    generator = torch.Generator().manual_seed(1)
    losses, ran = [], 0
    for _ in range(STEPS * engine.gradient_accumulation_steps()):
        ids = torch.randint(5, VOCAB, (2, 16), generator=generator)
        labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.3, ids, -100)
        out = engine(ids, labels=labels)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
        ran += out.layers_run
    engine.destroy()
    return losses, model, ran


def test_every_layer_is_a_zero3_leaf():
    model = build_model("bert-tiny", vocab_size=VOCAB, num_layers=3)
    layers = [m for m in model.modules() if isinstance(m, PreLNLayer)]
    assert len(layers) == 3 and all(z3_leaf_module(layer) for layer in layers)
    assert not any(z3_leaf_module(m) for m in model.modules() if not isinstance(m, PreLNLayer))


def test_zero3_fetches_layers_through_their_hooks_under_pld(single_rank_world):
    missing: list[str] = []

    def check(layer: torch.nn.Module) -> None:
        missing.extend(name for name, p in layer.named_parameters() if p.ds_status != ZeroParamStatus.AVAILABLE)

    _, model, ran = train(3, on_layer_start=check)
    assert 0 < ran < STEPS * 2 * 4, "PLD should have run some layers and dropped others"
    assert not missing, f"not gathered when the layer's forward started: {sorted(set(missing))}"
    layer_params = {id(p) for p in model.encoder.layers.parameters()}
    external = [p for m in model.modules() for p in getattr(m, "_external_params", {}).values()]
    assert not [p for p in external if id(p) in layer_params], "layer weights went through the external path"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_zero3_with_the_encoder_leaf_trains_as_zero0_and_zero2(single_rank_world, checkpointing):
    """Dropped layers get a zero gradient under ZeRO-3 exactly as under stages 0 and 2 (no stale partition): the
    same drops, the same losses step after step."""
    reference, _, ran = train(0)
    assert 0 < ran < STEPS * 2 * 4, "PLD should have run some layers and dropped others"
    if zero_accumulation_problem(deepspeed.__version__, 2, 2) is None:  # ds_pld refuses ZeRO-2 here before 0.18.3
        assert train(2)[0] == pytest.approx(reference, rel=1e-5)
    losses, _, _ = train(3, checkpointing)
    assert losses == pytest.approx(reference, rel=1e-5)


def test_encoder_leaf_only_under_zero3_with_pld_and_within_the_live_parameter_bound():
    model = tiny_model()
    size = sum(p.numel() for p in model.encoder.parameters())
    assert prepare_zero3_pld(model, zero_config(2), pld_enabled=True) == []
    assert prepare_zero3_pld(model, zero_config(3, pld=False), pld_enabled=False) == []
    small = zero_config(3)
    small["zero_optimization"]["stage3_max_live_parameters"] = size - 1
    with pytest.raises(ConfigError, match="stage3_max_live_parameters"):
        prepare_zero3_pld(model, small, pld_enabled=True)
    assert not z3_leaf_module(model.encoder)
    small["zero_optimization"]["stage3_max_live_parameters"] = size
    assert prepare_zero3_pld(model, small, pld_enabled=True) == [model.encoder]
    assert z3_leaf_module(model.encoder)


def test_pld_keeps_the_zero3_trace_with_the_encoder_as_leaf(single_rank_world, capfd):
    _, _, ran = train(3)
    assert 0 < ran < STEPS * 2 * 4
    assert "Invalidate trace cache" not in capfd.readouterr().out
    # Control: the same drops with every layer its own leaf (plain DeepSpeed, PLD's keywords passed by hand).
    model = tiny_model()
    engine, *_ = deepspeed.initialize(model=model, config={k: v for k, v in zero_config(3).items()
                                                           if k != "progressive_layer_drop"})
    generator = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        for micro in range(2):
            ids = torch.randint(5, VOCAB, (2, 16), generator=generator)
            labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.3, ids, -100)
            out = engine(ids, labels=labels, progressive_layer_drop=True, pld_theta=0.5,
                         pld_seed=drop_seed(7, step, micro))
            engine.backward(out.loss)
            engine.step()
    engine.destroy()
    assert "Invalidate trace cache" in capfd.readouterr().out
