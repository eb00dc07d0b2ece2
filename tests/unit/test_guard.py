"""The per-visitor request bucket (editor/guard.py RequestRate), on its own clock."""

from __future__ import annotations

from editor import guard
from editor.guard import RequestRate


def test_a_visitor_gets_the_burst_then_the_rate_and_others_are_not_touched():
    rate = RequestRate(app=None, rate=2.0, burst=5.0)
    assert [rate.allow("a", now=100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert rate.allow("b", now=100.0)  # another visitor has a bucket of their own
    assert rate.allow("a", now=100.5) and not rate.allow("a", now=100.5)  # 2 a second: one more after 0.5 s
    assert [rate.allow("a", now=110.0) for _ in range(6)] == [True] * 5 + [False]  # full again, never more than the burst


def test_the_table_of_visitors_is_bounded(monkeypatch):
    monkeypatch.setattr(guard, "MAX_VISITORS_TRACKED", 100)
    rate = RequestRate(app=None, rate=1.0, burst=1.0)
    for n in range(1000):
        rate.allow(f"10.0.{n // 256}.{n % 256}", now=1.0)
    assert len(rate._buckets) == 100


def test_the_visitor_is_the_proxy_s_last_entry_only_when_a_proxy_is_trusted(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("TABWRITE_TRUST_PROXY", raising=False)
    assert guard.visitor_address("127.0.0.1", "6.6.6.6") == "127.0.0.1"  # a client cannot name itself
    monkeypatch.setenv("TABWRITE_TRUST_PROXY", "1")
    assert guard.visitor_address("127.0.0.1", "6.6.6.6, 203.0.113.9") == "203.0.113.9"
    assert guard.visitor_address("", "") == "unknown"
