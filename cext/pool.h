/*
 * netswap request-memory pool: one mlocked, prefaulted anonymous arena carved
 * by a binary buddy allocator.
 *
 * Every payload byte the daemon handles lives in this arena, so that serving
 * swap never needs the heap (and therefore never page-faults or enters
 * reclaim) once the pool is up.  Allocations are identified by their byte
 * offset in the arena; the Python side maps an offset to a memoryview slice.
 *
 * The arena is faulted in by prefault threads, in 2 MiB chunks (a transparent
 * huge page each where the system allows), and a chunk joins the allocator
 * only once it is faulted in and locked: no block is ever handed out that a
 * first access would fault.  pool_create waits for them, or with `background`
 * returns at once, the pool then growing from 0 to its size as they go.
 *
 * All functions are thread-safe.  They are called with the GIL released, so
 * the pool's own mutex is what serialises Python threads here.
 *
 * The reserve (the kernel's pages_emergency and reservation groups, mirrored):
 * the pool keeps a *watermark*, the sum of the reservations of its connected
 * groups.  Normal allocations never take free_bytes below it; the bytes under
 * it are the reserve, which only emergency allocations (POOL_EMERGENCY, with
 * a connected group) may use, and each only up to its group's reservation.
 * A group's *usage* (reserve bytes it holds) is charged before the reserve is
 * used and uncharged when the block is freed, under the pool mutex.
 * Connecting a group raises the watermark by its reservation at once, but
 * normal blocks may still hold the bytes it adds: they join the reserve as
 * those blocks are freed, since no normal allocation may take them again.
 * Until then the connected groups share a reserve short of the watermark
 * (each still bounded by its own reservation).
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
#define POOL_EMERGENCY 1 /* may fall back to the group's reservation below the watermark */

/* Size of the group table.  A swap node takes two groups (request buffers
 * and receive windows), so this covers [swap] max_nodes = 4096 plus the
 * daemon's own groups.  The table lives in the locked control mapping
 * (64 bytes a group, 1 MiB in all). */
#define POOL_MAX_GROUPS 16384

/* Most prefault threads a pool starts. */
#define POOL_MAX_PREFAULT_THREADS 64

enum pool_lock_mode {
    POOL_LOCK_OFF = 0,         /* never mlock (tests, unprivileged runs) */
    POOL_LOCK_BEST_EFFORT = 1, /* try; an unlocked pool is still usable */
    POOL_LOCK_REQUIRED = 2,    /* an unlocked pool is an error */
};

/* A consistent snapshot of the pool's counters (see pool_get_stats). */
struct pool_stats {
    uint64_t in_use_bytes;     /* bytes in allocated blocks (block-rounded) */
    uint64_t free_bytes;       /* arena size - in_use_bytes, exactly */
    uint64_t allocs;           /* successful pool_alloc calls, emergency ones included */
    uint64_t frees;            /* successful pool_free calls */
    /* failures and waits count the calls the pool limited (the watermark, or
     * no block of the size free); those its group's reservation limited are
     * counted in that group's charge_failures and charge_waits instead. */
    uint64_t failures;         /* pool_alloc calls that found no room in time */
    uint64_t waits;            /* pool_alloc calls that had to wait */
    uint64_t high_water_bytes; /* largest in_use_bytes ever seen */
    uint64_t watermark;        /* sum of the connected groups' reservations */
    uint64_t min_normal;       /* bytes above the watermark no connect may take */
    uint64_t emergency_allocs; /* allocations served from the reserve */
    uint64_t emergency_in_use_bytes; /* bytes in reserve blocks now (sum of usages) */
};

/* One group's counters (see pool_group_stats). */
struct pool_group_stats {
    uint64_t reservation;      /* bytes this group may hold below the watermark */
    uint64_t usage;            /* bytes it holds below the watermark now (block-rounded) */
    uint64_t high_water;       /* max usage ever */
    uint64_t emergency_allocs; /* allocations served from the reserve */
    uint64_t charge_failures;  /* charges refused: usage + block > reservation, no wait left */
    uint64_t charge_waits;     /* charges that had to wait for usage to drop */
    uint64_t connected;        /* 1 while its reservation is part of the watermark */
};

/* Where the prefault is (see pool_prefault_stats). */
struct pool_prefault_stats {
    uint64_t faulted_bytes; /* of the arena faulted in (and locked) and given to the allocator */
    uint64_t running;       /* prefault threads still going; 0 once it ended */
    int64_t elapsed_ns;     /* since the prefault started, until it ended */
};

struct pool;

/*
 * Map an arena of `size` bytes (rounded up to POOL_BLOCK_SIZE) and lock it
 * per `lock_mode`, together with the allocator's own metadata (about 0.3% of
 * `size`, plus the group table, faulted in at once).  The lock is checked
 * against RLIMIT_MEMLOCK for the whole arena here; its pages are locked as
 * they are faulted in.  Then `prefault_threads` threads (at least 1, at most
 * POOL_MAX_PREFAULT_THREADS) fault the arena in, a write to every page (so,
 * as any first write, memory short enough fails with the OOM killer, not an
 * error); without `background` pool_create waits for them.  With
 * `background` it returns at once: until the arena is faulted in, the
 * pool behaves as if it were as large as what is faulted in so far (an
 * allocation waits or fails, a connect says EAGAIN); see pool_prefault_wait.
 * On success returns the pool; *lock_errno is 0 if the arena is locked or
 * locking was off, else the mlock errno (best-effort mode).  On failure
 * returns NULL with errno set; if the failure was the mlock required by
 * POOL_LOCK_REQUIRED, *lock_errno holds that errno too.
 */
struct pool *pool_create(size_t size, int lock_mode, unsigned prefault_threads, int background,
                         int *lock_errno);

/*
 * Wait until at least `bytes` of the arena (capped at its size) are faulted
 * in.  Returns 0, or -1 with errno ETIMEDOUT (timeout_ns as for pool_alloc)
 * or ESHUTDOWN (closed).
 */
int pool_prefault_wait(struct pool *pool, uint64_t bytes, int64_t timeout_ns);

/* Wait for the prefault to end and join its threads.  Returns 0 if the whole
 * arena is faulted in, else -1 with errno ESHUTDOWN (closed first). */
int pool_prefault_join(struct pool *pool);

void pool_prefault_stats(struct pool *pool, struct pool_prefault_stats *out);

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
 *   EINVAL     size is 0 or larger than pool_max_alloc, unknown flags, or
 *              POOL_EMERGENCY with a `group` that is neither -1 nor a live
 *              group's id
 *   ENOMEM     nothing fits and timeout_ns == 0
 *   ETIMEDOUT  nothing fitted within timeout_ns
 *   ESHUTDOWN  the pool is closed
 * A block is taken normally if free_bytes stays at or above the watermark.
 * Otherwise, with POOL_EMERGENCY and a connected `group`, it is taken from the
 * reserve if the group's usage + block stays within its reservation; the
 * group is charged and the block remembers it, so pool_free uncharges it.
 * `group` is ignored without POOL_EMERGENCY; -1 means none (normal only).
 * On success *emergency (if not NULL) is set to 1 for a reserve block, else 0.
 * timeout_ns: 0 = fail at once, > 0 = wait up to that long for a free,
 * < 0 = wait as long as it takes (the __GFP_WAIT analog).
 */
int64_t pool_alloc(struct pool *pool, size_t size, unsigned flags, int group,
                   int64_t timeout_ns, int *emergency);

/* Return the block at `offset` (as returned by pool_alloc), uncharging its
 * group if it came from the reserve.  Returns 0, or -1 with errno EINVAL if
 * `offset` is not the start of an allocated block. */
int pool_free(struct pool *pool, int64_t offset);

/*
 * The normal budget connects may never take: pool_group_connect refuses a
 * group once watermark + reservation > size - min_normal.  Returns 0, or -1
 * with errno EINVAL if bytes > size, ENOSPC if the current watermark is
 * already above size - bytes.
 */
int pool_set_min_normal(struct pool *pool, uint64_t bytes);

/* A new, disconnected group that may hold up to `reservation` bytes of the
 * reserve once connected.  Returns its id (>= 0), or -1 with errno ENOSPC
 * (POOL_MAX_GROUPS live already) or ESHUTDOWN.  Once the group is destroyed
 * its id is refused (EINVAL) by every call, even after the table slot it
 * named is reused. */
int pool_group_create(struct pool *pool, uint64_t reservation);

/* Add the group's reservation to the watermark.  Returns 0 (also if already
 * connected), or -1 with errno EINVAL (no such group), ESHUTDOWN, ENOSPC
 * if watermark + reservation > size - min_normal: the pool cannot cover it,
 * EAGAIN while the prefault has not got far enough to back it: neither the
 * free bytes faulted in cover watermark + reservation, nor min_normal +
 * watermark + reservation are faulted in (pool_group_wait_backed waits for
 * that). */
int pool_group_connect(struct pool *pool, int id);

/* Wait until pool_group_connect would not say EAGAIN for this group (it may
 * still say ENOSPC).  Returns 0, or -1 with errno EINVAL (no such group),
 * ESHUTDOWN or ETIMEDOUT (timeout_ns as for pool_alloc). */
int pool_group_wait_backed(struct pool *pool, int id, int64_t timeout_ns);

/* Take the reservation out of the watermark; its blocks in use stay charged
 * until freed, but it gets no new reserve blocks.  Returns 0 (also if not
 * connected), or -1 with errno EINVAL (no such group). */
int pool_group_disconnect(struct pool *pool, int id);

/* Free the group's slot.  Returns 0, or -1 with errno EINVAL (no such group)
 * or EBUSY (still connected, usage > 0, or a pool_alloc waiting on it). */
int pool_group_destroy(struct pool *pool, int id);

/* A consistent snapshot of one group's counters.  Returns 0, or -1 with errno
 * EINVAL (no such group). */
int pool_group_stats(struct pool *pool, int id, struct pool_group_stats *out);

void pool_get_stats(struct pool *pool, struct pool_stats *out);

/* The arena's address; NULL once closed. */
void *pool_base(const struct pool *pool);
size_t pool_size(const struct pool *pool);
size_t pool_max_alloc(const struct pool *pool);
/* Bytes of the arena locked in RAM: faulted in, if the arena is locked. */
size_t pool_locked_bytes(struct pool *pool);

#endif /* NETSWAP_POOL_H */
