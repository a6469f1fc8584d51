"""The netswapd command line, run as a real process."""

import signal
import subprocess
import sys

from netswap import __version__
from support.daemon import REPO, free_port, start_daemon


def netswapd(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "netswap", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, **kwargs)


def test_version():
    result = netswapd("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"netswapd {__version__}"


def test_check_config_accepts_the_embedded_default():
    result = netswapd("check-config", "config/netswapd.toml")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_check_config_names_key_value_and_allowed(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[pool]\nsize = "12 parsecs"\n')
    result = netswapd("check-config", str(bad))
    assert result.returncode == 2
    assert "pool.size" in result.stderr and "12 parsecs" in result.stderr and "MiB" in result.stderr
    bad.write_text('[pool]\nsizee = "1GiB"\n')
    result = netswapd("check-config", str(bad))
    assert result.returncode == 2 and "sizee" in result.stderr


def test_run_refuses_an_invalid_config_before_doing_anything(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[nbd]\nlisten = ["127.0.0.1:99999"]\n')
    result = netswapd("--config", str(bad))
    assert result.returncode == 2 and "nbd.listen" in result.stderr


def test_port_in_use_is_reported_with_the_address(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(
            f'[daemon]\nstate_dir = "{tmp_path}/state"\n[pool]\nnormal_budget = "32MiB"\nlock = "off"\n'
            f'[nbd]\nlisten = ["127.0.0.1:{port}"]\nunix_socket = ""\n'
        )
        result = netswapd("--config", str(config))
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "Address already in use" in result.stderr


def test_required_lock_without_memlock_rights_exits_with_advice(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}/state"\n[pool]\nnormal_budget = "32MiB"\nlock = "required"\n'
        f'[nbd]\nlisten = ["127.0.0.1:{free_port()}"]\nunix_socket = ""\n'
    )
    # Dropping CAP_IPC_LOCK from the bounding set makes RLIMIT_MEMLOCK (8 MiB) apply to root.
    result = subprocess.run(
        ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", sys.executable, "-m", "netswap",
         "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 1
    assert "RLIMIT_MEMLOCK" in result.stderr and "CAP_IPC_LOCK" in result.stderr


def test_sigint_stops_cleanly(tmp_path):
    daemon = start_daemon(tmp_path)
    assert daemon.stop(signal.SIGINT) == 0
    assert "received SIGINT" in daemon.log()
    assert not daemon.unix_socket.exists()  # the socket file is removed on the way out
