"""The raw corpus: which files hold which documents, checked and fingerprinted before any work starts.

Document boundaries:
- plain text files (any suffix but the JSON-lines ones): one document per block of lines separated by one or more
  blank (whitespace-only) lines, the layout of the original BERT pretraining corpora; a file without blank lines is
  one document;
- JSON-lines files (`.jsonl`, `.ndjson`, `.json`): one document per non-empty line, a JSON object whose text is in
  `text_field`;
- dictd databases (`NAME.dict` or `NAME.dict.dz` with `NAME.index` beside it, the format of Debian's `dict-*`
  packages): one document per dictionary entry, located through the index (its `00-database-*` header entries
  skipped), so an entry is never split between the train and validation splits;
- no files: the embedded default corpus, CPython's `pydoc_data.topics` (one document per help topic), so the job runs
  with nothing downloaded.

Files ending in `.gz` or `.dz` (dictzip, gzip-compatible: what Debian's dictd packages ship) are read through gzip as
a stream, never unpacked to disk; the suffix before it decides text or JSON-lines. Bytes that are not UTF-8 are an
error by default; `encoding_errors="replace"` turns each such byte into U+FFFD and counts it.
"""
from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ds_pld.config_errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSED_SUFFIXES = (".gz", ".dz")
DICTD_SUFFIX = ".dict"
DICTD_HEADER = "00-database-"
_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
ENCODING_ERRORS = ("strict", "replace")
DEFAULT_CORPUS = "pydoc_data.topics"
_CHUNK = 1 << 20
# Undecodable bytes, as `surrogateescape` represents them (one lone surrogate per byte): counted, then replaced.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class CorpusFile:
    """One checked input file: its content hash feeds the cache fingerprint, `documents` the empty-corpus check."""

    path: str
    kind: str  # "text", "jsonl" or "dictd"
    sha256: str
    num_bytes: int  # of the (decompressed) content
    documents: int
    replaced_bytes: int = 0  # bytes that were not UTF-8, replaced by U+FFFD (encoding_errors="replace" only)


def is_compressed(path: str | Path) -> bool:
    return str(path).lower().endswith(COMPRESSED_SUFFIXES)


def _uncompressed_name(path: str | Path) -> str:
    name = str(path)
    return name[:name.rindex(".")] if is_compressed(name) else name


def file_kind(path: str | Path) -> str:
    name = _uncompressed_name(path).lower()
    if name.endswith(DICTD_SUFFIX):
        return "dictd"
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def dictd_index_path(path: str | Path) -> Path:
    """`gcide.dict.dz` -> `gcide.index`, as dictd looks it up."""
    return Path(_uncompressed_name(path)[:-len(DICTD_SUFFIX)] + ".index")


def _dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _DICTD_DIGITS.index(char)
    return value


def read_dictd_index(path: str | Path) -> list[tuple[int, int]]:
    """The (offset, length) of each entry of a dictd database in file order, header entries skipped; several
    headwords that point to one entry give it once."""
    index = dictd_index_path(path)
    if not index.is_file():
        raise ConfigError(f"corpus file '{path}' is a dictd database but its index '{index}' does not exist")
    entries = set()
    with index.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3 or not fields[1] or not fields[2]:
                raise ConfigError(f"dictd index '{index}' line {number}: expected 'headword<TAB>offset<TAB>length'")
            if fields[0].startswith(DICTD_HEADER):
                continue
            try:
                entries.add((_dictd_number(fields[1]), _dictd_number(fields[2])))
            except ValueError:
                raise ConfigError(f"dictd index '{index}' line {number}: offset or length is not dictd base64") \
                    from None
    return sorted(entries)


def check_encoding_errors(value: str, block: str | None = None) -> str:
    if value not in ENCODING_ERRORS:
        key = f"{block}.encoding_errors" if block else "encoding_errors"
        raise ConfigError(f"'{key}' = {value!r} must be one of {ENCODING_ERRORS}")
    return value


def expand_corpus_paths(patterns: Sequence[str | Path]) -> list[str]:
    """Glob patterns (`**` included, sorted for a stable document order) expanded; plain paths kept as given so the
    scan can name a missing file. Shell-independent, so a config can list `docs/**/*.txt` for thousands of shards."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    paths: list[str] = []
    for pattern in map(str, patterns):
        if not _GLOB_CHARS.search(pattern):
            paths.append(pattern)
            continue
        matches = sorted(p for p in glob.glob(str(Path(pattern).expanduser()), recursive=True) if Path(p).is_file())
        if not matches:
            raise ConfigError(f"corpus pattern '{pattern}' matches no file")
        paths.extend(matches)
    # A file reached twice (through a symlinked folder, or two overlapping patterns) is read once.
    unique: dict[str, str] = {}
    for path in paths:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def open_corpus_bytes(path: str | Path):
    """A binary stream of the file's content, decompressed on the fly for `.gz` / `.dz`."""
    return gzip.open(path, "rb") if is_compressed(path) else open(path, "rb")


def decode_errors(encoding_errors: str) -> str:
    """The codec error handler: `surrogateescape` keeps one marker per bad byte, so replacing can count bytes."""
    return "strict" if encoding_errors == "strict" else "surrogateescape"


def replace_escaped_bytes(text: str) -> str:
    return _ESCAPED_BYTE.sub("\ufffd", text)


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
        return open_corpus_bytes(path)
    except OSError as exc:
        raise ConfigError(f"corpus file '{path}' cannot be read: {exc.strerror or exc}") from exc


def _utf8_error(path: Path, offset: int, exc: UnicodeDecodeError) -> ConfigError:
    bad = exc.object[exc.start:exc.end]
    where = " of the decompressed content" if is_compressed(path) else ""
    return ConfigError(f"corpus file '{path}' is not valid UTF-8: byte 0x{bad[:1].hex()} at byte offset {offset}"
                       f"{where} ({exc.reason}); to replace such bytes with U+FFFD and count them, set "
                       f"'data.encoding_errors' = 'replace' (--encoding_errors replace)")


def _scan_text(path: Path, handle, digest, errors: str) -> tuple[int, int, int]:
    """Hash, check UTF-8 (reporting the absolute byte offset) and count documents and replaced bytes in one
    streaming pass."""
    decoder = codecs.getincrementaldecoder("utf-8")(decode_errors(errors))
    position = documents = replaced = 0
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
        if errors != "strict":
            replaced += len(_ESCAPED_BYTE.findall(text))
        lines = (pending + text).split("\n")
        pending = lines.pop() if chunk else ""
        for line in lines:
            if line.strip():
                documents += not in_document
                in_document = True
            else:
                in_document = False
        if not chunk:
            return documents, position, replaced


def _scan_jsonl(path: Path, handle, digest, text_field: str, errors: str) -> tuple[int, int, int]:
    """Hash and check every line: valid UTF-8, a JSON object, `text_field` present and a string."""
    position = documents = replaced = 0
    for number, raw in enumerate(handle, start=1):
        digest.update(raw)
        try:
            line = raw.decode("utf-8", decode_errors(errors))
        except UnicodeDecodeError as exc:
            raise _utf8_error(path, position + exc.start, exc) from exc
        position += len(raw)
        if errors != "strict":
            replaced += len(_ESCAPED_BYTE.findall(line))
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
    return documents, position, replaced


def _check_dictd_entries(path: Path, size: int, digest) -> int:
    """The index must point inside the content; it joins the content hash (another index is another corpus)."""
    entries = read_dictd_index(path)
    digest.update(dictd_index_path(path).read_bytes())
    for offset, length in entries:
        if offset + length > size:
            raise ConfigError(f"dictd index '{dictd_index_path(path)}' points past the end of '{path}' "
                              f"({offset} + {length} > {size} bytes)")
    return len(entries)


def scan_corpus_files(paths: Sequence[str | Path], text_field: str = "text",
                      encoding_errors: str = "strict") -> list[CorpusFile]:
    """Check every file completely before tokenizing anything, so a bad byte in the last file fails in seconds,
    not after an hour; raise ConfigError naming the file (and line / byte offset) on the first problem. Glob
    patterns are expanded first (`expand_corpus_paths`)."""
    check_encoding_errors(encoding_errors)
    paths = expand_corpus_paths(paths)
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
                    documents, size, replaced = _scan_jsonl(path, handle, digest, text_field, encoding_errors)
                else:
                    documents, size, replaced = _scan_text(path, handle, digest, encoding_errors)
                if kind == "dictd":
                    documents = _check_dictd_entries(path, size, digest)
            except (OSError, EOFError, zlib.error) as exc:  # gzip: BadGzipFile is an OSError; truncation EOFError
                raise ConfigError(f"corpus file '{path}' cannot be read: {getattr(exc, 'strerror', None) or exc}") \
                    from exc
        scanned.append(CorpusFile(str(path), kind, digest.hexdigest(), size, documents, replaced))
    if not any(f.documents for f in scanned):
        raise ConfigError(f"the corpus has no text: no documents in {', '.join(repr(f.path) for f in scanned)}")
    return scanned


def _open_text(path: str, encoding_errors: str):
    return io.TextIOWrapper(open_corpus_bytes(path), encoding="utf-8", errors=decode_errors(encoding_errors))


def _lines(path: str, encoding_errors: str) -> Iterator[str]:
    with _open_text(path, encoding_errors) as handle:
        for line in handle:
            yield replace_escaped_bytes(line) if encoding_errors != "strict" else line


def iter_text_documents(path: str, encoding_errors: str = "strict") -> Iterator[str]:
    """Blank-line separated blocks of a text file (already checked by scan_corpus_files)."""
    block: list[str] = []
    for line in _lines(path, encoding_errors):
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def iter_jsonl_documents(path: str, text_field: str, encoding_errors: str = "strict") -> Iterator[str]:
    for line in _lines(path, encoding_errors):
        if line.strip():
            text = json.loads(line)[text_field]
            if text.strip():
                yield text


def iter_dictd_documents(path: str, encoding_errors: str = "strict") -> Iterator[str]:
    """Dictionary entries in file order, read in one forward pass over the (decompressed) stream; an entry that
    overlaps the one before it (none does in Debian's gcide and wn) is skipped, so no text is read twice."""
    position = 0
    with open_corpus_bytes(path) as handle:
        for offset, length in read_dictd_index(path):
            if offset < position:
                continue
            handle.seek(offset)
            raw = handle.read(length)
            position = offset + length
            text = raw.decode("utf-8", decode_errors(encoding_errors))
            if encoding_errors != "strict":
                text = replace_escaped_bytes(text)
            if text.strip():
                yield text.strip("\n")


def generate_documents(paths: list[str], kinds: list[str], text_field: str,
                       encoding_errors: str = "strict") -> Iterator[dict[str, str]]:
    """Row generator for `datasets.Dataset.from_generator`; an empty `paths` means the default corpus."""
    if not paths:
        for text in default_documents():
            yield {"text": text}
        return
    for path, kind in zip(paths, kinds):
        if kind == "jsonl":
            documents = iter_jsonl_documents(path, text_field, encoding_errors)
        elif kind == "dictd":
            documents = iter_dictd_documents(path, encoding_errors)
        else:
            documents = iter_text_documents(path, encoding_errors)
        for text in documents:
            yield {"text": text}
