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
 * This file talks to the host; guestd-policy.c parses policies and guestd-frames.c
 * finds the frames to report.
 *
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
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "guestd.h"

#define HOST_WAIT_MS 1000     /* between looks at a disconnected port (SIGIO wakes sooner) */
#define WRITE_TIMEOUT_MS 5000 /* a host that reads nothing this long loses the message */

static struct policy policies[2];
static struct policy *policy = &policies[0];
static unsigned long report_seq;
static long long next_report_ms = -1;

static int port = -1;
static int host_up;
static int wake_pipe[2] = { -1, -1 };
static char out[PAGE];
static size_t out_len;
static int out_broken;
static char in[MAX_LINE];
static size_t in_len;
static int in_overlong;

/* ---- console ---- */

void say(const char *fmt, ...)
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
        /* POLLERR or POLLNVAL without POLLHUP would otherwise spin on EAGAIN. */
        if (r == 0 || (r > 0 && (p.revents & (POLLHUP | POLLERR | POLLNVAL))))
            out_broken = 1;
        if (r > 0 && (p.revents & POLLHUP))
            host_up = 0;
    }
    out_len = 0;
    return out_broken ? -1 : 0;
}

void emit(const char *fmt, ...)
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

int emit_broken(void)
{
    return out_broken;
}

int read_small(const char *path, char *buf, size_t size)
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

/* ---- commands ---- */

static void report(void)
{
    begin_message();
    write_report(policy, ++report_seq);
    flush_out();
    next_report_ms = policy->interval_ms ? now_ms() + policy->interval_ms : -1;
}

static void drop(void)
{
    int files;
    uint64_t pages;
    drop_cache(policy, &files, &pages);
    send_line("dropped files=%d pages=%llu", files, (unsigned long long)pages);
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
        drop();
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

static int setup(void)
{
    struct sigaction io = { .sa_handler = on_sigio, .sa_flags = SA_RESTART };
    sigaction(SIGIO, &io, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (pipe2(wake_pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
        say("cannot make a pipe: %s", strerror(errno));
        return -1;
    }
    return frames_setup();
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
    say("started port=%s frames=%llu free-pages=%s", dev, (unsigned long long)frames_total(), free_frames_known() ? "yes" : "no");
    serve();
}
