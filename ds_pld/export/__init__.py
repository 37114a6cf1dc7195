"""Export to other ecosystems: a Hugging Face transformers folder (`export_hf`)."""
from ds_pld.export.hf import export_hf, hf_config, hf_state_dict, to_hf_model

__all__ = ["export_hf", "hf_config", "hf_state_dict", "to_hf_model"]
