"""netswap-node's state file is written by a thread of its own, so that the agent's loop never
waits for a page of tmpfs while the node's swap waits for the agent."""

from __future__ import annotations

import json
import logging
import threading

from netswap.node import state as node_state
from netswap.node.state import StateWriter


def test_the_newest_state_is_written_and_flush_waits_for_it(tmp_path):
    path = tmp_path / "run" / "node.json"
    writer = StateWriter(path)
    for n in range(50):
        writer.submit({"n": n})
    assert writer.flush(timeout=30)
    assert json.loads(path.read_text()) == {"n": 49}
    writer.submit({"n": 50, "state": "detached"})
    assert writer.close(timeout=30)
    assert json.loads(path.read_text()) == {"n": 50, "state": "detached"}
    assert [p.name for p in path.parent.iterdir()] == ["node.json"]  # no partial left


def test_a_write_that_waits_does_not_hold_up_the_agent(tmp_path, monkeypatch):
    path = tmp_path / "node.json"
    stalled, released = threading.Event(), threading.Event()
    written = []
    real_write = node_state.write_atomically

    def write_waiting_for_a_page(where, text):
        if not written:
            stalled.set()
            released.wait(30)  # the first write waits, as one would on reclaim
        written.append(json.loads(text)["n"])
        real_write(where, text)

    monkeypatch.setattr(node_state, "write_atomically", write_waiting_for_a_page)
    writer = StateWriter(path)
    writer.submit({"n": 0})
    assert stalled.wait(30)
    for n in range(1, 6):  # the agent goes on handing states over while the write waits
        writer.submit({"n": n})
    assert not writer.flush(timeout=0.2)
    released.set()
    assert writer.close(timeout=30)
    assert written == [0, 5]  # the ones it was too slow for are skipped, the newest is written
    assert json.loads(path.read_text()) == {"n": 5}


def test_a_failing_write_is_said_once_and_the_writer_goes_on(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    writer = StateWriter(blocker / "node.json")
    with caplog.at_level(logging.ERROR, logger="netswap.node"):
        for n in range(3):
            writer.submit({"n": n})
            writer.flush(timeout=30)
        blocker.unlink()
        blocker.mkdir()
        writer.submit({"n": 3})
        assert writer.close(timeout=30)
    errors = [r.getMessage() for r in caplog.records if "state file not written" in r.getMessage()]
    assert len(errors) == 1, errors
    assert json.loads((blocker / "node.json").read_text()) == {"n": 3}
