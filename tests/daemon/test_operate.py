"""Operating a running daemon: SIGHUP reload and netswapctl, against a real netswapd."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from support.daemon import REPO, netswapctl, start_daemon, wait_for_log
from support.libnbd import import_libnbd

nbd = import_libnbd()
MiB = 1 << 20


def reachable(daemon, export):
    h = nbd.NBD()
    try:
        h.connect_uri(daemon.uri(export))
    except nbd.Error:
        return False
    h.shutdown()
    return True


def test_sighup_reload_adds_removes_and_keeps_open_connections(tmp_path):
    daemon = start_daemon(tmp_path)
    try:
        open_disk = nbd.NBD()
        open_disk.connect_uri(daemon.uri("disk"))
        open_disk.pwrite(b"before" * 100, 0)
        config = daemon.config_path.read_text()
        # Edit the file as an operator would: drop "ram", add "extra", change a limit.
        lines = config.replace('name = "ram"', 'name = "extra"').replace(
            'description = "remote RAM"', 'description = "added by reload"')
        lines = lines.replace('[nbd]\n', '[nbd]\nmax_inflight = 7\nmax_request = "1MiB"\n', 1)
        daemon.config_path.write_text(lines)
        daemon.process.send_signal(signal.SIGHUP)
        wait_for_log(daemon, "reloaded")
        assert reachable(daemon, "extra")
        assert not reachable(daemon, "ram")
        # Changed limits apply to new connections...
        fresh = nbd.NBD()
        fresh.connect_uri(daemon.uri("disk"))
        assert fresh.get_block_size(nbd.SIZE_MAXIMUM) == MiB
        fresh.shutdown()
        # ...while the open one keeps the limits it started with.
        assert open_disk.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
        open_disk.pwrite(b"z" * (2 * MiB), 8 * MiB)
        # The connection opened before the reload carries on as if nothing happened.
        open_disk.pwrite(b"after!" * 100, 600)
        assert open_disk.pread(1200, 0) == b"before" * 100 + b"after!" * 100
        # A broken config is refused and the running one stays.
        daemon.config_path.write_text(lines + "\n[pool\n")
        daemon.process.send_signal(signal.SIGHUP)
        wait_for_log(daemon, "reload rejected")
        assert "TOML syntax error" in daemon.log()
        assert reachable(daemon, "extra") and reachable(daemon, "disk")
        # A key that needs a restart is named, and the rest still applies.
        daemon.config_path.write_text(lines.replace("workers = 4", "workers = 5"))
        daemon.process.send_signal(signal.SIGHUP)
        wait_for_log(daemon, "daemon.workers changed but only take effect after a restart")
        open_disk.shutdown()
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_netswapctl_status_exports_and_detach_with_wipe(tmp_path):
    daemon = start_daemon(tmp_path)
    try:
        socket_path = daemon.config_path.parent / "control.sock"
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
        node = nbd.NBD()
        node.connect_uri(daemon.uri("swap/ctl-node"))
        secret = b"node secret " * 4096
        node.pwrite(secret, 0)
        node.flush()

        status = json.loads(netswapctl(daemon, "--json", "status").stdout)
        assert status["ok"] and status["attached_nodes"] == {"ctl-node": 1}
        assert status["connections_per_node"] == {"ctl-node": 1}
        assert "swap/ctl-node" in status["reserve_tree"]
        human = netswapctl(daemon, "status")
        assert human.returncode == 0 and "ctl-node: 1 connection(s)" in human.stdout

        exports = json.loads(netswapctl(daemon, "--json", "exports").stdout)["exports"]
        by_name = {e["name"]: e for e in exports}
        assert by_name["swap/ctl-node"]["swap"] and by_name["swap/ctl-node"]["connections"] == 1
        assert by_name["swap/ctl-node"]["allocated_bytes"] >= len(secret)
        assert by_name["disk"]["size"] == 64 * MiB

        result = netswapctl(daemon, "detach", "ctl-node", "--wipe")
        assert result.returncode == 0, result.stderr
        assert "1 connection(s) closed, reserve released, swap wiped" in result.stdout
        with pytest.raises(nbd.Error):
            node.pread(4096, 0)  # its connection is gone
        image = daemon.state_dir / "swap" / "ctl-node.img"
        assert image.read_bytes() == bytes(image.stat().st_size)  # no old data
        assert image.stat().st_blocks == 0
        after = json.loads(netswapctl(daemon, "--json", "status").stdout)
        assert after["attached_nodes"] == {}

        missing = netswapctl(daemon, "detach", "never-seen")
        assert missing.returncode == 1 and "no swap export" in missing.stderr
        assert not (daemon.state_dir / "swap" / "never-seen.img").exists()
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_netswapctl_without_a_daemon_says_so(tmp_path):
    result = subprocess.run([sys.executable, "-m", "netswap.ctl", "--socket", str(tmp_path / "none"),
                             "status"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1 and "cannot reach netswapd" in result.stderr


def test_exports_lists_swap_left_on_disk_without_opening_it(tmp_path):
    first = start_daemon(tmp_path)
    try:
        h = nbd.NBD()
        h.connect_uri(first.uri("swap/old-node"))
        h.pwrite(b"kept" * 1024, 0)
        h.shutdown()
    finally:
        assert first.stop() == 0, first.log()
    second = start_daemon(tmp_path)  # the same state directory: a restart
    try:
        exports = json.loads(netswapctl(second, "--json", "exports").stdout)["exports"]
        row = next(e for e in exports if e["name"] == "swap/old-node")
        assert row["swap"] and row["open"] is False
        image = str(second.state_dir / "swap" / "old-node.img")
        fds = os.listdir(f"/proc/{second.process.pid}/fd")
        assert all(os.readlink(f"/proc/{second.process.pid}/fd/{fd}") != image for fd in fds)
        assert "(on disk, not open)" in netswapctl(second, "exports").stdout
    finally:
        assert second.stop() == 0, second.log()
