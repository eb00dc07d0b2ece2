"""Settings from untrusted input: clamping with a note, never an exception."""

import math

import pytest

from models.settings import LENGTH_LIMITS, LIMITS, Settings, parse_lengths, targets, validate


def test_defaults_need_no_notes():
    settings, notes = validate({})
    assert settings == Settings()
    assert notes == []
    settings, notes = validate(None)
    assert settings == Settings() and notes == []


def test_valid_values_pass_through_without_notes():
    raw = {"temperature": 1.1, "top_k": 50, "top_p": 0.8, "max_time": 2.5, "context_tokens": 256,
           "num_suggestions": 4, "lengths": [5, 10]}
    settings, notes = validate(raw)
    assert notes == []
    assert settings.temperature == 1.1 and settings.top_k == 50 and settings.top_p == 0.8
    assert settings.max_time == 2.5 and settings.context_tokens == 256 and settings.num_suggestions == 4
    assert settings.lengths == [5, 10]


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("temperature", -1, LIMITS["temperature"][0]),
        ("temperature", 0, LIMITS["temperature"][0]),
        ("temperature", 50, LIMITS["temperature"][1]),
        ("top_p", 2, 1.0),
        ("top_p", -0.5, LIMITS["top_p"][0]),
        ("top_k", 0, 1),
        ("top_k", 10**6, LIMITS["top_k"][1]),
        ("max_time", 0, LIMITS["max_time"][0]),
        ("context_tokens", 10**9, LIMITS["context_tokens"][1]),
        ("num_suggestions", 100, LIMITS["num_suggestions"][1]),
        ("num_suggestions", -3, 1),
    ],
)
def test_out_of_range_values_are_clamped_with_a_note(key, value, expected):
    settings, notes = validate({key: value})
    assert getattr(settings, key) == expected
    assert len(notes) == 1 and key in notes[0] and "out of range" in notes[0]


@pytest.mark.parametrize("bad", ["abc", "nan", "NaN", float("nan"), float("inf"), "-inf", "1e400", [1], {"a": 1}])
def test_non_numbers_keep_the_default_with_a_note(bad):
    settings, notes = validate({"temperature": bad})
    assert settings.temperature == Settings().temperature
    assert len(notes) == 1 and notes[0].startswith("temperature")


def test_huge_integer_does_not_crash():
    # float(10**400) raises OverflowError, which must not escape validate().
    settings, notes = validate({"top_k": 10**400, "lengths": [10**400]})
    assert 1 <= settings.top_k <= LIMITS["top_k"][1]
    assert all(LENGTH_LIMITS[0] <= n <= LENGTH_LIMITS[1] for n in settings.lengths)
    assert len(notes) == 2


@pytest.mark.parametrize("bad", ["inf", "1e400", "-inf"])
def test_infinite_lengths_do_not_crash(bad):
    settings, notes = validate({"lengths": bad})
    assert settings.lengths == Settings().lengths
    assert len(notes) == 1 and notes[0].startswith("lengths")


def test_numeric_strings_are_accepted_and_ints_stay_ints():
    settings, notes = validate({"top_k": "3.7", "num_suggestions": "2", "temperature": " 0.9 "})
    assert notes == []
    assert settings.top_k == 4 and isinstance(settings.top_k, int)
    assert settings.num_suggestions == 2 and isinstance(settings.num_suggestions, int)
    assert settings.temperature == pytest.approx(0.9)


def test_empty_and_none_values_keep_defaults_silently():
    settings, notes = validate({"temperature": "", "top_k": None, "lengths": ""})
    assert settings == Settings()
    assert notes == []


def test_unknown_keys_are_reported_and_ignored():
    settings, notes = validate({"temprature": 1.0, "zzz": 1})
    assert settings == Settings()
    assert len(notes) == 1
    assert "temprature" in notes[0] and "zzz" in notes[0]


def test_hostile_sizes_are_bounded_and_quoted_short():
    """Settings arrive over HTTP: a huge list, a huge string or thousands of keys cost nothing and
    give short notes (a note quoting a 1 MB value would be sent back to the page)."""
    settings, notes = validate({"lengths": list(range(10**6)), "temperature": "x" * 10**6, **{f"k{i}": 1 for i in range(10**4)}})
    assert settings == Settings()
    assert len(notes) == 3 and all(len(n) < 200 for n in notes)
    assert validate({"lengths": "4," * 10**5})[0].lengths == Settings().lengths
    assert validate({"lengths": [4, 12, 32, 64, 100, 120, 200, 256]})[0].lengths == [4, 12, 32, 64, 100, 120, 200, 256]


def test_several_problems_give_several_notes():
    settings, notes = validate({"temperature": -1, "top_p": 2, "lengths": "10000", "foo": 1})
    assert settings.temperature == LIMITS["temperature"][0]
    assert settings.top_p == 1.0
    assert settings.lengths == [LENGTH_LIMITS[1]]
    assert len(notes) == 4


def test_lengths_are_clamped_and_sorted():
    settings, notes = validate({"lengths": "10000"})
    assert settings.lengths == [LENGTH_LIMITS[1]]
    assert len(notes) == 1 and "lengths" in notes[0]
    settings, notes = validate({"lengths": [0, 5]})
    assert settings.lengths == [1, 5] and len(notes) == 1
    settings, notes = validate({"lengths": "32 4 12"})
    assert settings.lengths == [4, 12, 32] and notes == []


@pytest.mark.parametrize("bad", ["abc", "4, x", " , ", "nan"])
def test_bad_lengths_keep_default_with_note(bad):
    settings, notes = validate({"lengths": bad})
    assert settings.lengths == Settings().lengths
    assert len(notes) == 1 and notes[0].startswith("lengths")


def test_parse_lengths_forms():
    assert parse_lengths("4, 12, 32") == [4, 12, 32]
    assert parse_lengths("4,12,32") == [4, 12, 32]
    assert parse_lengths("4; 12;32") == [4, 12, 32]
    assert parse_lengths("4 12  32") == [4, 12, 32]
    assert parse_lengths([4, 12.0, "32"]) == [4, 12, 32]
    assert parse_lengths(8) == [8]
    assert parse_lengths(8.9) == [8]
    assert parse_lengths("") == []


# ---------------------------------------------------------------- targets


def test_targets_sorted_and_count_matches_num_suggestions():
    for n in range(1, 7):
        for lengths in ([4, 12, 32], [10], [3, 9], [1, 2, 3, 4, 5, 6, 7, 8]):
            t = targets(Settings(lengths=lengths, num_suggestions=n))
            assert len(t) == n
            assert t == sorted(t)
            assert set(t) <= set(lengths)


def test_targets_cover_shortest_and_longest_when_room():
    t = targets(Settings(lengths=[4, 12, 32], num_suggestions=3))
    assert t == [4, 12, 32]
    t = targets(Settings(lengths=[4, 12, 32], num_suggestions=1))
    assert t == [32]


def test_tab_again_gives_longer_targets():
    settings = Settings(lengths=[4, 12, 32], num_suggestions=3)
    previous = targets(settings, 0)
    for round_ in range(1, 8):
        current = targets(settings, round_)
        assert len(current) == len(previous)
        assert all(c >= p for c, p in zip(current, previous))
        assert all(c <= LENGTH_LIMITS[1] for c in current)
        previous = current
    assert targets(settings, 1)[0] > targets(settings, 0)[0]
    assert targets(settings, -5) == targets(settings, 0)
    assert max(targets(settings, 100)) == LENGTH_LIMITS[1]


def test_validated_settings_always_give_valid_targets():
    for raw in ({"lengths": "0"}, {"lengths": "500, 1"}, {"num_suggestions": 99, "lengths": [1]}, {"num_suggestions": 0}):
        settings, _ = validate(raw)
        for round_ in range(6):
            t = targets(settings, round_)
            assert 1 <= len(t) <= LIMITS["num_suggestions"][1]
            assert all(LENGTH_LIMITS[0] <= x <= LENGTH_LIMITS[1] for x in t)
            assert not any(math.isnan(x) for x in t)


def test_to_dict_round_trips_through_validate():
    settings = Settings(temperature=1.2, top_k=7, lengths=[3, 6], num_suggestions=2)
    again, notes = validate(settings.to_dict())
    assert again == settings and notes == []
