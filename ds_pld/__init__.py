"""ds-pld: Progressive Layer Dropping, EarlyBERT and ZeRO-aware LAMB for pre-LN BERT pretraining on DeepSpeed."""
from ds_pld.config import DsPldConfig, parse_config
from ds_pld.config_errors import ConfigError
from ds_pld.engine import DsPldEngine, initialize
from ds_pld.pld import PLDConfig, ProgressiveLayerDrop

__all__ = ["ConfigError", "DsPldConfig", "DsPldEngine", "PLDConfig", "ProgressiveLayerDrop", "initialize",
           "parse_config"]
