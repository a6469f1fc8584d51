/*
 * netswap's NBD request loop for the common case, in C so that it runs
 * without the GIL.
 *
 * A connection whose export is a file calls nbd_fast_serve() from its reader
 * thread (again after each request it had to leave to Python).  The loop
 * receives request headers into the connection's receive window, and serves
 * plain READs and WRITEs itself (and plain FLUSHes: below): a buffer from the pool (the connection's
 * group, the reserve only where the connection may use it), the payload
 * received straight into it, preadv2(RWF_NOWAIT) or pwrite, and one sendmsg of
 * reply header and data.  Anything else (another command, a flag, a request
 * the spec refuses, an empty pool, a read the page cache cannot answer while
 * more requests are queued, a closed gate) stops the loop with the request left unparsed in the window,
 * and the Python connection serves it the ordinary way: the C loop knows no
 * rule of the protocol that Python does not apply too, it only skips Python
 * for the requests that need none of its decisions.
 *
 * A FLUSH (no flag but FUA, which means nothing on it) on a writable export
 * whose backend has not failed is taken here too: queued on the backend's C
 * flushers (commit.h), which share the group commit with Python's; the loop
 * goes on with the requests behind it, and sends the FLUSH's reply when a
 * flusher hands it back (an eventfd wakes the loop waiting for a request).
 * Up to FLUSHES_QUEUED of a connection at the flushers; past that (or with no
 * flusher to be had) the loop syncs on its own thread.
 *
 * The loop owns no thread, lock or memory: the connection, its window and the
 * pool belong to Python, which fills struct nbd_fast_conn in once and reads
 * the statistics from it (one writer, the loop; readers see each counter
 * whole, never the total of a request half-counted across two fields in a
 * way that goes backwards).
 */
#ifndef NETSWAP_NBDFAST_H
#define NETSWAP_NBDFAST_H

#include <stdint.h>

#include "commit.h"
#include "fastloop.h"
#include "placement.h"
#include "sendgate.h"

#define NBD_FAST_REPLY_MAX 32 /* the longest reply header: a structured OFFSET_DATA prefix */

/* Why nbd_fast_serve returned. */
#define NBD_FAST_CLOSED 0       /* the client closed (or the read side was shut) between requests */
#define NBD_FAST_FALLBACK 1     /* the next request (whole header at window[start]) is Python's */
#define NBD_FAST_PARTIAL 2      /* a reply was not (or only partly) sent: the fields describe it;
                                   with sent > 0 the gate holds the socket for its rest */
#define NBD_FAST_WRITE_ERROR 3  /* a WRITE was received but pwrite failed: error, pending fields */
#define NBD_FAST_CHECK 4        /* a write happened at or past check_due_ns: check the backend */
#define NBD_FAST_SOCKET_ERROR 5 /* recv or send failed with `error` (the client is gone) */
#define NBD_FAST_PAYLOAD_CUT 6  /* the client closed in the middle of a WRITE payload */
#define NBD_FAST_SYNC_FAILED 7  /* a FLUSH's sync failed (`error`; the commit record latched
                                   it): the fields describe that FLUSH; Python's backend must
                                   fail too, then Python answers it */
#define NBD_FAST_RECHECK 8      /* after a FLUSH's sync the file was not (or no longer) the
                                   one at the backend's path: Python checks (and fails the
                                   backend), then answers the FLUSH the fields describe */

struct nbd_fast_conn {
    /* Set once, when transmission starts. */
    int sock;
    int fd;                 /* the export's backing file */
    struct pool *pool;
    unsigned alloc_flags;   /* POOL_EMERGENCY for a swap connection, else 0 */
    int group;              /* its pool group (-1: none) */
    uint64_t export_size;
    uint32_t min_block;
    uint32_t max_payload;
    int read_only;
    int structured;         /* structured replies were negotiated */
    uint8_t *window;        /* the receive window (a pool buffer) */
    uint32_t window_size;
    struct send_gate *gate;       /* see sendgate.h */
    int *backend_ok;        /* 0 once the backend has failed for good: writes go to Python */
    int *dirty;             /* set to 1 after each write, before its reply: the backend's
                               group commit (exports/groupcommit.py) syncs only when set */
    struct commit *commit;  /* the backend's group commit (commit.h), shared with Python */
    struct flush_queue *flushes; /* this connection's FLUSHes at the flushers: made by the
                                    loop at its first FLUSH (NULL: none yet, or no memory for
                                    one, and then the loop syncs on its own thread); Python
                                    frees it when the connection ends */
    const char *path;       /* the backend's path, and the file that must still be there */
    int follow_symlinks;
    uint64_t file_dev;
    uint64_t file_ino;
    int *run_ok;            /* 0 while this connection's requests must pass Python (pressure) */
    uint64_t bounds_ns[FAST_LOOP_BOUNDS];

    /* In and out: the window's buffered bytes are window[start:end]. */
    uint32_t start;
    uint32_t end;
    int64_t check_due_ns;   /* CLOCK_MONOTONIC time of the backend's next identity check */
    int reads_may_wait;     /* 0: reads use RWF_NOWAIT; set to 1 by the loop if the file
                               system refuses it (then every READ falls back) */

    /* Out, for NBD_FAST_PARTIAL and NBD_FAST_WRITE_ERROR: the request and its pool block. */
    uint16_t command;
    uint16_t flags;
    uint64_t cookie;
    uint64_t offset;
    uint32_t length;
    int64_t started_ns;
    int64_t block;          /* pool offset of the request's buffer, owned by Python now
                               (-1: a FLUSH, which has none) */
    int emergency;          /* the block came from the reserve */
    uint8_t reply[NBD_FAST_REPLY_MAX]; /* PARTIAL: the reply header ... */
    uint32_t reply_len;
    uint64_t sent;          /* ... and how many bytes of header + data went out */
    int error;              /* errno of WRITE_ERROR / SOCKET_ERROR */

    struct fast_op_stats stats[3]; /* 0 READ, 1 WRITE, 2 FLUSH */
    struct placement placement;    /* where the loop's thread runs (placement.h) */

    /* Polling for the next request before sleeping (nbdfast.c, recv_request): set up
     * by the loop (zero at the start), read by the scrape. */
    int64_t last_gap_ns;    /* how long the last wait for a request took (0: none yet) */
    uint32_t served_since_wait; /* requests served since the loop last waited for one (the
                                   placement's measure too) */
    uint64_t polls_won;     /* polls a request ended (the loop did not sleep) */
    uint64_t polls_lost;    /* polls that gave up (the loop slept after all) */
};

/* Serve requests until one of the NBD_FAST_* reasons; see the top of this file. */
int nbd_fast_serve(struct nbd_fast_conn *c);

#endif /* NETSWAP_NBDFAST_H */
