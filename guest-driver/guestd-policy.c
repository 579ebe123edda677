/* lethe-guestd: the policy line (docs/guest-hints.md, "Host → guest"). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "guestd.h"

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

/* Fields come in any order; the error reasons are docs/guest-hints.md's. */
int parse_policy(char *args, struct policy *p, char *why, size_t size)
{
    /* SAFETY: the decoded names and their NULs never outgrow the arena: each name
     * decodes to at most its own encoded length, and a name's NUL takes the place of
     * the comma or space after it; args is one line, shorter than MAX_LINE = sizeof arena. */
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
