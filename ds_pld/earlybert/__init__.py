"""EarlyBERT (Chen et al. 2021): early-bird structured tickets on attention heads and FFN neurons."""
from ds_pld.earlybert.config import EarlyBertConfig

__all__ = ["EarlyBertConfig"]
