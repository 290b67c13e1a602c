/* Checkpoint test workload: one TCP connection that must survive a live migration.
 *
 * usage: tcpstream PORT STATEFILE
 *
 * Listens on 127.0.0.1:PORT, connects to it once from a forked child, and from then on the
 * child sends an 8-byte sequence number every 20 ms over that one connection while the
 * parent reads them. After every read the parent rewrites STATEFILE atomically as
 *     seq=N gaps=G errors=E pid=P
 * where a gap is a number that is not the previous one plus one. Neither side ever
 * reconnects: a reset, an error or a closed stream ends the side that sees it (errors=1 is
 * written first). A connection carried by CRIU (tcp-established) keeps seq growing with
 * gaps=0 and the same pid. Build: gcc -static -O2 -o tcpstream tcpstream.c
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void state(const char *path, uint64_t seq, uint64_t gaps, int errors)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.new", path);
	FILE *f = fopen(tmp, "w");
	if (!f)
		return;
	fprintf(f, "seq=%llu gaps=%llu errors=%d pid=%d\n", (unsigned long long)seq,
		(unsigned long long)gaps, errors, (int)getpid());
	fclose(f);
	rename(tmp, path);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: tcpstream PORT STATEFILE\n");
		return 2;
	}
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1)) {
		perror("listen");
		return 1;
	}
	pid_t child = fork();
	if (child == 0) { /* the sender */
		close(l);
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (connect(s, (struct sockaddr *)&a, sizeof(a)))
			return 1;
		struct timespec t = {0, 20 * 1000 * 1000};
		for (uint64_t n = 1;; n++) {
			if (write(s, &n, sizeof(n)) != sizeof(n))
				return 1;
			nanosleep(&t, NULL);
		}
	}
	int c = accept(l, NULL, NULL);
	close(l);
	if (c < 0)
		return 1;
	uint64_t last = 0, gaps = 0, n;
	for (;;) {
		size_t got = 0;
		while (got < sizeof(n)) {
			ssize_t r = read(c, (char *)&n + got, sizeof(n) - got);
			if (r <= 0) {
				state(argv[2], last, gaps, 1);
				return 1;
			}
			got += r;
		}
		if (n != last + 1)
			gaps++;
		last = n;
		state(argv[2], last, gaps, 0);
	}
}
