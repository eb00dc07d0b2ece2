"""Held-out passages cut mid-sentence: the cut points bench/quality.py presses Tab at.

A cut point is (prompt, truth): the text up to the cut (the passage's preceding paragraph
too, as the writer's document) and the rest of its paragraph. English cuts fall after the
space that follows a word, at least three words into a sentence and with the sentence going
on after the next word; Chinese cuts fall between two characters inside a sentence, with at
least two more Chinese characters before any punctuation. Cut points are spread evenly over
the paragraphs and chosen by a seeded generator, so every run and every method sees the same.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from models.openings import _is_cjk_letter

DATA = Path(__file__).parent / "data"
_WORD = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")
_SENTENCE_END = ".!?:;\""


@dataclass(frozen=True)
class Cut:
    language: str
    paragraph: int
    prompt: str
    truth: str

    def next_word(self) -> str:
        match = _WORD.match(self.truth.lstrip())
        return match.group(0) if match else ""

    def next_chars(self, n: int = 2) -> str:
        return self.truth.lstrip()[:n]


def paragraphs(path: Path) -> list[str]:
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def _english_points(text: str) -> list[int]:
    """Offsets just after "word " where the sentence has begun 3+ words ago and goes on."""
    points = []
    words = list(_WORD.finditer(text))
    for i in range(3, len(words) - 1):
        previous, nxt = words[i - 1], words[i]
        gap = text[previous.end() : nxt.start()]
        if gap != " ":
            continue  # only after a plain space: no punctuation, no line break between
        since = text[words[i - 3].start() : previous.end()]
        if any(ch in _SENTENCE_END for ch in since):
            continue  # fewer than three words into the sentence
        after = text[nxt.end() : nxt.end() + 1]
        if after in (".", "!", "?") or i + 1 >= len(words):
            continue  # the next word ends the sentence: not mid-sentence
        points.append(nxt.start())
    return points


def _chinese_points(text: str) -> list[int]:
    """Offsets between two Han characters, 4+ characters into a sentence, 2+ to go."""
    points = []
    for i in range(4, len(text) - 2):
        if not all(_is_cjk_letter(ch) for ch in text[i - 4 : i + 2]):
            continue
        points.append(i)
    return points


def cut_points(language: str, per_paragraph: int, source: str = "quality", seed: int = 0) -> list[Cut]:
    """``per_paragraph`` cut points in each paragraph of bench/data/<source>_<language>.txt
    (``source`` "heldout": bench/data/heldout.txt's paragraphs of that language)."""
    if source == "heldout":
        from bench.fidelity import heldout

        texts = heldout(language)
    else:
        texts = paragraphs(DATA / f"{source}_{language}.txt")
    rng = random.Random(f"{source}-{language}-{seed}")
    cuts = []
    for n, text in enumerate(texts):
        points = _english_points(text) if language == "en" else _chinese_points(text)
        if not points:
            continue
        chosen = sorted(rng.sample(points, min(per_paragraph, len(points))))
        before = texts[n - 1] + "\n\n" if n > 0 else ""
        for at in chosen:
            cuts.append(Cut(language, n, before + text[:at], text[at:]))
    return cuts
