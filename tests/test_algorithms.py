"""The algorithm surface (events on a State), PLD and EarlyBERT as algorithms through a real engine, the one
weight-decay rule (LAMB included), the one full-precision gather, and the core's independence from the trainer."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from test_earlybert import one_thread  # noqa: F401  (autouse: tiny models run faster on one thread)

import ds_pld
from ds_pld.algorithms import (
    Algorithm,
    EarlyBert,
    Event,
    ProgressiveLayerDropping,
    State,
    optimizer_step,
    register_checkpoint_state,
    run_event,
)
from ds_pld.config_errors import ConfigError
from ds_pld.earlybert import EarlyBertConfig, EarlyBird, slimming_layers
from ds_pld.earlybert.prune import prune_state_dict
from ds_pld.glue.model import SequenceClassifier
from ds_pld.models import build_model
from ds_pld.optim import LambConfig
from ds_pld.optim.moments import full_precision_state
from ds_pld.optim.param_groups import no_weight_decay, weight_decay_groups
from ds_pld.pld import ProgressiveLayerDrop, expected_layers, theta_at

ROOT = Path(__file__).resolve().parents[1]
CORE = ("ds_pld/plugin.py", "ds_pld/plugin_state.py", "ds_pld/engine_checkpoint.py", "ds_pld/pld.py", "ds_pld/models",
        "ds_pld/optim", "ds_pld/kernels", "ds_pld/earlybert", "ds_pld/algorithms")
TRAINER = ("ds_pld.training", "ds_pld.data", "ds_pld.glue", "launch")
VOCAB = 64


def tiny(slimming: bool = True, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("bert-tiny", vocab_size=VOCAB, num_layers=3, num_heads=4, slimming=slimming,
                       hidden_dropout=0.0, attention_dropout=0.0, kernels="torch").train()


def micro_batches(step: int, count: int = 1) -> list[dict[str, torch.Tensor]]:
    out = []
    for micro in range(count):
        gen = torch.Generator().manual_seed(1000 * step + micro)
        ids = torch.randint(5, VOCAB, (2, 12), generator=gen)
        out.append({"input_ids": ids, "labels": torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, -100)})
    return out


def engine_for(model: torch.nn.Module, config: dict, start_step: int = 0):
    engine, *_ = ds_pld.initialize(model=model, model_parameters=weight_decay_groups(model), config=config)
    return engine


def train(state: State, algorithms: list[Algorithm], steps: int, accumulation: int = 1) -> list[dict]:
    """What every trainer does: the shared optimizer step, then STEP_END."""
    records = []
    for _ in range(steps):
        result = optimizer_step(state, algorithms, micro_batches(state.step, accumulation))
        records.append({"step": state.step, "loss": float(result.mean_loss),
                        **run_event(algorithms, Event.STEP_END, state)})
    return records


# --- the surface ------------------------------------------------------------------------------------------------

class Recorder(Algorithm):
    """Records the events it sees; zeroes the loss after the loss, to show the change is what backward gets."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple[Event, int]] = []

    def match(self, event: Event, state: State) -> bool:
        return True

    def apply(self, event: Event, state: State) -> dict | None:
        self.events.append((event, state.step))
        if event is Event.AFTER_LOSS:
            state.loss = state.loss * 0.0  # nothing to learn from: the weights must not move
        return {"seen": len(self.events)} if event is Event.STEP_END else None

    def state_dict(self) -> dict:
        return {"seen": len(self.events)}


def test_events_fire_in_order_and_a_changed_loss_is_what_backward_gets(single_rank_world):
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    model = tiny(slimming=False)
    state = State(engine_for(model, config), lambda m, s: engine_for(m, config, s))
    before = {name: p.detach().clone() for name, p in state.model.named_parameters()}
    recorder = Recorder()
    register_checkpoint_state(state.engine, [recorder])
    records = train(state, [recorder], steps=2, accumulation=2)
    assert recorder.events == [(Event.STEP_START, 0), (Event.AFTER_LOSS, 0), (Event.AFTER_LOSS, 0),
                               (Event.STEP_END, 1), (Event.STEP_START, 1), (Event.AFTER_LOSS, 1),
                               (Event.AFTER_LOSS, 1), (Event.STEP_END, 2)]
    assert [r["seen"] for r in records] == [4, 8] and records[0]["loss"] > 0, "the record keeps the model's loss"
    assert all(torch.equal(before[name], p) for name, p in state.model.named_parameters())
    assert ds_pld.plugin_of(state.engine).extra_state["recorder"] is recorder


def test_pld_reports_each_steps_theta_and_refuses_an_engine_it_does_not_drive(single_rank_world):
    pld = {"enabled": True, "theta": 0.5, "gamma": 0.5}
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.01}},
              "progressive_layer_drop": pld}
    state = State(engine_for(tiny(slimming=False), config), lambda m, s: engine_for(m, config, s))
    algorithm = ds_pld.plugin_of(state.engine).pld  # the one driver: the engine's hook and the loop's metrics
    records = train(state, [algorithm], steps=3)
    assert [r["pld_theta"] for r in records] == pytest.approx([theta_at(s, 0.5, 0.5) for s in range(3)])
    assert records[2]["expected_layers"] == pytest.approx(expected_layers(theta_at(2, 0.5, 0.5), 3))
    del config["progressive_layer_drop"]
    plain = State(engine_for(tiny(slimming=False), config), lambda m, s: engine_for(m, config, s))
    with pytest.raises(ConfigError, match="not attached to the engine being trained"):
        train(plain, [ProgressiveLayerDropping(ProgressiveLayerDrop(0.5, 0.5))], steps=1)


@pytest.mark.slow
def test_earlybert_searches_draws_and_swaps_the_engine_at_the_same_step(single_rank_world):
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}}}
    earlybert = EarlyBert(EarlyBertConfig(check_every=1, window=2, draw_at_step=3, head_prune_ratio=0.25))
    state = State(engine_for(tiny(), config), lambda m, s: engine_for(m, config, s))
    searched = state.engine
    records = train(state, [earlybert], steps=5)
    assert "earlybert_distance" in records[1] and "earlybert_drawn_step" not in records[1]
    drawn = records[2]
    assert drawn["earlybert_drawn_step"] == 3 and drawn["earlybert_heads"] == 3 * 3
    assert drawn["earlybert_moments_carried"] is True
    assert state.engine is not searched and not slimming_layers(state.model)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5], "the swapped engine continues the step count"
    assert not any("earlybert_distance" in r for r in records[3:]), "no search after the draw"
    assert earlybert.report()["drawn_at_step"] == 3 and earlybert.report()["earlybert_kept_heads"] == [3, 3, 3]
    resumed = EarlyBert(earlybert.config)
    resumed.load_state_dict(earlybert.state_dict())
    assert resumed.bird.drawn and not resumed.match(Event.STEP_END, state)


def test_earlybert_penalty_joins_the_loss_only_while_searching():
    class Fake:
        module = tiny()

    earlybert = EarlyBert(EarlyBertConfig(lambda_head=1.0, lambda_ffn=0.0))
    state = State(Fake(), lambda m, s: None, loss=torch.tensor(2.0))  # type: ignore[arg-type]
    run_event([earlybert], Event.AFTER_LOSS, state)
    assert float(state.loss.detach()) == pytest.approx(2.0 + 3 * 4), "3 layers x 4 head coefficients at 1.0"
    Fake.module = tiny(slimming=False)
    state.loss = torch.tensor(2.0)
    run_event([earlybert], Event.AFTER_LOSS, state)
    assert float(state.loss) == 2.0


def test_glue_runs_the_same_algorithms_pld_theta_per_step_and_moments_carried_across_the_draw(tmp_path,
                                                                                               single_rank_world):
    """GLUE's loop is the same optimizer_step with the same EarlyBert (pruning the classifier) and PLD."""
    from conftest import SCRIPTS

    sys.path.insert(0, str(SCRIPTS))
    from glue_toy import save_toy_model, write_sst2

    from ds_pld.glue.job import run_glue

    write_sst2(tmp_path / "glue", train=64, dev=16)
    config = {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
              "progressive_layer_drop": {"theta": 0.5, "gamma": 0.5},
              "glue": {"learning_rate": 1e-3, "batch_size": 8, "max_seq_length": 32, "seeds": [1],
                       "earlybert": {"draw_at_step": 2, "check_every": 1, "window": 2, "head_prune_ratio": 0.5}}}
    summary = run_glue(save_toy_model(tmp_path / "model"), "sst2", tmp_path / "out", config,
                       glue_dir=tmp_path / "glue", max_steps=4)
    run = summary["runs"][0]
    assert run["pld_thetas"] == pytest.approx([theta_at(s, 0.5, 0.5) for s in range(4)])
    assert run["earlybert"]["drawn_at_step"] == 2 and run["earlybert"]["layer_heads"] == [1, 1]
    assert run["earlybert"]["moments_carried"] is True and run["steps"] == 4


# --- one rule, one gather, one pruning ----------------------------------------------------------------------------

def test_one_weight_decay_rule_exempts_biases_norms_and_slimming_coefficients():
    model = tiny()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, exempt = weight_decay_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and exempt["weight_decay"] == 0.0
    exempt_names = {names[id(p)] for p in exempt["params"]}
    assert {"encoder.layers.0.head_coef", "encoder.layers.2.ffn_coef", "encoder.layers.1.qkv.bias", "mlm.bias",
            "encoder.layers.0.attn_norm.weight", "embeddings.norm.weight"} <= exempt_names
    assert all(not no_weight_decay(names[id(p)]) for p in decay["params"])
    assert "encoder.layers.0.qkv.weight" in {names[id(p)] for p in decay["params"]}
    classifier = SequenceClassifier(tiny(), num_labels=2)
    grouped = {id(p) for group in weight_decay_groups(classifier) for p in group["params"]}
    assert grouped == {id(p) for p in classifier.parameters() if p.requires_grad}, "frozen heads left out"


@pytest.mark.parametrize("patterns", [[], ["bias", "norm"]])
def test_lamb_gives_slimming_coefficients_no_weight_decay(patterns):
    """The bug: LAMB's groups followed its patterns only, so the coefficients decayed on top of their L1 penalty."""
    cfg = LambConfig.from_optimizer_block({"type": "Lamb", "params": {"weight_decay": 0.01,
                                                                       "exclude_from_weight_decay": patterns}})
    model = tiny()
    decay_of = {id(p): group["weight_decay"] for group in cfg.param_groups(model) for p in group["params"]}
    for name, param in model.named_parameters():
        if name.endswith("_coef"):
            assert decay_of[id(param)] == 0.0, name
    assert decay_of[id(model.encoder.layers[0].qkv.weight)] == 0.01
    assert decay_of[id(model.encoder.layers[0].qkv.bias)] == (0.0 if patterns else 0.01), "patterns still rule"


def test_full_precision_state_and_pruning_serve_a_wrapped_encoder_too():
    classifier = SequenceClassifier(tiny(), num_labels=2).eval()
    state = full_precision_state(classifier)
    assert set(state) == {name for name, _ in classifier.named_parameters()}
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    ticket = EarlyBird(EarlyBertConfig(head_prune_ratio=0.5, ffn_prune_ratio=0.5)).ticket(classifier)
    wrapped = prune_state_dict(state, ticket, 3, classifier.config.head_dim)
    inner = prune_state_dict({k[5:]: v for k, v in state.items() if k.startswith("bert.")}, ticket, 3,
                             classifier.config.head_dim)
    assert {f"bert.{k}": v.shape for k, v in inner.items()} == {k: v.shape for k, v in wrapped.items()
                                                               if k.startswith("bert.")}
    assert torch.equal(wrapped["classifier.dense.weight"], state["classifier.dense.weight"])


# --- layering ---------------------------------------------------------------------------------------------------

def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_imports_nothing_from_the_trainer():
    files = [p for entry in CORE for p in ([ROOT / entry] if entry.endswith(".py") else (ROOT / entry).rglob("*.py"))]
    assert len(files) > 20
    bad = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.startswith(TRAINER))
           for p in files}
    assert {path: found for path, found in bad.items() if found} == {}
