"""`ds_pld.initialize` and `ds_pld.attach`: DeepSpeed's own engine, unmodified in class, with PLD, LAMB under ZeRO
and ds_pld's checkpoints attached through public hooks.

- PLD: the `ProgressiveLayerDropping` algorithm registers a forward pre-hook on the engine's module, keyed on the
  engine's `global_steps` (ds_pld.algorithms.pld).
- Gradient norm for the divergence check: DeepSpeed's `get_global_grad_norm()`; at ZeRO-0 in fp32, which keeps none,
  an optimizer step pre-hook (torch's public `register_step_pre_hook`) takes it (ds_pld.plugin_state).
- Random-LTD: DeepSpeed's engine schedules it from its own `data_efficiency.data_routing.random_ltd` block; the
  `RandomTokenDropping` algorithm passes the scheduler's kept length to the model in a forward pre-hook
  (ds_pld.algorithms.random_ltd).
- ZeRO-3 with PLD: the encoder is one ZeRO-3 leaf, so DeepSpeed's leaf hook reduces a zero gradient for a dropped
  layer as stages 0-2 apply one (ds_pld.models.zero3); set-ups where it cannot be are refused, naming the key.
- Checkpoints: `ds_pld.save_checkpoint(engine, ...)` / `ds_pld.load_checkpoint(engine, ...)` wrap DeepSpeed's public
  methods (ds_pld.engine_checkpoint); the engine's own methods stay DeepSpeed's.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from ds_pld.algorithms.pld import ProgressiveLayerDropping, check_pld_model
from ds_pld.algorithms.random_ltd import RandomTokenDropping, check_random_ltd_model
from ds_pld.compat import apply_workarounds, check_engine
from ds_pld.config import DsPldConfig, parse_config
from ds_pld.config_errors import ConfigError
from ds_pld.models.zero3 import check_zero3_pld, prepare_zero3_pld
from ds_pld.optim import bind_lamb_to_engine
from ds_pld.pld import ProgressiveLayerDrop
from ds_pld.plugin_state import PLUGIN_ATTR, DsPld

EARLYBERT_NEEDS_A_LOOP = ("'earlybert' is run by a training loop that fires ds_pld.algorithms events (the L1 penalty "
                          "on each loss, the draw and the engine rebuilt for the pruned model), which "
                          "ds_pld.initialize cannot do on its own: train with launch/train.py (or ds_pld.cli.train), "
                          "or drive ds_pld.algorithms.EarlyBert with ds_pld.algorithms.optimizer_step yourself and "
                          "leave the block out of the config given to ds_pld")


def _config_source(args: Any, config: Any, config_params: Any) -> tuple[Any, Any]:
    """Find the config the way deepspeed.initialize does and return it with args stripped of it."""
    source = config if config is not None else config_params
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if source is not None and from_args is not None:
        raise ConfigError("a config was given both as `config` and as args.deepspeed_config; give one")
    if source is None and from_args is None:
        raise ConfigError("no DeepSpeed config: pass config=... or --deepspeed_config")
    if from_args is not None:
        args = copy.copy(args)
        args.deepspeed_config = None
        source = from_args
    return source, args


def _check_pld_offload(parsed: DsPldConfig) -> None:
    zero = parsed.deepspeed.get("zero_optimization") or {}
    if parsed.pld.enabled and zero.get("stage") == 3 and (zero.get("offload_optimizer") or {}).get("device") not in (
            None, "none"):
        raise ConfigError("progressive_layer_drop with ZeRO-3 optimizer offload is not supported (untested: the "
                          "offloaded gradient partitions of dropped layers): 'zero_optimization.offload_optimizer'")


def attach(engine: DeepSpeedEngine, config: Any, pld: ProgressiveLayerDropping | None = None,
           random_ltd: RandomTokenDropping | None = None) -> DsPld:
    """Attach ds_pld to an engine built by `deepspeed.initialize` with `config`'s DeepSpeed part: PLD (when the
    config's `progressive_layer_drop` is on; `pld` an existing algorithm to move onto this engine), random-LTD (when
    DeepSpeed's `random_ltd` block is on; `random_ltd` likewise), the ZeRO-0
    gradient norm, checkpoint state, and a ds_pld Lamb bound to ZeRO's partitions. Under ZeRO-3 with PLD, the model
    must have been given to `ds_pld.models.zero3.prepare_zero3_pld` before `deepspeed.initialize`."""
    parsed = parse_config(config)
    if parsed.earlybert is not None:
        raise ConfigError(EARLYBERT_NEEDS_A_LOOP)
    if parsed.model is not None or parsed.init_from is not None:
        raise ConfigError("'model' describes a model for ds_pld.initialize to build; ds_pld.attach gets an engine "
                          "whose model exists: remove the 'model' block from the config given to attach")
    if type(engine) is not DeepSpeedEngine:
        raise ConfigError(f"ds_pld supports the plain DeepSpeedEngine, not {type(engine).__name__} "
                          "(pipeline / hybrid engines)")
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is not None and checkpoint_engine.is_decoupled():
        raise ConfigError(f"{type(checkpoint_engine).__name__} is a decoupled (asynchronous) checkpoint engine: "
                          "its files may still be in flight when ds_pld marks a checkpoint complete and moves "
                          "`latest`; use DeepSpeed's default checkpoint engine ('checkpoint' block)")
    check_engine(engine, parsed.deepspeed)
    if pld is not None and not parsed.pld.enabled:
        raise ConfigError("a PLD algorithm was given but 'progressive_layer_drop' is not enabled in the config")
    if parsed.pld.enabled:
        _check_pld_offload(parsed)
        if engine.zero_optimization_stage() == 3:
            check_zero3_pld(engine.module)
        pld = pld or ProgressiveLayerDropping(ProgressiveLayerDrop.from_config(parsed.pld))
        pld.attach(engine)
    if random_ltd is not None and parsed.random_ltd is None:
        raise ConfigError("a random-LTD algorithm was given but 'data_efficiency.data_routing.random_ltd' is not "
                          "enabled in the config")
    if parsed.random_ltd is not None:
        random_ltd = random_ltd or RandomTokenDropping(parsed.random_ltd)
        random_ltd.attach(engine)
    plugin = DsPld(engine, parsed, pld, random_ltd)
    plugin.workaround_handles = apply_workarounds(engine)
    setattr(engine, PLUGIN_ATTR, plugin)
    bind_lamb_to_engine(engine)  # a no-op unless the base optimizer is ds_pld's Lamb
    return plugin


def _model_for(parsed: DsPldConfig, model: torch.nn.Module | None) -> torch.nn.Module:
    """The model argument, or one built from the config's `model` block (with the weights of `model.init_from` when
    it is set); both, or neither, is an error."""
    if model is not None and parsed.model is not None:
        raise ConfigError("the config has a 'model' block and a model was passed as well: ds_pld.initialize builds "
                          "the model from 'model' only when no model is given; remove one of them")
    if model is not None:
        return model
    if parsed.model is None:
        raise ConfigError("ds_pld.initialize needs a model, or a 'model' block in the config to build one from")
    from ds_pld.models import BertForPreTraining

    if parsed.init_from is None:
        return BertForPreTraining(parsed.model)
    from ds_pld.models.init_from import initial_model

    model, notes = initial_model(parsed.model, parsed.init_from)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        for note in notes:
            print(f"[ds_pld] {note}", flush=True)
    return model


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Any = None, lr_scheduler: Any = None,
               distributed_port: int = 29500, mpu: Any = None, dist_init_required: bool | None = None,
               collate_fn: Any = None, config: Any = None, mesh_param: Any = None, config_params: Any = None,
               pld: ProgressiveLayerDropping | None = None, random_ltd: RandomTokenDropping | None = None
               ) -> tuple[DeepSpeedEngine, Any, Any, Any]:
    """Same arguments and return tuple as `deepspeed.initialize` (plus `pld` and `random_ltd`, see `attach`); the
    engine is DeepSpeed's own. The config may carry our blocks: `progressive_layer_drop` is applied, `model` builds
    the model when none is passed, `earlybert` is refused (it needs a training loop); the trainer's and
    fine-tuning's blocks are left to their owners; other unknown top-level keys are errors."""
    source, args = _config_source(args, config, config_params)
    parsed = parse_config(source)
    if parsed.earlybert is not None:
        raise ConfigError(EARLYBERT_NEEDS_A_LOOP)
    model = _model_for(parsed, model)
    if parsed.pld.enabled:
        check_pld_model(model)  # before DeepSpeed builds anything
        _check_pld_offload(parsed)
    if parsed.random_ltd is not None:
        check_random_ltd_model(model, parsed.random_ltd)
    ds_config = copy.deepcopy(parsed.deepspeed)
    prepare_zero3_pld(model, ds_config, parsed.pld.enabled)  # before DeepSpeed installs its ZeRO-3 hooks
    if optimizer is None and str((ds_config.get("optimizer") or {}).get("type", "")).lower() == "lamb":
        from ds_pld.optim import LambConfig, build_lamb

        optimizer = build_lamb(LambConfig.from_optimizer_block(ds_config.pop("optimizer")), model, ds_config)
    engine, optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, distributed_port=distributed_port, mpu=mpu, dist_init_required=dist_init_required,
        collate_fn=collate_fn, config=ds_config, mesh_param=mesh_param)
    attach(engine, dataclasses.replace(parsed, model=None, init_from=None), pld=pld, random_ltd=random_ltd)
    return engine, optimizer, loader, scheduler
