"""A connection's pool allocations: who may use the reserve, waiting, and stopping a wait,
against a scripted pool (the real pool's behaviour is in test_pool.py)."""

import pytest

from netswap.counters import Counters
from netswap.nbd.allocation import BufferAllocator, Stopping
from netswap.transport.backpressure import ALLOC_POLL

GROUP = "the node's requests group"


class ScriptedPool:
    """Answers alloc() calls from `answers` (None: nothing free) and records each call."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = []

    def alloc(self, size, timeout=None, emergency=False, group=None):
        self.calls.append((size, timeout, emergency, group))
        return self.answers.pop(0)


def allocator(pool, *, tagged=True, swap=True, stopping=lambda: False):
    counters = Counters()
    return BufferAllocator(pool, counters, tagged=tagged, swap=swap, stopping=stopping), counters


def test_a_tagged_connection_may_fall_back_to_its_group():
    pool = ScriptedPool("buffer")
    alloc, _ = allocator(pool, tagged=True)
    assert alloc.alloc(4096, GROUP, wait=True) == "buffer"
    assert pool.calls == [(4096, None, True, GROUP)]


@pytest.mark.parametrize("tagged, group", [(False, GROUP), (True, None)])
def test_an_untagged_connection_or_one_without_a_group_never_touches_the_reserve(tagged, group):
    pool = ScriptedPool("buffer")
    alloc, _ = allocator(pool, tagged=tagged)
    alloc.alloc(4096, group, wait=True)
    assert pool.calls == [(4096, None, False, None)]


def test_without_wait_an_empty_pool_is_none_at_once():
    pool = ScriptedPool(None)
    alloc, counters = allocator(pool, swap=False)
    assert alloc.alloc(4096, None, wait=False) is None
    assert len(pool.calls) == 1
    assert counters.get("pool_waits", "non_swap") == 0


@pytest.mark.parametrize("swap, label", [(True, "swap"), (False, "non_swap")])
def test_a_wait_polls_the_pool_and_is_counted_once_by_who_waited(swap, label):
    pool = ScriptedPool(None, None, None, "buffer")
    alloc, counters = allocator(pool, swap=swap)
    assert alloc.alloc(4096, GROUP, wait=True) == "buffer"
    assert [timeout for _, timeout, _, _ in pool.calls] == [None, ALLOC_POLL, ALLOC_POLL, ALLOC_POLL]
    assert counters.get("pool_waits", label) == 1


def test_a_wait_ends_when_stopping():
    polls = []

    def stopping():
        polls.append(1)
        return len(polls) > 2

    pool = ScriptedPool(None, None, None)
    alloc, _ = allocator(pool, stopping=stopping)
    with pytest.raises(Stopping):
        alloc.alloc(4096, GROUP, wait=True)
    assert len(pool.calls) == 3  # the first try, then one poll per "not stopping yet"
