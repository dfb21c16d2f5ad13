/* Relay threads for established sessions: read, record, send.
 *
 * The Python proxy accepts, names the process, applies policy and connects
 * upstream; then it hands both sockets here.  Each worker thread runs one
 * epoll loop over its sessions and never takes the GIL.  Per chunk, in this
 * order (DESIGN.md invariant 1): read from one side, append the DATA record
 * to the chain, send to the other side.  A side is not read again while what
 * it sent last is still waiting for the peer, so memory is one chunk per
 * direction at most.  The semantics are agent/proxy/relay.py's: an EOF is
 * passed on as a half-close, both EOFs (and nothing left to send) close the
 * session, a lost side resets the other, a failed append resets both.
 * Ended sessions are queued for Python, which writes SESSION_CLOSE.
 */
#include "native.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

enum { CLIENT = 0, SERVER = 1 };
static const char *SIDE_NAME[2] = {"client", "server"};

typedef struct Sess {
    uint64_t sid;
    int fd[2];
    uint32_t mask[2];          /* epoll interest now registered per side */
    uint8_t eof[2];            /* the side sent its FIN */
    uint8_t shut[2];           /* we sent ours towards the side */
    uint8_t dead;
    char *pend[2];             /* bytes still to be sent towards a side */
    size_t pend_len[2], pend_off[2];
    uint64_t bytes[2];         /* read from each side (recorded) */
    struct Sess *next, *prev;  /* inbox, then the worker's live list */
} Sess;

typedef struct {
    uint64_t sid, client_bytes, server_bytes;
    int store_errno;
    char reason[200];
} Done;

struct Pump;

typedef struct {
    struct Pump *pump;
    pthread_t thread;
    int ep, wake;
    pthread_mutex_t mu;        /* the inbox */
    Sess *inbox, *live, *dead;
    char *buf;
} Worker;

typedef struct Pump {
    PyObject_HEAD
    Chain *chain;
    int nworkers, started, closed;
    Worker *workers;
    unsigned next_worker;
    size_t buf_size;
    int done_fd;               /* eventfd: Python has ended sessions to read */
    pthread_mutex_t done_mu;
    Done *done;
    size_t ndone, cap;
    volatile int stopping;
    char stop_reason[160];
    uint64_t live_count;       /* under done_mu */
} Pump;

/* -- ending sessions ------------------------------------------------------------- */

static void push_done(Pump *p, Sess *s, const char *reason, int store_errno) {
    pthread_mutex_lock(&p->done_mu);
    if (p->ndone == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 64;
        Done *d = realloc(p->done, cap * sizeof *d);
        if (d == NULL) abort();   /* losing a close record silently is not an option */
        p->done = d;
        p->cap = cap;
    }
    Done *d = &p->done[p->ndone++];
    d->sid = s->sid;
    d->client_bytes = s->bytes[CLIENT];
    d->server_bytes = s->bytes[SERVER];
    d->store_errno = store_errno;
    snprintf(d->reason, sizeof d->reason, "%s", reason);
    p->live_count--;
    pthread_mutex_unlock(&p->done_mu);
    uint64_t one = 1;
    (void)!write(p->done_fd, &one, sizeof one);
}

static void close_side(Sess *s, int side, int reset) {
    if (s->fd[side] < 0) return;
    if (reset) {
        struct linger lg = {1, 0};  /* the peer sees a reset, not a FIN */
        setsockopt(s->fd[side], SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(s->fd[side]);
    s->fd[side] = -1;
}

static void end(Worker *w, Sess *s, const char *reason, int reset_client, int reset_server,
                int store_errno) {
    if (s->dead) return;
    s->dead = 1;
    close_side(s, CLIENT, reset_client);
    close_side(s, SERVER, reset_server);
    for (int i = 0; i < 2; i++) free(s->pend[i]), s->pend[i] = NULL, s->pend_len[i] = 0;
    /* unlink from live; freed after the current batch of events (they may name it) */
    if (s->prev) s->prev->next = s->next; else w->live = s->next;
    if (s->next) s->next->prev = s->prev;
    s->next = w->dead;
    w->dead = s;
    push_done(w->pump, s, reason, store_errno);
}

/* A side is gone with an error (or without its EOF): reset the other. */
static void lost(Worker *w, Sess *s, int side, int err) {
    char why[200];
    snprintf(why, sizeof why, "%s lost: %s", SIDE_NAME[side],
             err ? strerror(err) : "closed without EOF");
    end(w, s, why, side != CLIENT, side != SERVER, 0);
}

/* -- moving bytes ------------------------------------------------------------------ */

static void half_close(Sess *s, int side) {
    if (!s->shut[side] && s->fd[side] >= 0) {
        shutdown(s->fd[side], SHUT_WR);
        s->shut[side] = 1;
    }
}

static int finished(Sess *s) {
    return s->eof[CLIENT] && s->eof[SERVER] && !s->pend_len[CLIENT] && !s->pend_len[SERVER];
}

/* Send towards `to`; what the peer cannot take now waits in pend. 0 or errno. */
static int send_to(Sess *s, int to, const char *data, size_t len) {
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(s->fd[to], data + off, len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            return errno;
        }
        off += (size_t)n;
    }
    if (off < len) {
        s->pend[to] = malloc(len - off);
        if (s->pend[to] == NULL) return ENOMEM;
        memcpy(s->pend[to], data + off, len - off);
        s->pend_len[to] = len - off;
        s->pend_off[to] = 0;
    }
    return 0;
}

static int flush(Sess *s, int to) {
    while (s->pend_len[to]) {
        ssize_t n = send(s->fd[to], s->pend[to] + s->pend_off[to], s->pend_len[to],
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : errno;
        }
        s->pend_off[to] += (size_t)n;
        s->pend_len[to] -= (size_t)n;
    }
    free(s->pend[to]);
    s->pend[to] = NULL;
    if (s->eof[!to]) half_close(s, to);
    return 0;
}

static void read_side(Worker *w, Sess *s, int side) {
    ssize_t n = recv(s->fd[side], w->buf, w->pump->buf_size, 0);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) lost(w, s, side, errno);
        return;
    }
    if (n == 0) {
        s->eof[side] = 1;
        if (!s->pend_len[!side]) half_close(s, !side);
        return;
    }
    s->bytes[side] += (uint64_t)n;
    int err = chain_append_data(w->pump->chain, s->sid, side, w->buf, (size_t)n);
    if (err) {
        char why[200];
        snprintf(why, sizeof why, "store failed: store append failed: %s", strerror(err));
        end(w, s, why, 1, 1, err);
        return;
    }
    err = send_to(s, !side, w->buf, (size_t)n);
    if (err) lost(w, s, !side, err);
}

/* -- epoll --------------------------------------------------------------------------- */

static uint64_t tag(Sess *s, int side) { return (uint64_t)(uintptr_t)s | (uint64_t)side; }

static void update_interest(Worker *w, Sess *s) {
    for (int i = 0; i < 2; i++) {
        if (s->fd[i] < 0 || s->mask[i] == UINT32_MAX) continue;
        uint32_t m = 0;
        if (!s->eof[i] && !s->pend_len[!i]) m |= EPOLLIN;
        if (s->pend_len[i]) m |= EPOLLOUT;
        if (m == s->mask[i]) continue;
        struct epoll_event ev = {.events = m, .data.u64 = tag(s, i)};
        epoll_ctl(w->ep, EPOLL_CTL_MOD, s->fd[i], &ev);
        s->mask[i] = m;
    }
}

static void on_event(Worker *w, Sess *s, int side, uint32_t events) {
    if (s->dead) return;
    if (s->pend_len[side] && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        int err = flush(s, side);
        if (err) { lost(w, s, side, err); return; }
    }
    if ((s->mask[side] & EPOLLIN) && (events & (EPOLLIN | EPOLLERR | EPOLLHUP))) {
        read_side(w, s, side);
        if (s->dead) return;
    } else if (events & EPOLLERR) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd[side], SOL_SOCKET, SO_ERROR, &err, &len);
        lost(w, s, side, err ? err : ECONNRESET);
        return;
    } else if ((events & EPOLLHUP) && !s->pend_len[side]) {
        /* Nothing to read or send there now; a later send finds out the rest. */
        epoll_ctl(w->ep, EPOLL_CTL_DEL, s->fd[side], NULL);
        s->mask[side] = UINT32_MAX;
    }
    if (finished(s)) {
        end(w, s, "closed", 0, 0, 0);
        return;
    }
    if (s->mask[side] != UINT32_MAX) update_interest(w, s);
}

static void adopt(Worker *w, Sess *s) {
    s->prev = NULL;
    s->next = w->live;
    if (w->live) w->live->prev = s;
    w->live = s;
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag(s, i)};
        s->mask[i] = EPOLLIN;
        if (epoll_ctl(w->ep, EPOLL_CTL_ADD, s->fd[i], &ev) != 0) {
            lost(w, s, i, errno);
            return;
        }
    }
}

static void take_inbox(Worker *w) {
    uint64_t n;
    (void)!read(w->wake, &n, sizeof n);
    pthread_mutex_lock(&w->mu);
    Sess *s = w->inbox;
    w->inbox = NULL;
    pthread_mutex_unlock(&w->mu);
    while (s) {
        Sess *next = s->next;
        adopt(w, s);
        s = next;
    }
}

static void bury(Worker *w) {
    while (w->dead) {
        Sess *s = w->dead;
        w->dead = s->next;
        free(s);
    }
}

static void *worker_main(void *arg) {
    Worker *w = arg;
    pthread_setname_np(pthread_self(), "tollgate-relay");  /* for top -H and ps */
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(w->ep, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            uint64_t t = evs[i].data.u64;
            if (t == 0) take_inbox(w);
            else on_event(w, (Sess *)(uintptr_t)(t & ~1ull), (int)(t & 1), evs[i].events);
        }
        bury(w);
        if (w->pump->stopping) break;
    }
    take_inbox(w);
    while (w->live) end(w, w->live, w->pump->stop_reason, 1, 1, 0);
    bury(w);
    return NULL;
}

/* -- the Python type ------------------------------------------------------------- */

static void stop_workers(Pump *p, const char *reason) {
    if (!p->started || p->closed) return;
    p->closed = 1;
    snprintf(p->stop_reason, sizeof p->stop_reason, "%s", reason);
    __atomic_store_n(&p->stopping, 1, __ATOMIC_SEQ_CST);
    uint64_t one = 1;
    for (int i = 0; i < p->nworkers; i++) (void)!write(p->workers[i].wake, &one, sizeof one);
    for (int i = 0; i < p->nworkers; i++) pthread_join(p->workers[i].thread, NULL);
}

static int start_worker(Pump *p, Worker *w) {
    w->pump = p;
    w->ep = epoll_create1(EPOLL_CLOEXEC);
    w->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    w->buf = malloc(p->buf_size);
    pthread_mutex_init(&w->mu, NULL);
    if (w->ep < 0 || w->wake < 0 || w->buf == NULL) return -1;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0};
    if (epoll_ctl(w->ep, EPOLL_CTL_ADD, w->wake, &ev) != 0) return -1;
    return pthread_create(&w->thread, NULL, worker_main, w) == 0 ? 0 : -1;
}

static int Pump_init(Pump *p, PyObject *args, PyObject *kw) {
    static char *names[] = {"chain", "workers", "buffer_bytes", NULL};
    PyObject *chain;
    int workers;
    Py_ssize_t buf;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!in", names, &ChainType, &chain, &workers, &buf))
        return -1;
    if (p->workers) {
        PyErr_SetString(PyExc_RuntimeError, "Pump is already running");
        return -1;
    }
    if (workers < 1 || buf < 1) {
        PyErr_SetString(PyExc_ValueError, "workers and buffer_bytes must be positive");
        return -1;
    }
    Py_INCREF(chain);
    p->chain = (Chain *)chain;
    p->buf_size = (size_t)buf;
    pthread_mutex_init(&p->done_mu, NULL);
    p->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->workers = calloc((size_t)workers, sizeof(Worker));
    if (p->done_fd < 0 || p->workers == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    for (int i = 0; i < workers; i++) {
        if (start_worker(p, &p->workers[i]) != 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            p->nworkers = i, p->started = 1;
            stop_workers(p, "pump failed to start");
            return -1;
        }
        p->nworkers = i + 1;
    }
    p->started = 1;
    return 0;
}

/* add(session_id, client_fd, server_fd): the pump owns both sockets from here. */
static PyObject *Pump_add(Pump *p, PyObject *args) {
    unsigned long long sid;
    int cfd, sfd;
    if (!PyArg_ParseTuple(args, "Kii", &sid, &cfd, &sfd)) return NULL;
    if (p->closed || !p->started) {
        PyErr_SetString(PyExc_RuntimeError, "pump is closed");
        return NULL;
    }
    Sess *s = calloc(1, sizeof *s);
    if (s == NULL) return PyErr_NoMemory();
    s->sid = sid;
    s->fd[CLIENT] = cfd;
    s->fd[SERVER] = sfd;
    Worker *w = &p->workers[p->next_worker++ % (unsigned)p->nworkers];
    pthread_mutex_lock(&p->done_mu);
    p->live_count++;
    pthread_mutex_unlock(&p->done_mu);
    pthread_mutex_lock(&w->mu);
    s->next = w->inbox;
    w->inbox = s;
    pthread_mutex_unlock(&w->mu);
    uint64_t one = 1;
    (void)!write(w->wake, &one, sizeof one);
    Py_RETURN_NONE;
}

/* finished() -> [(session_id, reason, client_bytes, server_bytes, store_errno)] */
static PyObject *Pump_finished(Pump *p, PyObject *unused) {
    uint64_t n;
    (void)!read(p->done_fd, &n, sizeof n);
    pthread_mutex_lock(&p->done_mu);
    Done *done = p->done;
    size_t count = p->ndone;
    p->done = NULL;
    p->ndone = p->cap = 0;
    pthread_mutex_unlock(&p->done_mu);
    PyObject *out = PyList_New((Py_ssize_t)count);
    for (size_t i = 0; out && i < count; i++) {
        Done *d = &done[i];
        PyObject *t = Py_BuildValue("(KsKKi)", d->sid, d->reason, d->client_bytes,
                                    d->server_bytes, d->store_errno);
        if (t == NULL) { Py_CLEAR(out); break; }
        PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    free(done);
    return out;
}

static PyObject *Pump_close(Pump *p, PyObject *args) {
    const char *reason = "agent stopping";
    if (!PyArg_ParseTuple(args, "|s", &reason)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    stop_workers(p, reason);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Pump_get_live(Pump *p, void *unused) {
    pthread_mutex_lock(&p->done_mu);
    uint64_t n = p->live_count;
    pthread_mutex_unlock(&p->done_mu);
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *Pump_get_done_fd(Pump *p, void *unused) { return PyLong_FromLong(p->done_fd); }

static void Pump_dealloc(Pump *p) {
    Py_BEGIN_ALLOW_THREADS
    stop_workers(p, "pump released");
    Py_END_ALLOW_THREADS
    for (int i = 0; i < p->nworkers; i++) {
        Worker *w = &p->workers[i];
        close(w->ep);
        close(w->wake);
        free(w->buf);
    }
    free(p->workers);
    free(p->done);
    if (p->done_fd >= 0) close(p->done_fd);
    Py_XDECREF(p->chain);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *Pump_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Pump *p = (Pump *)type->tp_alloc(type, 0);
    if (p) p->done_fd = -1;
    return (PyObject *)p;
}

static PyMethodDef Pump_methods[] = {
    {"add", (PyCFunction)Pump_add, METH_VARARGS,
     "add(session_id, client_fd, server_fd): relay them; the pump owns the fds"},
    {"finished", (PyCFunction)Pump_finished, METH_NOARGS,
     "ended sessions since the last call: (id, reason, client_bytes, server_bytes, store_errno)"},
    {"close", (PyCFunction)Pump_close, METH_VARARGS,
     "close(reason): reset every session, end them with reason, stop the threads"},
    {NULL},
};

static PyGetSetDef Pump_getset[] = {
    {"live", (getter)Pump_get_live, NULL, "sessions being relayed", NULL},
    {"done_fd", (getter)Pump_get_done_fd, NULL, "readable when finished() has something", NULL},
    {NULL},
};

PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.native._native.Pump",
    .tp_doc = "Pump(chain, workers, buffer_bytes): relay threads for established sessions.",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Pump_new,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
    .tp_getset = Pump_getset,
};
