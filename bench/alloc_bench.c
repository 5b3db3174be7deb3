/*
 * alloc_bench: the target workloads of `cargo xtask bench`.
 *
 *   alloc_bench pairs N              N malloc(64)/free pairs, one thread
 *   alloc_bench mixed N THREADS      each thread: N allocations of 16 B..1 MiB (fixed-seed
 *                                    distribution, mostly small) into a ring of slots; the
 *                                    previous occupant of a slot is freed, ~1% are leaked
 *   alloc_bench paced RATE SECONDS   RATE malloc/free pairs per second for SECONDS (1 ms ticks)
 *   alloc_bench stacks ALLOCS STACKS ALLOCS live allocations from STACKS distinct call stacks
 *                                    (a recursion of depth 16 taking one of two call sites by
 *                                    the bits of i % STACKS), kept live until the end
 *
 * Protocol (so that a tracer attaches before the timed loop): prints `ready PID`, waits for a
 * line on stdin, runs, prints `ns_per_pair X` (pairs, mixed) or `elapsed_ns X` (paced, stacks),
 * `cpu_ns_per_op X` (process CPU time, all threads, from the go line to the result, per op) and
 * `ops N`, then waits for another line (or EOF) on stdin before exiting, so the tracer can be
 * measured and stopped (or take its snapshot) while the process still runs.
 *
 * Build: cc -O2 -g -fno-omit-frame-pointer -pthread -o alloc_bench alloc_bench.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Keeps the compiler from proving a malloc/free pair dead and removing it. */
#define KEEP(p) __asm__ volatile("" : : "r"(p) : "memory")

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *msg) {
    fprintf(stderr, "alloc_bench: %s\n", msg);
    exit(2);
}

static uint64_t parse_u64(const char *s, const char *what) {
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end) {
        fprintf(stderr, "alloc_bench: bad %s: %s\n", what, s);
        exit(2);
    }
    return v;
}

/* Waits for one line (or EOF) on stdin. */
static void wait_line(void) {
    char buf[64];
    if (!fgets(buf, sizeof buf, stdin)) {
        clearerr(stdin);
    }
}

/* CPU time of the whole process (all threads, user + system: a probe's trap is system time
 * of the thread that hit it). Unlike the wall clock, it does not grow when the machine is busy. */
static uint64_t cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t cpu_started;

static void handshake(void) {
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    wait_line();
    cpu_started = cpu_ns();
}

static void finish(const char *key, double value, uint64_t ops) {
    double cpu = (double)(cpu_ns() - cpu_started) / (double)ops;
    printf("%s %.3f\ncpu_ns_per_op %.3f\nops %llu\n", key, value, cpu, (unsigned long long)ops);
    fflush(stdout);
    wait_line();
}

/* xorshift64*: small, fast, reproducible. */
static uint64_t next_rand(uint64_t *state) {
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

/* ---- pairs ---------------------------------------------------------------------------- */

static void run_pairs(uint64_t n) {
    handshake();
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
        void *p = malloc(64);
        KEEP(p);
        free(p);
    }
    uint64_t t1 = now_ns();
    finish("ns_per_pair", (double)(t1 - t0) / (double)n, n);
}

/* ---- mixed ---------------------------------------------------------------------------- */

#define RING 1024

struct mixed_arg {
    uint64_t n;
    uint64_t seed;
    uint64_t elapsed_ns;
    uint64_t leaked;
};

/* Mostly small: 80% 16..256 B, 15% 256 B..16 KiB, 4% 16..128 KiB, 1% 128 KiB..1 MiB. */
static size_t draw_size(uint64_t *rng) {
    uint64_t r = next_rand(rng);
    uint64_t bucket = r % 100;
    uint64_t v = r >> 20;
    if (bucket < 80) return 16 + v % (256 - 16 + 1);
    if (bucket < 95) return 256 + v % (16384 - 256 + 1);
    if (bucket < 99) return 16384 + v % (131072 - 16384 + 1);
    return 131072 + v % (1048576 - 131072 + 1);
}

static void *mixed_thread(void *opaque) {
    struct mixed_arg *a = opaque;
    void *ring[RING] = {0};
    uint64_t rng = a->seed;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < a->n; i++) {
        size_t size = draw_size(&rng);
        unsigned slot = (unsigned)(next_rand(&rng) % RING);
        char *p = malloc(size);
        if (!p) die("malloc failed");
        p[0] = (char)i; /* touch it, as a program would */
        if (ring[slot]) {
            if (next_rand(&rng) % 100 == 0)
                a->leaked++; /* ~1% leaked: the pointer is dropped */
            else
                free(ring[slot]);
        }
        ring[slot] = p;
    }
    for (unsigned s = 0; s < RING; s++) free(ring[s]);
    a->elapsed_ns = now_ns() - t0;
    return NULL;
}

static void run_mixed(uint64_t n, uint64_t threads) {
    if (threads == 0 || threads > 64) die("THREADS must be 1..64");
    pthread_t tids[64];
    struct mixed_arg args[64];
    handshake();
    for (uint64_t t = 0; t < threads; t++) {
        args[t] = (struct mixed_arg){.n = n, .seed = 0x9E3779B97F4A7C15ull * (t + 1)};
        if (pthread_create(&tids[t], NULL, mixed_thread, &args[t])) die("pthread_create failed");
    }
    double sum = 0;
    for (uint64_t t = 0; t < threads; t++) {
        pthread_join(tids[t], NULL);
        sum += (double)args[t].elapsed_ns / (double)n;
    }
    /* Mean over threads of each thread's own time per allocation (+ its free). */
    finish("ns_per_pair", sum / (double)threads, n * threads);
}

/* ---- paced ---------------------------------------------------------------------------- */

static void run_paced(uint64_t rate, uint64_t seconds) {
    void *ring[RING] = {0};
    uint64_t rng = 42, done = 0;
    uint64_t ticks = seconds * 1000;
    handshake();
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    uint64_t t0 = now_ns();
    for (uint64_t tick = 0; tick < ticks; tick++) {
        /* Spread the remainder so that the total is exactly rate * seconds. */
        uint64_t target = (tick + 1) * rate / 1000;
        for (; done < target; done++) {
            unsigned slot = (unsigned)(next_rand(&rng) % RING);
            free(ring[slot]);
            ring[slot] = malloc(16 + next_rand(&rng) % 4096);
            KEEP(ring[slot]);
        }
        next.tv_nsec += 1000000;
        if (next.tv_nsec >= 1000000000) {
            next.tv_nsec -= 1000000000;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    uint64_t elapsed = now_ns() - t0;
    for (unsigned s = 0; s < RING; s++) free(ring[s]);
    finish("elapsed_ns", (double)elapsed, done);
}

/* ---- stacks --------------------------------------------------------------------------- */

#define DEPTH 16

static void *walk(unsigned path, int depth, size_t size);

/* Two distinct call sites (distinct bodies, noipa: never merged, inlined or cloned). */
__attribute__((noinline, noipa)) static void *via_a(unsigned path, int depth, size_t size) {
    void *p = walk(path >> 1, depth - 1, size);
    KEEP(p);
    return p;
}

__attribute__((noinline, noipa)) static void *via_b(unsigned path, int depth, size_t size) {
    void *p = walk(path >> 1, depth - 1, size + 1);
    KEEP(p);
    return p;
}

__attribute__((noinline, noipa)) static void *leaf(size_t size) {
    void *p = malloc(size);
    KEEP(p);
    return p;
}

__attribute__((noinline, noipa)) static void *walk(unsigned path, int depth, size_t size) {
    void *p = depth == 0 ? leaf(size) : (path & 1) ? via_a(path, depth, size) : via_b(path, depth, size);
    KEEP(p); /* no tail calls: every level keeps its frame */
    return p;
}

static void run_stacks(uint64_t allocs, uint64_t stacks) {
    if (stacks == 0 || stacks > (1u << DEPTH)) die("STACKS must be 1..65536");
    void **live = malloc(allocs * sizeof *live);
    if (!live) die("cannot allocate the table of pointers");
    handshake();
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < allocs; i++) {
        live[i] = walk((unsigned)(i % stacks), DEPTH, 32);
        if (!live[i]) die("malloc failed");
    }
    uint64_t elapsed = now_ns() - t0;
    finish("elapsed_ns", (double)elapsed, allocs);
    for (uint64_t i = 0; i < allocs; i++) free(live[i]);
    free(live);
}

int main(int argc, char **argv) {
    setvbuf(stdin, NULL, _IONBF, 0);
    if (argc == 3 && !strcmp(argv[1], "pairs")) {
        run_pairs(parse_u64(argv[2], "N"));
    } else if (argc == 4 && !strcmp(argv[1], "mixed")) {
        run_mixed(parse_u64(argv[2], "N"), parse_u64(argv[3], "THREADS"));
    } else if (argc == 4 && !strcmp(argv[1], "paced")) {
        run_paced(parse_u64(argv[2], "RATE"), parse_u64(argv[3], "SECONDS"));
    } else if (argc == 4 && !strcmp(argv[1], "stacks")) {
        run_stacks(parse_u64(argv[2], "ALLOCS"), parse_u64(argv[3], "STACKS"));
    } else {
        fprintf(stderr,
                "usage: alloc_bench pairs N | mixed N THREADS | paced RATE SECONDS | stacks ALLOCS STACKS\n");
        return 2;
    }
    return 0;
}
