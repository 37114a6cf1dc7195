"""Which sequences each rank reads at each optimizer step, as a pure function of (seed, step, micro-step, rank).

Epoch e visits the sequences in the order of a permutation seeded by (seed, e). The global batch of step s is the
next `micro_batch_size * gradient_accumulation_steps * world_size` entries of that order; it is cut into disjoint
slices, slice `micro_step * world_size + rank` for that rank and micro-step. The tail of each epoch's order that
does not fill a global batch is skipped. Resuming needs only the step number: no loader state to checkpoint. A
restart with another world size but the same global batch size still reads the same sequences per step."""
from __future__ import annotations

import datasets
import numpy as np
import torch

from ds_pld.config_errors import ConfigError

_MASK_STREAM = 0x4D41534B  # keeps mask seeds apart from the shuffle seeds derived from the same user seed


def _positive(value: int, key: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"'{key}' = {value!r} must be an integer >= {low}")
    return int(value)


class StepBatches:
    """Deterministic, resumable batch selection over a packed dataset (a `datasets.Dataset` with `input_ids`,
    or a [sequences, seq] array / tensor)."""

    def __init__(self, dataset: datasets.Dataset | np.ndarray | torch.Tensor, micro_batch_size: int,
                 gradient_accumulation_steps: int = 1, world_size: int = 1, rank: int = 0, seed: int = 0):
        self.micro_batch_size = _positive(micro_batch_size, "train_micro_batch_size_per_gpu")
        self.gradient_accumulation_steps = _positive(gradient_accumulation_steps, "gradient_accumulation_steps")
        self.world_size = _positive(world_size, "world_size")
        self.rank = _positive(rank, "rank", low=0)
        if self.rank >= self.world_size:
            raise ConfigError(f"'rank' = {rank} must be < 'world_size' = {world_size}")
        self.seed = _positive(seed, "seed", low=0)
        if isinstance(dataset, datasets.Dataset):
            if "input_ids" not in dataset.column_names:
                raise ConfigError(f"the dataset has no 'input_ids' column (columns: {dataset.column_names})")
            self._rows = dataset.with_format("numpy", columns=["input_ids"])
        else:
            self._rows = dataset
        self.num_sequences = len(dataset)
        self.global_batch_size = self.micro_batch_size * self.gradient_accumulation_steps * self.world_size
        if self.num_sequences < self.global_batch_size:
            raise ConfigError(
                f"the dataset has {self.num_sequences} sequences, fewer than one global batch of "
                f"{self.global_batch_size} (train_micro_batch_size_per_gpu {self.micro_batch_size} x "
                f"gradient_accumulation_steps {self.gradient_accumulation_steps} x world_size {self.world_size})")
        self.steps_per_epoch = self.num_sequences // self.global_batch_size
        self._permutation: tuple[int, np.ndarray] | None = None  # memo of the current epoch's order

    def epoch(self, step: int) -> int:
        return _positive(step, "step", low=0) // self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        """The visiting order of `epoch`; memoised for the last epoch asked (an O(n) draw per call is too slow)."""
        if self._permutation is None or self._permutation[0] != epoch:
            order = np.random.default_rng([self.seed, _positive(epoch, "epoch", low=0)]).permutation(self.num_sequences)
            self._permutation = (epoch, order)
        return self._permutation[1]

    def batch_indices(self, step: int, micro_step: int) -> list[int]:
        """Dataset rows of this rank's micro-batch `micro_step` of optimizer step `step` (both 0-based)."""
        micro_step = _positive(micro_step, "micro_step", low=0)
        if micro_step >= self.gradient_accumulation_steps:
            raise ConfigError(f"'micro_step' = {micro_step} must be < 'gradient_accumulation_steps' = "
                              f"{self.gradient_accumulation_steps}")
        epoch = self.epoch(step)
        slot = micro_step * self.world_size + self.rank
        start = (step - epoch * self.steps_per_epoch) * self.global_batch_size + slot * self.micro_batch_size
        return self.permutation(epoch)[start:start + self.micro_batch_size].tolist()

    def examples(self, step: int, micro_step: int) -> torch.Tensor:
        """LongTensor [micro_batch_size, seq] of the rows batch_indices names."""
        indices = self.batch_indices(step, micro_step)
        if isinstance(self._rows, datasets.Dataset):
            return torch.from_numpy(np.asarray(self._rows[indices]["input_ids"])).long()
        if isinstance(self._rows, torch.Tensor):
            return self._rows[torch.tensor(indices)].long()
        return torch.from_numpy(np.asarray(self._rows[indices])).long()

    def mask_seed(self, step: int, micro_step: int) -> int:
        """A seed for MLMMasker unique to (seed, step, micro_step, rank), so masks are reproducible on resume."""
        state = np.random.SeedSequence([self.seed, _MASK_STREAM, step, micro_step, self.rank]).generate_state(2)
        return (int(state[0]) << 31) ^ int(state[1])
