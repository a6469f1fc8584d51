"""Errors of the NBD protocol layer and the mapping of OS errors onto NBD error values."""

from __future__ import annotations

import errno

from . import constants as C


class ProtocolError(Exception):
    """The peer broke the protocol so that the only answer is closing its connection.

    `reason` is a short stable label (bad_request_magic, option_too_long, ...) used as the
    counter's label and in the one log line the transport writes.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# The spec restricts errors to a handful of values; map the OS's richer set onto them.
_NBD_ERROR_FOR_ERRNO = {
    errno.EPERM: C.EPERM,
    errno.EACCES: C.EPERM,
    errno.EROFS: C.EPERM,
    errno.EBADF: C.EPERM,  # a write on a descriptor opened read-only
    errno.EIO: C.EIO,
    errno.ENOMEM: C.ENOMEM,
    errno.EINVAL: C.EINVAL,
    errno.ENOSPC: C.ENOSPC,
    errno.EDQUOT: C.ENOSPC,  # the spec asks for EDQUOT and EFBIG to become ENOSPC
    errno.EFBIG: C.ENOSPC,
    errno.EOVERFLOW: C.EOVERFLOW,
    errno.EOPNOTSUPP: C.ENOTSUP,
    errno.ESHUTDOWN: C.ESHUTDOWN,
}


def nbd_error_from_os(exc: OSError) -> int:
    """The NBD error value for an OS error; anything unexpected is an I/O error."""
    return _NBD_ERROR_FOR_ERRNO.get(exc.errno, C.EIO)
