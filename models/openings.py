"""The likeliest distinct openings of a Tab press: rows that start differently, and likely.

Three rows sampled at temperature 0.7 often start alike ("the", "the", "a"), and a row that
differs only after its first word wastes a third of the popup. So the first word of each row
(in Chinese: its first two characters, the length of most Chinese words) is chosen, not
sampled: the press's likeliest *distinct* openings, ranked by their probability as text, and
only then is each row continued by sampling with the writer's temperature, top-k and top-p,
so the variety stays in what follows (issue 12).

An opening's probability is summed over the ways the model can spell it: " print" may come
as one token, or as " pri" + "nt"; and " print" is only the opening when the word ends there
(" printing" is another). So the search runs one decode step past the first token, for the
candidates whose word may go on, and reads in it how likely the word ends (the next token
starts a new word) or goes on (and how). This step is also the rows' second step: nothing
computed is thrown away but the candidates not chosen.

Plain functions, no model calls here: the engine (models/engine.py) runs the steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from models import textcut
from models.kernels import largest

# First tokens looked at, each a batch row for the press's first two steps. On the development
# text the three openings came out the same from 6 as from 10 or 30 (hit@3 0.445 English, 0.125
# Chinese), and 10 rows cost the first suggestion 43 ms more than plain sampling (318 / 275 ms).
FIRST = 6
SECOND = 3  # ways each unfinished word is followed on
CJK_UNIT = 2  # characters of a Chinese opening: most words are two characters long


def _is_letter(ch: str) -> bool:
    return ch.isalnum() and not textcut.is_cjk(ch)


def _is_cjk_letter(ch: str) -> bool:
    # Han and kana, not CJK punctuation (U+3000-303F) or fullwidth forms (U+FF00-FFEF)
    return textcut.is_cjk(ch) and not (0x3000 <= ord(ch) <= 0x303F or 0xFF00 <= ord(ch) <= 0xFFEF)


def unit_of(text: str) -> tuple[str, bool]:
    """The first unit of a row's text (a word; two Chinese characters; one punctuation mark)
    and whether it is certainly complete (what follows it has begun).

    Leading blanks are not part of it: " the" and "the" are the same opening.
    """
    s = text.lstrip(" \t")
    if not s:
        return "", False
    if _is_cjk_letter(s[0]):
        n = 1
        while n < len(s) and n < CJK_UNIT and _is_cjk_letter(s[n]):
            n += 1
        return s[:n], n == CJK_UNIT or n < len(s)
    if _is_letter(s[0]):
        n = 1
        while n < len(s):
            if _is_letter(s[n]):
                n += 1
            elif s[n] in "'’-" and n + 1 < len(s) and _is_letter(s[n + 1]):
                n += 2  # "don't", "well-known": one word
            elif s[n] in "'’-" and n + 1 == len(s):
                return s[:n], False  # "don'" may still become "don't"
            else:
                break
        return s[:n], n < len(s)
    return s[0], True


def unit_key(unit: str) -> str:
    """When two openings count as the same: case and apostrophe style do not make a new word."""
    return unit.lower().replace("’", "'")


def extends_masks(pieces: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two boolean masks over the vocabulary: tokens whose text would go on an unfinished Latin
    word (no leading space, starts with a letter or digit), and an unfinished Chinese opening
    (starts with a Han or kana character). A byte piece counts as its ASCII character, or, past
    ASCII, as possibly either (it may be part of "é" or of "我")."""
    latin = torch.zeros(len(pieces), dtype=torch.bool)
    cjk = torch.zeros(len(pieces), dtype=torch.bool)
    for i, piece in enumerate(pieces):
        if not isinstance(piece, str) or not piece:
            continue
        if piece.startswith("<0x") and piece.endswith(">"):  # one byte of UTF-8
            byte = int(piece[3:-1], 16)
            if byte < 0x80:  # an ASCII character spelled as a byte
                latin[i] = _is_letter(chr(byte)) or chr(byte) == "'"
            else:  # part of a character that may be a Chinese one, or an accented letter
                latin[i] = cjk[i] = True
            continue
        first = piece[0]
        if first in "▁Ġ":  # SentencePiece's and GPT-2's space
            continue
        latin[i] = _is_letter(first) or first in "'’"
        cjk[i] = _is_cjk_letter(first)
    return latin, cjk


@dataclass
class Candidate:
    """One way a row may start: its first tokens (one or two) and their probability."""

    ids: list[int]
    logprob: float
    text: str
    unit: str
    complete: bool


@dataclass
class Opening:
    """A distinct opening: its probability summed over spellings, and the likeliest spelling."""

    unit: str
    prob: float = 0.0
    best: Candidate | None = None
    best_prob: float = 0.0
    ends_word: bool = False  # the likeliest spelling still needs the word to end after it
    score: float = 0.0  # prob, or prob weighted by how well the text after the caret follows
    spellings: list[Candidate] = field(default_factory=list)

    def add(self, candidate: Candidate, prob: float, ends_word: bool) -> None:
        self.prob += prob
        self.spellings.append(candidate)
        if prob > self.best_prob:
            self.best, self.best_prob, self.ends_word = candidate, prob, ends_word


def first_candidates(logits: torch.Tensor, text_of, k: int = FIRST, exclude: torch.Tensor | None = None) -> list[Candidate]:
    """The ``k`` likeliest first tokens (``logits`` [V], the untempered model), as candidates.

    ``text_of(ids)`` is the row's text were it those tokens; ``exclude``: token ids that never
    start a row (end of text, a newline), left out after normalising, so the candidates keep
    their probabilities.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    if exclude is not None:
        logp = logp.index_fill(0, exclude, float("-inf"))
    values, ids = (part[0] for part in largest(logp[None], min(k, logp.shape[-1])))
    found = []
    for value, token in zip(values.tolist(), ids.tolist()):
        if not math.isfinite(value):
            break
        text = text_of([token])
        unit, complete = unit_of(text)
        found.append(Candidate([token], value, text, unit, complete))
    return found


def rank(
    candidates: list[Candidate],
    next_logits: torch.Tensor | None,
    text_of,
    latin_mask: torch.Tensor,
    cjk_mask: torch.Tensor,
    follow: int = SECOND,
    ending: torch.Tensor | None = None,
) -> list[Opening]:
    """The distinct openings, likeliest first.

    ``next_logits`` [len(candidates), V]: the step after each candidate's token (None when
    every candidate is complete). A candidate whose unit is complete counts whole; one whose
    word may go on counts with the probability that it ends there, and its ``follow`` likeliest
    ways of going on become openings of their own (as spelled after two tokens). ``ending``:
    the tokens that end a row; where the model would rather end than write (after a token that
    only re-typed the healed piece), that mass is an opening "" of its own, never chosen, but
    no opening far less likely than it is offered either.
    """
    openings: dict[str, Opening] = {}

    def credit(candidate: Candidate, prob: float, ends_word: bool) -> None:
        if not candidate.unit.strip() or prob <= 0:
            return
        key = unit_key(candidate.unit)
        opening = openings.get(key)
        if opening is None:
            opening = openings[key] = Opening(candidate.unit)
        opening.add(candidate, prob, ends_word)

    pending = []
    for i, candidate in enumerate(candidates):
        if candidate.complete or next_logits is None:
            credit(candidate, math.exp(candidate.logprob), False)
        else:
            pending.append(i)
    if not pending:
        return _ranked(openings)
    # All the unfinished candidates at once ([rows, V] probabilities, one mask a row): one pass
    # each took ~2.7 ms a candidate (16 ms a press, with 6 candidates), all at once ~3 ms.
    probs = torch.softmax(next_logits[pending].float(), dim=-1)
    device = probs.device
    anything = torch.ones(probs.shape[-1], dtype=torch.bool, device=device)
    if ending is not None:
        anything = anything.index_fill(0, ending.to(device), False)
    masks = []
    for i in pending:
        unit = candidates[i].unit
        # Nothing written yet (the token only re-typed the healed piece): any token but an end goes on.
        masks.append(anything if not unit else (cjk_mask if _is_cjk_letter(unit[0]) else latin_mask).to(device))
    on = probs * torch.stack(masks)
    goes_on = on.sum(dim=-1).tolist()
    ends = (probs[:, ending.to(device)].sum(dim=-1) if ending is not None else torch.zeros(len(pending))).tolist()
    # An empty candidate's next tokens are the first words: as many are looked at as first tokens.
    values, ids = largest(on, min(max(follow, FIRST), on.shape[-1]))
    for row, i in enumerate(pending):
        candidate = candidates[i]
        p = math.exp(candidate.logprob)
        if candidate.unit:
            credit(candidate, p * max(0.0, 1.0 - goes_on[row]), True)
        else:
            openings.setdefault("", Opening("")).prob += p * ends[row]
        take = follow if candidate.unit else FIRST
        for value, token in zip(values[row, :take].tolist(), ids[row, :take].tolist()):
            if value <= 0:
                break
            text = text_of(candidate.ids + [token])
            unit, complete = unit_of(text)
            credit(Candidate(candidate.ids + [token], candidate.logprob + math.log(value), text, unit, complete), p * value, False)
    return _ranked(openings)


def _ranked(openings: dict[str, Opening]) -> list[Opening]:
    ranked = sorted(openings.values(), key=lambda o: -o.prob)
    for opening in ranked:
        opening.score = opening.prob
    return ranked


FLOOR = 0.02  # an opening this much less likely than the best is not offered: the row repeats a likely one instead


def choose(openings: list[Opening], n: int, avoid: set[str] = frozenset()) -> list[Opening]:
    """The ``n`` best-scored openings not in ``avoid`` (unit keys already shown), leaving out
    those below FLOOR times the best one's score: rows start differently *and* likely (a model
    sure of its next word gets it in every row, which then differ after it)."""
    ranked = sorted(openings, key=lambda o: -o.score)
    if not ranked:
        return []
    floor = FLOOR * ranked[0].score
    return [o for o in ranked if o.unit and unit_key(o.unit) not in avoid and o.score >= floor][:n]
