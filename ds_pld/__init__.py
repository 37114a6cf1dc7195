"""ds-pld: Progressive Layer Dropping, EarlyBERT and ZeRO-aware LAMB for pre-LN BERT pretraining on DeepSpeed."""
from ds_pld.compat import check_installed_deepspeed

check_installed_deepspeed()  # before anything imports DeepSpeed: an unsupported one is named, with the range

from ds_pld.config import DsPldConfig, parse_config  # noqa: E402
from ds_pld.config_errors import ConfigError  # noqa: E402
from ds_pld.engine_checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ds_pld.pld import PLDConfig, ProgressiveLayerDrop  # noqa: E402
from ds_pld.plugin import attach, initialize  # noqa: E402
from ds_pld.plugin_state import DsPld, plugin_of  # noqa: E402

__all__ = ["ConfigError", "DsPld", "DsPldConfig", "PLDConfig", "ProgressiveLayerDrop", "attach", "initialize",
           "load_checkpoint", "parse_config", "plugin_of", "save_checkpoint"]
