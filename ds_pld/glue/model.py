"""Sequence classifier / regressor on the pre-LN encoder: hidden state at [CLS] -> dense + tanh -> dropout -> linear.

The pretrained `BertForPreTraining` is kept whole (its `encode` is the encoder; EarlyBERT's `prune_model` takes it as
is); its pretraining heads are frozen and unused. PLD's forward keywords are passed through to the encoder, so PLD runs
in fine-tuning only when the DeepSpeed config enables it."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ds_pld.config_errors import ConfigError
from ds_pld.earlybert import Ticket, prune_model
from ds_pld.models.bert import BertForPreTraining
from ds_pld.models.config import BertConfig
from ds_pld.models.io import load_pretrained

# Vocabulary tables are often padded to a multiple of these for fast matmuls; more rows than that is a mismatch.
_VOCAB_PADDING = (8, 64, 128)


@dataclass
class ClassifierOutput(ModelOutput):
    """A transformers ModelOutput (a dict), like PretrainingOutput: ZeRO-3 finds a module's output tensors by walking
    tuples and dicts to hook the backward, and a plain dataclass hides them."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class ClassificationHead(nn.Module):
    """Named like transformers' RoBERTa classification head (`dense`, `out_proj`) so its weights map one to one."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(cls_hidden))))


class SequenceClassifier(nn.Module):
    """GLUE model: `num_labels` = 1 is a regressor (MSE loss), otherwise a classifier (cross-entropy)."""

    def __init__(self, bert: BertForPreTraining, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.bert = bert
        for name, param in bert.named_parameters():
            if not name.startswith(("embeddings.", "encoder.")):
                param.requires_grad_(False)
        self.num_labels = num_labels
        self.classifier = ClassificationHead(bert.config.hidden_size, num_labels, dropout)
        std = bert.config.initializer_range
        for linear in (self.classifier.dense, self.classifier.out_proj):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    @property
    def config(self) -> BertConfig:
        return self.bert.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                progressive_layer_drop: bool = False, pld_theta: float = 1.0,
                pld_seed: int | None = None) -> ClassifierOutput:
        hidden, _ = self.bert.encode(input_ids, attention_mask, token_type_ids, progressive_layer_drop, pld_theta,
                                     pld_seed)
        logits = self.classifier(hidden[:, 0])
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.float().squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return ClassifierOutput(loss=loss, logits=logits)


def prune_classifier(model: SequenceClassifier, ticket: Ticket, state: Mapping[str, torch.Tensor]
                     ) -> SequenceClassifier:
    """EarlyBERT's draw for a classifier: the encoder keeps only the ticket's heads and neurons (weights from `state`,
    coefficients folded in), the head is kept whole, also from `state`."""
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}

    pruned = SequenceClassifier(prune_model(model.bert, ticket, part("bert.")), model.num_labels,
                                model.classifier.dropout.p)
    pruned.classifier.load_state_dict(part("classifier."))
    return pruned


def check_vocabulary(config: BertConfig, tokenizer: Any, where: str) -> None:
    """The tokenizer must be the model's: its ids must fit the embedding table, which may only be padded up to a
    round size, and its [PAD] must be the model's padding index."""
    size, rows = len(tokenizer), config.vocab_size
    padded = rows == size or (rows > size and any(rows == -(-size // m) * m for m in _VOCAB_PADDING))
    if not padded:
        raise ConfigError(f"{where}: the model's vocabulary has {rows} entries but the tokenizer has {size}; "
                          f"use the tokenizer the model was pretrained with")
    if tokenizer.pad_token_id != config.pad_token_id:
        raise ConfigError(f"{where}: the tokenizer's pad token id {tokenizer.pad_token_id} is not the model's "
                          f"'pad_token_id' {config.pad_token_id}")


def check_model_exists(path: str | Path) -> None:
    """A missing --model must be named as such, not reported as a missing tokenizer (looked up beside it)."""
    if not Path(path).exists():
        raise ConfigError(f"pretrained model folder '{path}' does not exist (--model)")


def load_encoder(path: str | Path, slimming: bool = False) -> BertForPreTraining:
    """A pretrained model from a model folder or a DeepSpeed checkpoint (EarlyBERT-pruned shapes included);
    `slimming` adds EarlyBERT coefficients (initialized to 1) for EarlyBERT fine-tuning."""
    check_model_exists(path)
    return load_pretrained(path, **({"slimming": True} if slimming else {}))



