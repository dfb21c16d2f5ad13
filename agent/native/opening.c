/* Opening sessions without Python, when every judgement is already made.
 *
 * A connection whose client the kernel proved went into the proxy (its
 * ESTABLISHED event waits in the witness's BPF map `attributed`,
 * bpf/tcp_connect.c), made by a process Python has already named in the
 * process table's current generation, to a destination the policy let
 * through before, needs nothing Python decides.  The pump's workers accept
 * (the listening sockets are in their epolls); the one woken writes
 * SESSION_OPEN and SESSION_INFO (the same JSON the Python path writes,
 * agent/proxy/handoff.py), dials in its own thread, and writes
 * SESSION_CLOSE through opener_ended when the session ends: such a
 * connection never wakes the daemon's thread.  Anything else (an unnamed
 * process, a destination not yet judged, a comm that is not plain ASCII, a
 * failing store, open_here off) is queued for Python (Opener.left, woken by
 * left_fd) as before; Python teaches the opener the names and destinations
 * it judged.
 *
 * The sessions it opened are kept in registry.c, so that the witness's
 * cross-check finds them (Opener.knows) as it finds Python's
 * (agent/proxy/sessions.py).
 */
#include "native.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/bpf.h>
#include <linux/types.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "../../bpf/events.h"

#define NAME_BUCKETS 1024
#define NAMES_MAX 4096
#define DEST_BUCKETS 1024
#define DESTS_MAX 4096
#define KEY_LEN TG_SESSION_KEY
/* An address and port as the kernel's maps hold them (the first 18 bytes of
 * a struct tg_peer): IPv4 as ::ffff:a.b.c.d, the port in host order.  Half
 * a session key; a destination's key. */
#define HALF_KEY 18

typedef struct Name {          /* a process Python named: its chain as JSON */
    uint32_t tgid;
    uint64_t expires_ns;       /* CLOCK_MONOTONIC */
    size_t len;
    struct Name *next;
    char json[];
} Name;

typedef struct Dest {          /* a destination the policy let through */
    uint8_t key[HALF_KEY];
    struct Dest *next;
} Dest;

typedef struct Opener Opener;

typedef struct {               /* a connection for Python */
    int fd;
    struct sockaddr_storage peer, dst;
} Left;

struct Opener {
    PyObject_HEAD
    PyObject *pump, *chain;
    int attributed_fd;         /* the witness's map, or -1: nothing is opened here */
    int open_here;             /* 0: every connection goes to Python (atomic) */
    PumpListener listeners[TG_LISTEN_MAX];
    int nlisteners;
    int left_fd;               /* eventfd: Python has connections to take */
    pthread_mutex_t mu;        /* everything below */
    Batch left;                /* of Left */
    int not_redirected, accept_errno;
    uint64_t generation;
    Name *names[NAME_BUCKETS];
    size_t nnames;
    Dest *dests[DEST_BUCKETS];
    size_t ndests;
    uint64_t name_ttl_ns;
    Registry *sessions;        /* what it opened (its own lock) */
};

static void mapped_v4(const void *v4, uint8_t out[16]) {
    memset(out, 0, 10);
    out[10] = out[11] = 0xff;
    memcpy(out + 12, v4, 4);
}

static void sockaddr_key(const struct sockaddr *sa, uint8_t out[HALF_KEY]) {
    uint16_t port;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        mapped_v4(&in->sin_addr, out);
        port = ntohs(in->sin_port);
    } else {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        memcpy(out, &in6->sin6_addr, 16);
        port = ntohs(in6->sin6_port);
    }
    memcpy(out + 16, &port, 2);
}

/* The same from text, as Python spells an address; -1 if it is not one. */
static int text_key(const char *ip, uint16_t port, uint8_t out[HALF_KEY]) {
    uint8_t v4[4];
    if (inet_pton(AF_INET, ip, v4) == 1) mapped_v4(v4, out);
    else if (inet_pton(AF_INET6, ip, out) != 1) return -1;
    memcpy(out + 16, &port, 2);
    return 0;
}

/* -- JSON ---------------------------------------------------------------------- */

/* s as a JSON string into out (cap bytes); its length, or -1 when s has a
 * byte outside ASCII (Python's text() decides those) or out is too small. */
static int json_string(char *out, size_t cap, const char *s, size_t n) {
    size_t k = 0;
    if (cap < 2) return -1;
    out[k++] = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x80 || k + 7 >= cap) return -1;
        if (ch == '"' || ch == '\\') {
            out[k++] = '\\';
            out[k++] = (char)ch;
        } else if (ch < 0x20) {
            k += (size_t)snprintf(out + k, cap - k, "\\u%04x", ch);
        } else {
            out[k++] = (char)ch;
        }
    }
    out[k++] = '"';
    return (int)k;
}

/* -- what Python taught: names and destinations --------------------------------- */

static Name *find_name(Opener *o, uint32_t tgid, uint64_t now) {
    for (Name *n = o->names[tgid % NAME_BUCKETS]; n; n = n->next)
        if (n->tgid == tgid) return n->expires_ns > now ? n : NULL;
    return NULL;
}

static void forget_names(Opener *o) {
    for (int i = 0; i < NAME_BUCKETS; i++) {
        while (o->names[i]) {
            Name *n = o->names[i];
            o->names[i] = n->next;
            free(n);
        }
    }
    o->nnames = 0;
}

static int allowed(Opener *o, const uint8_t key[HALF_KEY]) {
    for (Dest *d = o->dests[tg_hash(key, HALF_KEY) % DEST_BUCKETS]; d; d = d->next)
        if (memcmp(d->key, key, HALF_KEY) == 0) return 1;
    return 0;
}

static OpenSession *new_session(Opener *o, const uint8_t key[KEY_LEN]) {
    OpenSession *s = calloc(1, sizeof *s);
    if (s) {
        s->opener = o;
        memcpy(s->key, key, KEY_LEN);
    }
    return s;
}

/* -- the records -------------------------------------------------------------------- */

int opener_ended(OpenSession *s, const char *reason, uint64_t client_bytes,
                 uint64_t server_bytes) {
    char why[420], json[640];
    int wlen = json_string(why, sizeof why, reason, strlen(reason));
    if (wlen < 0) wlen = snprintf(why, sizeof why, "\"%s\"", "closed (reason not ASCII)");
    uint64_t now = tg_clock_ns(CLOCK_REALTIME);
    double ms = (double)(int64_t)(now - s->opened_ns) / 1e6;
    int n = snprintf(json, sizeof json,
                     "{\"session\":%llu,\"reason\":%.*s,\"client_bytes\":%llu,"
                     "\"server_bytes\":%llu,\"duration_ms\":%.3f}",
                     (unsigned long long)s->sid, wlen, why, (unsigned long long)client_bytes,
                     (unsigned long long)server_bytes, ms);
    struct iovec pay = {json, (size_t)n};
    int kind = TG_KIND_SESSION_CLOSE;
    uint64_t seq;
    Opener *o = s->opener;
    int err = chain_append_records((Chain *)o->chain, 0, &pay, &kind, 1, now, NULL, NULL, &seq);
    registry_closed(o->sessions, s, strncmp(reason, "upstream failed", 15) == 0, err != 0);
    return err;
}

/* SESSION_INFO's payload: `{"session":<sid>` is put in front of the rest
 * under the chain's lock, when the SESSION_OPEN's number is known. */
#define SID_ROOM 32
typedef struct {
    char *info;                /* SID_ROOM bytes of room, then the rest */
    size_t rest_len;
} InfoFill;

static void fill_sid(void *ctx, uint64_t first_seq, struct iovec *pay) {
    InfoFill *f = ctx;
    char head[SID_ROOM];
    int n = snprintf(head, sizeof head, "{\"session\":%llu", (unsigned long long)first_seq);
    memcpy(f->info + SID_ROOM - n, head, (size_t)n);
    pay[1] = (struct iovec){f->info + SID_ROOM - n, (size_t)n + f->rest_len};
}

static long bpf_map(int cmd, int fd, const void *key, void *value) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_fd = (uint32_t)fd;
    attr.key = (uint64_t)(uintptr_t)key;
    attr.value = (uint64_t)(uintptr_t)value;
    return syscall(__NR_bpf, cmd, &attr, sizeof attr);
}

/* The kernel's event for this client, if it proves the socket and names the
 * same destination (connections.py's _from_kernel). */
static int proven(Opener *o, const uint8_t peer[HALF_KEY], const char *dst_text,
                  unsigned dst_port, struct tg_peer *key, struct tg_tcp_event *ev) {
    memset(key, 0, sizeof *key);
    memcpy(key->addr, peer, 16);
    memcpy(&key->port, peer + 16, 2);
    if (bpf_map(BPF_MAP_LOOKUP_ELEM, o->attributed_fd, key, ev) != 0) return 0;
    char text[INET6_ADDRSTRLEN] = "";
    if (ev->family == AF_INET) inet_ntop(AF_INET, ev->daddr, text, sizeof text);
    else if (ev->family == AF_INET6) inet_ntop(AF_INET6, ev->daddr, text, sizeof text);
    return ev->dport == dst_port && strcmp(text, dst_text) == 0;
}

/* What Python's SESSION_INFO holds after the session number, from the event
 * and the process's chain (JSON); -1 if it cannot be written here. */
static int info_rest(char *out, size_t cap, const struct tg_tcp_event *ev, const char *chain,
                     size_t chain_len) {
    static const char probe[] = ",\"probe\":\"" TG_KERNEL_PROBE "\"}";
    char comm[8 * TG_COMM_LEN];
    int clen = json_string(comm, sizeof comm, ev->h.comm, strnlen(ev->h.comm, TG_COMM_LEN));
    if (clen < 0) return -1;
    int n = snprintf(out, cap,
                     ",\"uid\":%u,\"pid\":%u,\"tid\":%u,\"comm\":%.*s,\"cgroup_id\":%llu,"
                     "\"netns_inode\":%u,\"chain\":",
                     ev->h.uid, ev->h.tgid, ev->h.pid, clen, comm,
                     (unsigned long long)ev->h.cgroup_id, ev->h.netns);
    if (n < 0 || (size_t)n + chain_len + sizeof probe > cap) return -1;
    memcpy(out + n, chain, chain_len);
    memcpy(out + n + chain_len, probe, sizeof probe - 1);
    return n + (int)(chain_len + sizeof probe - 1);
}

/* The name's JSON, copied out under the lock, if the process is named and
 * the destination judged; NULL otherwise. */
static char *lookup(Opener *o, uint32_t tgid, const uint8_t dkey[HALF_KEY], size_t *len) {
    char *copy = NULL;
    uint64_t now = tg_clock_ns(CLOCK_MONOTONIC);
    pthread_mutex_lock(&o->mu);
    Name *n = allowed(o, dkey) ? find_name(o, tgid, now) : NULL;
    if (n && (copy = malloc(n->len)) != NULL) {
        memcpy(copy, n->json, n->len);
        *len = n->len;
    }
    pthread_mutex_unlock(&o->mu);
    return copy;
}

/* 1 if the connection was opened here (the pump owns fd then), 0 to leave
 * it to Python. In worker w's thread. */
static int open_in_c(Opener *o, PumpWorker *w, int fd, const struct sockaddr *peer,
                     const struct sockaddr *dst) {
    char client[INET6_ADDRSTRLEN], to[INET6_ADDRSTRLEN];
    unsigned cport, dport;
    address_text(dst, to, &dport);
    uint8_t skey[KEY_LEN];     /* the client's half, then the destination's */
    sockaddr_key(peer, skey);
    sockaddr_key(dst, skey + HALF_KEY);
    struct tg_peer key;
    struct tg_tcp_event ev;
    if (!proven(o, skey, to, dport, &key, &ev)) return 0;
    size_t clen = 0;
    char *chain = lookup(o, ev.h.tgid, skey + HALF_KEY, &clen);
    if (chain == NULL) return 0;
    size_t cap = clen + 512;
    char *info = malloc(SID_ROOM + cap);
    int rest = info ? info_rest(info + SID_ROOM, cap, &ev, chain, clen) : -1;
    free(chain);
    OpenSession *s = rest < 0 ? NULL : new_session(o, skey);
    if (s == NULL) {
        free(info);
        return 0;
    }
    address_text(peer, client, &cport);
    uint64_t now = tg_clock_ns(CLOCK_REALTIME);
    char open[256];
    int olen = snprintf(open, sizeof open,
                        "{\"client\":[\"%s\",%u],\"original_dst\":[\"%s\",%u],\"time_ns\":%llu}",
                        client, cport, to, dport, (unsigned long long)now);
    struct iovec pay[2] = {{open, (size_t)olen}, {NULL, 0}};
    int kinds[2] = {TG_KIND_SESSION_OPEN, TG_KIND_SESSION_INFO};
    InfoFill fill = {info, (size_t)rest};
    uint64_t sid;
    int err = chain_append_records((Chain *)o->chain, 0, pay, kinds, 2, now, fill_sid, &fill,
                                   &sid);
    free(info);
    if (err) {
        free(s);
        return 0;  /* Python's path meets the failing store and handles it */
    }
    bpf_map(BPF_MAP_DELETE_ELEM, o->attributed_fd, &key, NULL);  /* consumed, as Python's take */
    s->sid = sid;
    s->opened_ns = now;
    registry_add(o->sessions, s);
    const uint8_t *daddr = skey + HALF_KEY;   /* an IPv4 destination is dialled as IPv4 */
    int v4 = IN6_IS_ADDR_V4MAPPED((const struct in6_addr *)daddr);
    pump_dial((Pump *)o->pump, w, sid, fd, v4 ? AF_INET : AF_INET6, v4 ? daddr + 12 : daddr,
              (int)dport, s);  /* dials here and now */
    return 1;
}

/* Queue a connection for Python; the first of a batch wakes it. */
static void leave(Opener *o, int fd, const struct sockaddr *peer, const struct sockaddr *dst) {
    pthread_mutex_lock(&o->mu);
    int first = o->left.n == 0;
    Left *l = batch_add(&o->left, sizeof *l);
    if (l == NULL) {   /* the subject sees a reset; nothing was recorded or relayed */
        pthread_mutex_unlock(&o->mu);
        tg_close_reset(fd);
        return;
    }
    l->fd = fd;
    memcpy(&l->peer, peer, peer->sa_family == AF_INET ? sizeof(struct sockaddr_in)
                                                       : sizeof(struct sockaddr_in6));
    memcpy(&l->dst, dst, dst->sa_family == AF_INET ? sizeof(struct sockaddr_in)
                                                   : sizeof(struct sockaddr_in6));
    pthread_mutex_unlock(&o->mu);
    if (first) (void)!tg_signal(o->left_fd);
}

typedef struct {
    Opener *o;
    PumpWorker *w;
} Taking;

static void take(void *ctx, int fd, const struct sockaddr *peer, const struct sockaddr *dst) {
    Taking *t = ctx;
    Opener *o = t->o;
    int here = __atomic_load_n(&o->open_here, __ATOMIC_RELAXED) && o->attributed_fd >= 0;
    if (!here || !open_in_c(o, t->w, fd, peer, dst)) leave(o, fd, peer, dst);
}

#define ACCEPT_BATCH 64   /* a wake-up's accepts: the worker's sessions get their turn */

/* PumpListener.ready: a listening socket is readable, in worker w. */
static int ready(PumpListener *l, PumpWorker *w) {
    Opener *o = l->ctx;
    Taking t = {o, w};
    int skipped = 0;
    int err = accept_redirected(l->fd, ACCEPT_BATCH, take, &t, &skipped);
    if (skipped || err) {
        pthread_mutex_lock(&o->mu);
        o->not_redirected += skipped;
        if (err) o->accept_errno = err;
        int first = o->left.n == 0;
        pthread_mutex_unlock(&o->mu);
        if (first) (void)!tg_signal(o->left_fd);  /* Python counts, logs */
    }
    return err;
}

/* -- the Python type --------------------------------------------------------------- */

static int Opener_init(Opener *o, PyObject *args, PyObject *kw) {
    static char *names[] = {"pump", "chain", "linger_s", "name_ttl_s", NULL};
    PyObject *pump, *chain;
    double linger_s = 30.0, ttl_s = 2.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!|dd", names, &PumpType, &pump, &ChainType,
                                     &chain, &linger_s, &ttl_s))
        return -1;
    if (o->pump) {
        PyErr_SetString(PyExc_RuntimeError, "Opener is already made");
        return -1;
    }
    Py_INCREF(pump);
    Py_INCREF(chain);
    o->pump = pump;
    o->chain = chain;
    o->sessions = registry_new((uint64_t)(linger_s * 1e9));
    if (o->sessions == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->name_ttl_ns = (uint64_t)(ttl_s * 1e9);
    return 0;
}

static PyObject *Opener_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Opener *o = (Opener *)type->tp_alloc(type, 0);
    if (o == NULL) return NULL;
    o->attributed_fd = -1;
    o->open_here = 1;
    pthread_mutex_init(&o->mu, NULL);
    o->left_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (o->left_fd < 0) {
        Py_DECREF(o);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return (PyObject *)o;
}

static void Opener_dealloc(Opener *o) {
    /* The pump's workers end sessions through their OpenSession: stop them first. */
    if (o->pump) {
        PyObject *r = PyObject_CallMethod(o->pump, "close", "s", "opener released");
        if (r == NULL) PyErr_Clear();
        Py_XDECREF(r);
    }
    forget_names(o);
    for (int i = 0; i < DEST_BUCKETS; i++) {
        while (o->dests[i]) {
            Dest *d = o->dests[i];
            o->dests[i] = d->next;
            free(d);
        }
    }
    registry_free(o->sessions);
    for (size_t i = 0; i < o->left.n; i++) close(((Left *)o->left.items)[i].fd);
    free(o->left.items);
    if (o->left_fd >= 0) close(o->left_fd);
    pthread_mutex_destroy(&o->mu);
    Py_XDECREF(o->pump);
    Py_XDECREF(o->chain);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

/* listen(fd): the pump's workers accept on this listening socket from now
 * on; the socket must stay open until the pump is closed. */
static PyObject *Opener_listen(Opener *o, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd)) return NULL;
    if (o->pump == NULL || o->nlisteners == TG_LISTEN_MAX) {
        PyErr_Format(PyExc_RuntimeError, "opener not made, or %d listeners already",
                     TG_LISTEN_MAX);
        return NULL;
    }
    PumpListener *l = &o->listeners[o->nlisteners];
    *l = (PumpListener){.fd = fd, .ready = ready, .ctx = o};
    int err = pump_listen((Pump *)o->pump, l);
    if (!err) o->nlisteners++;
    return none_or_oserror(err);
}

/* unlisten(): the workers stop accepting (stopping: the backlog waits for
 * the next agent, the sockets being kept in systemd's store). */
static PyObject *Opener_unlisten(Opener *o, PyObject *unused) {
    for (int i = 0; o->pump && i < o->nlisteners; i++)
        pump_unlisten((Pump *)o->pump, &o->listeners[i]);
    Py_RETURN_NONE;
}

/* left() -> ([(fd, client, original_dst)], not_redirected, errno): the
 * connections left to Python since the last call, those closed for having
 * no NAT record, and the last error accept4 gave (0: none). */
static PyObject *Opener_left(Opener *o, PyObject *unused) {
    uint64_t n;
    (void)!read(o->left_fd, &n, sizeof n);
    size_t count;
    lock_gil_free(&o->mu);
    Left *left = batch_take(&o->left, &count);
    int skipped = o->not_redirected, err = o->accept_errno;
    o->not_redirected = o->accept_errno = 0;
    pthread_mutex_unlock(&o->mu);
    PyObject *out = PyList_New((Py_ssize_t)count);
    for (size_t i = 0; i < count; i++) {
        PyObject *t = out ? accepted_tuple(left[i].fd, (struct sockaddr *)&left[i].peer,
                                           (struct sockaddr *)&left[i].dst) : NULL;
        if (t == NULL) {   /* out of memory: the rest are reset, not leaked */
            Py_CLEAR(out);
            tg_close_reset(left[i].fd);
            continue;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    free(left);
    return out ? Py_BuildValue("(Nii)", out, skipped, err) : NULL;
}

/* name(tgid, chain_json, generation): the process's chain as Python wrote it
 * in that generation of the process table; ignored if that is not the
 * current one (the table changed while Python built it). */
static PyObject *Opener_name(Opener *o, PyObject *args) {
    unsigned int tgid;
    unsigned long long gen;
    Py_buffer json;
    if (!PyArg_ParseTuple(args, "Iy*K", &tgid, &json, &gen)) return NULL;
    Name *n = malloc(sizeof *n + (size_t)json.len);
    if (n == NULL) {
        PyBuffer_Release(&json);
        return PyErr_NoMemory();
    }
    n->tgid = tgid;
    n->len = (size_t)json.len;
    memcpy(n->json, json.buf, n->len);
    PyBuffer_Release(&json);
    n->expires_ns = tg_clock_ns(CLOCK_MONOTONIC) + o->name_ttl_ns;
    lock_gil_free(&o->mu);
    Name **pp = &o->names[tgid % NAME_BUCKETS];
    while (*pp && (*pp)->tgid != tgid) pp = &(*pp)->next;
    if (gen != o->generation || (!*pp && o->nnames >= NAMES_MAX)) {
        free(n);
    } else if (*pp) {
        Name *old = *pp;
        n->next = old->next;
        *pp = n;
        free(old);
    } else {
        n->next = NULL;
        *pp = n;
        o->nnames++;
    }
    pthread_mutex_unlock(&o->mu);
    Py_RETURN_NONE;
}

/* new_generation(g): the process table changed; every name is forgotten. */
static PyObject *Opener_new_generation(Opener *o, PyObject *args) {
    unsigned long long gen;
    if (!PyArg_ParseTuple(args, "K", &gen)) return NULL;
    lock_gil_free(&o->mu);
    o->generation = gen;
    forget_names(o);
    pthread_mutex_unlock(&o->mu);
    Py_RETURN_NONE;
}

/* allow(ip, port): Python's policy let this destination through. */
static PyObject *Opener_allow(Opener *o, PyObject *args) {
    const char *ip;
    unsigned short port;
    if (!PyArg_ParseTuple(args, "sH", &ip, &port)) return NULL;
    uint8_t key[HALF_KEY];
    if (text_key(ip, port, key) != 0) return PyErr_Format(PyExc_ValueError, "not an address: %s", ip);
    lock_gil_free(&o->mu);
    uint32_t b = tg_hash(key, HALF_KEY) % DEST_BUCKETS;
    Dest *d = allowed(o, key) || o->ndests >= DESTS_MAX ? NULL : malloc(sizeof *d);
    if (d) {
        memcpy(d->key, key, HALF_KEY);
        d->next = o->dests[b];
        o->dests[b] = d;
        o->ndests++;
    }
    pthread_mutex_unlock(&o->mu);
    Py_RETURN_NONE;
}

/* knows(client_ip, client_port, dst_ip, dst_port) -> whether a session opened
 * here has this 4-tuple, open or closed less than linger_s ago. */
static PyObject *Opener_knows(Opener *o, PyObject *args) {
    const char *cip, *dip;
    unsigned short cport, dport;
    if (!PyArg_ParseTuple(args, "sHsH", &cip, &cport, &dip, &dport)) return NULL;
    uint8_t key[KEY_LEN];
    if (text_key(cip, cport, key) != 0 || text_key(dip, dport, key + HALF_KEY) != 0)
        Py_RETURN_FALSE;
    return PyBool_FromLong(o->sessions && registry_knows(o->sessions, key));
}

static PyObject *Opener_statistics(Opener *o, PyObject *unused) {
    RegistryCounts c = o->sessions ? registry_counts(o->sessions) : (RegistryCounts){0};
    lock_gil_free(&o->mu);
    uint64_t names = o->nnames, dests = o->ndests;
    pthread_mutex_unlock(&o->mu);
    return Py_BuildValue("{sKsKsKsKsKsK}", "opened", c.opened, "open", c.open,
                         "upstream_failed", c.upstream_failed, "close_failed", c.close_failed,
                         "names", names, "destinations", dests);
}

static PyObject *Opener_get_attributed_fd(Opener *o, void *unused) {
    return PyLong_FromLong(o->attributed_fd);
}

static int Opener_set_attributed_fd(Opener *o, PyObject *v, void *unused) {
    long fd = v ? PyLong_AsLong(v) : -1;
    if (fd == -1 && PyErr_Occurred()) return -1;
    o->attributed_fd = (int)fd;
    return 0;
}

static PyMethodDef Opener_methods[] = {
    {"listen", (PyCFunction)Opener_listen, METH_VARARGS,
     "listen(fd): the pump's workers accept on this listening socket"},
    {"unlisten", (PyCFunction)Opener_unlisten, METH_NOARGS,
     "unlisten(): the pump's workers stop accepting; the backlog waits"},
    {"left", (PyCFunction)Opener_left, METH_NOARGS,
     "left() -> ([(fd, client, original_dst)], not_redirected, errno): what is Python's"},
    {"name", (PyCFunction)Opener_name, METH_VARARGS,
     "name(tgid, chain_json, generation): a process named in that generation"},
    {"new_generation", (PyCFunction)Opener_new_generation, METH_VARARGS,
     "new_generation(g): the process table changed; names are forgotten"},
    {"allow", (PyCFunction)Opener_allow, METH_VARARGS,
     "allow(ip, port): a destination the policy let through"},
    {"knows", (PyCFunction)Opener_knows, METH_VARARGS,
     "knows(client_ip, client_port, dst_ip, dst_port): a session opened here, open or lingering"},
    {"statistics", (PyCFunction)Opener_statistics, METH_NOARGS, "counters"},
    {NULL},
};

static PyObject *Opener_get_open_here(Opener *o, void *unused) {
    return PyBool_FromLong(__atomic_load_n(&o->open_here, __ATOMIC_RELAXED));
}

static int Opener_set_open_here(Opener *o, PyObject *v, void *unused) {
    int here = v ? PyObject_IsTrue(v) : 0;
    if (here < 0) return -1;
    __atomic_store_n(&o->open_here, here, __ATOMIC_RELAXED);
    return 0;
}

static PyObject *Opener_get_left_fd(Opener *o, void *unused) { return PyLong_FromLong(o->left_fd); }

static PyGetSetDef Opener_getset[] = {
    {"attributed_fd", (getter)Opener_get_attributed_fd, (setter)Opener_set_attributed_fd,
     "the witness's `attributed` map (-1: open nothing here)", NULL},
    {"open_here", (getter)Opener_get_open_here, (setter)Opener_set_open_here,
     "False: every connection is left to Python (the proxy is not accepting)", NULL},
    {"left_fd", (getter)Opener_get_left_fd, NULL, "readable when left() has something", NULL},
    {NULL},
};

PyTypeObject OpenerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.native._native.Opener",
    .tp_doc = "Opener(pump, chain, linger_s=30, name_ttl_s=2): sessions opened in C.",
    .tp_basicsize = sizeof(Opener),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Opener_new,
    .tp_init = (initproc)Opener_init,
    .tp_dealloc = (destructor)Opener_dealloc,
    .tp_methods = Opener_methods,
    .tp_getset = Opener_getset,
};
