"""BERT with switchable layers for Progressive Layer Dropping: pre-LN (the default), or post-LN as a baseline.

Layer l (1-based) in training with PLD:  h = x + G * Attn(LN(x)) / p_l,  y = h + G * FFN(LN(h)) / p_l,
G ~ Bernoulli(p_l). A dropped layer is skipped in Python: no forward, no backward. ZeRO-3 fetches each layer as one
unit (a ZeRO-3 leaf), so a dropped layer is not gathered either; unless `ds_pld.models.zero3.prepare_zero3_pld` made
the whole encoder the unit before the engine was built, which gathers dropped layers too but keeps ZeRO-3's prefetch
trace valid under PLD (issue 14). In eval mode every layer runs, unscaled. The forward accepts DeepSpeed's old PLD
keyword arguments (`progressive_layer_drop`, `pld_theta`) plus `pld_seed`, which makes the drop decisions reproducible.

With `layer_norm="post"` (`PostLNLayer`) each layer is the original BERT layer, h = LN1(x + Attn(x)),
y = LN2(h + FFN(h)), with the same parameter names (LN1 is `attn_norm`, LN2 `ffn_norm`) and no final encoder
LayerNorm. PLD's identity-able residual is pre-LN, so a post-LN model refuses to drop layers.

Random-LTD (`random_ltd=TokenDrop(keep, layers)`, ds_pld.random_ltd): in training, each listed layer runs on `keep`
random tokens of each sequence and the others pass it unchanged; the MLM head still sees every position. It
composes with PLD: a dropped layer drops all its tokens, a kept one may drop some.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from deepspeed.utils import set_z3_leaf_module
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from ds_pld.config_errors import ConfigError
from ds_pld.kernels import build_ops
from ds_pld.models.config import PLD_NEEDS_PRE_LN, BertConfig, build_bert_config
from ds_pld.pld import keep_probabilities, sample_keep_mask
from ds_pld.random_ltd import TokenDrop, check_token_drop_layers, on_kept_tokens, sample_token_indices

IGNORE_INDEX = -100


@dataclass
class PretrainingOutput(ModelOutput):
    """loss: MLM (+ NSP) loss; logits: MLM logits of the masked positions only (all positions when no labels);
    masked_labels: the labels of those positions, in the same order; layers_run: layers executed this pass.

    A transformers ModelOutput (a dict) rather than a plain dataclass: ZeRO-3 finds the output tensors of a module by
    walking tuples and dicts, and hooks the root module's backward through them; a plain dataclass hides them."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    masked_labels: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    layers_run: int | None = None


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)
        x = x + (self.token_type(token_type_ids) if token_type_ids is not None else self.token_type.weight[0])
        return self.dropout(self.norm(x))


class PreLNLayer(nn.Module):
    """One pre-LN transformer layer; `num_heads` and `intermediate` may be smaller than the config's after
    EarlyBERT. `PostLNLayer` reuses its parameters and attention."""

    def __init__(self, config: BertConfig, num_heads: int, intermediate: int, ops):
        super().__init__()
        hidden, self.head_dim = config.hidden_size, config.head_dim
        self.num_heads = num_heads
        self.ops = ops
        self.eps = config.layer_norm_eps
        self.hidden_dropout = config.hidden_dropout
        self.attention_dropout = config.attention_dropout
        self.attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(hidden, 3 * num_heads * self.head_dim)
        self.attn_out = nn.Linear(num_heads * self.head_dim, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.ffn_out = nn.Linear(intermediate, hidden)
        # EarlyBERT slimming coefficients: one per head (scales its context) and one per FFN neuron.
        self.head_coef = nn.Parameter(torch.ones(num_heads)) if config.slimming else None
        self.ffn_coef = nn.Parameter(torch.ones(intermediate)) if config.slimming else None
        # The forward reads its children's weights directly (the fused kernels take weights and biases apart), so
        # their own ZeRO-3 hooks never run: ZeRO-3 fetches all of the layer's parameters in the layer's hooks instead
        # of gathering each one on first access as an "external parameter" (issue 14). Only ZeRO-3 reads the flag.
        set_z3_leaf_module(self, True)

    def attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias).view(batch, seq, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.attention_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        if self.head_coef is not None:
            context = context * self.head_coef.to(context.dtype).view(1, -1, 1, 1)
        return context.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
        ops, training = self.ops, self.training
        h = ops.layer_norm(x, self.attn_norm.weight, self.attn_norm.bias, self.eps)
        h = F.linear(self.attention(h, attn_mask), self.attn_out.weight)
        x = ops.bias_dropout_residual(h, self.attn_out.bias, x, self.hidden_dropout, scale, training)
        h = self.ffn(ops.layer_norm(x, self.ffn_norm.weight, self.ffn_norm.bias, self.eps))
        return ops.bias_dropout_residual(h, self.ffn_out.bias, x, self.hidden_dropout, scale, training)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """FFN(x) before its output bias (which the fused residual op adds)."""
        h = self.ops.bias_gelu(F.linear(x, self.ffn_in.weight), self.ffn_in.bias)
        if self.ffn_coef is not None:
            h = h * self.ffn_coef.to(h.dtype)
        return F.linear(h, self.ffn_out.weight)


class PostLNLayer(PreLNLayer):
    """The original BERT layer: h = LN1(x + dropout(Attn(x))), y = LN2(h + dropout(FFN(h))). Same parameters,
    attention and slimming coefficients as `PreLNLayer` (LN1 is `attn_norm`, LN2 `ffn_norm`). The LayerNorm sits on
    the residual stream, so the layer is never skipped or scaled (`scale` must be 1)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
        if scale != 1.0:
            raise ConfigError(f"a post-LN layer cannot be scaled for PLD (scale = {scale}): {PLD_NEEDS_PRE_LN}")
        ops, training = self.ops, self.training
        h = F.linear(self.attention(x, attn_mask), self.attn_out.weight)
        x = ops.bias_dropout_residual(h, self.attn_out.bias, x, self.hidden_dropout, 1.0, training)
        x = ops.layer_norm(x, self.attn_norm.weight, self.attn_norm.bias, self.eps)
        y = ops.bias_dropout_residual(self.ffn(x), self.ffn_out.bias, x, self.hidden_dropout, 1.0, training)
        return ops.layer_norm(y, self.ffn_norm.weight, self.ffn_norm.bias, self.eps)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        ops = build_ops(config.kernels)
        self.config = config
        self.post_ln = config.layer_norm == "post"
        layer = PostLNLayer if self.post_ln else PreLNLayer
        self.layers = nn.ModuleList(
            layer(config, config.heads(i), config.intermediate(i), ops) for i in range(config.num_layers))
        # Post-LN layers end in a LayerNorm already; the identity has no parameters, so pre-LN keys are unchanged.
        self.final_norm = nn.Identity() if self.post_ln else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, progressive_layer_drop: bool,
                pld_theta: float, pld_seed: int | None, random_ltd: TokenDrop | None = None
                ) -> tuple[torch.Tensor, int]:
        num_layers = len(self.layers)
        use_pld = self.training and progressive_layer_drop
        if use_pld and self.post_ln:
            raise ConfigError(f"asked to drop layers (progressive_layer_drop=True) of a post-LN model: "
                              f"{PLD_NEEDS_PRE_LN}")
        keep = sample_keep_mask(pld_theta, num_layers, pld_seed) if use_pld else [True] * num_layers
        scales = [1.0 / p for p in keep_probabilities(pld_theta, num_layers)] if use_pld else [1.0] * num_layers
        tokens = self._kept_tokens(x, random_ltd) if self.training else {}
        recompute = self.training and self.config.gradient_checkpointing and torch.is_grad_enabled()
        for i, (layer, kept, scale) in enumerate(zip(self.layers, keep, scales)):
            if not kept:  # PLD: a dropped layer drops every token
                continue
            # The keep decisions are made outside the checkpointed region, so recomputation runs the same work.
            run = partial(checkpoint, layer, use_reentrant=False) if recompute else layer
            run = partial(run, scale=scale)
            x = on_kept_tokens(run, x, attn_mask, tokens[i]) if i in tokens else run(x, attn_mask)
        return self.final_norm(x), sum(keep)

    def _kept_tokens(self, x: torch.Tensor, random_ltd: TokenDrop | None) -> dict[int, torch.Tensor]:
        """Random-LTD: layer index -> [batch, keep] positions it runs on, drawn for every dropping layer at once
        (as DeepSpeed draws them, whether or not PLD then drops the layer); {} when every token runs."""
        if random_ltd is None or random_ltd.keep >= x.shape[1]:
            return {}
        check_token_drop_layers(random_ltd.layers, len(self.layers))
        index = sample_token_indices(random_ltd.keep, x.shape[1], x.shape[0], len(random_ltd.layers), x.device)
        return dict(zip(random_ltd.layers, index))


class MLMHead(nn.Module):
    """Transform + decoder tied to the word embeddings; applied only to the positions it is given."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), decoder_weight, self.bias)


class BertForPreTraining(nn.Module):
    """BERT (pre-LN, or post-LN with `layer_norm="post"`) with an MLM head (and an optional next-sentence /
    sentence-order head)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.mlm = MLMHead(config)
        if config.next_sentence_head:
            self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
            self.nsp = nn.Linear(config.hidden_size, 2)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, progressive_layer_drop: bool = False,
               pld_theta: float = 1.0, pld_seed: int | None = None, random_ltd: TokenDrop | None = None
               ) -> tuple[torch.Tensor, int]:
        """Final hidden states [batch, seq, hidden] and the number of layers that ran."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds 'model.max_position_embeddings' = "
                             f"{self.config.max_position_embeddings}")
        attn_mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        x = self.embeddings(input_ids, token_type_ids)
        return self.encoder(x, attn_mask, progressive_layer_drop, pld_theta, pld_seed, random_ltd)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                next_sentence_label: torch.Tensor | None = None, progressive_layer_drop: bool = False,
                pld_theta: float = 1.0, pld_seed: int | None = None, random_ltd: TokenDrop | None = None
                ) -> PretrainingOutput:
        hidden, layers_run = self.encode(input_ids, attention_mask, token_type_ids, progressive_layer_drop,
                                         pld_theta, pld_seed, random_ltd)
        decoder = self.embeddings.word.weight
        if labels is None:
            return PretrainingOutput(logits=self.mlm(hidden, decoder), nsp_logits=self._nsp_logits(hidden),
                                     hidden_states=hidden, layers_run=layers_run)
        flat_labels = labels.reshape(-1)
        positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
        masked_labels = flat_labels.index_select(0, positions)
        logits = self.mlm(hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions), decoder)
        loss = F.cross_entropy(logits.float(), masked_labels) if positions.numel() else logits.sum() * 0.0
        nsp_logits = self._nsp_logits(hidden)
        if nsp_logits is not None and next_sentence_label is not None:
            loss = loss + F.cross_entropy(nsp_logits.float(), next_sentence_label.reshape(-1))
        return PretrainingOutput(loss=loss, logits=logits, masked_labels=masked_labels, nsp_logits=nsp_logits,
                                 hidden_states=hidden, layers_run=layers_run)

    def _nsp_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if not self.config.next_sentence_head:
            return None
        return self.nsp(torch.tanh(self.pooler(hidden[:, 0])))


def build_model(spec: str | dict | BertConfig, **overrides) -> BertForPreTraining:
    """The pretraining model from a preset name, a `model` config dict or a BertConfig."""
    return BertForPreTraining(build_bert_config(spec, **overrides))
