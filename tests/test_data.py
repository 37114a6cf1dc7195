"""Data pipeline: corpus checks, WordPiece training, packing, document-level split, caching, step batches, masking."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from dictd_fixtures import dictd_number
from transformers import AutoTokenizer

from ds_pld.config_errors import ConfigError
from ds_pld.data import (
    MLMMasker,
    StepBatches,
    check_seq_length,
    load_pretraining_data,
    pack_token_stream,
    prepare_dataset,
    split_documents,
)

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32


def word(i: int) -> str:
    """A distinct made-up word per document, so a document's tokens identify it in the packed output."""
    return "zq" + "".join(chr(97 + (i // 26 ** k) % 26) for k in range(2))


def write_word_corpus(path: Path, documents: int, repeats: int = 40) -> Path:
    """Text file with `documents` blank-line separated documents; document i repeats word(i)."""
    blocks = [" ".join([word(i)] * (repeats // 2)) + "\n" + " ".join([word(i)] * (repeats - repeats // 2))
              for i in range(documents)]
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def arrow_mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_data(tmp_path_factory) -> Path:
    """The embedded-corpus path end to end: trains a WordPiece vocabulary, packs, splits."""
    return prepare_dataset(tmp_path_factory.mktemp("default"), max_seq_length=SEQ, vocab_size=2000, num_proc=1)


# --- preparation -----------------------------------------------------------------------------------------------


def test_default_corpus_end_to_end(default_data: Path) -> None:
    data = load_pretraining_data(default_data)
    meta = json.loads((default_data / "meta.json").read_text())
    assert meta["settings"]["default_corpus"] == "pydoc_data.topics"
    assert data.max_seq_length == SEQ and 1000 < data.vocab_size <= 2000 and meta["dtype"] == "int16"
    # The saved tokenizer is a lowercasing BERT WordPiece with the fixed special ids, loadable by AutoTokenizer.
    tokenizer = AutoTokenizer.from_pretrained(str(default_data / "tokenizer"))
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    assert [tokenizer.convert_tokens_to_ids(t) for t in specials] == [0, 1, 2, 3, 4]
    assert tokenizer.tokenize("The Statement") == tokenizer.tokenize("the statement")
    assert tokenizer("import it")["input_ids"][0] == 2 and tokenizer("import it")["input_ids"][-1] == 3
    on_disk = datasets.load_from_disk(str(default_data / "dataset"))
    assert set(on_disk) == {"train", "validation"} and on_disk["train"].features["input_ids"].feature.dtype == "int16"
    for name, split in (("train", data.train), ("validation", data.validation)):
        rows = split[:]["input_ids"]
        assert rows.dtype == torch.int64 and rows.shape == (meta["counts"][name]["sequences"], SEQ)
        assert len(split) >= 1
    text = data.tokenizer.decode(data.train[0]["input_ids"][1:-1])
    assert len(text.split()) > 5 and text == text.lower()


def test_packing_lengths_exact(default_data: Path) -> None:
    data = load_pretraining_data(default_data)
    for name, split in (("train", data.train), ("validation", data.validation)):
        rows = split[:]["input_ids"]
        assert (rows[:, 0] == 2).all() and (rows[:, -1] == 3).all()
        assert not (rows == 0).any(), "packed data holds no padding"
        counts = data.meta["counts"][name]
        assert counts["tokens"] == counts["sequences"] * SEQ
        assert counts["corpus_tokens"] == counts["sequences"] * (SEQ - 2) + counts["dropped_tokens"]
        assert 0 <= counts["dropped_tokens"] < SEQ - 2


def test_pack_token_stream_is_exact_and_chunking_independent() -> None:
    stream = np.arange(10, 10 + 1000, dtype=np.int32)
    for cuts in ([1000], [3, 997], [7] * 142 + [6], [500, 0, 500]):
        chunks = np.split(stream, np.cumsum(cuts)[:-1])
        blocks = np.concatenate(list(pack_token_stream(chunks, 16, cls_id=2, sep_id=3)))
        assert blocks.shape == (1000 // 14, 16)
        assert (blocks[:, 0] == 2).all() and (blocks[:, -1] == 3).all()
        np.testing.assert_array_equal(blocks[:, 1:-1].reshape(-1), stream[:len(blocks) * 14])


def test_validation_split_is_by_document(tmp_path: Path) -> None:
    corpus = write_word_corpus(tmp_path / "corpus.txt", documents=30)
    out = prepare_dataset(tmp_path / "out", corpus_files=[corpus], max_seq_length=16, validation_fraction=0.2,
                          vocab_size=300, num_proc=1)
    data = load_pretraining_data(out)
    word_ids = {data.tokenizer.convert_tokens_to_ids(word(i)) for i in range(30)}
    assert data.tokenizer.unk_token_id not in word_ids and len(word_ids) == 30, "each document word is one token"
    train_words = set(data.train[:]["input_ids"].unique().tolist()) - {2, 3}
    validation_words = set(data.validation[:]["input_ids"].unique().tolist()) - {2, 3}
    assert train_words <= word_ids and validation_words <= word_ids
    assert validation_words and train_words and not train_words & validation_words
    counts = data.meta["counts"]
    assert counts["train"]["documents"] + counts["validation"]["documents"] == 30
    validation_tokens = counts["validation"]["corpus_tokens"]
    assert 0.2 <= validation_tokens / (counts["train"]["corpus_tokens"] + validation_tokens) < 0.3


def test_split_documents_keeps_one_sequence_each() -> None:
    train, validation = split_documents(np.full(50, 10), validation_fraction=0.001, max_seq_length=32, seed=3)
    assert len(validation) == 3 and sorted(np.concatenate([train, validation]).tolist()) == list(range(50))
    with pytest.raises(ConfigError, match="too small"):
        split_documents(np.array([500]), validation_fraction=0.5, max_seq_length=32, seed=0)


def test_jsonl_corpus_and_given_tokenizer_match_across_num_proc(tmp_path: Path, default_data: Path) -> None:
    """More than one tokenizing batch, so num_proc=2 really forks; the result must not depend on it."""
    corpus = tmp_path / "docs.jsonl"
    lines = [json.dumps({"body": f"statement number {i} raises an exception in the loop"}) for i in range(2500)]
    corpus.write_text("\n".join(lines) + "\n\n")
    outputs = [prepare_dataset(tmp_path / f"out{n}", corpus_files=[corpus], tokenizer=default_data / "tokenizer",
                               max_seq_length=SEQ, text_field="body", num_proc=n) for n in (1, 2)]
    metas = [json.loads((out / "meta.json").read_text()) for out in outputs]
    assert metas[0]["fingerprint"] == metas[1]["fingerprint"]
    assert metas[0]["counts"] == metas[1]["counts"] and metas[0]["counts"]["train"]["documents"] > 2000
    one, two = (load_pretraining_data(out) for out in outputs)
    assert torch.equal(one.train[:]["input_ids"], two.train[:]["input_ids"])
    assert one.vocab_size == len(AutoTokenizer.from_pretrained(str(default_data / "tokenizer")))


def test_second_run_reuses_the_cache(tmp_path: Path) -> None:
    corpus = write_word_corpus(tmp_path / "corpus.txt", documents=20)
    kwargs = {"corpus_files": [corpus], "max_seq_length": 16, "vocab_size": 300, "num_proc": 1}
    out = prepare_dataset(tmp_path / "out", **kwargs)
    before, meta = arrow_mtimes(out), (out / "meta.json").read_text()
    assert prepare_dataset(tmp_path / "out", **kwargs) == out
    assert arrow_mtimes(out) == before and (out / "meta.json").read_text() == meta
    # A changed setting or changed corpus content is a different fingerprint: rebuilt.
    prepare_dataset(tmp_path / "out", **{**kwargs, "seed": 1})
    seeded = json.loads((out / "meta.json").read_text())
    assert seeded["fingerprint"] != json.loads(meta)["fingerprint"] and seeded["settings"]["seed"] == 1
    write_word_corpus(corpus, documents=21)
    prepare_dataset(tmp_path / "out", **{**kwargs, "seed": 1})
    assert json.loads((out / "meta.json").read_text())["fingerprint"] != seeded["fingerprint"]


# --- bad input: a ConfigError naming the file or key, before any output is written ------------------------------


def bad_utf8(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "latin1.txt"
    # A valid 2-byte character straddles the 1 MiB read boundary; the bad byte comes later.
    path.write_bytes(b"a" * ((1 << 20) - 1) + "é".encode() + b" ok\n\ncaf\xe9\n")
    return path, f"byte offset {(1 << 20) - 1 + 2 + 5 + 3}"


def no_text_field(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "wrong key"}\n')
    return path, "line 2: no text field 'text'"


@pytest.mark.parametrize("make", [
    lambda tmp: (tmp / "missing.txt", "does not exist"),
    lambda tmp: ((tmp / "empty.txt").write_text("\n  \n\n") and tmp / "empty.txt", "no text"),
    lambda tmp: ((tmp / "folder.txt").mkdir() or tmp / "folder.txt", "is a directory"),
    bad_utf8,
    no_text_field,
], ids=["missing", "empty", "directory", "non-utf8", "jsonl-field"])
def test_bad_corpus_files(tmp_path: Path, make) -> None:
    path, message = make(tmp_path)
    with pytest.raises(ConfigError, match=message) as error:
        prepare_dataset(tmp_path / "out", corpus_files=[path], num_proc=1)
    assert str(path) in str(error.value) or path.name in str(error.value)
    assert not (tmp_path / "out").exists(), "checked before any work"


def test_bad_tokenizer_and_lengths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'tokenizer' folder .*nope' does not exist"):
        prepare_dataset(tmp_path / "out", tokenizer=tmp_path / "nope")
    with pytest.raises(ConfigError, match="'max_seq_length' = 4 must be >= 8"):
        prepare_dataset(tmp_path / "out", max_seq_length=4)
    with pytest.raises(ConfigError, match="'max_seq_length' = 1024 exceeds 'model.max_position_embeddings' = 512"):
        prepare_dataset(tmp_path / "out", max_seq_length=1024, max_position_embeddings=512)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        check_seq_length(513, 512)
    assert check_seq_length(512, 512) == 512
    with pytest.raises(ConfigError, match="'validation_fraction'"):
        prepare_dataset(tmp_path / "out", validation_fraction=1.0)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="is not a prepared dataset"):
        load_pretraining_data(tmp_path)


# --- step batches -------------------------------------------------------------------------------------------------


def numbered_rows(n: int, seq: int = 4) -> np.ndarray:
    return np.repeat(np.arange(n)[:, None], seq, axis=1)


def step_indices(batches: StepBatches, step: int) -> list[list[int]]:
    return [batches.batch_indices(step, m) for m in range(batches.gradient_accumulation_steps)]


def test_step_batches_disjoint_and_cover_the_epoch() -> None:
    rows = numbered_rows(100)
    ranks = [StepBatches(rows, micro_batch_size=4, gradient_accumulation_steps=2, world_size=3, rank=r, seed=7)
             for r in range(3)]
    assert ranks[0].steps_per_epoch == 100 // 24 == 4
    seen: list[int] = []
    for step in range(4):
        in_step = [i for b in ranks for micro in step_indices(b, step) for i in micro]
        assert len(in_step) == len(set(in_step)) == 24, "rank and micro-step slices are disjoint"
        seen += in_step
    assert len(set(seen)) == len(seen) == 96, "one epoch visits each sequence at most once"
    # examples() returns exactly the rows batch_indices names.
    batch = ranks[1].examples(2, 1)
    assert batch.dtype == torch.long and batch.shape == (4, 4)
    assert batch[:, 0].tolist() == ranks[1].batch_indices(2, 1)
    # Epoch 1 is a fresh permutation, not a repeat of epoch 0.
    assert step_indices(ranks[0], 4) != step_indices(ranks[0], 0)


def test_step_batches_deterministic_resumable_and_seeded(default_data: Path) -> None:
    train = load_pretraining_data(default_data).train
    first = StepBatches(train, micro_batch_size=8, gradient_accumulation_steps=2, seed=3)
    run = [first.batch_indices(s, m) for s in range(first.steps_per_epoch + 3) for m in range(2)]
    resumed = StepBatches(train, micro_batch_size=8, gradient_accumulation_steps=2, seed=3)
    assert resumed.batch_indices(first.steps_per_epoch + 2, 1) == run[-1], "the step number alone resumes"
    assert torch.equal(resumed.examples(5, 0), train[first.batch_indices(5, 0)]["input_ids"])
    other = StepBatches(train, micro_batch_size=8, gradient_accumulation_steps=2, seed=4)
    assert other.batch_indices(0, 0) != run[0]
    assert first.mask_seed(0, 0) != first.mask_seed(0, 1) != other.mask_seed(0, 1)
    # The same global batch split over other world sizes reads the same sequences per step.
    wide = [StepBatches(train, micro_batch_size=8, world_size=2, rank=r, seed=3) for r in range(2)]
    assert sorted(run[0] + run[1]) == sorted(wide[0].batch_indices(0, 0) + wide[1].batch_indices(0, 0))


def test_step_batches_rejects_a_dataset_smaller_than_a_global_batch() -> None:
    with pytest.raises(ConfigError, match="10 sequences, fewer than one global batch of 12"):
        StepBatches(numbered_rows(10), micro_batch_size=3, gradient_accumulation_steps=2, world_size=2, rank=1)
    with pytest.raises(ConfigError, match="'rank' = 2"):
        StepBatches(numbered_rows(10), micro_batch_size=1, world_size=2, rank=2)


# --- masking ------------------------------------------------------------------------------------------------------


def test_mlm_masking_proportions_and_special_tokens(default_data: Path) -> None:
    data = load_pretraining_data(default_data)
    masker = MLMMasker(data.tokenizer)
    ids = torch.cat([data.train[:]["input_ids"]] * 2)
    ids[:, -5:] = 0  # some padding, which must never be masked and gets attention_mask 0
    original = ids.clone()
    out = masker(ids, seed=11)
    assert torch.equal(ids, original), "the input is not modified"
    special = torch.isin(original, torch.tensor([0, 1, 2, 3, 4]))
    selected = out["labels"] != -100
    assert not (selected & special).any() and torch.equal(out["input_ids"][special], original[special])
    assert torch.equal(out["labels"][selected], original[selected])
    assert abs(selected.sum().item() / (~special).sum().item() - 0.15) < 0.005
    chosen, kept = out["input_ids"][selected], original[selected]
    masked = (chosen == 4).float().mean().item()
    unchanged = (chosen == kept).float().mean().item()
    random = ((chosen != 4) & (chosen != kept)).float().mean().item()
    assert abs(masked - 0.8) < 0.015 and abs(unchanged - 0.1) < 0.015 and abs(random - 0.1) < 0.015
    assert not torch.isin(chosen[(chosen != 4) & (chosen != kept)], torch.tensor([0, 1, 2, 3, 4])).any()
    assert torch.equal(out["attention_mask"], (original != 0).long())


def test_mlm_masking_is_deterministic_per_seed(default_data: Path) -> None:
    masker = MLMMasker(load_pretraining_data(default_data).tokenizer)
    ids = load_pretraining_data(default_data).train[:64]["input_ids"]
    state = torch.random.get_rng_state()
    a, b, c = masker(ids, seed=5), masker(ids, seed=5), masker(ids, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state), "no global RNG use"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["labels"], c["labels"])
    with pytest.raises(ConfigError, match="mlm_probability"):
        MLMMasker(load_pretraining_data(default_data).tokenizer, mlm_probability=1.5)


# --- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_summary_and_error(default_data: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "launch" / "prepare_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    # Same settings as the fixture: served from the cache.
    assert cli.main(["--output_dir", str(default_data), "--max_seq_length", str(SEQ), "--vocab_size", "2000"]) == 0
    printed = capsys.readouterr().out
    sequences = json.loads((default_data / "meta.json").read_text())["counts"]["train"]["sequences"]
    assert f"train: {sequences} sequences x {SEQ}" in printed and "vocab:" in printed
    missing = default_data / "missing.txt"
    assert cli.main(["--output_dir", str(default_data), "--corpus", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


# --- real corpora: compressed files, dictd databases, stray bytes, glob patterns -------------------------------------


def dictzip(path: Path, data: bytes) -> Path:
    """A gzip member with the FEXTRA 'RA' (random access) field that dictzip writes, as Debian's `.dict.dz` files."""
    import struct
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(data) + compressor.flush()
    extra = b"RA" + struct.pack("<H", 6) + struct.pack("<HHH", 1, 58315, 1)
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\x02\x03" + struct.pack("<H", len(extra)) + extra
    path.write_bytes(header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF))
    return path


def write_dictd(folder: Path, entries: list[str], stray: bytes = b"") -> Path:
    """NAME.dict.dz + NAME.index: a header entry, then one entry per document, the first with two headwords."""
    header = b"00-database-short\n   a test dictionary\n"
    content, index = bytearray(header), [f"00-database-short\tA\t{dictd_number(len(header))}"]
    for i, text in enumerate(entries):
        raw = text.encode() + (stray if i == 1 else b"") + b"\n\n"
        index.append(f"{word(i)}\t{dictd_number(len(content))}\t{dictd_number(len(raw))}")
        if i == 0:
            index.append(f"{word(i)}s\t{dictd_number(len(content))}\t{dictd_number(len(raw))}")
        content += raw
    (folder / "test.index").write_text("\n".join(sorted(index)) + "\n")
    return dictzip(folder / "test.dict.dz", bytes(content))


def test_compressed_text_reads_like_plain_text(tmp_path: Path) -> None:
    import gzip

    plain = write_word_corpus(tmp_path / "plain.txt", documents=12)
    packed = tmp_path / "packed.txt.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    dz = dictzip(tmp_path / "packed.txt.dz", plain.read_bytes())
    kwargs = {"max_seq_length": 16, "vocab_size": 300, "num_proc": 1}
    results = [load_pretraining_data(prepare_dataset(tmp_path / f"out{i}", corpus_files=[path], **kwargs))
               for i, path in enumerate((plain, packed, dz))]
    def texts(data) -> list[list[str]]:  # each run trains its own vocabulary: compare tokens, not ids
        return [data.tokenizer.convert_ids_to_tokens(row) for row in data.train[:]["input_ids"].tolist()]

    for other in results[1:]:
        assert other.meta["counts"] == results[0].meta["counts"] and other.meta["counts"]["train"]["documents"]
        assert texts(other) == texts(results[0])
    assert results[1].meta["corpus"]["bytes"] == plain.stat().st_size, "counts the decompressed content"


def test_dictd_database_gives_one_document_per_entry(tmp_path: Path) -> None:
    entries = [" ".join([word(i)] * 30) for i in range(20)]
    path = write_dictd(tmp_path, entries)
    out = prepare_dataset(tmp_path / "out", corpus_files=[path], max_seq_length=16, vocab_size=300,
                          validation_fraction=0.2, num_proc=1)
    data = load_pretraining_data(out)
    counts = data.meta["counts"]
    assert counts["train"]["documents"] + counts["validation"]["documents"] == 20, \
        "one document per entry; the header entry and the second headword of entry 0 add none"
    header_ids = set(data.tokenizer("a test dictionary", add_special_tokens=False)["input_ids"])
    all_ids = set(data.train[:]["input_ids"].unique().tolist()) | set(data.validation[:]["input_ids"].unique().tolist())
    assert not (header_ids - {data.tokenizer.unk_token_id}) & all_ids, "the 00-database header is not text"
    train_words = set(data.train[:]["input_ids"].unique().tolist()) - {2, 3}
    validation_words = set(data.validation[:]["input_ids"].unique().tolist()) - {2, 3}
    assert train_words and validation_words and not train_words & validation_words, "entries are never split"
    (tmp_path / "test.index").unlink()
    with pytest.raises(ConfigError, match="test.index' does not exist"):
        prepare_dataset(tmp_path / "out2", corpus_files=[path], num_proc=1)


def test_stray_bytes_are_refused_by_default_and_counted_when_replaced(tmp_path: Path) -> None:
    path = write_dictd(tmp_path, [" ".join([word(i)] * 30) for i in range(12)], stray=b" caf\xe9 \x92ok ")
    with pytest.raises(ConfigError, match=r"not valid UTF-8: byte 0xe9 .*decompressed.*encoding_errors"):
        prepare_dataset(tmp_path / "strict", corpus_files=[path], num_proc=1)
    kwargs = {"corpus_files": [path], "max_seq_length": 16, "vocab_size": 300, "num_proc": 1}
    out = prepare_dataset(tmp_path / "out", encoding_errors="replace", **kwargs)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["corpus"]["replaced_bytes"] == 2 and meta["settings"]["encoding_errors"] == "replace"
    assert list(meta["corpus"]["replaced_bytes_by_file"].values()) == [2]
    from ds_pld.data.corpus import iter_dictd_documents

    second = list(iter_dictd_documents(str(path), "replace"))[1]
    assert second.count("\ufffd") == 2 and "caf\ufffd \ufffdok" in second, "one U+FFFD per replaced byte"
    with pytest.raises(ConfigError, match="'encoding_errors' = 'ignore' must be one of"):
        prepare_dataset(tmp_path / "bad", encoding_errors="ignore", **kwargs)


def test_glob_patterns_expand_sorted_and_read_each_file_once(tmp_path: Path) -> None:
    from ds_pld.data.corpus import expand_corpus_paths

    for name in ("b/2.txt", "a/1.txt", "a/deep/3.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_word_corpus(tmp_path / name, documents=3)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    found = expand_corpus_paths([str(tmp_path / "**" / "*.txt")])
    assert [Path(p).relative_to(tmp_path).as_posix() for p in found] == ["a/1.txt", "a/deep/3.txt", "b/2.txt"]
    with pytest.raises(ConfigError, match="matches no file"):
        expand_corpus_paths([str(tmp_path / "*.jsonl")])
