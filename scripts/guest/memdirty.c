/*
 * memdirty: the test guest's memory workload.
 *
 *   memdirty SIZE_MIB RATE_MIBPS
 *
 * Keeps SIZE_MIB of pages, each filled with a pattern derived from its index and a
 * per-page generation counter, and rewrites RATE_MIBPS worth of pages per second
 * (bumping their generation) in a scattered order. Alongside, it re-verifies every
 * page against the generation it last wrote, a slice per tick, so that a page lost or
 * left stale by a migration is reported within one verification pass:
 *
 *   MEMDIRTY pass=N pages=P bad=B rate_mibps=R [first_bad=I gen=G found_gen=F]
 *
 * Page layout (uint64 words): [0] MAGIC, [1] page index, [2] generation,
 * [3..511] pattern(index, generation, word). The host finds these pages by MAGIC.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_WORDS 512
#define MAGIC 0x0a5954524944444cULL /* "LDDIRTY\n" little-endian */
#define TICK_NS 10000000LL           /* 10 ms */
#define VERIFY_PASS_S 2              /* one full verification every ~2 s */

static inline uint64_t pattern(uint64_t page, uint64_t gen, uint64_t word)
{
    uint64_t x = (page + 1) * 0x9E3779B97F4A7C15ULL ^ (gen + 1) * 0xD6E8FEB86659FD93ULL;
    return x + word * 0xC2B2AE3D27D4EB4FULL;
}

static void fill(uint64_t *p, uint64_t page, uint64_t gen)
{
    p[0] = MAGIC;
    p[1] = page;
    p[2] = gen;
    for (uint64_t w = 3; w < PAGE_WORDS; w++)
        p[w] = pattern(page, gen, w);
}

/* Returns 1 if the page holds what generation `gen` wrote. */
static int check(const uint64_t *p, uint64_t page, uint64_t gen)
{
    if (p[0] != MAGIC || p[1] != page || p[2] != gen)
        return 0;
    for (uint64_t w = 3; w < PAGE_WORDS; w++)
        if (p[w] != pattern(page, gen, w))
            return 0;
    return 1;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: memdirty SIZE_MIB RATE_MIBPS\n");
        return 2;
    }
    uint64_t size_mib = strtoull(argv[1], NULL, 10);
    double rate_mibps = strtod(argv[2], NULL);
    uint64_t npages = size_mib * 256;
    if (npages == 0) {
        fprintf(stderr, "memdirty: size must be at least 1 MiB\n");
        return 2;
    }
    uint64_t *mem = mmap(NULL, npages * 4096, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    uint64_t *gens = calloc(npages, sizeof(uint64_t));
    if (mem == MAP_FAILED || !gens) {
        perror("memdirty: allocation");
        return 1;
    }
    for (uint64_t i = 0; i < npages; i++)
        fill(mem + i * PAGE_WORDS, i, 0);

    /* A stride coprime with npages visits every page once per cycle, scattered. */
    uint64_t stride = 7919;
    while (npages % stride == 0 || stride % npages == 0)
        stride += 2;
    double pages_per_tick = rate_mibps * 256.0 * TICK_NS / 1e9;
    double verify_per_tick = (double)npages * TICK_NS / (VERIFY_PASS_S * 1e9);
    if (verify_per_tick < 1)
        verify_per_tick = 1;

    uint64_t cursor = 0, vcursor = 0, pass = 0, bad = 0, written_in_pass = 0;
    uint64_t first_bad = 0, first_bad_gen = 0, first_found_gen = 0;
    double write_credit = 0, verify_credit = 0;
    long long pass_start = now_ns(), next = pass_start;

    printf("MEMDIRTY start pages=%llu rate_mibps=%.1f\n", (unsigned long long)npages, rate_mibps);
    fflush(stdout);
    for (;;) {
        next += TICK_NS;
        write_credit += pages_per_tick;
        verify_credit += verify_per_tick;
        /* Never try to catch up more than one tick's worth after a stall. */
        if (write_credit > 2 * pages_per_tick + 1)
            write_credit = 2 * pages_per_tick + 1;
        if (verify_credit > 2 * verify_per_tick)
            verify_credit = 2 * verify_per_tick;
        while (write_credit >= 1) {
            uint64_t i = (cursor * stride) % npages;
            cursor = (cursor + 1) % npages;
            fill(mem + i * PAGE_WORDS, i, ++gens[i]);
            write_credit -= 1;
            written_in_pass++;
        }
        while (verify_credit >= 1) {
            uint64_t *p = mem + vcursor * PAGE_WORDS;
            if (!check(p, vcursor, gens[vcursor])) {
                if (bad++ == 0) {
                    first_bad = vcursor;
                    first_bad_gen = gens[vcursor];
                    first_found_gen = p[2];
                }
            }
            verify_credit -= 1;
            if (++vcursor == npages) {
                long long t = now_ns();
                double secs = (t - pass_start) / 1e9;
                pass++;
                if (bad)
                    printf("MEMDIRTY pass=%llu pages=%llu bad=%llu rate_mibps=%.1f first_bad=%llu gen=%llu found_gen=%llu\n",
                           (unsigned long long)pass, (unsigned long long)npages, (unsigned long long)bad,
                           written_in_pass / 256.0 / secs, (unsigned long long)first_bad,
                           (unsigned long long)first_bad_gen, (unsigned long long)first_found_gen);
                else
                    printf("MEMDIRTY pass=%llu pages=%llu bad=0 rate_mibps=%.1f\n",
                           (unsigned long long)pass, (unsigned long long)npages,
                           written_in_pass / 256.0 / secs);
                fflush(stdout);
                vcursor = 0;
                bad = 0;
                written_in_pass = 0;
                pass_start = t;
            }
        }
        long long wait = next - now_ns();
        if (wait > 0) {
            struct timespec ts = {wait / 1000000000LL, wait % 1000000000LL};
            nanosleep(&ts, NULL);
        } else if (wait < -TICK_NS * 10) {
            next = now_ns(); /* far behind (e.g. the VM was paused): re-anchor */
        }
    }
}
