"""Pretraining data: corpus -> WordPiece tokenizer -> packed [CLS] ... [SEP] sequences -> deterministic step
batches -> dynamic MLM masks. See docs/data.md."""
from ds_pld.data.batches import StepBatches
from ds_pld.data.corpus import CorpusFile, default_documents, scan_corpus_files
from ds_pld.data.loading import PretrainingData, load_pretraining_data
from ds_pld.data.masking import MLMMasker
from ds_pld.data.packing import check_seq_length, pack_token_stream, split_documents
from ds_pld.data.prepare import DATASET_DIR, META_FILE, TOKENIZER_DIR, default_num_proc, prepare_dataset
from ds_pld.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_wordpiece

__all__ = [
           "DATASET_DIR",
           "META_FILE",
           "SPECIAL_TOKENS",
           "TOKENIZER_DIR",
           "CorpusFile",
           "MLMMasker",
           "PretrainingData",
           "StepBatches",
           "check_seq_length",
           "default_documents",
           "default_num_proc",
           "load_pretraining_data",
           "load_tokenizer",
           "pack_token_stream",
           "prepare_dataset",
           "scan_corpus_files",
           "split_documents",
           "train_wordpiece",
]
