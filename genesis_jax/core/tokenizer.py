"""The byte tokenizer: 4 special ids, then byte b -> b + 4 (docs/design.md, "Tokens and corpus")."""

from __future__ import annotations

import numpy as np

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
BYTE_OFFSET = 4
VOCAB_SIZE = 256 + BYTE_OFFSET


def encode(text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """UTF-8 bytes shifted past the special ids, as int32."""
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + BYTE_OFFSET
    parts = ([np.array([BOS_ID], np.int32)] if bos else []) + [ids]
    if eos:
        parts.append(np.array([EOS_ID], np.int32))
    return np.concatenate(parts)


def decode(ids: np.ndarray | list[int]) -> str:
    """Drop special ids and decode UTF-8 with replacement characters."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    arr = arr[(arr >= BYTE_OFFSET) & (arr < VOCAB_SIZE)]
    return (arr - BYTE_OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")
