/* memscope's demo target: leaks steadily from two functions and churns from a third, until killed.
 *
 *   leak_session_cache      malloc(4096) every 10 ms, never freed   (~400 KiB/s)
 *   leak_request_buffers    calloc(1, 512) every 10 ms, never freed (~50 KiB/s)
 *   churn_temporary_strings 64 allocations of 16..16384 bytes every 10 ms, all freed (thread)
 *
 * Build: cc -O1 -g -fno-omit-frame-pointer -pthread -o leaky leaky.c
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Pointers pass through these so the compiler cannot drop an allocation nobody reads; one
 * per thread, so the churn thread never frees what the main thread leaked. */
void *volatile leak_sink;
void *volatile churn_sink;

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

__attribute__((noinline)) void leak_session_cache(void) {
    char *entry = malloc(4096);
    if (entry)
        memset(entry, 0x5a, 4096);
    leak_sink = entry; /* overwritten next time: unreachable, a real leak */
}

__attribute__((noinline)) void leak_request_buffers(void) {
    leak_sink = calloc(1, 512);
}

__attribute__((noinline)) void churn_temporary_strings(unsigned round) {
    for (unsigned i = 0; i < 64; i++) {
        size_t size = (size_t)16 << ((round + i) % 11); /* 16 B .. 16 KiB */
        char *s = malloc(size);
        if (!s)
            continue;
        memset(s, 'x', size);
        churn_sink = s;
        free(churn_sink);
    }
}

static void *churn_thread(void *arg) {
    (void)arg;
    for (unsigned round = 0;; round++) {
        churn_temporary_strings(round);
        sleep_ms(10);
    }
    return NULL;
}

int main(void) {
    printf("leaky: pid %d\n", (int)getpid());
    fflush(stdout);
    pthread_t churn;
    if (pthread_create(&churn, NULL, churn_thread, NULL) != 0) {
        perror("pthread_create");
        return 1;
    }
    for (;;) {
        leak_session_cache();
        leak_request_buffers();
        sleep_ms(10);
    }
}
