/* A connect-rate load generator for the datapath benchmarks (a Python client tops
 * out near 1,000 connections/s, far below what the datapath can do).
 *
 *   loadgen server PORT            accept and close, forever
 *   loadgen client ADDR PORT SECS  connect, close (RST: no TIME_WAIT), repeat;
 *                                  prints connections per second
 *
 * Every connection's SYN is a new conntrack entry, so it meets the whole policy
 * path of the datapath; the rest of the handshake is ESTABLISHED.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "server") == 0) {
        int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4096)) {
            perror("server");
            return 1;
        }
        printf("ready\n");
        fflush(stdout);
        for (;;) {
            int c = accept(s, NULL, NULL);
            if (c >= 0) close(c);
        }
    }
    if (argc == 5 && strcmp(argv[1], "client") == 0) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
        struct linger lg = {1, 0};
        double secs = atof(argv[4]), end = now() + secs;
        long n = 0, failed = 0;
        inet_pton(AF_INET, argv[2], &a.sin_addr);
        while (now() < end) {
            int c = socket(AF_INET, SOCK_STREAM, 0);
            setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            if (connect(c, (struct sockaddr *)&a, sizeof a) == 0) n++; else failed++;
            close(c);
        }
        printf("%.0f %ld\n", n / secs, failed);
        return 0;
    }
    fprintf(stderr, "usage: loadgen server PORT | loadgen client ADDR PORT SECS\n");
    return 2;
}
