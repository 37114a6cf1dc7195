"""Pre-LN BERT for pretraining with Progressive Layer Dropping and EarlyBERT slimming."""
from ds_pld.models.bert import BertForPreTraining, PretrainingOutput, build_model
from ds_pld.models.config import PRESETS, BertConfig, build_bert_config

__all__ = ["BertConfig", "BertForPreTraining", "PRESETS", "PretrainingOutput", "build_bert_config", "build_model"]
