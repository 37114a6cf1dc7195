"""Progressive Layer Dropping inside Hugging Face `Trainer`, for transformers' pre-LN encoder
(`RobertaPreLayerNormForMaskedLM`, the model `ds_pld.export.hf` writes, and its other heads).

The Trainer builds its own optimizer and, with `TrainingArguments(deepspeed=...)`, its own DeepSpeed engine, so
`ds_pld.initialize` never runs there. Two small pieces take its place:

* `PLDAdapter` puts PLD's keep/scale rule into the model, as `ds_pld.models.bert` applies it: in a training forward
  layer l (1-based) is kept with p_l = 1 - (l/L)(1 - theta); a dropped layer returns its input unchanged (no forward,
  no backward, so its parameters get no gradient); a kept layer's attention and FFN residual branches are scaled by
  1/p_l. In eval mode every layer runs, unscaled. Hooks and a per-layer forward wrapper do it, so parameter names,
  `save_pretrained` files and checkpoints stay transformers' own.
* `PLDCallback` tells the adapter which optimizer step the Trainer is on. The adapter draws through ds_pld's one PLD
  driver (`ds_pld.pld.ProgressiveLayerDrop`, the same one the DeepSpeed plugin's hook, the trainer and GLUE use):
  theta and the drop decisions are pure functions of (seed, optimizer step, micro-step), so every data-parallel rank
  drops the same layers
  and a run resumed with `resume_from_checkpoint` continues exactly where the uninterrupted run would be, with no
  state of its own to checkpoint. Step s (0-based: `state.global_step == s` during its micro-batches) uses
  theta(s), as `ds_pld.initialize` does.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.models.roberta_prelayernorm.modeling_roberta_prelayernorm import (
    RobertaPreLayerNormEncoder,
    RobertaPreLayerNormLayer,
)
from transformers.training_args import ParallelMode

from ds_pld.pld import ProgressiveLayerDrop, keep_probabilities

THETA_LOG_KEY = "pld_theta"


class SupportsPLDSettings(Protocol):
    """Anything with PLD's three settings, e.g. `ds_pld.pld.PLDConfig` (whose `start_step`, when the object has
    one, is honoured too)."""

    theta: float
    gamma: float
    seed: int


def driver_for(config: SupportsPLDSettings) -> ProgressiveLayerDrop:
    """The PLD driver of a config object; one that says PLD is disabled is refused rather than silently used."""
    if getattr(config, "enabled", True) is False:
        raise ValueError("this PLD config has enabled = false; do not attach a PLDAdapter for it")
    return ProgressiveLayerDrop(theta=float(config.theta), gamma=float(config.gamma), seed=int(config.seed),
                                step_offset=int(getattr(config, "start_step", 0)))


class _LayerGate:
    """Stands in for one layer's `forward`: a dropped layer hands its input back without running."""

    def __init__(self, adapter: PLDAdapter, index: int, forward: Callable[..., Any]):
        self.adapter, self.index, self.forward = adapter, index, forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.adapter.is_dropped(self.index):
            return args[0] if args else kwargs["hidden_states"]
        return self.forward(*args, **kwargs)


def find_encoder(model: nn.Module) -> RobertaPreLayerNormEncoder:
    """The model's one RobertaPreLayerNorm encoder; PLD's rule is for pre-LN layers, so nothing else is accepted."""
    encoders = [module for module in model.modules() if isinstance(module, RobertaPreLayerNormEncoder)]
    if len(encoders) != 1:
        raise ValueError(f"{type(model).__name__} holds {len(encoders)} RobertaPreLayerNormEncoder modules; the PLD "
                         "adapter needs exactly one (a transformers RobertaPreLayerNorm model)")
    encoder = encoders[0]
    if encoder.config.is_decoder:
        raise ValueError("the PLD adapter supports the bidirectional encoder only (config.is_decoder must be false): "
                         "a decoder's key/value cache would hold entries of layers that did not run")
    for layer in encoder.layer:
        if type(layer) is not RobertaPreLayerNormLayer:
            raise ValueError(f"the PLD adapter wraps RobertaPreLayerNormLayer, not {type(layer).__name__}")
        if isinstance(layer.__dict__.get("forward"), _LayerGate):
            raise ValueError("this model already has a PLD adapter attached; detach() it first")
    return encoder


class PLDAdapter:
    """PLD's keep/scale rule attached to a transformers RobertaPreLayerNorm model (see the module docstring).

    Attach before the model is handed to the Trainer (and after any change that replaces its Linear modules, such as
    PEFT). Drive it with `PLDCallback`, or in a custom loop call `start_step(step)` before each optimizer step's
    micro-batches."""

    def __init__(self, model: nn.Module, theta: float = 0.5, gamma: float = 0.001, seed: int = 0,
                 driver: ProgressiveLayerDrop | None = None, step_offset: int = 0):
        self.driver = driver or ProgressiveLayerDrop(theta=theta, gamma=gamma, seed=seed, step_offset=step_offset)
        self.model = model
        self.encoder = find_encoder(model)
        self.num_layers = len(self.encoder.layer)
        self._keep: tuple[bool, ...] | None = None  # this forward's decisions; None: every layer, unscaled
        self._scales: tuple[float, ...] = (1.0,) * self.num_layers
        self._step_masks: list[tuple[bool, ...]] = []
        self._handles = [self.encoder.register_forward_pre_hook(self._draw)]
        for index, layer in enumerate(self.encoder.layer):
            layer.forward = _LayerGate(self, index, layer.forward)
            scale = functools.partial(self._scale_branch, index)
            self._handles.append(layer.attention.output.dense.register_forward_hook(scale))
            self._handles.append(layer.output.dense.register_forward_hook(scale))

    @classmethod
    def from_config(cls, model: nn.Module, config: SupportsPLDSettings) -> PLDAdapter:
        """Attach with the settings of a config object (`ds_pld.pld.PLDConfig` or anything with theta/gamma/seed)."""
        return cls(model, driver=driver_for(config))

    @property
    def step(self) -> int:
        """The optimizer step whose micro-batches run now (0-based)."""
        return self.driver.global_step

    @property
    def theta(self) -> float:
        """Theta of the current optimizer step: (1 - theta_bar) exp(-gamma (step + step_offset)) + theta_bar."""
        return self.driver.get_theta()

    @property
    def step_masks(self) -> tuple[tuple[bool, ...], ...]:
        """The keep decisions drawn in this optimizer step so far, one per training micro-batch, in order."""
        return tuple(self._step_masks)

    def start_step(self, step: int) -> None:
        """Begin optimizer step `step` (= the Trainer's `state.global_step`): its micro-steps count from 0."""
        self.driver.start_step(step)
        self.driver.restart_step()
        self._step_masks = []

    def is_dropped(self, index: int) -> bool:
        """Whether layer `index` (0-based) is skipped in the forward now running."""
        return self._keep is not None and not self._keep[index]

    def detach(self) -> None:
        """Remove the rule: the model computes transformers' function again, in training too."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self.encoder.layer:
            if isinstance(layer.__dict__.get("forward"), _LayerGate):
                del layer.forward
        self._keep = None

    def _draw(self, encoder: nn.Module, args: tuple[Any, ...]) -> None:
        """Encoder pre-hook: draw this forward's layers (training) or run them all (eval). Made before any layer
        runs, so gradient checkpointing recomputes the same layers."""
        if not encoder.training:
            self._keep, self._scales = None, (1.0,) * self.num_layers
            return
        draw = self.driver.draw()
        self._keep = tuple(draw.keep_mask(self.num_layers))
        self._scales = tuple(1.0 / p for p in keep_probabilities(draw.theta, self.num_layers))
        self._step_masks.append(self._keep)

    def _scale_branch(self, index: int, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
                      ) -> torch.Tensor | None:
        """Forward hook on a residual branch's output projection: dropout is linear in its input, so scaling the
        projection scales the branch's contribution to the residual stream by 1/p_l exactly."""
        if self._keep is None or self._scales[index] == 1.0:
            return None
        return output * self._scales[index]


def uses_zero3(args: TrainingArguments) -> bool:
    """Whether the Trainer's DeepSpeed config (if any) partitions parameters (ZeRO stage 3)."""
    config = getattr(args, "hf_deepspeed_config", None)
    return config is not None and bool(config.is_zero3())


def check_training_args(args: TrainingArguments, model: nn.Module | None = None) -> None:
    """The Trainer set-ups in which PLD would train wrongly, or fail only at the second step."""
    if uses_zero3(args):
        raise ValueError("PLD in the Trainer does not support DeepSpeed ZeRO stage 3: a dropped layer's gradient "
                         "partition would keep the previous step's gradient; use stage 0-2, or ds_pld.initialize")
    if args.n_gpu > 1 and args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        raise ValueError("PLD in the Trainer does not support torch.nn.DataParallel (several GPUs in one process): "
                         "its replicas would run the original layers; launch one process per GPU (torchrun, "
                         "deepspeed)")
    if args.parallel_mode == ParallelMode.DISTRIBUTED and not args.deepspeed:
        # DistributedDataParallel must expect parameters without a gradient; the Trainer turns that off by default
        # under activation checkpointing.
        checkpointing = bool(getattr(args, "activation_checkpointing", False)
                             or getattr(model, "is_activation_checkpointing", False))
        if args.ddp_static_graph or args.ddp_find_unused_parameters is False or (
                args.ddp_find_unused_parameters is None and checkpointing):
            raise ValueError("PLD under DistributedDataParallel needs TrainingArguments(ddp_find_unused_parameters="
                             "True) and no ddp_static_graph: dropped layers take no part in a step's backward")


class PLDCallback(TrainerCallback):
    """Moves a `PLDAdapter` to each optimizer step of a `Trainer` and adds `pld_theta` (the theta of the step just
    taken) to the training log entries. Holds no state of its own: a resumed run redraws from `state.global_step`."""

    def __init__(self, adapter: PLDAdapter):
        self.adapter = adapter

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """Fail in `Trainer(...)` already, before a DeepSpeed engine is built for a set-up PLD cannot serve."""
        check_training_args(args, kwargs.get("model"))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        """Refuse the set-ups where the rule would be silently wrong (checked again for a callback added after
        the Trainer was built), before the first step."""
        if model is not None and not any(module is self.adapter.encoder for module in model.modules()):
            raise ValueError("the Trainer trains a model the PLDAdapter is not attached to (with `model_init`, "
                             "attach the adapter inside it and build the callback from that adapter)")
        check_training_args(args, model)
        self.adapter.start_step(state.global_step)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self.adapter.start_step(state.global_step)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        """Training entries get the theta of the last optimizer step, theta(global_step - 1). Reporting integrations
        run before user callbacks and do not see it; see docs/hf_trainer.md for charting it."""
        if logs is None or "loss" not in logs or state.global_step < 1:
            return
        theta = self.adapter.driver.theta_at(state.global_step - 1)
        logs[THETA_LOG_KEY] = theta
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last[THETA_LOG_KEY] = theta
