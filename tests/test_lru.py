"""The in-process LRU: bounded, least recently used evicted first."""

from __future__ import annotations

from gateway.lru import LRU


def test_get_of_a_missing_key_is_none() -> None:
    lru: LRU[str, int] = LRU(3)
    assert lru.get("a") is None
    assert "a" not in lru
    assert len(lru) == 0


def test_set_then_get() -> None:
    lru: LRU[str, bytes] = LRU(3)
    lru.set("a", b"body")
    assert lru.get("a") == b"body"
    assert "a" in lru
    assert len(lru) == 1


def test_holds_at_most_max_entries_oldest_evicted_first() -> None:
    lru: LRU[str, int] = LRU(3)
    for n, key in enumerate("abcde"):
        lru.set(key, n)
        assert len(lru) == min(n + 1, 3)
    assert [key in lru for key in "abcde"] == [False, False, True, True, True]


def test_reading_an_entry_makes_it_the_last_to_be_evicted() -> None:
    lru: LRU[str, int] = LRU(3)
    for n, key in enumerate("abc"):
        lru.set(key, n)
    assert lru.get("a") == 0
    lru.set("d", 3)
    assert "b" not in lru
    assert [key in lru for key in "acd"] == [True, True, True]


def test_membership_test_does_not_refresh_an_entry() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.set("a", 1)
    lru.set("b", 2)
    assert "a" in lru
    lru.set("c", 3)
    assert "a" not in lru
    assert "b" in lru


def test_overwrite_replaces_the_value_and_refreshes_the_entry() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.set("a", 1)
    lru.set("b", 2)
    lru.set("a", 10)
    lru.set("c", 3)
    assert lru.get("a") == 10
    assert "b" not in lru
    assert len(lru) == 2


def test_pop_removes_and_returns() -> None:
    lru: LRU[str, int] = LRU(3)
    lru.set("a", 1)
    assert lru.pop("a") == 1
    assert lru.pop("a") is None
    assert "a" not in lru
    assert len(lru) == 0


def test_clear() -> None:
    lru: LRU[str, int] = LRU(3)
    lru.set("a", 1)
    lru.set("b", 2)
    lru.clear()
    assert len(lru) == 0
    assert lru.get("a") is None


def test_zero_entries_holds_nothing() -> None:
    lru: LRU[str, int] = LRU(0)
    lru.set("a", 1)
    assert lru.get("a") is None
    assert len(lru) == 0


def test_falsy_values_are_values() -> None:
    lru: LRU[str, int | str] = LRU(3)
    lru.set("zero", 0)
    lru.set("empty", "")
    assert lru.get("zero") == 0
    assert lru.get("empty") == ""


def test_one_entry() -> None:
    lru: LRU[int, str] = LRU(1)
    lru.set(1, "one")
    lru.set(2, "two")
    assert lru.get(1) is None
    assert lru.get(2) == "two"


def test_weight_bound_evicts_oldest_until_it_fits() -> None:
    lru: LRU[str, bytes] = LRU(10, max_weight=10, weigh=len)
    lru.set("a", b"1234")
    lru.set("b", b"1234")
    lru.set("c", b"1234")
    assert "a" not in lru
    assert lru.weight == 8


def test_weight_of_a_replaced_value_is_released() -> None:
    lru: LRU[str, bytes] = LRU(10, max_weight=10, weigh=len)
    lru.set("a", b"123456")
    lru.set("a", b"12")
    assert lru.weight == 2
    lru.pop("a")
    assert lru.weight == 0


def test_a_value_heavier_than_the_bound_is_not_kept() -> None:
    lru: LRU[str, bytes] = LRU(10, max_weight=4, weigh=len)
    lru.set("a", b"12")
    lru.set("big", b"12345")
    assert "big" not in lru
    assert lru.get("a") == b"12"
