"""portal/recent.py: what was read a moment ago, kept for a while and bounded."""

from __future__ import annotations

import threading

import pytest

from portal.recent import Recent


def test_an_entry_lasts_its_seconds_and_no_longer():
    clock = [100.0]
    recent: Recent[str, int] = Recent(5.0, 4, timer=lambda: clock[0])
    recent.put("a", 1)
    clock[0] += 4.9
    assert recent.get("a") == 1
    clock[0] += 0.1
    assert recent.get("a") is None
    assert len(recent) == 0


def test_a_full_cache_lets_the_least_recently_used_go_first():
    recent: Recent[str, int] = Recent(60.0, 2)
    recent.put("a", 1)
    recent.put("b", 2)
    assert recent.get("a") == 1  # a used last: b goes
    recent.put("c", 3)
    assert (recent.get("a"), recent.get("b"), recent.get("c")) == (1, None, 3)
    recent.pop("a")
    assert recent.get("a") is None and len(recent) == 1
    recent.clear()
    assert len(recent) == 0


def test_threads_share_one_cache_without_losing_its_bound():
    recent: Recent[int, int] = Recent(60.0, 50)

    def work(offset: int) -> None:
        for i in range(2000):
            recent.put(offset + i % 100, i)
            recent.get(offset + (i * 7) % 100)

    threads = [threading.Thread(target=work, args=(n * 1000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(recent) == 50


@pytest.mark.parametrize("seconds, size", [(0, 1), (1, 0)])
def test_a_cache_that_could_keep_nothing_is_refused(seconds, size):
    with pytest.raises(ValueError, match="seconds > 0 and size >= 1"):
        Recent(seconds, size)
