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
 * All of it is the cffi interface too (build_pool.py).
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

#endif /* NETSWAP_COMMIT_H */
