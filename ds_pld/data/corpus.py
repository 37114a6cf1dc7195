"""The raw corpus: which files hold which documents, checked and fingerprinted before any work starts.

Document boundaries:
- plain text files (any suffix but the JSON-lines ones): one document per block of lines separated by one or more
  blank (whitespace-only) lines, the layout of the original BERT pretraining corpora; a file without blank lines is
  one document;
- JSON-lines files (`.jsonl`, `.ndjson`, `.json`): one document per non-empty line, a JSON object whose text is in
  `text_field`;
- no files: the embedded default corpus, CPython's `pydoc_data.topics` (one document per help topic), so the job runs
  with nothing downloaded.
"""
from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ds_pld.config_errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
DEFAULT_CORPUS = "pydoc_data.topics"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CorpusFile:
    """One checked input file: its content hash feeds the cache fingerprint, `documents` the empty-corpus check."""

    path: str
    kind: str  # "text" or "jsonl"
    sha256: str
    num_bytes: int
    documents: int


def file_kind(path: str | Path) -> str:
    return "jsonl" if str(path).lower().endswith(JSONL_SUFFIXES) else "text"


def default_documents() -> list[str]:
    """The embedded corpus: English help texts shipped with CPython (about 80 documents, 0.5 MB)."""
    from pydoc_data.topics import topics

    return [text for _, text in sorted(topics.items()) if text.strip()]


def default_corpus_sha256() -> str:
    """Content hash of the default corpus, so a Python upgrade that changes the topics invalidates the cache."""
    digest = hashlib.sha256()
    for text in default_documents():
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _open_checked(path: Path):
    if not path.exists():
        raise ConfigError(f"corpus file '{path}' does not exist")
    if path.is_dir():
        raise ConfigError(f"corpus file '{path}' is a directory; pass the files inside it")
    try:
        return path.open("rb")
    except OSError as exc:
        raise ConfigError(f"corpus file '{path}' cannot be read: {exc.strerror or exc}") from exc


def _utf8_error(path: Path, offset: int, exc: UnicodeDecodeError) -> ConfigError:
    bad = exc.object[exc.start:exc.end]
    return ConfigError(f"corpus file '{path}' is not valid UTF-8: byte 0x{bad[:1].hex()} at byte offset {offset} "
                       f"({exc.reason})")


def _scan_text(path: Path, handle, digest) -> tuple[int, int]:
    """Hash, check UTF-8 (reporting the absolute byte offset) and count documents in one streaming pass."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    position = documents = 0
    in_document = False
    pending = ""
    while True:
        chunk = handle.read(_CHUNK)
        digest.update(chunk)
        buffered = len(decoder.getstate()[0])
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise _utf8_error(path, position - buffered + exc.start, exc) from exc
        position += len(chunk)
        lines = (pending + text).split("\n")
        pending = lines.pop() if chunk else ""
        for line in lines:
            if line.strip():
                documents += not in_document
                in_document = True
            else:
                in_document = False
        if not chunk:
            return documents, position


def _scan_jsonl(path: Path, handle, digest, text_field: str) -> tuple[int, int]:
    """Hash and check every line: valid UTF-8, a JSON object, `text_field` present and a string."""
    position = documents = 0
    for number, raw in enumerate(handle, start=1):
        digest.update(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _utf8_error(path, position + exc.start, exc) from exc
        position += len(raw)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"corpus file '{path}' line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ConfigError(f"corpus file '{path}' line {number}: expected one JSON object per line, got "
                              f"{type(record).__name__}")
        if text_field not in record:
            raise ConfigError(f"corpus file '{path}' line {number}: no text field '{text_field}' "
                              f"(set 'text_field' / --text_field to the key that holds the text)")
        if not isinstance(record[text_field], str):
            raise ConfigError(f"corpus file '{path}' line {number}: field '{text_field}' must be a string, got "
                              f"{type(record[text_field]).__name__}")
        documents += bool(record[text_field].strip())
    return documents, position


def scan_corpus_files(paths: Sequence[str | Path], text_field: str = "text") -> list[CorpusFile]:
    """Check every file completely before tokenizing anything, so a bad byte in the last file fails in seconds,
    not after an hour; raise ConfigError naming the file (and line / byte offset) on the first problem."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ConfigError("'corpus_files' is empty; pass at least one file or None for the default corpus")
    scanned = []
    for given in paths:
        path = Path(given).expanduser().resolve()
        kind = file_kind(path)
        digest = hashlib.sha256()
        with _open_checked(path) as handle:
            try:
                if kind == "jsonl":
                    documents, size = _scan_jsonl(path, handle, digest, text_field)
                else:
                    documents, size = _scan_text(path, handle, digest)
            except OSError as exc:
                raise ConfigError(f"corpus file '{path}' cannot be read: {exc.strerror or exc}") from exc
        scanned.append(CorpusFile(str(path), kind, digest.hexdigest(), size, documents))
    if not any(f.documents for f in scanned):
        raise ConfigError(f"the corpus has no text: no documents in {', '.join(repr(f.path) for f in scanned)}")
    return scanned


def iter_text_documents(path: str) -> Iterator[str]:
    """Blank-line separated blocks of a text file (already checked by scan_corpus_files)."""
    block: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


def iter_jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                text = json.loads(line)[text_field]
                if text.strip():
                    yield text


def generate_documents(paths: list[str], kinds: list[str], text_field: str) -> Iterator[dict[str, str]]:
    """Row generator for `datasets.Dataset.from_generator`; an empty `paths` means the default corpus."""
    if not paths:
        for text in default_documents():
            yield {"text": text}
        return
    for path, kind in zip(paths, kinds):
        documents = iter_jsonl_documents(path, text_field) if kind == "jsonl" else iter_text_documents(path)
        for text in documents:
            yield {"text": text}
