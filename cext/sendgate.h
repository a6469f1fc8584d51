/* The send gate's one C entry point that both request loops use (nbdfast.c,
 * nfsfast.c); internal, not part of the cffi interface. */
#ifndef NETSWAP_SENDGATE_H
#define NETSWAP_SENDGATE_H

#include <stdint.h>
#include <sys/socket.h>

struct nbd_send_gate;

/* Send `msg` (`total` bytes) without blocking, if nothing of Python's is queued.
 * 1: all sent; 0: not or partly sent (*sent says how much; part sent marks the
 * gate so that its rest goes next); -1: the socket failed (errno). */
int nbd_gate_sendmsg(struct nbd_send_gate *gate, int sock, struct msghdr *msg, uint64_t total,
                     uint64_t *sent);

/* Send the rest of a reply nbd_gate_sendmsg sent only part of (`msg` already moved past
 * the *sent bytes of `total`): the gate is marked, so no one else sends meanwhile.  Waits
 * up to `wait_ms` at a time for the socket to take more.  1: all sent and the mark lifted
 * (*backlog: Python queued replies meanwhile; its sender must be told to send them);
 * 0: no progress within wait_ms (still marked: Python takes the rest over); -1: the socket
 * failed (errno). */
int nbd_gate_finish(struct nbd_send_gate *gate, int sock, struct msghdr *msg, uint64_t total,
                    uint64_t *sent, int wait_ms, int *backlog);

/* Move `msg`'s iovecs past `count` bytes. */
void iov_advance(struct msghdr *msg, uint64_t count);

#endif /* NETSWAP_SENDGATE_H */
