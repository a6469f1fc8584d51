"""cffi builder (API mode) for netswap._pool, the C request-memory pool.

setup.py names it in cffi_modules, so `pip install .` and `pip install -e .`
compile cext/pool.c into the package.
"""

from pathlib import Path

from cffi import FFI

# Absolute, because setup.py runs this file with a relative __file__ and
# setuptools compiles from wherever pip put the build.
CEXT_DIR = Path(__file__).resolve().parent

ffibuilder = FFI()

# Mirrors pool.h.  API mode compiles these declarations against the real
# header, so a mismatch is a build error, not a silent ABI bug.
ffibuilder.cdef(
    """
    #define POOL_BLOCK_SIZE 4096
    #define POOL_EMERGENCY 1

    enum pool_lock_mode {
        POOL_LOCK_OFF = 0,
        POOL_LOCK_BEST_EFFORT = 1,
        POOL_LOCK_REQUIRED = 2,
    };

    struct pool_stats {
        uint64_t in_use_bytes;
        uint64_t free_bytes;
        uint64_t allocs;
        uint64_t frees;
        uint64_t failures;
        uint64_t waits;
        uint64_t high_water_bytes;
    };

    struct pool;

    struct pool *pool_create(size_t size, int lock_mode, int *lock_errno);
    int pool_close(struct pool *pool);
    void pool_destroy(struct pool *pool);
    int64_t pool_alloc(struct pool *pool, size_t size, unsigned flags, int64_t timeout_ns);
    int pool_free(struct pool *pool, int64_t offset);
    void pool_get_stats(struct pool *pool, struct pool_stats *out);
    void *pool_base(const struct pool *pool);
    size_t pool_size(const struct pool *pool);
    size_t pool_max_alloc(const struct pool *pool);
    size_t pool_locked_bytes(struct pool *pool);
    """
)

ffibuilder.set_source(
    "netswap._pool",
    '#include "pool.h"',
    sources=[str(CEXT_DIR / "pool.c")],
    include_dirs=[str(CEXT_DIR)],
    depends=[str(CEXT_DIR / "pool.h")],
    extra_compile_args=["-O2", "-std=gnu11"],
    libraries=["pthread"],
)
