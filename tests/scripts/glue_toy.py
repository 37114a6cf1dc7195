"""Toy material for the GLUE and export tests: a tiny BERT WordPiece tokenizer, a tiny "pretrained" model folder,
and GLUE-layout TSV folders whose labels a small model can learn in a few dozen steps (a keyword decides them)."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ds_pld.models import BertForPreTraining, build_model
from ds_pld.models.io import save_pretrained

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
KEYWORDS = ("good", "bad")
FILLER = ("the", "a", "b", "movie", "film", "is", "was", "very", "plot", "actor", "scene", "story", "cat", "dog",
          "one", "two", "it", "and", "of", "to")
VOCAB = (*SPECIALS, *KEYWORDS, *FILLER, "##s", "\"", "'", ".")


def make_tokenizer() -> PreTrainedTokenizerFast:
    """BERT-style WordPiece over a fixed vocabulary: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4."""
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", VOCAB.index("[CLS]")), ("[SEP]", VOCAB.index("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)


def make_model(seed: int = 0, **overrides) -> BertForPreTraining:
    """bert-tiny over the toy vocabulary, with weights perturbed away from the init (LayerNorms not identity,
    biases not zero) so that comparisons exercise every parameter."""
    torch.manual_seed(seed)
    model = build_model("bert-tiny", **{"vocab_size": len(VOCAB), "max_position_embeddings": 64, **overrides})
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def save_toy_model(folder: Path, **overrides) -> Path:
    return save_pretrained(make_model(**overrides), folder, make_tokenizer())


def _sentence(rng: random.Random, keyword: str | None = None, low: int = 3, high: int = 8) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(low, high))]
    if keyword is not None:
        words.insert(rng.randint(0, len(words)), keyword)
    return " ".join(words)


def _write(path: Path, header: str | None, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in ([header] if header else []) + rows), encoding="utf-8")


def write_sst2(glue_dir: Path, train: int = 256, dev: int = 64, seed: int = 0) -> None:
    """Single sentences: label 1 iff the sentence says 'good' (else it says 'bad')."""
    rng = random.Random(seed)
    for split, n in (("train", train), ("dev", dev)):
        rows = []
        for _ in range(n):
            label = rng.randint(0, 1)
            rows.append(f"{_sentence(rng, KEYWORDS[1 - label])}\t{label}")
        _write(glue_dir / "SST-2" / f"{split}.tsv", "sentence\tlabel", rows)


def write_cola(glue_dir: Path, train: int = 64, dev: int = 32, seed: int = 0) -> None:
    """CoLA's header-less layout: source, label, original label, sentence."""
    rng = random.Random(seed)
    for split, n in (("train", train), ("dev", dev)):
        rows = []
        for _ in range(n):
            label = rng.randint(0, 1)
            mark = "" if label else "*"
            rows.append(f"toy\t{label}\t{mark}\t{_sentence(rng, KEYWORDS[1 - label])}")
        _write(glue_dir / "CoLA" / f"{split}.tsv", None, rows)


def write_stsb(glue_dir: Path, train: int = 256, dev: int = 64, seed: int = 0) -> None:
    """Pairs scored 0-5: the number of times 'good' appears in the pair (up to 5)."""
    rng = random.Random(seed)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split, n in (("train", train), ("dev", dev)):
        rows = []
        for i in range(n):
            score = rng.randint(0, 5)
            first = rng.randint(0, score)
            halves = []
            for count in (first, score - first):
                words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))] + ["good"] * count
                rng.shuffle(words)
                halves.append(" ".join(words))
            rows.append(f"{i}\tmain\ttoy\t2024\t{i}\tnone\tnone\t{halves[0]}\t{halves[1]}\t{score:.3f}")
        _write(glue_dir / "STS-B" / f"{split}.tsv", header, rows)


def write_rte(glue_dir: Path, train: int = 256, dev: int = 64, seed: int = 0) -> None:
    """Pairs: 'entailment' iff the second sentence says 'good' (the first says either keyword at random)."""
    rng = random.Random(seed)
    for split, n in (("train", train), ("dev", dev)):
        rows = []
        for i in range(n):
            label = rng.choice(("entailment", "not_entailment"))
            second = _sentence(rng, "good" if label == "entailment" else "bad")
            rows.append(f"{i}\t{_sentence(rng, rng.choice(KEYWORDS))}\t{second}\t{label}")
        _write(glue_dir / "RTE" / f"{split}.tsv", "index\tsentence1\tsentence2\tlabel", rows)


def write_mnli(glue_dir: Path, n: int = 12, seed: int = 0) -> None:
    """MNLI's layout (train, dev_matched, dev_mismatched; extra annotator columns); labels cycle through all three."""
    rng = random.Random(seed)
    labels = ("entailment", "neutral", "contradiction")
    for stem in ("train", "dev_matched", "dev_mismatched"):
        annotators = "\tlabel1" if stem == "train" else "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5"
        header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                  f"sentence1_parse\tsentence2_parse\tsentence1\tsentence2{annotators}\tgold_label")
        rows = []
        for i in range(n):
            gold = labels[i % 3]
            votes = "\t".join([gold] * annotators.count("label"))
            rows.append(f"{i}\t{i}\t{i}e\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{_sentence(rng)}\t"
                        f"{_sentence(rng)}\t{votes}\t{gold}")
        _write(glue_dir / "MNLI" / f"{stem}.tsv", header, rows)


def load_script(path: Path) -> ModuleType:
    """A launch/ script as a module (to call its `main` in-process) without putting launch/ on sys.path."""
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
