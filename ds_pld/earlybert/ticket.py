"""The drawn ticket: which heads and FFN neurons each layer keeps. JSON-friendly, so it can go into checkpoint
metadata and logs."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ds_pld.config_errors import ConfigError


def _indices(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero().reshape(-1).tolist()]


@dataclass
class Ticket:
    """Kept head / neuron indices per layer (sorted, relative to the model the masks came from). `full_heads` and
    `full_neurons` record that model's widths, for pruned fractions; they are optional for hand-built tickets."""

    heads: list[list[int]]
    neurons: list[list[int]]
    full_heads: list[int] | None = None
    full_neurons: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.heads) != len(self.neurons):
            raise ValueError(f"ticket has {len(self.heads)} head lists but {len(self.neurons)} neuron lists")
        self.heads = [sorted(int(i) for i in layer) for layer in self.heads]
        self.neurons = [sorted(int(i) for i in layer) for layer in self.neurons]
        for kind, lists, full in (("head", self.heads, self.full_heads), ("neuron", self.neurons, self.full_neurons)):
            for layer, kept in enumerate(lists):
                if len(set(kept)) != len(kept) or any(i < 0 for i in kept):
                    raise ValueError(f"layer {layer}: {kind} indices must be distinct and >= 0, got {kept}")
                if full is not None and kept and kept[-1] >= full[layer]:
                    raise ValueError(f"layer {layer}: {kind} index {kept[-1]} out of range for width {full[layer]}")
            if full is not None and len(full) != len(lists):
                raise ValueError(f"ticket full {kind} widths {full} do not match its {len(lists)} layers")

    @classmethod
    def from_masks(cls, head_masks: Sequence[torch.Tensor], ffn_masks: Sequence[torch.Tensor]) -> Ticket:
        return cls(heads=[_indices(m) for m in head_masks], neurons=[_indices(m) for m in ffn_masks],
                   full_heads=[int(m.numel()) for m in head_masks], full_neurons=[int(m.numel()) for m in ffn_masks])

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def layer_heads(self) -> tuple[int, ...]:
        """Per-layer head counts: the pruned model's `BertConfig.layer_heads`."""
        return tuple(len(h) for h in self.heads)

    @property
    def layer_intermediate(self) -> tuple[int, ...]:
        """Per-layer FFN widths: the pruned model's `BertConfig.layer_intermediate`."""
        return tuple(len(n) for n in self.neurons)

    def head_masks(self, widths: Sequence[int] | None = None) -> list[torch.Tensor]:
        return self._masks(self.heads, widths or self.full_heads, "full_heads")

    def ffn_masks(self, widths: Sequence[int] | None = None) -> list[torch.Tensor]:
        return self._masks(self.neurons, widths or self.full_neurons, "full_neurons")

    @staticmethod
    def _masks(kept: list[list[int]], widths: Sequence[int] | None, name: str) -> list[torch.Tensor]:
        if widths is None:
            raise ValueError(f"the ticket does not record {name}; pass the layer widths")
        masks = []
        for layer, width in zip(kept, widths):
            mask = torch.zeros(int(width), dtype=torch.bool)
            mask[layer] = True
            masks.append(mask)
        return masks

    def head_pruned_fraction(self) -> float:
        """Fraction of all heads removed (needs `full_heads`)."""
        return self._fraction(self.layer_heads, self.full_heads, "full_heads")

    def neuron_pruned_fraction(self) -> float:
        """Fraction of all FFN neurons removed (needs `full_neurons`)."""
        return self._fraction(self.layer_intermediate, self.full_neurons, "full_neurons")

    @staticmethod
    def _fraction(kept: Sequence[int], full: Sequence[int] | None, name: str) -> float:
        if full is None:
            raise ValueError(f"the ticket does not record {name}")
        total = sum(full)
        return 1.0 - sum(kept) / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        """Scalars and per-layer counts for logs."""
        out: dict[str, Any] = {"earlybert_kept_heads": list(self.layer_heads),
                               "earlybert_kept_neurons": list(self.layer_intermediate)}
        if self.full_heads is not None:
            out["earlybert_head_pruned_fraction"] = round(self.head_pruned_fraction(), 6)
        if self.full_neurons is not None:
            out["earlybert_neuron_pruned_fraction"] = round(self.neuron_pruned_fraction(), 6)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "neurons": [list(n) for n in self.neurons],
                "full_heads": None if self.full_heads is None else list(self.full_heads),
                "full_neurons": None if self.full_neurons is None else list(self.full_neurons)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ticket:
        unknown = sorted(set(data) - {"heads", "neurons", "full_heads", "full_neurons"})
        missing = [k for k in ("heads", "neurons") if k not in data]
        if unknown or missing:
            raise ConfigError(f"not an EarlyBERT ticket: unknown keys {unknown}, missing keys {missing}")
        full_heads, full_neurons = data.get("full_heads"), data.get("full_neurons")
        return cls(heads=[list(h) for h in data["heads"]], neurons=[list(n) for n in data["neurons"]],
                   full_heads=None if full_heads is None else [int(w) for w in full_heads],
                   full_neurons=None if full_neurons is None else [int(w) for w in full_neurons])
