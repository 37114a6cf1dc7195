"""Speed-ups as algorithms with a small surface (Composer's `match/apply`): PLD and EarlyBERT, driven by any loop
that fires `Event`s on a `State` (see base.py; docs/architecture.md says where a new one goes)."""
from ds_pld.algorithms.base import Algorithm, Event, State, register_checkpoint_state, run_event
from ds_pld.algorithms.earlybert import EarlyBert
from ds_pld.algorithms.pld import ProgressiveLayerDropping
from ds_pld.algorithms.select import build_algorithms
from ds_pld.algorithms.step import StepResult, optimizer_step

__all__ = ["Algorithm", "EarlyBert", "Event", "ProgressiveLayerDropping", "State", "StepResult", "build_algorithms",
           "optimizer_step", "register_checkpoint_state", "run_event"]
