/* liblethe-uffd-shim.so: preloaded into QEMU (LD_PRELOAD) so that every page of guest
 * RAM that is missing from the RAM file is served by the Lethe agent, never by the
 * kernel's zero-fill (docs/uffd.md, DESIGN.md invariant 7).
 *
 * When QEMU maps the file named by LETHE_RAM_PATH (same st_dev/st_ino) MAP_SHARED, the
 * shim registers the mapping with a new userfaultfd in MISSING mode, hands the uffd to
 * the agent at LETHE_UFFD_SOCKET and keeps its own copy open, then watches that socket:
 * when it closes, the agent is gone and the shim kills QEMU.
 *
 * Keeping the uffd open here matters: a userfaultfd whose last reference closes
 * unregisters its ranges and wakes every blocked fault, which the kernel then fills with
 * zeros. Because QEMU holds a reference, an agent that dies leaves faulting vCPUs
 * blocked until the watchdog's SIGKILL, never running on zero pages.
 *
 * Every failure prints one "lethe-uffd-shim: …" line and aborts QEMU (without a core
 * dump, which would hold guest RAM). Without LETHE_RAM_PATH the shim does nothing. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "lethe-uffd.h"

#define PREFIX "lethe-uffd-shim: "
#define UFFD_FLAGS (O_CLOEXEC | O_NONBLOCK)
#define NEEDED_IOCTLS ((1ULL << _UFFDIO_COPY) | (1ULL << _UFFDIO_ZEROPAGE) | (1ULL << _UFFDIO_WAKE))

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);

static mmap_fn real_mmap;
static const char *ram_path;
static const char *socket_path;
static struct stat ram_stat;

static void say(const char *fmt, va_list ap)
{
	char line[512];
	int n = snprintf(line, sizeof line, PREFIX);
	n += vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
	if (n > (int)sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	(void)!write(STDERR_FILENO, line, n);
}

__attribute__((noreturn, format(printf, 1, 2))) static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	say(fmt, ap);
	va_end(ap);
	prctl(PR_SET_DUMPABLE, 0); /* no core dump: it would hold guest RAM */
	abort();
}

__attribute__((constructor)) static void shim_init(void)
{
	real_mmap = (mmap_fn)dlsym(RTLD_NEXT, "mmap");
	if (!real_mmap)
		die("cannot find the real mmap: %s", dlerror());
	ram_path = getenv("LETHE_RAM_PATH");
	if (!ram_path || !*ram_path)
		return; /* preloaded without a RAM file: pass through */
	socket_path = getenv("LETHE_UFFD_SOCKET");
	if (!socket_path || !*socket_path)
		die("LETHE_RAM_PATH is set but LETHE_UFFD_SOCKET is not");
	if (strlen(socket_path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
		die("LETHE_UFFD_SOCKET '%s' is too long for a unix socket path", socket_path);
	if (stat(ram_path, &ram_stat) != 0)
		die("cannot stat LETHE_RAM_PATH '%s': %s", ram_path, strerror(errno));
}

static int is_ram_file(int fd)
{
	struct stat st;
	return ram_path && fd >= 0 && fstat(fd, &st) == 0 && st.st_dev == ram_stat.st_dev &&
	       st.st_ino == ram_stat.st_ino;
}

/* /dev/userfaultfd first (no CAP_SYS_PTRACE needed, kernel 6.1+), then the syscall.
 * Never UFFD_USER_MODE_ONLY: KVM touches guest RAM from kernel mode. */
static int open_uffd(void)
{
	int dev_errno = 0;
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev >= 0) {
		/* SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value and returns a new fd */
		int fd = ioctl(dev, USERFAULTFD_IOC_NEW, UFFD_FLAGS);
		dev_errno = errno;
		close(dev);
		if (fd >= 0)
			return fd;
	} else {
		dev_errno = errno;
	}
	int fd = syscall(SYS_userfaultfd, UFFD_FLAGS);
	if (fd < 0)
		die("cannot open a userfaultfd: /dev/userfaultfd: %s; userfaultfd(2): %s "
		    "(hint: give QEMU's user access to /dev/userfaultfd)",
		    strerror(dev_errno), strerror(errno));
	return fd;
}

/* Registers [base, base+length) for MISSING faults; returns the range's ioctls mask. */
static uint64_t register_range(int uffd, void *base, size_t length)
{
	/* THREAD_ID: each fault names its thread, so the agent tells a vCPU's faults from the main loop's. */
	struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_THREAD_ID };
	/* SAFETY: api is a live stack struct the kernel reads and fills in */
	if (ioctl(uffd, UFFDIO_API, &api) != 0)
		die("UFFDIO_API with UFFD_FEATURE_MISSING_SHMEM and UFFD_FEATURE_THREAD_ID failed: %s (they need Linux 4.14+)",
		    strerror(errno));
	struct uffdio_register reg = {
		.range = { .start = (uintptr_t)base, .len = length },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};
	/* SAFETY: the range is the mapping mmap just returned to this thread; reg lives on the stack */
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0)
		die("UFFDIO_REGISTER of %zu bytes at %p failed: %s (is '%s' on tmpfs or a memfd?)", length, base,
		    strerror(errno), ram_path);
	if ((reg.ioctls & NEEDED_IOCTLS) != NEEDED_IOCTLS)
		die("the kernel offers ioctls 0x%llx for the RAM mapping; COPY, ZEROPAGE and WAKE are needed",
		    (unsigned long long)reg.ioctls);
	return reg.ioctls;
}

static int connect_agent(void)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	strcpy(addr.sun_path, socket_path); /* length checked in shim_init */
	int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		die("cannot make a unix socket: %s", strerror(errno));
	if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0)
		die("cannot connect to the agent at '%s': %s", socket_path, strerror(errno));
	return sock;
}

static void send_hello(int sock, int uffd, const struct lethe_uffd_hello *hello)
{
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} control = { 0 };
	struct iovec iov = { .iov_base = (void *)hello, .iov_len = sizeof *hello };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
			      .msg_controllen = sizeof control.buf };
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	/* SAFETY: CMSG_DATA points into control.buf, sized by CMSG_SPACE for one int */
	memcpy(CMSG_DATA(c), &uffd, sizeof uffd);
	ssize_t n;
	do
		n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n != (ssize_t)sizeof *hello)
		die("cannot send the userfaultfd to the agent at '%s': %s", socket_path,
		    n < 0 ? strerror(errno) : "short write");
}

/* The agent never writes after the handshake; end of file or an error means it is gone. */
static void *watchdog(void *arg)
{
	int sock = (int)(intptr_t)arg;
	char buf[64];
	ssize_t n;
	do
		n = recv(sock, buf, sizeof buf, 0);
	while (n > 0 || (n < 0 && errno == EINTR));
	char line[200];
	int len = snprintf(line, sizeof line,
			   PREFIX "the agent's socket closed (%s); killing this process so the guest "
				  "never runs on zero-filled pages\n",
			   n == 0 ? "end of file" : strerror(errno));
	(void)!write(STDERR_FILENO, line, len);
	kill(getpid(), SIGKILL);
	_exit(137); /* not reached */
}

static void start_watchdog(int sock)
{
	sigset_t all, old;
	sigfillset(&all);
	/* The thread inherits a mask with every signal blocked, so QEMU's handlers never run on it. */
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_t t;
	int err = pthread_create(&t, NULL, watchdog, (void *)(intptr_t)sock);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err != 0)
		die("cannot start the watchdog thread: %s", strerror(err));
	pthread_detach(t);
}

static void attach(void *base, size_t length, int flags, off_t offset)
{
	int type = flags & MAP_TYPE;
	if (type != MAP_SHARED && type != MAP_SHARED_VALIDATE)
		die("'%s' is mapped private (flags 0x%x); its pages would never reach the agent "
		    "(hint: memory-backend-file needs share=on)",
		    ram_path, flags);
	long page = sysconf(_SC_PAGESIZE);
	length = (length + page - 1) & ~(size_t)(page - 1);
	int uffd = open_uffd();
	struct lethe_uffd_hello hello = {
		.magic = LETHE_UFFD_MAGIC,
		.version = LETHE_UFFD_VERSION,
		.header_bytes = sizeof hello,
		.pid = (uint32_t)getpid(),
		.page_size = (uint32_t)page,
		.base = (uintptr_t)base,
		.length = length,
		.offset = (uint64_t)offset,
	};
	hello.ioctls = register_range(uffd, base, length);
	int sock = connect_agent();
	send_hello(sock, uffd, &hello);
	start_watchdog(sock);
	/* uffd stays open for the life of the process: see the comment at the top. */
}

void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
	/* mmap before shim_init ran (another constructor): go straight to the kernel. */
	void *p = real_mmap ? real_mmap(addr, length, prot, flags, fd, offset)
			    : (void *)syscall(SYS_mmap, addr, length, prot, flags, fd, offset);
	if (p != MAP_FAILED && is_ram_file(fd))
		attach(p, length, flags, offset);
	return p;
}

void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
	return mmap(addr, length, prot, flags, fd, offset);
}
