"""Binding a Unix stream socket at a configured path, the same way for every listener."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path


def bind_unix(path: Path, mode: int, key: str) -> socket.socket:
    """A socket bound at `path` with permissions `mode`, not yet listening.

    A socket left by a previous run is replaced; any other file there is not ours to remove.
    The socket is created under a umask that already excludes everything `mode` does not
    grant, so it is never reachable by anyone else, not even between bind and chmod.
    Errors are OSErrors whose message (str) names the config `key`, the path and the cause.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise FileExistsError(f"{key} = {str(path)!r}: exists and is not a socket")
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)  # bind gives 0777 & ~umask: make it exactly `mode`
        return sock
    except FileExistsError:
        raise
    except OSError as exc:
        raise OSError(f"{key} = {str(path)!r}: cannot listen: {exc.strerror}") from exc
