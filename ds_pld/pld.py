"""Progressive Layer Dropping (Zhang & He 2020): the temporal theta schedule and the per-layer keep rule.

theta(t) = (1 - theta_bar) * exp(-gamma * (t + start_step)) + theta_bar   (t = optimizer step)
p_l      = 1 - (l / L) * (1 - theta)                                       (l = 1..L)

`start_step` (default 0) continues the schedule of an earlier run: a phase 2 started from phase 1's weights with
`start_step` = phase 1's steps goes on at the theta where phase 1 ended instead of restarting at 1.

A layer l is kept with probability p_l and, when kept, its sub-layer outputs are scaled by 1/p_l so the expected
residual update equals the full model's. The decisions are drawn from a seed derived from
(seed, optimizer step, micro-step), so every data-parallel rank drops the same layers and a resumed run drops
exactly the layers the uninterrupted run would have dropped.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from ds_pld.config_errors import Bool, ConfigError, Float, Int, config_block, parse_block

BLOCK = "progressive_layer_drop"


@config_block
class PLDConfig:
    """The `progressive_layer_drop` config block (same keys and meaning as DeepSpeed <= 0.19.5, plus `seed`, and
    `start_step`: the schedule's step at this run's step 0, so that step t uses theta(t + start_step))."""

    enabled: Bool = False
    theta: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.5
    gamma: Annotated[Float, Field(ge=0.0)] = 0.001
    seed: Annotated[Int, Field(ge=0)] = 0
    start_step: Annotated[Int, Field(ge=0)] = 0

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> PLDConfig:
        """A present block is on unless it says `"enabled": false` (DeepSpeed's rule); when on, theta and gamma
        are required, since the paper's values are no safe default for another run length."""
        if block is None:
            return cls()
        parsed = parse_block(cls, {"enabled": True, **block} if isinstance(block, Mapping) else block, BLOCK)
        if not parsed.enabled:
            return cls()
        missing = [key for key in ("theta", "gamma") if key not in block]
        if missing:
            raise ConfigError(f"missing required key(s) {missing} in '{BLOCK}' (theta in (0, 1], gamma >= 0)")
        return parsed


def theta_at(step: int, theta_bar: float, gamma: float) -> float:
    """The PLD paper's temporal schedule: 1 at step 0, decaying to theta_bar."""
    return (1.0 - theta_bar) * math.exp(-gamma * step) + theta_bar


def keep_probabilities(theta: float, num_layers: int) -> list[float]:
    """The paper's depth schedule p_l = 1 - (l/L)(1 - theta), l = 1..L: deeper layers are dropped more often."""
    return [1.0 - (layer / num_layers) * (1.0 - theta) for layer in range(1, num_layers + 1)]


def expected_layers(theta: float, num_layers: int) -> float:
    """Expected number of layers that run in a training step (sum of p_l)."""
    return sum(keep_probabilities(theta, num_layers))


def drop_seed(seed: int, step: int, micro_step: int) -> int:
    """A 63-bit seed that depends only on (seed, optimizer step, micro-step): identical on every rank."""
    return int(np.random.SeedSequence([seed, step, micro_step]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def sample_keep_mask(theta: float, num_layers: int, seed: int | None) -> list[bool]:
    """Which layers run. Drawn on the CPU (no device sync); from `seed` when given, else torch's CPU generator."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    draws = torch.rand(num_layers, generator=generator, dtype=torch.float64).tolist()
    return [u < p for u, p in zip(draws, keep_probabilities(theta, num_layers))]


@dataclass(frozen=True)
class Draw:
    """One training forward's PLD decision: the step's theta and the seed its keep mask is drawn from."""

    theta: float
    seed: int

    def keep_mask(self, num_layers: int) -> list[bool]:
        return sample_keep_mask(self.theta, num_layers, self.seed)


class ProgressiveLayerDrop:
    """The one PLD driver: the schedule and the drop draws, for every place PLD runs (the DeepSpeed plugin's forward
    hook, the trainer, GLUE and the Hugging Face adapter). Pure bookkeeping, no torch module: a caller says which
    optimizer step its micro-batches belong to (`start_step`), then takes one `draw()` per training forward.

    Step s (0-based: the number of optimizer steps already taken) uses theta(s), so the first step runs every layer.
    DeepSpeed <= 0.19.5 updated theta after the step with the pre-increment counter, so its step s used theta(s - 1).
    `step_offset` (the config's `start_step`) shifts the schedule only: step s uses theta(s + step_offset), while the
    drop seeds and `global_step` stay the run's own steps. Keeps DeepSpeed's old contract too (`update_state`,
    `get_theta`, `get_state`)."""

    def __init__(self, theta: float = 0.5, gamma: float = 0.001, seed: int = 0, step_offset: int = 0):
        if not 0.0 < theta <= 1.0:
            raise ConfigError(f"'{BLOCK}.theta' = {theta} must be in (0, 1]")
        if not gamma >= 0.0:
            raise ConfigError(f"'{BLOCK}.gamma' = {gamma} must be >= 0")
        for key, value in (("seed", seed), ("start_step", step_offset)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"'{BLOCK}.{key}' = {value!r} must be an integer >= 0")
        self.theta_bar, self.gamma, self.seed, self.step_offset = float(theta), float(gamma), seed, step_offset
        self.global_step = 0
        self.micro_step = 0
        self._override: tuple[int, float] | None = None  # (step, theta) set by set_theta

    @classmethod
    def from_config(cls, config: PLDConfig) -> ProgressiveLayerDrop:
        if not config.enabled:
            raise ConfigError(f"'{BLOCK}' is disabled in this config; no PLD driver is made for it")
        return cls(theta=config.theta, gamma=config.gamma, seed=config.seed, step_offset=config.start_step)

    def theta_at(self, step: int) -> float:
        """Theta of optimizer step `step`: the schedule's (at step + step_offset), or the one `set_theta` gave that
        step."""
        if self._override is not None and self._override[0] == step:
            return self._override[1]
        return theta_at(step + self.step_offset, self.theta_bar, self.gamma)

    def start_step(self, step: int) -> None:
        """The micro-batches of optimizer step `step` follow; a new step's micro-steps count from 0 again (calling
        it again for the same step changes nothing, so a hook may call it before every forward)."""
        step = int(step)
        if step != self.global_step:
            self.global_step, self.micro_step = step, 0

    def restart_step(self) -> None:
        """Count the current step's micro-steps from 0 again (after a checkpoint load)."""
        self.micro_step = 0

    def draw(self) -> Draw:
        """The decision of the next training forward of the current step; the seed depends on (seed, step,
        micro-step) only, so every rank draws alike and a resumed run redraws what the uninterrupted run drew."""
        draw = Draw(self.theta_at(self.global_step), drop_seed(self.seed, self.global_step, self.micro_step))
        self.micro_step += 1
        return draw

    def set_theta(self, theta: float) -> None:
        """Override theta for the current optimizer step only, for a schedule driven by something other than the
        step count (a time-budgeted study plans theta by the share of its budget spent)."""
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"theta = {theta} must be in (0, 1]")
        self._override = (self.global_step, float(theta))

    def update_state(self, global_step: int) -> None:
        """DeepSpeed's old name for `start_step`."""
        self.start_step(global_step)

    def get_theta(self) -> float:
        return self.theta_at(self.global_step)

    def get_state(self) -> dict[str, Any]:
        """The keyword arguments a DeepSpeed <= 0.19.5 model expects in its forward."""
        return {"progressive_layer_drop": True, "pld_theta": self.get_theta()}

    def state_dict(self) -> dict[str, Any]:
        return {"theta_bar": self.theta_bar, "gamma": self.gamma, "seed": self.seed, "global_step": self.global_step,
                "step_offset": self.step_offset, "theta": self.get_theta()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The step resumes; the settings stay the config's (a resumed run may not change them silently)."""
        self.start_step(int(state["global_step"]))
        self.restart_step()
