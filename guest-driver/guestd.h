/* lethe-guestd's parts (docs/guest-hints.md): guestd.c talks to the host,
 * guestd-policy.c parses policies, guestd-frames.c finds the frames to report. */
#ifndef LETHE_GUESTD_H
#define LETHE_GUESTD_H

#include <stddef.h>
#include <stdint.h>

/* ---- protocol constants (docs/guest-hints.md) ---- */

#define PROTOCOL_VERSION 1
#define MAX_LINE 4096 /* bytes, the '\n' included */
#define MAX_ITEMS 128 /* names in one policy list */
#define MIN_INTERVAL_MS 100
#define MAX_INTERVAL_MS 86400000L
#define PORT_NAME "org.lethe.hint"

#define PAGE 4096 /* the guest's page size, x86-64 */

struct list {
    int n;
    char *item[MAX_ITEMS];
};

struct policy {
    long interval_ms; /* 0: report only when asked */
    struct list procs, cgroups, files;
    char arena[MAX_LINE]; /* the decoded names */
};

/* guestd.c */
void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Appends a line to the message being written to the host; a no-op once the host is lost. */
void emit(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int emit_broken(void);
int read_small(const char *path, char *buf, size_t size);

/* guestd-policy.c: parses "interval=… procs=… cgroups=… files=…" into p, or writes why not */
int parse_policy(char *args, struct policy *p, char *why, size_t size);

/* guestd-frames.c */
int frames_setup(void);
uint64_t frames_total(void);
int free_frames_known(void);
/* Emits a report block: "report <seq> begin", the runs, the end line. */
void write_report(const struct policy *p, unsigned long seq);
void drop_cache(const struct policy *p, int *files, uint64_t *pages);

#endif
