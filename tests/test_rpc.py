"""The sans-I/O ONC RPC and XDR layer (netswap.rpc): every error path of the decoders, round
trips through the encoders, and properties over arbitrary bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
