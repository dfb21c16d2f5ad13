/* tollgate bench load generator: one small C program, compiled at bench time,
 * so the generator is never the bottleneck a Python one would be.
 *
 *   serve PORT                         dual-stack server: first byte 'B' = bulk
 *                                      (8-byte size follows; it sends that many
 *                                      bytes and reads to EOF), else echo to EOF
 *   bulk HOST PORT BYTES NCONN         NCONN connections, BYTES each way on each
 *   pingpong HOST PORT N [all]         1-byte round trips; prints p50/p99 in us
 *                                      (and, with "all", every trip's, sorted)
 *   connrate HOST PORT SECONDS NTHR    connect, 100 bytes each way, close; loop
 *   idle HOST PORT N SECONDS           hold N echoed connections open, print
 *                                      "open N", then wait SECONDS or stdin EOF
 *
 * Results are one JSON line on stdout. Every loop is bounded by count or time.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF (256 << 10)
static char zeros[BUF];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noreturn)) static void die(const char *what) { perror(what); exit(2); }

static int dial(const char *host, const char *port) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai) != 0) return -1;
    int fd = socket(ai->ai_family, SOCK_STREAM, 0);
    if (fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) { close(fd); fd = -1; }
    freeaddrinfo(ai);
    if (fd >= 0) { int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); }
    return fd;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        p += w; n -= (size_t)w;
    }
    return 0;
}

static int read_n(int fd, char *p, size_t n) {
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r <= 0) { if (r < 0 && errno == EINTR) continue; return -1; }
        p += r; n -= (size_t)r;
    }
    return 0;
}

static int send_bytes(int fd, uint64_t n) {
    while (n) {
        size_t k = n < BUF ? (size_t)n : BUF;
        if (write_all(fd, zeros, k)) return -1;
        n -= k;
    }
    return 0;
}

static uint64_t drain(int fd) {
    char *buf = malloc(BUF);
    uint64_t total = 0;
    ssize_t r;
    while ((r = read(fd, buf, BUF)) != 0) {
        if (r < 0) { if (errno == EINTR) continue; break; }
        total += (uint64_t)r;
    }
    free(buf);
    return total;
}

static pthread_attr_t small_stack;

static void spawn(void *(*fn)(void *), void *arg, pthread_t *out) {
    pthread_t t;
    if (pthread_create(&t, &small_stack, fn, arg) != 0) die("pthread_create");
    if (out) *out = t; else pthread_detach(t);
}

/* -- server -------------------------------------------------------------- */

struct bulk_send { int fd; uint64_t n; };

static void *bulk_sender(void *a) {
    struct bulk_send *b = a;
    send_bytes(b->fd, b->n);
    shutdown(b->fd, SHUT_WR);
    return NULL;
}

static void *serve_conn(void *a) {
    int fd = (int)(intptr_t)a;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char first;
    if (read_n(fd, &first, 1) == 0) {
        if (first == 'B') {
            uint64_t size;
            if (read_n(fd, (char *)&size, 8) == 0) {
                struct bulk_send b = {fd, size};
                pthread_t t;
                spawn(bulk_sender, &b, &t);
                drain(fd);
                pthread_join(t, NULL);
            }
        } else {
            char buf[65536];
            ssize_t r;
            if (write_all(fd, &first, 1) == 0)
                while ((r = read(fd, buf, sizeof buf)) > 0)
                    if (write_all(fd, buf, (size_t)r)) break;
        }
    }
    close(fd);
    return NULL;
}

/* A thread that has served a connection accepts the next one; a new thread
 * is made only when none is left accepting. A thread made and ended for each
 * connection cost every connection a clone and, at the thread's exit, glibc's
 * madvise of its stack: a TLB shootdown, an IPI to each other vCPU running
 * the server, which on this host took ~11 us a connection whenever it had to
 * wake a halted vCPU (perf, short connections through tollgate). */
static int listen_fd, accepting = 1;   /* threads in accept(), atomic */

static void *acceptor(void *unused) {
    for (;;) {
        int fd = accept(listen_fd, NULL, NULL);
        if (fd < 0) { if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE) continue; die("accept"); }
        if (__atomic_sub_fetch(&accepting, 1, __ATOMIC_ACQ_REL) == 0) {
            __atomic_add_fetch(&accepting, 1, __ATOMIC_ACQ_REL);
            spawn(acceptor, NULL, NULL);
        }
        serve_conn((void *)(intptr_t)fd);
        __atomic_add_fetch(&accepting, 1, __ATOMIC_ACQ_REL);
    }
    return NULL;
}

__attribute__((noreturn)) static void serve(const char *port) {
    int ls = socket(AF_INET6, SOCK_STREAM, 0), one = 1, zero = 0;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(ls, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    struct sockaddr_in6 sa = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(port)),
                              .sin6_addr = IN6ADDR_ANY_INIT};
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 4096)) die("listen");
    listen_fd = ls;
    acceptor(NULL);
    abort();
}

/* -- bulk ---------------------------------------------------------------- */

struct bulk_conn { const char *host, *port; uint64_t n, got; int fd, ok; };

static void *bulk_client(void *a) {
    struct bulk_conn *c = a;
    c->fd = dial(c->host, c->port);
    if (c->fd < 0) return NULL;
    char head[9] = {'B'};
    memcpy(head + 1, &c->n, 8);
    if (write_all(c->fd, head, 9)) return NULL;
    struct bulk_send b = {c->fd, c->n};
    pthread_t t;
    spawn(bulk_sender, &b, &t);
    c->got = drain(c->fd);
    pthread_join(t, NULL);
    close(c->fd);
    c->ok = c->got == c->n;
    return NULL;
}

static int bulk(const char *host, const char *port, uint64_t n, int nconn) {
    struct bulk_conn *cs = calloc((size_t)nconn, sizeof *cs);
    pthread_t *ts = calloc((size_t)nconn, sizeof *ts);
    double t0 = now();
    for (int i = 0; i < nconn; i++) {
        cs[i] = (struct bulk_conn){host, port, n, 0, -1, 0};
        spawn(bulk_client, &cs[i], &ts[i]);
    }
    int ok = 0;
    uint64_t got = 0;
    for (int i = 0; i < nconn; i++) { pthread_join(ts[i], NULL); ok += cs[i].ok; got += cs[i].got; }
    double dt = now() - t0;
    printf("{\"seconds\": %.6f, \"bytes_each_way\": %llu, \"received\": %llu, \"ok\": %d, \"conns\": %d}\n",
           dt, (unsigned long long)n * nconn, (unsigned long long)got, ok, nconn);
    return ok == nconn ? 0 : 1;
}

/* -- ping-pong ----------------------------------------------------------- */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int pingpong(const char *host, const char *port, int n, int all) {
    int fd = dial(host, port);
    if (fd < 0) die("connect");
    double *rtt = malloc(sizeof(double) * (size_t)n);
    char c = 'E';
    for (int i = -200; i < n; i++) {  /* 200 warm-up trips */
        double t = now();
        if (write_all(fd, &c, 1) || read_n(fd, &c, 1)) die("pingpong");
        if (i >= 0) rtt[i] = (now() - t) * 1e6;
    }
    close(fd);
    qsort(rtt, (size_t)n, sizeof *rtt, cmp_double);
    printf("{\"n\": %d, \"p50_us\": %.2f, \"p99_us\": %.2f", n, rtt[n / 2], rtt[(int)(n * 0.99)]);
    if (all) {
        printf(", \"rtt_us\": [");
        for (int i = 0; i < n; i++) printf(i ? ",%.2f" : "%.2f", rtt[i]);
        printf("]");
    }
    printf("}\n");
    return 0;
}

/* -- connection rate ----------------------------------------------------- */

struct rate { const char *host, *port; double until; long done, failed; };

static void *rate_worker(void *a) {
    struct rate *r = a;
    char out[100], in[100];
    memset(out, 'x', sizeof out);
    out[0] = 'E';
    for (long i = 0; i < 100000000L && now() < r->until; i++) {
        int fd = dial(r->host, r->port);
        if (fd < 0) { r->failed++; usleep(1000); continue; }
        if (write_all(fd, out, sizeof out) || read_n(fd, in, sizeof in)) r->failed++;
        else r->done++;
        close(fd);
    }
    return NULL;
}

static int connrate(const char *host, const char *port, double secs, int nthr) {
    struct rate *rs = calloc((size_t)nthr, sizeof *rs);
    pthread_t *ts = calloc((size_t)nthr, sizeof *ts);
    double t0 = now();
    for (int i = 0; i < nthr; i++) {
        rs[i] = (struct rate){host, port, t0 + secs, 0, 0};
        spawn(rate_worker, &rs[i], &ts[i]);
    }
    long done = 0, failed = 0;
    for (int i = 0; i < nthr; i++) { pthread_join(ts[i], NULL); done += rs[i].done; failed += rs[i].failed; }
    double dt = now() - t0;
    printf("{\"seconds\": %.3f, \"done\": %ld, \"failed\": %ld, \"per_s\": %.1f}\n", dt, done, failed, done / dt);
    return 0;
}

/* -- idle sessions ------------------------------------------------------- */

static int idle(const char *host, const char *port, int n, int secs) {
    int *fds = calloc((size_t)n, sizeof *fds), open_ = 0;
    for (int i = 0; i < n; i++) {
        char c = 'E';
        fds[i] = dial(host, port);
        if (fds[i] < 0) continue;
        if (write_all(fds[i], &c, 1) || read_n(fds[i], &c, 1)) { close(fds[i]); fds[i] = -1; continue; }
        open_++;
    }
    printf("{\"open\": %d}\n", open_);
    fflush(stdout);
    struct pollfd p = {.fd = 0, .events = POLLIN};
    poll(&p, 1, secs * 1000);  /* stdin closed or readable: done */
    for (int i = 0; i < n; i++) if (fds[i] >= 0) close(fds[i]);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    pthread_attr_init(&small_stack);
    pthread_attr_setstacksize(&small_stack, 256 << 10);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && !strcmp(argv[1], "serve")) serve(argv[2]);
    if (argc == 6 && !strcmp(argv[1], "bulk"))
        return bulk(argv[2], argv[3], strtoull(argv[4], NULL, 10), atoi(argv[5]));
    if ((argc == 5 || (argc == 6 && !strcmp(argv[5], "all"))) && !strcmp(argv[1], "pingpong"))
        return pingpong(argv[2], argv[3], atoi(argv[4]), argc == 6);
    if (argc == 6 && !strcmp(argv[1], "connrate"))
        return connrate(argv[2], argv[3], atof(argv[4]), atoi(argv[5]));
    if (argc == 6 && !strcmp(argv[1], "idle"))
        return idle(argv[2], argv[3], atoi(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
    return 2;
}
