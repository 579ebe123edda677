/* The shim → agent handshake (docs/uffd.md, "Handshake"): one message on a unix
 * stream socket, this header with the userfaultfd attached as SCM_RIGHTS. Host byte
 * order: both ends run on the same machine. native/index.ts parses it (HELLO_*). */
#ifndef LETHE_UFFD_H
#define LETHE_UFFD_H

#include <stdint.h>

#define LETHE_UFFD_MAGIC 0x4446554cu /* "LUFD" read as a little-endian u32 */
#define LETHE_UFFD_VERSION 1

struct lethe_uffd_hello {
	uint32_t magic;        /* LETHE_UFFD_MAGIC */
	uint16_t version;      /* LETHE_UFFD_VERSION */
	uint16_t header_bytes; /* sizeof(struct lethe_uffd_hello) */
	uint32_t pid;          /* the process that mapped the RAM file (QEMU) */
	uint32_t page_size;    /* the mapping's page size */
	uint64_t base;         /* the mapping's address in that process */
	uint64_t length;       /* bytes registered, a multiple of page_size */
	uint64_t offset;       /* file offset mapped at base */
	uint64_t ioctls;       /* UFFDIO_REGISTER's ioctls mask for the range */
};

_Static_assert(sizeof(struct lethe_uffd_hello) == 48, "the hello header is 48 bytes");

#endif
