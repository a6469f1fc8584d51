"""The swap header: what says that an export still holds this node's swap area.

mkswap writes the header in the first page: magic "SWAPSPACE2" at the page's last 10 bytes,
and (version 1) a 16-byte UUID at offset 1036 (1024 bytes of boot block, then version,
last_page and nr_badpages, 4 bytes each). The UUID is new at every mkswap, so an export that
was wiped (zeros), replaced, or set up again by someone else no longer shows the UUID the
agent saw at attach.
"""

from __future__ import annotations

import os
import uuid

PAGE = 4096
MAGIC = b"SWAPSPACE2"
UUID_OFFSET = 1036


def swap_uuid(first_page: bytes) -> uuid.UUID | None:
    """The UUID of the swap area whose first page this is; None if it holds no swap header."""
    if len(first_page) < PAGE or first_page[PAGE - len(MAGIC):PAGE] != MAGIC:
        return None
    return uuid.UUID(bytes=bytes(first_page[UUID_OFFSET:UUID_OFFSET + 16]))


def read_device_uuid(device: str) -> uuid.UUID | None:
    fd = os.open(device, os.O_RDONLY)
    try:
        return swap_uuid(os.pread(fd, PAGE, 0))
    finally:
        os.close(fd)


class SwapHeader:
    """A plain (unmirrored) device's identity: the swap header mkswap wrote at attach, in the
    export's first page (member.Identity)."""

    offset = 0

    def __init__(self, area: uuid.UUID) -> None:
        self.area = area

    def found_in(self, page: bytes) -> str | None:
        found = swap_uuid(page)
        if found == self.area:
            return None
        return (f"this node's swap area {self.area} (its header: "
                f"{found or 'none, e.g. wiped'})")
