"""The fair queue in front of the I/O workers: deficit round robin over flows, and a flow
never on every worker at once."""

from __future__ import annotations

import threading

from netswap.transport.workers import QUANTUM, FairQueue, WorkerPool

KiB = 1024


def drain(queue: FairQueue, count: int) -> list:
    taken = []
    for _ in range(count):
        flow, item = queue.get()
        queue.done(flow)
        taken.append(item)
    return taken


def test_a_flow_with_a_deep_queue_does_not_delay_another_flow_behind_it():
    queue = FairQueue(flow_limit=8)
    for i in range(100):
        queue.put("storm", 128 * KiB, f"storm-{i}")
    queue.put("quiet", 4 * KiB, "quiet-0")
    order = drain(queue, 101)
    # FIFO would serve it last; round robin after at most one quantum of the storm.
    assert order.index("quiet-0") <= QUANTUM // (128 * KiB)


def test_flows_share_by_bytes_not_by_request_count():
    queue = FairQueue(flow_limit=8)
    for i in range(64):
        queue.put("small", 4 * KiB, ("small", i))
        queue.put("large", 128 * KiB, ("large", i))
    first = drain(queue, 66)
    large = sum(1 for flow, _ in first if flow == "large")
    small = sum(1 for flow, _ in first if flow == "small")
    # Per turn: one 128 KiB request against 32 of 4 KiB.
    assert small == 32 * large or abs(small - 32 * large) <= 32, (small, large)


def test_a_request_larger_than_the_quantum_is_served_after_enough_turns():
    queue = FairQueue(flow_limit=8)
    queue.put("big", 32 * 1024 * KiB, "big")
    for i in range(10000):
        queue.put("small", 4 * KiB, i)
    order = drain(queue, 10001)
    # It needs 256 turns' quanta (32 MiB); in the 255 turns after its first the small flow
    # spends as many: about 8160 of its requests go first, not all 10000 and not none.
    turns = 32 * 1024 * KiB // QUANTUM
    per_turn = QUANTUM // (4 * KiB)
    assert (turns - 1) * per_turn <= order.index("big") <= turns * per_turn


def test_a_flow_at_its_worker_limit_leaves_the_next_job_to_another_flow():
    queue = FairQueue(flow_limit=2)
    for i in range(10):
        queue.put("storm", 4 * KiB, f"storm-{i}")
    assert queue.get() == ("storm", "storm-0")
    assert queue.get() == ("storm", "storm-1")  # two running: the storm's limit
    got = []
    waiter = threading.Thread(target=lambda: got.append(queue.get()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # nothing else to do: it waits, not a third storm job
    queue.put("quiet", 4 * KiB, "quiet-0")
    waiter.join(5)
    assert got == [("quiet", "quiet-0")]
    queue.done("storm")
    assert queue.get() == ("storm", "storm-2")


def test_close_hands_out_everything_queued_first():
    pool = WorkerPool(3)
    ran = []
    lock = threading.Lock()

    def job(i):
        with lock:
            ran.append(i)

    for i in range(2000):
        pool.submit_for(i % 5, 4 * KiB * (i % 3), job, i)
    pool.stop()
    assert sorted(ran) == list(range(2000))
