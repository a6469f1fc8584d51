/*
 * The send gate: who may write to a connection's socket.
 *
 * Replies leave from a C request loop (nbdfast.c, nfsfast.c, on the reader
 * thread) and from Python (workers, the send poller) at the same time; each
 * reply must go out whole, and once part of one is on the wire its rest must
 * come next.  Python's ReplySender (transport/sender.py) takes the gate as its
 * lock, and tells it on release whether replies are queued (backlog); a C loop
 * sends only when nothing is queued, under the gate, and when the socket takes
 * only part of its reply it marks the gate (c_partial) so that no one sends
 * before Python has put the rest at the head of its queue.
 *
 * The first part is the cffi interface (Python's side); the part between
 * "#ifndef NETSWAP_CDEF" and its #endif is for the C loops only (build_pool.py
 * leaves it out of the cdef).
 */
#ifndef NETSWAP_SENDGATE_H
#define NETSWAP_SENDGATE_H

struct send_gate;

struct send_gate *send_gate_new(void);
void send_gate_free(struct send_gate *gate);
/* Lock; returns 1 if a C loop's partly sent reply waits to be taken over. */
int send_gate_acquire(struct send_gate *gate);
/* Unlock, saying whether Python has replies queued and whether it took over the C loop's
 * partly sent reply. */
void send_gate_release(struct send_gate *gate, int backlog, int took_partial);

#ifndef NETSWAP_CDEF
#include <stdint.h>
#include <sys/socket.h>

/* Send `msg` (`total` bytes) without blocking, if nothing of Python's is queued.
 * 1: all sent; 0: not or partly sent (*sent says how much; part sent marks the
 * gate so that its rest goes next); -1: the socket failed (errno). */
int send_gate_sendmsg(struct send_gate *gate, int sock, struct msghdr *msg, uint64_t total,
                      uint64_t *sent);

/* Send the rest of a reply send_gate_sendmsg sent only part of (`msg` already moved past
 * the *sent bytes of `total`): the gate is marked, so no one else sends meanwhile.  Waits
 * up to `wait_ms` at a time for the socket to take more.  1: all sent and the mark lifted
 * (*backlog: Python queued replies meanwhile; its sender must be told to send them);
 * 0: no progress within wait_ms (still marked: Python takes the rest over); -1: the socket
 * failed (errno). */
int send_gate_finish(struct send_gate *gate, int sock, struct msghdr *msg, uint64_t total,
                     uint64_t *sent, int wait_ms, int *backlog);

/* Move `msg`'s iovecs past `count` bytes (and past empty ones at the front). */
void iov_advance(struct msghdr *msg, uint64_t count);
#endif /* NETSWAP_CDEF */

#endif /* NETSWAP_SENDGATE_H */
