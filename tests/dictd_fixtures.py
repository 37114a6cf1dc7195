"""dictd databases for tests: the index's base-64 numbers, and a small synthetic WordNet (wn.dict.dz + wn.index) for
the part-of-speech task builder and the time-to-quality smoke study: four parts of speech, made-up headwords,
WordNet's layout, and a few entries the builder must skip."""
from __future__ import annotations

import gzip
from pathlib import Path

from ds_pld.glue.wordnet_pos import PLACEHOLDER

GLOSSES = {"n": "a kind of {thing} that people call {word}", "v": "to move or {word} the {thing} quickly",
           "adj": "having the quality of a {thing}; not {word} at all", "adv": "in a {thing} manner"}
THINGS = ("stone", "river", "cloud", "table", "garden", "letter")
SIZES = {"n": 40, "v": 24, "adj": 30, "adv": 18}


def dictd_number(value: int) -> str:
    """An offset or length as the dictd index writes it (base 64)."""
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[value % 64] + out
        value //= 64
        if not value:
            return out


def write_wordnet(folder: Path, entries: list[str]) -> Path:
    """wn.dict.dz (gzip, which dictzip is) + wn.index in the dictd format: a header entry, then one entry each."""
    folder.mkdir(parents=True, exist_ok=True)
    header = b"00-database-short\n   synthetic WordNet\n"
    content, index = bytearray(header), [f"00-database-short\tA\t{dictd_number(len(header))}"]
    for text in entries:
        raw = text.encode() + b"\n\n"
        index.append(f"{text.splitlines()[0]}\t{dictd_number(len(content))}\t{dictd_number(len(raw))}")
        content += raw
    (folder / "wn.index").write_text("\n".join(sorted(index)) + "\n")
    path = folder / "wn.dict.dz"
    path.write_bytes(gzip.compress(bytes(content)))
    return path


def made_up_word(pos: str, i: int) -> str:
    letters = "bcdfghklmnprstvz"
    return pos + "".join(letters[int(d, 16)] for d in f"{i:02x}") + "o"


def synthetic_entry(word: str, pos: str, i: int) -> str:
    """WordNet's layout: a wrapped first sense with a usage example and synonyms, a second sense, another POS."""
    gloss = GLOSSES[pos].format(word=word, thing=THINGS[i % len(THINGS)]).split(" ")
    return (f"{word}\n    {pos} 1: {' '.join(gloss[:3])}\n           {' '.join(gloss[3:])}; \"the {word} example\"; "
            f"\"more\n           example\" [syn: {{{word}}}, {{synonymous}}]\n"
            f"    2: secondsense gloss\n    {'v' if pos == 'n' else 'n'} 1: otherpos gloss [ant: {{{word}}}]")


def expected_sentence(pos: str, i: int) -> str:
    return GLOSSES[pos].format(word=PLACEHOLDER, thing=THINGS[i % len(THINGS)])


SPECIAL = [
    "ice cream\n    n 1: frozen dessert",  # several words: skipped
    "nomarker\n    1: a sense without a part of speech",  # skipped
    "A\n    n 1: the 1st letter of the Roman alphabet",  # fewer than two letters: skipped
    "Zigzag\n    n 1: a line or course that proceeds by sharp turns in\n         alternating directions\n"
    "    v 1: travel along a zigzag path",  # first sense only: the noun
    "zigzag\n    v 1: a later entry of the same headword in another case",  # counted once, the first entry
]


def make_synthetic_wordnet(folder: Path) -> Path:
    entries = [synthetic_entry(made_up_word(pos, i), pos, i) for pos, size in SIZES.items() for i in range(size)]
    return write_wordnet(folder, SPECIAL + entries)
