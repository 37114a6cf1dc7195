"""The algorithms a run's config asks for, in the order they act on each event."""
from __future__ import annotations

from pathlib import Path

from ds_pld.algorithms.base import Algorithm
from ds_pld.algorithms.earlybert import EarlyBert, Prune
from ds_pld.algorithms.pld import ProgressiveLayerDropping
from ds_pld.earlybert import EarlyBertConfig, prune_model


def build_algorithms(pld: bool, earlybert: EarlyBertConfig | None, prune: Prune = prune_model,
                     rewind_path: str | Path | None = None) -> list[Algorithm]:
    """PLD first (it reads the step's theta before anything may swap the engine), then EarlyBERT."""
    algorithms: list[Algorithm] = [ProgressiveLayerDropping()] if pld else []
    if earlybert is not None:
        algorithms.append(EarlyBert(earlybert, prune=prune, rewind_path=rewind_path))
    return algorithms
