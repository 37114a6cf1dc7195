"""ds-pld: Progressive Layer Dropping, EarlyBERT and ZeRO-aware LAMB for pre-LN BERT pretraining on DeepSpeed."""
from ds_pld.config import DsPldConfig, parse_config
from ds_pld.config_errors import ConfigError
from ds_pld.engine_checkpoint import load_checkpoint, save_checkpoint
from ds_pld.pld import PLDConfig, ProgressiveLayerDrop
from ds_pld.plugin import attach, initialize
from ds_pld.plugin_state import DsPld, plugin_of

__all__ = ["ConfigError", "DsPld", "DsPldConfig", "PLDConfig", "ProgressiveLayerDrop", "attach", "initialize",
           "load_checkpoint", "parse_config", "plugin_of", "save_checkpoint"]
