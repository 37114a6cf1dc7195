"""The algorithms a run's config asks for, in the order they act on each event."""
from __future__ import annotations

from pathlib import Path

from ds_pld.algorithms.base import Algorithm
from ds_pld.algorithms.earlybert import EarlyBert, Prune
from ds_pld.algorithms.pld import ProgressiveLayerDropping
from ds_pld.algorithms.random_ltd import RandomTokenDropping
from ds_pld.earlybert import EarlyBertConfig, prune_model
from ds_pld.pld import PLDConfig, ProgressiveLayerDrop
from ds_pld.random_ltd import RandomLTDConfig


def build_algorithms(pld: PLDConfig | ProgressiveLayerDropping | None, earlybert: EarlyBertConfig | None,
                     prune: Prune = prune_model, rewind_path: str | Path | None = None,
                     random_ltd: RandomLTDConfig | None = None) -> list[Algorithm]:
    """PLD first (it reads the step's theta before anything may swap the engine), then random-LTD, then EarlyBERT.
    `pld`: the config block (an algorithm is made when it is enabled) or an algorithm already attached to an
    engine; `random_ltd`: DeepSpeed's enabled random-LTD block, or None."""
    algorithms: list[Algorithm] = []
    if isinstance(pld, ProgressiveLayerDropping):
        algorithms.append(pld)
    elif pld is not None and pld.enabled:
        algorithms.append(ProgressiveLayerDropping(ProgressiveLayerDrop.from_config(pld)))
    if random_ltd is not None:
        algorithms.append(RandomTokenDropping(random_ltd))
    if earlybert is not None:
        algorithms.append(EarlyBert(earlybert, prune=prune, rewind_path=rewind_path))
    return algorithms


def find_algorithm(algorithms: list[Algorithm], kind: type[Algorithm]) -> Algorithm | None:
    """The first algorithm of `kind` in the list, or None."""
    return next((algorithm for algorithm in algorithms if isinstance(algorithm, kind)), None)
