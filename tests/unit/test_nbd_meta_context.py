"""Metadata contexts in the sans-I/O handshake: LIST_META_CONTEXT, SET_META_CONTEXT, and what
GO makes of the selection (doc/proto.md, "Metadata querying")."""

import struct

import pytest

from netswap.errors import AccessDenied
from netswap.nbd import constants as C
from netswap.nbd.handshake import (
    ALLOCATION_CONTEXT_ID,
    MAX_QUERY_LENGTH,
    Ready,
    Reply,
    ServerHandshake,
    StartTls,
)
from support.handshake import EXPORTS, LIMITS, info_data, option, parse_replies

ALLOCATION = C.BASE_ALLOCATION.encode()


def make(tls="off", lookup=EXPORTS.get, structured=True):
    hs = ServerHandshake(lookup, lambda: [], LIMITS, tls=tls)
    hs.receive_data(struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE | C.CLIENT_FLAG_NO_ZEROES))
    if structured:
        assert parse_replies(send(hs, C.OPT_STRUCTURED_REPLY).data)[0][1] == C.REP_ACK
    return hs


def send(hs, opt, data=b""):
    hs.receive_data(option(opt, data))
    return hs.next_event()


def meta_data(name: bytes, *queries: bytes) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def contexts(event, opt):
    """The (id, name) of each META_CONTEXT reply; the last reply must be the ACK."""
    assert isinstance(event, Reply) and not event.refused, event
    replies = parse_replies(event.data)
    assert replies[-1] == (opt, C.REP_ACK, b"")
    assert all(echo == opt and rtype == C.REP_META_CONTEXT for echo, rtype, _ in replies[:-1])
    return [(struct.unpack_from(">I", payload)[0], payload[4:]) for _, _, payload in replies[:-1]]


def select(hs, name=b"disk", *queries):
    return contexts(send(hs, C.OPT_SET_META_CONTEXT, meta_data(name, *queries)),
                    C.OPT_SET_META_CONTEXT)


def go(hs, name=b"disk") -> Ready:
    event = send(hs, C.OPT_GO, info_data(name))
    assert isinstance(event, Ready)
    return event


# -- LIST_META_CONTEXT ----------------------------------------------------------------------


@pytest.mark.parametrize("queries, listed", [
    ((), [(0, ALLOCATION)]),  # no query: everything there is
    ((b"base:",), [(0, ALLOCATION)]),  # the namespace's wildcard
    ((b"base:allocation",), [(0, ALLOCATION)]),
    ((b"base:allocation", b"base:"), [(0, ALLOCATION)]),  # once, however often it matches
    ((b"base:nonesuch",), []),  # an unknown leaf is ignored
    ((b"qemu:dirty-bitmap:x", b"x-foo:bar"), []),  # unknown namespaces are ignored
    ((b"qemu:allocation-depth", b"base:allocation"), [(0, ALLOCATION)]),
    ((b"BASE:allocation",), []),  # names are exact
])
def test_list_finds_base_allocation(queries, listed):
    hs = make()
    event = send(hs, C.OPT_LIST_META_CONTEXT, meta_data(b"disk", *queries))
    # Listing ids are "reserved and SHOULD be set to zero".
    assert contexts(event, C.OPT_LIST_META_CONTEXT) == listed
    assert go(hs).allocation_context is None  # listing selects nothing


def test_list_on_a_read_only_export_too():
    assert contexts(send(make(), C.OPT_LIST_META_CONTEXT, meta_data(b"ro")),
                    C.OPT_LIST_META_CONTEXT) == [(0, ALLOCATION)]


# -- SET_META_CONTEXT and GO ------------------------------------------------------------------


def test_set_selects_base_allocation_and_go_on_the_same_export_carries_its_id():
    hs = make()
    assert select(hs, b"disk", b"base:allocation") == [(ALLOCATION_CONTEXT_ID, ALLOCATION)]
    # INFO in between changes nothing.
    assert isinstance(send(hs, C.OPT_INFO, info_data(b"disk")), Reply)
    event = go(hs)
    assert event.allocation_context == ALLOCATION_CONTEXT_ID and event.structured_replies


@pytest.mark.parametrize("queries", [(), (b"base:",), (b"base:nonesuch", b"x-a:b")])
def test_set_of_nothing_selects_nothing(queries):
    hs = make()
    assert select(hs, b"disk", *queries) == []
    assert go(hs).allocation_context is None


def test_go_on_another_export_than_set_named_has_no_context():
    hs = make()
    select(hs, b"ro", b"base:allocation")
    assert go(hs, b"disk").allocation_context is None


def test_the_last_set_counts_even_when_it_fails():
    hs = make()
    select(hs, b"disk", b"base:allocation")
    select(hs, b"disk")  # zero queries: none
    assert go(hs).allocation_context is None

    hs = make()
    select(hs, b"disk", b"base:allocation")
    event = send(hs, C.OPT_SET_META_CONTEXT, b"\x00")  # malformed: still replaces
    assert event.refused == "malformed_option"
    assert go(hs).allocation_context is None

    hs = make()
    select(hs, b"disk", b"base:allocation")
    event = send(hs, C.OPT_SET_META_CONTEXT, meta_data(b"nope", b"base:allocation"))
    assert event.refused == "unknown_export"
    assert go(hs).allocation_context is None

    hs = make()
    select(hs, b"ro", b"base:allocation")
    select(hs, b"disk", b"base:allocation")
    assert go(hs, b"disk").allocation_context == ALLOCATION_CONTEXT_ID


def test_starttls_forgets_the_selection():
    hs = make(tls="optional")
    select(hs, b"disk", b"base:allocation")
    assert isinstance(send(hs, C.OPT_STARTTLS), StartTls)
    hs.tls_established()
    # Structured replies are forgotten too, so a context cannot even be asked for now.
    event = send(hs, C.OPT_SET_META_CONTEXT, meta_data(b"disk", b"base:allocation"))
    assert event.refused == "needs_structured_replies"
    assert go(hs).allocation_context is None


def test_export_name_never_has_a_context():
    hs = make()
    select(hs, b"disk", b"base:allocation")
    event = send(hs, C.OPT_EXPORT_NAME, b"disk")
    assert isinstance(event, Ready) and event.allocation_context is None


@pytest.mark.parametrize("opt", [C.OPT_LIST_META_CONTEXT, C.OPT_SET_META_CONTEXT])
def test_meta_context_needs_structured_replies_first(opt):
    hs = make(structured=False)
    event = send(hs, opt, meta_data(b"disk", b"base:allocation"))
    [(echo, rtype, message)] = parse_replies(event.data)
    assert (echo, rtype) == (opt, C.REP_ERR_INVALID) and b"structured replies" in message
    assert event.refused == "needs_structured_replies"
    assert go(hs).allocation_context is None


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", [C.OPT_LIST_META_CONTEXT, C.OPT_SET_META_CONTEXT])
@pytest.mark.parametrize("data, why", [
    (b"", b"shorter than"),
    (b"\x00\x00\x00\x04disk\x00\x00\x00", b"exceeds the option data"),
    (struct.pack(">I", 100) + b"disk" + bytes(4), b"exceeds the option data"),
    (struct.pack(">I", 5000) + bytes(5004), b"exceeds 4096"),
    (struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0xFFFFFFFF), b"do not fit"),
    (meta_data(b"disk", b"base:allocation")[:-1], b"exceeds the option data"),
    (meta_data(b"disk", b"base:allocation") + b"\x00", b"follow the last query"),
    (struct.pack(">I", 4) + b"disk" + struct.pack(">II", 2, 3) + b"a:b", b"do not fit"),
    (meta_data(b"disk", b"allocation"), b"namespace and a colon"),
    (meta_data(b"disk", b":allocation"), b"namespace and a colon"),
    (meta_data(b"disk", b""), b"namespace and a colon"),
    (meta_data(b"disk", b"base:\xff"), b"not UTF-8"),
    (meta_data(b"disk", b"x:" + b"a" * (MAX_QUERY_LENGTH - 1)), b"exceeds 4096"),
])
def test_malformed_meta_context_is_err_invalid_and_haggling_continues(opt, data, why):
    hs = make()
    event = send(hs, opt, data)
    [(echo, rtype, message)] = parse_replies(event.data)
    assert (echo, rtype) == (opt, C.REP_ERR_INVALID) and why in message, message
    assert event.refused == "malformed_option"
    assert isinstance(go(hs), Ready)


def test_a_query_of_the_longest_allowed_length_is_fine():
    query = b"x:" + b"a" * (MAX_QUERY_LENGTH - 2)
    assert select(make(), b"disk", query) == []


@pytest.mark.parametrize("opt", [C.OPT_LIST_META_CONTEXT, C.OPT_SET_META_CONTEXT])
def test_unknown_or_forbidden_export(opt):
    event = send(make(), opt, meta_data(b"nope", b"base:allocation"))
    [(_, rtype, message)] = parse_replies(event.data)
    assert rtype == C.REP_ERR_UNKNOWN and b"nope" in message

    def lookup(name):
        raise AccessDenied(f"export {name!r} is not yours", "not_bound")

    event = send(make(lookup=lookup), opt, meta_data(b"swap/b", b"base:allocation"))
    [(_, rtype, message)] = parse_replies(event.data)
    assert rtype == C.REP_ERR_POLICY and b"not yours" in message
    assert event.refused == "access_denied"


def test_many_queries_cost_work_linear_in_the_option():
    # Thousands of queries (the option's limit is 64 KiB): one pass, one reply.
    queries = [b"a:b"] * 5000 + [b"base:allocation"]
    assert select(make(), b"disk", *queries) == [(ALLOCATION_CONTEXT_ID, ALLOCATION)]
