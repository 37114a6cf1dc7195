"""Structured masks from slimming coefficients: which heads and FFN neurons the ticket keeps.

Counting rule (all modes): a prune ratio r over n units prunes `num_pruned(r, n)` = round-half-up(r * n) units,
i.e. floor(r * n + 0.5) (with a 1e-9 tolerance so that e.g. 0.35 * 10 counts as 3.5 -> 4). Units are ranked by |c|
ascending with ties broken by position (lower layer, then lower index, is pruned first), so masks are deterministic
and identical on every rank.

- `layerwise`: each layer prunes `num_pruned(r, n_layer)` of its own units (its smallest |c|).
- `global`: one threshold over all layers: the `num_pruned(r, n_total)` smallest |c| of the whole model. For heads,
  each layer's largest-|c| head is exempt, so no layer loses every head; the count is capped at
  n_total - num_layers accordingly. Global FFN pruning may empty a layer's FFN (the layer keeps its attention and the
  FFN output bias).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ds_pld.config_errors import ConfigError
from ds_pld.earlybert.config import BLOCK, EarlyBertConfig
from ds_pld.models.config import BertConfig

Masks = list[torch.Tensor]


def num_pruned(ratio: float, total: int) -> int:
    """How many of `total` units a prune ratio removes: round half up (not Python's round-half-to-even)."""
    return math.floor(ratio * total + 0.5 + 1e-9)


def _magnitudes(coefs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [c.detach().float().abs().reshape(-1).cpu() for c in coefs]


def _layerwise(mags: list[torch.Tensor], ratio: float) -> Masks:
    masks = []
    for mag in mags:
        keep = torch.ones(mag.numel(), dtype=torch.bool)
        order = torch.sort(mag, stable=True).indices
        keep[order[:num_pruned(ratio, mag.numel())]] = False
        masks.append(keep)
    return masks


def _global(mags: list[torch.Tensor], ratio: float, keep_one_per_layer: bool) -> Masks:
    sizes = [m.numel() for m in mags]
    flat = torch.cat(mags) if mags else torch.zeros(0)
    count = num_pruned(ratio, flat.numel())
    eligible = torch.ones(flat.numel(), dtype=torch.bool)
    if keep_one_per_layer:
        offset = 0
        for mag in mags:
            if mag.numel():
                # The last in stable ascending order is the layer's largest |c| (the later index on ties).
                eligible[offset + int(torch.sort(mag, stable=True).indices[-1])] = False
            offset += mag.numel()
        count = min(count, int(eligible.sum()))
    order = torch.sort(flat, stable=True).indices
    order = order[eligible[order]]
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:count]] = False
    return list(keep.split(sizes))


def unit_masks(coefs: Sequence[torch.Tensor], ratio: float, mode: str, keep_one_per_layer: bool = False) -> Masks:
    """Keep-masks (True = kept) for one kind of unit, from |coefficients|, by `mode` ('layerwise' or 'global')."""
    mags = _magnitudes(coefs)
    if mode == "layerwise":
        return _layerwise(mags, ratio)
    if mode == "global":
        return _global(mags, ratio, keep_one_per_layer)
    raise ConfigError(f"EarlyBERT mask mode {mode!r} must be 'layerwise' or 'global'")


def compute_masks(head_coefs: Sequence[torch.Tensor], ffn_coefs: Sequence[torch.Tensor],
                  config: EarlyBertConfig) -> tuple[Masks, Masks]:
    """(head keep-masks, FFN keep-masks), one bool CPU tensor per layer. A pure function of |coefficients|."""
    heads = unit_masks(head_coefs, config.head_prune_ratio, config.head_mode, keep_one_per_layer=True)
    if any(not bool(m.any()) for m in heads):
        raise ConfigError(f"'{BLOCK}.head_prune_ratio' = {config.head_prune_ratio} prunes every head of a layer "
                          f"(mode {config.head_mode!r})")
    return heads, unit_masks(ffn_coefs, config.ffn_prune_ratio, config.ffn_mode)


def flatten_masks(head_masks: Masks, ffn_masks: Masks) -> torch.Tensor:
    """All keep decisions as one bool vector (heads of every layer, then neurons), for Hamming distances."""
    return torch.cat([*head_masks, *ffn_masks]) if head_masks or ffn_masks else torch.zeros(0, dtype=torch.bool)


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalized Hamming distance: the fraction of entries where two masks differ."""
    if a.shape != b.shape:
        raise ValueError(f"masks of different sizes {tuple(a.shape)} and {tuple(b.shape)}")
    # Exact count / size in double precision, so a distance can be compared with epsilon without float32 rounding.
    return int((a != b).sum()) / a.numel() if a.numel() else 0.0


def validate_for_model(config: EarlyBertConfig, bert_config: BertConfig) -> None:
    """Fail before training when the ratios cannot be applied to this model's widths: a layerwise ratio that would
    prune every head (or every FFN neuron) of a layer."""
    for layer in range(bert_config.num_layers):
        checks = (("head_prune_ratio", config.head_prune_ratio, config.head_mode, bert_config.heads(layer), "heads"),
                  ("ffn_prune_ratio", config.ffn_prune_ratio, config.ffn_mode, bert_config.intermediate(layer),
                   "FFN neurons"))
        for key, ratio, mode, width, what in checks:
            if mode == "layerwise" and width and num_pruned(ratio, width) >= width:
                raise ConfigError(f"'{BLOCK}.{key}' = {ratio} would prune all {width} {what} of layer {layer} "
                                  f"(round-half-up({ratio} * {width}) = {num_pruned(ratio, width)}); "
                                  f"lower it below {(width - 0.5) / width:.4g}")
