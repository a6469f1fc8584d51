"""Errors shared by the protocol front ends (NBD now, NFS later) and the layers behind them."""


class AttachRefused(Exception):
    """The server will not attach this client to this export now; the message says why.

    Raised where a node would attach to its swap export (the seed's swapon) but the pool
    cannot back its reservation: netswapd never promises in-flight capacity it has not locked.
    `reason` is a short stable label for the counter.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class AccessDenied(AttachRefused):
    """This client may not open this export (an allow list, a node's binding or secret).

    The message is what the client is told, so it says no more than "not allowed": which
    rule refused it, and whose the export is, go to the log and the counter only.
    """
