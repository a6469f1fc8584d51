"""The labels requests are counted and logged under, by NBD command number.

A leaf module: counters.py labels its per-request statistics with it, and nbd/ names
requests with it (nbd/constants.py takes it as COMMAND_NAMES), so the counters, which every
layer imports, import no front end.
"""

# The NBD command numbers of doc/proto.md (nbd/constants.py: CMD_*) -> label.
NBD_COMMAND_NAMES = {
    0: "read",
    1: "write",
    2: "disc",
    3: "flush",
    4: "trim",
    5: "cache",
    6: "write_zeroes",
    7: "block_status",
    8: "resize",
}
