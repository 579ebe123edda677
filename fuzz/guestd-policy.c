/* libFuzzer target: lethe-guestd's policy-line parser (guest-driver/guestd-policy.c),
 * which reads what the host sends and must never overrun its arena, whatever the line.
 * Built with ASan and UBSan by scripts/fuzz. */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "../guest-driver/guestd.h"

/* The daemon passes the text after "policy " of one line shorter than MAX_LINE,
 * without its newline (guestd.c): nothing longer, no NUL or newline inside. */
static int as_the_daemon_would_pass_it(const uint8_t *data, size_t size)
{
    return size < MAX_LINE - 7 && !memchr(data, 0, size) && !memchr(data, '\n', size);
}

static void check_list(const struct policy *p, const struct list *l, int paths)
{
    assert(l->n >= 0 && l->n <= MAX_ITEMS);
    for (int i = 0; i < l->n; i++) {
        /* SAFETY: every name must lie inside the arena and end there with its NUL. */
        assert(l->item[i] >= p->arena && l->item[i] < p->arena + sizeof p->arena);
        size_t room = (size_t)(p->arena + sizeof p->arena - l->item[i]);
        assert(memchr(l->item[i], 0, room) != NULL);
        assert(!paths || l->item[i][0] == '/');
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct policy p;
    char line[MAX_LINE];
    char why[128];
    if (!as_the_daemon_would_pass_it(data, size))
        return 0;
    memcpy(line, data, size);
    line[size] = 0;
    memset(&p, 0, sizeof p);
    memset(why, 0, sizeof why);
    if (parse_policy(line, &p, why, sizeof why) == 0) {
        assert(p.interval_ms == 0 || (p.interval_ms >= MIN_INTERVAL_MS && p.interval_ms <= MAX_INTERVAL_MS));
        check_list(&p, &p.procs, 0);
        check_list(&p, &p.cgroups, 1);
        check_list(&p, &p.files, 1);
    } else {
        /* A refusal always says why, in the buffer it was given. */
        assert(why[0] != 0 && memchr(why, 0, sizeof why) != NULL);
    }
    return 0;
}
