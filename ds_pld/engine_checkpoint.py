"""Checkpoints around DeepSpeed's public `save_checkpoint` / `load_checkpoint`: atomic completion, verified loads,
the plugin's state in `client_state`, and re-sharding for another world size.

Save: DeepSpeed writes its files, then rank 0 writes the metadata file that marks the checkpoint complete (with every
file's size), then an atomic `latest`: a crash at any point leaves `latest` naming the previous complete checkpoint.
Load: `tag`, or the checkpoint `latest` names; if that one is not intact, the newest intact one, with a warning naming
the bad file. A ZeRO checkpoint written by another number of data-parallel ranks is converted to DeepSpeed's universal
format first (ds_pld.universal_checkpoint).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from deepspeed import comm as dist

from ds_pld import universal_checkpoint
from ds_pld.checkpoints import (
    LATEST_FILE,
    META_FILE,
    checkpoint_files,
    read_checkpoint_meta,
    resolve_checkpoint,
    write_atomic,
)
from ds_pld.config_errors import ConfigError
from ds_pld.plugin_state import plugin_of

STATE_KEY = "ds_pld"
KILL_ENV = "DS_PLD_KILL_DURING_CHECKPOINT"  # tag at which rank 0 SIGKILLs itself mid-save (tests)


def save_checkpoint(engine: Any, save_dir: str | Path, tag: str | None = None, client_state: dict | None = None,
                    save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
    """DeepSpeed's checkpoint with the plugin's state, then the metadata file that marks it complete, then `latest`.
    Call on every rank."""
    plugin = plugin_of(engine)
    tag = str(tag if tag is not None else f"global_step{engine.global_steps}")
    state = dict(client_state or {})
    state[STATE_KEY] = {"extra": {name: obj.state_dict() for name, obj in plugin.extra_state.items()}}
    folder = Path(save_dir) / tag
    if engine.global_rank == 0:  # a folder saved into again is unfinished until its new metadata is written
        (folder / META_FILE).unlink(missing_ok=True)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=state, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen_parameters)
    if os.environ.get(KILL_ENV) == tag and engine.global_rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # crash test: files written, checkpoint not yet marked complete
    if engine.global_rank == 0:  # DeepSpeed's save ends in a barrier: every rank's files are on disk now
        meta = {"tag": tag, "global_steps": engine.global_steps, "global_samples": engine.global_samples,
                "world_size": engine.world_size, "dp_world_size": engine.dp_world_size,
                "pld_theta": plugin.pld_theta(), **plugin.checkpoint_meta, "files": checkpoint_files(folder)}
        model_config = getattr(engine.module, "config", None)
        if hasattr(model_config, "to_dict"):
            meta["model_config"] = model_config.to_dict()
        write_atomic(folder / META_FILE, json.dumps(meta, indent=2))
        if save_latest:
            write_atomic(Path(save_dir) / LATEST_FILE, tag)
    dist.barrier()
    return True


def load_checkpoint(engine: Any, load_dir: str | Path, tag: str | None = None, **kwargs: Any
                    ) -> tuple[str | None, dict]:
    """Load a checkpoint into `engine` and the plugin's state; returns DeepSpeed's (path, client_state) without ours.
    `kwargs` go to DeepSpeed's `load_checkpoint`."""
    plugin = plugin_of(engine)
    if tag is None:
        meta, warning = resolve_checkpoint(load_dir)
        if meta is None:
            return None, {}
        if warning is not None and engine.global_rank == 0:
            print(f"[ds_pld] WARNING: {warning}", flush=True)
        tag = meta["tag"]
    else:
        meta = read_checkpoint_meta(load_dir, tag) or {}
    reshard = (kwargs.get("load_optimizer_states", True) or engine.zero_optimization_partition_weights()) and \
        universal_checkpoint.needs_resharding(meta, engine.dp_world_size, engine.zero_optimization_stage())
    if reshard:
        source = _convert_to_universal(engine, Path(load_dir), tag, meta)
        with universal_checkpoint.loading_universal(engine):
            path, client_state = engine.load_checkpoint(str(source), tag=tag, **kwargs)
        dist.barrier()
        if engine.global_rank == 0:
            shutil.rmtree(source, ignore_errors=True)  # a derived copy; the original checkpoint stays
    else:
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)
    client_state = dict(client_state or {})
    ours = client_state.pop(STATE_KEY, None) or {}
    extra = ours.get("extra") or {}
    for name, obj in plugin.extra_state.items():
        if name in extra:
            obj.load_state_dict(extra[name])
    if plugin.pld is not None:
        plugin.pld.restart_step()
    return path, client_state


def _convert_to_universal(engine: Any, load_dir: Path, tag: str, meta: dict[str, Any]) -> Path:
    """Rank 0 converts the checkpoint to DeepSpeed's universal format; every rank then loads `tag` from the folder
    returned. A failed conversion is a ConfigError on every rank, not a hang."""
    failure: list[str | None] = [None]
    if engine.global_rank == 0:
        saved = meta.get("dp_world_size", meta["world_size"])
        print(f"[ds_pld] checkpoint {tag!r} was partitioned over {saved} data-parallel rank(s) by ZeRO; re-sharding "
              f"it for {engine.dp_world_size} through DeepSpeed's universal checkpoint", flush=True)
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
