import numpy as np

from genesis_jax.core import tokenizer as tok


def test_round_trip_multilingual():
    for text in ["hello", "Привет, мир", "日本語のテキスト", "שָׁלוֹם", "مرحبا", "नमस्ते", "emoji 🎉", ""]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert ids.min(initial=4) >= 4 and ids.max(initial=4) < 260
        assert tok.decode(ids) == text


def test_specials_and_layout():
    ids = tok.encode("A", bos=True, eos=True)
    assert ids.tolist() == [tok.BOS_ID, ord("A") + 4, tok.EOS_ID]
    assert tok.VOCAB_SIZE == 260 and (tok.PAD_ID, tok.UNK_ID, tok.BOS_ID, tok.EOS_ID) == (0, 1, 2, 3)
    assert tok.decode([0, 1, 2, 3, ord("b") + 4, 0]) == "b"


def test_invalid_utf8_decodes_with_replacement():
    ids = np.array([0xFF + 4, ord("x") + 4])
    assert tok.decode(ids) == "\ufffdx"
