"""Wire constants of ONC RPC v2 (RFC 5531 §9, Appendix A) and the program numbers netswapd
serves. Only numbers live here; what they mean to the server is decided in message.py."""

RPC_VERSION = 2

# msg_type
CALL = 0
REPLY = 1

# reply_stat
MSG_ACCEPTED = 0
MSG_DENIED = 1

# accept_stat
SUCCESS = 0
PROG_UNAVAIL = 1
PROG_MISMATCH = 2
PROC_UNAVAIL = 3
GARBAGE_ARGS = 4
SYSTEM_ERR = 5

# reject_stat
RPC_MISMATCH = 0
AUTH_ERROR = 1

# auth_stat
AUTH_OK = 0
AUTH_BADCRED = 1
AUTH_REJECTEDCRED = 2
AUTH_BADVERF = 3
AUTH_REJECTEDVERF = 4
AUTH_TOOWEAK = 5
AUTH_INVALIDRESP = 6
AUTH_FAILED = 7

# auth_flavor
AUTH_NONE = 0
AUTH_SYS = 1
AUTH_SHORT = 2
AUTH_DH = 3
RPCSEC_GSS = 6

MAX_AUTH_BYTES = 400          # opaque_auth body<400> (§8.2)
AUTH_SYS_MACHINENAME_MAX = 255  # authsys_parms.machinename<255> (App. A)
AUTH_SYS_GIDS_MAX = 16          # authsys_parms.gids<16> (App. A)

# Programs and the versions served (RFC 1833 portmapper, RFC 1813 NFSv3 and MOUNT v3).
PROG_PORTMAP = 100000
PROG_NFS = 100003
PROG_MOUNT = 100005
NFS_VERSION = 3
MOUNT_VERSION = 3

# Record marking (§11): the top bit of a fragment header marks the last fragment.
LAST_FRAGMENT = 0x8000_0000
FRAGMENT_LENGTH_MASK = 0x7FFF_FFFF

ACCEPT_STAT_NAMES = {
    SUCCESS: "success", PROG_UNAVAIL: "prog_unavail", PROG_MISMATCH: "prog_mismatch",
    PROC_UNAVAIL: "proc_unavail", GARBAGE_ARGS: "garbage_args", SYSTEM_ERR: "system_err",
}
AUTH_STAT_NAMES = {
    AUTH_OK: "ok", AUTH_BADCRED: "badcred", AUTH_REJECTEDCRED: "rejectedcred",
    AUTH_BADVERF: "badverf", AUTH_REJECTEDVERF: "rejectedverf", AUTH_TOOWEAK: "tooweak",
    AUTH_INVALIDRESP: "invalidresp", AUTH_FAILED: "failed",
}
