/*
 * netswap's NFSv3 call loop for a swap node's own swap file and for scratch
 * files, in C so that it runs without the GIL (the NFS counterpart of
 * nbdfast.h).
 *
 * An NFS connection calls nfs_fast_serve() from its reader thread (again
 * after each record it had to leave to Python).  The loop peeks at the
 * next record (MSG_PEEK: nothing is consumed while it decides) and serves it
 * itself only if it is a single-fragment ONC RPC call of NFSv3 READ or WRITE,
 * with an AUTH_SYS or AUTH_NONE credential every length of which checks out,
 * arguments exactly as nfs3.py decodes them, on a handle Python registered in
 * this connection's table (it served a call on it for this very peer), while
 * the node is attached (a swap file) or the path is still the file (a scratch
 * file), with normal pool memory (never a reserve) to be had without waiting.
 * Then:
 * the record is received into a pool block, the file is read or written (and
 * fdatasync'ed for a stable WRITE), the reply is built as nfs3.py builds it
 * (fattr3 from fstat) and sent through the connection's send gate.
 *
 * Anything else stops the loop with the record still in the socket
 * (NFS_FAST_FALLBACK) and Python serves it exactly as it would without this
 * loop.  A record already received whose I/O then failed goes to Python whole
 * (NFS_FAST_HANDOFF): Python parses and runs it again, and answers the error
 * its own way.  The loop never verifies a handle (no HMAC): it only compares
 * bytes with what Python verified for this connection's peer.
 */
#ifndef NETSWAP_NFSFAST_H
#define NETSWAP_NFSFAST_H

#include <stdint.h>

#include "fastloop.h"
#include "sendgate.h"

#define NFS_FAST_HANDLES 8    /* handles one connection keeps: a swap file, a few scratch */
#define NFS_FAST_HANDLE_MAX 64
#define NFS_FAST_REPLY_MAX 160 /* fragment header + accepted reply + READ/WRITE result head */

/* Why nfs_fast_serve returned. */
#define NFS_FAST_CLOSED 0       /* the client closed (or the read side was shut) between records */
#define NFS_FAST_FALLBACK 1     /* the next record, untouched in the socket, is Python's */
#define NFS_FAST_PARTIAL 2      /* a reply was not (or only partly) sent: reply/sent describe it */
#define NFS_FAST_HANDOFF 3      /* a received record (block, record_len) is Python's to run */
#define NFS_FAST_SOCKET_ERROR 4 /* recv or send failed with `error` */
#define NFS_FAST_RECORD_CUT 5   /* the client closed in the middle of a record */
#define NFS_FAST_FLUSH 6        /* a reply went out whole, but Python queued replies behind
                                   it meanwhile: its sender must be told to send them */
#define NFS_FAST_RECORD_TIMEOUT 7 /* a record did not arrive whole within record_timeout_ns
                                   of its first byte (nothing of it is kept) */
#define NFS_FAST_VOIDED 8       /* a received WRITE (block, record_len) whose handle a scrub
                                   voided before it was written: Python's to run (and answer) */
#define NFS_FAST_MOVED 9        /* a received scratch WRITE (block, record_len) whose file left
                                   its path while the loop waited for the record's body:
                                   Python's to run (and answer) */

#define NFS_FAST_SWAP_FILE 0     /* a handle entry's kind: the node's own swap file */
#define NFS_FAST_SCRATCH_FILE 1  /* a scratch-export file */

/* One handle Python verified for this connection's peer: the node's own swap file, or a
 * scratch file.  A scratch entry is good only while `path` is still a regular file of the
 * entry's device and inode (one lstat per call, as exports.py's resolve checks it): the
 * descriptor keeps the inode alive, so no other file can have its number meanwhile; a file
 * removed, renamed or replaced on the server fails that check, and the loop voids the entry
 * (length 0, `voided` set: Python closes its descriptor) and leaves the call to Python. */
struct nfs_fast_handle {
    uint32_t length;              /* 0: a free slot */
    uint8_t bytes[NFS_FAST_HANDLE_MAX];
    int fd;                       /* the file (a descriptor of Python's, dup'ed) */
    uint64_t fsid;                /* the export id, fattr3.fsid */
    int64_t epoch;                /* swap->epoch when Python verified it */
    int kind;                     /* NFS_FAST_SWAP_FILE or NFS_FAST_SCRATCH_FILE */
    int writable;                 /* scratch: its descriptor is open for writing */
    const char *path;             /* scratch: its path (Python's memory, kept alive) */
    uint64_t dev, ino;            /* scratch: what `path` must still be */
};

/* The swap files' scrub state, shared by every loop (Python owns it).  A scrub bumps `epoch`
 * (every handle entry verified before is void), then waits until `writers` is 0 before it
 * zeroes anything: a loop counts itself in `writers` before it looks at the epoch for a
 * WRITE and out after the write, so a write either sees the new epoch and is not made, or
 * is made before the zeroing starts, never after it. */
struct nfs_fast_swap {
    int64_t epoch;
    int64_t writers;
};

/* For Python, with the ordering the protocol above needs (sequentially consistent): void
 * every handle entry; how many loops are in a write now. */
void nfs_fast_void_handles(struct nfs_fast_swap *swap);
int64_t nfs_fast_writers(struct nfs_fast_swap *swap);

/* A node's state the loop reads and writes (shared by its connections; Python owns it). */
struct nfs_fast_node {
    int attached;                 /* 1 while the node holds its reserve (swapnodes.py) */
    int64_t last_io_ns;           /* CLOCK_MONOTONIC of the loop's last swap-file call */
};

struct nfs_fast_conn {
    /* Set once. */
    int sock;
    struct pool *pool;
    uint32_t max_record;          /* the record cap (nfs.max_io + slack) */
    uint32_t max_io;
    uint64_t swap_size;           /* a swap file's size: a WRITE never goes past it */
    uint64_t max_file_size;       /* a scratch WRITE never ends past it (NFS3ERR_FBIG) */
    uint64_t record_timeout_ns;   /* nfs.record_timeout: a record begun must be in by then
                                     (0: no limit), as on the Python path */
    uint8_t verifier[8];          /* the WRITE verifier */
    struct nfs_fast_swap *swap;   /* the scrub epoch (older entries are void) and writers */
    struct nfs_fast_node *node;   /* the swap node (a never-attached one for other peers) */
    struct send_gate *gate;       /* see sendgate.h */
    uint64_t bounds_ns[FAST_LOOP_BOUNDS];
    struct nfs_fast_handle handles[NFS_FAST_HANDLES];

    /* Out, for PARTIAL and HANDOFF: the call and its pool block. */
    int64_t block;
    uint32_t block_len;
    uint32_t record_len;          /* the record is block[0:record_len] */
    uint32_t proc;
    uint32_t data_offset;         /* PARTIAL READ: its data is block[data_offset:+data_len] */
    uint32_t data_len;
    uint64_t bytes;               /* what nfs_bytes counts for it */
    int64_t started_ns;
    uint8_t reply[NFS_FAST_REPLY_MAX];
    uint32_t reply_len;
    uint64_t sent;                /* bytes of reply + data (+ padding) already on the wire */
    int error;
    int flush;                    /* internal: see NFS_FAST_FLUSH */
    int voided;                   /* a scratch entry was voided: Python closes its fd */

    struct fast_op_stats stats[2]; /* 0 READ, 1 WRITE; nfs_calls = sum of buckets */
    uint64_t scratch_calls[2];    /* of those, on scratch files: 0 READ, 1 WRITE */
};

int nfs_fast_serve(struct nfs_fast_conn *c);

#endif /* NETSWAP_NFSFAST_H */
