/*
 * netswap request-memory pool: see pool.h for the contract.
 *
 * Allocator: binary buddy over POOL_BLOCK_SIZE min blocks.  A block of order k
 * spans 2^k min blocks and starts at a min-block index that is a multiple of
 * 2^k; its buddy is at index ^ 2^k.  Free blocks sit on one doubly linked list
 * per order.  The list nodes live in `meta`, an array with one entry per min
 * block, never inside the arena: payload memory may be wiped, handed to the
 * kernel with recv/pwritev, or read by a client, and the allocator must not
 * depend on it.  `meta` and struct pool share their own mapping, prefaulted
 * and locked like the arena, since every alloc and free touches them.
 *
 * Every operation walks at most one level per order, and the number of
 * orders is fixed when the pool is created (log2 of the arena's min blocks,
 * at most POOL_MAX_ORDERS), so alloc and free are O(1) in the number of
 * blocks in use.  The smallest non-empty order is found with a bit scan.
 *
 * Prefault: the arena is mapped and locked (on fault) at once, but faulted in
 * by prefault threads, 2 MiB chunk by chunk, outside the mutex; a chunk is
 * given to the allocator (merged into the free lists like a freed block) only
 * once its pages are faulted in and locked.  Every block ever handed out is
 * therefore already backed, whether the prefault has finished or not: an
 * allocation that needs more than what is faulted so far waits for it (or
 * fails, without a timeout), as it would wait for a free.  The pool behaves
 * as a pool of faulted_bytes growing to its size; connecting a group says
 * EAGAIN until its reservation is backed: until the free memory faulted in
 * covers the new watermark, or min_normal + the new watermark are faulted in
 * (the check a pool of that size would make).
 *
 * Reserve: the watermark and the group table sit beside the free lists under
 * the one mutex, so the decision "may this allocation go below the
 * watermark, and may its group be charged" and the block it grants are one
 * atomic step (the seed's spin lock around usage).  A reserve block records
 * its group in its head's metadata, which is how pool_free knows whom to
 * uncharge without the caller having to say.  Group operations scan the
 * table; they run on attach and detach, never per request.
 */
#define _GNU_SOURCE
#include "pool.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <time.h>

#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1 /* Linux 4.4 */
#endif

/* A transparent huge page (x86-64, and arm64 with 4 KiB pages).  The arena is
 * aligned to it and prefaulted in chunks of it, so that with MADV_HUGEPAGE a
 * chunk is one fault (and one page to zero) instead of 512. */
#define HUGE_PAGE_SIZE ((size_t)2 << 20)
#define PREFAULT_CHUNK HUGE_PAGE_SIZE
/* Enough for populate() and give_range(); the default (8 MiB) would be
 * address space for nothing. */
#define PREFAULT_STACK_SIZE ((size_t)64 << 10)

/* 2^31 min blocks (8 TiB) keeps block indices, and index + 2^order, inside
 * uint32_t and the set of non-empty orders inside one uint32_t. */
#define POOL_MAX_ORDERS 32
#define POOL_MAX_BLOCKS (UINT32_C(1) << (POOL_MAX_ORDERS - 1))
#define NO_BLOCK UINT32_MAX
/* block_meta.group of a block that is not charged to a group. */
#define NO_GROUP UINT16_MAX

/* A group id is its slot in the table plus the slot's generation, bumped on
 * every destroy: a destroyed group's id is then refused rather than taken
 * for whichever group got the slot next, which it would silently charge.
 * 17 generation bits keep ids positive ints and make a stale id collide only
 * after 2^17 groups have lived in its slot. */
#define GROUP_SLOT_BITS 14
#define GROUP_SLOT_MASK ((1u << GROUP_SLOT_BITS) - 1)
#define GROUP_GENERATION_MASK ((1u << (31 - GROUP_SLOT_BITS)) - 1)

_Static_assert(POOL_MAX_GROUPS == 1 << GROUP_SLOT_BITS, "a slot number fills the id's low bits");
_Static_assert(POOL_MAX_GROUPS <= NO_GROUP, "slot numbers must fit block_meta.group");

enum block_state {
    BLOCK_INTERIOR = 0, /* not the first min block of any block */
    BLOCK_FREE,
    BLOCK_ALLOCATED,
};

/* Per min block.  Only the entry at the head (first min block) of a free or
 * allocated block is meaningful; the rest are BLOCK_INTERIOR. */
struct block_meta {
    uint32_t next, prev; /* free-list links, while BLOCK_FREE */
    uint8_t order;
    uint8_t state;
    uint16_t group; /* while BLOCK_ALLOCATED: the slot of the group a reserve
                     * block is charged to, NO_GROUP for a normal block */
};

struct pool_group {
    struct pool_group_stats stats;
    /* Threads in pool_alloc waiting with this group: destroy must not free
     * a slot one of them will charge when it wakes. */
    uint32_t waiters;
    uint32_t generation; /* of the group in this slot now, or of the last one */
    bool live;           /* created and not yet destroyed */
};

struct pool {
    /* Guards everything below that changes after pool_create.  One lock for
     * the free lists and the counters, so that a decision on free_bytes (the
     * coming watermark) and the block it grants are one atomic step. */
    pthread_mutex_t mutex;
    pthread_cond_t freed; /* broadcast on free while waiters > 0 */
    unsigned waiters;
    bool closed;

    size_t control_size; /* this struct and meta: one mapping */
    unsigned char *base;
    size_t size;
    size_t locked_bytes; /* size when the arena and this mapping are locked */
    uint32_t nblocks;
    unsigned max_order;

    uint32_t free_head[POOL_MAX_ORDERS];
    uint32_t nonempty_orders; /* bit k set iff free_head[k] != NO_BLOCK */
    struct block_meta *meta;  /* nblocks entries, right after this struct */

    struct pool_stats stats; /* includes the watermark and min_normal */
    struct pool_group groups[POOL_MAX_GROUPS];

    /* The prefault (see the top of this file).  Blocks come only from the
     * faulted chunks, so in_use_bytes <= faulted_bytes always, and the bytes
     * an allocation may take are faulted_bytes - in_use_bytes. */
    uint64_t faulted_bytes;   /* given to the allocator so far */
    size_t next_chunk;        /* offset of the next chunk a prefault thread takes */
    unsigned prefault_running; /* prefault threads not yet finished */
    struct timespec prefault_started, prefault_finished;
    enum { NOT_JOINED, JOINING, JOINED } prefault_join;
    unsigned prefault_threads; /* started, to be joined once */
    pthread_t threads[POOL_MAX_PREFAULT_THREADS];
};

static size_t block_bytes(unsigned order)
{
    return (size_t)POOL_BLOCK_SIZE << order;
}

static void free_list_push(struct pool *pool, uint32_t idx, unsigned order)
{
    struct block_meta *m = &pool->meta[idx];
    uint32_t head = pool->free_head[order];

    m->state = BLOCK_FREE;
    m->order = (uint8_t)order;
    m->prev = NO_BLOCK;
    m->next = head;
    if (head != NO_BLOCK)
        pool->meta[head].prev = idx;
    pool->free_head[order] = idx;
    pool->nonempty_orders |= UINT32_C(1) << order;
}

static void free_list_unlink(struct pool *pool, uint32_t idx, unsigned order)
{
    struct block_meta *m = &pool->meta[idx];

    if (m->prev != NO_BLOCK)
        pool->meta[m->prev].next = m->next;
    else
        pool->free_head[order] = m->next;
    if (m->next != NO_BLOCK)
        pool->meta[m->next].prev = m->prev;
    if (pool->free_head[order] == NO_BLOCK)
        pool->nonempty_orders &= ~(UINT32_C(1) << order);
}

/* Take a block of exactly `order`, splitting the smallest larger free block
 * if need be.  Returns its head index or NO_BLOCK.  Caller holds the mutex. */
static uint32_t take_block(struct pool *pool, unsigned order)
{
    uint32_t candidates = pool->nonempty_orders >> order;
    unsigned k;
    uint32_t idx;

    if (candidates == 0)
        return NO_BLOCK;
    k = order + (unsigned)__builtin_ctz(candidates);
    idx = pool->free_head[k];
    free_list_unlink(pool, idx, k);
    /* Keep the lower half, free the upper half, until the size fits. */
    while (k > order) {
        k--;
        free_list_push(pool, idx + (UINT32_C(1) << k), k);
    }
    pool->meta[idx].state = BLOCK_ALLOCATED;
    pool->meta[idx].order = (uint8_t)order;
    return idx;
}

/* Return the allocated block at `idx`, merging it with free buddies.
 * Caller holds the mutex and has checked that `idx` is allocated. */
static void give_block(struct pool *pool, uint32_t idx)
{
    unsigned k = pool->meta[idx].order;

    pool->meta[idx].state = BLOCK_INTERIOR;
    for (;;) {
        uint32_t buddy = idx ^ (UINT32_C(1) << k);

        /* A buddy past the arena's end means this block is one of the
         * power-of-two chunks the arena was carved into: nothing to merge. */
        if ((uint64_t)buddy + (UINT64_C(1) << k) > pool->nblocks)
            break;
        if (pool->meta[buddy].state != BLOCK_FREE || pool->meta[buddy].order != k)
            break;
        free_list_unlink(pool, buddy, k);
        pool->meta[buddy].state = BLOCK_INTERIOR;
        if (buddy < idx)
            idx = buddy;
        k++;
    }
    free_list_push(pool, idx, k);
}

/* Smallest order whose block holds `size` bytes (size > 0). */
static unsigned order_for_size(size_t size)
{
    uint64_t blocks = ((uint64_t)size + POOL_BLOCK_SIZE - 1) >> POOL_BLOCK_SHIFT;

    return blocks == 1 ? 0 : 64 - (unsigned)__builtin_clzll(blocks - 1);
}

/* Empty free lists: the arena's blocks join them as the prefault faults them
 * in (give_range).  The largest block is the largest aligned power of two
 * that fits, as if the arena were carved at once. */
static void init_free_lists(struct pool *pool)
{
    for (unsigned k = 0; k < POOL_MAX_ORDERS; k++)
        pool->free_head[k] = NO_BLOCK;
    pool->max_order = 31 - (unsigned)__builtin_clz(pool->nblocks);
}

/* Give the faulted-in bytes [offset, offset + len) to the allocator, as the
 * largest aligned power-of-two blocks, each merged with its free buddies as a
 * freed block would be.  Once every chunk is given, whatever the order, the
 * free lists hold the arena carved into its largest aligned power-of-two
 * blocks: buddies merge only within [0, nblocks).  Caller holds the mutex. */
static void give_range(struct pool *pool, size_t offset, size_t len)
{
    uint32_t idx = (uint32_t)(offset >> POOL_BLOCK_SHIFT);
    uint32_t end = idx + (uint32_t)(len >> POOL_BLOCK_SHIFT);

    while (idx < end) {
        unsigned fits = 31 - (unsigned)__builtin_clz(end - idx);
        unsigned k = idx == 0 ? fits : (unsigned)__builtin_ctz(idx);

        if (k > fits)
            k = fits;
        pool->meta[idx].order = (uint8_t)k;
        give_block(pool, idx);
        idx += UINT32_C(1) << k;
    }
}

/* Fault in [addr, addr + len) writable: a write to every page, so that it
 * is backed by private pages (not the shared zero page), locked if its
 * mapping is.  Where a transparent huge page backs the range, the first write
 * faults in all 2 MiB and the other 511 are plain stores.
 *
 * Not MADV_POPULATE_WRITE (Linux 5.14), though it would report ENOMEM where
 * a write faults (or the OOM killer acts): it faults in under the mmap lock,
 * held for a whole range, and every mmap and munmap of the daemon starting up
 * meanwhile (thread stacks, malloc arenas, Python's) waits for it.  Measured
 * on 2 vCPUs faulting in 2 GiB in 2 MiB ranges: mmap + munmap in the other
 * thread took 3-18 ms on average (worst 50 ms) instead of 20-27 us, and with
 * huge pages the populate itself took 2.9-6.8 s instead of 0.2-0.5 s.  A
 * write fault takes only the lock of the arena's own VMA.  Nor MAP_POPULATE:
 * it holds the mmap lock too, does not report failure, and under the
 * daemon's mlockall(MCL_ONFAULT) does nothing at all. */
static void populate(unsigned char *addr, size_t len)
{
    for (size_t off = 0; off < len; off += POOL_BLOCK_SIZE)
        ((volatile unsigned char *)addr)[off] = 0;
}

/* Anonymous private memory, not inherited by children: a fork would
 * otherwise make every page copy-on-write, and the daemon's next write would
 * fault and allocate.  MADV_DONTFORK is hardening only, so a kernel refusing
 * it is not fatal.  With `align`, the mapping starts on a huge page boundary
 * (mapped larger, then trimmed), so that every prefault chunk can be one. */
static void *map_anonymous(size_t size, size_t align)
{
    unsigned char *base, *aligned;
    size_t slack = align > POOL_BLOCK_SIZE ? align : 0;

    base = mmap(NULL, size + slack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    aligned = base;
    if (slack != 0) {
        aligned = (unsigned char *)(((uintptr_t)base + align - 1) & ~(uintptr_t)(align - 1));
        if (aligned != base)
            munmap(base, (size_t)(aligned - base));
        if (aligned + size != base + size + slack)
            munmap(aligned + size, (size_t)(base + size + slack - (aligned + size)));
    }
    (void)madvise(aligned, size, MADV_DONTFORK);
    return aligned;
}

/* The control mapping is small (0.3 % of the arena) and every call touches
 * it: faulted in before pool_create returns. */
static void *map_prefaulted(size_t size)
{
    unsigned char *base = map_anonymous(size, 0);

    if (base != NULL)
        populate(base, size);
    return base;
}

/* Lock the control mapping and the arena together, or neither: the
 * allocator's own state must be as resident as the memory it hands out.  The
 * arena is locked on fault: the limit (RLIMIT_MEMLOCK, CAP_IPC_LOCK) is
 * checked for all of it now, and each page is locked as the prefault faults
 * it in, so that this call does not fault in gigabytes itself.  A kernel
 * without mlock2 (before 4.4) gets a plain mlock, which faults in everything
 * here.  Returns 0 or the mlock errno. */
static int lock_mappings(struct pool *pool)
{
    int err;

    if (mlock(pool, pool->control_size) != 0)
        return errno;
    err = mlock2(pool->base, pool->size, MLOCK_ONFAULT) == 0 ? 0 : errno;
    if (err == ENOSYS || err == EINVAL) /* no mlock2, or no MLOCK_ONFAULT */
        err = mlock(pool->base, pool->size) == 0 ? 0 : errno;
    if (err != 0) {
        munlock(pool, pool->control_size);
        return err;
    }
    pool->locked_bytes = pool->size;
    return 0;
}

static int init_sync(struct pool *pool)
{
    pthread_condattr_t condattr;
    int err;

    /* Timed waits measure a duration, so they must not jump with the wall
     * clock. */
    err = pthread_condattr_init(&condattr);
    if (err != 0)
        return err;
    err = pthread_condattr_setclock(&condattr, CLOCK_MONOTONIC);
    if (err == 0)
        err = pthread_cond_init(&pool->freed, &condattr);
    pthread_condattr_destroy(&condattr);
    if (err != 0)
        return err;
    err = pthread_mutex_init(&pool->mutex, NULL);
    if (err != 0)
        pthread_cond_destroy(&pool->freed);
    return err;
}

/* Anything that may let a waiting pool_alloc through (a free, a lower
 * watermark, a newly connected group, a chunk faulted in) and anything a
 * prefault waiter waits for wakes them all to retry. */
static void wake_waiters(struct pool *pool)
{
    if (pool->waiters != 0)
        pthread_cond_broadcast(&pool->freed);
}

/* Wait (mutex held) until wake_waiters, or `deadline` if timeout_ns > 0
 * (none otherwise).  Returns true if the deadline passed.  A group's waiters
 * keep pool_group_destroy from freeing its slot meanwhile. */
static bool await_wake(struct pool *pool, struct pool_group *g, int64_t timeout_ns,
                       const struct timespec *deadline)
{
    bool timed_out = false;

    pool->waiters++;
    if (g != NULL)
        g->waiters++;
    if (timeout_ns > 0)
        timed_out = pthread_cond_timedwait(&pool->freed, &pool->mutex, deadline) == ETIMEDOUT;
    else
        pthread_cond_wait(&pool->freed, &pool->mutex);
    pool->waiters--;
    if (g != NULL)
        g->waiters--;
    return timed_out;
}

/* One prefault thread: takes the next chunk, faults it in without the mutex,
 * gives it to the allocator, until the arena is done or the pool closes.  Never touches the arena after the pool is closed, so
 * pool_close may unmap it once the threads are joined. */
static void *prefault_thread(void *arg)
{
    struct pool *pool = arg;

    pthread_mutex_lock(&pool->mutex);
    while (!pool->closed && pool->next_chunk < pool->size) {
        size_t offset = pool->next_chunk;
        size_t len = pool->size - offset < PREFAULT_CHUNK ? pool->size - offset : PREFAULT_CHUNK;

        pool->next_chunk += len;
        pthread_mutex_unlock(&pool->mutex);
        populate(pool->base + offset, len);
        pthread_mutex_lock(&pool->mutex);
        if (pool->closed)
            break;
        give_range(pool, offset, len);
        pool->faulted_bytes += len;
        wake_waiters(pool);
    }
    if (--pool->prefault_running == 0) {
        clock_gettime(CLOCK_MONOTONIC, &pool->prefault_finished);
        wake_waiters(pool); /* a closed pool's waiters for bytes that will never come */
    }
    pthread_mutex_unlock(&pool->mutex);
    return NULL;
}

/* Start `threads` prefault threads (at least one must start).  They block
 * every signal: the daemon takes its signals with sigwait in one thread.
 * Returns 0 or an errno.  Called before the pool is shared. */
static int start_prefault(struct pool *pool, unsigned threads)
{
    pthread_attr_t attr;
    sigset_t all, old;
    int err;

    if (threads == 0)
        threads = 1;
    if (threads > POOL_MAX_PREFAULT_THREADS)
        threads = POOL_MAX_PREFAULT_THREADS;
    clock_gettime(CLOCK_MONOTONIC, &pool->prefault_started);
    err = pthread_attr_init(&attr);
    if (err != 0)
        return err;
    (void)pthread_attr_setstacksize(&attr, PREFAULT_STACK_SIZE);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pool->prefault_running = threads; /* before any thread may finish */
    for (unsigned i = 0; i < threads; i++) {
        err = pthread_create(&pool->threads[i], &attr, prefault_thread, pool);
        if (err != 0)
            break;
        pool->prefault_threads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    pthread_mutex_lock(&pool->mutex);
    pool->prefault_running -= threads - pool->prefault_threads;
    if (pool->prefault_running == 0) /* the threads that started are done already */
        clock_gettime(CLOCK_MONOTONIC, &pool->prefault_finished);
    pthread_mutex_unlock(&pool->mutex);
    /* Fewer threads only make the prefault slower. */
    return pool->prefault_threads != 0 ? 0 : err;
}

/* Wait for every prefault thread to end and join it; the first caller joins,
 * the others wait for it.  Returns 0 if the whole arena was faulted in, else
 * ESHUTDOWN (the pool closed first). */
static int join_prefault(struct pool *pool)
{
    int err;

    pthread_mutex_lock(&pool->mutex);
    while (pool->prefault_join == JOINING)
        await_wake(pool, NULL, -1, NULL);
    if (pool->prefault_join == NOT_JOINED) {
        pool->prefault_join = JOINING;
        pthread_mutex_unlock(&pool->mutex);
        for (unsigned i = 0; i < pool->prefault_threads; i++)
            pthread_join(pool->threads[i], NULL);
        pthread_mutex_lock(&pool->mutex);
        pool->prefault_join = JOINED;
        wake_waiters(pool);
    }
    err = pool->faulted_bytes == pool->size ? 0 : ESHUTDOWN;
    pthread_mutex_unlock(&pool->mutex);
    return err;
}

struct pool *pool_create(size_t size, int lock_mode, unsigned prefault_threads, int background,
                         int *lock_errno)
{
    struct pool *pool;
    uint32_t nblocks;
    size_t control_size;
    int err;

    *lock_errno = 0;
    if (size == 0 || size > (size_t)POOL_MAX_BLOCKS * POOL_BLOCK_SIZE ||
        lock_mode < POOL_LOCK_OFF || lock_mode > POOL_LOCK_REQUIRED) {
        errno = EINVAL;
        return NULL;
    }
    size = (size + POOL_BLOCK_SIZE - 1) & ~(size_t)(POOL_BLOCK_SIZE - 1);
    nblocks = (uint32_t)(size >> POOL_BLOCK_SHIFT);

    /* The struct (with the group table) and the block metadata share one
     * mapping, so they are prefaulted and locked like the arena (heap memory
     * would be neither). */
    control_size = sizeof(*pool) + (size_t)nblocks * sizeof(struct block_meta);
    pool = map_prefaulted(control_size);
    if (pool == NULL)
        return NULL;
    pool->control_size = control_size;
    pool->meta = (struct block_meta *)(pool + 1);
    pool->size = size;
    pool->nblocks = nblocks;

    pool->base = map_anonymous(size, size >= HUGE_PAGE_SIZE ? HUGE_PAGE_SIZE : 0);
    if (pool->base == NULL)
        goto fail_unmap_control;
    /* The arena holds the nodes' swapped-out memory: keep it out of core
     * dumps.  Hardening only, like MADV_DONTFORK.  Transparent huge pages
     * where the system allows them (enabled = madvise or always): a 2 MiB
     * chunk is then one fault to prefault, and data path accesses miss the
     * TLB less.  Also only advice: without them the arena is 4 KiB pages,
     * prefaulted the same way. */
    (void)madvise(pool->base, size, MADV_DONTDUMP);
    (void)madvise(pool->base, size, MADV_HUGEPAGE);

    if (lock_mode != POOL_LOCK_OFF) {
        *lock_errno = lock_mappings(pool);
        if (*lock_errno != 0 && lock_mode == POOL_LOCK_REQUIRED) {
            errno = *lock_errno;
            goto fail_unmap_arena;
        }
    }
    err = init_sync(pool);
    if (err != 0) {
        errno = err;
        goto fail_unmap_arena;
    }
    init_free_lists(pool);
    pool->stats.free_bytes = size;

    err = start_prefault(pool, prefault_threads);
    if (err == 0 && !background)
        err = join_prefault(pool);
    if (err != 0) {
        pool_destroy(pool); /* joins what started */
        errno = err;
        return NULL;
    }
    return pool;

fail_unmap_arena:
    err = errno;
    munmap(pool->base, size);
    errno = err;
fail_unmap_control:
    err = errno;
    munmap(pool, control_size);
    errno = err;
    return NULL;
}

int pool_close(struct pool *pool)
{
    pthread_mutex_lock(&pool->mutex);
    if (pool->closed) {
        pthread_mutex_unlock(&pool->mutex);
        return 0;
    }
    if (pool->stats.in_use_bytes != 0) {
        pthread_mutex_unlock(&pool->mutex);
        errno = EBUSY;
        return -1;
    }
    pool->closed = true;
    /* Waiters fail with ESHUTDOWN; prefault threads stop after their chunk. */
    pthread_cond_broadcast(&pool->freed);
    pthread_mutex_unlock(&pool->mutex);
    join_prefault(pool);
    pthread_mutex_lock(&pool->mutex);
    munmap(pool->base, pool->size);
    /* The mutex and counters stay (pool_destroy frees them); pinning them
     * no longer serves a data path. */
    munlock(pool, pool->control_size);
    pool->base = NULL;
    pool->locked_bytes = 0;
    pthread_mutex_unlock(&pool->mutex);
    return 0;
}

void pool_destroy(struct pool *pool)
{
    bool closed;

    pthread_mutex_lock(&pool->mutex);
    closed = pool->closed;
    pool->closed = true; /* stops the prefault threads */
    pthread_mutex_unlock(&pool->mutex);
    join_prefault(pool);
    if (!closed)
        munmap(pool->base, pool->size);
    pthread_cond_destroy(&pool->freed);
    pthread_mutex_destroy(&pool->mutex);
    munmap(pool, pool->control_size);
}

/* Absolute CLOCK_MONOTONIC time `timeout_ns` from now, saturating. */
static struct timespec deadline_after(int64_t timeout_ns)
{
    struct timespec now;
    int64_t sec = timeout_ns / 1000000000;
    long nsec = (long)(timeout_ns % 1000000000);

    clock_gettime(CLOCK_MONOTONIC, &now);
    if (now.tv_sec > INT64_MAX - sec - 1)
        return (struct timespec){.tv_sec = INT64_MAX, .tv_nsec = 0};
    now.tv_sec += sec;
    now.tv_nsec += nsec;
    if (now.tv_nsec >= 1000000000) {
        now.tv_sec++;
        now.tv_nsec -= 1000000000;
    }
    return now;
}

/* The live group with this id, or NULL (never made, destroyed, or an id
 * from a slot's earlier generation).  Caller holds the mutex. */
static struct pool_group *live_group(struct pool *pool, int id)
{
    struct pool_group *g;

    if (id < 0)
        return NULL;
    g = &pool->groups[(unsigned)id & GROUP_SLOT_MASK];
    if (!g->live || g->generation != (unsigned)id >> GROUP_SLOT_BITS)
        return NULL;
    return g;
}

/* What stopped an allocation: decides whose waits and failures count it. */
enum alloc_limit {
    LIMIT_POOL,        /* the watermark, or no free block of the size */
    LIMIT_RESERVATION, /* the group's usage would pass its reservation */
};

/* One attempt at an allocation of `order`, with `group` the group it may
 * charge (NULL: normal only).  Returns the head index, or NO_BLOCK with
 * *limit saying why.  Caller holds the mutex. */
static uint32_t try_alloc(struct pool *pool, unsigned order, struct pool_group *group,
                          enum alloc_limit *limit, bool *from_reserve)
{
    struct pool_stats *s = &pool->stats;
    uint64_t bytes = block_bytes(order);
    bool reserve;
    uint32_t idx;

    /* Decide the path first and take the block in one place: take_block
     * then stays inlined, which the data path notices.
     *
     * Normal path first, for emergency callers too: the reserve is for when
     * the normal budget is gone, not a second budget.  No overflow: both
     * terms are at most the arena size, far below 2^63. */
    if (pool->faulted_bytes - s->in_use_bytes >= s->watermark + bytes) {
        reserve = false;
    } else if (group != NULL && group->stats.connected) {
        /* Charge before using the reserve (seed part 4): a group may never
         * hold more of it than it reserved.  Since normal allocations leave
         * the watermark free, that keeps what every other connected group
         * reserved there for it, except while a new connect's share is
         * still held by normal blocks (see pool.h). */
        if (group->stats.usage + bytes > group->stats.reservation) {
            *limit = LIMIT_RESERVATION;
            return NO_BLOCK;
        }
        reserve = true;
    } else {
        *limit = LIMIT_POOL;
        return NO_BLOCK;
    }

    idx = take_block(pool, order);
    if (idx == NO_BLOCK) {
        /* The bytes are there but not in one block (fragmentation), or, for
         * the reserve, a new connect's share is still held by normal blocks:
         * either way the pool, not the group, is short. */
        *limit = LIMIT_POOL;
        return NO_BLOCK;
    }
    *from_reserve = reserve;
    if (!reserve) {
        pool->meta[idx].group = NO_GROUP;
        return idx;
    }
    group->stats.usage += bytes;
    if (group->stats.usage > group->stats.high_water)
        group->stats.high_water = group->stats.usage;
    group->stats.emergency_allocs++;
    s->emergency_allocs++;
    s->emergency_in_use_bytes += bytes;
    pool->meta[idx].group = (uint16_t)(group - pool->groups);
    return idx;
}

int64_t pool_alloc(struct pool *pool, size_t size, unsigned flags, int group,
                   int64_t timeout_ns, int *emergency)
{
    unsigned order;
    uint32_t idx;
    struct timespec deadline;
    bool waited = false, timed_out = false, from_reserve = false;
    enum alloc_limit limit;
    struct pool_group *g = NULL; /* the group it may charge */
    int err;

    if (size == 0 || size > pool_max_alloc(pool) || (flags & ~(unsigned)POOL_EMERGENCY) ||
        ((flags & POOL_EMERGENCY) && group < -1)) {
        errno = EINVAL;
        return -1;
    }
    order = order_for_size(size);

    pthread_mutex_lock(&pool->mutex);
    if ((flags & POOL_EMERGENCY) && group != -1) {
        g = live_group(pool, group);
        if (g == NULL) {
            pthread_mutex_unlock(&pool->mutex);
            errno = EINVAL;
            return -1;
        }
    }
    for (;;) {
        if (pool->closed) {
            err = ESHUTDOWN;
            break;
        }
        idx = try_alloc(pool, order, g, &limit, &from_reserve);
        if (idx != NO_BLOCK) {
            struct pool_stats *s = &pool->stats;

            s->in_use_bytes += block_bytes(order);
            s->free_bytes -= block_bytes(order);
            s->allocs++;
            if (s->in_use_bytes > s->high_water_bytes)
                s->high_water_bytes = s->in_use_bytes;
            pthread_mutex_unlock(&pool->mutex);
            if (emergency != NULL)
                *emergency = from_reserve;
            return (int64_t)idx << POOL_BLOCK_SHIFT;
        }
        /* Checked after the last try, so that a block freed just as the
         * timeout expired is still taken. */
        if (timeout_ns == 0 || timed_out) {
            err = timeout_ns == 0 ? ENOMEM : ETIMEDOUT;
            if (limit == LIMIT_RESERVATION)
                g->stats.charge_failures++;
            else
                pool->stats.failures++;
            break;
        }
        if (!waited) {
            waited = true;
            if (limit == LIMIT_RESERVATION)
                g->stats.charge_waits++;
            else
                pool->stats.waits++;
            if (timeout_ns > 0)
                deadline = deadline_after(timeout_ns);
        }
        timed_out = await_wake(pool, g, timeout_ns, &deadline);
    }
    pthread_mutex_unlock(&pool->mutex);
    errno = err;
    return -1;
}

/* Return a reserve block's bytes to its group.  A group cannot be destroyed
 * while it has usage, so the slot is still its own. */
static void uncharge(struct pool *pool, unsigned slot, uint64_t bytes)
{
    struct pool_group_stats *g = &pool->groups[slot].stats;

    /* Never below zero (the seed's rule).  Exact accounting makes the clamp
     * unreachable; it is there so that a bug shows as a low counter rather
     * than one wrapped to 2^64. */
    g->usage -= bytes < g->usage ? bytes : g->usage;
    pool->stats.emergency_in_use_bytes -= bytes;
}

int pool_free(struct pool *pool, int64_t offset)
{
    uint32_t idx;
    unsigned order;

    if (offset < 0 || (uint64_t)offset >= pool->size || (offset & (POOL_BLOCK_SIZE - 1))) {
        errno = EINVAL;
        return -1;
    }
    idx = (uint32_t)(offset >> POOL_BLOCK_SHIFT);

    pthread_mutex_lock(&pool->mutex);
    /* Catches double frees and stray offsets instead of corrupting lists. */
    if (pool->meta[idx].state != BLOCK_ALLOCATED) {
        pthread_mutex_unlock(&pool->mutex);
        errno = EINVAL;
        return -1;
    }
    order = pool->meta[idx].order;
    if (pool->meta[idx].group != NO_GROUP)
        uncharge(pool, pool->meta[idx].group, block_bytes(order));
    give_block(pool, idx);
    pool->stats.in_use_bytes -= block_bytes(order);
    pool->stats.free_bytes += block_bytes(order);
    pool->stats.frees++;
    /* Broadcast, not signal: waiters want different sizes, and different
     * groups, and the one a signal would wake may not fit while another
     * would. */
    wake_waiters(pool);
    pthread_mutex_unlock(&pool->mutex);
    return 0;
}

void pool_get_stats(struct pool *pool, struct pool_stats *out)
{
    pthread_mutex_lock(&pool->mutex);
    *out = pool->stats;
    pthread_mutex_unlock(&pool->mutex);
}

/* The C convention for the calls below: 0, or -1 with errno set to `err`. */
static int status(int err)
{
    if (err != 0) {
        errno = err;
        return -1;
    }
    return 0;
}

int pool_set_min_normal(struct pool *pool, uint64_t bytes)
{
    int err = 0;

    pthread_mutex_lock(&pool->mutex);
    if (bytes > pool->size)
        err = EINVAL;
    else if (pool->stats.watermark > pool->size - bytes)
        err = ENOSPC;
    else
        pool->stats.min_normal = bytes;
    pthread_mutex_unlock(&pool->mutex);
    return status(err);
}

int pool_group_create(struct pool *pool, uint64_t reservation)
{
    pthread_mutex_lock(&pool->mutex);
    if (pool->closed) {
        pthread_mutex_unlock(&pool->mutex);
        errno = ESHUTDOWN;
        return -1;
    }
    for (unsigned slot = 0; slot < POOL_MAX_GROUPS; slot++) {
        struct pool_group *g = &pool->groups[slot];

        if (!g->live) {
            *g = (struct pool_group){
                .stats.reservation = reservation,
                .generation = g->generation,
                .live = true,
            };
            pthread_mutex_unlock(&pool->mutex);
            return (int)((g->generation << GROUP_SLOT_BITS) | slot);
        }
    }
    pthread_mutex_unlock(&pool->mutex);
    errno = ENOSPC;
    return -1;
}

/* Why `g` cannot be connected now: 0 if it can, ENOSPC if the pool can
 * never cover its reservation, EAGAIN if it will once more of it is faulted
 * in (the prefault goes on until the arena is done, or the pool closed,
 * which callers check first).  Caller holds the mutex. */
static int connect_refusal(struct pool *pool, const struct pool_group *g)
{
    const struct pool_stats *s = &pool->stats;
    uint64_t reservation = g->stats.reservation;

    /* watermark + reservation > size - min_normal, written so that it
     * cannot overflow: watermark <= size - min_normal always holds. */
    if (reservation > pool->size - s->min_normal - s->watermark)
        return ENOSPC;
    /* Backed: the free memory faulted in covers the whole new watermark now
     * (and normal allocations never take it below the watermark), or as much
     * is faulted in as a pool of that size would need for the check above
     * (true once the prefault is done).  No overflow: the check above bounds
     * watermark + reservation + min_normal by size, and in_use_bytes <=
     * faulted_bytes. */
    if (pool->faulted_bytes - s->in_use_bytes >= s->watermark + reservation ||
        pool->faulted_bytes >= s->min_normal + s->watermark + reservation)
        return 0;
    return EAGAIN;
}

int pool_group_connect(struct pool *pool, int id)
{
    struct pool_group *g;
    int err = 0;

    pthread_mutex_lock(&pool->mutex);
    g = live_group(pool, id);
    if (g == NULL)
        err = EINVAL;
    else if (pool->closed)
        err = ESHUTDOWN;
    else if (!g->stats.connected) {
        err = connect_refusal(pool, g);
        if (err == 0) {
            pool->stats.watermark += g->stats.reservation;
            g->stats.connected = 1;
            /* An emergency waiter of this group may now use the reserve. */
            wake_waiters(pool);
        }
    }
    /* Connecting a connected group is a no-op: raising the watermark twice
     * for one reservation would leak it. */
    pthread_mutex_unlock(&pool->mutex);
    return status(err);
}

int pool_group_wait_backed(struct pool *pool, int id, int64_t timeout_ns)
{
    struct pool_group *g;
    struct timespec deadline;
    bool timed_out = false;
    int err;

    if (timeout_ns > 0)
        deadline = deadline_after(timeout_ns);
    pthread_mutex_lock(&pool->mutex);
    g = live_group(pool, id);
    if (g == NULL) {
        pthread_mutex_unlock(&pool->mutex);
        errno = EINVAL;
        return -1;
    }
    for (;;) {
        if (pool->closed) {
            err = ESHUTDOWN;
            break;
        }
        err = g->stats.connected ? 0 : connect_refusal(pool, g);
        if (err != EAGAIN) {
            if (err == ENOSPC)
                err = 0; /* pool_group_connect says so */
            break;
        }
        if (timeout_ns == 0 || timed_out) {
            err = ETIMEDOUT;
            break;
        }
        /* Woken by chunks faulted in, frees and disconnects alike. */
        timed_out = await_wake(pool, g, timeout_ns, &deadline);
    }
    pthread_mutex_unlock(&pool->mutex);
    return status(err);
}

int pool_group_disconnect(struct pool *pool, int id)
{
    struct pool_group *g;

    pthread_mutex_lock(&pool->mutex);
    g = live_group(pool, id);
    if (g == NULL) {
        pthread_mutex_unlock(&pool->mutex);
        errno = EINVAL;
        return -1;
    }
    if (g->stats.connected) {
        pool->stats.watermark -= g->stats.reservation;
        g->stats.connected = 0;
        /* Normal waiters may fit above the lower watermark. */
        wake_waiters(pool);
    }
    pthread_mutex_unlock(&pool->mutex);
    return 0;
}

int pool_group_destroy(struct pool *pool, int id)
{
    struct pool_group *g;
    int err = 0;

    pthread_mutex_lock(&pool->mutex);
    g = live_group(pool, id);
    if (g == NULL)
        err = EINVAL;
    /* Usage > 0 means reserve blocks still name this slot in their metadata:
     * reusing it would uncharge them from the wrong group. */
    else if (g->stats.connected || g->stats.usage != 0 || g->waiters != 0)
        err = EBUSY;
    else {
        g->live = false;
        g->generation = (g->generation + 1) & GROUP_GENERATION_MASK;
    }
    pthread_mutex_unlock(&pool->mutex);
    return status(err);
}

int pool_group_stats(struct pool *pool, int id, struct pool_group_stats *out)
{
    struct pool_group *g;

    pthread_mutex_lock(&pool->mutex);
    g = live_group(pool, id);
    if (g != NULL)
        *out = g->stats;
    pthread_mutex_unlock(&pool->mutex);
    if (g == NULL) {
        errno = EINVAL;
        return -1;
    }
    return 0;
}

void *pool_base(const struct pool *pool)
{
    return pool->base;
}

size_t pool_size(const struct pool *pool)
{
    return pool->size;
}

size_t pool_max_alloc(const struct pool *pool)
{
    return block_bytes(pool->max_order);
}

size_t pool_locked_bytes(struct pool *pool)
{
    size_t locked;

    /* Under the mutex because pool_close zeroes it.  The arena is locked on
     * fault: what is locked in RAM is what the prefault faulted in. */
    pthread_mutex_lock(&pool->mutex);
    locked = pool->locked_bytes != 0 ? pool->faulted_bytes : 0;
    pthread_mutex_unlock(&pool->mutex);
    return locked;
}

int pool_prefault_wait(struct pool *pool, uint64_t bytes, int64_t timeout_ns)
{
    struct timespec deadline;
    bool timed_out = false;
    int err;

    if (timeout_ns > 0)
        deadline = deadline_after(timeout_ns);
    pthread_mutex_lock(&pool->mutex);
    if (bytes > pool->size)
        bytes = pool->size;
    for (;;) {
        if (pool->faulted_bytes >= bytes) {
            err = 0;
            break;
        }
        if (pool->closed) {
            err = ESHUTDOWN;
            break;
        }
        if (timeout_ns == 0 || timed_out) {
            err = ETIMEDOUT;
            break;
        }
        timed_out = await_wake(pool, NULL, timeout_ns, &deadline);
    }
    pthread_mutex_unlock(&pool->mutex);
    return status(err);
}

int pool_prefault_join(struct pool *pool)
{
    return status(join_prefault(pool));
}

static int64_t elapsed_ns(struct timespec from, struct timespec to)
{
    return (int64_t)(to.tv_sec - from.tv_sec) * 1000000000 + (to.tv_nsec - from.tv_nsec);
}

void pool_prefault_stats(struct pool *pool, struct pool_prefault_stats *out)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    pthread_mutex_lock(&pool->mutex);
    out->faulted_bytes = pool->faulted_bytes;
    out->running = pool->prefault_running;
    out->elapsed_ns = elapsed_ns(pool->prefault_started,
                                 pool->prefault_running != 0 ? now : pool->prefault_finished);
    pthread_mutex_unlock(&pool->mutex);
}
