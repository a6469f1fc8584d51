/* netswap's NFSv3 READ/WRITE loop for swap and scratch files; see nfsfast.h. */
#define _GNU_SOURCE
#include "nfsfast.h"
#include "fastloop.h"
#include "pool.h"
#include "sendgate.h"

#include <endian.h>
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Wire constants (RFC 5531, RFC 1813); the Python side has them in rpc/constants.py,
 * nfs/nfs3.py and nfs/exports.py. */
#define LAST_FRAGMENT 0x80000000u
#define RPC_CALL 0
#define RPC_REPLY 1
#define RPC_VERSION 2
#define MSG_ACCEPTED 0
#define SUCCESS 0
#define AUTH_NONE 0
#define AUTH_SYS 1
#define MAX_AUTH_BYTES 400
#define MACHINENAME_MAX 255
#define GIDS_MAX 16
#define PROG_NFS 100003
#define NFS_V3 3
#define PROC_READ 6
#define PROC_WRITE 7
#define NFS3_OK 0
#define NF3REG 1
#define NF3DIR 2
#define FILE_SYNC 2

/* Enough of a record to decide on it: fragment header, call header up to the credential,
 * the largest credential, the verifier, the largest handle, then WRITE's offset, count,
 * stable and data length. */
#define PEEK_MAX (4 + 32 + MAX_AUTH_BYTES + 8 + 4 + NFS_FAST_HANDLE_MAX + 20)
#define FATTR3_SIZE 84
/* How long the loop waits for a client to take more of a partly sent reply before it hands
 * the rest to Python's sender (which has the send timeout for clients that stop reading). */
#define FINISH_WAIT_MS 200

enum { OP_READ = 0, OP_WRITE = 1 };

static void put32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static uint32_t padded(uint32_t n) { return (n + 3) & ~3u; }

/* What a record asks, once checked. */
struct call {
    uint32_t xid;
    uint32_t proc;
    struct nfs_fast_handle *handle;
    uint64_t offset;
    uint32_t count;
    uint32_t stable;     /* WRITE */
    uint32_t data_pos;   /* WRITE: where its data starts in the record */
};

/* An AUTH_SYS body (authsys_parms) exactly as message._parse_auth_sys takes it. */
static int auth_sys_ok(const uint8_t *body, uint32_t length)
{
    uint32_t pos = 4; /* stamp */
    if (length < pos + 4)
        return 0;
    uint32_t name = get32(body + pos);
    pos += 4;
    if (name > MACHINENAME_MAX || padded(name) > length - pos)
        return 0;
    pos += padded(name);
    if (length - pos < 12) /* uid, gid, the gids' count */
        return 0;
    pos += 8;
    uint32_t gids = get32(body + pos);
    pos += 4;
    if (gids > GIDS_MAX || gids > (length - pos) / 4)
        return 0;
    return pos + 4 * gids == length;
}

/* Is the scratch entry's path still the file its descriptor has open (a regular file of the
 * same device and inode)?  If not, the entry is voided for good: the file was removed,
 * renamed or replaced on the server, and Python decides what its handle names now. */
static int scratch_still_there(struct nfs_fast_conn *c, struct nfs_fast_handle *h)
{
    struct stat st;
    if (lstat(h->path, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_ino == h->ino
            && (uint64_t)st.st_dev == h->dev)
        return 1;
    h->length = 0;
    c->voided = 1;
    return 0;
}

/* Parse the record rec[0:length] (of which `have` bytes are at hand) as a READ or WRITE this
 * loop serves.  1: yes, *call filled; 0: Python's. */
static int servable(struct nfs_fast_conn *c, const uint8_t *rec, uint32_t length, uint32_t have,
                    struct call *call)
{
    if (have < 32)
        return 0;
    if (get32(rec + 4) != RPC_CALL || get32(rec + 8) != RPC_VERSION || get32(rec + 12) != PROG_NFS
        || get32(rec + 16) != NFS_V3)
        return 0;
    call->xid = get32(rec);
    call->proc = get32(rec + 20);
    if (call->proc != PROC_READ && call->proc != PROC_WRITE)
        return 0;
    uint32_t flavor = get32(rec + 24), cred = get32(rec + 28);
    if (cred > MAX_AUTH_BYTES)
        return 0;
    uint32_t pos = 32 + padded(cred);
    if (pos + 8 > have || get32(rec + pos) != AUTH_NONE || get32(rec + pos + 4) != 0)
        return 0;
    if (flavor == AUTH_SYS) {
        if (!auth_sys_ok(rec + 32, cred))
            return 0;
    } else if (flavor != AUTH_NONE || cred != 0) {
        return 0;
    }
    pos += 8;
    /* The handle: opaque<64>, then it must be one of ours, byte for byte. */
    if (pos + 4 > have)
        return 0;
    uint32_t hlen = get32(rec + pos);
    pos += 4;
    if (hlen == 0 || hlen > NFS_FAST_HANDLE_MAX || pos + padded(hlen) > have)
        return 0;
    struct nfs_fast_handle *h = NULL;
    int64_t epoch = __atomic_load_n(&c->swap->epoch, __ATOMIC_ACQUIRE);
    for (int i = 0; i < NFS_FAST_HANDLES; i++) {
        struct nfs_fast_handle *entry = &c->handles[i];
        /* The scrub epoch voids swap entries only: a scrub never touches a scratch file. */
        if (entry->length == hlen && (entry->kind != NFS_FAST_SWAP_FILE || entry->epoch == epoch)
                && memcmp(entry->bytes, rec + pos, hlen) == 0) {
            h = entry;
            break;
        }
    }
    if (h == NULL)
        return 0;
    int swap = h->kind == NFS_FAST_SWAP_FILE;
    /* A swap file's calls only while its node is attached (the attach is Python's). */
    if (swap && !__atomic_load_n(&c->node->attached, __ATOMIC_ACQUIRE))
        return 0;
    call->handle = h;
    pos += padded(hlen);
    if (call->proc == PROC_READ) {
        if (pos + 12 != length || length > have) /* offset, count, and nothing after */
            return 0;
        call->offset = get64(rec + pos);
        call->count = get32(rec + pos + 8);
        return swap || scratch_still_there(c, h);
    }
    if (pos + 20 > have)
        return 0;
    call->offset = get64(rec + pos);
    call->count = get32(rec + pos + 8);
    call->stable = get32(rec + pos + 12);
    uint32_t data = get32(rec + pos + 16);
    pos += 20;
    if (data > c->max_io || padded(data) != length - pos) /* GARBAGE_ARGS: Python's */
        return 0;
    if (call->stable > FILE_SYNC || call->count != data)
        return 0;
    if (swap) {
        if (call->offset > c->swap_size || data > c->swap_size - call->offset) /* NOSPC */
            return 0;
    } else {
        if (call->offset > c->max_file_size || data > c->max_file_size - call->offset)
            return 0; /* FBIG: Python's */
        if (!h->writable)
            return 0; /* opened read-only (its mode, a running program): Python's */
    }
    call->data_pos = pos;
    return swap || scratch_still_there(c, h);
}

/* codec.py's fattr3 of a file from `st`; 0 if a value does not fit its XDR type (Python
 * answers that call). */
static int fattr3(uint8_t *out, const struct stat *st, const struct nfs_fast_handle *h)
{
    uint64_t fsid = h->fsid;
    const struct timespec *times[3] = {&st->st_atim, &st->st_mtim, &st->st_ctim};
    if ((uint64_t)st->st_nlink > UINT32_MAX || st->st_size < 0)
        return 0;
    uint64_t size = (uint64_t)st->st_size, used = (uint64_t)st->st_blocks * 512;
    if (h->kind == NFS_FAST_SWAP_FILE && used < size)
        used = size; /* swapon refuses a swap file with holes */
    put32(out, S_ISDIR(st->st_mode) ? NF3DIR : NF3REG);
    put32(out + 4, st->st_mode & 07777);
    put32(out + 8, (uint32_t)st->st_nlink);
    put32(out + 12, st->st_uid);
    put32(out + 16, st->st_gid);
    put64(out + 20, size);
    put64(out + 28, used);
    put64(out + 36, 0); /* rdev */
    put64(out + 44, fsid);
    put64(out + 52, (uint64_t)st->st_ino);
    for (int i = 0; i < 3; i++) {
        if (times[i]->tv_sec < 0 || times[i]->tv_sec > UINT32_MAX)
            return 0;
        put32(out + 60 + 8 * i, (uint32_t)times[i]->tv_sec);
        put32(out + 64 + 8 * i, (uint32_t)times[i]->tv_nsec);
    }
    return 1;
}

/* Has the client sent more than `count` bytes we have not read (another call queued)? */
static int more_than(struct nfs_fast_conn *c, uint32_t count)
{
    int unread = 0;
    if (ioctl(c->sock, FIONREAD, &unread) < 0)
        return 1;
    return (uint32_t)unread > count;
}

/* Bound the socket's blocking receives to `ns` from now (0: unbounded again).  SO_RCVTIMEO
 * bounds one MSG_WAITALL call as a whole, however the data trickles in.  Set only for the
 * wait for the rest of a record, never between records, and unbounded again before the
 * loop goes on or returns: the socket is its reader's alone, Python's included. */
static int bound_receives(struct nfs_fast_conn *c, int64_t ns)
{
    struct timeval tv = {.tv_sec = ns / 1000000000, .tv_usec = (ns % 1000000000) / 1000};
    if (ns > 0 && tv.tv_sec == 0 && tv.tv_usec == 0)
        tv.tv_usec = 1; /* a zero timeval would mean no bound at all */
    return setsockopt(c->sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

/* recvmsg with MSG_WAITALL (and `flags`), returning by `deadline` (now_ns; 0: no bound)
 * with what came by then: all of it, less (the deadline passed, or EOF), 0 (EOF) or -1
 * (errno; EAGAIN: the deadline passed with nothing). */
static ssize_t receive_by(struct nfs_fast_conn *c, struct msghdr *msg, int flags, int64_t deadline)
{
    if (deadline) {
        int64_t left = deadline - now_ns();
        if (left <= 0) {
            errno = EAGAIN;
            return -1;
        }
        if (bound_receives(c, left) < 0)
            return -1;
    }
    ssize_t n;
    do {
        n = recvmsg(c->sock, msg, flags | MSG_WAITALL);
    } while (n < 0 && errno == EINTR);
    if (deadline) {
        int saved = errno;
        if (bound_receives(c, 0) < 0)
            return -1; /* a socket left bounded would fail Python's wait for the next call */
        errno = saved;
    }
    return n;
}

/* Has the record's deadline (0: none) passed? */
static int past(int64_t deadline)
{
    return deadline && now_ns() >= deadline;
}

/* Peek at the next record.  1: p holds min(4 + its length, PEEK_MAX) bytes (*have);
 * 0: EOF before it; -1: socket error; 2: Python's (several fragments, too large, cut);
 * 3: it did not come by *deadline, which is set at its first byte (nfs.record_timeout). */
static int peek_record(struct nfs_fast_conn *c, uint8_t *p, uint32_t *have, uint32_t *length,
                       int64_t *deadline)
{
    ssize_t n;
    do {
        n = recv(c->sock, p, PEEK_MAX, MSG_PEEK); /* between records: no bound */
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
        return n == 0 ? 0 : -1;
    *deadline = c->record_timeout_ns ? now_ns() + (int64_t)c->record_timeout_ns : 0;
    struct iovec iov = {.iov_base = p, .iov_len = 4};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (n < 4) {
        n = receive_by(c, &msg, MSG_PEEK, *deadline);
        if (n < 4)
            return past(*deadline) ? 3 : n < 0 ? -1 : 2;
    }
    uint32_t word = get32(p);
    *length = word & ~LAST_FRAGMENT;
    if (!(word & LAST_FRAGMENT) || *length == 0 || *length > c->max_record)
        return 2;
    uint32_t need = *length + 4 < PEEK_MAX ? *length + 4 : PEEK_MAX;
    if ((uint32_t)n < need) {
        /* The rest of what decides it, which the client must send anyway, by the deadline. */
        iov.iov_len = need;
        n = receive_by(c, &msg, MSG_PEEK, *deadline);
        if (n < (ssize_t)need)
            return past(*deadline) ? 3 : n < 0 ? -1 : 2;
    }
    *have = need - 4;
    return 1;
}

/* Take the record (its fragment header and body) off the socket, the body into `dest`, by
 * `deadline`; *waited: whether part of it had not arrived yet.  1: done; 0: EOF; -1: socket
 * error; 3: the deadline passed. */
static int consume_record(struct nfs_fast_conn *c, uint8_t *dest, uint32_t length,
                          int64_t deadline, int *waited)
{
    uint8_t header[4];
    struct iovec iov[2] = {{.iov_base = header, .iov_len = 4}, {.iov_base = dest, .iov_len = length}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    uint64_t done = 0, total = 4 + (uint64_t)length;
    /* What has arrived is taken without waiting (all of it, as a rule, so no timeout is set
     * for it); only a wait for the rest is bounded. */
    int waiting = 0;
    while (done < total) {
        ssize_t n = waiting ? receive_by(c, &msg, 0, deadline)
                            : recvmsg(c->sock, &msg, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (waiting)
                return 3;
            waiting = *waited = 1;
            continue;
        }
        if (n <= 0)
            return n == 0 ? 0 : -1;
        done += (uint64_t)n;
        iov_advance(&msg, (uint64_t)n);
    }
    return 1;
}

/* Fill the buffer from the file.  1: done; 0: Python's (an error, a short file, or the disk
 * would be waited for while other calls are queued behind this one). */
static int read_data(struct nfs_fast_conn *c, int fd, uint8_t *data, uint32_t count,
                     uint64_t offset, uint32_t record_len)
{
    ssize_t got = read_cached(fd, data, count, offset);
    if (got == (ssize_t)count)
        return 1;
    if (got < 0 && errno != EAGAIN && errno != EOPNOTSUPP && errno != EINVAL)
        return 0;
    if (more_than(c, 4 + record_len))
        return 0; /* a worker waits for the disk; the loop goes on with the rest */
    return read_rest(fd, data, got > 0 ? (uint32_t)got : 0, count, offset);
}

/* The RPC reply header up to the procedure's status, behind the fragment header. */
static uint32_t reply_head(uint8_t *out, uint32_t xid)
{
    put32(out + 4, xid);
    put32(out + 8, RPC_REPLY);
    put32(out + 12, MSG_ACCEPTED);
    put32(out + 16, AUTH_NONE);
    put32(out + 20, 0);
    put32(out + 24, SUCCESS);
    return 28;
}

static const uint8_t zeros[4];

/* Send c->reply, then `data` and its XDR padding. 1 sent; 0 PARTIAL; -1 error. */
static int send_reply(struct nfs_fast_conn *c, uint8_t *data, uint32_t data_len)
{
    uint32_t pad = padded(data_len) - data_len;
    struct iovec iov[3] = {
        {.iov_base = c->reply, .iov_len = c->reply_len},
        {.iov_base = data, .iov_len = data_len},
        {.iov_base = (void *)zeros, .iov_len = pad},
    };
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = data_len ? (pad ? 3 : 2) : 1};
    uint64_t total = (uint64_t)c->reply_len + data_len + pad;
    put32(c->reply, LAST_FRAGMENT | (uint32_t)(total - 4));
    int r = send_gate_sendmsg(c->gate, c->sock, &msg, total, &c->sent);
    if (r != 0 || c->sent == 0)
        return r;
    /* Part of it is out (a large READ reply the socket buffer could not take at once):
     * the rest follows from here while the client keeps reading, rather than by a hand-over
     * to Python's sender for every large reply. */
    int backlog = 0;
    iov_advance(&msg, c->sent);
    r = send_gate_finish(c->gate, c->sock, &msg, total, &c->sent, FINISH_WAIT_MS, &backlog);
    if (r == 1 && backlog)
        c->flush = 1;
    return r;
}

void nfs_fast_void_handles(struct nfs_fast_swap *swap)
{
    __atomic_add_fetch(&swap->epoch, 1, __ATOMIC_SEQ_CST);
}

int64_t nfs_fast_writers(struct nfs_fast_swap *swap)
{
    return __atomic_load_n(&swap->writers, __ATOMIC_SEQ_CST);
}

/* Write a WRITE's data and make it as durable as asked, if its handle is still good: a scrub
 * may have begun since servable() looked (the record's body came in meanwhile, as slowly as
 * the client liked).  1: written, st filled; 0: failed (Python runs it again); 2: voided. */
static int write_data(struct nfs_fast_conn *c, const struct call *call, const uint8_t *data,
                      struct stat *st)
{
    int fd = call->handle->fd;
    __atomic_add_fetch(&c->swap->writers, 1, __ATOMIC_SEQ_CST);
    int r = 1;
    if (call->handle->kind == NFS_FAST_SWAP_FILE
            && __atomic_load_n(&c->swap->epoch, __ATOMIC_SEQ_CST) != call->handle->epoch) {
        r = 2;
        goto out;
    }
    uint32_t done = 0;
    while (done < call->count) {
        ssize_t n = pwrite(fd, data + done, call->count - done, (off_t)(call->offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            r = 0;
            goto out;
        }
        done += (uint32_t)n;
    }
    if ((call->stable != 0 && fdatasync(fd) < 0) || fstat(fd, st) < 0)
        r = 0;
out:
    __atomic_sub_fetch(&c->swap->writers, 1, __ATOMIC_SEQ_CST);
    return r;
}

int nfs_fast_serve(struct nfs_fast_conn *c)
{
    uint8_t *arena = pool_base(c->pool);
    uint8_t peeked[PEEK_MAX];
    for (;;) {
        uint32_t have = 0, length = 0;
        int64_t deadline = 0;
        int r = peek_record(c, peeked, &have, &length, &deadline);
        if (r != 1) {
            c->error = errno;
            return r == 0 ? NFS_FAST_CLOSED : r < 0 ? NFS_FAST_SOCKET_ERROR
                : r == 3 ? NFS_FAST_RECORD_TIMEOUT : NFS_FAST_FALLBACK;
        }
        struct call call = {0};
        if (!servable(c, peeked + 4, length, have, &call))
            return NFS_FAST_FALLBACK;
        int scratch = call.handle->kind == NFS_FAST_SCRATCH_FILE;
        int64_t started = now_ns();
        int fd = call.handle->fd;
        struct stat st;
        uint32_t count = 0, head = 0;
        /* A READ's data starts on a page of its own, after the record: page-aligned reads
         * and sends copy fastest. */
        uint32_t data_offset = (length + POOL_BLOCK_SIZE - 1) & ~(uint32_t)(POOL_BLOCK_SIZE - 1);
        if (call.proc == PROC_READ) {
            /* As nfs3._read: the count capped at max_io, then at the end of the file, whose
             * attributes (taken before the read) go in the reply. */
            if (fstat(fd, &st) < 0)
                return NFS_FAST_FALLBACK;
            uint64_t size = (uint64_t)st.st_size;
            count = call.count < c->max_io ? call.count : c->max_io;
            if (call.offset >= size)
                count = 0;
            else if (count > size - call.offset)
                count = (uint32_t)(size - call.offset);
            head = reply_head(c->reply, call.xid);
            put32(c->reply + head, NFS3_OK);
            put32(c->reply + head + 4, 1);
            if (!fattr3(c->reply + head + 8, &st, call.handle))
                return NFS_FAST_FALLBACK;
            head += 8 + FATTR3_SIZE;
            put32(c->reply + head, count);
            put32(c->reply + head + 4, call.offset + count >= size);
            put32(c->reply + head + 8, count);
            c->reply_len = head + 12;
            c->block_len = count ? data_offset + count : length;
        } else {
            /* A stable WRITE's fdatasync would hold up the calls queued behind it: those
             * go to the workers, in parallel, as Python sends them. */
            if (call.stable != 0 && more_than(c, 4 + length))
                return NFS_FAST_FALLBACK;
            c->block_len = length;
        }
        /* Normal memory only, never a reserve: without it the call is Python's, which waits
         * for memory, or takes a node's reserve (and answers a non-swap call JUKEBOX). */
        int64_t block = pool_alloc(c->pool, c->block_len, 0, -1, 0, NULL);
        if (block < 0)
            return NFS_FAST_FALLBACK;
        uint8_t *mem = arena + block;
        if (call.proc == PROC_READ && count
                && !read_data(c, fd, mem + data_offset, count, call.offset, length)) {
            pool_free(c->pool, block);
            return NFS_FAST_FALLBACK;
        }
        /* Decided: the record is ours. */
        int waited = 0;
        r = consume_record(c, mem, length, deadline, &waited);
        if (r != 1) {
            c->error = errno;
            pool_free(c->pool, block);
            return r == 0 ? NFS_FAST_RECORD_CUT : r == 3 ? NFS_FAST_RECORD_TIMEOUT
                : NFS_FAST_SOCKET_ERROR;
        }
        if (!scratch) /* the node's idle clock counts its swap-file calls only */
            __atomic_store_n(&c->node->last_io_ns, now_ns(), __ATOMIC_RELAXED);
        c->block = block;
        c->record_len = length;
        c->proc = call.proc;
        c->started_ns = started;
        if (call.proc == PROC_WRITE) {
            /* The path was checked when the record was peeked at; if its body then came in
             * slowly, the file may have left its path meanwhile (as long as the client
             * liked): checked again, as Python resolves a handle once a record is in. */
            if (scratch && waited && !scratch_still_there(c, call.handle))
                return NFS_FAST_MOVED;
            r = write_data(c, &call, mem + call.data_pos, &st);
            if (r != 1) /* Python runs it again and answers the error, or STALE */
                return r == 2 ? NFS_FAST_VOIDED : NFS_FAST_HANDOFF;
            head = reply_head(c->reply, call.xid);
            put32(c->reply + head, NFS3_OK);
            put32(c->reply + head + 4, 0); /* no pre-operation attributes */
            put32(c->reply + head + 8, 1);
            if (!fattr3(c->reply + head + 12, &st, call.handle))
                return NFS_FAST_HANDOFF;
            head += 12 + FATTR3_SIZE;
            put32(c->reply + head, call.count);
            put32(c->reply + head + 4, call.stable); /* committed: what was asked, and done */
            memcpy(c->reply + head + 8, c->verifier, 8);
            c->reply_len = head + 16;
        }
        c->data_offset = data_offset;
        c->data_len = call.proc == PROC_READ ? count : 0;
        c->bytes = call.proc == PROC_READ ? count : call.count;
        /* Counted before the reply goes out: a client that reads it, then the metrics,
         * sees the call counted. */
        if (scratch)
            c->scratch_calls[call.proc == PROC_READ ? OP_READ : OP_WRITE]++;
        r = send_reply(c, mem + data_offset, c->data_len);
        if (r == 0)
            return NFS_FAST_PARTIAL; /* Python's sender finishes it, then frees the block */
        pool_free(c->pool, block);
        if (r < 0) {
            c->error = errno;
            return NFS_FAST_SOCKET_ERROR;
        }
        account(&c->stats[call.proc == PROC_READ ? OP_READ : OP_WRITE], c->bounds_ns, c->bytes,
                started);
        if (c->flush) {
            c->flush = 0;
            return NFS_FAST_FLUSH; /* Python queued replies while this one went out */
        }
    }
}
