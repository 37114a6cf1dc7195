"""Random-LTD: DeepSpeed's token choice and schedule, the gather/scatter around a layer against a per-sequence
reference, composition with PLD, the config checks, and the engine path (schedule, checkpoint, eval)."""
from __future__ import annotations

import copy

import pytest
import torch

import ds_pld
from ds_pld.config import parse_config
from ds_pld.config_errors import ConfigError
from ds_pld.models import build_model
from ds_pld.pld import keep_probabilities, sample_keep_mask
from ds_pld.random_ltd import TokenDrop, gather_key_mask, sample_token_indices

VOCAB = 64
LAYERS = 4


def tiny_model(dropout: float = 0.0, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("bert-tiny", vocab_size=VOCAB, num_layers=LAYERS, hidden_dropout=dropout,
                       attention_dropout=dropout, **overrides)


def ltd_block(**change) -> dict:
    block = {"enabled": True, "total_layer_num": LAYERS, "random_ltd_layer_num": 2, "random_ltd_layer_id": [1, 2],
             "model_mask_name": "attention_mask", "model_type": "encoder", "hidden_state_order": "batch_seq_dim",
             "random_ltd_schedule": {"min_value": 4, "max_value": 16, "schedule_type": "fixed_linear",
                                     "schedule_config": {"require_steps": 6, "seq_per_step": 4}}}
    block.update(change)
    return {"enabled": True, "data_routing": {"enabled": True, "random_ltd": block}}


def engine_config(pld: bool = True, **ltd_change) -> dict:
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "data_efficiency": ltd_block(**ltd_change)}
    if pld:
        config["progressive_layer_drop"] = {"enabled": True, "theta": 0.5, "gamma": 0.1}
    return config


def batch(seed: int, size: int = 2, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (size, seq), generator=gen)
    return ids, torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, -100)


# --- the token choice -----------------------------------------------------------------------------------------------

def test_token_choice_is_deepspeeds_draw_sorted():
    """DeepSpeed's bert_sample_tokens: one multinomial over ones((layers * batch, seq)), reshaped, each row sorted
    (its CUDA `token_sort_`). The same random state must give the same tokens; written out row by row here."""
    torch.manual_seed(7)
    ours = sample_token_indices(5, 12, 3, 2, "cpu")
    torch.manual_seed(7)
    draws = torch.multinomial(torch.ones(6, 12), 5).tolist()
    reference = [[sorted(draws[layer * 3 + row]) for row in range(3)] for layer in range(2)]
    assert ours.tolist() == reference
    assert all(len(set(row)) == 5 for layer in reference for row in layer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed's random-LTD sort op is CUDA-only")
def test_token_choice_equals_deepspeeds_cuda_op():
    try:
        from deepspeed.ops.op_builder import RandomLTDBuilder
        from deepspeed.ops.random_ltd.dropping_utils import bert_sample_tokens

        RandomLTDBuilder().load()
    except Exception as err:  # the op needs nvcc to build
        pytest.skip(f"DeepSpeed's random_ltd op does not build here: {err}")
    mask = torch.ones(3, 1, 64, 64, dtype=torch.bool, device="cuda")
    mask[1, :, :, 40:] = False
    torch.manual_seed(3)
    theirs, their_masks = bert_sample_tokens(24, 64, 3, 4, torch.device("cuda"), mask)
    torch.manual_seed(3)
    ours = sample_token_indices(24, 64, 3, 4, torch.device("cuda"))
    assert torch.equal(ours.to(theirs.dtype), theirs)
    for layer in range(4):
        assert torch.equal(gather_key_mask(mask, ours[layer]), their_masks[layer])


def test_mask_gather_matches_deepspeeds_per_row_loop():
    """For a full [batch, 1, seq, seq] mask and for ds_pld's key mask [batch, 1, 1, seq]."""
    gen = torch.Generator().manual_seed(0)
    full = torch.rand(3, 1, 10, 10, generator=gen) > 0.3
    index = sample_token_indices(4, 10, 3, 1, "cpu")[0]
    reference = torch.cat([full[i:i + 1, :, index[i], :][:, :, :, index[i]] for i in range(3)])
    assert torch.equal(gather_key_mask(full, index), reference)
    keys = full[:, :, :1, :]
    assert torch.equal(gather_key_mask(keys, index), torch.stack([keys[i][:, :, index[i]] for i in range(3)]))


# --- the model ------------------------------------------------------------------------------------------------------

def reference_encoder(model, x, keep_mask, scales, tokens: dict[int, torch.Tensor]) -> torch.Tensor:
    """One sequence at a time: a dropping layer runs on the sequence's kept tokens, written back in place."""
    rows = []
    for b in range(x.shape[0]):
        h = x[b:b + 1]
        for i, layer in enumerate(model.encoder.layers):
            if not keep_mask[i]:
                continue
            if i in tokens:
                kept = tokens[i][b]
                part = layer(h[:, kept], None, scales[i])
                h = h.clone()
                h[:, kept] = part
            else:
                h = layer(h, None, scales[i])
        rows.append(h)
    return model.encoder.final_norm(torch.cat(rows))


@pytest.mark.parametrize("pld", [False, True])
def test_dropping_layers_run_on_the_kept_tokens_only(pld):
    model = tiny_model().train()
    x = torch.randn(3, 16, model.config.hidden_size, requires_grad=True)
    drop, theta = TokenDrop(keep=6, layers=(1, 2)), 0.5
    # A draw where PLD drops one dropping layer and keeps the other: both rules act in one forward.
    seed = next(s for s in range(1000) if sample_keep_mask(theta, LAYERS, s)[1:3] == [True, False])
    torch.manual_seed(5)
    ours, layers_run = model.encoder(x, None, pld, theta, seed, drop)
    torch.manual_seed(5)
    index = sample_token_indices(6, 16, 3, 2, "cpu")
    keep = sample_keep_mask(theta, LAYERS, seed) if pld else [True] * LAYERS
    scales = [1 / p for p in keep_probabilities(theta, LAYERS)] if pld else [1.0] * LAYERS
    reference = reference_encoder(model, x, keep, scales, {1: index[0], 2: index[1]})
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert layers_run == sum(keep)
    grads = torch.autograd.grad(ours.square().sum(), [x, *model.encoder.layers[1].parameters()])
    reference_grads = torch.autograd.grad(reference.square().sum(), [x, *model.encoder.layers[1].parameters()])
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    without, _ = model.encoder(x, None, pld, theta, seed, None)
    assert not torch.allclose(ours, without), "dropping tokens must change the output"


def test_activation_checkpointing_recomputes_the_same_tokens():
    ids, labels = batch(0)
    drop = TokenDrop(keep=5, layers=(1, 2))
    grads = []
    for recompute in (False, True):
        model = tiny_model(dropout=0.1, gradient_checkpointing=recompute).train()
        torch.manual_seed(1)
        out = model(ids, labels=labels, progressive_layer_drop=True, pld_theta=0.5, pld_seed=3, random_ltd=drop)
        out.loss.backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_mlm_head_sees_every_position_and_eval_runs_every_token():
    model = tiny_model().train()
    ids, _ = batch(1)
    labels = ids.clone()  # every position is a target
    out = model(ids, labels=labels, random_ltd=TokenDrop(keep=3, layers=(1, 2)))
    assert out.logits.shape[0] == ids.numel() and out.masked_labels.numel() == ids.numel()
    model.eval()
    with torch.no_grad():
        plain = model(ids, labels=labels).logits
        asked = model(ids, labels=labels, random_ltd=TokenDrop(keep=3, layers=(1, 2))).logits
    assert torch.equal(plain, asked)


# --- the config -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"random_ltd_layer_id": [0, 1], "random_ltd_layer_num": 2}, "random_ltd_layer_id' = [0, 1]"),
    ({"random_ltd_layer_id": [1, 3], "random_ltd_layer_num": 2}, "first and last layers keep every token"),
    ({"random_ltd_layer_num": 3}, "random_ltd_layer_num' = 3 but 'random_ltd_layer_id' lists 2"),
    ({"model_type": "decoder"}, "random_ltd.model_type' = 'decoder' must be one of ('encoder')"),
    ({"random_ltd_schedule": {"min_value": 32, "max_value": 16,
                              "schedule_config": {"require_steps": 6, "seq_per_step": 4}}}, "min_value' = 32 is above"),
    ({"layer_token_lr_schedule": {"enabled": True}}, "layer_token_lr_schedule.enabled"),
    ({"random_ltd_layr_id": [1]}, "did you mean 'random_ltd_layer_id'"),
])
def test_bad_random_ltd_block_is_refused_naming_the_key(change, message):
    with pytest.raises(ConfigError, match="data_efficiency.data_routing.random_ltd") as err:
        parse_config({"train_micro_batch_size_per_gpu": 1, "data_efficiency": ltd_block(**change)})
    assert message in str(err.value)


def test_random_ltd_block_must_fit_the_model_and_its_switches():
    config = {"train_micro_batch_size_per_gpu": 1, "data_efficiency": ltd_block(total_layer_num=6),
              "model": {"preset": "bert-tiny", "num_layers": 4}}
    with pytest.raises(ConfigError, match="total_layer_num' = 6 but the model has 4 layers"):
        parse_config(config)
    off = ltd_block()
    off["data_routing"]["enabled"] = False
    with pytest.raises(ConfigError, match="'data_efficiency.data_routing.enabled' is not"):
        parse_config({"train_micro_batch_size_per_gpu": 1, "data_efficiency": off})
    assert parse_config({"train_micro_batch_size_per_gpu": 1}).random_ltd is None


# --- the engine -----------------------------------------------------------------------------------------------------

def train(engine, steps: int, seen: list) -> list[tuple[int, float]]:
    out_rows = []
    for _ in range(steps):
        torch.manual_seed(engine.global_steps)
        ids, labels = batch(engine.global_steps)
        out = engine(ids, labels=labels)
        engine.backward(out.loss)
        engine.step()
        out_rows.append((seen[-1].keep, round(out.loss.item(), 5)))
    return out_rows


def watch(engine) -> list[TokenDrop]:
    seen: list[TokenDrop] = []
    engine.module.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("random_ltd")),
                                            with_kwargs=True)
    return seen


@pytest.mark.parametrize("stage", [0, 2])
def test_engine_follows_deepspeeds_schedule_and_resumes_it(single_rank_world, tmp_path, stage):
    from deepspeed.runtime.data_pipeline.data_routing.scheduler import RandomLTDScheduler

    config = {**engine_config(), "zero_optimization": {"stage": stage}}
    engine, *_ = ds_pld.initialize(model=tiny_model(), config=copy.deepcopy(config))
    straight = train(engine, 8, watch(engine))
    reference = RandomLTDScheduler({**config["data_efficiency"]["data_routing"]["random_ltd"],
                                    "global_batch_size": 2, "layer_token_lr_schedule": {"enabled": False}})
    expected = []
    for step in range(8):
        reference.update_seq(step)
        expected.append(reference.get_current_seq())
    assert [keep for keep, _ in straight] == expected and expected[0] == 4 and expected[-1] == 16

    engine, *_ = ds_pld.initialize(model=tiny_model(), config=copy.deepcopy(config))
    first = train(engine, 3, watch(engine))
    ds_pld.save_checkpoint(engine, tmp_path)
    engine, *_ = ds_pld.initialize(model=tiny_model(), config=copy.deepcopy(config))
    seen = watch(engine)
    ds_pld.load_checkpoint(engine, tmp_path)
    assert engine.random_ltd_scheduler.state_dict()["current_steps"] == 2
    assert first + train(engine, 5, seen) == straight

    engine.eval()
    with torch.no_grad():
        engine(*batch(0)[:1])
    assert len(seen) == 6 and seen[-1] is None, "an eval forward must not be passed random-LTD"


def test_a_model_without_the_keyword_is_refused(single_rank_world):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, x, progressive_layer_drop=False, pld_theta=1.0):
            return self.linear(x)

    with pytest.raises(ConfigError, match="does not accept the keyword argument 'random_ltd'"):
        ds_pld.initialize(model=Plain(), config=engine_config())
