/*
 * Where a C request loop's thread runs: next to the CPU that receives its client's packets,
 * while the client sends one request at a time.
 *
 * Why: a client at queue depth 1 (a node faulting one page, fio at iodepth=1) and the loop
 * serving it take turns; when the kernel wakes the loop on another CPU than the one whose
 * softirq just queued the request, each turn pays two cross-CPU wake-ups, and a halted CPU
 * (a VM's vCPU above all) takes tens of microseconds to wake. Measured on the 2-core VM
 * here (bench/fio_matrix.py's QD1 rows, bench/RESULTS.md): 4 KiB reads at QD1, 8-12 k IOPS
 * with the loop on the other CPU, 36-38 k with it on the CPU that receives.
 * SO_INCOMING_CPU says which CPU the latest segment of the socket was received on: the NIC
 * queue's interrupt CPU on a real network, the sender's own CPU on loopback.
 *
 * The loop counts the requests it serves between two waits for the socket. Only after
 * PLACEMENT_SPARSE_WAITS waits in a row that each followed one request does it move its
 * thread to the receiving CPU (within the CPUs it was allowed at the start); the first wait
 * after two or more requests (a queue formed: parallelism is worth more than locality) moves
 * it back to all of them. While it sits on one CPU it reads its own scheduler statistics
 * every PLACEMENT_CHECK_NS: if it waited on that CPU's run queue more than
 * PLACEMENT_CROWDED_NS per turn on average (about what a cross-CPU wake-up costs, so the
 * placement no longer pays), it moves back and stays free for PLACEMENT_BACKOFF_NS. So a
 * busy CPU (one NIC queue taking every node's interrupts, say) is never made busier by it.
 *
 * The state lives in the loop's connection (Python allocates it zeroed, and sets `enabled`);
 * the counters are read by the metrics scrape.
 */
#ifndef NETSWAP_PLACEMENT_H
#define NETSWAP_PLACEMENT_H

#include <stdint.h>

#define PLACEMENT_MASK_WORDS 16 /* CPUs 0-1023 */

struct placement {
    int enabled;               /* set by Python: nbd.follow_receiving_cpu */
    int cpu;                   /* the CPU the thread is held on, -1: free (valid once ready) */
    int ready;                 /* cpu and home are initialised (at the first wait) */
    int sparse_waits;          /* waits in a row that followed at most one request */
    int64_t check_due_ns;
    int64_t free_until_ns;     /* crowded: no placement before this */
    uint64_t run_delay_ns;     /* the thread's schedstat at the last check */
    uint64_t turns;
    uint64_t home[PLACEMENT_MASK_WORDS]; /* the CPUs the thread was allowed at the start */
    /* Counters (one writer, the loop's thread; read whole by the scrape). */
    uint64_t moves;            /* moved to a receiving CPU */
    uint64_t releases;         /* moved back to every CPU because a queue formed */
    uint64_t crowded;          /* moved back because it waited too long on its CPU */
};

#ifndef NETSWAP_CDEF
/* Before blocking for the next request with nothing buffered, having served `served`
 * requests since the last wait (the loop counts them: nbd_fast_conn.served_since_wait). */
void placement_before_wait(struct placement *p, int sock, uint32_t served);
#endif /* NETSWAP_CDEF */

#endif /* NETSWAP_PLACEMENT_H */
