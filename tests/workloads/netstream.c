/* Test workload: one TCP connection between containers on two hosts, which must keep
 * flowing while the server's container migrates live.
 *
 * usage: netstream serve PORT
 *        netstream read ADDRESS PORT STATEFILE
 *
 * The server accepts one connection and sends an 8-byte sequence number on it every 20 ms.
 * The reader connects once and after every number rewrites STATEFILE atomically as
 *     seq=N gaps=G errors=E pid=P
 * where a gap is a number that is not the previous one plus one. Neither side reconnects:
 * a reset, an error or a closed stream ends the side that sees it (the reader writes
 * errors=1 first). Build: gcc -static -O2 -o netstream netstream.c
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

static int serve(int port)
{
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1))
		return 1;
	int c = accept(l, NULL, NULL);
	if (c < 0)
		return 1;
	struct timespec period = {0, 20 * 1000 * 1000};
	for (uint64_t seq = 1;; seq++) {
		size_t off = 0;
		while (off < sizeof(seq)) {
			ssize_t n = send(c, (char *)&seq + off, sizeof(seq) - off, MSG_NOSIGNAL);
			if (n <= 0)
				return 1;
			off += (size_t)n;
		}
		nanosleep(&period, NULL);
	}
}

static int readstream(const char *addr, int port, const char *path)
{
	int s = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	if (s < 0 || inet_pton(AF_INET, addr, &a.sin_addr) != 1 ||
	    connect(s, (struct sockaddr *)&a, sizeof(a))) {
		state(path, 0, 0, 1);
		return 1;
	}
	uint64_t last = 0, gaps = 0, seq;
	for (;;) {
		size_t off = 0;
		while (off < sizeof(seq)) {
			ssize_t n = recv(s, (char *)&seq + off, sizeof(seq) - off, 0);
			if (n <= 0) {
				state(path, last, gaps, 1);
				return 1;
			}
			off += (size_t)n;
		}
		if (seq != last + 1)
			gaps++;
		last = seq;
		state(path, last, gaps, 0);
	}
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "serve"))
		return serve(atoi(argv[2]));
	if (argc == 5 && !strcmp(argv[1], "read"))
		return readstream(argv[2], atoi(argv[3]), argv[4]);
	fprintf(stderr, "usage: netstream serve PORT | netstream read ADDRESS PORT STATEFILE\n");
	return 2;
}
