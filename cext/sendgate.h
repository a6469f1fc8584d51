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

#endif /* NETSWAP_SENDGATE_H */
