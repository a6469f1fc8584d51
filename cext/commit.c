/* Group commit of one backend's flushes; see commit.h. */
#define _GNU_SOURCE
#include "commit.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* Syncs of one backend running at once (one per C loop thread in a FLUSH, plus Python's
 * flushers); a caller past it waits for one to end before starting its own. */
#define COMMIT_RUNNING_MAX 64
#define COMMIT_FLUSHERS 4      /* flusher threads of one backend at most (groupcommit.py's) */
#define COMMIT_IDLE_EXIT_S 2   /* seconds a flusher waits for work before it ends */

struct commit {
    pthread_mutex_t mutex;
    pthread_cond_t ended;  /* a sync ended */
    int *dirty;
    int *write_gate;
    int failed;            /* errno of the first failed sync; 0 while none has */
    uint64_t latest;       /* number of the sync begun last (0: none yet) */
    uint64_t running[COMMIT_RUNNING_MAX]; /* numbers of the syncs running; 0: a free slot */
    uint64_t syncs;
    uint64_t skipped;
    /* The C flushers: FLUSHes queued for the next to start, threads alive and idle. */
    pthread_cond_t work;
    struct flush_job *jobs;
    struct flush_job **jobs_tail;
    int flushers;
    int idle;
    int closing;
};

struct commit *commit_new(int *dirty, int *write_gate)
{
    struct commit *commit = calloc(1, sizeof *commit);
    if (commit == NULL)
        return NULL;
    pthread_mutex_init(&commit->mutex, NULL);
    pthread_cond_init(&commit->ended, NULL);
    pthread_condattr_t monotonic; /* the flushers' idle wait is timed on CLOCK_MONOTONIC */
    pthread_condattr_init(&monotonic);
    pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC);
    pthread_cond_init(&commit->work, &monotonic);
    pthread_condattr_destroy(&monotonic);
    commit->jobs_tail = &commit->jobs;
    commit->dirty = dirty;
    commit->write_gate = write_gate;
    return commit;
}

void commit_free(struct commit *commit)
{
    if (commit != NULL) {
        commit_close(commit);
        pthread_cond_destroy(&commit->work);
        pthread_cond_destroy(&commit->ended);
        pthread_mutex_destroy(&commit->mutex);
        free(commit);
    }
}

static int running_slot(struct commit *commit, uint64_t number)
{
    for (int i = 0; i < COMMIT_RUNNING_MAX; i++)
        if (commit->running[i] == number)
            return i;
    return -1;
}

/* Under the mutex: the backend has failed (a sync here, or Python's latch closed the gate). */
static int has_failed(struct commit *commit)
{
    return commit->failed || !__atomic_load_n(commit->write_gate, __ATOMIC_ACQUIRE);
}

int commit_sync(struct commit *commit, int fd)
{
    pthread_mutex_lock(&commit->mutex);
    for (;;) {
        if (has_failed(commit))
            goto failed;
        if (commit->dirty != NULL && !__atomic_load_n(commit->dirty, __ATOMIC_ACQUIRE)) {
            /* Nothing written since the latest sync began: it covers this call once it ends
             * (a failed one latches, and the check above answers). */
            uint64_t latest = commit->latest;
            while (latest && running_slot(commit, latest) >= 0 && !has_failed(commit))
                pthread_cond_wait(&commit->ended, &commit->mutex);
            if (has_failed(commit))
                goto failed;
            __atomic_store_n(&commit->skipped, commit->skipped + 1, __ATOMIC_RELAXED);
            pthread_mutex_unlock(&commit->mutex);
            return 0;
        }
        int slot = running_slot(commit, 0);
        if (slot >= 0) {
            /* Cleared before the sync starts: a write that sets it again after this point
             * may not be covered, and the next call syncs for it. */
            if (commit->dirty != NULL)
                __atomic_store_n(commit->dirty, 0, __ATOMIC_RELEASE);
            uint64_t number = ++commit->latest;
            commit->running[slot] = number;
            __atomic_store_n(&commit->syncs, commit->syncs + 1, __ATOMIC_RELAXED);
            pthread_mutex_unlock(&commit->mutex);
            int result;
            do {
                result = fdatasync(fd);
            } while (result < 0 && errno == EINTR);
            int error = result < 0 ? errno : 0;
            pthread_mutex_lock(&commit->mutex);
            commit->running[slot] = 0;
            if (error && !commit->failed) {
                __atomic_store_n(&commit->failed, error, __ATOMIC_RELAXED);
                __atomic_store_n(commit->write_gate, 0, __ATOMIC_RELEASE);
            }
            pthread_cond_broadcast(&commit->ended);
            pthread_mutex_unlock(&commit->mutex);
            if (error) {
                errno = error;
                return -1;
            }
            return 1;
        }
        pthread_cond_wait(&commit->ended, &commit->mutex); /* every slot taken */
    }
failed:
    pthread_mutex_unlock(&commit->mutex);
    errno = EIO;
    return -1;
}

uint64_t commit_syncs(struct commit *commit)
{
    return __atomic_load_n(&commit->syncs, __ATOMIC_RELAXED);
}

uint64_t commit_skipped(struct commit *commit)
{
    return __atomic_load_n(&commit->skipped, __ATOMIC_RELAXED);
}

int commit_failed(struct commit *commit)
{
    return __atomic_load_n(&commit->failed, __ATOMIC_RELAXED);
}

/* -- the flushers and the connections' queues (see commit.h) ------------------------------ */

struct flush_queue {
    pthread_mutex_t mutex;
    pthread_cond_t back;        /* a job came back (flush_queue_free waits for the last) */
    int event;                  /* eventfd */
    int outstanding;            /* submitted, not yet taken */
    int pending;                /* submitted, not yet answered */
    struct flush_job *done;     /* answered, oldest first */
    struct flush_job **done_tail;
};

struct flush_queue *flush_queue_new(void)
{
    struct flush_queue *queue = calloc(1, sizeof *queue);
    if (queue == NULL)
        return NULL;
    queue->event = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (queue->event < 0) {
        free(queue);
        return NULL;
    }
    pthread_mutex_init(&queue->mutex, NULL);
    pthread_cond_init(&queue->back, NULL);
    queue->done_tail = &queue->done;
    return queue;
}

void flush_queue_free(struct flush_queue *queue)
{
    if (queue == NULL)
        return;
    pthread_mutex_lock(&queue->mutex);
    while (queue->pending)
        pthread_cond_wait(&queue->back, &queue->mutex);
    pthread_mutex_unlock(&queue->mutex);
    for (struct flush_job *job = queue->done, *next; job != NULL; job = next) {
        next = job->next;
        free(job);
    }
    close(queue->event);
    pthread_cond_destroy(&queue->back);
    pthread_mutex_destroy(&queue->mutex);
    free(queue);
}

int flush_queue_outstanding(struct flush_queue *queue)
{
    return __atomic_load_n(&queue->outstanding, __ATOMIC_ACQUIRE);
}

int flush_queue_fd(struct flush_queue *queue)
{
    return queue->event;
}

struct flush_job *flush_queue_take(struct flush_queue *queue)
{
    pthread_mutex_lock(&queue->mutex);
    struct flush_job *job = queue->done;
    if (job != NULL) {
        queue->done = job->next;
        if (queue->done == NULL) {
            queue->done_tail = &queue->done;
            uint64_t count; /* none left: the eventfd reads empty again */
            if (read(queue->event, &count, sizeof count) < 0)
                count = 0;
        }
        __atomic_store_n(&queue->outstanding, queue->outstanding - 1, __ATOMIC_RELEASE);
        job->next = NULL;
    }
    pthread_mutex_unlock(&queue->mutex);
    return job;
}

static void answer(struct flush_job *job)
{
    struct flush_queue *queue = job->queue;
    uint64_t one = 1;
    job->next = NULL;
    pthread_mutex_lock(&queue->mutex);
    *queue->done_tail = job;
    queue->done_tail = &job->next;
    /* Written under the mutex: once pending is 0 flush_queue_free may close the eventfd. */
    if (write(queue->event, &one, sizeof one) < 0) {
        /* cannot fail short of a counter at 2^64-1 */
    }
    queue->pending--;
    pthread_cond_broadcast(&queue->back);
    pthread_mutex_unlock(&queue->mutex);
}

static void *flusher(void *arg)
{
    struct commit *commit = arg;
    pthread_setname_np(pthread_self(), "nbd-flush"); /* what ps and the tests see */
    pthread_mutex_lock(&commit->mutex);
    for (;;) {
        while (commit->jobs == NULL && !commit->closing) {
            struct timespec until;
            clock_gettime(CLOCK_MONOTONIC, &until);
            until.tv_sec += COMMIT_IDLE_EXIT_S;
            commit->idle++;
            int timed_out = pthread_cond_timedwait(&commit->work, &commit->mutex, &until);
            commit->idle--;
            if (timed_out == ETIMEDOUT && commit->jobs == NULL)
                goto end;
        }
        if (commit->jobs == NULL)
            goto end; /* closing, nothing queued */
        /* Every FLUSH queued now has arrived before the sync commit_sync starts. */
        struct flush_job *batch = commit->jobs;
        commit->jobs = NULL;
        commit->jobs_tail = &commit->jobs;
        pthread_mutex_unlock(&commit->mutex);
        int result = commit_sync(commit, batch->fd);
        int error = result < 0 ? errno : 0;
        for (struct flush_job *job = batch, *next; job != NULL; job = next) {
            next = job->next;
            job->result = result;
            job->error = error;
            answer(job);
        }
        pthread_mutex_lock(&commit->mutex);
    }
end:
    commit->flushers--;
    pthread_cond_broadcast(&commit->ended);
    pthread_mutex_unlock(&commit->mutex);
    return NULL;
}

int commit_submit(struct commit *commit, struct flush_job *job)
{
    struct flush_queue *queue = job->queue;
    pthread_mutex_lock(&commit->mutex);
    if (commit->closing)
        goto refused;
    if (!commit->idle && commit->flushers < COMMIT_FLUSHERS) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, flusher, commit);
        pthread_attr_destroy(&attr);
        if (failed) {
            if (!commit->flushers)
                goto refused; /* no thread will take it */
        } else {
            commit->flushers++;
        }
    }
    pthread_mutex_lock(&queue->mutex);
    __atomic_store_n(&queue->outstanding, queue->outstanding + 1, __ATOMIC_RELEASE);
    queue->pending++;
    pthread_mutex_unlock(&queue->mutex);
    job->next = NULL;
    *commit->jobs_tail = job;
    commit->jobs_tail = &job->next;
    pthread_cond_signal(&commit->work);
    pthread_mutex_unlock(&commit->mutex);
    return 0;
refused:
    pthread_mutex_unlock(&commit->mutex);
    return -1;
}

void commit_close(struct commit *commit)
{
    pthread_mutex_lock(&commit->mutex);
    commit->closing = 1;
    pthread_cond_broadcast(&commit->work);
    while (commit->flushers)
        pthread_cond_wait(&commit->ended, &commit->mutex);
    pthread_mutex_unlock(&commit->mutex);
}
