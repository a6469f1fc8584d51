/*
 * netswap request-memory pool: one mlocked, prefaulted anonymous arena carved
 * by a binary buddy allocator.
 *
 * Every payload byte the daemon handles lives in this arena, so that serving
 * swap never needs the heap (and therefore never page-faults or enters
 * reclaim) once the pool is up.  Allocations are identified by their byte
 * offset in the arena; the Python side maps an offset to a memoryview slice.
 *
 * All functions are thread-safe.  They are called with the GIL released, so
 * the pool's own mutex is what serialises Python threads here.
 */
#ifndef NETSWAP_POOL_H
#define NETSWAP_POOL_H

#include <stddef.h>
#include <stdint.h>

/* Smallest block handed out.  One page: the arena is mlocked page by page
 * and NBD requests are page multiples in practice. */
#define POOL_BLOCK_SHIFT 12
#define POOL_BLOCK_SIZE 4096

/* pool_alloc flags. */
#define POOL_EMERGENCY 1 /* caller serves swap and may use the reserve */

enum pool_lock_mode {
    POOL_LOCK_OFF = 0,         /* never mlock (tests, unprivileged runs) */
    POOL_LOCK_BEST_EFFORT = 1, /* try; an unlocked pool is still usable */
    POOL_LOCK_REQUIRED = 2,    /* an unlocked pool is an error */
};

/* A consistent snapshot of the pool's counters (see pool_get_stats). */
struct pool_stats {
    uint64_t in_use_bytes;     /* bytes in allocated blocks (block-rounded) */
    uint64_t free_bytes;       /* arena size - in_use_bytes, exactly */
    uint64_t allocs;           /* successful pool_alloc calls */
    uint64_t frees;            /* successful pool_free calls */
    uint64_t failures;         /* pool_alloc calls that found no room in time */
    uint64_t waits;            /* pool_alloc calls that had to wait */
    uint64_t high_water_bytes; /* largest in_use_bytes ever seen */
};

struct pool;

/*
 * Map an arena of `size` bytes (rounded up to POOL_BLOCK_SIZE), prefault it
 * and lock it per `lock_mode`, together with the allocator's own metadata
 * (about 0.3% of `size`).  On success returns the pool; *lock_errno is 0
 * if the arena is locked or locking was off, else the mlock errno (best-effort
 * mode).  On failure returns NULL with errno set; if the failure was the
 * mlock required by POOL_LOCK_REQUIRED, *lock_errno holds that errno too.
 */
struct pool *pool_create(size_t size, int lock_mode, int *lock_errno);

/*
 * Unmap the arena.  Refused with EBUSY while any block is allocated.  Threads
 * waiting in pool_alloc are woken and fail with ESHUTDOWN.  The pool struct
 * stays valid (later calls fail with ESHUTDOWN) until pool_destroy.
 */
int pool_close(struct pool *pool);

/* Close the pool if still open (regardless of blocks in use) and free it.
 * The caller guarantees no other thread is still using `pool`. */
void pool_destroy(struct pool *pool);

/*
 * Allocate the smallest block holding `size` bytes; return its offset in the
 * arena, or -1 with errno set:
 *   EINVAL     size is 0 or larger than pool_max_alloc, or unknown flags
 *   ENOMEM     nothing fits and timeout_ns == 0
 *   ETIMEDOUT  nothing fitted within timeout_ns
 *   ESHUTDOWN  the pool is closed
 * timeout_ns: 0 = fail at once, > 0 = wait up to that long for a free,
 * < 0 = wait as long as it takes.
 */
int64_t pool_alloc(struct pool *pool, size_t size, unsigned flags, int64_t timeout_ns);

/* Return the block at `offset` (as returned by pool_alloc).  Returns 0, or -1
 * with errno EINVAL if `offset` is not the start of an allocated block. */
int pool_free(struct pool *pool, int64_t offset);

void pool_get_stats(struct pool *pool, struct pool_stats *out);

/* The arena's address; NULL once closed. */
void *pool_base(const struct pool *pool);
size_t pool_size(const struct pool *pool);
size_t pool_max_alloc(const struct pool *pool);
size_t pool_locked_bytes(struct pool *pool);

#endif /* NETSWAP_POOL_H */
