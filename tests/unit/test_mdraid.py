"""netswap-node's mirror bookkeeping without a kernel: the md superblock identity a member is
checked by, and the health read from an array's sysfs directory (a copy of md's layout in a
temporary directory; the real array is tests/node/test_node_mirror.py's)."""

from __future__ import annotations

import struct
import uuid

import pytest

from netswap.node import mdraid
from netswap.node.mdraid import MD_MAGIC, MdMember, read_state, superblock_uuid
from netswap.node.swaparea import SwapHeader

ARRAY = uuid.UUID("6f1d3c1e-0b7a-4f57-9d9e-2b1f0c9a7e11")


def superblock(array: uuid.UUID) -> bytes:
    page = bytearray(4096)
    struct.pack_into("<I", page, 0, MD_MAGIC)
    struct.pack_into("<I", page, 4, 1)  # major version
    page[16:32] = array.bytes
    return bytes(page)


def test_a_member_is_known_by_its_superblock_and_nothing_else_passes():
    member = MdMember(ARRAY)
    assert superblock_uuid(superblock(ARRAY)) == ARRAY
    assert member.found_in(superblock(ARRAY)) is None
    other = uuid.uuid4()
    assert f"found array {other}" in member.found_in(superblock(other))
    assert "no md superblock, e.g. wiped" in member.found_in(bytes(4096))
    assert "no md superblock" in member.found_in(b"\xfc\x4e\x2b\xa9" + bytes(12))  # too short


def test_a_plain_device_is_known_by_its_swap_header():
    area = uuid.uuid4()
    page = bytearray(4096)
    page[4086:4096] = b"SWAPSPACE2"
    page[1036:1052] = area.bytes
    assert SwapHeader(area).found_in(bytes(page)) is None
    assert "none, e.g. wiped" in SwapHeader(area).found_in(bytes(4096))


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(mdraid, "SYS_BLOCK", tmp_path)

    def array(state="clean", degraded=0, action="idle", done="none", **members):
        md = tmp_path / "md127" / "md"
        md.mkdir(parents=True, exist_ok=True)
        for name, value in dict(array_state=state, degraded=degraded, sync_action=action,
                                sync_completed=done).items():
            (md / name).write_text(f"{value}\n")
        for old in md.glob("dev-*"):
            (old / "state").unlink()
            old.rmdir()
        for name, value in members.items():
            (md / f"dev-{name}").mkdir()
            (md / f"dev-{name}" / "state").write_text(f"{value}\n")
        return read_state("/dev/md127")

    return array


def test_health_as_md_tells_it(sysfs):
    assert sysfs(nbd0="in_sync", nbd1="in_sync").health == "clean"
    degraded = sysfs(degraded=1, nbd0="in_sync", nbd1="faulty")
    assert degraded.health == "degraded" and degraded.members["nbd1"] == "faulty"
    assert sysfs(degraded=1, nbd0="in_sync").health == "degraded"  # removed: one member left
    resyncing = sysfs(state="active", degraded=1, action="recover", done="2048 / 1572864",
                      nbd0="in_sync", nbd1="spare")
    assert resyncing.health == "resyncing"
    assert str(resyncing) == "resyncing (nbd0 in_sync, nbd1 spare, recover 2048 / 1572864)"
    assert sysfs(state="inactive").health == "failed"
    assert sysfs(degraded=1, nbd0="faulty").health == "failed"
    assert read_state("/dev/md5").health == "failed"  # no such array
