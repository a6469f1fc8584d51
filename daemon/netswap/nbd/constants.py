"""Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).

Only numbers live here; what they mean to netswapd is decided in handshake.py and
transmission.py. All wire integers are big-endian.
"""

from ..oplabels import NBD_COMMAND_NAMES

# Handshake -----------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and option request magic
OPTION_REPLY_MAGIC = 0x0003E889045565A9

# Handshake flags (server -> client) and client flags (client -> server).
FLAG_FIXED_NEWSTYLE = 0x0001
FLAG_NO_ZEROES = 0x0002
CLIENT_FLAG_FIXED_NEWSTYLE = 0x0001
CLIENT_FLAG_NO_ZEROES = 0x0002

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

OPTION_NAMES = {
    OPT_EXPORT_NAME: "EXPORT_NAME",
    OPT_ABORT: "ABORT",
    OPT_LIST: "LIST",
    OPT_PEEK_EXPORT: "PEEK_EXPORT",
    OPT_STARTTLS: "STARTTLS",
    OPT_INFO: "INFO",
    OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# Option reply types; errors have bit 31 set.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# Information items of NBD_REP_INFO.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags (per export, sent with the export size).
TFLAG_HAS_FLAGS = 0x0001
TFLAG_READ_ONLY = 0x0002
TFLAG_SEND_FLUSH = 0x0004
TFLAG_SEND_FUA = 0x0008
TFLAG_ROTATIONAL = 0x0010
TFLAG_SEND_TRIM = 0x0020
TFLAG_SEND_WRITE_ZEROES = 0x0040
TFLAG_SEND_DF = 0x0080
TFLAG_CAN_MULTI_CONN = 0x0100
TFLAG_SEND_RESIZE = 0x0200
TFLAG_SEND_CACHE = 0x0400
TFLAG_SEND_FAST_ZERO = 0x0800

# Transmission --------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

REQUEST_HEADER_SIZE = 28
SIMPLE_REPLY_SIZE = 16
STRUCTURED_CHUNK_HEADER_SIZE = 20

# Commands.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

# Their labels in logs and metrics: one table, which the counters share (a leaf module).
COMMAND_NAMES = NBD_COMMAND_NAMES
assert COMMAND_NAMES[CMD_READ] == "read" and COMMAND_NAMES[CMD_RESIZE] == "resize"

# Command flags.
CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02
CMD_FLAG_DF = 0x04
CMD_FLAG_REQ_ONE = 0x08
CMD_FLAG_FAST_ZERO = 0x10

# Structured reply chunks.
REPLY_FLAG_DONE = 0x0001
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001

# Metadata contexts ("Metadata querying"). The one context the spec defines, and the status
# flags of its extents.
BASE_NAMESPACE = "base"
BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 0x1
STATE_ZERO = 0x2

# Error values allowed on the wire (they equal Linux errno values by design).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# Payloads up to 32 MiB must never be treated as a denial of service (proto.md,
# "Size constraints"), whatever maximum the server advertises.
DOS_SAFE_PAYLOAD = 1 << 25
