/* netswap's NBD request loop for plain READ and WRITE; see nbdfast.h. */
#define _GNU_SOURCE
#include "nbdfast.h"
#include "fastloop.h"
#include "pool.h"
#include "sendgate.h"

#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

/* Wire constants (the NBD spec, doc/proto.md); the Python side has the same in nbd/constants.py. */
#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668e33efu
#define REPLY_FLAG_DONE 1
#define REPLY_TYPE_NONE 0
#define REPLY_TYPE_OFFSET_DATA 1
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_FLUSH 3
#define CMD_FLAG_FUA 1
#define HEADER_SIZE 28

enum { OP_READ = 0, OP_WRITE = 1, OP_FLUSH = 2 };
#define FLUSHES_QUEUED 64 /* a connection's FLUSHes at the flushers at once, at most */

static void put16(uint8_t *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

/* The reply header for a successful request, as transmission.reply_header makes it. */
static uint32_t reply_header(struct nbd_fast_conn *c, uint8_t *out)
{
    if (!c->structured) {
        put32(out, SIMPLE_REPLY_MAGIC);
        put32(out + 4, 0);
        put64(out + 8, c->cookie);
        return 16;
    }
    put32(out, STRUCTURED_REPLY_MAGIC);
    put16(out + 4, REPLY_FLAG_DONE);
    put64(out + 8, c->cookie);
    if (c->command == CMD_READ) {
        put16(out + 6, REPLY_TYPE_OFFSET_DATA);
        put32(out + 16, 8 + c->length);
        put64(out + 20, c->offset);
        return 28;
    }
    put16(out + 6, REPLY_TYPE_NONE);
    put32(out + 16, 0);
    return 20;
}

/* Before blocking in recv while FLUSHes are at the flushers: wait for the socket or an
 * answered FLUSH.  1: the socket is readable (or poll failed: recv says why); 0: a FLUSH
 * came back. */
static int socket_first(struct nbd_fast_conn *c)
{
    if (c->flushes == NULL || !flush_queue_outstanding(c->flushes))
        return 1;
    struct pollfd fds[2] = {
        {.fd = c->sock, .events = POLLIN},
        {.fd = flush_queue_fd(c->flushes), .events = POLLIN},
    };
    for (;;) {
        int ready = poll(fds, 2, -1);
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready < 0 || fds[0].revents)
            return 1;
        return 0;
    }
}

/* Waiting for the next request with nothing buffered, the loop polls (recv without
 * blocking) for up to REQUEST_POLL_NS before it sleeps, when the client looks like one that
 * sends a request as soon as it has the last reply: the loop served one request since its
 * last wait, and that wait took at most REQUEST_POLL_RECENT_NS.  Sleeping costs such a
 * client a wake-up per request (an idle CPU's, 30-40 us on this VM, most of a 4 KiB
 * request's round trip); the poll spends about that CPU instead: measured (bench/RESULTS.md)
 * 4 KiB QD1 reads went from ~0.9x to 1.6-2.9x nbdkit, writes to 1.1-1.5x.  A node that sends
 * now and then (its last wait was long), or a queue (more than one request per wait, no
 * wait at all while requests are buffered), never polls, so idle nodes cost no CPU, and a
 * poll that loses costs at most REQUEST_POLL_NS. */
#define REQUEST_POLL_NS 30000
#define REQUEST_POLL_RECENT_NS 150000 /* a lost poll plus a sleep and a wake-up: still soon */

/* recv() into dest[:length], first without blocking for up to `poll_ns` (0: none), then
 * blocking with `flags`.  *polled: 1 if it polled, 2 if something (data, EOF or an error)
 * came while it did, else 0. */
static ssize_t recv_polling(int sock, uint8_t *dest, size_t length, int64_t poll_ns,
                            int flags, int *polled)
{
    *polled = 0;
    if (poll_ns > 0) {
        *polled = 1;
        int64_t deadline = now_ns() + poll_ns;
        do {
            ssize_t got = recv(sock, dest, length, MSG_DONTWAIT);
            if (got >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
                *polled = 2;
                return got;
            }
        } while (now_ns() < deadline);
    }
    return recv(sock, dest, length, flags);
}

static ssize_t recv_request(struct nbd_fast_conn *c, uint8_t *dest, size_t length)
{
    int waiting = c->start == c->end; /* for a new request, not for the rest of a header */
    int64_t began = now_ns();
    int soon = waiting && c->served_since_wait == 1 && c->last_gap_ns > 0
               && c->last_gap_ns <= REQUEST_POLL_RECENT_NS;
    int polled;
    ssize_t got = recv_polling(c->sock, dest, length, soon ? REQUEST_POLL_NS : 0, 0, &polled);
    if (polled == 2)
        BUMP(c->polls_won, 1);
    else if (polled == 1)
        BUMP(c->polls_lost, 1);
    if (waiting) {
        /* Only a wait that followed a reply says how soon the client comes back (not the
         * first after the handshake, or after Python served what came before). */
        int64_t gap = now_ns() - began;
        c->last_gap_ns = c->served_since_wait == 0 ? 0 : gap > 0 ? gap : 1;
        c->served_since_wait = 0;
    }
    return got;
}

/* Receive until a whole header is buffered.  Returns 1, or 0 on EOF, or -1 (errno), or 2:
 * a FLUSH came back from the flushers, to be answered first. */
static int fill_header(struct nbd_fast_conn *c)
{
    while (c->end - c->start < HEADER_SIZE) {
        if (c->start == c->end) {
            c->start = c->end = 0;
            placement_before_wait(&c->placement, c->sock, c->served_since_wait);
        } else if (c->window_size - c->end < HEADER_SIZE) {
            /* Slide the partial header to the front so that a whole one fits. */
            uint32_t count = c->end - c->start;
            memmove(c->window, c->window + c->start, count);
            c->start = 0;
            c->end = count;
        }
        if (!socket_first(c))
            return 2;
        ssize_t got = recv_request(c, c->window + c->end, c->window_size - c->end);
        if (got > 0) {
            c->end += (uint32_t)got;
        } else if (got == 0) {
            return 0;
        } else if (errno != EINTR) {
            return -1;
        }
    }
    return 1;
}

/* Is the request at window[start] one this loop may serve?  Every refusal the
 * spec asks for (and every flag) is left to Python, which answers it. */
static int servable(struct nbd_fast_conn *c, const uint8_t *h)
{
    if (get32(h) != REQUEST_MAGIC)
        return 0;
    uint16_t flags = get16(h + 4);
    uint16_t command = get16(h + 6);
    if (command == CMD_FLUSH) {
        /* FUA is allowed on any command and means nothing on a FLUSH; offset and length
         * are reserved and ignored (transmission.refusal does the same).  A read-only
         * export's FLUSH needs no sync and a failed backend's gets EIO: Python answers. */
        return (flags & ~CMD_FLAG_FUA) == 0 && !c->read_only
               && __atomic_load_n(c->backend_ok, __ATOMIC_RELAXED)
               && __atomic_load_n(c->run_ok, __ATOMIC_RELAXED);
    }
    if (flags != 0)
        return 0;
    uint64_t offset = get64(h + 16);
    uint32_t length = get32(h + 24);
    if (command == CMD_READ) {
        if (c->reads_may_wait)
            return 0;
    } else if (command == CMD_WRITE) {
        if (c->read_only || !__atomic_load_n(c->backend_ok, __ATOMIC_RELAXED))
            return 0;
    } else {
        return 0;
    }
    if (!__atomic_load_n(c->run_ok, __ATOMIC_RELAXED))
        return 0;
    if (length == 0 || length > c->max_payload)
        return 0;
    if (offset % c->min_block || length % c->min_block)
        return 0;
    if (offset > c->export_size || length > c->export_size - offset)
        return 0;
    return 1;
}

/* The rest of a WRITE payload is polled for (recv_polling) for up to PAYLOAD_POLL_NS
 * before the loop sleeps: the client is in the middle of sending it, so it is on its way,
 * and a loop asleep in a payload has to be woken by the client's CPU (which runs loopback's,
 * or a fast NIC's, receive path) for every segment.  Measured on 128 KiB writes at QD8
 * (bench/RESULTS.md): ~10 % more writes at a fifth more server CPU per write. */
#define PAYLOAD_POLL_NS 20000

/* Receive the rest of a WRITE payload (its buffered part is copied already). */
static int recv_payload(struct nbd_fast_conn *c, uint8_t *dest, uint32_t have, uint32_t length)
{
    while (have < length) {
        int polled;
        ssize_t got = recv_polling(c->sock, dest + have, length - have, PAYLOAD_POLL_NS,
                                   MSG_WAITALL, &polled);
        if (got > 0)
            have += (uint32_t)got;
        else if (got == 0)
            return 0;
        else if (errno != EINTR)
            return -1;
    }
    return 1;
}

/* Send header + data without blocking.  1: all sent; 0: partly (c->sent says
 * how much); -1: the socket failed (errno). */
static int send_reply(struct nbd_fast_conn *c, uint8_t *data, uint32_t data_len)
{
    struct iovec iov[2] = {
        {.iov_base = c->reply, .iov_len = c->reply_len},
        {.iov_base = data, .iov_len = data_len},
    };
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = data_len ? 2 : 1};
    return send_gate_sendmsg(c->gate, c->sock, &msg, (uint64_t)c->reply_len + data_len, &c->sent);
}

/* Read a READ's data.  1: done; 0: leave it to a worker (which also reports errors). */
static int read_block(struct nbd_fast_conn *c, uint8_t *data, uint32_t length)
{
    ssize_t got = read_cached(c->fd, data, length, c->offset);
    if (got == (ssize_t)length)
        return 1;
    if (got < 0 && errno != EAGAIN) {
        if (errno == EOPNOTSUPP || errno == EINVAL)
            c->reads_may_wait = 1; /* no RWF_NOWAIT here: every READ goes to the workers */
        return 0;
    }
    /* Not all in the page cache.  With more requests buffered behind this one, a worker
     * waits for the disk while the loop serves them.  With none, the client is waiting
     * for this reply alone (QD1, a page fault): reading here is the quickest answer. */
    if (c->end - c->start > HEADER_SIZE)
        return 0;
    return read_rest(c->fd, data, got > 0 ? (uint32_t)got : 0, length, c->offset);
}

/* Is the file we sync still the one at the backend's path?  Python's _check_identity's
 * three cases (deleted, renamed away, replaced), checked after every FLUSH's sync here as
 * Python does after each of its syncs: a FLUSH promises the data survives a restart, which
 * opens the path, so it must not be acknowledged once the file there is another.  The
 * check stays in C rather than at Python's interval: two stats per FLUSH cost little next
 * to its sync, and a FLUSH acknowledged just after the file went would be a lie.  Any
 * doubt (a stat failing) goes to Python, which decides and logs. */
static int same_file(struct nbd_fast_conn *c)
{
    struct stat st;
    if (fstat(c->fd, &st) < 0 || st.st_nlink == 0)
        return 0;
    int r = c->follow_symlinks ? stat(c->path, &st) : lstat(c->path, &st);
    return r == 0 && (uint64_t)st.st_dev == c->file_dev && (uint64_t)st.st_ino == c->file_ino;
}

/* A FLUSH (the fields describe it) whose commit_sync gave `result` (errno `error`): its
 * reply, or the reason to hand it to Python.  An NBD_FAST_* reason, or -1 to go on. */
static int finish_flush(struct nbd_fast_conn *c, int result, int error)
{
    if (result < 0) {
        c->error = error;
        return NBD_FAST_SYNC_FAILED;
    }
    if (!same_file(c))
        return NBD_FAST_RECHECK;
    c->reply_len = reply_header(c, c->reply);
    int r = send_reply(c, NULL, 0);
    if (r == 0)
        return NBD_FAST_PARTIAL;
    if (r < 0) {
        c->error = errno;
        return NBD_FAST_SOCKET_ERROR; /* the client left while its FLUSH synced */
    }
    /* Python counts a FLUSH's (reserved) length as its bytes; so does this. */
    account(&c->stats[OP_FLUSH], c->bounds_ns, c->length, c->started_ns);
    c->served_since_wait++;
    return -1;
}

static void describe_flush(struct nbd_fast_conn *c, uint16_t flags, uint64_t cookie,
                           uint64_t offset, uint32_t length, int64_t started)
{
    c->command = CMD_FLUSH;
    c->flags = flags;
    c->cookie = cookie;
    c->offset = offset;
    c->length = length;
    c->started_ns = started;
    c->block = -1;
    c->emergency = 0;
}

/* Take the FLUSH at window[start]: to the flushers, or synced here.  An NBD_FAST_* reason
 * to stop for, or -1 to go on. */
static int serve_flush(struct nbd_fast_conn *c, const uint8_t *h, int64_t started)
{
    describe_flush(c, get16(h + 4), get64(h + 8), get64(h + 16), get32(h + 24), started);
    c->start += HEADER_SIZE;
    if (c->flushes == NULL)
        c->flushes = flush_queue_new(); /* at the first FLUSH: swap connections never send one */
    if (c->flushes != NULL && flush_queue_outstanding(c->flushes) < FLUSHES_QUEUED) {
        struct flush_job *job = calloc(1, sizeof *job);
        if (job != NULL) {
            job->queue = c->flushes;
            job->fd = c->fd;
            job->flags = c->flags;
            job->cookie = c->cookie;
            job->offset = c->offset;
            job->length = c->length;
            job->started_ns = started;
            if (commit_submit(c->commit, job) == 0)
                return -1;
            free(job);
        }
    }
    int result = commit_sync(c->commit, c->fd);
    return finish_flush(c, result, result < 0 ? errno : 0);
}

/* Reply to the FLUSHes the flushers gave back.  An NBD_FAST_* reason to stop for (the
 * fields describe that FLUSH), or -1 to go on. */
static int answer_flushes(struct nbd_fast_conn *c)
{
    if (c->flushes == NULL || !flush_queue_outstanding(c->flushes))
        return -1;
    struct flush_job *job;
    while ((job = flush_queue_take(c->flushes)) != NULL) {
        describe_flush(c, job->flags, job->cookie, job->offset, job->length, job->started_ns);
        int r = finish_flush(c, job->result, job->error);
        free(job);
        if (r >= 0)
            return r;
    }
    return -1;
}

static int64_t alloc_block(struct nbd_fast_conn *c, uint32_t length)
{
    int emergency = 0;
    int64_t block = pool_alloc(c->pool, length, c->alloc_flags, c->group, 0,
                               c->alloc_flags ? &emergency : NULL);
    c->emergency = emergency;
    return block;
}

int nbd_fast_serve(struct nbd_fast_conn *c)
{
    uint8_t *arena = pool_base(c->pool);
    for (;;) {
        int r = answer_flushes(c);
        if (r >= 0)
            return r;
        r = fill_header(c);
        if (r == 2)
            continue;
        if (r == 0 && c->flushes != NULL && flush_queue_outstanding(c->flushes)) {
            /* The client shut its side after its last requests: it still reads their
             * replies (the spec allows it), so the FLUSHes at the flushers are answered
             * before the loop reports the close. */
            struct pollfd answered = {.fd = flush_queue_fd(c->flushes), .events = POLLIN};
            while (poll(&answered, 1, -1) < 0 && errno == EINTR)
                ;
            continue;
        }
        if (r <= 0) {
            c->error = errno;
            return r == 0 ? NBD_FAST_CLOSED : NBD_FAST_SOCKET_ERROR;
        }
        const uint8_t *h = c->window + c->start;
        if (!servable(c, h))
            return NBD_FAST_FALLBACK;
        int64_t started = now_ns();
        uint16_t command = get16(h + 6);
        if (command == CMD_FLUSH) {
            r = serve_flush(c, h, started);
            if (r >= 0)
                return r;
            continue;
        }
        uint32_t length = get32(h + 24);
        int64_t block = alloc_block(c, length);
        if (block < 0)
            return NBD_FAST_FALLBACK; /* Python waits for the pool, or refuses */
        uint8_t *data = arena + block;
        c->command = command;
        c->flags = 0;
        c->cookie = get64(h + 8);
        c->offset = get64(h + 16);
        c->length = length;
        c->started_ns = started;
        c->block = block;

        if (command == CMD_READ) {
            if (!read_block(c, data, length)) {
                pool_free(c->pool, block);
                return NBD_FAST_FALLBACK;
            }
            c->start += HEADER_SIZE;
        } else {
            c->start += HEADER_SIZE;
            uint32_t have = c->end - c->start;
            if (have > length)
                have = length;
            memcpy(data, c->window + c->start, have);
            c->start += have;
            r = recv_payload(c, data, have, length);
            if (r <= 0) {
                c->error = errno;
                pool_free(c->pool, block);
                return r == 0 ? NBD_FAST_PAYLOAD_CUT : NBD_FAST_SOCKET_ERROR;
            }
            uint32_t done = 0;
            while (done < length) {
                ssize_t n = pwrite(c->fd, data + done, length - done, (off_t)(c->offset + done));
                if (n < 0) {
                    if (errno == EINTR)
                        continue;
                    c->error = errno;
                    return NBD_FAST_WRITE_ERROR; /* Python owns the block now */
                }
                done += (uint32_t)n;
            }
            /* Before the reply: a FLUSH that follows it must find the backend dirty. Loaded
             * first so that connections writing at once do not bounce its cache line. */
            if (!__atomic_load_n(c->dirty, __ATOMIC_RELAXED))
                __atomic_store_n(c->dirty, 1, __ATOMIC_RELEASE);
        }

        c->reply_len = reply_header(c, c->reply);
        uint32_t data_len = command == CMD_READ ? length : 0;
        r = send_reply(c, data, data_len);
        if (r == 0)
            return NBD_FAST_PARTIAL; /* Python's sender finishes it, then frees the block */
        pool_free(c->pool, block);
        if (r < 0) {
            c->error = errno;
            return NBD_FAST_SOCKET_ERROR;
        }
        account(&c->stats[command == CMD_READ ? OP_READ : OP_WRITE], c->bounds_ns, length,
                started);
        c->served_since_wait++;
        if (command == CMD_WRITE && now_ns() >= c->check_due_ns)
            return NBD_FAST_CHECK;
    }
}
