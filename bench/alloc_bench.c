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
 *
 * The variant without frame pointers (what distributions and release builds are) runs every
 * workload, and every thread of `mixed`, ALLOC_BENCH_DEPTH distinct noinline frames below main
 * or the thread's start, so that each allocation has a realistic stack to unwind:
 *   cc -O2 -g -fomit-frame-pointer -DALLOC_BENCH_DEPTH=12 -pthread -o alloc_bench_nofp alloc_bench.c
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

#ifndef ALLOC_BENCH_DEPTH
#define ALLOC_BENCH_DEPTH 0
#endif

/* ---- call depth ----------------------------------------------------------------------- */

/* Runs body(arg) `depth` frames down a chain of three distinct functions (noipa: never
 * inlined, cloned or merged; the store after each call keeps it from being a tail call). */
typedef void (*body_fn)(void *);
static volatile unsigned depth_sink;
__attribute__((noinline, noipa)) static void deep_a(int depth, body_fn body, void *arg);
__attribute__((noinline, noipa)) static void deep_b(int depth, body_fn body, void *arg);
__attribute__((noinline, noipa)) static void deep_c(int depth, body_fn body, void *arg);

__attribute__((noinline, noipa)) static void deep_a(int depth, body_fn body, void *arg) {
    if (depth <= 0) body(arg); else deep_b(depth - 1, body, arg);
    depth_sink += 1;
}
__attribute__((noinline, noipa)) static void deep_b(int depth, body_fn body, void *arg) {
    if (depth <= 0) body(arg); else deep_c(depth - 1, body, arg);
    depth_sink += 2;
}
__attribute__((noinline, noipa)) static void deep_c(int depth, body_fn body, void *arg) {
    if (depth <= 0) body(arg); else deep_a(depth - 1, body, arg);
    depth_sink += 3;
}

static void at_depth(body_fn body, void *arg) {
    if (ALLOC_BENCH_DEPTH > 0) deep_a(ALLOC_BENCH_DEPTH - 1, body, arg); else body(arg);
}

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

static void mixed_body(void *opaque) {
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
}

static void *mixed_thread(void *opaque) {
    at_depth(mixed_body, opaque);
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

struct cmdline {
    int argc;
    char **argv;
    int status;
};

static void dispatch(void *opaque) {
    struct cmdline *c = opaque;
    int argc = c->argc;
    char **argv = c->argv;
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
        c->status = 2;
    }
}

int main(int argc, char **argv) {
    setvbuf(stdin, NULL, _IONBF, 0);
    struct cmdline c = {argc, argv, 0};
    at_depth(dispatch, &c);
    return c.status;
}
