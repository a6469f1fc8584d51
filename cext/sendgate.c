/* The send gate that Python's ReplySender and the C request loops share; see sendgate.h. */
#define _GNU_SOURCE
#include "sendgate.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>

struct send_gate {
    pthread_mutex_t mutex;
    int backlog;   /* Python has replies queued: they go first */
    int c_partial; /* the loop sent part of a reply; Python has not taken it over yet */
};

struct send_gate *send_gate_new(void)
{
    struct send_gate *gate = calloc(1, sizeof *gate);
    if (gate != NULL)
        pthread_mutex_init(&gate->mutex, NULL);
    return gate;
}

void send_gate_free(struct send_gate *gate)
{
    if (gate != NULL) {
        pthread_mutex_destroy(&gate->mutex);
        free(gate);
    }
}

int send_gate_acquire(struct send_gate *gate)
{
    pthread_mutex_lock(&gate->mutex);
    return gate->c_partial;
}

void send_gate_release(struct send_gate *gate, int backlog, int took_partial)
{
    gate->backlog = backlog;
    if (took_partial)
        gate->c_partial = 0;
    pthread_mutex_unlock(&gate->mutex);
}

int send_gate_sendmsg(struct send_gate *gate, int sock, struct msghdr *msg, uint64_t total,
                      uint64_t *sent)
{
    int result;
    *sent = 0;
    pthread_mutex_lock(&gate->mutex);
    if (gate->backlog || gate->c_partial) {
        result = 0; /* queued replies go first: Python queues this one behind them */
    } else {
        ssize_t n;
        do {
            n = sendmsg(sock, msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
            result = errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        } else {
            *sent = (uint64_t)n;
            result = *sent == total ? 1 : 0;
            if (!result && n > 0)
                gate->c_partial = 1; /* its rest must be next on the wire */
        }
    }
    int saved = errno;
    pthread_mutex_unlock(&gate->mutex);
    errno = saved;
    return result;
}

void iov_advance(struct msghdr *msg, uint64_t count)
{
    while (msg->msg_iovlen && (count || msg->msg_iov->iov_len == 0)) {
        size_t step = count < msg->msg_iov->iov_len ? (size_t)count : msg->msg_iov->iov_len;
        msg->msg_iov->iov_base = (uint8_t *)msg->msg_iov->iov_base + step;
        msg->msg_iov->iov_len -= step;
        count -= step;
        if (msg->msg_iov->iov_len)
            break;
        msg->msg_iov++;
        msg->msg_iovlen--;
    }
}

int send_gate_finish(struct send_gate *gate, int sock, struct msghdr *msg, uint64_t total,
                     uint64_t *sent, int wait_ms, int *backlog)
{
    while (*sent < total) {
        struct pollfd p = {.fd = sock, .events = POLLOUT};
        int ready = poll(&p, 1, wait_ms);
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready < 0)
            break;
        if (ready == 0)
            return 0; /* a client slow to read: Python's sender waits for it, with its timeout */
        /* The mark keeps everyone else off the socket: no need to hold the gate here. */
        ssize_t n = sendmsg(sock, msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                continue;
            break;
        }
        *sent += (uint64_t)n;
        iov_advance(msg, (uint64_t)n);
    }
    /* Done, or the socket failed: either way no rest of this reply is owed (a dead socket
     * must not keep Python's replies waiting behind the mark: they fail and complete). */
    int saved = errno, done = *sent == total;
    pthread_mutex_lock(&gate->mutex);
    gate->c_partial = 0;
    *backlog = gate->backlog;
    pthread_mutex_unlock(&gate->mutex);
    errno = saved;
    return done ? 1 : -1;
}
