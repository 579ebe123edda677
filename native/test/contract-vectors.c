/* The C side of test/vectors/contracts-v1.txt: parses each policy line with the
 * guest driver's own parser (guestd-policy.c) and compares what it got, or why it
 * refused, with the vector; lays out each hello the way the shim does
 * (native/lethe-uffd.h) and compares its bytes. Prints one line per mismatch and
 * "ok N" at the end; exits 1 on any mismatch. Built and run by
 * test/unit/contract-vectors.test.ts. */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "guestd.h"
#include "lethe-uffd.h"

static int failures, checked;

static void dump_list(char *out, size_t size, const char *key, const struct list *l)
{
    size_t n = strlen(out);
    n += snprintf(out + n, size - n, " %s=", key);
    for (int i = 0; i < l->n && n < size; i++)
        n += snprintf(out + n, size - n, "[%s]", l->item[i]);
}

static void check_policy(const char *line, const char *want_kind, const char *want, int lineno)
{
    static struct policy p;
    char args[MAX_LINE], why[256] = "", got[2 * MAX_LINE] = "";
    if (strncmp(line, "policy ", 7) != 0) {
        printf("line %d: not a policy line\n", lineno);
        failures++;
        return;
    }
    /* SAFETY: a vector line is shorter than MAX_LINE (the reader's buffer is that size). */
    snprintf(args, sizeof args, "%s", line + 7);
    int rc = parse_policy(args, &p, why, sizeof why);
    if (rc == 0) {
        snprintf(got, sizeof got, "interval=%ld", p.interval_ms);
        dump_list(got, sizeof got, "procs", &p.procs);
        dump_list(got, sizeof got, "cgroups", &p.cgroups);
        dump_list(got, sizeof got, "files", &p.files);
    }
    const char *kind = rc == 0 ? "policy-parsed" : "policy-refused";
    const char *text = rc == 0 ? got : why;
    checked++;
    if (strcmp(kind, want_kind) != 0 || strcmp(text, want) != 0) {
        printf("line %d: %s %s, expected %s %s\n", lineno, kind, text, want_kind, want);
        failures++;
    }
}

static void check_hello(const char *fields, const char *want_hex, int lineno)
{
    struct lethe_uffd_hello h = { .magic = LETHE_UFFD_MAGIC, .version = LETHE_UFFD_VERSION, .header_bytes = sizeof h };
    unsigned long long base, length, offset, ioctls;
    if (sscanf(fields, "pid=%" SCNu32 " page_size=%" SCNu32 " base=%llx length=%llx offset=%llx ioctls=%llx", &h.pid, &h.page_size, &base, &length, &offset, &ioctls) != 6) {
        printf("line %d: cannot read the hello fields\n", lineno);
        failures++;
        return;
    }
    h.base = base, h.length = length, h.offset = offset, h.ioctls = ioctls;
    char hex[2 * sizeof h + 1];
    const unsigned char *b = (const unsigned char *)&h;
    for (size_t i = 0; i < sizeof h; i++)
        sprintf(hex + 2 * i, "%02x", b[i]);
    checked++;
    if (strcmp(hex, want_hex) != 0) {
        printf("line %d: hello-bytes %s, expected %s\n", lineno, hex, want_hex);
        failures++;
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s VECTORS\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "r");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    char line[MAX_LINE], pending[MAX_LINE] = "";
    const char *pending_kind = "";
    int lineno = 0, pending_line = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        line[strcspn(line, "\n")] = 0;
        char *sp = strchr(line, ' ');
        if (line[0] == '#' || !sp)
            continue;
        *sp = 0;
        const char *key = line, *value = sp + 1;
        if (!strcmp(key, "policy-line") || !strcmp(key, "hello-fields")) {
            snprintf(pending, sizeof pending, "%s", value);
            pending_kind = !strcmp(key, "policy-line") ? "policy-line" : "hello-fields";
            pending_line = lineno;
        } else if ((!strcmp(key, "policy-parsed") || !strcmp(key, "policy-refused")) && !strcmp(pending_kind, "policy-line")) {
            check_policy(pending, key, value, pending_line);
        } else if (!strcmp(key, "hello-bytes") && !strcmp(pending_kind, "hello-fields")) {
            check_hello(pending, value, pending_line);
        }
    }
    fclose(f);
    printf("ok %d\n", checked);
    return failures ? 1 : 0;
}
