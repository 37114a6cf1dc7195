"""Re-shard a ZeRO checkpoint for another world size through DeepSpeed's universal checkpoint.

ZeRO stages 1-3 save the optimizer state (and at stage 3 the weights) as one partition per data-parallel rank, and
DeepSpeed refuses to load them on another number of ranks. Its universal format stores each parameter's state whole,
so any world size can load it. The conversion (`deepspeed.checkpoint.ds_to_universal`) runs on rank 0 into
`<checkpoints>/universal/<tag>`, a folder that the resume and retention logic never mistake for a checkpoint of the
run; like a checkpoint, it counts only once its `ds_pld_meta.json` is written, last and atomically, so a crash
mid-conversion is redone at the next resume. It is a derived copy, removed once every rank has loaded it.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ds_pld.checkpoints import META_FILE, checkpoint_files, write_atomic
from ds_pld.config_errors import ConfigError

FOLDER = "universal"


def needs_resharding(meta: dict[str, Any], dp_world_size: int, zero_stage: int) -> bool:
    """A checkpoint whose partitioned ZeRO state was split over another data-parallel world size. ZeRO partitions
    over the data-parallel ranks, so that is the size compared (under sequence or model parallelism the global world
    size is larger); checkpoints written before it was recorded hold only the global one."""
    saved = meta.get("dp_world_size", meta.get("world_size"))
    return zero_stage >= 1 and saved is not None and int(saved) != dp_world_size and not meta.get("universal")


def convert(checkpoint_dir: Path, tag: str, meta: dict[str, Any]) -> Path:
    """Rank 0: convert `checkpoint_dir/tag` into `checkpoint_dir/universal/tag` unless a complete conversion is
    there already; returns `checkpoint_dir/universal`, the folder to load `tag` from. Raises ConfigError with
    DeepSpeed's own message when it cannot convert."""
    target = checkpoint_dir / FOLDER / tag
    if (target / META_FILE).is_file():
        return target.parent
    shutil.rmtree(target, ignore_errors=True)  # a conversion that died half-way
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint_dir / tag),
           "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ConfigError(f"cannot re-shard checkpoint {str(checkpoint_dir / tag)!r} for another world size with "
                          f"DeepSpeed's universal checkpoint: {tail[0]}")
    new_meta = {**meta, "universal": True, "files": checkpoint_files(target)}
    write_atomic(target / META_FILE, json.dumps(new_meta, indent=2))
    return target.parent


@contextlib.contextmanager
def loading_universal(engine: Any) -> Iterator[None]:
    """DeepSpeed decides at config time whether `load_checkpoint` reads the universal format; switch that one setting
    for this load only (the ZeRO optimizers link their state for it at construction, whatever the setting)."""
    config = getattr(engine, "_config", None)
    if config is None or not hasattr(config, "load_universal_checkpoint"):
        raise ConfigError("this DeepSpeed has no `load_universal_checkpoint` setting on its engine config: cannot "
                          "load a re-sharded checkpoint (resume on the world size that wrote it)")
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before
