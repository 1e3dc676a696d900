"""Word starts against hand-marked expectations for each script."""

from genesis_jax.corpus.words import word_starts


def starts(text: str) -> list[str]:
    """The words, read back from the flagged byte offsets."""
    b = text.encode("utf-8")
    flags = word_starts(text)
    assert len(flags) == len(b)
    idx = [i for i, f in enumerate(flags) if f] + [len(b)]
    return [b[idx[i] : idx[i + 1]].decode("utf-8").split(" ")[0].rstrip(",.!?:;") for i in range(len(idx) - 1)]


def test_latin_and_both_apostrophes():
    assert starts("Don't stop, it’s fine.") == ["Don't", "stop", "it’s", "fine"]


def test_cyrillic_arabic():
    assert starts("В начале сотворил") == ["В", "начале", "сотворил"]
    assert starts("في البدء خلق") == ["في", "البدء", "خلق"]


def test_devanagari_combining_marks_stay_inside_words():
    # [\w']+ split these at the vowel signs (combining marks); we must not.
    assert starts("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]


def test_pointed_hebrew_is_one_word_each():
    assert starts("בְּרֵאשִׁית בָּרָא") == ["בְּרֵאשִׁית", "בָּרָא"]


def test_cjk_characters_are_single_words():
    flags = word_starts("日本語のテキスト")
    assert int(flags.sum()) == 8  # every Han, Hiragana and Katakana character
    assert flags.tolist()[:3] == [1, 0, 0]  # first byte of a 3-byte character


def test_digits_and_mixed_scripts():
    assert starts("chapter 12 abc日本") == ["chapter", "12", "abc", "日", "本"]
