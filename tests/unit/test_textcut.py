"""Cutting sampled text into insertable suggestions: UTF-8 safety, word and CJK boundaries."""

import pytest

from models import textcut
from models.textcut import REPLACEMENT_CHAR, clean_control, complete_prefix, starts_new_unit, utf8_safe


# ---------------------------------------------------------------- complete_prefix


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the quick bro", "the quick"),
        ("the quick brown ", "the quick brown"),
        ("the quick brown  ", "the quick brown"),
        ("the quick.", "the quick."),
        ("Wait! Then", "Wait!"),
        ("Hello, wor", "Hello,"),
        ("Hello,wor", "Hello,"),  # a comma is a safe cut even without a space after it
        ("(see above)", "(see above)"),
        ("unfinished", ""),  # one unfinished word: nothing safe to keep
        ("", ""),
        ("   ", ""),
        ("don'", ""),  # an apostrophe does not end a word
        ("it's fin", "it's"),
    ],
)
def test_complete_prefix_english(text, expected):
    assert complete_prefix(text) == expected


@pytest.mark.parametrize(
    "text",
    ["我们今天去公园", "我", "日本語のテキスト", "天气很好。", "他说：“明天见！”", "我们，"],
)
def test_complete_prefix_keeps_whole_cjk_text(text):
    # Every Han/kana character and CJK punctuation mark is a unit of its own.
    assert complete_prefix(text) == text


def test_every_cjk_character_is_a_boundary():
    text = "我们今天去公园散步"
    for i in range(1, len(text)):
        assert complete_prefix(text[:i]) == text[:i]
        assert starts_new_unit(text[:i], text[i])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("天气很好。Th", "天气很好。"),  # CJK full stop, then an unfinished Latin word
        ("hello 世界wor", "hello 世界"),  # a Latin word glued to a Han character
        ("我们 hello wor", "我们 hello"),
        ("他说：“hel", "他说："),  # an opening quote alone is not kept
        ("Mixed 日本 and te", "Mixed 日本 and"),
    ],
)
def test_complete_prefix_mixed_scripts(text, expected):
    assert complete_prefix(text) == expected


def test_complete_prefix_never_keeps_broken_utf8():
    assert complete_prefix("hello wor" + REPLACEMENT_CHAR) == "hello"
    assert complete_prefix("我们" + REPLACEMENT_CHAR + "今天") == "我们"
    assert complete_prefix(REPLACEMENT_CHAR + "abc def") == ""


def test_complete_prefix_result_is_a_prefix_without_trailing_space():
    samples = ["the quick bro", "天气很好。Th", "a, b, c", "x y z.", "hello 世界wor", "  lead", "tab\there", "a  b"]
    for s in samples:
        out = complete_prefix(s)
        assert s.startswith(out)
        assert out == out.rstrip()


# ---------------------------------------------------------------- utf8_safe


def test_utf8_safe_drops_replacement_char_and_what_follows():
    assert utf8_safe("abc" + REPLACEMENT_CHAR) == "abc"
    assert utf8_safe("abc" + REPLACEMENT_CHAR + "def") == "abc"
    assert utf8_safe(REPLACEMENT_CHAR * 3) == ""
    assert utf8_safe("intact 文字 😀") == "intact 文字 😀"
    assert utf8_safe("") == ""


# ---------------------------------------------------------------- starts_new_unit


@pytest.mark.parametrize(
    "previous, piece, expected",
    [
        ("hello", " world", True),
        ("hel", "lo", False),
        ("end.", "Next", True),
        ("end", ".", False),
        ("我", "们", True),
        ("hello", "世", True),
        ("世", "hello", True),
        ("word ", " ", False),  # more whitespace after whitespace is not a new word
        ("", "x", False),
        ("x", "", False),
    ],
)
def test_starts_new_unit(previous, piece, expected):
    assert starts_new_unit(previous, piece) is expected


def test_is_cjk():
    for ch in "我日本語のテキ。，！？、「」":
        assert textcut.is_cjk(ch), ch
    for ch in "aZ1 .,!é한😀":
        assert not textcut.is_cjk(ch), ch


def test_ends_complete():
    assert textcut.ends_complete("done.")
    assert textcut.ends_complete("天")
    assert not textcut.ends_complete("word")
    assert not textcut.ends_complete("")
    assert not textcut.ends_complete("rock'")


# ---------------------------------------------------------------- clean_control


def test_clean_control_keeps_newline_and_tab_drops_nul():
    assert clean_control("a\x00b\nc\td") == "ab\nc\td"
    assert clean_control("\x07bell\x1b[0m") == "bell[0m"
    assert clean_control("del\x7f") == "del"


def test_clean_control_keeps_emoji_zwj_sequences_and_format_chars():
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467"  # man ZWJ woman ZWJ girl
    coder = "\U0001F469\u200d\U0001F4BB"
    flag = "\U0001F1EF\U0001F1F5"
    text = f"{family} {coder} {flag} ❤️ 文字"
    assert clean_control(text) == text
    assert clean_control(family + "\x00") == family
