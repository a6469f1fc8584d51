/*
 * netswap's NBD request loop for the common case, in C so that it runs
 * without the GIL.
 *
 * A connection whose export is a file calls nbd_fast_serve() from its reader
 * thread (again after each request it had to leave to Python).  The loop
 * receives request headers into the connection's receive window, and serves
 * plain READs and WRITEs itself: a buffer from the pool (the connection's
 * group, the reserve only where the connection may use it), the payload
 * received straight into it, preadv2(RWF_NOWAIT) or pwrite, and one sendmsg of
 * reply header and data.  Anything else (another command, a flag, a request
 * the spec refuses, an empty pool, a read the page cache cannot answer while
 * more requests are queued, a closed gate) stops the loop with the request left unparsed in the window,
 * and the Python connection serves it the ordinary way: the C loop knows no
 * rule of the protocol that Python does not apply too, it only skips Python
 * for the requests that need none of its decisions.
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

/* Latency buckets: as many bounds as counters.LATENCY_BUCKETS, plus one count above. */
#define NBD_FAST_BOUNDS 18
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

/*
 * Who may write to a connection's socket.  Replies leave from the C loop (on
 * the reader thread) and from Python (workers, the send poller) at the same
 * time; each reply must go out whole, and once part of one is on the wire its
 * rest must come next.  Python's ReplySender takes the gate as its lock, and
 * tells it on release whether replies are queued (backlog); the C loop sends
 * only when nothing is queued, under the gate, and when the socket takes
 * only part of its reply it marks the gate (c_partial) so that no one sends
 * before Python has put the rest at the head of its queue.
 */
struct nbd_send_gate;

struct nbd_send_gate *nbd_gate_new(void);
void nbd_gate_free(struct nbd_send_gate *gate);
/* Lock; returns 1 if the C loop's partly sent reply waits to be taken over. */
int nbd_gate_acquire(struct nbd_send_gate *gate);
/* Unlock, saying whether Python has replies queued and whether it took over the C loop's
 * partly sent reply. */
void nbd_gate_release(struct nbd_send_gate *gate, int backlog, int took_partial);

/* One operation's statistics (index 0 READ, 1 WRITE); successes only, errors go to Python. */
struct nbd_fast_op_stats {
    uint64_t buckets[NBD_FAST_BOUNDS + 1]; /* not cumulative; the last is above every bound */
    uint64_t latency_ns;
    uint64_t bytes;
};

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
    struct nbd_send_gate *gate;
    int *backend_ok;        /* 0 once the backend has failed for good: writes go to Python */
    int *run_ok;            /* 0 while this connection's requests must pass Python (pressure) */
    uint64_t bounds_ns[NBD_FAST_BOUNDS];

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
    int64_t block;          /* pool offset of the request's buffer, owned by Python now */
    int emergency;          /* the block came from the reserve */
    uint8_t reply[NBD_FAST_REPLY_MAX]; /* PARTIAL: the reply header ... */
    uint32_t reply_len;
    uint64_t sent;          /* ... and how many bytes of header + data went out */
    int error;              /* errno of WRITE_ERROR / SOCKET_ERROR */

    struct nbd_fast_op_stats stats[2];
};

/* Serve requests until one of the NBD_FAST_* reasons; see the top of this file. */
int nbd_fast_serve(struct nbd_fast_conn *c);

#endif /* NETSWAP_NBDFAST_H */
