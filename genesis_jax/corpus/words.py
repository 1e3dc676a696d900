"""Word-start flags per byte, for whole-word masking (docs/design.md, "Tokens and corpus").

A word is a run of letters, combining marks, digits and apostrophes (' and U+2019); every
Han, Hiragana or Katakana character is a word of its own. The classification is a lookup
table over all code points, so a whole locale is flagged with a few vectorised NumPy ops.
"""

from __future__ import annotations

import functools
import unicodedata

import numpy as np

OTHER, WORD, SINGLE = 0, 1, 2
_APOSTROPHES = ("'", "\u2019")
_SINGLE_RANGES = (
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0xFF66, 0xFF9F),  # half-width Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x3134F),  # CJK extensions B-G
)


@functools.lru_cache(maxsize=1)
def char_classes() -> np.ndarray:
    """uint8 class (OTHER, WORD, SINGLE) of every code point."""
    table = np.zeros(0x110000, dtype=np.uint8)
    for cp in range(0x110000):
        cat = unicodedata.category(chr(cp))
        if cat[0] in "LM" or cat == "Nd" or cat == "Nl" or cat == "No":
            table[cp] = WORD
    for ch in _APOSTROPHES:
        table[ord(ch)] = WORD
    for lo, hi in _SINGLE_RANGES:
        sub = table[lo : hi + 1]
        # Only letters in these blocks are single-character words (not the prolonged sound
        # mark's neighbours such as punctuation).
        sub[sub == WORD] = SINGLE
    return table


def word_starts(text: str) -> np.ndarray:
    """uint8 flag per UTF-8 byte of `text`: 1 at the first byte of each word."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    nbytes = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    cls = char_classes()[cps]
    prev = np.concatenate([[OTHER], cls[:-1]]) if cls.size else cls
    start_char = (cls == SINGLE) | ((cls == WORD) & (prev != WORD))
    flags = np.zeros(int(nbytes.sum()), dtype=np.uint8)
    byte_pos = np.cumsum(nbytes) - nbytes
    flags[byte_pos[start_char]] = 1
    return flags
