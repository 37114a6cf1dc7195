"""WordNet part of speech: a downstream classification task built offline from the dictd WordNet database that
`launch/fetch_corpus.sh` fetches (`<corpus>/root/usr/share/dictd/wn.dict.dz` + `wn.index`).

One example per headword: the gloss of its FIRST sense, labelled with that sense's part of speech (n, v, adj, adv).
A WordNet entry reads

    cancellate
        adj 1: having a latticelike structure pierced with holes or
               windows [syn: {cancellate}, {cancellated}]
        2: having an open ...
        v 1: ...

Each sense starts with its number, the first sense of a part of speech with the POS marker before it. The gloss is
cleaned: `[syn: ...]` / `[ant: ...]` brackets and the quoted usage examples after `;` dropped, lines joined,
whitespace collapsed, and the headword itself replaced by a placeholder so the text does not give the word away.
Multi-word headwords, headwords with fewer than two letters (numbers, single letters) and entries whose first sense
has no POS marker are skipped; a headword that has several entries (different case) counts once.

The classes are balanced (the same count per label in each split, capped by the smallest class) and the split goes
by headword: a stable hash of the lower-cased headword decides train or dev, so no headword is in both. Everything is
deterministic. The result is a custom task folder for the GLUE harness (`<out>/wordpos/task.json`, `train.tsv`,
`dev.tsv`): `launch/finetune.py --tasks wordpos --glue_dir <out>`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_pld.config_errors import ConfigError
from ds_pld.data.corpus import dictd_index_path, iter_dictd_documents
from ds_pld.glue.tasks import TASK_FILE, load_custom_task

POS_LABELS = ("n", "v", "adj", "adv")
TASK_NAME = "wordpos"
PLACEHOLDER = "___"
TSV_HEADER = ("sentence", "label")
SPLITS = ("train", "dev")

# A sense line: its indentation, the POS marker (first sense of a part of speech only), the sense number, the text.
_SENSE = re.compile(r"^(?P<indent>[ \t]+)(?:(?P<pos>n|v|adj|adv)[ \t]+)?\d+[ \t]*:[ \t]*(?P<text>.*)$")
_BRACKET = re.compile(r"\[\s*[A-Za-z]+\s*:[^\]]*\]")  # [syn: {...}], [ant: {...}], [also: ...]
# '; "usage example"; "another"' to the end (a few glosses introduce the first example with ':' or ',').
_EXAMPLES = re.compile(r'[;:,]\s*["\u201c].*$')
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class PosExample:
    headword: str
    label: str
    sentence: str


def clean_gloss(gloss: str, headword: str, placeholder: str = PLACEHOLDER) -> str:
    """The gloss on one line without synonym/antonym brackets and usage examples, the headword masked."""
    text = _BRACKET.sub(" ", _SPACE.sub(" ", gloss))
    text = _EXAMPLES.sub("", text)
    pattern = re.compile(rf"(?<![\w'-]){re.escape(headword)}(?![\w'-])", re.IGNORECASE)
    text = pattern.sub(placeholder, text)
    return _SPACE.sub(" ", text).strip(" ;,")


def parse_entry(entry: str, placeholder: str = PLACEHOLDER) -> PosExample | None:
    """The first sense of one dictd WordNet entry as an example; None for a multi-word headword (or one with fewer
    than two letters: numbers, single letters), an entry without a POS marker on its first sense, or an empty
    gloss."""
    lines = entry.strip("\n").split("\n")
    headword = lines[0].strip()
    if len(headword.split()) != 1 or sum(char.isalpha() for char in headword) < 2:
        return None  # several words, or no word at all ('12', '.22', the letter 'A')
    start = next((i for i, line in enumerate(lines) if i and _SENSE.match(line)), None)
    first = None if start is None else _SENSE.match(lines[start])
    if first is None or first.group("pos") is None:
        return None
    indent = len(first.group("indent").expandtabs())
    gloss = [first.group("text")]
    for line in lines[start + 1:]:
        sense = _SENSE.match(line)
        if not line.strip() or (sense is not None and len(sense.group("indent").expandtabs()) <= indent):
            break  # the next sense (or the end of the entry)
        gloss.append(line)
    sentence = clean_gloss(" ".join(gloss), headword, placeholder)
    if not sentence or sentence == placeholder:
        return None
    return PosExample(headword, first.group("pos"), sentence)


def iter_examples(entries: Iterable[str], placeholder: str = PLACEHOLDER) -> Iterator[PosExample]:
    """The examples of dictd entries in order, each lower-cased headword once (its first entry)."""
    seen: set[str] = set()
    for entry in entries:
        example = parse_entry(entry, placeholder)
        if example is not None and example.headword.lower() not in seen:
            seen.add(example.headword.lower())
            yield example


def read_wordnet(path: str | Path, placeholder: str = PLACEHOLDER, max_entries: int | None = None
                 ) -> list[PosExample]:
    """Every example of a dictd WordNet database (`wn.dict.dz` with `wn.index` beside it), read with the corpus
    reader of `ds_pld.data.corpus`; `max_entries`: only the first so many entries (in file order; quick checks)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"WordNet database '{path}' does not exist (fetch it with launch/fetch_corpus.sh: "
                          f"<corpus>/root/usr/share/dictd/wn.dict.dz)")
    if not dictd_index_path(path).is_file():
        raise ConfigError(f"WordNet database '{path}' has no index '{dictd_index_path(path)}' beside it")
    try:
        entries = itertools.islice(iter_dictd_documents(str(path)), max_entries)
        return list(iter_examples(entries, placeholder))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ConfigError(f"WordNet database '{path}' cannot be read: {exc}") from exc


def headword_hash(headword: str, seed: int = 0) -> tuple[float, int]:
    """(a uniform number in [0, 1) that decides the split, an order key for the selection) of the lower-cased
    headword: stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"wordpos:{seed}:{headword.lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64, int.from_bytes(digest[8:16], "big")


def split_and_balance(examples: Iterable[PosExample], train_per_class: int, dev_per_class: int,
                      dev_fraction: float | None = None, seed: int = 0,
                      labels: tuple[str, ...] = POS_LABELS) -> tuple[dict[str, list[PosExample]], dict[str, Any]]:
    """Train/dev by headword hash (dev: hash < `dev_fraction`, default dev / (train + dev) of the requested sizes),
    then per split the same number of examples per label: the requested one, capped by the smallest class there.
    Within a label the hash order picks the examples (not the alphabet); the rows come out in hash order."""
    for key, value in (("train_per_class", train_per_class), ("dev_per_class", dev_per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"'{key}' = {value!r} must be an integer >= 1")
    if dev_fraction is None:
        dev_fraction = dev_per_class / (train_per_class + dev_per_class)
    if not 0.0 < dev_fraction < 1.0:
        raise ConfigError(f"'dev_fraction' = {dev_fraction!r} must be in (0, 1)")
    wanted = {"train": train_per_class, "dev": dev_per_class}
    pools: dict[str, dict[str, list[tuple[int, PosExample]]]] = {s: {label: [] for label in labels} for s in SPLITS}
    for example in examples:
        if example.label not in labels:
            continue
        where, order = headword_hash(example.headword, seed)
        pools["dev" if where < dev_fraction else "train"][example.label].append((order, example))
    chosen: dict[str, list[PosExample]] = {}
    available = {split: {label: len(pool) for label, pool in by_label.items()} for split, by_label in pools.items()}
    for split, by_label in pools.items():
        per_class = min(wanted[split], *available[split].values())
        if per_class == 0:
            empty = [label for label, count in available[split].items() if not count]
            raise ConfigError(f"no example labelled {empty} falls in the {split} split; a larger database is needed")
        picked = [item for pool in by_label.values() for item in sorted(pool, key=lambda x: x[0])[:per_class]]
        chosen[split] = [example for _, example in sorted(picked, key=lambda x: x[0])]
    info = {"dev_fraction": dev_fraction, "seed": seed, "available": available}
    return chosen, info


def write_tsv(path: Path, rows: Iterable[PosExample]) -> None:
    """`sentence<TAB>label` with a header; the harness reads it with quoting off, so quotes stay as they are."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write("\t".join(TSV_HEADER) + "\n")
        for row in rows:
            if not row.sentence or _SPACE.sub(" ", row.sentence).strip() != row.sentence:
                raise ValueError(f"the sentence of {row.headword!r} holds a tab, a line break or untidy whitespace")
            handle.write(f"{row.sentence}\t{row.label}\n")


def build_wordnet_pos(wordnet: str | Path, out: str | Path, train_per_class: int = 1500, dev_per_class: int = 400,
                      dev_fraction: float | None = None, seed: int = 0, placeholder: str = PLACEHOLDER,
                      name: str = TASK_NAME, max_entries: int | None = None) -> dict[str, Any]:
    """Write the task folder `<out>/<name>/` (task.json, train.tsv, dev.tsv) from a dictd WordNet database and
    return what went in: per split the count of each label, the candidates there were, and the settings.
    `max_entries` reads only the first entries of the database (quick checks; the default reads all)."""
    if not placeholder.strip() or _SPACE.search(placeholder):
        raise ConfigError(f"'placeholder' = {placeholder!r} must be one word")
    if max_entries is not None and (isinstance(max_entries, bool) or not isinstance(max_entries, int)
                                    or max_entries < 1):
        raise ConfigError(f"'max_entries' = {max_entries!r} must be an integer >= 1")
    examples = read_wordnet(wordnet, placeholder, max_entries)
    chosen, info = split_and_balance(examples, train_per_class, dev_per_class, dev_fraction, seed)
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    task = {"name": name, "text_columns": [TSV_HEADER[0]], "label_column": TSV_HEADER[1], "labels": list(POS_LABELS),
            "metrics": ["accuracy"],
            "description": (f"WordNet part of speech of a headword's first sense from its gloss (headword masked as "
                            f"{placeholder!r}); built by ds_pld.glue.wordnet_pos from '{Path(wordnet).name}', "
                            f"{train_per_class}/{dev_per_class} per class requested, seed {seed}")}
    for split in SPLITS:
        write_tsv(folder / f"{split}.tsv", chosen[split])
    (folder / TASK_FILE).write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")
    load_custom_task(folder / TASK_FILE)  # what was written is a valid custom task
    counts = {split: {label: Counter(e.label for e in rows)[label] for label in POS_LABELS}
              for split, rows in chosen.items()}
    return {"task_dir": str(folder), "examples": len(examples), "counts": counts, **info,
            "max_entries": max_entries}


def bag_of_words_reference(task_dir: str | Path) -> dict[str, Any]:
    """What the words alone give: logistic regression on TF-IDF unigrams and bigrams of train, its dev accuracy,
    and the accuracy of always answering train's most frequent label. Reads the folder like the harness does."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    from ds_pld.glue.data import load_glue_tsv

    task_dir = Path(task_dir)
    task = load_custom_task(task_dir / TASK_FILE)
    if task.is_regression:
        raise ConfigError(f"custom task {task.name!r} is a regression; the bag-of-words reference classifies")
    data = load_glue_tsv(task, task_dir.parent)

    def texts(split) -> list[str]:
        if "text_b" in split.column_names:
            return [f"{a} {b}" for a, b in zip(split["text_a"], split["text_b"])]
        return list(split["text_a"])

    train, dev = data.train, data.dev["dev"]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    features = vectorizer.fit_transform(texts(train))
    classifier = LogisticRegression(max_iter=2000, C=4.0)
    classifier.fit(features, train["label"])
    predicted = classifier.predict(vectorizer.transform(texts(dev)))
    counts = Counter(train["label"])
    majority = min(counts, key=lambda label: (-counts[label], label))  # ties: the lowest id, deterministic
    return {"task": task.name, "train": len(train), "dev": len(dev),
            "bag_of_words_accuracy": float(accuracy_score(dev["label"], predicted)),
            "majority_label": task.labels[majority],
            "majority_accuracy": float(accuracy_score(dev["label"], [majority] * len(dev)))}
