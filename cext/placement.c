/* A C request loop's thread placement; see placement.h. */
#define _GNU_SOURCE
#include "placement.h"
#include "fastloop.h"

#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef SO_INCOMING_CPU
#define SO_INCOMING_CPU 49
#endif

#define PLACEMENT_SPARSE_WAITS 8
#define PLACEMENT_CHECK_NS 100000000LL    /* 100 ms */
#define PLACEMENT_CROWDED_NS 50000         /* 50 µs of run-queue wait per turn */
#define PLACEMENT_BACKOFF_NS 1000000000LL /* 1 s */

#define BITS (8 * sizeof(uint64_t))
/* The CPUs a placement can name: its mask's and a cpu_set_t's, whichever is fewer. */
#define CPUS_KNOWN (CPU_SETSIZE < PLACEMENT_MASK_WORDS * (int)BITS \
                    ? CPU_SETSIZE : PLACEMENT_MASK_WORDS * (int)BITS)

static int home_has(const struct placement *p, int cpu)
{
    return cpu >= 0 && cpu < CPUS_KNOWN
           && (p->home[cpu / BITS] >> (cpu % BITS)) & 1;
}

/* The calling thread's scheduler statistics (/proc/thread-self/schedstat: time on a CPU,
 * time waiting on a run queue, turns on a CPU).  0 on success. */
static int read_schedstat(uint64_t *run_delay, uint64_t *turns)
{
    char text[128];
    int fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t got = read(fd, text, sizeof text - 1);
    close(fd);
    if (got <= 0)
        return -1;
    text[got] = 0;
    unsigned long long on_cpu, delay, count;
    if (sscanf(text, "%llu %llu %llu", &on_cpu, &delay, &count) != 3)
        return -1;
    *run_delay = delay;
    *turns = count;
    return 0;
}

static void set_cpus(const struct placement *p, int only)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    if (only >= 0) {
        CPU_SET(only, &set);
    } else {
        for (int cpu = 0; cpu < CPUS_KNOWN; cpu++)
            if (home_has(p, cpu))
                CPU_SET(cpu, &set);
    }
    sched_setaffinity(0, sizeof set, &set); /* a failure leaves the thread where it was */
}

static void hold_on(struct placement *p, int cpu)
{
    set_cpus(p, cpu);
    p->cpu = cpu;
    BUMP(p->moves, 1);
    p->check_due_ns = now_ns() + PLACEMENT_CHECK_NS;
    if (read_schedstat(&p->run_delay_ns, &p->turns) < 0)
        p->turns = 0;
}

static void let_go(struct placement *p)
{
    set_cpus(p, -1);
    p->cpu = -1;
}

static int init(struct placement *p)
{
    cpu_set_t set;
    p->ready = 1;
    p->cpu = -1;
    if (sched_getaffinity(0, sizeof set, &set) < 0) {
        p->enabled = 0;
        return 0;
    }
    memset(p->home, 0, sizeof p->home);
    int allowed = 0;
    for (int cpu = 0; cpu < CPUS_KNOWN; cpu++) {
        if (CPU_ISSET(cpu, &set)) {
            p->home[cpu / BITS] |= (uint64_t)1 << (cpu % BITS);
            allowed++;
        }
    }
    if (allowed < 2)
        p->enabled = 0; /* one CPU: nowhere to move */
    return p->enabled;
}

/* Held on a CPU: has waiting for it cost more per turn than a wake-up elsewhere would? */
static int crowded(struct placement *p)
{
    uint64_t delay, turns;
    if (read_schedstat(&delay, &turns) < 0)
        return 0;
    uint64_t waited = delay - p->run_delay_ns, taken = turns - p->turns;
    p->run_delay_ns = delay;
    p->turns = turns;
    return taken > 0 && waited / taken > PLACEMENT_CROWDED_NS;
}

void placement_before_wait(struct placement *p, int sock, uint32_t served)
{
    if (!p->enabled || (!p->ready && !init(p)))
        return;
    if (served >= 2) {
        p->sparse_waits = 0;
        if (p->cpu >= 0) {
            let_go(p);
            BUMP(p->releases, 1);
        }
        return;
    }
    if (served == 1 && p->sparse_waits < PLACEMENT_SPARSE_WAITS)
        p->sparse_waits++;
    int64_t now = now_ns();
    if (p->cpu >= 0) {
        /* Held: the crowding and the receiving CPU are looked at once per check period. */
        if (now < p->check_due_ns)
            return;
        p->check_due_ns = now + PLACEMENT_CHECK_NS;
        if (crowded(p)) {
            let_go(p);
            BUMP(p->crowded, 1);
            p->sparse_waits = 0;
            p->free_until_ns = now + PLACEMENT_BACKOFF_NS;
            return;
        }
    }
    if (p->sparse_waits < PLACEMENT_SPARSE_WAITS || now < p->free_until_ns)
        return;
    int cpu = -1;
    socklen_t length = sizeof cpu;
    if (getsockopt(sock, SOL_SOCKET, SO_INCOMING_CPU, &cpu, &length) < 0 || !home_has(p, cpu))
        return; /* not TCP (a Unix socket), or a CPU the thread may not use */
    if (cpu != p->cpu)
        hold_on(p, cpu);
}
