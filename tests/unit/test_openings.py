"""The likeliest distinct openings (models/openings.py) and how the engine uses them (issue 12):
rows start with distinct words, the likeliest first; Tab again starts differently; the text after
the caret ranks them and is never said twice. On the tiny random-weight models of test_engine_logic."""

from __future__ import annotations


import pytest
import torch

from models import openings
from models.core import Suggestion, into
from models.engine import likeliest_openings
from models.settings import Settings
from models.steps import follow_logprobs, read_all
from tests.unit.test_engine_logic import build_tokenizer, tiny_llama_engine

TEXTS = ["The quick brown fox jumps over the ", "I went to the store to buy some", "She said that the weather", "我们今天去", "hello 世界 and "]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def engine(tok):
    return tiny_llama_engine(tok, seed=3)


# ---------------------------------------------------------------- what an opening is


@pytest.mark.parametrize(
    "text, unit, complete",
    [
        (" the", "the", False),
        (" the house", "the", True),
        ("the,", "the", True),
        (" don't", "don't", False),
        (" don'", "don", False),
        (" well-known fact", "well-known", True),
        ("我们", "我们", True),
        ("我", "我", False),
        ("我，", "我", True),
        (", and", ",", True),
        ("", "", False),
        ("  ", "", False),
    ],
)
def test_unit_of(text, unit, complete):
    assert openings.unit_of(text) == (unit, complete)


def test_unit_key_ignores_case_and_apostrophe_style():
    assert openings.unit_key("Don’t") == openings.unit_key("don't")


def test_extends_masks_tell_word_pieces_from_new_words():
    latin, cjk = openings.extends_masks(["▁the", "ing", "'s", "我", "，", "<0xE6>", ",", None, "<0x35>", "<0x2C>"])
    assert latin.tolist() == [False, True, True, False, False, True, False, False, True, False]
    assert cjk.tolist() == [False, False, False, True, False, True, False, False, False, False]


def test_rank_sums_spellings_and_splits_a_word_that_goes_on():
    """ " print" as one token (0.3, then the word ends with p 0.5 or goes on as "ing" 0.5) and
    as " pri"+"nt" (0.2, then "nt" 1.0): " print" = 0.3*0.5 + 0.2*1.0; " printing" = 0.15."""
    pieces = ["▁print", "▁pri", "ing", "nt", "▁now", "."]
    latin, cjk = openings.extends_masks(pieces)
    text_of = lambda ids: "".join(pieces[i] for i in ids).replace("▁", " ")  # noqa: E731
    logits = torch.log(torch.tensor([0.3, 0.2, 1e-9, 1e-9, 0.5, 1e-9]))
    candidates = openings.first_candidates(logits, text_of, k=3)
    assert [c.unit for c in candidates] == ["now", "print", "pri"]
    following = torch.log(torch.tensor([
        [1e-9, 1e-9, 1e-9, 1e-9, 0.5, 0.5],  # after " now"
        [1e-9, 1e-9, 0.5, 1e-9, 0.25, 0.25],  # after " print": "ing" 0.5, a new word 0.5
        [1e-9, 1e-9, 1e-9, 1.0, 1e-9, 1e-9],  # after " pri": "nt"
    ]))
    ranked = {o.unit: o for o in openings.rank(candidates, following, text_of, latin, cjk, follow=1)}
    assert ranked["print"].prob == pytest.approx(0.3 * 0.5 + 0.2 * 1.0, rel=1e-4)
    assert ranked["printing"].prob == pytest.approx(0.15, rel=1e-4)
    assert ranked["now"].prob == pytest.approx(0.5, rel=1e-4)
    assert "pri" not in ranked  # " pri" always goes on: never an opening of its own
    best = ranked["print"].best
    assert best.ids == [1, 3]  # the likeliest spelling: " pri" + "nt" (0.2) over " print" then a new word (0.15)
    assert [o.unit for o in openings.choose(list(ranked.values()), 2, avoid={"now"})] == ["print", "printing"]


# ---------------------------------------------------------------- the engine


def expected_openings(engine, text: str, after: str = "") -> list[openings.Opening]:
    """The openings ranked directly (one prefill, one step over the candidates): what the
    batched path of a press must choose among."""
    return likeliest_openings(engine, text, after=after)


def first_units(result) -> list[str]:
    return [openings.unit_key(openings.unit_of(s.text)[0]) for s in result.suggestions]


def spelled_in_bytes(engine, opening) -> bool:
    return any(engine.tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in opening.best.ids)


def test_rows_start_with_the_likeliest_distinct_openings(engine):
    settings = Settings(lengths=[4, 6, 8])
    checked = 0
    for text in TEXTS:
        chosen = openings.choose(expected_openings(engine, text), 3)
        if len(chosen) < 3 or any(spelled_in_bytes(engine, o) for o in chosen):
            # The random model often spells a letter as a UTF-8 byte piece, which the next
            # bytes, no valid UTF-8, can take with them (the row comes back empty); real models do not.
            continue
        checked += 1
        top = {openings.unit_key(o.unit) for o in chosen}
        for seed in range(3):
            result = engine.suggest(text, settings, seed=seed)
            units = first_units(result)
            # each row starts with its own opening (one still unfinished after two tokens,
            # " B", may go on as the row is sampled: " Bts")
            matched = sorted(next((o for o in sorted(top, key=len, reverse=True) if u.startswith(o)), "") for u in units)
            assert matched == sorted(top), (text, result.texts, top)
    assert checked >= 2


def test_plain_sampling_when_distinct_openings_are_off(tok):
    # top-k 1: sampled rows all start with the model's first choice; chosen openings do not.
    settings = Settings(lengths=[4, 6, 8], top_k=1)
    engine = tiny_llama_engine(tok, seed=3)
    engine.distinct_openings = False
    checked = 0
    for text in TEXTS:  # (the rows then go on alike until the repeat rule parts them: compare their starts)
        units = first_units(engine.suggest(text, settings, seed=0))
        if len(units) >= 2:
            checked += 1
            assert len({u[:3] for u in units}) == 1, (text, units)
    assert checked >= 2
    engine.distinct_openings = True
    assert any(len(set(first_units(engine.suggest(text, settings, seed=0)))) == 3 for text in TEXTS)


def test_tab_again_starts_differently_from_what_was_shown(engine):
    settings = Settings(lengths=[4, 6, 8])
    fresh_seen = 0
    for text in TEXTS:
        first = engine.suggest(text, settings, seed=1)
        shown = set(first_units(first))
        fresh = openings.choose(expected_openings(engine, text), 3, avoid=shown)
        again = engine.suggest(text, settings, round_=1, seed=2, avoid=first.texts)
        units = first_units(again)
        if len(fresh) == 3 and not any(spelled_in_bytes(engine, o) for o in fresh):
            fresh_seen += 1
            assert not set(units) & shown, (text, first.texts, again.texts)
        # Where fewer likely openings are left than rows, the likeliest is offered again (FLOOR).
        for o in fresh:
            if not spelled_in_bytes(engine, o):
                assert any(u.startswith(openings.unit_key(o.unit)) for u in units), (text, o.unit, again.texts)
    assert fresh_seen >= 2


def test_text_after_the_caret_ranks_openings(engine):
    settings = Settings(lengths=[4, 6, 8])
    changed = checked = 0
    for text in TEXTS:
        for after in (" lazy dog.", " milk and bread", "公园散步"):
            ranked = expected_openings(engine, text, after)
            gone = openings.unit_key(openings.unit_of(after)[0])
            chosen = openings.choose(ranked, 3, avoid={gone})
            if len(chosen) < 3 or any(spelled_in_bytes(engine, o) for o in chosen):
                continue  # see test_rows_start_with_the_likeliest_distinct_openings
            checked += 1
            top = {openings.unit_key(o.unit) for o in chosen}
            plain = {openings.unit_key(o.unit) for o in openings.choose(expected_openings(engine, text), 3, avoid={gone})}
            changed += top != plain
            result = engine.suggest(text, settings, seed=0, after=after)
            units = first_units(result)
            matched = sorted(next((o for o in sorted(top, key=len, reverse=True) if u.startswith(o)), "") for u in units)
            assert matched == sorted(top), (text, after, result.texts, top)
            assert gone not in units
    assert checked >= 3 and changed > 0  # the text after the caret did change some choices


def test_rows_never_run_on_into_the_text_after_the_caret(engine):
    for text in TEXTS:
        after = engine.suggest(text, Settings(lengths=[2]), seed=0).texts[0]
        for seed in range(3):
            result = engine.suggest(text, Settings(lengths=[4, 8, 16]), seed=seed, after=after)
            for s in result.suggestions:
                assert into(s, after).text == s.text, (text, after, s.text)


def test_into_cuts_where_the_text_after_the_caret_begins():
    def cut(text, after):
        return into(Suggestion(text, 3, 0.0), after).text

    assert cut("roof of the house", " of the house.") == "roof"
    assert cut("roof of the", " of the house") == "roof"
    assert cut("roof", " of the house") == "roof"
    assert cut("often seen", " of the house") == "often seen"  # "of" inside a word is not the text after
    assert cut("很好的天气", "天气不错") == "很好的"
    assert cut("anything", "") == "anything"


def test_follow_logprobs_is_the_models_own(engine):
    text_ids = engine.tokenizer("She said that the", add_special_tokens=False).input_ids
    heads = [text_ids[-1:], [5, 9], [7]]
    then = engine.tokenizer(" weather was", add_special_tokens=False).input_ids
    with torch.inference_mode():
        from models.batching import PrefixStore

        cache, _, _ = PrefixStore(engine.model, engine.model.config, engine.cache_limit).prefill(text_ids[:-1], engine.device)
        got = follow_logprobs(engine.model, cache, heads, then)
        for head, value in zip(heads, got.tolist()):
            ids = text_ids[:-1] + head + then
            logp = torch.log_softmax(read_all(engine.model, torch.tensor([ids], device=engine.device)), dim=-1)
            start = len(text_ids) - 1 + len(head)  # the position of then[0]
            want = sum(float(logp[start - 1 + j, t]) for j, t in enumerate(then))
            assert value == pytest.approx(want, abs=1e-3)
