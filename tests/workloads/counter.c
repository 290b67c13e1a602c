/* Checkpoint test workload: keeps MB megabytes of a known pattern in RAM and a counter.
 *
 * usage: counter MB STATEFILE [PERIOD_MS [UID]]
 *
 * Every PERIOD_MS (default 50) it increments the counter, rewrites one word of the buffer
 * (so pages keep changing), verifies every page against the pattern and rewrites STATEFILE
 * atomically (write STATEFILE.new, rename) as one line:
 *     count=N bad=B pid=P start=S
 * A migrated copy must keep counting from where the source stopped (count never drops and
 * start never changes) with bad=0. With UID it drops to that user id first (a process CRIU
 * cannot dump here, for the pre-freeze check). Build: gcc -static -O2 -o counter counter.c
 */
#include <fcntl.h>
#include <grp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE_WORDS (4096 / sizeof(uint64_t))

static uint64_t expected(uint64_t i, uint64_t gen)
{
	uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ULL;
	return x ^ (x >> 29) ^ (gen << 48);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s MB STATEFILE [PERIOD_MS]\n", argv[0]);
		return 2;
	}
	size_t words = (size_t)strtoul(argv[1], NULL, 10) * 1024 * 1024 / sizeof(uint64_t);
	const char *state = argv[2];
	long period_ms = argc > 3 ? strtol(argv[3], NULL, 10) : 50;
	if (argc > 4) {
		gid_t gid = (gid_t)strtoul(argv[4], NULL, 10);
		if (setgroups(0, NULL) || setgid(gid) || setuid((uid_t)gid)) {
			perror("setuid");
			return 1;
		}
	}
	size_t pages = words / PAGE_WORDS;
	uint64_t *buf = malloc(words * sizeof(uint64_t));
	/* gens[p]: how many times page p's first word was rewritten */
	uint64_t *gens = calloc(pages ? pages : 1, sizeof(uint64_t));
	if (!buf || !gens) {
		perror("alloc");
		return 1;
	}
	for (size_t i = 0; i < words; i++)
		buf[i] = expected(i, 0);

	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.new", state);
	time_t start = time(NULL);
	uint64_t count = 0, bad = 0;
	for (;;) {
		count++;
		if (pages) {
			size_t p = (size_t)((count * 7919) % pages);
			gens[p]++;
			buf[p * PAGE_WORDS] = expected(p * PAGE_WORDS, gens[p]);
		}
		uint64_t now_bad = 0;
		for (size_t p = 0; p < pages; p++) {
			const uint64_t *w = buf + p * PAGE_WORDS;
			int ok = w[0] == expected(p * PAGE_WORDS, gens[p]);
			for (size_t j = 1; ok && j < PAGE_WORDS; j++)
				ok = w[j] == expected(p * PAGE_WORDS + j, 0);
			now_bad += !ok;
		}
		if (now_bad > bad)
			bad = now_bad;
		int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (fd >= 0) {
			char line[160];
			int n = snprintf(line, sizeof(line), "count=%llu bad=%llu pid=%d start=%lld\n",
					 (unsigned long long)count, (unsigned long long)bad,
					 (int)getpid(), (long long)start);
			if (write(fd, line, (size_t)n) != n)
				bad |= 1ULL << 62;
			close(fd);
			rename(tmp, state);
		}
		struct timespec ts = { period_ms / 1000, (period_ms % 1000) * 1000000L };
		nanosleep(&ts, NULL);
	}
}
