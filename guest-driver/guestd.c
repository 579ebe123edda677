/*
 * lethe-guestd: the guest driver of the Lethe test guest (static, started by /init).
 *
 * It speaks the hint protocol of docs/guest-hints.md on the virtio-serial port named
 * org.lethe.hint: the host sends a policy naming sensitive processes, cgroups and
 * files; the driver reports which guest-physical frames hold their pages and which
 * frames are free, and drops the page cache of the sensitive files on request.
 *
 * The host may go away and come back at any time (QEMU's socket chardev has one
 * client at a time); the driver keeps its policy, waits, and says hello again.
 * Console lines (one at start and one per problem, never per report):
 *   LETHE-GUESTD started port=DEV frames=N free-pages=yes|no
 *   LETHE-GUESTD <what went wrong>
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

/* ---- protocol constants (docs/guest-hints.md) ---- */

#define PROTOCOL_VERSION 1
#define MAX_LINE 4096 /* bytes, the '\n' included */
#define MAX_ITEMS 128 /* names in one policy list */
#define MIN_INTERVAL_MS 100
#define MAX_INTERVAL_MS 86400000L
#define PORT_NAME "org.lethe.hint"

/* ---- implementation constants ---- */

#define PAGE 4096
#define PAGEMAP_BATCH 512     /* pagemap or kpageflags entries read at once */
#define WINDOW_PAGES 4096     /* a file is mapped 16 MiB at a time */
#define MAX_WALK_FILES 4096   /* files visited for one directory in the policy */
#define MAX_WALK_DEPTH 16
#define HOST_WAIT_MS 1000     /* between looks at a disconnected port (SIGIO wakes sooner) */
#define WRITE_TIMEOUT_MS 5000 /* a host that reads nothing this long loses the report */
#define COMM_LEN 15           /* the kernel's TASK_COMM_LEN - 1 */

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

struct list {
    int n;
    char *item[MAX_ITEMS];
};

struct policy {
    long interval_ms; /* 0: report only when asked */
    struct list procs, cgroups, files;
    char arena[MAX_LINE]; /* the decoded names */
};

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

static struct policy policies[2];
static struct policy *policy = &policies[0];
static struct frames sensitive, own;
static uint64_t zero_pfn = UINT64_MAX;
static int kpageflags = -1;

static int port = -1;
static int host_up;
static int wake_pipe[2] = { -1, -1 };
static char out[PAGE];
static size_t out_len;
static int out_broken;
static char in[MAX_LINE];
static size_t in_len;
static int in_overlong;

static sigjmp_buf bus_jump;
static volatile sig_atomic_t bus_armed;

static unsigned long report_seq;
static long long next_report_ms = -1;

/* ---- console ---- */

static void say(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("LETHE-GUESTD %s\n", msg);
}

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* ---- output to the host ---- */

/* Writes the buffer out; a host that hangs up or stops reading loses the rest of this message. */
static int flush_out(void)
{
    size_t done = 0;
    while (!out_broken && done < out_len) {
        ssize_t n = write(port, out + done, out_len - done);
        if (n > 0) {
            done += (size_t)n;
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
            out_broken = 1;
            break;
        }
        struct pollfd p = { port, POLLOUT, 0 };
        int r = poll(&p, 1, WRITE_TIMEOUT_MS);
        if (r == 0 || (r > 0 && (p.revents & POLLHUP)))
            out_broken = 1;
        if (r > 0 && (p.revents & POLLHUP))
            host_up = 0;
    }
    out_len = 0;
    return out_broken ? -1 : 0;
}

static void emit(const char *fmt, ...)
{
    char line[MAX_LINE];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0 || out_broken)
        return;
    if ((size_t)n > sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    if (out_len + (size_t)n > sizeof out)
        flush_out();
    memcpy(out + out_len, line, (size_t)n);
    out_len += (size_t)n;
}

/* One message: a line or a whole report, written out at its end. */
static void begin_message(void)
{
    out_broken = 0;
    out_len = 0;
}

static void send_line(const char *fmt, ...)
{
    char line[MAX_LINE];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    begin_message();
    emit("%s", line);
    flush_out();
}

static void hello(void)
{
    send_line("hello lethe-guestd %d", PROTOCOL_VERSION);
}

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

static int read_small(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = 0;
    return 0;
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

/*
 * Calls fn for each window of a file mapped read-only with its mincore vector.
 * A file truncated under us raises SIGBUS on touch; the handler ends that window.
 */
typedef void window_fn(uint8_t *map, size_t pages, const unsigned char *resident, void *ctx);

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

/* Touches only the resident pages (a touch of another would read it in), then reads their frames. */
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
                (void)*(volatile uint8_t *)(map + i * PAGE);
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
    while ((got = pread(kpageflags, flags, sizeof flags, (off_t)(pfn * 8))) > 0 && !out_broken) {
        for (ssize_t i = 0; i < got / 8; i++, pfn++)
            if ((flags[i] >> KPF_BUDDY & 1) && !(flags[i] & KPF_NOT_FREE) && !frames_has(&sensitive, pfn) && !frames_has(&own, pfn))
                run_add(r, pfn);
    }
    run_end(r);
    /* Memory hot-added since the last report: size the sets for the next one. */
    if (pfn > sensitive.n && frames_resize(pfn) != 0)
        say("cannot grow the frame sets to %llu frames", (unsigned long long)pfn);
}

static void report(void)
{
    struct run s = { 's', 0, 0, 0 }, f = { 'f', 0, 0, 0 };
    frames_clear(&sensitive);
    frames_clear(&own);
    mark_process("self", &own);
    int procs = mark_processes(policy, &sensitive);
    walk_files(&policy->files, mark_file, &sensitive);
    begin_message();
    report_seq++;
    emit("report %lu begin", report_seq);
    emit_sensitive(&s);
    emit_free(&f);
    emit("report %lu end sensitive=%llu free=%llu procs=%d", report_seq, (unsigned long long)s.total, (unsigned long long)f.total, procs);
    flush_out();
    next_report_ms = policy->interval_ms ? now_ms() + policy->interval_ms : -1;
}

static void drop_cache(void)
{
    struct drop d = { 0, 0 };
    int files = walk_files(&policy->files, drop_file, &d);
    send_line("dropped files=%d pages=%llu", files, (unsigned long long)(d.before > d.after ? d.before - d.after : 0));
}

/* ---- commands ---- */

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decodes src (one name, percent-encoded) to dst; returns the bytes written or -1. */
static int percent_decode(const char *src, size_t len, char *dst)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] != '%') {
            dst[n++] = src[i];
            continue;
        }
        int hi = i + 2 < len ? hex_value(src[i + 1]) : -1;
        int lo = hi >= 0 ? hex_value(src[i + 2]) : -1;
        if (lo < 0 || (hi == 0 && lo == 0))
            return -1;
        dst[n++] = (char)(hi * 16 + lo);
        i += 2;
    }
    dst[n] = 0;
    return (int)n;
}

/* Fills list from "a,b,c" (may be empty); *arena advances past the names. */
static const char *parse_list(const char *value, struct list *list, char **arena, int paths)
{
    list->n = 0;
    for (const char *at = value; *value;) { /* an empty value is an empty list */
        const char *end = strchr(at, ',');
        size_t len = end ? (size_t)(end - at) : strlen(at);
        if (len == 0)
            return "empty name in";
        if (list->n == MAX_ITEMS)
            return "too many names in";
        int n = percent_decode(at, len, *arena);
        if (n < 0)
            return "bad percent-encoding in";
        if (paths && (*arena)[0] != '/')
            return "a path that is not absolute in";
        list->item[list->n++] = *arena;
        *arena += n + 1;
        if (!end)
            break;
        at = end + 1;
    }
    return NULL;
}

static int parse_interval(const char *v, long *ms)
{
    size_t digits = strspn(v, "0123456789");
    if (digits == 0 || digits != strlen(v) || digits > 9 || (v[0] == '0' && v[1]))
        return -1;
    long n = atol(v);
    if (n > MAX_INTERVAL_MS || (n > 0 && n < MIN_INTERVAL_MS))
        return -1;
    *ms = n;
    return 0;
}

static const char *const POLICY_KEYS[] = { "interval", "procs", "cgroups", "files" };

/* Parses "interval=… procs=… cgroups=… files=…" (any order) into p; writes an error reason to why. */
static int parse_policy(char *args, struct policy *p, char *why, size_t size)
{
    char *arena = p->arena;
    int seen[4] = { 0 };
    char *save;
    for (char *field = strtok_r(args, " ", &save); field; field = strtok_r(NULL, " ", &save)) {
        char *eq = strchr(field, '=');
        int k = 4;
        if (eq)
            for (*eq = 0, k = 0; k < 4 && strcmp(field, POLICY_KEYS[k]); k++)
                ;
        if (k == 4) {
            snprintf(why, size, "unknown policy field '%.32s'", field);
            return -1;
        }
        if (seen[k]++) {
            snprintf(why, size, "duplicate policy field '%s'", field);
            return -1;
        }
        const char *bad = NULL;
        if (k == 0 && parse_interval(eq + 1, &p->interval_ms)) {
            snprintf(why, size, "bad interval '%.32s' (0, or %d to %ld ms)", eq + 1, MIN_INTERVAL_MS, MAX_INTERVAL_MS);
            return -1;
        }
        if (k == 1)
            bad = parse_list(eq + 1, &p->procs, &arena, 0);
        else if (k == 2)
            bad = parse_list(eq + 1, &p->cgroups, &arena, 1);
        else if (k == 3)
            bad = parse_list(eq + 1, &p->files, &arena, 1);
        if (bad) {
            snprintf(why, size, "%s %s", bad, field);
            return -1;
        }
    }
    for (int k = 0; k < 4; k++)
        if (!seen[k]) {
            snprintf(why, size, "missing policy field '%s'", POLICY_KEYS[k]);
            return -1;
        }
    return 0;
}

static void set_policy(char *args)
{
    struct policy *next = policy == &policies[0] ? &policies[1] : &policies[0];
    char why[128];
    memset(next, 0, sizeof *next);
    if (parse_policy(args, next, why, sizeof why)) {
        send_line("error %s", why);
        return;
    }
    policy = next;
    send_line("ok policy");
    report();
}

static void handle_line(char *line, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)line[i] < 0x20 || (unsigned char)line[i] > 0x7e) {
            send_line("error non-printable byte in line");
            return;
        }
    line[len] = 0;
    char *args = strchr(line, ' ');
    if (args)
        *args++ = 0;
    if (!strcmp(line, "policy"))
        set_policy(args ? args : line + len);
    else if (args)
        send_line("error %.32s takes no arguments", line);
    else if (!strcmp(line, "report"))
        report();
    else if (!strcmp(line, "drop-cache"))
        drop_cache();
    else if (!strcmp(line, "hello"))
        hello();
    else
        send_line("error unknown command '%.32s'", line);
}

static void handle_input(const char *buf, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (buf[i] == '\n') {
            if (in_overlong)
                send_line("error line too long");
            else
                handle_line(in, in_len);
            in_len = 0;
            in_overlong = 0;
        } else if (in_len == MAX_LINE - 1) {
            in_overlong = 1;
            in_len = 0;
        } else if (!in_overlong) {
            in[in_len++] = buf[i];
        }
    }
}

/* ---- the port ---- */

static void on_sigio(int sig)
{
    (void)sig;
    int saved = errno;
    if (write(wake_pipe[1], "", 1) < 0) {
        /* the pipe is full: a wake-up is pending anyway */
    }
    errno = saved;
}

/* The /dev path of the virtio-serial port named PORT_NAME. */
static int find_port(char *dev, size_t size)
{
    char path[PATH_MAX], name[64];
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return -1;
    int found = -1;
    for (struct dirent *e; found < 0 && (e = readdir(d));) {
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        if (e->d_name[0] == '.' || read_small(path, name, sizeof name) != 0)
            continue;
        name[strcspn(name, "\n")] = 0;
        if (!strcmp(name, PORT_NAME)) {
            snprintf(dev, size, "/dev/%s", e->d_name);
            found = 0;
        }
    }
    closedir(d);
    return found;
}

/*
 * The host side's state changes raise SIGIO on the port (Linux virtio_console), so a
 * driver waiting for a host wakes at once; a disconnected port polls POLLHUP.
 */
static int open_port(const char *dev)
{
    int fd = open(dev, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (fcntl(fd, F_SETOWN, getpid()) != 0 || fcntl(fd, F_SETFL, O_NONBLOCK | O_ASYNC) != 0)
        say("no SIGIO from %s (%s); a returning host is noticed within %d ms", dev, strerror(errno), HOST_WAIT_MS);
    return fd;
}

static int host_connected(void)
{
    struct pollfd p = { port, POLLIN, 0 };
    return poll(&p, 1, 0) >= 0 && !(p.revents & (POLLHUP | POLLERR));
}

static void wait_for_wake(int timeout_ms)
{
    char drain[64];
    struct pollfd p = { wake_pipe[0], POLLIN, 0 };
    if (poll(&p, 1, timeout_ms) > 0)
        while (read(wake_pipe[0], drain, sizeof drain) > 0)
            ;
}

static void host_arrived(void)
{
    host_up = 1;
    in_len = 0;
    in_overlong = 0;
    hello();
    if (policy->interval_ms && next_report_ms < 0)
        next_report_ms = now_ms() + policy->interval_ms;
}

static void host_left(void)
{
    host_up = 0;
    say("the host hung up; waiting for it to come back");
}

/* Reads what the host sent; returns -1 when it has gone. */
static int read_port(void)
{
    char buf[PAGE];
    ssize_t n = read(port, buf, sizeof buf);
    if (n > 0)
        handle_input(buf, (size_t)n);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) ? -1 : 0;
}

/* poll's timeout: -1 without periodic reports */
static int until_report(void)
{
    if (next_report_ms < 0)
        return -1;
    long long wait = next_report_ms - now_ms();
    return wait <= 0 ? 0 : wait > INT_MAX ? INT_MAX : (int)wait;
}

static void serve(void)
{
    for (;;) {
        if (!host_up) {
            if (host_connected())
                host_arrived();
            else
                wait_for_wake(HOST_WAIT_MS);
            continue;
        }
        struct pollfd p = { port, POLLIN, 0 };
        int r = poll(&p, 1, until_report());
        if (r > 0 && (p.revents & POLLIN) && read_port() < 0)
            p.revents |= POLLHUP;
        if (r > 0 && (p.revents & (POLLHUP | POLLERR))) {
            host_left();
            continue;
        }
        if (next_report_ms >= 0 && now_ms() >= next_report_ms)
            report();
        if (!host_up)
            host_left();
    }
}

/* The frame of the kernel's shared zero page, which a read of untouched anonymous memory maps. */
static void find_zero_pfn(void)
{
    uint64_t entry;
    uint8_t *p = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (p != MAP_FAILED && pm >= 0) {
        (void)*(volatile uint8_t *)p;
        if (pread(pm, &entry, 8, (off_t)((uintptr_t)p / PAGE * 8)) == 8 && (entry & PM_PRESENT))
            zero_pfn = entry & PM_PFN_MASK;
    }
    if (pm >= 0)
        close(pm);
    if (p != MAP_FAILED)
        munmap(p, PAGE);
}

static int setup(void)
{
    struct sigaction bus = { .sa_handler = on_sigbus }, io = { .sa_handler = on_sigio, .sa_flags = SA_RESTART };
    sigaction(SIGBUS, &bus, NULL);
    sigaction(SIGIO, &io, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (pipe2(wake_pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
        say("cannot make a pipe: %s", strerror(errno));
        return -1;
    }
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

int main(int argc, char **argv)
{
    char dev[PATH_MAX];
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1)
        snprintf(dev, sizeof dev, "%s", argv[1]);
    else if (find_port(dev, sizeof dev) != 0) {
        say("no virtio-serial port named %s (hint: start QEMU with a virtserialport of that name)", PORT_NAME);
        return 1;
    }
    if (setup() != 0)
        return 1;
    for (int said = 0; (port = open_port(dev)) < 0; said = 1, sleep(1))
        if (!said)
            say("cannot open %s (%s); retrying every second", dev, strerror(errno));
    say("started port=%s frames=%llu free-pages=%s", dev, (unsigned long long)sensitive.n, kpageflags >= 0 ? "yes" : "no");
    serve();
}
