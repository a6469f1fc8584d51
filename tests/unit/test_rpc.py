"""The sans-I/O ONC RPC and XDR layer (netswap.rpc): every error path of the decoders, round
trips through the encoders, and properties over arbitrary bytes."""

from __future__ import annotations

import ctypes
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netswap.rpc import constants as C
from netswap.rpc.message import (
    AuthFailure, AuthSys, BadReply, CallRejected, GarbageCall, NotACall, RecordAssembler,
    RecordError, RecordTooLarge, RpcMismatch, accepted, call_header, denied_auth,
    denied_rpc_mismatch, fragment_header, parse_call, parse_fragment_header, parse_reply,
    prog_mismatch,
)
from netswap.rpc.xdr import Packer, Unpacker, XdrError, padded, padding


def u32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


# --------------------------------------------------------------------------- XDR decoding


def test_integers_decode_big_endian_with_sign():
    data = u32(0xFFFFFFFF, 0xFFFFFFFE) + struct.pack(">Qq", 2**64 - 1, -2)
    u = Unpacker(data)
    assert u.uint() == 0xFFFFFFFF
    assert u.int() == -2
    assert u.uhyper() == 2**64 - 1
    assert u.hyper() == -2
    u.done()


@pytest.mark.parametrize("method,size", [("uint", 4), ("int", 4), ("bool", 4), ("enum", 4),
                                         ("uhyper", 8), ("hyper", 8)])
def test_every_scalar_refuses_a_truncated_buffer(method, size):
    for short in range(size):
        u = Unpacker(bytes(short))
        with pytest.raises(XdrError):
            getattr(u, method)()
        assert u.offset == 0  # nothing consumed by a failed read


@pytest.mark.parametrize("value,expected", [(0, False), (1, True)])
def test_bool_accepts_only_zero_and_one(value, expected):
    assert Unpacker(u32(value)).bool() is expected


@pytest.mark.parametrize("value", [2, 0x100, 0xFFFFFFFF])
def test_bool_refuses_other_values(value):
    with pytest.raises(XdrError, match="bool"):
        Unpacker(u32(value)).bool()


def test_enum_checks_allowed_values_and_is_signed():
    assert Unpacker(u32(0xFFFFFFFF)).enum() == -1
    assert Unpacker(u32(2)).enum(allowed={0, 1, 2}) == 2
    with pytest.raises(XdrError, match="enum"):
        Unpacker(u32(3)).enum(allowed={0, 1, 2})


def test_opaque_is_a_slice_of_the_buffer_not_a_copy():
    buf = bytearray(u32(5) + b"hello" + b"\0\0\0" + u32(7))
    u = Unpacker(buf)
    data = u.opaque(64)
    assert bytes(data) == b"hello"
    buf[4] = ord("j")
    assert bytes(data) == b"jello"  # it is the caller's memory
    assert u.uint() == 7
    u.done()


def test_padding_is_skipped_leniently_when_not_zero():
    u = Unpacker(u32(1) + b"x\xff\xff\xff" + u32(9))
    assert bytes(u.opaque()) == b"x"
    assert u.uint() == 9


@pytest.mark.parametrize("data,max_length,what", [
    (u32(5) + b"hell", 64, "data cut short"),
    (u32(5) + b"hello", 64, "padding cut short"),
    (u32(5) + b"hello\0\0", 64, "padding one byte short"),
    (u32(0xFFFFFFFF), 2**32, "length 2^32-1 with nothing after it"),
    (u32(0xFFFFFFFF) + bytes(64), 2**32, "length 2^32-1 with some data"),
    (u32(0x80000000) + bytes(8), 2**32, "length 2^31"),
    (u32(65) + bytes(68), 64, "one over the bound"),
    (u32(0xFFFFFFFF) + bytes(8), 64, "2^32-1 over the bound"),
    (u32(1) + b"x\0", 64, "length 1 with half its padding"),
    (b"\0\0\0", 64, "length itself truncated"),
])
def test_opaque_refuses_bad_lengths(data, max_length, what):
    for method in ("opaque", "string"):
        with pytest.raises(XdrError):
            getattr(Unpacker(data), method)(max_length)


def test_opaque_at_its_bound_and_empty_are_fine():
    u = Unpacker(u32(64) + bytes(64) + u32(0))
    assert len(u.opaque(64)) == 64
    assert u.string(0) == b""
    u.done()


def test_fixed_opaque_needs_its_padding_in_the_buffer():
    assert bytes(Unpacker(b"abcdefgh").fixed_opaque(8)) == b"abcdefgh"
    assert bytes(Unpacker(b"abc\0").fixed_opaque(3)) == b"abc"
    with pytest.raises(XdrError):
        Unpacker(b"abc").fixed_opaque(3)
    with pytest.raises(XdrError):
        Unpacker(b"abcdefg").fixed_opaque(8)


def test_string_returns_bytes():
    value = Unpacker(u32(3) + b"abc\0").string(255)
    assert value == b"abc" and type(value) is bytes


def test_optional_reads_a_bool_then_the_item():
    u = Unpacker(u32(1, 42, 0))
    assert u.optional(u.uint) == 42
    assert u.optional(u.uint) is None
    u.done()
    with pytest.raises(XdrError):
        Unpacker(u32(1)).optional(Unpacker(b"").uint)
    with pytest.raises(XdrError, match="bool"):
        Unpacker(u32(2, 42)).optional(Unpacker(u32(42)).uint)


def test_array_checks_count_against_bound_and_bytes_left():
    u = Unpacker(u32(3, 10, 11, 12))
    assert u.array(u.uint, 16) == [10, 11, 12]
    u.done()
    with pytest.raises(XdrError, match="bound"):
        u = Unpacker(u32(17) + bytes(17 * 4))
        u.array(u.uint, 16)
    # A forged count is refused before any element is read.
    calls = []
    u = Unpacker(u32(0xFFFFFFFF, 1, 2))
    with pytest.raises(XdrError, match="left"):
        u.array(lambda: calls.append(1), 2**32)
    assert calls == []


def test_done_reports_bytes_left_over_and_rest_does_not_consume():
    u = Unpacker(u32(1, 2))
    u.uint()
    assert u.remaining == 4 and bytes(u.rest()) == u32(2)
    with pytest.raises(XdrError, match="left over"):
        u.done()
    assert u.uint() == 2
    u.done()


def test_unpack_reads_a_precompiled_shape_with_the_same_checks():
    shape = struct.Struct(">QII")
    assert Unpacker(struct.pack(">QII", 1, 2, 3)).unpack(shape) == (1, 2, 3)
    with pytest.raises(XdrError):
        Unpacker(bytes(15)).unpack(shape)


def test_unpacker_accepts_any_buffer_shape():
    # A pool buffer may come as a memoryview of another format; the Unpacker sees bytes.
    words = memoryview(bytearray(u32(7, 8))).cast("I")
    u = Unpacker(words)
    assert (u.uint(), u.uint()) == (7, 8)


# --------------------------------------------------------------------------- XDR encoding


def test_packer_encodes_the_rfc_layouts():
    p = Packer()
    p.uint(1)
    p.int(-1)
    p.uhyper(2**64 - 1)
    p.hyper(-2)
    p.bool(True)
    p.enum(5)
    p.fixed_opaque(b"abc", 3)
    p.opaque(b"hello")
    p.string("hi")
    p.optional(None, p.uint)
    p.optional(9, p.uint)
    p.array([4, 5], p.uint)
    assert p.bytes() == (u32(1, 0xFFFFFFFF) + struct.pack(">Qq", 2**64 - 1, -2) + u32(1, 5)
                         + b"abc\0" + u32(5) + b"hello\0\0\0" + u32(2) + b"hi\0\0"
                         + u32(0, 1, 9, 2, 4, 5))
    assert len(p) == len(p.bytes())


@pytest.mark.parametrize("method,value", [
    ("uint", -1), ("uint", 2**32), ("int", 2**31), ("int", -(2**31) - 1),
    ("uhyper", -1), ("uhyper", 2**64), ("hyper", 2**63), ("hyper", -(2**63) - 1),
    ("enum", 2**31), ("bool", 2), ("bool", None),
])
def test_packer_refuses_values_out_of_range(method, value):
    p = Packer()
    with pytest.raises(ValueError):
        getattr(p, method)(value)
    assert p.bytes() == b""


def test_packer_refuses_opaque_over_its_bound():
    p = Packer()
    with pytest.raises(ValueError):
        p.opaque(bytes(65), 64)
    with pytest.raises(ValueError):
        p.string("x" * 256, 255)
    with pytest.raises(ValueError):
        p.fixed_opaque(b"1234567", 8)
    with pytest.raises(ValueError):
        p.array([1, 2, 3], p.uint, 2)
    with pytest.raises(ValueError):
        p.pack(struct.Struct(">I"), -1)


def test_padding_helpers():
    assert [padded(n) for n in range(6)] == [0, 4, 4, 4, 4, 8]
    assert [padding(n) for n in range(5)] == [b"", b"\0\0\0", b"\0\0", b"\0", b""]


xdr_item = st.one_of(
    st.tuples(st.just("uint"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("int"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("uhyper"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("hyper"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("bool"), st.booleans()),
    st.tuples(st.just("opaque"), st.binary(max_size=40)),
    st.tuples(st.just("string"), st.binary(max_size=40)),
    st.tuples(st.just("fixed_opaque"), st.binary(max_size=12)),
    st.tuples(st.just("optional"), st.one_of(st.none(), st.integers(0, 2**32 - 1))),
    st.tuples(st.just("array"), st.lists(st.integers(0, 2**32 - 1), max_size=5)),
)


@settings(max_examples=300, deadline=None)
@given(items=st.lists(xdr_item, max_size=12))
def test_packer_and_unpacker_round_trip(items):
    p = Packer()
    for kind, value in items:
        if kind == "optional":
            p.optional(value, p.uint)
        elif kind == "array":
            p.array(value, p.uint, 5)
        else:
            getattr(p, kind)(value)
    data = p.bytes()
    assert len(data) % 4 == 0
    u = Unpacker(data)
    for kind, value in items:
        if kind == "optional":
            assert u.optional(u.uint) == value
        elif kind == "array":
            assert u.array(u.uint, 5) == value
        elif kind == "fixed_opaque":
            assert bytes(u.fixed_opaque(len(value))) == value
        elif kind == "opaque":
            assert bytes(u.opaque(40)) == value
        else:
            assert getattr(u, kind)() == value
    u.done()


# --------------------------------------------------------------------------- record marking


def test_fragment_header_layout():
    assert fragment_header(5) == u32(0x80000005)
    assert fragment_header(5, last=False) == u32(5)
    assert fragment_header(0x7FFFFFFF) == u32(0xFFFFFFFF)
    assert parse_fragment_header(u32(0x80000005)) == (True, 5)
    assert parse_fragment_header(memoryview(u32(0x7FFFFFFF))) == (False, 0x7FFFFFFF)
    with pytest.raises(ValueError):
        fragment_header(0x80000000)
    with pytest.raises(ValueError):
        fragment_header(-1)


def assemble(stream: bytes, max_record: int) -> list[bytes]:
    """Feed a byte stream through a RecordAssembler as the transport does: read a header, then
    the body into the record buffer at `received`."""
    assembler = RecordAssembler(max_record)
    records, record, pos = [], bytearray(), 0
    while pos < len(stream):
        length = assembler.begin_fragment(stream[pos:pos + 4])
        pos += 4
        assert len(record) == assembler.received
        record += stream[pos:pos + length]
        pos += length
        done = assembler.end_fragment()
        if done is not None:
            assert done == len(record)
            records.append(bytes(record))
            record = bytearray()
    return records


def test_single_and_multi_fragment_records():
    stream = (fragment_header(3) + b"abc"
              + fragment_header(2, last=False) + b"de" + fragment_header(1, last=False) + b"f"
              + fragment_header(4) + b"ghij")
    assert assemble(stream, 100) == [b"abc", b"defghij"]


def test_record_exactly_at_the_cap_is_accepted_one_over_is_not():
    assert assemble(fragment_header(8) + bytes(8), 8) == [bytes(8)]
    assert assemble(fragment_header(4, False) + bytes(4) + fragment_header(4) + bytes(4), 8)
    with pytest.raises(RecordTooLarge):
        assemble(fragment_header(9) + bytes(9), 8)
    with pytest.raises(RecordTooLarge):
        assemble(fragment_header(4, False) + bytes(4) + fragment_header(5) + bytes(5), 8)


def test_forged_two_gib_header_is_refused_before_anything_changes():
    assembler = RecordAssembler(1 << 20)
    assembler.begin_fragment(fragment_header(100, last=False))
    assembler.end_fragment()
    for forged in (fragment_header(0x7FFFFFFF), fragment_header(0x7FFFFFFF, last=False),
                   fragment_header(1 << 20)):
        with pytest.raises(RecordTooLarge) as info:
            assembler.begin_fragment(forged)
        assert info.value.reason == "record_too_large"
        assert assembler.received == 100 and not assembler.in_fragment


def test_many_small_fragments_cannot_exceed_the_cap_together():
    assembler = RecordAssembler(10)
    for _ in range(10):
        assert assembler.begin_fragment(fragment_header(1, last=False)) == 1
        assert assembler.end_fragment() is None
    with pytest.raises(RecordTooLarge):
        assembler.begin_fragment(fragment_header(1))


def test_empty_fragments():
    # An empty last fragment may close a non-empty record ...
    assert assemble(fragment_header(3, False) + b"abc" + fragment_header(0), 10) == [b"abc"]
    # ... but an empty fragment that is not last, or an empty record, ends the connection.
    for stream, reason in [(fragment_header(0, last=False), "empty_fragment"),
                           (fragment_header(2, False) + b"ab" + fragment_header(0, False),
                            "empty_fragment"),
                           (fragment_header(0), "empty_record")]:
        with pytest.raises(RecordError) as info:
            assemble(stream, 10)
        assert info.value.reason == reason and not isinstance(info.value, RecordTooLarge)


def test_assembler_refuses_calls_out_of_order():
    assembler = RecordAssembler(10)
    with pytest.raises(RuntimeError):
        assembler.end_fragment()
    assembler.begin_fragment(fragment_header(1))
    with pytest.raises(RuntimeError):
        assembler.begin_fragment(fragment_header(1))
    assert assembler.end_fragment() == 1
    with pytest.raises(ValueError):
        RecordAssembler(0)


@settings(max_examples=200, deadline=None)
@given(records=st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=5),
       data=st.data())
def test_records_split_into_any_fragments_reassemble(records, data):
    stream = b""
    for record in records:
        cuts = sorted(set(data.draw(st.lists(st.integers(1, len(record)), max_size=4))))
        pieces = [record[a:b] for a, b in zip([0] + cuts, cuts + [len(record)]) if a < b]
        for i, piece in enumerate(pieces):
            stream += fragment_header(len(piece), last=i == len(pieces) - 1) + piece
    assert assemble(stream, 50) == records


# --------------------------------------------------------------------------- calls

NODE_CRED = AuthSys(stamp=0x1234, machine="node01", uid=0, gid=0, gids=(0, 6, 27))


def test_call_with_auth_sys_parses_and_args_are_a_view():
    record = bytearray(call_header(0xDEADBEEF, C.PROG_NFS, 3, 7, NODE_CRED) + b"ARGS")
    call = parse_call(memoryview(record))
    assert (call.xid, call.prog, call.vers, call.proc) == (0xDEADBEEF, C.PROG_NFS, 3, 7)
    assert call.cred == NODE_CRED
    assert bytes(call.args) == b"ARGS"
    record[-1] = ord("Z")
    assert bytes(call.args) == b"ARGZ"  # not a copy


def test_call_with_auth_none():
    call = parse_call(call_header(1, C.PROG_MOUNT, 3, 0))
    assert call.cred is None and bytes(call.args) == b""


def test_a_call_truncated_anywhere_in_its_header_is_refused():
    header = call_header(0x77, C.PROG_NFS, 3, 6, NODE_CRED)
    # Field boundaries: xid 4, msg_type 8, rpcvers 12, prog 16, vers 20, proc 24, cred flavor
    # 28, cred length 32, cred body, verifier flavor, verifier length. Every prefix (not only
    # the boundaries) is refused, with the xid once there is one.
    for cut in range(len(header)):
        with pytest.raises((NotACall, GarbageCall)) as info:
            parse_call(header[:cut])
        if cut < 8:
            assert type(info.value) is NotACall
            assert info.value.xid == (0x77 if cut >= 4 else None)
        else:
            assert type(info.value) is GarbageCall and info.value.xid == 0x77
            assert parse_reply(info.value.reply()).stat == C.GARBAGE_ARGS
    parse_call(header)


def call_bytes(*, xid=9, msg_type=C.CALL, rpcvers=2, cred_flavor=C.AUTH_SYS, cred_body=None,
               cred_length=None, verf_flavor=C.AUTH_NONE, verf_body=b"", verf_length=None):
    cred_body = NODE_CRED.pack() if cred_body is None else cred_body
    pad = lambda b: b + bytes(-len(b) & 3)  # noqa: E731
    return (u32(xid, msg_type, rpcvers, C.PROG_NFS, 3, 1, cred_flavor)
            + u32(len(cred_body) if cred_length is None else cred_length) + pad(cred_body)
            + u32(verf_flavor, len(verf_body) if verf_length is None else verf_length)
            + pad(verf_body))


def sys_body(stamp=1, machine=b"m", uid=0, gid=0, gids=(), count=None, name_length=None):
    return (u32(stamp, len(machine) if name_length is None else name_length) + machine
            + bytes(-len(machine) & 3) + u32(uid, gid, len(gids) if count is None else count)
            + u32(*gids))


@pytest.mark.parametrize("kwargs,error,detail", [
    (dict(msg_type=C.REPLY), NotACall, None),
    (dict(msg_type=2), NotACall, None),
    (dict(rpcvers=3), RpcMismatch, None),
    (dict(rpcvers=0), RpcMismatch, None),
    (dict(cred_flavor=C.RPCSEC_GSS, cred_body=bytes(8)), AuthFailure, C.AUTH_BADCRED),
    (dict(cred_flavor=C.AUTH_DH, cred_body=bytes(8)), AuthFailure, C.AUTH_BADCRED),
    (dict(cred_flavor=0x7FFFFFFF, cred_body=b""), AuthFailure, C.AUTH_BADCRED),
    (dict(cred_flavor=C.AUTH_NONE, cred_body=b"abcd"), AuthFailure, C.AUTH_BADCRED),
    (dict(cred_length=401, cred_body=bytes(404)), AuthFailure, C.AUTH_BADCRED),
    (dict(cred_length=0xFFFFFFFF), AuthFailure, C.AUTH_BADCRED),
    (dict(cred_length=200), GarbageCall, None),  # runs past the record
    (dict(cred_body=sys_body(machine=b"x" * 256)), AuthFailure, C.AUTH_BADCRED),
    (dict(cred_body=sys_body(name_length=0xFFFFFFFF)), AuthFailure, C.AUTH_BADCRED),
    (dict(cred_body=sys_body(gids=tuple(range(17)))), AuthFailure, C.AUTH_BADCRED),
    (dict(cred_body=sys_body(gids=(1,), count=0xFFFFFFFF)), AuthFailure, C.AUTH_BADCRED),
    (dict(cred_body=sys_body() + b"\0\0\0\0"), AuthFailure, C.AUTH_BADCRED),  # left over
    (dict(cred_body=sys_body()[:-4]), AuthFailure, C.AUTH_BADCRED),  # body cut short
    (dict(cred_body=b""), AuthFailure, C.AUTH_BADCRED),
    (dict(verf_flavor=C.AUTH_SYS), AuthFailure, C.AUTH_BADVERF),
    (dict(verf_body=b"abcd"), AuthFailure, C.AUTH_BADVERF),
    (dict(verf_length=401, verf_body=bytes(404)), AuthFailure, C.AUTH_BADVERF),
    (dict(verf_length=0xFFFFFFFF), AuthFailure, C.AUTH_BADVERF),
    (dict(verf_length=8), GarbageCall, None),  # runs past the record
])
def test_call_error_paths(kwargs, error, detail):
    with pytest.raises(error) as info:
        parse_call(call_bytes(**kwargs))
    exc = info.value
    assert type(exc) is error and exc.xid == 9
    if error is NotACall:
        return
    reply = parse_reply(exc.reply())
    assert reply.xid == 9
    if error is RpcMismatch:
        assert (reply.accepted, reply.stat, reply.mismatch) == (False, C.RPC_MISMATCH, (2, 2))
    elif error is AuthFailure:
        assert exc.auth_stat == detail
        assert (reply.accepted, reply.stat, reply.auth_stat) == (False, C.AUTH_ERROR, detail)
        assert exc.reason == {C.AUTH_BADCRED: "auth_badcred", C.AUTH_BADVERF: "auth_badverf"}[detail]
    else:
        assert (reply.accepted, reply.stat) == (True, C.GARBAGE_ARGS)


def test_auth_sys_at_its_bounds_is_accepted():
    cred = AuthSys(stamp=2**32 - 1, machine="m" * 255, uid=2**32 - 1, gid=1, gids=tuple(range(16)))
    assert len(cred.pack()) <= C.MAX_AUTH_BYTES
    assert parse_call(call_header(1, 2, 3, 4, cred)).cred == cred


def test_auth_sys_machine_name_that_is_not_utf8_does_not_raise():
    call = parse_call(call_bytes(cred_body=sys_body(machine=b"n\xffde")))
    assert call.cred.machine == "n\\xffde"


def test_auth_sys_pack_refuses_what_the_rfc_does_not_allow():
    with pytest.raises(ValueError):
        AuthSys(1, "m" * 256, 0, 0).pack()
    with pytest.raises(ValueError):
        AuthSys(1, "m", 0, 0, tuple(range(17))).pack()


# --------------------------------------------------------------------------- replies


def test_reply_builders_exact_bytes():
    assert accepted(5) == u32(5, C.REPLY, C.MSG_ACCEPTED, C.AUTH_NONE, 0, C.SUCCESS)
    assert accepted(5, C.PROC_UNAVAIL) == u32(5, 1, 0, 0, 0, 3)
    assert prog_mismatch(5, 3, 3) == u32(5, 1, 0, 0, 0, 2, 3, 3)
    assert denied_rpc_mismatch(5) == u32(5, 1, 1, 0, 2, 2)
    assert denied_auth(5, C.AUTH_TOOWEAK) == u32(5, 1, 1, 1, 5)


def test_replies_parse_back():
    r = parse_reply(accepted(1) + b"RESULTS!")
    assert (r.xid, r.accepted, r.stat, bytes(r.results)) == (1, True, 0, b"RESULTS!")
    r = parse_reply(prog_mismatch(2, 1, 3))
    assert (r.stat, r.mismatch) == (C.PROG_MISMATCH, (1, 3))
    r = parse_reply(accepted(3, C.PROG_UNAVAIL))
    assert (r.accepted, r.stat, bytes(r.results)) == (True, C.PROG_UNAVAIL, b"")
    r = parse_reply(denied_auth(4, C.AUTH_BADCRED))
    assert (r.accepted, r.stat, r.auth_stat) == (False, C.AUTH_ERROR, C.AUTH_BADCRED)


@pytest.mark.parametrize("data", [
    b"", u32(1), u32(1, C.CALL, 2), u32(1, C.REPLY, 2, 0), accepted(1)[:-1],
    prog_mismatch(1, 1, 3)[:-4], denied_rpc_mismatch(1)[:-4], u32(1, C.REPLY, 1, 7),
    u32(1, C.REPLY, 0, 0, 0xFFFFFFFF),
])
def test_parse_reply_refuses_malformed_replies(data):
    with pytest.raises(BadReply):
        parse_reply(data)


# --------------------------------------------------------------------------- properties

DOCUMENTED = (NotACall, CallRejected)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=200))
def test_parse_call_on_arbitrary_bytes_raises_only_documented_errors(data):
    try:
        call = parse_call(data)
    except DOCUMENTED as exc:
        if isinstance(exc, CallRejected):
            parse_reply(exc.reply())
        return
    assert len(call.args) <= len(data)


auth_sys = st.builds(
    AuthSys,
    stamp=st.integers(0, 2**32 - 1),
    machine=st.text(max_size=60),
    uid=st.integers(0, 2**32 - 1),
    gid=st.integers(0, 2**32 - 1),
    gids=st.lists(st.integers(0, 2**32 - 1), max_size=16).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(xid=st.integers(0, 2**32 - 1), prog=st.integers(0, 2**32 - 1),
       vers=st.integers(0, 2**32 - 1), proc=st.integers(0, 2**32 - 1),
       cred=st.one_of(st.none(), auth_sys), args=st.binary(max_size=64),
       mutation=st.one_of(st.none(), st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                          st.integers(0, 10_000)))
def test_a_built_call_parses_back_and_a_damaged_one_fails_cleanly(xid, prog, vers, proc, cred,
                                                                  args, mutation):
    record = call_header(xid, prog, vers, proc, cred) + args
    call = parse_call(record)
    assert (call.xid, call.prog, call.vers, call.proc, call.cred) == (xid, prog, vers, proc, cred)
    assert bytes(call.args) == args
    # Damage it: flip one byte, or cut it short; only documented errors may come out.
    if mutation is None:
        return
    damaged = bytearray(record)
    if isinstance(mutation, tuple):
        damaged[mutation[0] % len(damaged)] = mutation[1]
    else:
        del damaged[mutation % len(damaged):]
    try:
        parse_call(damaged)
    except DOCUMENTED:
        pass


# --------------------------------------------------------------------------- a real client

LIBNFS = "libnfs.so.13"

# Mount with libnfs (Debian's libnfs13, the library behind nfs-ls/nfs-cat/nfs-cp) through
# ctypes, in a child process so that a hang or crash in it cannot take the test run along.
LIBNFS_MOUNT = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.nfs_init_context.restype = ctypes.c_void_p
lib.nfs_parse_url_full.restype = ctypes.c_void_p
lib.nfs_parse_url_full.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
lib.nfs_set_timeout.argtypes = [ctypes.c_void_p, ctypes.c_int]
lib.nfs_mount.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
nfs = lib.nfs_init_context()
# The URL's arguments set the ports and the AUTH_SYS ids on the context.
if not lib.nfs_parse_url_full(nfs, sys.argv[2].encode()):
    sys.exit("bad url")
lib.nfs_set_timeout(nfs, 5000)
sys.exit(0 if lib.nfs_mount(nfs, b"127.0.0.1", b"/swap") == 0 else 3)
"""


def libnfs_available() -> bool:
    try:
        ctypes.CDLL(LIBNFS)
    except OSError:
        return False
    return True


def receive_record(sock: socket.socket, max_record: int) -> bytearray:
    """Receive one record as the transport will: fragment headers through a RecordAssembler,
    bodies straight into the record buffer."""
    assembler, record = RecordAssembler(max_record), bytearray(max_record)
    while True:
        header = sock.recv(4, socket.MSG_WAITALL)
        assert len(header) == 4, "client closed"
        length = assembler.begin_fragment(header)
        view = memoryview(record)[assembler.received:assembler.received + length]
        while view:
            count = sock.recv_into(view)
            assert count, "client closed"
            view = view[count:]
        done = assembler.end_fragment()
        if done is not None:
            return record[:done]


@pytest.mark.skipif(not libnfs_available(), reason="libnfs (libnfs13) is not installed")
def test_calls_from_libnfs_parse_and_it_accepts_our_reply():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(10)
    url = f"nfs://127.0.0.1/swap/node01?version=3&nfsport={port}&mountport={port}&uid=1234&gid=567"
    client = subprocess.Popen([sys.executable, "-c", LIBNFS_MOUNT, LIBNFS, url])
    calls = []
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            # libnfs opens with MOUNT NULL; answering it lets it go on to MNT, which it only
            # does if it took our reply for a valid one.
            null = parse_call(memoryview(receive_record(conn, 4096)))
            calls.append(null)
            reply = accepted(null.xid)
            conn.sendall(fragment_header(len(reply)) + reply)
            calls.append(parse_call(memoryview(receive_record(conn, 4096))))
    finally:
        listener.close()
        try:
            client.wait(timeout=20)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    null, mnt = calls
    assert (null.prog, null.vers, null.proc, bytes(null.args)) == (C.PROG_MOUNT, 3, 0, b"")
    assert (mnt.prog, mnt.vers, mnt.proc) == (C.PROG_MOUNT, 3, 1)
    assert mnt.xid != null.xid
    for call in calls:
        assert call.cred.uid == 1234 and call.cred.gid == 567
        assert call.cred.machine  # libnfs names itself
    u = Unpacker(mnt.args)
    assert u.string(1024) == b"/swap"  # MNT dirpath: the URL is split at its last '/'
    u.done()


FUZZ_RPC = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_rpc.py"


def test_fuzz_target_runs_clean_for_a_while(tmp_path):
    """A short run of tests/fuzz/fuzz_rpc.py (the long runs are by hand)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sys.path.insert(0, str(FUZZ_RPC.parent))
    try:
        import fuzz_rpc
    finally:
        sys.path.pop(0)
    (corpus / "seed").write_bytes(fuzz_rpc.SEED)
    result = subprocess.run(
        [sys.executable, str(FUZZ_RPC), "-runs=100000", "-max_len=2048", str(corpus)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 100000 runs" in result.stderr, result.stderr[-2000:]
