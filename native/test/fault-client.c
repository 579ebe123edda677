/* fault-client: a stand-in for QEMU in the memory-path tests and the fault bench. Run
 * with the shim preloaded, it maps a RAM file MAP_SHARED and touches its pages on
 * command, so every first touch is a userfaultfd MISSING fault served by the agent.
 *
 * usage: fault-client FILE PAGES [--offset PAGES] [--private]
 *   Opens FILE (creating it and extending it to cover the mapping if needed), maps PAGES
 *   pages from file offset OFFSET pages, prints "mapped 0x<address>", then runs commands
 *   from stdin, one a line (page numbers count from the start of the mapping):
 *     touch A B       reads every byte of pages [A,B): "page I <fnv>" each, then "checksum <fnv>"
 *     write A B BYTE  fills pages [A,B) with BYTE, then "wrote <pages>"
 *     time A B        reads one byte of each page of [A,B), timing each: "latency_ns L,L,…"
 *     time A B S      the same in a scattered order: the k-th touch is page A + (k·S mod (B−A))
 *                     (S coprime with B−A makes every page come once), so no two touches are neighbours
 *   and exits 0 at end of input. <fnv> is FNV-1a 32 in hex; "checksum" runs over all bytes. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define FNV_OFFSET 2166136261u
#define FNV_PRIME 16777619u

static long page;

__attribute__((noreturn)) static void fail(const char *what)
{
	fprintf(stderr, "fault-client: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint32_t fnv(uint32_t h, const volatile uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * FNV_PRIME;
	return h;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void touch(volatile uint8_t *map, long a, long b)
{
	uint32_t all = FNV_OFFSET;
	for (long i = a; i < b; i++) {
		volatile uint8_t *p = map + i * page;
		printf("page %ld %08x\n", i, fnv(FNV_OFFSET, p, page));
		all = fnv(all, p, page);
	}
	printf("checksum %08x\n", all);
}

static void time_touches(volatile uint8_t *map, long a, long b, long stride)
{
	long n = b - a;
	printf("latency_ns ");
	for (long k = 0; k < n; k++) {
		long i = a + (k * stride) % n;
		uint64_t t0 = now_ns();
		(void)map[i * page];
		printf(k + 1 < n ? "%llu," : "%llu", (unsigned long long)(now_ns() - t0));
	}
	printf("\n");
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: fault-client FILE PAGES [--offset PAGES] [--private]\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	page = sysconf(_SC_PAGESIZE);
	long pages = atol(argv[2]), offset = 0;
	int type = MAP_SHARED;
	for (int i = 3; i < argc; i++) {
		if (!strcmp(argv[i], "--offset") && i + 1 < argc)
			offset = atol(argv[++i]);
		else if (!strcmp(argv[i], "--private"))
			type = MAP_PRIVATE;
	}
	int fd = open(argv[1], O_RDWR | O_CREAT, 0600);
	if (fd < 0)
		fail("open");
	struct stat st;
	if (fstat(fd, &st) != 0)
		fail("fstat");
	if (st.st_size < (offset + pages) * page && ftruncate(fd, (offset + pages) * page) != 0)
		fail("ftruncate");
	/* SAFETY: every access below stays within [map, map + pages * page): commands are range-checked */
	uint8_t *map = mmap(NULL, pages * page, PROT_READ | PROT_WRITE, type, fd, offset * page);
	if (map == MAP_FAILED)
		fail("mmap");
	printf("mapped %p\n", (void *)map);

	char line[256];
	while (fgets(line, sizeof line, stdin)) {
		long a, b, stride = 1;
		int fields;
		unsigned byte;
		if (sscanf(line, "touch %ld %ld", &a, &b) == 2 && 0 <= a && a <= b && b <= pages) {
			touch(map, a, b);
		} else if (sscanf(line, "write %ld %ld %i", &a, &b, (int *)&byte) == 3 && 0 <= a && a <= b && b <= pages) {
			memset(map + a * page, (int)byte, (b - a) * page);
			printf("wrote %ld\n", b - a);
		} else if ((fields = sscanf(line, "time %ld %ld %ld", &a, &b, &stride)) >= 2 && 0 <= a && a <= b && b <= pages &&
			   (fields == 2 || stride > 0)) {
			time_touches(map, a, b, fields == 2 ? 1 : stride);
		} else {
			fprintf(stderr, "fault-client: bad command: %s", line);
			return 2;
		}
	}
	return 0;
}
