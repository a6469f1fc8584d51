/*
 * Group commit of one file backend's flushes, shared by the NBD C request loop
 * (nbdfast.c, a FLUSH served on the connection's thread) and Python's flusher
 * threads (exports/groupcommit.py batches FLUSHes that went to Python, NFS
 * COMMITs, closing): one record of which syncs run, so that neither side skips
 * a sync on the strength of a `dirty` flag the other cleared for a sync that
 * has not ended yet.
 *
 * The rule (groupcommit.py's docstring says why it is honest): a flush is
 * answered only after an fdatasync that STARTED after the flush arrived has
 * succeeded.  commit_sync() is called once the flushes it answers have
 * arrived, so the sync it starts qualifies.  It starts none when `dirty` is
 * clear (no write completed since the latest sync began: that sync covers
 * them all) and waits for that one instead, if it still runs.  Syncs overlap:
 * each caller that finds `dirty` set starts its own at once.
 *
 * Failure latch: a failed fdatasync fails the backend for good (the kernel
 * reports a writeback error once and may drop the pages).  The record keeps
 * `failed`, closes the write gate (every writer, C or Python, checks it), and
 * every later commit_sync fails with EIO; Python learns of it from the return
 * (its own calls, or the loop's NBD_FAST_SYNC_FAILED) and from commit_failed().
 *
 * FLUSHes the NBD C loop takes are synced off its thread: commit_submit()
 * queues one on the backend's flushers (up to COMMIT_FLUSHERS threads,
 * started on demand, each ending after COMMIT_IDLE_EXIT_S without work), a
 * flusher takes every FLUSH queued when it starts, runs one commit_sync() for
 * them, and puts each back on its connection's flush_queue, whose eventfd
 * wakes the loop: the loop sends the replies (through the send gate, as its
 * others), so no reply leaves from a thread that does not own the connection.
 *
 * The first part is the cffi interface; the part between "#ifndef
 * NETSWAP_CDEF" and its #endif is for the C loop only.
 */
#ifndef NETSWAP_COMMIT_H
#define NETSWAP_COMMIT_H

#include <stdint.h>

struct commit;

/* `dirty`: the int every writer sets to 1 after a write and before its reply, or NULL when
 * not every writer does (then every call syncs); `write_gate`: the backend's int that is 1
 * until it fails (set to 0 here when a sync fails).  Both outlive the record. */
struct commit *commit_new(int *dirty, int *write_gate);
void commit_free(struct commit *commit);
/* Make every write completed before this call durable, on the calling thread (without the
 * GIL).  1: a sync ran; 0: none was needed (the latest one, ended, covers them); -1: a sync
 * failed, now or before (errno: the failure's, or EIO for the latch). */
int commit_sync(struct commit *commit, int fd);
uint64_t commit_syncs(struct commit *commit);  /* syncs begun */
uint64_t commit_skipped(struct commit *commit); /* calls answered without one of their own */
int commit_failed(struct commit *commit);      /* errno of the sync that failed, or 0 */
/* No more FLUSHes: wait for the flushers to answer what is queued and end (Backend.close;
 * commit_free does it too). */
void commit_close(struct commit *commit);

/* A connection's FLUSHes in flight and answered; see above.  flush_queue_free waits until
 * every FLUSH it submitted is back (so a flusher never touches a freed queue or a closed
 * descriptor), then drops the answers nobody will send (the connection has ended). */
struct flush_queue;
struct flush_queue *flush_queue_new(void);
void flush_queue_free(struct flush_queue *queue);

#ifndef NETSWAP_CDEF
/* One FLUSH on its way through a flusher. */
struct flush_job {
    struct flush_job *next;
    struct flush_queue *queue;
    int fd;             /* the connection's descriptor of the file (open until it is back) */
    uint16_t flags;
    uint64_t cookie;
    uint64_t offset;
    uint32_t length;
    int64_t started_ns;
    int result;         /* commit_sync's */
    int error;          /* its errno */
};

/* Queue `job` (malloc'd; the queue frees it when taken back).  0, or -1 (the backend is
 * closing or no thread could be started): the caller syncs itself. */
int commit_submit(struct commit *commit, struct flush_job *job);
/* FLUSHes submitted and not yet taken back by flush_queue_take. */
int flush_queue_outstanding(struct flush_queue *queue);
/* The eventfd that is readable while answered FLUSHes wait. */
int flush_queue_fd(struct flush_queue *queue);
/* The oldest answered FLUSH, or NULL (the caller frees it). */
struct flush_job *flush_queue_take(struct flush_queue *queue);
#endif /* NETSWAP_CDEF */

#endif /* NETSWAP_COMMIT_H */
