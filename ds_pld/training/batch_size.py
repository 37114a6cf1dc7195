"""The batch-size triple (total, micro-batch per rank, accumulation steps), resolved once for pretraining and GLUE
fine-tuning and checked against the world size before DeepSpeed sees it."""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from ds_pld.config_errors import ConfigError

TOTAL, MICRO, ACCUMULATION = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


def resolve_batch_sizes(ds_config: MutableMapping[str, Any], world_size: int, total_name: str = TOTAL
                        ) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) from whichever of the three keys are set; the resolved
    triple is written back so DeepSpeed agrees. `total_name` is what errors call the total (GLUE's comes from
    'glue.batch_size')."""
    total, micro, accum = ds_config.get(TOTAL), ds_config.get(MICRO), ds_config.get(ACCUMULATION)
    for key, value in ((total_name, total), (MICRO, micro), (ACCUMULATION, accum)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"'{key}' = {value!r} must be a positive integer")
    if micro is None and accum is None:
        if total is None:
            raise ConfigError(f"the config sets none of '{total_name}', '{MICRO}'")
        accum = 1
    if micro is None:
        micro, rest = divmod(total, accum * world_size)
        if rest or micro < 1:
            raise ConfigError(f"'{total_name}' = {total} cannot be split over {world_size} rank(s) x "
                              f"'{ACCUMULATION}' = {accum}")
    if accum is None:
        accum = 1 if total is None else total // (micro * world_size)
        if total is not None and (accum < 1 or accum * micro * world_size != total):
            raise ConfigError(f"'{total_name}' = {total} is not a multiple of '{MICRO}' = {micro} x {world_size} "
                              "rank(s)")
    if total is not None and total != micro * accum * world_size:
        raise ConfigError(f"'{total_name}' = {total} != '{MICRO}' {micro} x '{ACCUMULATION}' {accum} x "
                          f"{world_size} rank(s)")
    ds_config.update({TOTAL: micro * accum * world_size, MICRO: micro, ACCUMULATION: accum})
    return micro, accum
