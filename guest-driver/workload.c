/*
 * lethe-workload: the test guest's workload (static, runs as a child of /init).
 *
 * Memory mode (--mib N, N > 0): fills N MiB with checksummed 4 KiB pages (layout in
 * guest-driver/page-format.ts), plants the secret marker in every SECRET_EVERY-th
 * page, then re-verifies every page in passes forever, rewriting a few pages with a
 * new sequence number each pass so the guest keeps writing.
 *
 * Disk mode (--disk write|verify, files in --disk-dir): "write" writes written.blk
 * as checksummed blocks, syncs, drops the page cache and verifies; "verify" checks
 * preset.blk (made by the build) and written.blk (when present). Runs before the
 * memory mode; with --mib 0 the program exits after it.
 *
 * Lines on stdout (the serial console), one event each:
 *   LETHE-WORKLOAD-READY pages=N secret-every=K
 *   LETHE-VERIFY pass=P ok=N bad=B
 *   LETHE-VERIFY-BAD page=I reason=magic|index|seq|checksum
 *   LETHE-DISK ok files=F blocks=B
 *   LETHE-DISK bad file=F block=I reason=R
 *   LETHE-WORKLOAD-ERROR <what>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096
#define HEADER_SIZE 24
#define MAGIC_MEM 0x5048544cu  /* "LTHP" */
#define MAGIC_DISK 0x4448544cu /* "LTHD" */
#define FLAG_SECRET 1u
#define SECRET_EVERY 8
#define SECRET_OFFSET 64
#define MAX_SECRET 128
#define GOLDEN 0x9e3779b97f4a7c15ull
#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull

#define REWRITES_PER_PASS 16
#define DISK_WRITE_BLOCKS 1024 /* 4 MiB */
#define DISK_WRITE_SEQ 2       /* preset.blk is seq 1 */

struct page_header {
    uint32_t magic, index, seq, flags;
    uint64_t checksum;
};

struct options {
    unsigned long mib;
    unsigned interval_ms;
    const char *secret;
    const char *disk;
    const char *disk_dir;
};

static char marker[MAX_SECRET + 16];

static uint64_t splitmix(uint64_t state)
{
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t page_checksum(const uint8_t *page)
{
    uint64_t h = FNV_OFFSET, w;
    for (size_t at = HEADER_SIZE; at < PAGE_SIZE; at += 8) {
        memcpy(&w, page + at, 8);
        h = (h ^ w) * FNV_PRIME;
    }
    return h;
}

static void fill_page(uint8_t *page, uint32_t magic, uint32_t index, uint32_t seq, const char *mark)
{
    struct page_header h = { magic, index, seq, mark ? FLAG_SECRET : 0, 0 };
    uint64_t state = (((uint64_t)index << 32) | seq) + (uint64_t)magic * GOLDEN;
    for (size_t at = HEADER_SIZE; at < PAGE_SIZE; at += 8) {
        state += GOLDEN;
        uint64_t w = splitmix(state);
        memcpy(page + at, &w, 8);
    }
    if (mark)
        memcpy(page + SECRET_OFFSET, mark, strlen(mark));
    h.checksum = page_checksum(page);
    memcpy(page, &h, sizeof h);
}

/* NULL when the page is what we wrote, else the name of the first thing wrong. */
static const char *check_page(const uint8_t *page, uint32_t magic, uint32_t index, int64_t seq)
{
    struct page_header h;
    memcpy(&h, page, sizeof h);
    if (h.magic != magic)
        return "magic";
    if (h.index != index)
        return "index";
    if (seq >= 0 && h.seq != (uint32_t)seq)
        return "seq";
    if (h.checksum != page_checksum(page))
        return "checksum";
    return NULL;
}

static const char *mark_for(uint32_t index)
{
    return marker[0] && index % SECRET_EVERY == 0 ? marker : NULL;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

/* ---- memory mode ---- */

static void verify_pass(uint8_t *mem, const uint32_t *seqs, size_t pages, unsigned long pass)
{
    size_t bad = 0;
    for (size_t i = 0; i < pages; i++) {
        const char *why = check_page(mem + i * PAGE_SIZE, MAGIC_MEM, (uint32_t)i, seqs[i]);
        if (why) {
            printf("LETHE-VERIFY-BAD page=%zu reason=%s\n", i, why);
            bad++;
        }
    }
    printf("LETHE-VERIFY pass=%lu ok=%zu bad=%zu\n", pass, pages - bad, bad);
}

static void rewrite_some(uint8_t *mem, uint32_t *seqs, size_t pages, unsigned long pass)
{
    size_t stride = pages / REWRITES_PER_PASS + 1;
    for (size_t k = 0; k < REWRITES_PER_PASS && k < pages; k++) {
        size_t i = (pass + k * stride) % pages;
        seqs[i]++;
        fill_page(mem + i * PAGE_SIZE, MAGIC_MEM, (uint32_t)i, seqs[i], mark_for((uint32_t)i));
    }
}

static int run_memory(const struct options *o)
{
    size_t pages = o->mib * (1024 * 1024 / PAGE_SIZE);
    uint8_t *mem = mmap(NULL, pages * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint32_t *seqs = calloc(pages, sizeof *seqs);
    if (mem == MAP_FAILED || !seqs) {
        printf("LETHE-WORKLOAD-ERROR cannot allocate %lu MiB: %s\n", o->mib, strerror(errno));
        return 1;
    }
    for (size_t i = 0; i < pages; i++) {
        seqs[i] = 1;
        fill_page(mem + i * PAGE_SIZE, MAGIC_MEM, (uint32_t)i, 1, mark_for((uint32_t)i));
    }
    printf("LETHE-WORKLOAD-READY pages=%zu secret-every=%d\n", pages, marker[0] ? SECRET_EVERY : 0);
    for (unsigned long pass = 1;; pass++) {
        verify_pass(mem, seqs, pages, pass);
        rewrite_some(mem, seqs, pages, pass);
        sleep_ms(o->interval_ms);
    }
}

/* ---- disk mode ---- */

static int disk_bad(const char *file, long block, const char *why)
{
    printf("LETHE-DISK bad file=%s block=%ld reason=%s\n", file, block, why);
    return 1;
}

/* Checks every block of dir/name; *blocks grows by how many it checked. */
static int verify_file(const char *dir, const char *name, long *blocks)
{
    char path[512];
    uint8_t page[PAGE_SIZE];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return disk_bad(name, -1, errno == ENOENT ? "missing" : "open");
    long i = 0;
    ssize_t got;
    while ((got = read(fd, page, PAGE_SIZE)) == PAGE_SIZE) {
        const char *why = check_page(page, MAGIC_DISK, (uint32_t)i, -1);
        if (why) {
            close(fd);
            return disk_bad(name, i, why);
        }
        i++;
    }
    close(fd);
    if (got != 0)
        return disk_bad(name, i, got < 0 ? "read" : "short");
    *blocks += i;
    return 0;
}

static int write_file(const char *dir, const char *name)
{
    char path[512];
    uint8_t page[PAGE_SIZE];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return disk_bad(name, -1, "create");
    for (uint32_t i = 0; i < DISK_WRITE_BLOCKS; i++) {
        fill_page(page, MAGIC_DISK, i, DISK_WRITE_SEQ, NULL);
        if (write(fd, page, PAGE_SIZE) != PAGE_SIZE) {
            close(fd);
            return disk_bad(name, i, "write");
        }
    }
    int synced = fsync(fd);
    close(fd);
    return synced == 0 ? 0 : disk_bad(name, -1, "fsync");
}

/* So the read-back comes from the disk, not from the page cache. */
static void drop_caches(void)
{
    sync();
    int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (fd >= 0) {
        if (write(fd, "3\n", 2) != 2)
            printf("LETHE-WORKLOAD-ERROR cannot drop caches: %s\n", strerror(errno));
        close(fd);
    }
}

static int run_disk(const struct options *o)
{
    int write_mode = strcmp(o->disk, "write") == 0;
    if (!write_mode && strcmp(o->disk, "verify") != 0) {
        printf("LETHE-WORKLOAD-ERROR unknown disk mode '%s'\n", o->disk);
        return 1;
    }
    if (write_mode && write_file(o->disk_dir, "written.blk"))
        return 1;
    drop_caches();
    long blocks = 0;
    int files = 1;
    if (verify_file(o->disk_dir, "preset.blk", &blocks))
        return 1;
    char written[512];
    snprintf(written, sizeof written, "%s/written.blk", o->disk_dir);
    if (write_mode || access(written, F_OK) == 0) {
        files++;
        if (verify_file(o->disk_dir, "written.blk", &blocks))
            return 1;
    }
    printf("LETHE-DISK ok files=%d blocks=%ld\n", files, blocks);
    return 0;
}

/* ---- options ---- */

static int parse_options(int argc, char **argv, struct options *o)
{
    *o = (struct options){ 0, 1000, NULL, NULL, "/mnt" };
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--mib"))
            o->mib = strtoul(v, NULL, 10);
        else if (!strcmp(k, "--interval-ms"))
            o->interval_ms = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(k, "--secret"))
            o->secret = v;
        else if (!strcmp(k, "--disk"))
            o->disk = v;
        else if (!strcmp(k, "--disk-dir"))
            o->disk_dir = v;
        else {
            printf("LETHE-WORKLOAD-ERROR unknown option '%s'\n", k);
            return 1;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct options o;
    char secret[MAX_SECRET + 1] = "";
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (parse_options(argc, argv, &o))
        return 2;
    if (o.secret)
        snprintf(secret, sizeof secret, "%s", o.secret);
    if (secret[0])
        snprintf(marker, sizeof marker, "LETHE-SECRET[%s]", secret);
    if (o.disk && run_disk(&o))
        return 1;
    return o.mib ? run_memory(&o) : 0;
}
