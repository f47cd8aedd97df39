/*
 * diskpattern: the test guest's disk workload.
 *
 *   diskpattern DEVICE RATE_MIBPS
 *
 * Fills every 4 KiB block of DEVICE (O_DIRECT: the device itself, not the guest's
 * page cache) with a pattern derived from its block number and a per-block
 * generation, then rewrites RATE_MIBPS worth of blocks per second (bumping their
 * generation) in a scattered order. Alongside, it reads the device back, a slice
 * per tick, and checks every block against the generation it last wrote, so that a
 * block lost or left stale by a migration is reported within one pass:
 *
 *   DISKCHECK pass=N blocks=B bad=X rate_mibps=R [first_bad=I gen=G found_gen=F]
 *
 * Block layout (uint64 words): [0] MAGIC, [1] block number, [2] generation,
 * [3..511] pattern(block, generation, word).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define WORDS (BLOCK / 8)
#define MAGIC 0x0a4b534944444cULL /* "LDDISK\n" */
#define TICK_NS 10000000LL        /* 10 ms */
#define VERIFY_PASS_S 3           /* one full read-back every ~3 s */
#define CHUNK 64                  /* blocks per read-back I/O */

static inline uint64_t pattern(uint64_t block, uint64_t gen, uint64_t word)
{
    uint64_t x = (block + 1) * 0x9E3779B97F4A7C15ULL ^ (gen + 1) * 0xC2B2AE3D27D4EB4FULL;
    return x + word * 0xD6E8FEB86659FD93ULL;
}

static void fill(uint64_t *p, uint64_t block, uint64_t gen)
{
    p[0] = MAGIC;
    p[1] = block;
    p[2] = gen;
    for (uint64_t w = 3; w < WORDS; w++)
        p[w] = pattern(block, gen, w);
}

static int check(const uint64_t *p, uint64_t block, uint64_t gen)
{
    if (p[0] != MAGIC || p[1] != block || p[2] != gen)
        return 0;
    for (uint64_t w = 3; w < WORDS; w++)
        if (p[w] != pattern(block, gen, w))
            return 0;
    return 1;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int full_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    while (len) {
        ssize_t n = pwrite(fd, buf, len, off);
        if (n <= 0)
            return -1;
        buf = (const char *)buf + n;
        len -= n;
        off += n;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: diskpattern DEVICE RATE_MIBPS\n");
        return 2;
    }
    double rate_mibps = strtod(argv[2], NULL);
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    uint64_t bytes = 0;
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &bytes) != 0) {
        printf("DISKCHECK error cannot open %s\n", argv[1]);
        fflush(stdout);
        return 1;
    }
    uint64_t nblocks = bytes / BLOCK;
    uint64_t *gens = calloc(nblocks ? nblocks : 1, sizeof(uint64_t));
    uint64_t *buf, *rbuf;
    if (nblocks == 0 || !gens || posix_memalign((void **)&buf, BLOCK, BLOCK * CHUNK) ||
        posix_memalign((void **)&rbuf, BLOCK, BLOCK * CHUNK)) {
        printf("DISKCHECK error allocation\n");
        fflush(stdout);
        return 1;
    }
    /* Generation 1 everywhere first, a chunk at a time. */
    for (uint64_t b = 0; b < nblocks; b += CHUNK) {
        uint64_t n = nblocks - b < CHUNK ? nblocks - b : CHUNK;
        for (uint64_t i = 0; i < n; i++) {
            gens[b + i] = 1;
            fill(buf + i * WORDS, b + i, 1);
        }
        if (full_pwrite(fd, buf, n * BLOCK, (off_t)(b * BLOCK))) {
            printf("DISKCHECK error write block=%llu\n", (unsigned long long)b);
            fflush(stdout);
            return 1;
        }
    }
    uint64_t stride = 7919;
    while (nblocks % stride == 0 || stride % nblocks == 0)
        stride += 2;
    double blocks_per_tick = rate_mibps * 256.0 * TICK_NS / 1e9;
    double verify_per_tick = (double)nblocks * TICK_NS / (VERIFY_PASS_S * 1e9);
    uint64_t cursor = 0, vcursor = 0, pass = 0, bad = 0, written = 0, errors = 0;
    uint64_t first_bad = 0, first_bad_gen = 0, first_found_gen = 0;
    double write_credit = 0, verify_credit = 0;
    long long pass_start = now_ns(), next = pass_start;

    printf("DISKCHECK start blocks=%llu rate_mibps=%.1f\n", (unsigned long long)nblocks, rate_mibps);
    fflush(stdout);
    for (;;) {
        next += TICK_NS;
        write_credit += blocks_per_tick;
        verify_credit += verify_per_tick;
        if (write_credit > 2 * blocks_per_tick + 1)
            write_credit = 2 * blocks_per_tick + 1;
        if (verify_credit > 2 * verify_per_tick + CHUNK)
            verify_credit = 2 * verify_per_tick + CHUNK;
        while (write_credit >= 1) {
            uint64_t b = (cursor * stride) % nblocks;
            cursor = (cursor + 1) % nblocks;
            fill(buf, b, gens[b] + 1);
            if (full_pwrite(fd, buf, BLOCK, (off_t)(b * BLOCK)) == 0)
                gens[b]++;
            else
                errors++;
            write_credit -= 1;
            written++;
        }
        while (verify_credit >= CHUNK || (verify_credit >= 1 && nblocks - vcursor < CHUNK)) {
            uint64_t n = nblocks - vcursor < CHUNK ? nblocks - vcursor : CHUNK;
            ssize_t got = pread(fd, rbuf, n * BLOCK, (off_t)(vcursor * BLOCK));
            for (uint64_t i = 0; i < n; i++) {
                uint64_t b = vcursor + i;
                const uint64_t *p = rbuf + i * WORDS;
                if (got != (ssize_t)(n * BLOCK) || !check(p, b, gens[b])) {
                    if (bad++ == 0) {
                        first_bad = b;
                        first_bad_gen = gens[b];
                        first_found_gen = got == (ssize_t)(n * BLOCK) ? p[2] : ~0ULL;
                    }
                }
            }
            verify_credit -= n;
            vcursor += n;
            if (vcursor == nblocks) {
                long long t = now_ns();
                double secs = (t - pass_start) / 1e9;
                pass++;
                if (bad || errors)
                    printf("DISKCHECK pass=%llu blocks=%llu bad=%llu rate_mibps=%.1f write_errors=%llu first_bad=%llu gen=%llu found_gen=%llu\n",
                           (unsigned long long)pass, (unsigned long long)nblocks,
                           (unsigned long long)bad, written / 256.0 / secs,
                           (unsigned long long)errors, (unsigned long long)first_bad,
                           (unsigned long long)first_bad_gen, (unsigned long long)first_found_gen);
                else
                    printf("DISKCHECK pass=%llu blocks=%llu bad=0 rate_mibps=%.1f\n",
                           (unsigned long long)pass, (unsigned long long)nblocks,
                           written / 256.0 / secs);
                fflush(stdout);
                vcursor = 0;
                bad = 0;
                errors = 0;
                written = 0;
                pass_start = t;
            }
        }
        long long wait = next - now_ns();
        if (wait > 0) {
            struct timespec ts = {wait / 1000000000LL, wait % 1000000000LL};
            nanosleep(&ts, NULL);
        } else if (wait < -TICK_NS * 10) {
            next = now_ns();
        }
    }
}
