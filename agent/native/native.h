/* The native data plane: what chain.c and pump.c share.
 *
 * The chain is the store's append point (agent/store/format.py describes the
 * frame); its mutex is the store writer's lock, so Python appends and relay
 * threads append to one gap-free chain in one order.  Relay threads never
 * take the GIL: a Python thread waiting for the mutex releases the GIL first,
 * and that is the only lock order there is.
 */
#ifndef TOLLGATE_NATIVE_H
#define TOLLGATE_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <openssl/evp.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* format.py: HEADER = ">2sBBIQQ32s", CRC = ">I" */
#define TG_HEADER_SIZE 56
#define TG_CRC_SIZE 4
#define TG_MAX_PAYLOAD (16u << 20)
#define TG_FORMAT_VERSION 3   /* hash = SHA-256(header || BLAKE3(payload)) */
#define TG_FORMAT_SHA256 2    /* hash = SHA-256(header || SHA-256(payload)): FIPS-approved only */
#define TG_KIND_SESSION_OPEN 2   /* format.py Kind */
#define TG_KIND_DATA 3
#define TG_KIND_SESSION_CLOSE 4
#define TG_KIND_SESSION_INFO 5
#define TG_DATA_HEAD_SIZE 9   /* DATA_HEAD = ">QB": session id, direction */
/* SESSION_INFO's "probe" when the kernel's event named the process
 * (agent/witness/connections.py KERNEL_PROBE writes the same) */
#define TG_KERNEL_PROBE "ebpf:sock/inet_sock_set_state"
#define TG_MANY_MAX 8         /* frames in one Chain.append_many (APPEND_MANY_MAX) */

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    EVP_MD_CTX *md;
    int version;               /* of the frames written: TG_FORMAT_VERSION or TG_FORMAT_SHA256 */
    int fd;                    /* the active segment, read-write; frames go at seg_bytes */
    int dirty;                 /* a failed write may have left bytes past seg_bytes */
    int no_map;                /* the filesystem cannot preallocate or map: pwrite only */
    int small_run;             /* frames copied or written since the last large one */
    unsigned long long windows;   /* mapped since the chain was made */
    uint8_t *map;              /* the window of the segment small frames are copied into */
    /* the window's offset and length; faulted in up to map_ready, unmapped below map_done */
    unsigned long long map_off, map_len, map_ready, map_done;
    unsigned long long file_end;  /* the segment's size: seg_bytes, then preallocated zeros */
    /* the page cache is to hold the segment up to warm_to, and does up to
     * warmed (Chain.warm); warm_gen changes when the segment or its size does */
    unsigned long long warm_to, warmed;
    unsigned warm_gen;
    int healthy;               /* 0: relay appends fail until Python recovers the store */
    int wake_fd;               /* eventfd: upkeep (rotation, seal) is due */
    int wake_sent;
    unsigned long long next_seq, seg_bytes, seal_bytes, records, bytes;
    unsigned long long seg_max, seal_every;
    uint8_t head[32];
} Chain;

/* Lock mu from a thread that holds the GIL: when it is taken, wait without
 * the GIL, so no Python thread queues behind a relay thread's lock. */
static inline void lock_gil_free(pthread_mutex_t *mu) {
    if (pthread_mutex_trylock(mu) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(mu);
        Py_END_ALLOW_THREADS
    }
}

/* None, or OSError for err. */
static inline PyObject *none_or_oserror(int err) {
    if (!err) Py_RETURN_NONE;
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* What the relay threads hand Python in batches (ended sessions, connections
 * left to it), under the owner's lock: the first of a batch wakes Python
 * through the owner's eventfd, which then takes them all at once. */
typedef struct {
    void *items;
    size_t n, cap;
} Batch;

/* Room for one more item of `size` bytes, or NULL (out of memory). */
static inline void *batch_add(Batch *b, size_t size) {
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        void *items = realloc(b->items, cap * size);
        if (items == NULL) return NULL;
        b->items = items;
        b->cap = cap;
    }
    return (char *)b->items + size * b->n++;
}

/* Everything added so far (the caller frees it), the batch emptied. */
static inline void *batch_take(Batch *b, size_t *count) {
    void *items = b->items;
    *count = b->n;
    *b = (Batch){0};
    return items;
}

extern PyTypeObject ChainType;
extern PyTypeObject PumpType;
extern PyTypeObject OpenerType;       /* opening.c */
extern PyMethodDef accept_methods[];  /* accept.c: original_dst() */

/* accept.c: a socket address as tollgate spells it (IPv4-mapped IPv6 as
 * plain IPv4) into text[INET6_ADDRSTRLEN], and its port. */
void address_text(const struct sockaddr *sa, char *text, unsigned *port);
/* accept.c: where a redirected connection was going (conntrack's NAT
 * record): 0, or errno (not redirected). */
int original_dst(int fd, const struct sockaddr *peer, struct sockaddr_storage *dst);
/* accept.c: (fd, client, original_dst) as accept_redirected gives each; NULL on error. */
PyObject *accepted_tuple(int fd, const struct sockaddr *peer, const struct sockaddr *dst);
/* accept.c: one wake-up of a listening socket, without the GIL: accept4
 * and the original destination of up to `most` connections, each given to
 * take (which owns the descriptor then); those without a NAT record are
 * closed and counted in *not_redirected.  0 once the backlog is empty (or
 * `most` were taken), else accept4's errno (EMFILE and the like). */
typedef void (*accept_take)(void *ctx, int fd, const struct sockaddr *peer,
                            const struct sockaddr *dst);
int accept_redirected(int lfd, int most, accept_take take, void *ctx, int *not_redirected);

/* The digest of prefix || payload into out[32] that frames of this version
 * chain: the part of a record's hash that needs no lock, so relay threads
 * compute it in parallel.  BLAKE3 by default because it is every byte
 * relayed: ~5x SHA-256's speed here (SHA-NI), as strong; SHA-256 (through
 * EVP, so a FIPS provider applies) where only FIPS-approved hashes may be
 * used, in md, or with md NULL in the calling relay thread's own context.
 * 0, or EIO. */
int payload_digest(int version, EVP_MD_CTX *md, const void *prefix, size_t plen,
                   const void *payload, size_t len, uint8_t *out);
/* Appends one record whose payload digest is known; the caller holds c->mu.
 * 0, or an errno (chain unchanged). */
int chain_append_locked(Chain *c, int kind, uint64_t ts_ns, const void *prefix, size_t plen,
                        const void *payload, size_t len, const uint8_t *pdigest, uint64_t *seq);
/* Called under the chain's lock just before the frames are built, with the
 * sequence number the first record will get: a record that names another
 * (SESSION_INFO names its SESSION_OPEN) is completed here. */
typedef void (*chain_fill)(void *ctx, uint64_t first_seq, struct iovec *payloads);
/* Records appended together in one write, all or none (1 to TG_MANY_MAX),
 * from any thread (gil_held: the caller holds the GIL, and waits for the
 * lock without it, see lock_gil_free): lock,
 * append, signal upkeep when due, unlock; an unhealthy chain refuses (EIO).
 * 0 and the first record's seq, or an errno (chain unchanged). */
int chain_append_records(Chain *c, int gil_held, struct iovec *payloads, const int *kinds, int n,
                         uint64_t ts_ns, chain_fill fill, void *ctx, uint64_t *first);
/* The relay threads' append: lock, append, signal upkeep when due, unlock. */
int chain_append_data(Chain *c, uint64_t session, int direction, const void *data, size_t len);
/* A relay thread frees its SHA-256 context (if it made one) before it ends. */
void chain_thread_exit(void);

/* Sessions opened in C (opening.c) end in C: the pump hands their end to
 * the opener that opened them, which writes SESSION_CLOSE. */
typedef struct OpenSession OpenSession;
#define TG_SESSION_KEY 36   /* client address (IPv4 as ::ffff:a.b.c.d), port, destination, port */
struct OpenSession {
    void *opener;              /* opening.c's, which opened it */
    uint64_t sid, opened_ns;   /* wall clock, as SESSION_OPEN's time_ns */
    uint8_t key[TG_SESSION_KEY];
    uint64_t closed_ns;        /* registry.c's from here: CLOCK_MONOTONIC, 0 while open */
    OpenSession *next, *later; /* its bucket; the lingering, oldest first */
};

/* One more on an eventfd, to wake whoever polls it; write's result. */
static inline ssize_t tg_signal(int efd) {
    uint64_t one = 1;
    return write(efd, &one, sizeof one);
}

/* Close so that the peer sees a reset, not a FIN. */
static inline void tg_close_reset(int fd) {
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

static inline uint64_t tg_clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* FNV-1a: the opener's and the registry's hash tables. */
static inline uint32_t tg_hash(const uint8_t *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

/* registry.c: the sessions opened in C by 4-tuple, open and for linger_ns
 * after they close (the witness's cross-check asks), with their counts. */
typedef struct Registry Registry;
typedef struct {
    uint64_t opened, open, upstream_failed, close_failed;
} RegistryCounts;
Registry *registry_new(uint64_t linger_ns);   /* NULL: out of memory */
void registry_free(Registry *r);              /* and every session in it */
void registry_add(Registry *r, OpenSession *s);   /* key and sid set; r owns s */
void registry_closed(Registry *r, OpenSession *s, int upstream_failed, int close_failed);
/* With the GIL held (Python asks): */
int registry_knows(Registry *r, const uint8_t key[TG_SESSION_KEY]);
RegistryCounts registry_counts(Registry *r);
/* From a thread without the GIL: 0, or the errno of a failed close record
 * (the pump then tells Python). */
int opener_ended(OpenSession *s, const char *reason, uint64_t client_bytes,
                 uint64_t server_bytes);
typedef struct Pump Pump;
typedef struct Worker PumpWorker;
/* Pump.connect for C: a worker connects to (family, addr, port), then
 * relays; `opened` (may be NULL) is told the end instead of Python.  From a
 * worker (home: that worker, in its own thread) the dial starts there and
 * then; else (home NULL, the GIL held) it is handed to the next worker.  0,
 * or an errno (nothing taken over). */
int pump_dial(Pump *p, PumpWorker *home, uint64_t sid, int cfd, int family,
              const unsigned char *addr, int port, OpenSession *opened);

/* A listening socket the pump's workers accept on, for opening.c: every
 * worker's epoll holds it (EPOLLEXCLUSIVE: one is woken a connection), and
 * the woken one calls ready() in its thread, without the GIL.  ready()
 * returns 0, or an errno that accept4 keeps giving (EMFILE and the like):
 * then that worker leaves the socket alone for TG_ACCEPT_PAUSE_MS. */
typedef struct PumpListener PumpListener;
struct PumpListener {
    int fd;
    int (*ready)(PumpListener *l, PumpWorker *w);
    void *ctx;
    int gone;                  /* unlistened: a paused worker must not take it back */
};
#define TG_LISTEN_MAX 8
#define TG_ACCEPT_PAUSE_MS 100
/* 0, or an errno (then no worker has it). The listener must outlive the workers. */
int pump_listen(Pump *p, PumpListener *l);
/* No worker accepts on it any more; what arrives waits in its backlog. */
void pump_unlisten(Pump *p, PumpListener *l);

#endif
