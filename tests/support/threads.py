"""Running a body on many threads at once, failures surfaced in the caller."""

from __future__ import annotations

import threading


def run_in_threads(count: int, target) -> None:
    """Run target(index) on ``count`` threads released together; re-raise the first failure."""
    start = threading.Barrier(count)
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            start.wait()
            target(index)
        except BaseException as e:  # surfaced in the calling thread below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
