"""cffi builder (API mode) for netswap._pool, the C request-memory pool.

setup.py names it in cffi_modules, so `pip install .` and `pip install -e .`
compile cext/pool.c into the package.
"""

import re
from pathlib import Path

from cffi import FFI

# Absolute, because setup.py runs this file with a relative __file__ and
# setuptools compiles from wherever pip put the build.
CEXT_DIR = Path(__file__).resolve().parent

ffibuilder = FFI()

def cdef_from_header(header: str) -> str:
    """A header as cffi's cdef parser accepts it: no comments, include guard or #include,
    only the integer #defines, and not its C-only part (between "#ifndef NETSWAP_CDEF" and
    "#endif /* NETSWAP_CDEF */": helpers of the C loops, declarations with system types).
    Taking the declarations from the header itself keeps one copy of the API; API mode
    still compiles them against the real header."""
    text = re.sub(r"^#ifndef NETSWAP_CDEF\b.*?^#endif /\* NETSWAP_CDEF \*/", "", header,
                  flags=re.S | re.M)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    kept = [
        line for line in text.splitlines()
        if not line.lstrip().startswith("#") or re.fullmatch(r"\s*#define\s+\w+\s+\d+\s*", line)
    ]
    return "\n".join(kept)


# The pool, the send gate, and the NBD and NFS request loops that take the pool's buffers
# (one module: the loops call pool_alloc and pool_free directly, without crossing back into
# Python). Headers in the order their declarations build on each other.
HEADERS = ("pool.h", "sendgate.h", "commit.h", "fastloop.h", "placement.h", "nbdfast.h",
           "nfsfast.h")
SOURCES = ("pool.c", "sendgate.c", "commit.c", "placement.c", "nbdfast.c", "nfsfast.c")
for header in HEADERS:
    ffibuilder.cdef(cdef_from_header((CEXT_DIR / header).read_text()))

ffibuilder.set_source(
    "netswap._pool",
    "".join(f'#include "{header}"\n' for header in HEADERS),
    sources=[str(CEXT_DIR / source) for source in SOURCES],
    include_dirs=[str(CEXT_DIR)],
    depends=[str(CEXT_DIR / header) for header in HEADERS],
    extra_compile_args=["-O2", "-std=gnu11"],
    libraries=["pthread"],
)
