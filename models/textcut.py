"""Turning sampled text into suggestions a writer can insert.

Three rules, all about text rather than tokens:
- no broken UTF-8: byte-fallback tokens can end mid-character and decode to U+FFFD;
- cuts land on word boundaries in space-separated scripts, and after any character or
  punctuation mark in Chinese/Japanese, which have no spaces between words;
- a suggestion stays on the writer's line (it stops at a newline once it has content).
"""

from __future__ import annotations

import unicodedata

REPLACEMENT_CHAR = "\ufffd"

# Sentence punctuation after which a cut is always safe, even with no space following.
_CLOSING = set(".!?;:,)]}\"'…。！？；：，、）」』】》”’")


def is_cjk(ch: str) -> bool:
    """Han, kana and CJK/fullwidth punctuation: every such character is its own unit."""
    cp = ord(ch)
    return (
        0x3000 <= cp <= 0x30FF  # CJK punctuation, hiragana, katakana
        or 0x3400 <= cp <= 0x4DBF
        or 0x4E00 <= cp <= 0x9FFF
        or 0xF900 <= cp <= 0xFAFF
        or 0xFF00 <= cp <= 0xFFEF  # fullwidth forms (，！？ ...)
        or 0x20000 <= cp <= 0x3134F
    )


def utf8_safe(text: str) -> str:
    """Drop a partial character at the end and anything after a broken one inside."""
    bad = text.find(REPLACEMENT_CHAR)
    return text if bad < 0 else text[:bad]


def _boundary_before(text: str, i: int) -> bool:
    """True when a cut between text[i-1] and text[i] leaves whole words on the left."""
    a, b = text[i - 1], text[i]
    if b.isspace():
        return not a.isspace()
    return is_cjk(a) or is_cjk(b) or (a in _CLOSING and not a.isalnum() and a not in "'’")


def ends_complete(text: str) -> bool:
    """Whether the last unit of ``text`` is certainly finished (a CJK char or end punctuation)."""
    if not text:
        return False
    last = text[-1]
    return is_cjk(last) or (last in _CLOSING and last not in "'’")


def complete_prefix(text: str) -> str:
    """The longest prefix of ``text`` that ends on a word / character boundary.

    Used when generation stopped for a reason other than the model ending the text
    (length, time), so the last word may be unfinished: "the quick bro" -> "the quick".
    """
    text = utf8_safe(text)
    if ends_complete(text):
        return text
    for i in range(len(text) - 1, 0, -1):
        if _boundary_before(text, i):
            return text[:i].rstrip()
    return ""


def starts_new_unit(previous: str, piece: str) -> bool:
    """Whether ``piece`` (the newest token's text) begins a new word after ``previous``."""
    if not piece or not previous:
        return False
    joined = previous + piece
    return _boundary_before(joined, len(previous))


def clean_control(text: str) -> str:
    """Remove control characters a model may emit (keep newline and tab)."""
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")


# ---------------------------------------------------------------- when a sampled row is a suggestion
# (the same rules for the local engine and for a model on a server, models/remote.py)


def hard_cap(target: int) -> int:
    """Tokens after which a row stops even mid-word (then cut back to a boundary)."""
    return target + max(4, target // 2)


def row_final(previous: str, text: str, count: int, target: int) -> str | None:
    """A row's final text if it should stop now that it reads ``text`` after ``count`` tokens, else None.

    ``previous`` is its text one token earlier. A newline ends it (a suggestion stays on the
    writer's line); past its target it stops where a new word or CJK unit begins; at its hard
    cap it stops anyway, cut back to the last whole word.
    """
    newline = text.find("\n", len(text) - len(text.lstrip()))
    if newline > 0 and text[:newline].strip():
        return text[:newline].rstrip()
    if count >= target and starts_new_unit(previous, text[len(previous):]):
        return complete_prefix(text)
    if count >= hard_cap(target):
        return complete_prefix(text) or text
    return None


def tail(text: str, limit: int, step: int = 8192) -> str:
    """The end of ``text``, at most ``limit`` characters, cut at a multiple of ``step`` from its start.

    Cut in steps (not at len(text) - limit) so that while the writer types the start stays put
    and the model's window, and with it the prefix cache, does not move on every keystroke.
    """
    if len(text) <= limit:
        return text
    step = max(1, min(step, limit))
    return text[-(-(len(text) - limit) // step) * step :]
