"""The tokenizer: a given one (local folder, or hub name when online) or a BERT-style WordPiece vocabulary trained
on the corpus. Either way it is saved with the dataset so training, fine-tuning and export load the same one with
`AutoTokenizer.from_pretrained(<out>/tokenizer)`."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ds_pld.config_errors import ConfigError

# Order fixes the ids: [PAD]=0 (the model's padding_idx), [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8192, length: int | None = None,
                    model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Lowercased BERT WordPiece (BERT normalizer and pre-tokenizer, `##` continuations) trained on `texts`.

    `vocab_size` is an upper bound: a small corpus runs out of merges earlier. The post-processor adds
    [CLS] ... [SEP] (and segment ids for pairs) so downstream fine-tuning gets BERT inputs from `tokenizer(text)`."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2 * len(SPECIAL_TOKENS):
        raise ConfigError(f"'vocab_size' must be an integer >= {2 * len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        limit_alphabet=1000, continuing_subword_prefix="##", show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=model_max_length,
                                   # BERT inputs: sentence pairs (GLUE) need segment ids from the tokenizer.
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def _local_folder(spec: str | Path) -> Path | None:
    """The folder `spec` names, None for a hub id; ConfigError for a path that cannot be a tokenizer folder."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"'tokenizer' = '{spec}' is a file; pass the folder that holds tokenizer.json / "
                              f"tokenizer_config.json")
        return path.resolve()
    text = str(spec)
    # `org/name` is a hub id unless `org` is a local folder: then it is a mistyped path, and asking the hub
    # would only add a minute of retries when offline.
    if path.is_absolute() or text.startswith((".", "~")) or not _HUB_ID.match(text) or (
            str(path.parent) != "." and path.parent.is_dir()):
        raise ConfigError(f"'tokenizer' folder '{spec}' does not exist")
    return None


def load_tokenizer(spec: str | Path) -> PreTrainedTokenizerBase:
    """A local tokenizer folder or a hub name (hub only when online); checked for the tokens MLM packing needs."""
    folder = _local_folder(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder) if folder is not None else str(spec))
    except Exception as exc:  # transformers raises OSError, ValueError or hub errors; all mean "not usable".
        where = f"folder '{folder}'" if folder is not None else f"'{spec}' (not a local folder; tried the hub)"
        raise ConfigError(f"'tokenizer' {where} could not be loaded: {exc}") from exc
    check_tokenizer(tokenizer, str(spec))
    return tokenizer


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Packing needs [CLS]/[SEP], masking needs [MASK], the model's padding_idx needs [PAD]."""
    missing = [kind for kind in ("cls_token", "sep_token", "mask_token", "pad_token")
               if getattr(tokenizer, kind, None) is None]
    if missing:
        raise ConfigError(f"'tokenizer' '{name}' has no {', '.join(missing)}; a BERT-style tokenizer is required")


def tokenizer_fingerprint(spec: str | Path) -> str:
    """Content hash of a local folder (edits invalidate the cache); a hub name stands for itself."""
    folder = _local_folder(spec)
    if folder is None:
        return f"hub:{spec}"
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()
