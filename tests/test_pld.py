"""Progressive Layer Dropping: schedule, model contract, engine contract, checkpoints, ZeRO stages."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SCRIPTS, run_deepspeed
from deepspeed.runtime.engine import DeepSpeedEngine

import ds_pld
from ds_pld.checkpoints import META_FILE
from ds_pld.config_errors import ConfigError
from ds_pld.models import build_model
from ds_pld.pld import ProgressiveLayerDrop, drop_seed, expected_layers, keep_probabilities, theta_at

VOCAB = 64


def tiny_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("bert-tiny", vocab_size=VOCAB, **{"num_layers": 4, **overrides})


def batch(seed: int = 0, size: int = 2, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (size, seq), generator=gen)
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, -100)
    labels[:, 0] = ids[:, 0]
    return ids, labels


def engine_config(**extra) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "progressive_layer_drop": {"enabled": True, "theta": 0.5, "gamma": 0.1}, **extra}


# --- schedule -------------------------------------------------------------------------------------------------------

def test_theta_schedule_values():
    pld = ProgressiveLayerDrop(theta=0.5, gamma=0.001)
    assert pld.get_theta() == 1.0
    for step in (0, 1, 10, 1000, 10**6):
        pld.update_state(step)
        assert pld.get_theta() == pytest.approx(0.5 * math.exp(-0.001 * step) + 0.5)
    assert pld.get_state() == {"progressive_layer_drop": True, "pld_theta": pld.get_theta()}
    assert theta_at(10**9, 0.3, 0.01) == pytest.approx(0.3)


def test_depth_schedule_is_the_papers():
    probs = keep_probabilities(0.5, 12)
    assert probs[0] == pytest.approx(1 - 0.5 / 12) and probs[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(probs, probs[1:]))
    assert expected_layers(0.5, 12) == pytest.approx(8.75)
    assert keep_probabilities(1.0, 6) == [1.0] * 6


@pytest.mark.parametrize("block, key", [
    ({"enabled": True, "theta": 0.5}, "gamma"),
    ({"enabled": True, "gamma": 0.1}, "theta"),
    ({"enabled": True, "theta": 0.0, "gamma": 0.1}, "theta"),
    ({"enabled": True, "theta": 1.5, "gamma": 0.1}, "theta"),
    ({"enabled": True, "theta": 0.5, "gamma": -1}, "gamma"),
    ({"enabled": True, "theta": 0.5, "gamma": 0.1, "thetta": 1}, "thetta"),
    ({"enabled": True, "theta": "0.5", "gamma": 0.1}, "theta"),
])
def test_bad_pld_block_is_rejected_naming_the_key(block, key):
    with pytest.raises(ConfigError, match=key):
        ds_pld.parse_config({"train_batch_size": 2, "progressive_layer_drop": block})


# --- model ----------------------------------------------------------------------------------------------------------

def test_keep_frequency_matches_depth_schedule():
    """The model runs exactly the layers the seeded draw keeps, and the draws keep layer l with frequency p_l."""
    model = tiny_model(num_layers=6).train()
    ran: list[int] = []
    for i, layer in enumerate(model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: ran.append(i))
    ids, _ = batch(seq=4, size=1)
    theta = 0.4
    with torch.no_grad():
        for t in range(150):  # the model side: which forwards actually run
            ran.clear()
            model(ids, progressive_layer_drop=True, pld_theta=theta, pld_seed=drop_seed(1, t, 0))
            keep = ds_pld.pld.sample_keep_mask(theta, 6, drop_seed(1, t, 0))
            assert ran == [i for i, kept in enumerate(keep) if kept]
    trials = 20000  # the draw side: frequencies against the depth schedule
    counts = [0] * 6
    for t in range(trials):
        for i, kept in enumerate(ds_pld.pld.sample_keep_mask(theta, 6, drop_seed(1, t, 0))):
            counts[i] += kept
    for count, p in zip(counts, keep_probabilities(theta, 6)):
        tolerance = 4 * math.sqrt(p * (1 - p) / trials) + 1e-9
        assert abs(count / trials - p) < tolerance, (counts, p)


def test_kept_layers_are_scaled_and_dropped_layers_cost_nothing():
    model = tiny_model(hidden_dropout=0.0, attention_dropout=0.0).train()
    ids, labels = batch()
    seed = next(s for s in range(100) if sum(ds_pld.pld.sample_keep_mask(0.5, 4, s)) == 2)
    keep = ds_pld.pld.sample_keep_mask(0.5, 4, seed)
    out = model(ids, labels=labels, progressive_layer_drop=True, pld_theta=0.5, pld_seed=seed)
    out.loss.backward()
    assert out.layers_run == 2
    for layer, kept in zip(model.encoder.layers, keep):
        has_grad = layer.qkv.weight.grad is not None
        assert has_grad == kept, "a dropped layer must get no backward"
    # Reference: run the kept layers by hand with the 1/p_l scale.
    with torch.no_grad():
        x = model.embeddings(ids, None)
        for layer, kept, p in zip(model.encoder.layers, keep, keep_probabilities(0.5, 4)):
            if kept:
                h = x + layer.attn_out(layer.attention(layer.attn_norm(x), None)) / p
                x = h + layer.ffn_out(torch.nn.functional.gelu(layer.ffn_in(layer.ffn_norm(h)))) / p
        expected = model.encoder.final_norm(x)
    torch.testing.assert_close(out.hidden_states.detach(), expected, rtol=1e-5, atol=1e-5)


def test_eval_runs_every_layer_unscaled_and_is_deterministic():
    model = tiny_model().eval()
    ids, _ = batch()
    a = model(ids, progressive_layer_drop=True, pld_theta=0.5, pld_seed=3)
    b = model(ids)
    assert a.layers_run == 4 and b.layers_run == 4
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


def test_activation_checkpointing_keeps_pld_and_gradients():
    ids, labels = batch()
    seed = next(s for s in range(100) if 0 < sum(ds_pld.pld.sample_keep_mask(0.5, 4, s)) < 4)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(hidden_dropout=0.0, attention_dropout=0.0, gradient_checkpointing=checkpointing).train()
        out = model(ids, labels=labels, progressive_layer_drop=True, pld_theta=0.5, pld_seed=seed)
        out.loss.backward()
        assert out.layers_run == sum(ds_pld.pld.sample_keep_mask(0.5, 4, seed)) < 4
        grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- engine ---------------------------------------------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """A DeepSpeed <= 0.19.5 style model: takes the two PLD keywords, records what it got."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.seen: list[dict] = []

    def forward(self, x, progressive_layer_drop=False, pld_theta=None):
        self.seen.append({"progressive_layer_drop": progressive_layer_drop, "pld_theta": pld_theta})
        return self.linear(x).pow(2).mean()


def test_engine_passes_pld_kwargs_and_updates_theta_per_optimizer_step(single_rank_world):
    model = Recorder()
    config = engine_config(gradient_accumulation_steps=3)
    engine, *_ = ds_pld.initialize(model=model, config=config)
    assert type(engine) is DeepSpeedEngine  # DeepSpeed's own class: PLD rides on a forward pre-hook
    x = torch.randn(2, 4)
    for _ in range(4 * 3):
        loss = engine(x)
        engine.backward(loss)
        engine.step()
    thetas = [seen["pld_theta"] for seen in model.seen]
    assert all(seen["progressive_layer_drop"] is True for seen in model.seen)
    # Step s (three micro-batches each) uses theta(s); no lag, no per-micro-batch update.
    assert thetas == [pytest.approx(theta_at(s, 0.5, 0.1)) for s in range(4) for _ in range(3)]
    assert ds_pld.plugin_of(engine).pld_theta() == pytest.approx(theta_at(4, 0.5, 0.1))
    model.eval()
    engine(x)
    assert model.seen[-1] == {"progressive_layer_drop": False, "pld_theta": None}


def test_model_without_pld_kwargs_is_rejected(single_rank_world):
    with pytest.raises(ConfigError, match="Linear"):
        ds_pld.initialize(model=torch.nn.Linear(4, 1), config=engine_config())


def test_config_from_args_and_path(single_rank_world, tmp_path):
    path = tmp_path / "pld.json"
    path.write_text(json.dumps(engine_config()))
    args = type("Args", (), {"deepspeed_config": str(path), "local_rank": 0})()
    engine, *_ = ds_pld.initialize(args=args, model=Recorder())
    assert ds_pld.plugin_of(engine).pld_theta() == 1.0 and args.deepspeed_config == str(path)
    with pytest.raises(ConfigError, match="does not exist"):
        ds_pld.initialize(config=str(tmp_path / "missing.json"), model=Recorder())


def test_checkpoint_continues_schedule_and_drop_decisions(single_rank_world, tmp_path):
    def train(engine, steps, losses):
        for _ in range(steps):
            torch.manual_seed(engine.global_steps)  # dropout RNG as a function of the step, as train.py does
            ids, labels = batch(seed=engine.global_steps)
            out = engine(ids, labels=labels)
            engine.backward(out.loss)
            engine.step()
            losses.append((out.layers_run, round(out.loss.item(), 5)))

    config = engine_config(progressive_layer_drop={"enabled": True, "theta": 0.5, "gamma": 0.5})
    straight: list = []
    engine, *_ = ds_pld.initialize(model=tiny_model(), config=config)
    train(engine, 6, straight)

    resumed: list = []
    engine, *_ = ds_pld.initialize(model=tiny_model(), config=config)
    train(engine, 3, resumed)
    ds_pld.save_checkpoint(engine, tmp_path)
    meta = json.loads((tmp_path / "global_step3" / META_FILE).read_text())
    assert meta["global_steps"] == 3 and meta["pld_theta"] == pytest.approx(theta_at(3, 0.5, 0.5))
    assert (tmp_path / "latest").read_text() == "global_step3"

    engine, *_ = ds_pld.initialize(model=tiny_model(), config=config)
    path, _ = ds_pld.load_checkpoint(engine, tmp_path)
    assert path is not None and engine.global_steps == 3
    assert ds_pld.plugin_of(engine).pld_theta() == pytest.approx(theta_at(3, 0.5, 0.5))
    train(engine, 3, resumed)
    assert resumed == straight
    assert any(layers < 4 for layers, _ in straight), "the schedule should have dropped a layer by step 5"


def test_incomplete_checkpoint_is_not_resumed(single_rank_world, tmp_path):
    engine, *_ = ds_pld.initialize(model=tiny_model(), config=engine_config())
    ds_pld.save_checkpoint(engine, tmp_path)
    (tmp_path / "global_step0" / META_FILE).unlink()
    with pytest.raises(ConfigError, match="incomplete"):
        ds_pld.load_checkpoint(engine, tmp_path)


def test_zero3_with_pld_refuses_an_encoder_above_the_live_parameter_bound(single_rank_world):
    """Under ZeRO-3, PLD trains right only with the encoder one ZeRO-3 leaf (tests/test_zero3_pld.py); an encoder
    that does not fit `stage3_max_live_parameters` is refused before DeepSpeed builds anything, naming the key, and so
    is a model without a BertEncoder."""
    model = tiny_model()
    size = sum(p.numel() for p in model.encoder.parameters())
    small = engine_config(zero_optimization={"stage": 3, "stage3_max_live_parameters": size - 1})
    with pytest.raises(ConfigError, match=rf"stage3_max_live_parameters' = {size - 1:,}.*at least {size:,}"):
        ds_pld.initialize(model=model, config=small)
    with pytest.raises(ConfigError, match="BertEncoder only.*zero_optimization.stage"):
        ds_pld.initialize(model=Recorder(), config=engine_config(zero_optimization={"stage": 3}))
    plain = {**small, "progressive_layer_drop": {"enabled": False}}  # without PLD the bound does not matter
    engine, *_ = ds_pld.initialize(model=tiny_model(), config=plain)
    engine.destroy()


def test_attach_to_an_engine_built_by_deepspeed(single_rank_world):
    """A user who calls deepspeed.initialize keeps the engine they have: `ds_pld.attach` drives PLD on it (theta per
    optimizer step through the forward pre-hook), and its checkpoints carry the schedule."""
    import deepspeed

    config = engine_config(gradient_accumulation_steps=2)
    model = Recorder()
    engine, *_ = deepspeed.initialize(model=model, config={k: v for k, v in config.items()
                                                           if k != "progressive_layer_drop"})
    plugin = ds_pld.attach(engine, config)
    assert ds_pld.plugin_of(engine) is plugin and type(engine) is DeepSpeedEngine
    x = torch.randn(2, 4)
    for _ in range(3 * 2):
        loss = engine(x)
        engine.backward(loss)
        engine.step()
    assert [seen["pld_theta"] for seen in model.seen] == [pytest.approx(theta_at(s, 0.5, 0.1)) for s in range(3)
                                                          for _ in range(2)]
    plugin.detach()
    engine(x)
    assert model.seen[-1] == {"progressive_layer_drop": False, "pld_theta": None}, "detach removes the hook"
    with pytest.raises(ConfigError, match="no ds_pld plugin"):
        ds_pld.plugin_of(torch.nn.Linear(1, 1))


def test_initialize_acts_on_the_model_block_and_refuses_earlybert(single_rank_world):
    """`model` builds the model when none is passed and is an error beside one; `earlybert` needs a training loop,
    so ds_pld.initialize refuses it with one message naming the key, instead of silently ignoring it."""
    block = {"preset": "bert-tiny", "num_layers": 2, "vocab_size": 64, "max_position_embeddings": 16}
    config = {**engine_config(), "model": block}
    engine, *_ = ds_pld.initialize(config=config)
    assert engine.module.config.num_layers == 2 and ds_pld.plugin_of(engine).pld_theta() == 1.0
    with pytest.raises(ConfigError, match="'model' block and a model was passed"):
        ds_pld.initialize(model=tiny_model(), config=config)
    with pytest.raises(ConfigError, match="'earlybert' is run by a training loop"):
        ds_pld.initialize(model=tiny_model(), config={**engine_config(), "earlybert": {"max_search_steps": 10}})


# --- distributed ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_ranks_all_zero_stages_train_with_pld(tmp_path):
    out = tmp_path / "result.json"
    run_deepspeed([str(SCRIPTS / "pld_zero_stages.py"), str(out)])
    results = json.loads(out.read_text())
    control = results.pop()
    assert [(r["stage"], r["checkpointing"]) for r in results] == [(0, False), (1, False), (2, False), (3, False),
                                                                     (2, True)]
    assert (control["stage"], control["cleared"]) == (3, False)
    # What ds_pld refuses on the installed DeepSpeed (ds_pld.compat: 0.17/0.18 on the CPU) is not trained.
    results = [r for r in results if "refused" not in r]
    controls = [] if "refused" in control else [control]
    for result in results + controls:
        rank0, rank1 = result["ran"]
        assert rank0 == rank1, f"ranks dropped different layers under ZeRO-{result['stage']}"
        assert any(sum(ran) < 4 for ran in rank0), "PLD never dropped a layer"
        assert all(math.isfinite(loss) for loss in result["losses"])
        assert result["global_steps"] == 6
        assert result["checksums"][0] == pytest.approx(result["checksums"][1], rel=1e-6)
        assert result["thetas"][0] == 1.0 and result["thetas"][-1] < 0.6
    # Same data, same drops: every stage learns the same thing (ZeRO is an implementation detail).
    for result in results[1:]:
        assert result["losses"] == pytest.approx(results[0]["losses"], rel=1e-3)
        assert result["max_weight_diff_vs_stage0"] < 5e-5, f"ZeRO-{result['stage']} weights differ from ZeRO-0's"
    # Negative control: ZeRO-3's per-layer layout (no encoder leaf) applies stale gradients to dropped layers.
    for control in controls:
        assert control["max_weight_diff_vs_stage0"] > 5e-4, "the encoder leaf made no difference"
