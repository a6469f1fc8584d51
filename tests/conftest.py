"""Fixtures shared by every test directory; the helpers behind them live in support/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# support/ is imported by name from unit/, daemon/ and node/, and by the bench scripts.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.daemon import start_daemon, stop_clean  # noqa: E402
from support.netns import FOREIGN, Netns, run  # noqa: E402
from support.nfs import ALPHA, Nfs, start_nfs_daemon  # noqa: E402


@pytest.fixture
def daemon(tmp_path):
    running = start_daemon(tmp_path)
    yield running
    stop_clean(running)


@pytest.fixture
def netns():
    name = f"nsw-pmap-{os.getpid()}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        run("ip", "-n", name, "addr", "add", f"{FOREIGN}/32", "dev", "lo")
        yield Netns(name)
    finally:
        run("ip", "netns", "del", name, check=False)


@pytest.fixture(scope="module")
def nfs_scratch(tmp_path_factory):
    """(daemon, node alpha's Nfs client, the scratch export's root handle), one per module."""
    daemon = start_nfs_daemon(tmp_path_factory.mktemp("nfs-scratch"))
    client = None
    try:
        client = Nfs(daemon, ALPHA)
        yield daemon, client, client.root("/scratch")
    finally:
        if client is not None:
            client.close()
        stop_clean(daemon)
