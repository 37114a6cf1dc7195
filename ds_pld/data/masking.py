"""Dynamic MLM masking, reproducible from an explicit per-batch seed."""
from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from ds_pld.config_errors import ConfigError

IGNORE_INDEX = -100


class MLMMasker:
    """BERT masking: each non-special token is selected with `mlm_probability`; a selected token becomes [MASK]
    80% of the time, a random non-special token 10%, and stays unchanged 10%. Labels are the original ids at
    selected positions and -100 elsewhere.

    Why not `transformers.DataCollatorForLanguageModeling` (5.23): its `seed` builds one generator on the first
    call and advances it across calls, so a batch's mask depends on every earlier call, not on the step (a resumed
    run would mask differently); per-call seeding means writing its undocumented `generator` attribute; and with a
    seed it raises in any process not named MainProcess unless inside a DataLoader worker, where it re-seeds with
    seed + worker id. It also draws random replacements from the whole vocabulary, special tokens included, and
    builds the special-token mask row by row in Python. This class is the same algorithm as a pure function of
    (input_ids, seed), with no global RNG use."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, mlm_probability: float = 0.15,
                 mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1):
        for key, value in (("mlm_probability", mlm_probability), ("mask_replace_prob", mask_replace_prob),
                           ("random_replace_prob", random_replace_prob)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"'{key}' = {value!r} must be a number in [0, 1]")
        if mask_replace_prob + random_replace_prob > 1.0:
            raise ConfigError(f"'mask_replace_prob' + 'random_replace_prob' = "
                              f"{mask_replace_prob + random_replace_prob} must be <= 1")
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer needs a [MASK] and a [PAD] token for MLM")
        self.mlm_probability = float(mlm_probability)
        self.mask_replace_prob = float(mask_replace_prob)
        self.random_replace_prob = float(random_replace_prob)
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        vocabulary = torch.arange(len(tokenizer))
        self.replacement_ids = vocabulary[~torch.isin(vocabulary, self.special_ids)]

    def __call__(self, input_ids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """{'input_ids': masked copy, 'labels', 'attention_mask'} for a LongTensor [batch, seq]; the input is not
        modified. attention_mask is all ones for fully packed data; it is returned so padded inputs also work."""
        generator = torch.Generator().manual_seed(int(seed))
        original = input_ids.to(torch.long)
        selectable = ~torch.isin(original, self.special_ids)
        selected = (torch.rand(original.shape, generator=generator) < self.mlm_probability) & selectable
        action = torch.rand(original.shape, generator=generator)
        to_mask = selected & (action < self.mask_replace_prob)
        to_random = selected & (action >= self.mask_replace_prob) & (
            action < self.mask_replace_prob + self.random_replace_prob)
        random_ids = self.replacement_ids[torch.randint(len(self.replacement_ids), original.shape, generator=generator)]
        masked = torch.where(to_mask, torch.full_like(original, self.mask_token_id), original)
        masked = torch.where(to_random, random_ids, masked)
        return {"input_ids": masked,
                "labels": torch.where(selected, original, torch.full_like(original, IGNORE_INDEX)),
                "attention_mask": (original != self.pad_token_id).long()}
