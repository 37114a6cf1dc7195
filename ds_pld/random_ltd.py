"""Random layerwise token dropping (random-LTD; Yao et al. 2022): the middle layers each process a random subset
of the tokens; the others pass by unchanged, and the first and last layers see every token.

This module is the model side: which tokens each dropping layer keeps, and the gather/scatter around a layer.
The schedule (how many tokens are kept at each step) is DeepSpeed's own `RandomLTDScheduler`, which the engine
builds from its `data_efficiency.data_routing.random_ltd` block and advances in every training forward;
`ds_pld.algorithms.random_ltd` passes its current value to the model.

The token choice is DeepSpeed's `bert_sample_tokens`: one uniform draw without replacement per dropping layer and
sequence (`torch.multinomial` on the device's default generator), sorted. DeepSpeed sorts with a CUDA op and wraps
the layer in a module that reads its own keywords; here the sort is `torch.sort` and the gather is `torch.gather`,
so the same random state gives the same tokens on any device, and the state-dict keys stay those of the model.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from ds_pld.config_errors import Bool, ConfigError, Int, Str, config_block, parse_block

RANDOM_LTD_KEY = "data_efficiency.data_routing.random_ltd"
Positive = Annotated[Int, Field(gt=0)]


@config_block
class RandomLTDStepConfig:
    """`random_ltd_schedule.schedule_config`: the kept length grows linearly to `max_value` over `require_steps`
    optimizer steps, in multiples of `seq_per_step`."""

    require_steps: Positive
    seq_per_step: Positive


@config_block
class RandomLTDScheduleConfig:
    min_value: Positive
    max_value: Positive
    schedule_config: RandomLTDStepConfig
    schedule_type: Literal["fixed_linear"] = "fixed_linear"


@config_block
class LayerTokenLRConfig:
    enabled: Literal[False] = False  # DeepSpeed raises NotImplementedError for true


@config_block
class RandomLTDConfig:
    """DeepSpeed's `data_efficiency.data_routing.random_ltd` block, checked once: the keys and meaning are
    DeepSpeed's (its engine builds the scheduler from the same block); `model_mask_name` and `hidden_state_order`
    are read by DeepSpeed's layer wrapper only, which ds_pld does not use, and are accepted as DeepSpeed's examples
    write them."""

    total_layer_num: Positive
    random_ltd_layer_num: Positive
    random_ltd_layer_id: tuple[Int, ...]
    random_ltd_schedule: RandomLTDScheduleConfig
    enabled: Bool = True
    model_type: Literal["encoder"] = "encoder"
    model_mask_name: Str | None = None
    hidden_state_order: Literal["batch_seq_dim", "seq_batch_dim"] = "batch_seq_dim"
    layer_token_lr_schedule: LayerTokenLRConfig = Field(default_factory=LayerTokenLRConfig)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.random_ltd_layer_id))

    def check_model(self, num_layers: int) -> None:
        """Refuse a block that does not fit a model of `num_layers` layers, naming the key."""
        if self.total_layer_num != num_layers:
            raise ConfigError(f"'{RANDOM_LTD_KEY}.total_layer_num' = {self.total_layer_num} but the model has "
                              f"{num_layers} layers")
        check_token_drop_layers(self.random_ltd_layer_id, num_layers)

    @classmethod
    def from_deepspeed(cls, deepspeed: Mapping[str, Any]) -> RandomLTDConfig | None:
        """The enabled random-LTD block of a DeepSpeed config dict, or None when it is absent or off."""
        efficiency = deepspeed.get("data_efficiency") or {}
        routing = efficiency.get("data_routing") or {} if isinstance(efficiency, Mapping) else {}
        block = routing.get("random_ltd") if isinstance(routing, Mapping) else None
        if not isinstance(block, Mapping) or block.get("enabled") is not True:
            return None
        for key, owner in (("data_efficiency.enabled", efficiency), ("data_efficiency.data_routing.enabled", routing)):
            if owner.get("enabled") is not True:
                raise ConfigError(f"'{RANDOM_LTD_KEY}.enabled' is true but '{key}' is not: set both (DeepSpeed "
                                  "reads only the first, so the block would say off and run on)")
        parsed = parse_block(cls, block, RANDOM_LTD_KEY)
        schedule = parsed.random_ltd_schedule
        if parsed.random_ltd_layer_num != len(parsed.random_ltd_layer_id):
            raise ConfigError(f"'{RANDOM_LTD_KEY}.random_ltd_layer_num' = {parsed.random_ltd_layer_num} but "
                              f"'random_ltd_layer_id' lists {len(parsed.random_ltd_layer_id)} layers")
        if schedule.min_value > schedule.max_value:
            raise ConfigError(f"'{RANDOM_LTD_KEY}.random_ltd_schedule.min_value' = {schedule.min_value} is above "
                              f"'max_value' = {schedule.max_value}")
        check_token_drop_layers(parsed.random_ltd_layer_id, parsed.total_layer_num)
        return parsed


@dataclass(frozen=True)
class TokenDrop:
    """One forward's random-LTD setting: each layer in `layers` keeps `keep` tokens of every sequence."""

    keep: int
    layers: tuple[int, ...]


def sample_token_indices(keep: int, seq_len: int, batch: int, layers: int, device: torch.device | str
                         ) -> torch.Tensor:
    """[layers, batch, keep] sorted token positions: a uniform choice without replacement per layer and sequence,
    drawn as DeepSpeed's `bert_sample_tokens` draws it (same random state, same tokens)."""
    weights = torch.ones((layers * batch, seq_len), device=device)
    chosen = torch.multinomial(weights, keep)
    return chosen.reshape(layers, batch, keep).sort(dim=-1).values


def gather_tokens(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [batch, seq, h] at positions index [batch, keep] -> [batch, keep, h]."""
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def scatter_tokens(hidden: torch.Tensor, part: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`hidden` with the rows at `index` replaced by `part` (out of place, so both get their gradients)."""
    return hidden.scatter(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), part)


def gather_key_mask(attn_mask: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """The key-padding mask [batch, 1, 1, seq] (or a full [batch, 1, seq, seq] one) of the kept tokens."""
    if attn_mask is None:
        return None
    batch = torch.arange(index.shape[0], device=index.device)[:, None]
    if attn_mask.shape[-2] == 1:
        return attn_mask[batch, :, :, index].permute(0, 2, 3, 1)
    rows = attn_mask[batch, :, index, :].permute(0, 2, 1, 3)  # [batch, 1, keep, seq]
    return rows[batch, :, :, index].permute(0, 2, 3, 1)


def on_kept_tokens(layer: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], hidden: torch.Tensor,
                   attn_mask: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
    """Run `layer(x, mask)` on the tokens at `index` only; every other token passes through unchanged."""
    part = layer(gather_tokens(hidden, index), gather_key_mask(attn_mask, index))
    return scatter_tokens(hidden, part, index)


def check_token_drop_layers(layers: tuple[int, ...], num_layers: int) -> None:
    """The paper's rule, and what the sampler needs: distinct middle layers (the first and last keep every token)."""
    bad = [i for i in layers if not 0 < i < num_layers - 1]
    if bad or len(set(layers)) != len(layers):
        raise ConfigError(f"'{RANDOM_LTD_KEY}.random_ltd_layer_id' = {list(layers)}: random-LTD drops tokens in "
                          f"distinct middle layers only (1 to {num_layers - 2} for {num_layers} layers); the first "
                          "and last layers keep every token")
