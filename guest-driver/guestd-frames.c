/*
 * lethe-guestd: which guest-physical frames to report (docs/guest-hints.md, "Guest →
 * host"): the pages of sensitive processes from their pagemaps, the page cache of
 * sensitive files, free frames from /proc/kpageflags; and drop-cache.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "guestd.h"

#define PAGEMAP_BATCH 512   /* pagemap or kpageflags entries read at once */
#define WINDOW_PAGES 4096   /* a file is mapped 16 MiB at a time */
#define MAX_WALK_FILES 4096 /* files visited for one path in the policy */
#define MAX_WALK_DEPTH 16
#define COMM_LEN 15 /* the kernel's TASK_COMM_LEN - 1 */

/* /proc/PID/pagemap (Documentation/admin-guide/mm/pagemap.rst) */
#define PM_PRESENT (1ull << 63)
#define PM_PFN_MASK ((1ull << 55) - 1)
/* /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h) */
#define KPF_BUDDY 10
#define KPF_HWPOISON 19
#define KPF_NOPAGE 20
#define KPF_OFFLINE 23
#define KPF_NOT_FREE ((1ull << KPF_HWPOISON) | (1ull << KPF_NOPAGE) | (1ull << KPF_OFFLINE))

/* statfs magics of file systems whose files are not page cache worth a walk */
#define PROC_SUPER_MAGIC 0x9fa0
#define SYSFS_MAGIC 0x62656572
#define DEBUGFS_MAGIC 0x64626720
#define TRACEFS_MAGIC 0x74726163
#define SECURITYFS_MAGIC 0x73636673
#define CGROUP_SUPER_MAGIC 0x27e0eb
#define CGROUP2_SUPER_MAGIC 0x63677270
#define DEVPTS_SUPER_MAGIC 0x1cd1
#define BPF_FS_MAGIC 0xcafe4a11

/* Guest-physical frames as bits; sized from /proc/kpageflags (max_pfn). */
struct frames {
    uint64_t *bits;
    uint64_t n;
};

/* A run of frames being merged before it is written as "<kind> <pfn> <count>". */
struct run {
    char kind;
    uint64_t start, len, total;
};

static struct frames sensitive, own;
static uint64_t zero_pfn = UINT64_MAX;
static int kpageflags = -1;
static sigjmp_buf bus_jump;
static volatile sig_atomic_t bus_armed;

/* ---- frame sets ---- */

static size_t frames_bytes(uint64_t n)
{
    return (n + 63) / 64 * 8;
}

/* Sizes both sets for n frames; on failure they keep their old size. */
static int frames_resize(uint64_t n)
{
    uint64_t *a = realloc(sensitive.bits, frames_bytes(n));
    if (!a)
        return -1;
    sensitive.bits = a;
    uint64_t *b = realloc(own.bits, frames_bytes(n));
    if (!b)
        return -1;
    own.bits = b;
    sensitive.n = own.n = n;
    return 0;
}

static void frames_clear(struct frames *f)
{
    memset(f->bits, 0, frames_bytes(f->n));
}

static void frames_add(struct frames *f, uint64_t pfn)
{
    if (pfn < f->n)
        f->bits[pfn / 64] |= 1ull << (pfn % 64);
}

static int frames_has(const struct frames *f, uint64_t pfn)
{
    return pfn < f->n && (f->bits[pfn / 64] >> (pfn % 64)) & 1;
}

static void run_add(struct run *r, uint64_t pfn)
{
    r->total++;
    if (r->len && pfn == r->start + r->len) {
        r->len++;
        return;
    }
    if (r->len)
        emit("%c %llu %llu", r->kind, (unsigned long long)r->start, (unsigned long long)r->len);
    r->start = pfn;
    r->len = 1;
}

static void run_end(struct run *r)
{
    if (r->len)
        emit("%c %llu %llu", r->kind, (unsigned long long)r->start, (unsigned long long)r->len);
    r->len = 0;
}

/* Frames in /proc/kpageflags: one past the highest pfn the kernel has a page for. */
static uint64_t count_frames(void)
{
    uint64_t flags[PAGEMAP_BATCH], n = 0;
    ssize_t got;
    while ((got = pread(kpageflags, flags, sizeof flags, (off_t)(n * 8))) > 0)
        n += (uint64_t)got / 8;
    return n;
}

/* ---- pages of processes ---- */

/* Marks the present pages of [start, end) in the address space whose pagemap is `pm`. */
static void mark_range(int pm, uint64_t start, uint64_t end, struct frames *into)
{
    uint64_t entries[PAGEMAP_BATCH];
    for (uint64_t va = start; va < end;) {
        uint64_t want = (end - va) / PAGE;
        if (want > PAGEMAP_BATCH)
            want = PAGEMAP_BATCH;
        ssize_t got = pread(pm, entries, want * 8, (off_t)(va / PAGE * 8));
        if (got <= 0)
            return;
        for (uint64_t i = 0; i < (uint64_t)got / 8; i++) {
            uint64_t pfn = entries[i] & PM_PFN_MASK;
            /* pfn 0 is what pagemap shows a reader without CAP_SYS_ADMIN */
            if ((entries[i] & PM_PRESENT) && pfn && pfn != zero_pfn)
                frames_add(into, pfn);
        }
        va += (uint64_t)got / 8 * PAGE;
    }
}

/* The kernel's own shared pages mapped into every process hold nothing of it. */
static int special_mapping(const char *name)
{
    return !strcmp(name, "[vvar]") || !strcmp(name, "[vdso]") || !strcmp(name, "[vsyscall]") || !strcmp(name, "[vvar_vclock]");
}

static void mark_process(const char *pid, struct frames *into)
{
    char path[64], line[PATH_MAX + 128];
    snprintf(path, sizeof path, "/proc/%s/maps", pid);
    FILE *maps = fopen(path, "re");
    snprintf(path, sizeof path, "/proc/%s/pagemap", pid);
    int pm = open(path, O_RDONLY | O_CLOEXEC);
    while (maps && pm >= 0 && fgets(line, sizeof line, maps)) {
        unsigned long long start, end;
        int name_at = -1;
        line[strcspn(line, "\n")] = 0;
        if (sscanf(line, "%llx-%llx %*s %*s %*s %*s %n", &start, &end, &name_at) < 2 || name_at < 0)
            continue;
        if (!special_mapping(line + name_at))
            mark_range(pm, start, end, into);
    }
    if (maps)
        fclose(maps);
    if (pm >= 0)
        close(pm);
}

/* The kernel keeps the first 15 bytes of a program's name; a longer name matches on those. */
static int comm_matches(const char *comm, const struct list *names)
{
    for (int i = 0; i < names->n; i++)
        if (!strncmp(comm, names->item[i], COMM_LEN) && strlen(comm) == strnlen(names->item[i], COMM_LEN))
            return 1;
    return 0;
}

/* A cgroup path names itself and everything below it. */
static int cgroup_matches(char *cgroups, const struct list *names)
{
    char *save;
    for (char *line = strtok_r(cgroups, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *path = strchr(line, ':');
        path = path ? strchr(path + 1, ':') : NULL;
        if (!path)
            continue;
        path++;
        for (int i = 0; i < names->n; i++) {
            size_t n = strlen(names->item[i]);
            if (!strcmp(names->item[i], "/") || (!strncmp(path, names->item[i], n) && (path[n] == 0 || path[n] == '/')))
                return 1;
        }
    }
    return 0;
}

static int process_matches(const char *pid, const struct policy *p)
{
    char path[64], buf[PAGE];
    snprintf(path, sizeof path, "/proc/%s/comm", pid);
    if (p->procs.n && read_small(path, buf, sizeof buf) == 0) {
        buf[strcspn(buf, "\n")] = 0;
        if (comm_matches(buf, &p->procs))
            return 1;
    }
    snprintf(path, sizeof path, "/proc/%s/cgroup", pid);
    return p->cgroups.n && read_small(path, buf, sizeof buf) == 0 && cgroup_matches(buf, &p->cgroups);
}

/* Marks the pages of every matching process but this one; returns how many matched. */
static int mark_processes(const struct policy *p, struct frames *into)
{
    char self[24];
    int matched = 0;
    snprintf(self, sizeof self, "%d", getpid());
    DIR *d = opendir("/proc");
    if (!d)
        return 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] < '1' || e->d_name[0] > '9' || !strcmp(e->d_name, self))
            continue;
        if (process_matches(e->d_name, p)) {
            matched++;
            mark_process(e->d_name, into);
        }
    }
    closedir(d);
    return matched;
}

/* ---- page cache of files ---- */

static void on_sigbus(int sig)
{
    (void)sig; /* only SIGBUS */
    if (bus_armed)
        siglongjmp(bus_jump, 1);
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS);
}

typedef void window_fn(uint8_t *map, size_t pages, const unsigned char *resident, void *ctx);

/* Calls fn for each 16 MiB window of a regular file, mapped read-only, with its mincore vector. */
static void each_window(int fd, window_fn *fn, void *ctx)
{
    static unsigned char resident[WINDOW_PAGES];
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        return;
    for (off_t at = 0; at < st.st_size; at += (off_t)WINDOW_PAGES * PAGE) {
        size_t len = st.st_size - at < (off_t)WINDOW_PAGES * PAGE ? (size_t)(st.st_size - at) : (size_t)WINDOW_PAGES * PAGE;
        size_t pages = (len + PAGE - 1) / PAGE;
        uint8_t *map = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, at);
        if (map == MAP_FAILED)
            return;
        if (mincore(map, len, resident) == 0)
            fn(map, pages, resident, ctx);
        munmap(map, len);
    }
}

static void count_window(uint8_t *map, size_t pages, const unsigned char *resident, void *ctx)
{
    (void)map;
    for (size_t i = 0; i < pages; i++)
        *(uint64_t *)ctx += resident[i] & 1;
}

/*
 * Touches only the resident pages (a touch of another would read it in), then reads
 * their frames. A file truncated under us raises SIGBUS on a touch: that ends the window.
 */
static void mark_window(uint8_t *map, size_t pages, const unsigned char *resident, void *ctx)
{
    static int self_pagemap = -1;
    uint64_t entries[PAGEMAP_BATCH];
    if (self_pagemap < 0)
        self_pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (self_pagemap < 0)
        return;
    bus_armed = 1;
    if (sigsetjmp(bus_jump, 1) == 0)
        for (size_t i = 0; i < pages; i++)
            if (resident[i] & 1)
                (void)*(volatile uint8_t *)(map + i * PAGE); /* SAFETY: i < pages, inside the mapping; SIGBUS is caught */
    bus_armed = 0;
    for (size_t i = 0; i < pages; i += PAGEMAP_BATCH) {
        size_t n = pages - i < PAGEMAP_BATCH ? pages - i : PAGEMAP_BATCH;
        ssize_t got = pread(self_pagemap, entries, n * 8, (off_t)((uintptr_t)(map + i * PAGE) / PAGE * 8));
        for (ssize_t k = 0; k < got / 8; k++)
            if ((resident[i + k] & 1) && (entries[k] & PM_PRESENT) && (entries[k] & PM_PFN_MASK))
                frames_add(ctx, entries[k] & PM_PFN_MASK);
    }
}

static int pseudo_fs(const char *path)
{
    struct statfs s;
    if (statfs(path, &s) != 0)
        return 1;
    switch ((unsigned long)s.f_type) {
    case PROC_SUPER_MAGIC: case SYSFS_MAGIC: case DEBUGFS_MAGIC: case TRACEFS_MAGIC: case SECURITYFS_MAGIC:
    case CGROUP_SUPER_MAGIC: case CGROUP2_SUPER_MAGIC: case DEVPTS_SUPER_MAGIC: case BPF_FS_MAGIC:
        return 1;
    }
    return 0;
}

typedef void file_fn(int fd, void *ctx);

struct walk {
    file_fn *fn;
    void *ctx;
    dev_t dev;
    int files;
};

/* Visits the regular files at and below path: no symlinks, no other file system, bounded. */
static void walk_at(struct walk *w, char *path, size_t len, int depth)
{
    struct stat st;
    if (w->files >= MAX_WALK_FILES || lstat(path, &st) != 0 || st.st_dev != w->dev)
        return;
    if (S_ISREG(st.st_mode)) {
        int fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd >= 0) {
            w->files++;
            w->fn(fd, w->ctx);
            close(fd);
        }
        return;
    }
    if (!S_ISDIR(st.st_mode) || depth >= MAX_WALK_DEPTH)
        return;
    DIR *d = opendir(path);
    if (!d)
        return;
    for (struct dirent *e; (e = readdir(d));) {
        size_t n = strlen(e->d_name);
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") || len + 1 + n >= PATH_MAX)
            continue;
        snprintf(path + len, PATH_MAX - len, "%s%s", len && path[len - 1] == '/' ? "" : "/", e->d_name);
        walk_at(w, path, strlen(path), depth + 1);
        path[len] = 0;
    }
    closedir(d);
}

/* Calls fn on each regular file the policy names; returns how many. */
static int walk_files(const struct list *files, file_fn *fn, void *ctx)
{
    char path[PATH_MAX];
    int total = 0;
    for (int i = 0; i < files->n; i++) {
        struct stat st;
        if (strlen(files->item[i]) >= PATH_MAX || lstat(files->item[i], &st) != 0 || pseudo_fs(files->item[i]))
            continue;
        struct walk w = { fn, ctx, st.st_dev, 0 };
        snprintf(path, sizeof path, "%s", files->item[i]);
        walk_at(&w, path, strlen(path), 0);
        total += w.files;
    }
    return total;
}

static void mark_file(int fd, void *ctx)
{
    each_window(fd, mark_window, ctx);
}

struct drop {
    uint64_t before, after;
};

static void drop_file(int fd, void *ctx)
{
    struct drop *d = ctx;
    each_window(fd, count_window, &d->before);
    /* Dirty pages are not dropped by DONTNEED: write them out first. */
    fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    each_window(fd, count_window, &d->after);
}

/* ---- reports ---- */


static void emit_sensitive(struct run *r)
{
    for (uint64_t w = 0; w < (sensitive.n + 63) / 64; w++)
        for (uint64_t b = sensitive.bits[w] & ~own.bits[w]; b; b &= b - 1)
            run_add(r, w * 64 + (uint64_t)__builtin_ctzll(b));
    run_end(r);
}

/* Free frames: BUDDY is set on every page of a free buddy block on Linux 6.1 (docs/guest-hints.md). */
static void emit_free(struct run *r)
{
    uint64_t flags[PAGEMAP_BATCH], pfn = 0;
    ssize_t got;
    if (kpageflags < 0)
        return;
    while ((got = pread(kpageflags, flags, sizeof flags, (off_t)(pfn * 8))) > 0 && !emit_broken()) {
        for (ssize_t i = 0; i < got / 8; i++, pfn++)
            if ((flags[i] >> KPF_BUDDY & 1) && !(flags[i] & KPF_NOT_FREE) && !frames_has(&sensitive, pfn) && !frames_has(&own, pfn))
                run_add(r, pfn);
    }
    run_end(r);
    /* Memory hot-added since the last report: size the sets for the next one. */
    if (pfn > sensitive.n && frames_resize(pfn) != 0)
        say("cannot grow the frame sets to %llu frames", (unsigned long long)pfn);
}

/* The sets are filled before the first line goes out, so the host waits on no scan mid-report. */
void write_report(const struct policy *p, unsigned long seq)
{
    struct run s = { 's', 0, 0, 0 }, f = { 'f', 0, 0, 0 };
    frames_clear(&sensitive);
    frames_clear(&own);
    mark_process("self", &own);
    int procs = mark_processes(p, &sensitive);
    walk_files(&p->files, mark_file, &sensitive);
    emit("report %lu begin", seq);
    emit_sensitive(&s);
    emit_free(&f);
    emit("report %lu end sensitive=%llu free=%llu procs=%d", seq, (unsigned long long)s.total, (unsigned long long)f.total, procs);
}

void drop_cache(const struct policy *p, int *files, uint64_t *pages)
{
    struct drop d = { 0, 0 };
    *files = walk_files(&p->files, drop_file, &d);
    *pages = d.before > d.after ? d.before - d.after : 0;
}

/* ---- setup ---- */

/* The frame of the kernel's shared zero page, which a read of untouched anonymous memory maps. */
static void find_zero_pfn(void)
{
    uint64_t entry;
    uint8_t *p = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (p != MAP_FAILED && pm >= 0) {
        (void)*(volatile uint8_t *)p; /* SAFETY: p is a live one-page mapping */
        if (pread(pm, &entry, 8, (off_t)((uintptr_t)p / PAGE * 8)) == 8 && (entry & PM_PRESENT))
            zero_pfn = entry & PM_PFN_MASK;
    }
    if (pm >= 0)
        close(pm);
    if (p != MAP_FAILED)
        munmap(p, PAGE);
}

int frames_setup(void)
{
    struct sigaction bus = { .sa_handler = on_sigbus };
    sigaction(SIGBUS, &bus, NULL);
    kpageflags = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
    uint64_t n = kpageflags >= 0 ? count_frames() : 0;
    if (kpageflags < 0)
        say("cannot open /proc/kpageflags (%s): no free frames will be reported", strerror(errno));
    if (n == 0)
        n = (uint64_t)sysconf(_SC_PHYS_PAGES) * 2; /* a guess that covers the PCI hole below 4 GiB */
    if (frames_resize(n) != 0) {
        say("cannot allocate frame sets for %llu frames", (unsigned long long)n);
        return -1;
    }
    find_zero_pfn();
    return 0;
}

uint64_t frames_total(void)
{
    return sensitive.n;
}

int free_frames_known(void)
{
    return kpageflags >= 0;
}
