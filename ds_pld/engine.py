"""`ds_pld.initialize`: `deepspeed.initialize` plus Progressive Layer Dropping, LAMB and atomic checkpoints.

Which theta a step uses: the forward/backward passes that produce optimizer step s (while `engine.global_steps == s`,
s = 0, 1, ...) run with theta(s) = (1 - theta_bar) * exp(-gamma * s) + theta_bar, so the first step uses theta(0) = 1
(no layer dropped) and there is no lag. DeepSpeed <= 0.19.5 updated theta after the step with the pre-increment
counter, so its step s used theta(s - 1).
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.runtime.engine import DeepSpeedEngine

from ds_pld import universal_checkpoint
from ds_pld.checkpoints import (
    LATEST_FILE,
    META_FILE,
    checkpoint_files,
    read_checkpoint_meta,
    resolve_checkpoint,
    write_atomic,
)
from ds_pld.config import DsPldConfig, parse_config
from ds_pld.config_errors import ConfigError
from ds_pld.models.zero3 import prepare_zero3_pld
from ds_pld.pld import ProgressiveLayerDrop, drop_seed

STATE_KEY = "ds_pld"
KILL_ENV = "DS_PLD_KILL_DURING_CHECKPOINT"  # tag at which rank 0 SIGKILLs itself mid-save (tests)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _forward_parameters(model: torch.nn.Module) -> tuple[set[str], bool]:
    params = inspect.signature(model.forward).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return set(params), accepts_any


def check_pld_model(model: torch.nn.Module) -> bool:
    """Fail at initialize, not mid-training, if the model cannot take PLD's keywords; return whether it takes
    `pld_seed` (our reproducible drop decisions)."""
    names, accepts_any = _forward_parameters(model)
    missing = {"progressive_layer_drop", "pld_theta"} - names
    if missing and not accepts_any:
        raise ConfigError(f"progressive_layer_drop is enabled but {type(model).__name__}.forward does not accept "
                          f"the keyword argument(s) {sorted(missing)}; add them (see ds_pld.models.BertForPreTraining)")
    return "pld_seed" in names


ZERO3_GRAD_BUFFER = "grad_partitions_flat_buffer"


def zero3_grad_buffer(optimizer: Any) -> torch.Tensor:
    """DeepSpeed's private flat buffer of this rank's ZeRO-3 gradient partitions, which PLD must clear after every
    optimizer step (see `DsPldEngine._clear_zero3_grad_partitions`). A DeepSpeed without it would silently let
    dropped layers train on stale gradients, so its absence is an error, not a no-op."""
    buffer = getattr(optimizer, ZERO3_GRAD_BUFFER, None)
    if not isinstance(buffer, torch.Tensor):
        raise ConfigError(f"progressive_layer_drop under ZeRO-3 clears dropped layers' gradient partitions through "
                          f"DeepSpeed's private {type(optimizer).__name__}.{ZERO3_GRAD_BUFFER}, which DeepSpeed "
                          f"{deepspeed.__version__} does not have (ds_pld was written against 0.19.8); use ZeRO "
                          f"stage 0-2 or a DeepSpeed version that has it")
    return buffer


def check_deepspeed_internals(engine: DeepSpeedEngine) -> None:
    """The private DeepSpeed names this engine relies on beyond ZeRO-3's buffer (checked where it is used), asked
    at initialize: a DeepSpeed that renamed one would otherwise keep training with the feature silently off (no
    gradient norm for the divergence check at ZeRO-0, no re-sharding on another world size)."""
    missing = []
    if not callable(getattr(DeepSpeedEngine, "clip_fp32_gradients", None)) or \
            "_global_grad_norm" not in inspect.getsource(DeepSpeedEngine.get_global_grad_norm):
        missing.append("DeepSpeedEngine.clip_fp32_gradients / _global_grad_norm (the ZeRO-0 gradient norm that the "
                       "divergence check reads)")
    if not hasattr(getattr(engine, "_config", None), "load_universal_checkpoint"):
        missing.append("DeepSpeedEngine._config.load_universal_checkpoint (re-sharding a ZeRO checkpoint for "
                       "another world size)")
    if missing:
        raise ConfigError(f"DeepSpeed {deepspeed.__version__} lacks what ds_pld (written against 0.19.8) relies on: "
                          f"{'; '.join(missing)}")


class DsPldEngine(DeepSpeedEngine):
    """A DeepSpeedEngine (built by `deepspeed.initialize`, then given this class) that adds PLD's forward keywords,
    per-optimizer-step theta updates and checkpointed extra state. Never constructed directly."""

    ds_pld_config: DsPldConfig
    progressive_layer_drop: ProgressiveLayerDrop | None
    extra_state: dict[str, Stateful]
    checkpoint_meta: dict[str, Any]

    def _setup_ds_pld(self, config: DsPldConfig, passes_seed: bool) -> None:
        self.ds_pld_config = config
        self.progressive_layer_drop = None
        if config.pld.enabled:
            self.progressive_layer_drop = ProgressiveLayerDrop(theta=config.pld.theta, gamma=config.pld.gamma)
            self.progressive_layer_drop.update_state(self.global_steps)
        self._pld_passes_seed = passes_seed
        self._pld_micro_step = 0
        self.extra_state = {}
        self.checkpoint_meta = {}

    def set_progress(self, global_steps: int, global_samples: int) -> None:
        """Continue the step count of an engine this one replaces (EarlyBERT rebuilds the engine mid-run)."""
        self.global_steps, self.global_samples = global_steps, global_samples
        if self.progressive_layer_drop is not None:
            self.progressive_layer_drop.update_state(global_steps)

    def get_pld_theta(self) -> float | None:
        return None if self.progressive_layer_drop is None else self.progressive_layer_drop.get_theta()

    def pld_forward_kwargs(self) -> dict[str, Any]:
        """What the next training forward receives; the seed depends on (seed, step, micro-step) only."""
        kwargs = self.progressive_layer_drop.get_state()
        if self._pld_passes_seed:
            kwargs["pld_seed"] = drop_seed(self.ds_pld_config.pld.seed, self.global_steps, self._pld_micro_step)
        return kwargs

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if self.progressive_layer_drop is not None and self.module.training:
            kwargs.update(self.pld_forward_kwargs())
            self._pld_micro_step += 1
        return super().forward(*inputs, **kwargs)

    def step(self, lr_kwargs: dict | None = None) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        super().step(lr_kwargs)
        if boundary:
            self._pld_micro_step = 0
            if self.progressive_layer_drop is not None:
                self.progressive_layer_drop.update_state(self.global_steps)
                self._clear_zero3_grad_partitions()

    def clip_fp32_gradients(self) -> None:
        """DeepSpeed computes the gradient norm here (ZeRO-0, fp32, clipping on) and drops it; keep it (a device
        tensor, no sync) so `get_global_grad_norm` answers as under ZeRO and the divergence check can use it."""
        from deepspeed.runtime.utils import clip_grad_norm_

        self._global_grad_norm = clip_grad_norm_(parameters=self.module.parameters(),
                                                 max_norm=self.gradient_clipping(), mpu=self.mpu)

    def _clear_zero3_grad_partitions(self) -> None:
        """ZeRO-3 overwrites a parameter's gradient partition at micro-step 0 only if the parameter gets a gradient;
        a layer that PLD dropped would carry the previous step's gradient into the next update. One memset of the
        partitioned gradient buffer per optimizer step gives dropped layers a zero gradient, as stages 0-2 do."""
        if self.zero_optimization_stage() == 3:
            zero3_grad_buffer(self.optimizer).zero_()

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        """DeepSpeed's checkpoint, then a metadata file that marks it complete, then an atomic `latest`: a crash at
        any point leaves `latest` naming the previous complete checkpoint."""
        tag = str(tag if tag is not None else f"global_step{self.global_steps}")
        state = dict(client_state or {})
        state[STATE_KEY] = {
            "pld": None if self.progressive_layer_drop is None else self.progressive_layer_drop.state_dict(),
            "extra": {name: obj.state_dict() for name, obj in self.extra_state.items()},
        }
        if self.global_rank == 0:  # a folder saved into again is unfinished until its new metadata is written
            (Path(save_dir) / tag / META_FILE).unlink(missing_ok=True)
        super().save_checkpoint(save_dir, tag=tag, client_state=state, save_latest=False,
                                exclude_frozen_parameters=exclude_frozen_parameters)
        if os.environ.get(KILL_ENV) == tag and self.global_rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # crash test: files written, checkpoint not yet marked complete
        if self.global_rank == 0:  # DeepSpeed's save ends in a barrier: every rank's files are on disk now
            meta = {"tag": tag, "global_steps": self.global_steps, "global_samples": self.global_samples,
                    "world_size": self.world_size, "dp_world_size": self.dp_world_size,
                    "pld_theta": self.get_pld_theta(), **self.checkpoint_meta,
                    "files": checkpoint_files(Path(save_dir) / tag)}
            model_config = getattr(self.module, "config", None)
            if hasattr(model_config, "to_dict"):
                meta["model_config"] = model_config.to_dict()
            write_atomic(Path(save_dir) / tag / META_FILE, json.dumps(meta, indent=2))
            if save_latest:
                write_atomic(Path(save_dir) / LATEST_FILE, tag)
        dist.barrier()
        return True

    def load_checkpoint(self, load_dir: str, tag: str | None = None, **kwargs: Any) -> tuple[str | None, dict]:
        """Load `tag`, or the checkpoint `latest` names; if that one is not intact, the newest intact one, with a
        warning naming the bad file (files are checked against the sizes recorded at save time)."""
        if tag is None:
            meta, warning = resolve_checkpoint(load_dir)
            if meta is None:
                return None, {}
            if warning is not None and self.global_rank == 0:
                print(f"[ds_pld] WARNING: {warning}", flush=True)
            tag = meta["tag"]
        else:
            meta = read_checkpoint_meta(load_dir, tag) or {}
        reshard = (kwargs.get("load_optimizer_states", True) or self.zero_optimization_partition_weights()) and \
            universal_checkpoint.needs_resharding(meta, self.dp_world_size, self.zero_optimization_stage())
        if reshard:
            source = self._convert_to_universal(Path(load_dir), tag, meta)
            with universal_checkpoint.loading_universal(self):
                path, client_state = super().load_checkpoint(str(source), tag=tag, **kwargs)
            dist.barrier()
            if self.global_rank == 0:
                shutil.rmtree(source, ignore_errors=True)  # a derived copy; the original checkpoint stays
        else:
            path, client_state = super().load_checkpoint(load_dir, tag=tag, **kwargs)
        client_state = dict(client_state or {})
        ours = client_state.pop(STATE_KEY, None) or {}
        self._pld_micro_step = 0
        if self.progressive_layer_drop is not None:
            self.progressive_layer_drop.update_state(self.global_steps)
            if ours.get("pld"):
                self.progressive_layer_drop.load_state_dict(ours["pld"])
        for name, state in (ours.get("extra") or {}).items():
            if name in self.extra_state:
                self.extra_state[name].load_state_dict(state)
        return path, client_state


    def _convert_to_universal(self, load_dir: Path, tag: str, meta: dict[str, Any]) -> Path:
        """Rank 0 converts the checkpoint to DeepSpeed's universal format; every rank then loads `tag` from the
        folder returned. A failed conversion is a ConfigError on every rank, not a hang."""
        failure: list[str | None] = [None]
        if self.global_rank == 0:
            saved = meta.get("dp_world_size", meta["world_size"])
            print(f"[ds_pld] checkpoint {tag!r} was partitioned over {saved} data-parallel rank(s) by ZeRO; "
                  f"re-sharding it for {self.dp_world_size} through DeepSpeed's universal checkpoint",
                  flush=True)
            try:
                universal_checkpoint.convert(load_dir, tag, meta)
            except ConfigError as err:
                failure = [str(err)]
        dist.broadcast_object_list(failure, src=0)  # doubles as the barrier: the others wait for the conversion
        if failure[0] is not None:
            raise ConfigError(failure[0])
        source = load_dir / universal_checkpoint.FOLDER
        read_checkpoint_meta(source, tag)  # every rank: the conversion is complete, or a clear error
        return source


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


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Any = None, lr_scheduler: Any = None,
               distributed_port: int = 29500, mpu: Any = None, dist_init_required: bool | None = None,
               collate_fn: Any = None, config: Any = None, mesh_param: Any = None,
               config_params: Any = None) -> tuple[DsPldEngine, Any, Any, Any]:
    """Same arguments and return tuple as `deepspeed.initialize`; the config may carry our extra blocks (the
    trainer's and fine-tuning's blocks are accepted and left to their owners; other unknown top-level keys are not)."""
    source, args = _config_source(args, config, config_params)
    parsed = parse_config(source)
    if model is None:
        raise ConfigError("ds_pld.initialize needs a model")
    if parsed.pld.enabled and getattr(getattr(model, "config", None), "layer_norm", None) == "post":
        from ds_pld.models.config import PLD_NEEDS_PRE_LN

        raise ConfigError(f"progressive_layer_drop is enabled but the model ({type(model).__name__}) is post-LN "
                          f"(config.layer_norm = \"post\"): {PLD_NEEDS_PRE_LN}")
    passes_seed = check_pld_model(model) if parsed.pld.enabled else False
    zero = parsed.deepspeed.get("zero_optimization") or {}
    if parsed.pld.enabled and zero.get("stage") == 3 and (zero.get("offload_optimizer") or {}).get("device") not in (
            None, "none"):
        raise ConfigError("progressive_layer_drop with ZeRO-3 optimizer offload is not supported: offloaded gradient "
                          "partitions of dropped layers are not cleared between steps ('zero_optimization."
                          "offload_optimizer')")
    ds_config = copy.deepcopy(parsed.deepspeed)
    prepare_zero3_pld(model, ds_config, parsed.pld.enabled)  # before DeepSpeed installs its ZeRO-3 hooks
    uses_lamb = optimizer is None and str((ds_config.get("optimizer") or {}).get("type", "")).lower() == "lamb"
    if uses_lamb:
        from ds_pld.optim import LambConfig, build_lamb

        optimizer = build_lamb(LambConfig.from_optimizer_block(ds_config.pop("optimizer")), model, ds_config)
    engine, optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, distributed_port=distributed_port, mpu=mpu, dist_init_required=dist_init_required,
        collate_fn=collate_fn, config=ds_config, mesh_param=mesh_param)
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is not None and checkpoint_engine.is_decoupled():
        raise ConfigError(f"{type(checkpoint_engine).__name__} is a decoupled (asynchronous) checkpoint engine: "
                          "its files may still be in flight when ds_pld marks a checkpoint complete and moves "
                          "`latest`; use DeepSpeed's default checkpoint engine ('checkpoint' block)")
    if type(engine) is not DeepSpeedEngine:
        raise ConfigError(f"ds_pld supports the plain DeepSpeedEngine, not {type(engine).__name__} "
                          "(pipeline / hybrid engines)")
    check_deepspeed_internals(engine)
    engine.__class__ = DsPldEngine
    if parsed.pld.enabled and engine.zero_optimization_stage() == 3:
        zero3_grad_buffer(engine.optimizer)  # fail now, not by silently training dropped layers on stale gradients
    engine._setup_ds_pld(parsed, passes_seed)
    if uses_lamb:
        from ds_pld.optim import bind_lamb_to_engine

        bind_lamb_to_engine(engine)
    return engine, optimizer, loader, scheduler
