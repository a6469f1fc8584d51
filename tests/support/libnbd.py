"""libnbd's Python binding, the real NBD client most tests use."""

import sys

# Debian's libnbd binding lives in the system Python's dist-packages; the test process (and
# only it) may import it from there. Appended, so it never shadows what pip installed.
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def import_libnbd():
    if DEBIAN_DIST_PACKAGES not in sys.path:
        sys.path.append(DEBIAN_DIST_PACKAGES)
    import nbd

    return nbd
