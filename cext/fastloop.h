/*
 * What netswap's two C request loops (nbdfast.c for NBD, nfsfast.c for NFS)
 * have in common: their per-operation statistics as Python reads them, and the
 * helpers both use (the clock, accounting a request, reading from the page
 * cache only).  Neither loop includes the other's header.
 *
 * The first part is the cffi interface; the part between "#ifndef
 * NETSWAP_CDEF" and its #endif is for the C loops only (build_pool.py leaves
 * it out of the cdef).  Its helpers are static inline: they sit on the path of
 * every request.
 */
#ifndef NETSWAP_FASTLOOP_H
#define NETSWAP_FASTLOOP_H

#include <stdint.h>

/* Latency buckets: as many bounds as counters.LATENCY_BUCKETS, plus one count above. */
#define FAST_LOOP_BOUNDS 18

/* One operation's statistics (a loop keeps one for READ, one for WRITE); successes only,
 * errors go to Python. */
struct fast_op_stats {
    uint64_t buckets[FAST_LOOP_BOUNDS + 1]; /* not cumulative; the last is above every bound */
    uint64_t latency_ns;
    uint64_t bytes;
};

#ifndef NETSWAP_CDEF
#include <errno.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* A statistic is written by its loop's thread alone and read by others (the metrics
 * scrape): a relaxed atomic store keeps each read whole, at the cost of a plain store on
 * x86 and arm64. */
#define BUMP(field, amount) \
    __atomic_store_n(&(field), (field) + (amount), __ATOMIC_RELAXED)

/* CLOCK_MONOTONIC in nanoseconds: time.monotonic() and time.perf_counter_ns() on Linux. */
static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Count one successful request of `bytes` that started at `started` (now_ns). */
static inline void account(struct fast_op_stats *s, const uint64_t *bounds_ns, uint64_t bytes,
                           int64_t started)
{
    uint64_t elapsed = (uint64_t)(now_ns() - started);
    int i = 0;
    /* The first bound >= elapsed, Prometheus' "le", as counters.py's bisect_left. */
    while (i < FAST_LOOP_BOUNDS && bounds_ns[i] < elapsed)
        i++;
    BUMP(s->buckets[i], 1);
    BUMP(s->latency_ns, elapsed);
    BUMP(s->bytes, bytes);
}

/* Read `length` bytes at `offset` from the page cache only (preadv2 with RWF_NOWAIT): the
 * count read (all of it, or the part that was cached), or -1 with errno (EAGAIN: none of it
 * is cached; EOPNOTSUPP or EINVAL: the file system cannot read without waiting). */
static inline ssize_t read_cached(int fd, uint8_t *data, uint32_t length, uint64_t offset)
{
    struct iovec iov = {.iov_base = data, .iov_len = length};
    ssize_t got;
    do {
        got = preadv2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
    } while (got < 0 && errno == EINTR);
    return got;
}

/* Read the rest, data[done:length], waiting for the disk.  1: read; 0: an error, or EOF
 * inside the file (a truncated file): the loop leaves the request to Python. */
static inline int read_rest(int fd, uint8_t *data, uint32_t done, uint32_t length,
                            uint64_t offset)
{
    while (done < length) {
        ssize_t n = pread(fd, data + done, length - done, (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 0;
        done += (uint32_t)n;
    }
    return 1;
}
#endif /* NETSWAP_CDEF */

#endif /* NETSWAP_FASTLOOP_H */
