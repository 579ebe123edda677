/* c-handler: the yardstick for bench/uffd-fault.ts, the least a userfaultfd handler
 * can do. It takes the uffd from the shim the way the agent does and answers every
 * MISSING fault at once with UFFDIO_COPY of a page filled with (file page index & 0xff).
 *
 * usage: c-handler SOCKET
 *   Listens on SOCKET, prints "listening", accepts one shim connection, checks its hello
 *   header, serves faults until the shim's process closes the socket, then prints
 *   "served <n> faults" and exits 0. Any failure prints "c-handler: …" and exits 1. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "../lethe-uffd.h"

__attribute__((noreturn)) static void fail(const char *what)
{
	fprintf(stderr, "c-handler: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int accept_one(const char *path)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof addr.sun_path) {
		errno = ENAMETOOLONG;
		fail("socket path");
	}
	strcpy(addr.sun_path, path);
	int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(ls, 1) != 0)
		fail("listen");
	printf("listening\n");
	fflush(stdout);
	int s = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
	if (s < 0)
		fail("accept");
	close(ls);
	unlink(path);
	return s;
}

static int recv_uffd(int sock, struct lethe_uffd_hello *hello)
{
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} control;
	struct iovec iov = { .iov_base = hello, .iov_len = sizeof *hello };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
			      .msg_controllen = sizeof control.buf };
	ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	if (n != (ssize_t)sizeof *hello || !c || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(sizeof(int)))
		fail("no userfaultfd in the hello");
	if (hello->magic != LETHE_UFFD_MAGIC || hello->version != LETHE_UFFD_VERSION ||
	    hello->header_bytes != sizeof *hello) {
		errno = EPROTO;
		fail("bad hello header");
	}
	int uffd;
	/* SAFETY: received fd; CMSG_DATA holds exactly one int (checked above) */
	memcpy(&uffd, CMSG_DATA(c), sizeof uffd);
	return uffd;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: c-handler SOCKET\n");
		return 2;
	}
	struct lethe_uffd_hello hello;
	int sock = accept_one(argv[1]);
	int uffd = recv_uffd(sock, &hello);
	static uint8_t data[1 << 16];
	if (hello.page_size > sizeof data) {
		errno = EINVAL;
		fail("page size");
	}
	unsigned long served = 0;
	for (;;) {
		struct pollfd p[2] = { { uffd, POLLIN, 0 }, { sock, POLLIN, 0 } };
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			fail("poll");
		}
		if (p[1].revents)
			break; /* the shim's process is gone (it never writes after the hello) */
		struct uffd_msg msg;
		/* SAFETY: msg is a stack uffd_msg; read fills at most one whole record */
		if (read(uffd, &msg, sizeof msg) != sizeof msg) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			fail("read");
		}
		if (msg.event != UFFD_EVENT_PAGEFAULT)
			continue;
		uint64_t addr = msg.arg.pagefault.address & ~(uint64_t)(hello.page_size - 1);
		memset(data, (int)((hello.offset + addr - hello.base) / hello.page_size), hello.page_size);
		struct uffdio_copy copy = { .dst = addr, .src = (uintptr_t)data, .len = hello.page_size };
		/* SAFETY: src is a static buffer of page_size bytes; the kernel checks dst */
		if (ioctl(uffd, UFFDIO_COPY, &copy) != 0) {
			if (errno != EEXIST)
				fail("UFFDIO_COPY");
			struct uffdio_range range = { addr, hello.page_size };
			/* SAFETY: a stack range inside the registered mapping */
			ioctl(uffd, UFFDIO_WAKE, &range);
		}
		served++;
	}
	printf("served %lu faults\n", served);
	return 0;
}
