"""Waiting on a condition instead of sleeping for a guessed time."""

from __future__ import annotations

import time
from typing import Callable, TypeVar, Union

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 10, interval: float = 0.05,
               what: Union[str, Callable[[], str]] = "the condition") -> T:
    """condition()'s first true value, polled every `interval` seconds; AssertionError naming
    `what` (or what() returns: the state worth seeing, such as the log) if it is still false
    after `timeout` seconds. An exception from condition() ends the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what() if callable(what) else what}: still not true after"
                                 f" {timeout} s")
        time.sleep(interval)
