"""EarlyBERT (Chen et al. 2021): early-bird structured tickets on attention heads and FFN neurons.

Search: train with slimming coefficients and an L1 penalty on them (`EarlyBird.penalty`); detect: every
`check_every` steps compare the masks the coefficients give (`EarlyBird.observe` / `should_draw`); draw: turn the
masks into a `Ticket` and build the physically smaller model (`prune_model`), then train it on.
"""
from ds_pld.earlybert.coefficients import read_coefficients, slimming_layers
from ds_pld.earlybert.config import EarlyBertConfig
from ds_pld.earlybert.detector import EarlyBird
from ds_pld.earlybert.masks import compute_masks, hamming_distance, num_pruned, validate_for_model
from ds_pld.earlybert.prune import prune_layer_state, prune_model
from ds_pld.earlybert.ticket import Ticket

__all__ = ["EarlyBertConfig", "EarlyBird", "Ticket", "compute_masks", "hamming_distance", "num_pruned",
           "prune_layer_state", "prune_model", "read_coefficients", "slimming_layers", "validate_for_model"]
