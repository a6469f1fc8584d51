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
#include <stdbool.h>
#include <sys/mman.h>
#include <time.h>

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

/* Carve the arena into the largest aligned power-of-two blocks, biggest
 * first, so that an arena of any block count is fully usable.  Since each
 * chunk starts at the sum of the larger ones, it is aligned to its size. */
static void carve_arena(struct pool *pool)
{
    uint32_t idx = 0;
    uint32_t remaining = pool->nblocks;

    for (unsigned k = 0; k < POOL_MAX_ORDERS; k++)
        pool->free_head[k] = NO_BLOCK;
    pool->max_order = 31 - (unsigned)__builtin_clz(remaining);
    while (remaining != 0) {
        unsigned k = 31 - (unsigned)__builtin_clz(remaining);

        free_list_push(pool, idx, k);
        idx += UINT32_C(1) << k;
        remaining -= UINT32_C(1) << k;
    }
}

/* Anonymous private memory, faulted in now.  MAP_POPULATE does the bulk of
 * the faulting but does not report failure, so every page is also written:
 * whatever the lock mode, the memory is backed by real private pages (not
 * the shared zero page) before the first request.  Not inherited by
 * children: a fork would otherwise make every page copy-on-write, and the
 * daemon's next write would fault and allocate.  MADV_DONTFORK is hardening
 * only, so a kernel refusing it is not fatal. */
static void *map_prefaulted(size_t size)
{
    unsigned char *base;

    base = mmap(NULL, size, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    for (size_t off = 0; off < size; off += POOL_BLOCK_SIZE)
        ((volatile unsigned char *)base)[off] = 0;
    (void)madvise(base, size, MADV_DONTFORK);
    return base;
}

/* Lock the control mapping and the arena together, or neither: the
 * allocator's own state must be as resident as the memory it hands out.
 * Returns 0 or the mlock errno. */
static int lock_mappings(struct pool *pool)
{
    int err;

    if (mlock(pool, pool->control_size) != 0)
        return errno;
    if (mlock(pool->base, pool->size) != 0) {
        err = errno;
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

struct pool *pool_create(size_t size, int lock_mode, int *lock_errno)
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

    pool->base = map_prefaulted(size);
    if (pool->base == NULL)
        goto fail_unmap_control;
    /* The arena holds the nodes' swapped-out memory: keep it out of core
     * dumps.  Hardening only, like MADV_DONTFORK. */
    (void)madvise(pool->base, size, MADV_DONTDUMP);

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

    carve_arena(pool);
    pool->stats.free_bytes = size;
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
    munmap(pool->base, pool->size);
    /* The mutex and counters stay (pool_destroy frees them); pinning them
     * no longer serves a data path. */
    munlock(pool, pool->control_size);
    pool->base = NULL;
    pool->locked_bytes = 0;
    pthread_cond_broadcast(&pool->freed);
    pthread_mutex_unlock(&pool->mutex);
    return 0;
}

void pool_destroy(struct pool *pool)
{
    if (!pool->closed)
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
    if (s->free_bytes >= s->watermark + bytes) {
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
        pool->waiters++;
        if (g != NULL)
            g->waiters++;
        if (timeout_ns > 0)
            timed_out = pthread_cond_timedwait(&pool->freed, &pool->mutex, &deadline) == ETIMEDOUT;
        else
            pthread_cond_wait(&pool->freed, &pool->mutex);
        pool->waiters--;
        if (g != NULL)
            g->waiters--;
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

/* Anything that may let a waiting pool_alloc through (a free, a lower
 * watermark, a newly connected group) wakes them all to retry. */
static void wake_waiters(struct pool *pool)
{
    if (pool->waiters != 0)
        pthread_cond_broadcast(&pool->freed);
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

int pool_group_connect(struct pool *pool, int id)
{
    struct pool_stats *s = &pool->stats;
    struct pool_group *g;
    int err = 0;

    pthread_mutex_lock(&pool->mutex);
    g = live_group(pool, id);
    if (g == NULL)
        err = EINVAL;
    else if (pool->closed)
        err = ESHUTDOWN;
    else if (!g->stats.connected) {
        /* watermark + reservation > size - min_normal, written so that it
         * cannot overflow: watermark <= size - min_normal always holds. */
        if (g->stats.reservation > pool->size - s->min_normal - s->watermark) {
            err = ENOSPC;
        } else {
            s->watermark += g->stats.reservation;
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

    /* Under the mutex because pool_close zeroes it. */
    pthread_mutex_lock(&pool->mutex);
    locked = pool->locked_bytes;
    pthread_mutex_unlock(&pool->mutex);
    return locked;
}
