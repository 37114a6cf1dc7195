"""Progressive Layer Dropping as an algorithm: the trainer's side of PLD.

The rule itself runs below the trainer, so that anyone calling `ds_pld.initialize` gets it: the engine sets theta
for each optimizer step, passes PLD's keywords (and a drop seed) to the model's forward, clears dropped layers'
ZeRO-3 gradient partitions and checkpoints the schedule; the model keeps or skips each layer. What a training loop
adds is this: refuse an engine that does not drive PLD, and report the theta each step ran with and the expected
number of layers it ran.
"""
from __future__ import annotations

from ds_pld.algorithms.base import Algorithm, Event, Metrics, State
from ds_pld.config_errors import ConfigError
from ds_pld.pld import expected_layers


class ProgressiveLayerDropping(Algorithm):
    """STEP_START: read the step's theta from the engine; STEP_END: `pld_theta` and `expected_layers` (sum of the
    layers' keep probabilities). No state of its own: the engine checkpoints the schedule."""

    name = "pld"

    def __init__(self) -> None:
        self.theta: float | None = None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.STEP_START, Event.STEP_END)

    def apply(self, event: Event, state: State) -> Metrics | None:
        if event is Event.STEP_START:
            self.theta = state.engine.get_pld_theta()
            if self.theta is None:
                raise ConfigError("the PLD algorithm is on but the engine drops no layers: enable "
                                  "'progressive_layer_drop' in the config given to ds_pld.initialize")
            return None
        return {"pld_theta": self.theta, "expected_layers": expected_layers(self.theta, state.model.config.num_layers)}
