/* A load generator for the datapath benchmarks (a Python client tops out near
 * 1,000 connections/s, far below what the datapath can do).
 *
 *   loadgen server PORT                 accept and close, forever
 *   loadgen client ADDR PORT SECS       connect, close (RST: no TIME_WAIT), repeat;
 *                                       prints "CONN_PER_S FAILED"
 *   loadgen crr-server PORT             accept, read a request, answer it, close; forever
 *   loadgen crr ADDR PORT SECS          connect, send a 64-byte request, read the
 *                                       64-byte answer, close (RST), repeat; prints
 *                                       "CONN_PER_S FAILED P50_US P99_US" (the latency of
 *                                       one whole connect-request-response; one
 *                                       stalled for 1 s counts as failed)
 *   loadgen udp-sink PORT SECS          wait for the first datagram, then count those
 *                                       received for SECS; prints "PACKETS_PER_S"
 *   loadgen udp-flood ADDR PORT SECS SIZE
 *                                       send SIZE-byte datagrams (payload) for SECS, in
 *                                       batches (a refusal, ICMP port unreachable
 *                                       once the sink has stopped, is ignored);
 *                                       prints "SENT_PER_S"
 *
 * Every connection's SYN is a new conntrack entry, so it meets the whole policy
 * path of the datapath; the rest of the handshake is ESTABLISHED. A one-way UDP
 * flow never becomes ESTABLISHED (no reply), so every datagram is judged.
 * The servers print "ready" once they listen.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MSG 64
#define BATCH 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int listener(int type, const char *port) {
    int s = socket(AF_INET, type, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || (type == SOCK_STREAM && listen(s, 4096))) {
        perror("listen");
        exit(1);
    }
    return s;
}

static struct sockaddr_in peer(const char *addr, const char *port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
    if (inet_pton(AF_INET, addr, &a.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", addr);
        exit(2);
    }
    return a;
}

static int cmp(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

/* read exactly n bytes; 0 on success */
static int read_all(int fd, char *buf, size_t n) {
    while (n > 0) {
        ssize_t r = read(fd, buf, n);
        if (r <= 0) return -1;
        buf += r;
        n -= (size_t)r;
    }
    return 0;
}

static void serve(const char *port, int answer) __attribute__((noreturn));
static void serve(const char *port, int answer) {
    int s = listener(SOCK_STREAM, port), one = 1;
    char buf[MSG];
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        if (answer) {
            setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (read_all(c, buf, MSG) == 0) (void)!write(c, buf, MSG);
        }
        close(c);
    }
}

static int client(const char *addr, const char *port, double secs, int crr) {
    struct sockaddr_in a = peer(addr, port);
    struct linger lg = {1, 0};
    struct timeval tmo = {1, 0};
    double end = now() + secs, t0;
    long n = 0, failed = 0, cap = 1 << 16;
    double *lat = crr ? malloc(cap * sizeof *lat) : NULL;
    char req[MSG], resp[MSG];
    int one = 1;
    memset(req, 'q', sizeof req);
    while ((t0 = now()) < end) {
        int c = socket(AF_INET, SOCK_STREAM, 0), ok;
        setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        if (crr) { /* a stalled connection counts as failed, it does not stop the run */
            setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof tmo);
            setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tmo, sizeof tmo);
        }
        ok = connect(c, (struct sockaddr *)&a, sizeof a) == 0;
        if (ok && crr) {
            setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            ok = write(c, req, MSG) == MSG && read_all(c, resp, MSG) == 0;
        }
        close(c);
        if (!ok) {
            failed++;
            continue;
        }
        if (crr) {
            if (n == cap) lat = realloc(lat, (cap *= 2) * sizeof *lat);
            lat[n] = now() - t0;
        }
        n++;
    }
    if (!crr) {
        printf("%.0f %ld\n", n / secs, failed);
        return 0;
    }
    qsort(lat, n, sizeof *lat, cmp);
    double p50 = n ? lat[(long)(0.50 * (n - 1) + 0.5)] : 0, p99 = n ? lat[(long)(0.99 * (n - 1) + 0.5)] : 0;
    printf("%.0f %ld %.1f %.1f\n", n / secs, failed, p50 * 1e6, p99 * 1e6);
    return 0;
}

static int udp_sink(const char *port, double secs) {
    int s = listener(SOCK_DGRAM, port), big = 16 << 20;
    struct timeval tv = {0, 100000};
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    static char bufs[BATCH][2048];
    long count = 0;
    double first = 0, end = 0, give_up = now() + 30;
    setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    for (int i = 0; i < BATCH; i++) {
        iov[i] = (struct iovec){bufs[i], sizeof bufs[i]};
        msgs[i] = (struct mmsghdr){.msg_hdr = {.msg_iov = &iov[i], .msg_iovlen = 1}};
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int got = recvmmsg(s, msgs, BATCH, MSG_WAITFORONE, NULL);
        double t = now();
        if (first == 0) {
            if (got > 0) {
                first = t;
                end = t + secs;
            } else if (t > give_up) {
                break;
            }
            continue; /* the window starts after the first batch */
        }
        if (t >= end) break;
        if (got > 0) count += got;
    }
    printf("%.0f\n", first == 0 ? 0.0 : count / secs);
    return 0;
}

static int udp_flood(const char *addr, const char *port, double secs, int size) {
    struct sockaddr_in a = peer(addr, port);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct mmsghdr msgs[BATCH];
    struct iovec iov;
    static char payload[2048];
    long sent = 0;
    double t0 = now(), end = t0 + secs;
    if (size < 0 || size > (int)sizeof payload || connect(s, (struct sockaddr *)&a, sizeof a)) {
        perror("udp-flood");
        return 1;
    }
    iov = (struct iovec){payload, (size_t)size};
    for (int i = 0; i < BATCH; i++)
        msgs[i] = (struct mmsghdr){.msg_hdr = {.msg_iov = &iov, .msg_iovlen = 1}};
    while (now() < end) {
        int n = sendmmsg(s, msgs, BATCH, 0);
        if (n > 0) sent += n;
        else if (errno != ENOBUFS && errno != EAGAIN && errno != ECONNREFUSED) {
            perror("sendmmsg");
            return 1;
        }
    }
    printf("%.0f\n", sent / (now() - t0));
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "server") == 0) serve(argv[2], 0);
    if (argc == 3 && strcmp(argv[1], "crr-server") == 0) serve(argv[2], 1);
    if (argc == 5 && strcmp(argv[1], "client") == 0)
        return client(argv[2], argv[3], atof(argv[4]), 0);
    if (argc == 5 && strcmp(argv[1], "crr") == 0) return client(argv[2], argv[3], atof(argv[4]), 1);
    if (argc == 4 && strcmp(argv[1], "udp-sink") == 0) return udp_sink(argv[2], atof(argv[3]));
    if (argc == 6 && strcmp(argv[1], "udp-flood") == 0)
        return udp_flood(argv[2], argv[3], atof(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: loadgen server PORT | client ADDR PORT SECS | crr-server PORT | "
                    "crr ADDR PORT SECS | udp-sink PORT SECS | udp-flood ADDR PORT SECS SIZE\n");
    return 2;
}
