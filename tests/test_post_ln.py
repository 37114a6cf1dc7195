"""Post-LN BERT (`model.layer_norm: "post"`), the baseline for a post-LN vs pre-LN + PLD study: the original BERT
layer against a hand-written reference, pre-LN unchanged by default, PLD refused (config, initialize, forward),
EarlyBERT slimming and pruning, save/load, and the Hugging Face export refused."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ds_pld
from ds_pld.config_errors import ConfigError
from ds_pld.earlybert import EarlyBird, prune_model, slimming_layers
from ds_pld.earlybert.config import EarlyBertConfig
from ds_pld.export.hf import export_hf, to_hf_model
from ds_pld.models import build_model
from ds_pld.models.bert import PostLNLayer, PreLNLayer
from ds_pld.models.config import BertConfig, build_bert_config
from ds_pld.models.io import load_pretrained, save_pretrained

VOCAB = 64
PLD = {"enabled": True, "theta": 0.5, "gamma": 0.1}


def tiny(layer_norm: str = "post", seed: int = 0, **overrides) -> torch.nn.Module:
    """3 layers, 4 heads of 32, no dropout (deterministic in train mode), torch kernels; LayerNorm weights, biases
    and slimming coefficients perturbed so that swapping or misplacing a norm changes the output."""
    torch.manual_seed(seed)
    fields = {"num_layers": 3, "num_heads": 4, "hidden_dropout": 0.0, "attention_dropout": 0.0, "kernels": "torch",
              "layer_norm": layer_norm, **overrides}
    model = build_model("bert-tiny", vocab_size=VOCAB, **fields)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("_coef") or name.endswith(".bias"):
                param.add_(torch.empty(param.shape).uniform_(-0.5, 0.5, generator=gen))
    return model


def batch(seed: int = 0, size: int = 2, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (size, seq), generator=gen)
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, -100)
    labels[:, 0] = ids[:, 0]
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # padding in the second sequence exercises the attention mask
    return ids, labels, mask


def reference_attention(layer: PreLNLayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention from the layer's weights with plain torch ops (no SDPA), output bias included."""
    b, s, _ = x.shape
    heads, d = layer.num_heads, layer.head_dim
    q, k, v = (x @ layer.qkv.weight.T + layer.qkv.bias).view(b, s, 3, heads, d).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
    context = scores.softmax(-1) @ v
    if layer.head_coef is not None:
        context = context * layer.head_coef.view(1, -1, 1, 1)
    return context.transpose(1, 2).reshape(b, s, heads * d) @ layer.attn_out.weight.T + layer.attn_out.bias


def reference_ffn(layer: PreLNLayer, x: torch.Tensor) -> torch.Tensor:
    h = F.gelu(x @ layer.ffn_in.weight.T + layer.ffn_in.bias)
    if layer.ffn_coef is not None:
        h = h * layer.ffn_coef
    return h @ layer.ffn_out.weight.T + layer.ffn_out.bias


def norm(module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def reference_encoder(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, order: str) -> torch.Tensor:
    """'post': the original BERT layer, x = LN1(x + Attn(x)), y = LN2(x + FFN(x)), no final norm.
    'pre': the same weights in the pre-LN order, with the final norm only if the model has one."""
    x = model.embeddings(ids, None)
    for layer in model.encoder.layers:
        if order == "post":
            x = norm(layer.attn_norm, x + reference_attention(layer, x, mask))
            x = norm(layer.ffn_norm, x + reference_ffn(layer, x))
        else:
            x = x + reference_attention(layer, norm(layer.attn_norm, x), mask)
            x = x + reference_ffn(layer, norm(layer.ffn_norm, x))
    final = model.encoder.final_norm
    return norm(final, x) if isinstance(final, torch.nn.LayerNorm) else x


# --- the layer --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slimming", [False, True])
def test_post_ln_forward_matches_the_original_bert_layer(slimming):
    model = tiny(slimming=slimming).double().train()
    ids, labels, mask = batch()
    assert all(type(layer) is PostLNLayer for layer in model.encoder.layers)
    assert isinstance(model.encoder.final_norm, torch.nn.Identity)
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.layers_run == 3
    with torch.no_grad():
        expected = reference_encoder(model, ids, mask, "post")
        wrong_order = reference_encoder(model, ids, mask, "pre")
    keep = mask.bool()
    torch.testing.assert_close(out.hidden_states.detach()[keep], expected[keep], atol=1e-6, rtol=0)
    # The reference discriminates: the pre-LN order on the same weights is far away.
    assert (wrong_order[keep] - expected[keep]).abs().max() > 1e-2
    # Eval mode (every layer, no dropout either way) computes the same.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).hidden_states[keep], expected[keep],
                                   atol=1e-6, rtol=0)


def test_pre_ln_stays_the_default_and_unchanged():
    assert BertConfig().layer_norm == "pre"
    assert build_bert_config("bert-tiny").layer_norm == "pre"
    assert ds_pld.parse_config({"train_batch_size": 2, "model": "bert-tiny"}).model.layer_norm == "pre"
    pre = tiny(layer_norm="pre").double().train()
    assert pre.config.layer_norm == "pre"
    assert all(type(layer) is PreLNLayer for layer in pre.encoder.layers)
    assert isinstance(pre.encoder.final_norm, torch.nn.LayerNorm)
    ids, labels, mask = batch()
    keep = mask.bool()
    with torch.no_grad():
        hidden = pre(ids, attention_mask=mask).hidden_states
        torch.testing.assert_close(hidden[keep], reference_encoder(pre, ids, mask, "pre")[keep], atol=1e-6, rtol=0)
    # State dict keys: post-LN has exactly the pre-LN keys minus the final norm (an Identity has no parameters).
    post_keys = set(tiny().state_dict())
    pre_keys = set(pre.state_dict())
    assert pre_keys - post_keys == {"encoder.final_norm.weight", "encoder.final_norm.bias"}
    assert post_keys < pre_keys


def test_activation_checkpointing_gives_the_same_post_ln_gradients():
    ids, labels, mask = batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny(gradient_checkpointing=checkpointing).train()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "encoder.layers.2.ffn_norm.weight" in grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


def test_save_and_load_keep_post_ln(tmp_path):
    model = tiny().eval()
    save_pretrained(model, tmp_path / "model")
    loaded = load_pretrained(tmp_path / "model").eval()
    assert loaded.config.layer_norm == "post"
    assert all(type(layer) is PostLNLayer for layer in loaded.encoder.layers)
    ids, _, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)


# --- PLD is refused -------------------------------------------------------------------------------------------

def test_pld_with_post_ln_is_refused_at_parse():
    config = {"train_batch_size": 2, "progressive_layer_drop": PLD, "model": {"preset": "bert-tiny",
                                                                               "layer_norm": "post"}}
    with pytest.raises(ConfigError, match="progressive_layer_drop") as err:
        ds_pld.parse_config(config)
    assert "model.layer_norm" in str(err.value) and "\n" not in str(err.value)
    # Either one alone is fine.
    assert ds_pld.parse_config({**config, "progressive_layer_drop": {"enabled": False}}).model.layer_norm == "post"
    assert ds_pld.parse_config({**config, "model": "bert-tiny"}).pld.enabled


def test_post_ln_model_refuses_to_drop_layers_in_its_forward():
    model = tiny().train()
    ids, labels, mask = batch()
    with pytest.raises(ConfigError, match="post-LN"):
        model(ids, attention_mask=mask, labels=labels, progressive_layer_drop=True, pld_theta=0.5, pld_seed=1)
    # In eval mode PLD's keywords are ignored (every layer runs), as for pre-LN.
    assert model.eval()(ids, progressive_layer_drop=True, pld_theta=0.5).layers_run == 3


def engine_config(pld: bool) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "progressive_layer_drop": PLD if pld else {"enabled": False}}


def test_initialize_refuses_pld_for_a_post_ln_model_built_directly(single_rank_world):
    with pytest.raises(ConfigError, match="post-LN") as err:
        ds_pld.initialize(model=tiny(), config=engine_config(pld=True))
    assert "model.layer_norm" in str(err.value) and "progressive_layer_drop" in str(err.value)
    # Without PLD the post-LN baseline trains through the engine.
    model = tiny()
    engine, *_ = ds_pld.initialize(model=model, config=engine_config(pld=False))
    assert ds_pld.plugin_of(engine).pld is None
    ids, labels, mask = batch()
    before = model.encoder.layers[0].attn_norm.weight.detach().clone()
    loss = engine(ids, attention_mask=mask, labels=labels).loss
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)
    assert not torch.equal(model.encoder.layers[0].attn_norm.weight, before)


# --- EarlyBERT ------------------------------------------------------------------------------------------------

def test_earlybert_slimming_trains_and_prunes_a_post_ln_model():
    model = tiny(slimming=True).train()
    layers = slimming_layers(model)
    assert len(layers) == 3 and all(type(layer) is PostLNLayer for layer in layers)
    bird = EarlyBird(EarlyBertConfig(lambda_head=0.3, lambda_ffn=0.02))
    ids, labels, mask = batch()
    (model(ids, attention_mask=mask, labels=labels).loss + bird.penalty(model)).backward()
    for layer in layers:
        assert layer.head_coef.grad is not None and layer.head_coef.grad.abs().sum() > 0
        assert layer.ffn_coef.grad is not None and layer.ffn_coef.grad.abs().sum() > 0
    # The coefficients act: zeroing one head's coefficient changes the output.
    model.eval()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).hidden_states
        off = copy.deepcopy(model)
        off.encoder.layers[1].head_coef[0] = 0.0
        assert (off(ids, attention_mask=mask).hidden_states - before).abs().max() > 1e-4
    # Pruning keeps post-LN and computes the full model with the pruned units switched off.
    ticket = EarlyBird(EarlyBertConfig(head_prune_ratio=0.5, ffn_prune_ratio=0.4)).ticket(model)
    slim = prune_model(model, ticket).eval()
    assert slim.config.layer_norm == "post" and all(type(layer) is PostLNLayer for layer in slim.encoder.layers)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads, ffn in zip(slimming_layers(masked), ticket.head_masks(), ticket.ffn_masks()):
            layer.head_coef[~heads] = 0.0
            layer.ffn_coef[~ffn] = 0.0
        torch.testing.assert_close(slim(ids, attention_mask=mask).logits, masked(ids, attention_mask=mask).logits,
                                   atol=2e-5, rtol=1e-5)


# --- config values and export ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["Post", "mid", True, None])
def test_bad_layer_norm_value_names_the_key(value):
    with pytest.raises(ConfigError, match=r"model\.layer_norm") as err:
        ds_pld.parse_config({"train_batch_size": 2, "model": {"preset": "bert-tiny", "layer_norm": value}})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.layer_norm"):
        build_model("bert-tiny", layer_norm=value)


def test_export_refuses_a_post_ln_model(tmp_path):
    model = tiny()
    with pytest.raises(ConfigError, match="post-LN.*not supported yet.*BertForMaskedLM"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(ConfigError, match="BertForMaskedLM"):
        to_hf_model(model)
    save_pretrained(model, tmp_path / "model")
    with pytest.raises(ConfigError, match="post-LN"):
        export_hf(tmp_path / "model", tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()
