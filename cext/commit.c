/* Group commit of one backend's flushes; see commit.h. */
#define _GNU_SOURCE
#include "commit.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

/* Syncs of one backend running at once (one per C loop thread in a FLUSH, plus Python's
 * flushers); a caller past it waits for one to end before starting its own. */
#define COMMIT_RUNNING_MAX 64

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
};

struct commit *commit_new(int *dirty, int *write_gate)
{
    struct commit *commit = calloc(1, sizeof *commit);
    if (commit == NULL)
        return NULL;
    pthread_mutex_init(&commit->mutex, NULL);
    pthread_cond_init(&commit->ended, NULL);
    commit->dirty = dirty;
    commit->write_gate = write_gate;
    return commit;
}

void commit_free(struct commit *commit)
{
    if (commit != NULL) {
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
