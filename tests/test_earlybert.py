"""EarlyBERT: slimming coefficients, L1 penalty, masks, early-bird detection, physical pruning, config checks."""
from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch

import ds_pld
from ds_pld.config import parse_config
from ds_pld.config_errors import ConfigError
from ds_pld.earlybert import (
    EarlyBertConfig,
    EarlyBird,
    Ticket,
    compute_masks,
    num_pruned,
    prune_layer_state,
    prune_model,
    read_coefficients,
    slimming_layers,
    validate_for_model,
)
from ds_pld.models import build_bert_config, build_model
from ds_pld.models.io import load_pretrained, save_pretrained

VOCAB = 64
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and far faster when other jobs load the CPU (a second
    spinning thread then waits on a descheduled one at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def slim_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """3 layers, 4 heads of 32, 512 FFN neurons, no dropout: outputs are deterministic in train mode too."""
    torch.manual_seed(seed)
    fields = {"num_layers": 3, "num_heads": 4, "slimming": True, "hidden_dropout": 0.0, "attention_dropout": 0.0,
              "kernels": "torch", **overrides}
    return build_model("bert-tiny", vocab_size=VOCAB, **fields).eval()


def randomize_coefficients(model: torch.nn.Module, seed: int, low: float = 0.2, high: float = 1.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in slimming_layers(model):
            layer.head_coef.copy_(torch.empty(layer.head_coef.shape).uniform_(low, high, generator=gen))
            layer.ffn_coef.copy_(torch.empty(layer.ffn_coef.shape).uniform_(low, high, generator=gen))


def batch(seed: int = 0, size: int = 2, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (size, seq), generator=gen)
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, -100)
    labels[:, 0] = ids[:, 0]
    return ids, labels


def outputs(model: torch.nn.Module, seed: int = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = batch(seed)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the second sequence exercises the attention mask
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, **kwargs)
        full = model(ids, attention_mask=mask, **kwargs)
    return out.loss, full.logits


def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, **kwargs) -> None:
    loss_a, logits_a = outputs(a, **kwargs)
    loss_b, logits_b = outputs(b, **kwargs)
    torch.testing.assert_close(logits_a, logits_b, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(loss_a, loss_b, atol=2e-5, rtol=1e-5)


def masked_copy(model: torch.nn.Module, ticket: Ticket) -> torch.nn.Module:
    """The full model with every unit outside the ticket switched off through its coefficient."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads, ffn in zip(slimming_layers(masked), ticket.head_masks(), ticket.ffn_masks()):
            layer.head_coef[~heads] = 0.0
            layer.ffn_coef[~ffn] = 0.0
    return masked


# --- coefficients -----------------------------------------------------------------------------------------------

def test_slimming_layers_are_found_in_depth_order_through_any_wrapper():
    model = slim_model()

    class Classifier(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.head = torch.nn.Linear(128, 2)
            self.bert = bert

    layers = slimming_layers(Classifier(model))
    assert layers == list(model.encoder.layers)
    assert slimming_layers(build_model("bert-tiny", vocab_size=VOCAB)) == []
    with pytest.raises(ConfigError, match="model.slimming"):
        EarlyBird(EarlyBertConfig()).penalty(build_model("bert-tiny", vocab_size=VOCAB))


def test_zero_coefficient_equals_removing_the_head_or_neuron():
    model = slim_model()
    randomize_coefficients(model, seed=1)
    off = copy.deepcopy(model)
    with torch.no_grad():
        off.encoder.layers[1].head_coef[2] = 0.0
        off.encoder.layers[2].ffn_coef[7] = 0.0

    zeroed = copy.deepcopy(model)  # same coefficients, the unit's output weights zeroed instead
    with torch.no_grad():
        zeroed.encoder.layers[1].attn_out.weight[:, 2 * 32:3 * 32] = 0.0
        zeroed.encoder.layers[2].ffn_out.weight[:, 7] = 0.0
    assert_same_outputs(off, zeroed)

    heads = [[0, 1, 2, 3], [0, 1, 3], [0, 1, 2, 3]]
    neurons = [list(range(512)), list(range(512)), [i for i in range(512) if i != 7]]
    removed = prune_model(off, Ticket(heads, neurons))
    assert removed.config.layer_heads == (4, 3, 4) and removed.config.layer_intermediate == (512, 512, 511)
    assert_same_outputs(off, removed)
    # and the unit did matter: switching it back on changes the output
    assert not torch.allclose(outputs(model)[1], outputs(off)[1], atol=1e-4)


def test_l1_penalty_is_in_the_loss_with_gradient_lambda_sign():
    config = EarlyBertConfig(lambda_head=0.3, lambda_ffn=0.02)
    bird = EarlyBird(config)
    model = slim_model().train()
    randomize_coefficients(model, seed=2, low=-1.0, high=1.0)
    layers = slimming_layers(model)
    expected = sum(0.3 * layer.head_coef.abs().sum() + 0.02 * layer.ffn_coef.abs().sum() for layer in layers)
    penalty = bird.penalty(model)
    torch.testing.assert_close(penalty, expected.detach())

    ids, labels = batch()
    model(ids, labels=labels).loss.backward()
    task_grads = [(layer.head_coef.grad.clone(), layer.ffn_coef.grad.clone()) for layer in layers]
    model.zero_grad()
    (model(ids, labels=labels).loss + bird.penalty(model)).backward()
    for layer, (head_grad, ffn_grad) in zip(layers, task_grads):
        torch.testing.assert_close(layer.head_coef.grad, head_grad + 0.3 * layer.head_coef.detach().sign())
        torch.testing.assert_close(layer.ffn_coef.grad, ffn_grad + 0.02 * layer.ffn_coef.detach().sign())


# --- masks ------------------------------------------------------------------------------------------------------

def test_prune_count_rounds_half_up():
    assert [num_pruned(1 / 3, 12), num_pruned(0.4, 3072), num_pruned(0.5, 3), num_pruned(0.35, 10),
            num_pruned(0.25, 2), num_pruned(0.2, 2), num_pruned(0.0, 7)] == [4, 1229, 2, 4, 1, 0, 0]


def reference_masks(coefs: list[np.ndarray], ratio: float, mode: str, keep_one: bool) -> list[np.ndarray]:
    """Numpy reference: layerwise = argsort per layer; global = one np.quantile threshold over all layers."""
    mags = [np.abs(c) for c in coefs]
    if mode == "layerwise":
        out = []
        for mag in mags:
            keep = np.ones(mag.size, dtype=bool)
            keep[np.argsort(mag, kind="stable")[:int(np.floor(ratio * mag.size + 0.5))]] = False
            out.append(keep)
        return out
    flat = np.concatenate(mags)
    candidate = np.ones(flat.size, dtype=bool)
    if keep_one:
        offsets = np.cumsum([0] + [m.size for m in mags[:-1]])
        candidate[offsets + np.array([np.argmax(m) for m in mags])] = False
    count = min(int(np.floor(ratio * flat.size + 0.5)), int(candidate.sum()))
    keep = np.ones(flat.size, dtype=bool)
    if count:
        # inverted_cdf at (count - 0.5) / n is exactly the count-th smallest candidate value
        threshold = np.quantile(flat[candidate], (count - 0.5) / candidate.sum(), method="inverted_cdf")
        keep = ~(candidate & (flat <= threshold))
    return np.split(keep, np.cumsum([m.size for m in mags[:-1]]))


@pytest.mark.parametrize("head_mode, ffn_mode", [("layerwise", "global"), ("global", "layerwise"),
                                                 ("global", "global"), ("layerwise", "layerwise")])
@pytest.mark.parametrize("seed", [0, 1])
def test_masks_match_numpy_reference(head_mode, ffn_mode, seed):
    rng = np.random.default_rng(seed)
    heads = [rng.normal(size=12) * rng.uniform(0.1, 2.0) for _ in range(4)]
    ffn = [rng.normal(size=300) * rng.uniform(0.1, 2.0) for _ in range(4)]
    heads[2] *= 1e-3  # a layer of tiny heads: global mode must still keep one of them
    config = EarlyBertConfig(head_prune_ratio=0.45, ffn_prune_ratio=0.4, head_mode=head_mode, ffn_mode=ffn_mode)
    head_masks, ffn_masks = compute_masks([torch.tensor(h) for h in heads], [torch.tensor(f) for f in ffn], config)
    for got, want in zip(head_masks, reference_masks(heads, 0.45, head_mode, keep_one=True)):
        np.testing.assert_array_equal(got.numpy(), want)
    for got, want in zip(ffn_masks, reference_masks(ffn, 0.4, ffn_mode, keep_one=False)):
        np.testing.assert_array_equal(got.numpy(), want)
    assert sum(int((~m).sum()) for m in ffn_masks) == num_pruned(0.4, 1200)
    assert all(bool(m.any()) for m in head_masks)
    if head_mode == "layerwise":
        assert [int((~m).sum()) for m in head_masks] == [5] * 4
    else:
        assert sum(int((~m).sum()) for m in head_masks) == num_pruned(0.45, 48)
        assert int(head_masks[2].sum()) == 1
        kept = torch.cat([torch.tensor(np.abs(h))[m] for h, m in zip(heads, head_masks)])
        assert kept.numel() == 48 - num_pruned(0.45, 48)


def test_ties_break_by_position_so_equal_coefficients_give_a_deterministic_mask():
    ones = [torch.ones(4) for _ in range(3)]
    config = EarlyBertConfig(head_prune_ratio=0.5, ffn_prune_ratio=0.5, head_mode="global", ffn_mode="global")
    head_masks, ffn_masks = compute_masks(ones, ones, config)
    # 6 of 12 heads, each layer's last head protected: the first 6 eligible in (layer, index) order go
    assert [m.tolist() for m in head_masks] == [[False] * 3 + [True], [False] * 3 + [True], [True] * 4]
    assert [m.tolist() for m in ffn_masks] == [[False] * 4, [False, False, True, True], [True] * 4]


# --- early-bird detector ---------------------------------------------------------------------------------------

def set_head_coefficients(model: torch.nn.Module, values: list[list[float]]) -> None:
    with torch.no_grad():
        for layer, row in zip(slimming_layers(model), values):
            layer.head_coef.copy_(torch.tensor(row))


A = [[0.1, 1.0, 1.0, 1.0], [1.0, 0.1, 1.0, 1.0], [1.0, 1.0, 0.1, 1.0]]
B = [[1.0, 0.1, 1.0, 1.0], [1.0, 0.1, 1.0, 1.0], [1.0, 1.0, 0.1, 1.0]]  # layer 0 prunes another head than in A


def detector_model() -> torch.nn.Module:
    model = slim_model()
    with torch.no_grad():
        for layer in slimming_layers(model):  # distinct FFN magnitudes: FFN masks stay fixed
            layer.ffn_coef.copy_(torch.linspace(0.1, 1.0, layer.ffn_coef.numel()))
    return model


def mask_size(model) -> int:
    return sum(layer.head_coef.numel() + layer.ffn_coef.numel() for layer in slimming_layers(model))


def test_detector_fires_on_a_converged_sequence_only_when_the_window_is_full():
    bird = EarlyBird(EarlyBertConfig(check_every=10, window=3, epsilon=0.01, head_prune_ratio=0.25))
    model = detector_model()
    set_head_coefficients(model, A)
    assert bird.observe(5, model) is None  # not a check step
    assert bird.observe(10, model) is None and not bird.should_draw(10)
    assert bird.observe(20, model) is None and not bird.should_draw(20)
    assert bird.observe(20, model) is None and len(bird.masks) == 2  # the same step is recorded once
    assert bird.observe(30, model) == 0.0
    assert bird.should_draw(30) and bird.should_draw(31)


def test_detector_does_not_fire_on_a_changing_sequence_and_window_limits_memory():
    model = detector_model()
    one_head = 2 / mask_size(model)  # moving one pruned head flips two entries
    bird = EarlyBird(EarlyBertConfig(check_every=1, window=3, epsilon=one_head / 2, head_prune_ratio=0.25))
    for step, coefs in enumerate([A, B, A, B, A], start=1):
        set_head_coefficients(model, coefs)
        distance = bird.observe(step, model)
        assert not bird.should_draw(step)
    assert distance == pytest.approx(one_head)
    for step, coefs in enumerate([B, B], start=6):  # window [A, B, B]: A is still in it
        set_head_coefficients(model, coefs)
        assert bird.observe(step, model) == pytest.approx(one_head) and not bird.should_draw(step)
    set_head_coefficients(model, B)
    assert bird.observe(8, model) == 0.0 and bird.should_draw(8)  # A left the window of 3

    loose = EarlyBird(EarlyBertConfig(check_every=1, window=2, epsilon=one_head, head_prune_ratio=0.25))
    for step, coefs in enumerate([A, B], start=1):
        set_head_coefficients(model, coefs)
        loose.observe(step, model)
    assert loose.last_distance == pytest.approx(one_head) and loose.should_draw(2)  # distance <= epsilon


def test_draw_at_step_and_max_search_steps():
    model = detector_model()
    fixed = EarlyBird(EarlyBertConfig(check_every=1, window=2, draw_at_step=5, head_prune_ratio=0.25))
    for step in range(1, 5):
        fixed.observe(step, model)
        assert fixed.converged == (step >= 2) and not fixed.should_draw(step)  # the fixed step decides
    assert fixed.should_draw(5) and fixed.should_draw(6)

    capped = EarlyBird(EarlyBertConfig(check_every=1, window=2, epsilon=1e-9, max_search_steps=4,
                                       head_prune_ratio=0.25))
    for step, coefs in enumerate([A, B, A], start=1):
        set_head_coefficients(model, coefs)
        capped.observe(step, model)
        assert not capped.should_draw(step)
    assert capped.should_draw(4)
    ticket = capped.draw(4, model)
    assert capped.drawn and not capped.should_draw(5)
    assert ticket.heads[0] == [1, 2, 3]  # A's layer 0 prunes head 0


def test_detector_state_round_trip_continues_the_search():
    model = detector_model()
    config = EarlyBertConfig(check_every=2, window=3, epsilon=0.001, head_prune_ratio=0.25)
    bird = EarlyBird(config)
    sequence = [A, B, B, A, A, A]
    for step, coefs in zip(range(2, 8, 2), sequence):
        set_head_coefficients(model, coefs)
        bird.observe(step, model)
    buffer = io.BytesIO()
    torch.save(bird.state_dict(), buffer)
    buffer.seek(0)
    resumed = EarlyBird(config)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.last_step == 6 and resumed.last_distance == bird.last_distance
    for step, coefs in zip(range(8, 14, 2), sequence[3:]):
        set_head_coefficients(model, coefs)
        assert resumed.observe(step, model) == bird.observe(step, model)
        assert resumed.should_draw(step) == bird.should_draw(step)
    assert resumed.should_draw(12)
    bird.draw(12, model)
    again = EarlyBird(config)
    again.load_state_dict(bird.state_dict())
    assert again.drawn_step == 12 and again.drawn_ticket == bird.drawn_ticket and not again.should_draw(14)


def search_steps(engine, bird: EarlyBird, steps: int) -> None:
    """The search as the training loop runs it: the penalty in the loss, observe after each optimizer step."""
    for _ in range(steps):
        ids, labels = batch(engine.global_steps)
        loss = engine(ids, labels=labels).loss + bird.penalty(engine.module)
        engine.backward(loss)
        engine.step()
        bird.observe(engine.global_steps, engine.module)


def engine_config(**extra) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.05}}, **extra}


@pytest.mark.slow
def test_detector_state_travels_in_engine_checkpoints_and_reads_fp32_masters(single_rank_world, tmp_path):
    """bf16 + ZeRO-1: the module holds bf16 coefficients, the detector ranks the optimizer's fp32 masters."""
    config = engine_config(bf16={"enabled": True}, zero_optimization={"stage": 1})
    eb_config = EarlyBertConfig(check_every=1, window=2, lambda_head=1.0, lambda_ffn=1.0)
    engine, *_ = ds_pld.initialize(model=slim_model().train(), config=config)
    bird = EarlyBird(eb_config)
    ds_pld.plugin_of(engine).extra_state["earlybert"] = bird
    search_steps(engine, bird, 3)
    assert bird.last_distance is not None and len(bird.masks) == 2
    heads, ffn = read_coefficients(engine.module)
    layers = slimming_layers(engine.module)
    assert layers[0].ffn_coef.dtype == torch.bfloat16 and float(heads[0].mean()) < 0.9  # the L1 term shrank them
    module_values = torch.cat([layer.ffn_coef.detach().float() for layer in layers])
    assert not torch.equal(torch.cat(ffn), module_values)
    torch.testing.assert_close(torch.cat(ffn), module_values, atol=1e-2, rtol=0)
    ds_pld.save_checkpoint(engine, tmp_path)

    engine2, *_ = ds_pld.initialize(model=slim_model().train(), config=config)
    resumed = EarlyBird(eb_config)
    ds_pld.plugin_of(engine2).extra_state["earlybert"] = resumed
    ds_pld.load_checkpoint(engine2, tmp_path)
    assert resumed.last_step == 3 and resumed.last_distance == bird.last_distance
    assert all(torch.equal(a, b) for a, b in zip(resumed.masks, bird.masks))
    assert resumed.ticket(engine2.module) == bird.ticket(engine.module)


@pytest.mark.slow
def test_search_under_zero3_matches_zero0(single_rank_world):
    """ZeRO-3 releases even persistent parameters after its first forward; the penalty must gather them back."""
    results = []
    for stage in (0, 3):
        engine, *_ = ds_pld.initialize(model=slim_model().train(),
                                       config=engine_config(zero_optimization={"stage": stage}))
        bird = EarlyBird(EarlyBertConfig(check_every=1, window=2, lambda_head=0.5, lambda_ffn=0.5))
        search_steps(engine, bird, 3)
        heads, ffn = read_coefficients(engine.module)
        results.append((torch.cat(heads), torch.cat(ffn), bird.last_distance, list(bird.masks)))
    (h0, f0, d0, m0), (h3, f3, d3, m3) = results
    assert float(h0.max()) < 0.9
    torch.testing.assert_close(h3, h0, atol=1e-5, rtol=0)
    torch.testing.assert_close(f3, f0, atol=1e-5, rtol=0)
    assert d3 == d0 and all(torch.equal(a, b) for a, b in zip(m0, m3))


# --- physical pruning -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_mode, ffn_mode", [("layerwise", "global"), ("global", "layerwise")])
def test_pruned_model_computes_the_masked_full_model_with_coefficients_folded(head_mode, ffn_mode):
    model = slim_model()
    randomize_coefficients(model, seed=3)
    config = EarlyBertConfig(head_prune_ratio=0.5, ffn_prune_ratio=0.4, head_mode=head_mode, ffn_mode=ffn_mode)
    ticket = EarlyBird(config).ticket(model)
    slim = prune_model(model, ticket)
    assert slim.config.slimming is False and slimming_layers(slim) == []
    assert slim.config.layer_heads == ticket.layer_heads and sum(ticket.layer_heads) == 6
    pruned_neurons = num_pruned(0.4, 3 * 512) if ffn_mode == "global" else 3 * num_pruned(0.4, 512)
    assert sum(ticket.layer_intermediate) == 3 * 512 - pruned_neurons
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    assert not slim.training
    masked = masked_copy(model, ticket)
    assert_same_outputs(masked, slim)
    # train mode with PLD (no dropout): the same seed drops the same layers in both
    assert_same_outputs(masked.train(), slim.train(), progressive_layer_drop=True, pld_theta=0.5, pld_seed=11)
    # the slim model does not share storage with the source
    with torch.no_grad():
        slim.embeddings.word.weight.zero_()
    assert model.embeddings.word.weight.abs().sum() > 0


def test_rewinding_takes_the_weights_saved_before_the_search():
    model = slim_model()
    rewind = copy.deepcopy(model.state_dict())  # coefficients are 1.0 here
    with torch.no_grad():  # "search": weights and coefficients move
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    randomize_coefficients(model, seed=4)
    ticket = EarlyBird(EarlyBertConfig()).ticket(model)
    slim = prune_model(model, ticket, state_dict={f"module.{k}": v for k, v in rewind.items()})
    start = slim_model()
    start.load_state_dict(rewind)
    assert_same_outputs(masked_copy(start, ticket), slim)
    kept = ticket.heads[0]
    torch.testing.assert_close(slim.encoder.layers[0].qkv.weight.view(3, len(kept), 32, 128),
                               rewind["encoder.layers.0.qkv.weight"].view(3, 4, 32, 128)[:, kept])


def test_prune_layer_state_slices_the_fused_qkv_layout():
    head_dim, hidden = 2, 3
    state = {"qkv.weight": torch.arange(3 * 4 * head_dim * hidden, dtype=torch.float).view(-1, hidden),
             "qkv.bias": torch.arange(3 * 4 * head_dim, dtype=torch.float),
             "attn_out.weight": torch.arange(hidden * 4 * head_dim, dtype=torch.float).view(hidden, -1),
             "ffn_in.weight": torch.arange(5 * hidden, dtype=torch.float).view(5, hidden),
             "ffn_in.bias": torch.arange(5, dtype=torch.float),
             "ffn_out.weight": torch.arange(hidden * 5, dtype=torch.float).view(hidden, 5),
             "head_coef": torch.tensor([1.0, 2.0, 3.0, 4.0]), "ffn_coef": torch.tensor([1.0, 10.0, 1.0, 1.0, 0.5]),
             **{k: torch.ones(hidden) for k in ("attn_norm.weight", "attn_norm.bias", "attn_out.bias",
                                                "ffn_norm.weight", "ffn_norm.bias", "ffn_out.bias")}}
    out = prune_layer_state(state, heads=[3, 1], neurons=[4, 1], head_dim=head_dim)
    assert "head_coef" not in out and "ffn_coef" not in out
    rows = [p * 8 + h * 2 + d for p in range(3) for h in (1, 3) for d in range(2)]  # q, k, v blocks of heads 1, 3
    torch.testing.assert_close(out["qkv.bias"], torch.tensor(rows, dtype=torch.float))
    torch.testing.assert_close(out["qkv.weight"], state["qkv.weight"][rows])
    cols = state["attn_out.weight"][:, [2, 3, 6, 7]] * torch.tensor([2.0, 2.0, 4.0, 4.0])
    torch.testing.assert_close(out["attn_out.weight"], cols)
    torch.testing.assert_close(out["ffn_in.bias"], torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(out["ffn_out.weight"], state["ffn_out.weight"][:, [1, 4]] * torch.tensor([10.0, 0.5]))
    unfolded = prune_layer_state(state, heads=[3, 1], neurons=[4, 1], head_dim=head_dim, fold=False)
    torch.testing.assert_close(unfolded["ffn_out.weight"], state["ffn_out.weight"][:, [1, 4]])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the emptied FFN's Linear(128, 0)
def test_global_ffn_pruning_may_empty_a_layer():
    model = slim_model()
    randomize_coefficients(model, seed=5)
    with torch.no_grad():
        model.encoder.layers[1].ffn_coef.mul_(1e-3)
    ticket = EarlyBird(EarlyBertConfig(ffn_prune_ratio=0.4, head_prune_ratio=0.25)).ticket(model)
    assert ticket.layer_intermediate[1] == 0
    slim = prune_model(model, ticket)
    assert_same_outputs(masked_copy(model, ticket), slim)


def test_pruned_model_save_load_round_trip(tmp_path):
    model = slim_model()
    randomize_coefficients(model, seed=6)
    ticket = EarlyBird(EarlyBertConfig(head_mode="global")).ticket(model)
    slim = prune_model(model, ticket)
    loaded = load_pretrained(save_pretrained(slim, tmp_path / "slim")).eval()
    assert loaded.config == slim.config and loaded.config.layer_heads == ticket.layer_heads
    assert_same_outputs(slim, loaded)


def test_ticket_dict_round_trip_and_fractions():
    model = slim_model()
    randomize_coefficients(model, seed=7)
    ticket = EarlyBird(EarlyBertConfig(head_prune_ratio=0.5)).ticket(model)
    again = Ticket.from_dict(ticket.to_dict())
    assert again == ticket
    assert ticket.head_pruned_fraction() == pytest.approx(0.5)
    assert ticket.neuron_pruned_fraction() == pytest.approx(num_pruned(0.4, 1536) / 1536)
    summary = ticket.summary()
    assert summary["earlybert_kept_heads"] == [2, 2, 2] and sum(summary["earlybert_kept_neurons"]) == 1536 - 614
    with pytest.raises(ValueError, match="full_heads"):
        Ticket(ticket.heads, ticket.neurons).head_pruned_fraction()
    with pytest.raises(ValueError, match="distinct"):
        Ticket([[0, 0]], [[1]])
    with pytest.raises(ValueError, match="layers"):
        prune_model(model, Ticket(ticket.heads[:2], ticket.neurons[:2]))


# --- config checks ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block, key", [
    ({"head_prune_ratio": 1.0}, "earlybert.head_prune_ratio"),
    ({"head_prune_ratio": -0.1}, "earlybert.head_prune_ratio"),
    ({"ffn_prune_ratio": 1.0}, "earlybert.ffn_prune_ratio"),
    ({"epsilon": 0.0}, "earlybert.epsilon"),
    ({"epsilon": -0.5}, "earlybert.epsilon"),
    ({"window": 1}, "earlybert.window"),
    ({"check_every": 0}, "earlybert.check_every"),
    ({"head_mode": "per-layer"}, "earlybert.head_mode"),
    ({"lambda_ffn": -1e-4}, "earlybert.lambda_ffn"),
    ({"draw_at_step": 0}, "earlybert.draw_at_step"),
    ({"windows": 3}, "windows"),
])
def test_bad_earlybert_values_name_the_key(block, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        EarlyBertConfig.from_dict(block)


def test_ratio_that_prunes_every_head_of_a_layer_fails_before_training():
    bert = build_bert_config("bert-tiny", vocab_size=VOCAB, num_layers=3, slimming=True)  # 2 heads per layer
    config = EarlyBertConfig.from_dict({"head_prune_ratio": 0.75})  # round-half-up(1.5) = 2 of 2 heads
    with pytest.raises(ConfigError, match=r"earlybert\.head_prune_ratio"):
        validate_for_model(config, bert)
    with pytest.raises(ConfigError, match=r"earlybert\.head_prune_ratio"):
        compute_masks([torch.rand(2)] * 3, [torch.rand(8)] * 3, config)
    validate_for_model(EarlyBertConfig.from_dict({"head_prune_ratio": 0.74}), bert)  # 1.48 -> 1 of 2
    validate_for_model(EarlyBertConfig.from_dict({"head_prune_ratio": 0.75, "head_mode": "global"}), bert)
    layerwise_ffn = EarlyBertConfig.from_dict({"ffn_prune_ratio": 0.9995, "ffn_mode": "layerwise"})
    with pytest.raises(ConfigError, match=r"earlybert\.ffn_prune_ratio"):
        validate_for_model(layerwise_ffn, bert)
    validate_for_model(EarlyBertConfig(), build_bert_config("bert-base"))  # the paper's setting: 4 of 12 heads


@pytest.mark.parametrize("name, pld", [("earlybert.json", False), ("pld_earlybert.json", True)])
def test_shipped_recipes_parse_and_fit_their_model(name, pld):
    parsed = parse_config(ROOT / "ds_configs" / name)
    assert parsed.earlybert is not None and parsed.pld.enabled is pld
    validate_for_model(parsed.earlybert, parsed.model)
    assert num_pruned(parsed.earlybert.head_prune_ratio, parsed.model.num_heads) == 4


@pytest.mark.slow
def test_adam_moments_carry_across_the_draw(single_rank_world):
    """The slim engine continues with the full model's moments, sliced like the weights (the folded attn_out /
    ffn_out columns divided by the coefficient, squared for the second moment) and Adam's step count kept."""
    from ds_pld.earlybert.prune import prune_adam_moments
    from ds_pld.optim.moments import full_precision_state, read_moments, write_moments

    config = engine_config()
    engine, *_ = ds_pld.initialize(model=slim_model().train(), config=config)
    bird = EarlyBird(EarlyBertConfig(check_every=1, window=2, lambda_head=1.0, lambda_ffn=1.0))
    search_steps(engine, bird, 3)
    moments, weights = read_moments(engine), full_precision_state(engine.module)
    ticket = bird.ticket(engine.module)
    slim = prune_model(engine.module, ticket, weights).float()
    slim_engine, *_ = ds_pld.initialize(model=slim, config=config)
    assert read_moments(slim_engine) is None, "a fresh optimizer has no moments yet"
    assert write_moments(slim_engine, prune_adam_moments(moments, weights, ticket, slim.config), engine.global_steps)
    carried = read_moments(slim_engine)
    assert set(carried) == {name for name, _ in slim_engine.module.named_parameters()}
    d, layer = slim.config.head_dim, "encoder.layers.0."
    for slot, head in enumerate(ticket.heads[0]):
        full, part = slice(head * d, (head + 1) * d), slice(slot * d, (slot + 1) * d)
        torch.testing.assert_close(carried[layer + "qkv.weight"]["exp_avg"][part],
                                   moments[layer + "qkv.weight"]["exp_avg"][full])
        coef = weights[layer + "head_coef"][head]
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            torch.testing.assert_close(carried[layer + "attn_out.weight"][key][:, part],
                                       moments[layer + "attn_out.weight"][key][:, full] / coef ** power)
    neurons = list(ticket.neurons[0])
    torch.testing.assert_close(carried[layer + "ffn_in.bias"]["exp_avg_sq"],
                               moments[layer + "ffn_in.bias"]["exp_avg_sq"][neurons])
    torch.testing.assert_close(carried["embeddings.word.weight"]["exp_avg"],
                               moments["embeddings.word.weight"]["exp_avg"])
    steps = {float(state["step"]) for state in slim_engine.optimizer.state.values()}
    assert steps == {float(engine.global_steps)}, "Adam's bias correction continues at the drawn step"
