/* Relay threads: connect upstream, then read, record, send.
 *
 * The Python proxy accepts, names the process and applies policy; then it
 * hands the subject's socket here with the destination (Pump.connect), or
 * two connected sockets (Pump.add); opening.c does the same in C (pump_dial)
 * for what Python has judged before.  A worker connects without blocking and
 * ends the session "upstream failed: ..." with a reset to the subject when
 * that fails or outlasts the timeout.  Each direction of a session
 * (subject -> destination, destination -> subject) is owned by one worker
 * thread, the two by different workers when there are two or more, so one
 * busy session keeps two cores busy: while one direction holds the chain to
 * hash its chunk, the other reads and sends.  No worker takes the GIL.
 *
 * Per chunk, in this order (DESIGN.md invariant 1): read from one side,
 * append the DATA record to the chain, send to the other side.  A side is not
 * read again while its last chunk still waits for the peer, so memory is one
 * chunk per direction at most.  The semantics are agent/proxy/relay.py's: an
 * EOF is passed on as a half-close; both directions finished closes the
 * session; a lost side resets the other; a failed append resets both and
 * forwards nothing.  Ended sessions are queued for Python, which writes
 * SESSION_CLOSE, unless opening.c opened them: then it writes that too, and
 * Python hears of the session only if its close record failed.
 *
 * A direction sends through the peer's socket, or through its own dup of it
 * when both directions share a worker (one epoll instance holds a descriptor
 * once); the originals are closed (with SO_LINGER 0 when resetting) only once
 * both directions have let go.
 */
#include "native.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

enum { CLIENT = 0, SERVER = 1 };
static const char *SIDE_NAME[2] = {"client", "server"};
#define UNREGISTERED UINT32_MAX

typedef struct Sess Sess;
typedef struct Worker Worker;

typedef struct Dir {
    Sess *s;
    Worker *w;
    int from;                  /* the side read; the other side is sent to */
    int rfd, wfd;              /* the side's socket; the other's (or a dup of it), for sends */
    uint32_t rmask, wmask;     /* registered interest, or UNREGISTERED */
    uint8_t eof, adopted, retired;  /* worker-local: registered; let go of the session */
    uint8_t wfd_dup;           /* wfd is a dup, closed when this direction lets go */
    char *pend;                /* what the other side could not take yet */
    size_t pend_len, pend_off;
    struct Dir *next, *prev;   /* inbox, then the worker's live list */
} Dir;

typedef struct Dial {         /* an upstream connect in progress (Pump.connect) */
    uint64_t sid, deadline_ns;
    int cfd, sfd, family, port;
    unsigned char addr[16];
    OpenSession *opened;       /* opened in C: the opener writes its end */
    struct Dial *next, *prev;  /* inbox, then the worker's list, oldest first */
} Dial;

typedef struct Msg {           /* "look at this direction": its session was cut */
    Dir *d;
    struct Msg *next;
} Msg;

struct Sess {
    uint64_t sid;
    OpenSession *opened;       /* opened in C: the opener writes its end */
    int fd[2];
    pthread_mutex_t mu;        /* everything below */
    int refs;                  /* memory: live directions + messages in flight + batches */
    int live_dirs;             /* closing the sockets waits for 0 */
    int dead;                  /* cut: nothing more is sent (read without the lock) */
    int reset[2], store_errno;
    int dir_retired[2];
    uint64_t bytes[2];
    char reason[200];
    Dir d[2];
};

typedef struct {
    uint64_t sid, client_bytes, server_bytes;
    int store_errno;
    char reason[200];
} Done;

struct Pump;

struct Worker {
    struct Pump *pump;
    pthread_t thread;
    int ep, wake;
    pthread_mutex_t mu;        /* inbox, messages, dial inbox, wake_pending */
    int wake_pending;          /* woken since the inbox was last taken: no second write */
    Dir *inbox, *live;
    Msg *msgs;
    Dir *buried;               /* retired this batch, released after it */
    Dial *dial_inbox;
    Dial *dialing, *dialing_tail;  /* one timeout for all: deadlines in order */
    PumpListener *paused[TG_LISTEN_MAX];  /* out of this epoll until relisten_ns */
    int npaused;
    uint64_t relisten_ns;
    char *buf;
};

typedef struct Pump {
    PyObject_HEAD
    Chain *chain;
    int nworkers, started, closed;
    Worker *workers;
    unsigned next_worker;
    size_t buf_size;
    int done_fd;               /* eventfd: Python has ended sessions to read */
    pthread_mutex_t done_mu;
    Batch done;                /* of Done */
    volatile int stopping;
    char stop_reason[160];
    uint64_t live_count;       /* atomic: asked for and changed on every connection */
    uint64_t connect_timeout_ns;
} Pump;

/* epoll tags: 0 the inbox's eventfd; a Dir | 0 or 1 (its write side); a
 * Dial | 2; a PumpListener | 3 (all at least 4-aligned). */
#define TAG_DIAL 2u
#define TAG_LISTENER 3u

static int is_dead(Sess *s) { return __atomic_load_n(&s->dead, __ATOMIC_ACQUIRE); }

static void unref(Sess *s) {
    pthread_mutex_lock(&s->mu);
    int last = --s->refs == 0;
    pthread_mutex_unlock(&s->mu);
    if (last) {
        pthread_mutex_destroy(&s->mu);
        free(s);
    }
}

/* -- ending sessions ------------------------------------------------------------- */

static void push_done(Pump *p, uint64_t sid, const char *reason, uint64_t client_bytes,
                      uint64_t server_bytes, int store_errno) {
    pthread_mutex_lock(&p->done_mu);
    int first = p->done.n == 0;  /* later ones are taken by the same finished() */
    Done *d = batch_add(&p->done, sizeof *d);
    if (d == NULL) abort();      /* losing a close record silently is not an option */
    d->sid = sid;
    d->client_bytes = client_bytes;
    d->server_bytes = server_bytes;
    d->store_errno = store_errno;
    snprintf(d->reason, sizeof d->reason, "%s", reason);
    __atomic_sub_fetch(&p->live_count, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&p->done_mu);
    if (first) (void)!tg_signal(p->done_fd);
}

/* The opener writes the close record of a session it opened; Python is told
 * only if that failed (a failing store is its to handle). */
static void end_session(Pump *p, OpenSession *opened, uint64_t sid, const char *reason,
                        uint64_t client_bytes, uint64_t server_bytes, int store_errno) {
    if (opened) {
        int err = opener_ended(opened, reason, client_bytes, server_bytes);
        if (!err && !store_errno) {
            __atomic_sub_fetch(&p->live_count, 1, __ATOMIC_RELAXED);
            return;
        }
        if (!store_errno) store_errno = err;
    }
    push_done(p, sid, reason, client_bytes, server_bytes, store_errno);
}

static void close_side(Sess *s, int side) {
    if (s->reset[side]) tg_close_reset(s->fd[side]);
    else close(s->fd[side]);
}

static void unregister(Worker *w, int fd, uint32_t *mask) {
    if (*mask != UNREGISTERED) epoll_ctl(w->ep, EPOLL_CTL_DEL, fd, NULL);
    *mask = UNREGISTERED;
}

/* This direction lets go of its session; the last one closes the sockets. */
static void retire(Worker *w, Dir *d) {
    if (d->retired) return;
    d->retired = 1;
    unregister(w, d->rfd, &d->rmask);
    unregister(w, d->wfd, &d->wmask);
    if (d->wfd_dup) close(d->wfd);
    free(d->pend);
    d->pend = NULL;
    d->pend_len = 0;
    if (d->prev) d->prev->next = d->next; else w->live = d->next;
    if (d->next) d->next->prev = d->prev;
    Sess *s = d->s;
    pthread_mutex_lock(&s->mu);
    s->dir_retired[d->from] = 1;
    int last = --s->live_dirs == 0;
    pthread_mutex_unlock(&s->mu);
    if (last) {
        close_side(s, CLIENT);
        close_side(s, SERVER);
        end_session(w->pump, s->opened, s->sid, s->reason, s->bytes[CLIENT], s->bytes[SERVER],
                    s->store_errno);
    }
    d->next = w->buried;  /* released after this batch: its events may still name d */
    w->buried = d;
}

static void wake(Worker *w) { (void)!tg_signal(w->wake); }

/* With w->mu held, after queueing for w: whether to wake it. Once per
 * taking of the inbox is enough, since the worker takes everything queued
 * by then; under load most hand-overs then cost no write and no wake-up. */
static int wake_due_locked(Worker *w) {
    int due = !w->wake_pending;
    w->wake_pending = 1;
    return due;
}

static void post(Worker *w, Dir *d) {
    Msg *m = malloc(sizeof *m);
    if (m == NULL) abort();
    m->d = d;
    pthread_mutex_lock(&w->mu);
    m->next = w->msgs;
    w->msgs = m;
    int due = wake_due_locked(w);
    pthread_mutex_unlock(&w->mu);
    if (due) wake(w);
}

/* Cut the session: the first reason wins; the other direction is told. */
static void cut(Worker *w, Dir *d, const char *reason, int reset_client, int reset_server,
                int store_errno) {
    Sess *s = d->s;
    Dir *other = &s->d[!d->from];
    pthread_mutex_lock(&s->mu);
    int notify = 0;
    if (!s->dead) {
        snprintf(s->reason, sizeof s->reason, "%s", reason);
        s->reset[CLIENT] = reset_client;
        s->reset[SERVER] = reset_server;
        s->store_errno = store_errno;
        __atomic_store_n(&s->dead, 1, __ATOMIC_RELEASE);
        notify = !s->dir_retired[other->from];
        if (notify) s->refs++;  /* the message's */
    }
    pthread_mutex_unlock(&s->mu);
    if (notify) post(other->w, other);
    retire(w, d);
}

/* A side is gone with an error: reset the other. */
static void lost(Worker *w, Dir *d, int side, int err) {
    char why[200];
    snprintf(why, sizeof why, "%s lost: %s", SIDE_NAME[side],
             err ? strerror(err) : "closed without EOF");
    cut(w, d, why, side != CLIENT, side != SERVER, 0);
}

/* Everything this direction read is delivered: pass its EOF on, unless the
 * session was cut (then the peer gets a reset, never a FIN before it). */
static void finish(Worker *w, Dir *d) {
    pthread_mutex_lock(&d->s->mu);
    if (!d->s->dead) shutdown(d->wfd, SHUT_WR);
    pthread_mutex_unlock(&d->s->mu);
    retire(w, d);
}

/* -- moving bytes ------------------------------------------------------------------ */

static void set_interest(Worker *w, int fd, uint32_t *mask, uint32_t want, uint64_t tag) {
    if (*mask == want) return;
    struct epoll_event ev = {.events = want, .data.u64 = tag};
    if (*mask == UNREGISTERED) epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev);
    else epoll_ctl(w->ep, EPOLL_CTL_MOD, fd, &ev);
    *mask = want;
}

static uint64_t tag(Dir *d, int write_side) { return (uint64_t)(uintptr_t)d | (uint64_t)write_side; }

/* Read while nothing waits for the peer; watch the peer while something does.
 * A side not to be read is unregistered, not masked: epoll reports HUP and
 * ERR whatever the mask, and a level-triggered HUP would spin the thread. */
static void update_interest(Worker *w, Dir *d) {
    if (d->eof || d->pend_len) unregister(w, d->rfd, &d->rmask);
    else set_interest(w, d->rfd, &d->rmask, EPOLLIN, tag(d, 0));
    if (d->pend_len) set_interest(w, d->wfd, &d->wmask, EPOLLOUT, tag(d, 1));
    else unregister(w, d->wfd, &d->wmask);
}

/* Send; what the peer cannot take now waits in pend. 0 or errno. */
static int send_all(Dir *d, const char *data, size_t len) {
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(d->wfd, data + off, len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            return errno;
        }
        off += (size_t)n;
    }
    if (off < len) {
        d->pend = malloc(len - off);
        if (d->pend == NULL) return ENOMEM;
        memcpy(d->pend, data + off, len - off);
        d->pend_len = len - off;
        d->pend_off = 0;
    }
    return 0;
}

static int flush(Dir *d) {
    while (d->pend_len) {
        ssize_t n = send(d->wfd, d->pend + d->pend_off, d->pend_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : errno;
        }
        d->pend_off += (size_t)n;
        d->pend_len -= (size_t)n;
    }
    free(d->pend);
    d->pend = NULL;
    return 0;
}

static void on_readable(Worker *w, Dir *d) {
    Sess *s = d->s;
    ssize_t n = recv(d->rfd, w->buf, w->pump->buf_size, 0);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) lost(w, d, d->from, errno);
        return;
    }
    if (n == 0) {
        d->eof = 1;
        if (!d->pend_len) finish(w, d);
        return;
    }
    int err = chain_append_data(w->pump->chain, s->sid, d->from, w->buf, (size_t)n);
    if (err) {
        char why[200];
        snprintf(why, sizeof why, "store failed: store append failed: %s", strerror(err));
        cut(w, d, why, 1, 1, err);
        return;
    }
    /* The close record's byte counts are what the store holds, not what was read. */
    __atomic_add_fetch(&s->bytes[d->from], (uint64_t)n, __ATOMIC_RELAXED);
    if (is_dead(s)) {  /* cut by the other direction meanwhile: recorded, not forwarded */
        retire(w, d);
        return;
    }
    err = send_all(d, w->buf, (size_t)n);
    if (err) lost(w, d, !d->from, err);
}

static void on_event(Worker *w, Dir *d, int write_side, uint32_t events) {
    if (d->retired) return;
    if (is_dead(d->s)) {
        retire(w, d);
        return;
    }
    if (write_side) {
        int err = flush(d);
        if (err) { lost(w, d, !d->from, err); return; }
        if (!d->pend_len && d->eof) { finish(w, d); return; }
    } else if (!d->pend_len) {
        on_readable(w, d);
        if (d->retired) return;
    }
    update_interest(w, d);
}

/* -- the worker ------------------------------------------------------------------- */

static void adopt(Worker *w, Dir *d) {
    d->adopted = 1;
    d->prev = NULL;
    d->next = w->live;
    if (w->live) w->live->prev = d;
    w->live = d;
    d->rmask = d->wmask = UNREGISTERED;
    if (is_dead(d->s)) { retire(w, d); return; }
    update_interest(w, d);     /* a resumed direction may start with bytes to send */
}

static void take_inbox(Worker *w) {
    uint64_t n;
    (void)!read(w->wake, &n, sizeof n);
    pthread_mutex_lock(&w->mu);
    Dir *d = w->inbox;
    Msg *m = w->msgs;
    w->inbox = NULL;
    w->msgs = NULL;
    w->wake_pending = 0;       /* take_dials follows: what comes after that wakes us */
    pthread_mutex_unlock(&w->mu);
    while (d) {            /* new directions first: a message may be about one of them */
        Dir *next = d->next;
        adopt(w, d);
        d = next;
    }
    Msg *later = NULL;
    while (m) {
        Msg *next = m->next;
        if (!m->d->adopted) {
            /* cut before Pump_add handed this direction over: it is on its way */
            m->next = later;
            later = m;
        } else {
            if (!m->d->retired) retire(w, m->d);
            unref(m->d->s);
            free(m);
        }
        m = next;
    }
    if (later) {
        pthread_mutex_lock(&w->mu);
        Msg *tail = later;
        while (tail->next) tail = tail->next;
        tail->next = w->msgs;
        w->msgs = later;
        pthread_mutex_unlock(&w->mu);
    }
}

static void bury(Worker *w) {
    while (w->buried) {
        Dir *d = w->buried;
        w->buried = d->next;
        unref(d->s);
    }
}

/* -- connecting upstream ---------------------------------------------------------- */

typedef struct Handed Handed;
static int start_relay(Pump *p, uint64_t sid, int cfd, int sfd, Worker *home,
                       OpenSession *opened, const Handed *resumed);

/* The subject sees a reset; the session ends with reason, nothing relayed. */
static void dial_end(Worker *w, Dial *d, const char *reason) {
    tg_close_reset(d->cfd);
    if (d->sfd >= 0) close(d->sfd);
    end_session(w->pump, d->opened, d->sid, reason, 0, 0, 0);
    free(d);
}

static void dial_fail(Worker *w, Dial *d, const char *prefix, const char *why) {
    char reason[200];
    snprintf(reason, sizeof reason, "%s: %s", prefix, why);
    dial_end(w, d, reason);
}

static void dial_connected(Worker *w, Dial *d) {
    int err = start_relay(w->pump, d->sid, d->cfd, d->sfd, w, d->opened, NULL);
    if (err) {
        dial_fail(w, d, "relay failed", strerror(err));
        return;
    }
    free(d);
}

static void dial_unlink(Worker *w, Dial *d) {
    if (d->prev) d->prev->next = d->next; else w->dialing = d->next;
    if (d->next) d->next->prev = d->prev; else w->dialing_tail = d->prev;
}

static void dial_start(Worker *w, Dial *d) {
    union { struct sockaddr sa; struct sockaddr_in v4; struct sockaddr_in6 v6; } to = {0};
    socklen_t len;
    if (d->family == AF_INET) {
        to.v4.sin_family = AF_INET;
        to.v4.sin_port = htons((uint16_t)d->port);
        memcpy(&to.v4.sin_addr, d->addr, 4);
        len = sizeof to.v4;
    } else {
        to.v6.sin6_family = AF_INET6;
        to.v6.sin6_port = htons((uint16_t)d->port);
        memcpy(&to.v6.sin6_addr, d->addr, 16);
        len = sizeof to.v6;
    }
    d->sfd = socket(d->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (d->sfd < 0) {
        dial_fail(w, d, "upstream failed", strerror(errno));
        return;
    }
    int one = 1;  /* a transparent relay must not add Nagle delay the subject did not ask for */
    setsockopt(d->sfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(d->sfd, &to.sa, len) == 0) {
        dial_connected(w, d);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)(uintptr_t)d | TAG_DIAL};
    if (errno != EINPROGRESS || epoll_ctl(w->ep, EPOLL_CTL_ADD, d->sfd, &ev) != 0) {
        dial_fail(w, d, "upstream failed", strerror(errno));
        return;
    }
    d->deadline_ns = tg_clock_ns(CLOCK_MONOTONIC) + w->pump->connect_timeout_ns;
    d->next = NULL;
    d->prev = w->dialing_tail;
    if (w->dialing_tail) w->dialing_tail->next = d; else w->dialing = d;
    w->dialing_tail = d;
}

static void on_dialed(Worker *w, Dial *d) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(d->sfd, SOL_SOCKET, SO_ERROR, &err, &len);
    epoll_ctl(w->ep, EPOLL_CTL_DEL, d->sfd, NULL);
    dial_unlink(w, d);
    if (err) dial_fail(w, d, "upstream failed", strerror(err));
    else dial_connected(w, d);
}

/* -- listening (for opening.c) ------------------------------------------------------ */

static int watch_listener(Worker *w, PumpListener *l) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE,
                             .data.u64 = (uint64_t)(uintptr_t)l | TAG_LISTENER};
    return epoll_ctl(w->ep, EPOLL_CTL_ADD, l->fd, &ev) == 0 ? 0 : errno;
}

static void on_listener(Worker *w, PumpListener *l) {
    if (l->ready(l, w) == 0 || w->npaused == TG_LISTEN_MAX) return;
    /* accept4 keeps failing (out of descriptors...): a level-triggered
     * listener would spin this thread; the backlog keeps the connections. */
    epoll_ctl(w->ep, EPOLL_CTL_DEL, l->fd, NULL);
    w->paused[w->npaused++] = l;
    w->relisten_ns = tg_clock_ns(CLOCK_MONOTONIC) + TG_ACCEPT_PAUSE_MS * 1000000ull;
}

int pump_listen(Pump *p, PumpListener *l) {
    for (int i = 0; i < p->nworkers; i++) {
        int err = watch_listener(&p->workers[i], l);
        if (err) {
            while (i-- > 0) epoll_ctl(p->workers[i].ep, EPOLL_CTL_DEL, l->fd, NULL);
            return err;
        }
    }
    return 0;
}

/* A worker takes a paused listener back under its own lock, and unlisten
 * removes it from each epoll under that worker's lock after marking it gone:
 * either the take-back came first and is undone, or it sees `gone`. */
void pump_unlisten(Pump *p, PumpListener *l) {
    __atomic_store_n(&l->gone, 1, __ATOMIC_SEQ_CST);
    for (int i = 0; i < p->nworkers; i++) {
        Worker *w = &p->workers[i];
        pthread_mutex_lock(&w->mu);
        epoll_ctl(w->ep, EPOLL_CTL_DEL, l->fd, NULL);
        pthread_mutex_unlock(&w->mu);
    }
}

static uint64_t relisten(Worker *w, uint64_t now) {
    if (w->npaused && w->relisten_ns <= now) {
        pthread_mutex_lock(&w->mu);
        while (w->npaused) {
            PumpListener *l = w->paused[--w->npaused];
            if (!__atomic_load_n(&l->gone, __ATOMIC_SEQ_CST)) watch_listener(w, l);
        }
        pthread_mutex_unlock(&w->mu);
    }
    return w->npaused ? w->relisten_ns : UINT64_MAX;
}

/* Ends connects past their deadline and lets paused listeners back in;
 * returns epoll_wait's timeout (ms). */
static int expire_dials(Worker *w) {
    uint64_t now = tg_clock_ns(CLOCK_MONOTONIC);
    while (w->dialing && w->dialing->deadline_ns <= now) {
        Dial *d = w->dialing;
        epoll_ctl(w->ep, EPOLL_CTL_DEL, d->sfd, NULL);
        dial_unlink(w, d);
        dial_fail(w, d, "upstream failed", "TimeoutError");  /* as the asyncio relay says it */
    }
    uint64_t next = relisten(w, now);
    if (w->dialing && w->dialing->deadline_ns < next) next = w->dialing->deadline_ns;
    if (next == UINT64_MAX) return -1;
    return (int)((next - now + 999999) / 1000000);
}

static Dial *take_dials(Worker *w) {
    pthread_mutex_lock(&w->mu);
    Dial *d = w->dial_inbox;
    w->dial_inbox = NULL;
    pthread_mutex_unlock(&w->mu);
    return d;
}

/* Closing: every connect not yet done ends with the stop reason. */
static void end_dials(Worker *w, const char *reason) {
    for (Dial *d = take_dials(w), *next; d; d = next) {
        next = d->next;
        dial_end(w, d, reason);
    }
    while (w->dialing) {
        Dial *d = w->dialing;
        epoll_ctl(w->ep, EPOLL_CTL_DEL, d->sfd, NULL);
        dial_unlink(w, d);
        dial_end(w, d, reason);
    }
}

static void *worker_main(void *arg) {
    Worker *w = arg;
    pthread_setname_np(pthread_self(), "tollgate-relay");  /* for top -H and ps */
    struct epoll_event evs[64];
    int timeout_ms = -1;
    while (!__atomic_load_n(&w->pump->stopping, __ATOMIC_ACQUIRE)) {
        int n = epoll_wait(w->ep, evs, 64, timeout_ms);
        for (int i = 0; i < n; i++) {
            uint64_t t = evs[i].data.u64;
            if (t == 0) {
                take_inbox(w);
                for (Dial *d = take_dials(w), *next; d; d = next) {
                    next = d->next;
                    dial_start(w, d);
                }
            } else if ((t & 3) == TAG_LISTENER) {
                on_listener(w, (PumpListener *)(uintptr_t)(t & ~3ull));
            } else if (t & TAG_DIAL) {
                on_dialed(w, (Dial *)(uintptr_t)(t & ~3ull));
            } else {
                on_event(w, (Dir *)(uintptr_t)(t & ~1ull), (int)(t & 1), evs[i].events);
            }
        }
        bury(w);
        timeout_ms = expire_dials(w);
    }
    chain_thread_exit();
    return NULL;
}

/* A live session let go of without ending it, for the next agent: its two
 * sockets, its counts, and per direction what was read and recorded but not
 * yet sent (invariant 1: already in the store), or that it finished (its EOF
 * passed on). A direction reads nothing while bytes wait, so an EOF not yet
 * read is still in its socket, for the next agent to read. */
enum { HAND_LIVE = 0, HAND_DONE = 2 };
struct Handed {
    uint64_t sid, bytes[2], opened_ns;
    int fd[2], state[2];
    char *pend[2];
    size_t pend_len[2];
};

static void let_go_of_dir(Dir *d) {
    Worker *w = d->w;
    unregister(w, d->rfd, &d->rmask);
    unregister(w, d->wfd, &d->wmask);
    if (d->wfd_dup) close(d->wfd);
    if (d->prev) d->prev->next = d->next; else w->live = d->next;
    if (d->next) d->next->prev = d->prev;
}

static void hand_over(Pump *p, Sess *s, Batch *out) {
    Handed *h = batch_add(out, sizeof *h);
    if (h == NULL) abort();
    memset(h, 0, sizeof *h);
    h->sid = s->sid;
    h->opened_ns = s->opened ? s->opened->opened_ns : 0;
    for (int i = 0; i < 2; i++) {
        Dir *d = &s->d[i];
        h->fd[i] = s->fd[i];
        h->bytes[i] = s->bytes[i];
        if (s->dir_retired[i]) {
            h->state[i] = HAND_DONE;
            continue;
        }
        h->state[i] = HAND_LIVE;
        if (d->pend_len) {   /* moved, not copied: the direction is let go of here */
            memmove(d->pend, d->pend + d->pend_off, d->pend_len);
            h->pend[i] = d->pend;
            h->pend_len[i] = d->pend_len;
            d->pend = NULL;
        }
        let_go_of_dir(d);
    }
    /* The opener's record of it stays in its registry (freed with it): the
     * next agent writes the close. */
    __atomic_sub_fetch(&p->live_count, 1, __ATOMIC_RELAXED);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* After the threads have stopped: reset what is left, in the closing thread,
 * or (handed not NULL) hand every live session over instead. */
static void reset_remaining(Pump *p, Batch *handed) {
    for (int i = 0; i < p->nworkers; i++) end_dials(&p->workers[i], p->stop_reason);
    for (int i = 0; i < p->nworkers; i++) take_inbox(&p->workers[i]);
    for (int i = 0; i < p->nworkers; i++) {
        take_inbox(&p->workers[i]);  /* messages re-queued by the first pass */
        bury(&p->workers[i]);
    }
    for (int i = 0; i < p->nworkers; i++) {
        Worker *w = &p->workers[i];
        while (w->live) {
            Dir *d = w->live;
            Sess *s = d->s;
            if (handed && !is_dead(s)) {
                hand_over(p, s, handed);
                continue;
            }
            pthread_mutex_lock(&s->mu);
            if (!s->dead) {
                snprintf(s->reason, sizeof s->reason, "%s", p->stop_reason);
                s->reset[CLIENT] = s->reset[SERVER] = 1;
                __atomic_store_n(&s->dead, 1, __ATOMIC_RELEASE);
            }
            pthread_mutex_unlock(&s->mu);
            retire(w, d);
            bury(w);
        }
    }
}

/* -- the Python type ------------------------------------------------------------- */

static void stop_workers(Pump *p, const char *reason, Batch *handed) {
    if (!p->started || p->closed) return;
    p->closed = 1;
    snprintf(p->stop_reason, sizeof p->stop_reason, "%s", reason);
    __atomic_store_n(&p->stopping, 1, __ATOMIC_SEQ_CST);
    for (int i = 0; i < p->nworkers; i++) wake(&p->workers[i]);
    for (int i = 0; i < p->nworkers; i++) pthread_join(p->workers[i].thread, NULL);
    reset_remaining(p, handed);
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
    static char *names[] = {"chain", "workers", "buffer_bytes", "connect_timeout_s", NULL};
    PyObject *chain;
    int workers;
    Py_ssize_t buf;
    double connect_timeout_s = 10.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!in|d", names, &ChainType, &chain, &workers,
                                     &buf, &connect_timeout_s))
        return -1;
    p->connect_timeout_ns = (uint64_t)(connect_timeout_s * 1e9);
    if (p->workers) {
        PyErr_SetString(PyExc_RuntimeError, "Pump is already running");
        return -1;
    }
    if (workers < 1 || buf < 1) {
        PyErr_SetString(PyExc_ValueError, "workers and buffer_bytes must be positive");
        return -1;
    }
    if ((unsigned long long)buf > TG_MAX_PAYLOAD - TG_DATA_HEAD_SIZE) {
        /* a read is one record: a bigger one would fail its append and the store */
        PyErr_Format(PyExc_ValueError, "buffer_bytes must be at most %u",
                     TG_MAX_PAYLOAD - TG_DATA_HEAD_SIZE);
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
            stop_workers(p, "pump failed to start", NULL);
            return -1;
        }
        p->nworkers = i + 1;
    }
    p->started = 1;
    return 0;
}

static Worker *next_worker(Pump *p) {
    unsigned i = __atomic_fetch_add(&p->next_worker, 1, __ATOMIC_RELAXED);
    return &p->workers[i % (unsigned)p->nworkers];
}

/* Where a handed-over session was (start_relay, before any worker sees it). */
static void resume_state(Sess *s, const Handed *h) {
    for (int i = 0; i < 2; i++) {
        Dir *d = &s->d[i];
        s->bytes[i] = h->bytes[i];
        if (h->state[i] == HAND_DONE) {   /* its EOF was passed on before the hand-over */
            s->dir_retired[i] = 1;
            s->live_dirs--;
            s->refs--;
            d->retired = 1;
            if (d->wfd_dup) close(d->wfd);
            d->wfd_dup = 0;
            continue;
        }
        d->pend = h->pend[i];         /* the caller's copy, owned from here */
        d->pend_len = h->pend_len[i];
        d->pend_off = 0;
    }
}

/* Relay two connected sockets: 0, or an errno (nothing taken over). The
 * client's direction goes to `home` (the worker that dialed, calling from its
 * own thread: adopted there and then, no hand-over) or else the next worker;
 * the server's direction to another worker, where there is one. Per short
 * connection that saves two dups, their two closes and a wake-up.
 * `resumed`: a session a previous agent handed over (hand_over), which goes
 * on where it was: its counts, bytes to send first, a direction finished. */
static int start_relay(Pump *p, uint64_t sid, int cfd, int sfd, Worker *home,
                       OpenSession *opened, const Handed *resumed) {
    Worker *to[2];
    to[CLIENT] = home ? home : next_worker(p);
    to[SERVER] = &p->workers[(to[CLIENT] - p->workers + 1) % p->nworkers];
    int shared = to[CLIENT] == to[SERVER];
    Sess *s = calloc(1, sizeof *s);
    if (s == NULL) return ENOMEM;
    int wfd[2] = {sfd, cfd};
    if (shared) {   /* one worker: each direction its own descriptor of the other side */
        wfd[0] = fcntl(sfd, F_DUPFD_CLOEXEC, 0);
        wfd[1] = fcntl(cfd, F_DUPFD_CLOEXEC, 0);
        if (wfd[0] < 0 || wfd[1] < 0) {
            int err = errno;
            for (int i = 0; i < 2; i++) if (wfd[i] >= 0) close(wfd[i]);
            free(s);
            return err;
        }
    }
    pthread_mutex_init(&s->mu, NULL);
    s->sid = sid;
    s->opened = opened;
    s->fd[CLIENT] = cfd;
    s->fd[SERVER] = sfd;
    s->refs = s->live_dirs = 2;
    snprintf(s->reason, sizeof s->reason, "closed");
    for (int i = 0; i < 2; i++) {
        Dir *d = &s->d[i];
        d->s = s;
        d->from = i;
        d->rfd = s->fd[i];
        d->wfd = wfd[i];
        d->wfd_dup = (uint8_t)shared;
        d->rmask = d->wmask = UNREGISTERED;
        d->w = to[i];
    }
    if (resumed) resume_state(s, resumed);
    /* The other worker's first: a cut by the one adopted here finds it on its way. */
    for (int i = SERVER; i >= CLIENT; i--) {
        Worker *w = s->d[i].w;
        if (s->dir_retired[i]) continue;
        if (w == home) {
            adopt(w, &s->d[i]);
            continue;
        }
        pthread_mutex_lock(&w->mu);
        s->d[i].next = w->inbox;
        w->inbox = &s->d[i];
        int due = wake_due_locked(w);
        pthread_mutex_unlock(&w->mu);
        if (due) wake(w);
    }
    return 0;
}

static void count_live(Pump *p, int delta) {
    __atomic_add_fetch(&p->live_count, (uint64_t)(int64_t)delta, __ATOMIC_RELAXED);
}

static int check_open(Pump *p) {
    if (p->closed || !p->started) {
        PyErr_SetString(PyExc_RuntimeError, "pump is closed");
        return -1;
    }
    return 0;
}

/* add(session_id, client_fd, server_fd): the pump owns both sockets from here. */
static PyObject *Pump_add(Pump *p, PyObject *args) {
    unsigned long long sid;
    int cfd, sfd;
    if (!PyArg_ParseTuple(args, "Kii", &sid, &cfd, &sfd) || check_open(p) < 0) return NULL;
    count_live(p, 1);
    int err = start_relay(p, sid, cfd, sfd, NULL, NULL, NULL);
    if (err) count_live(p, -1);
    return none_or_oserror(err);
}

int pump_dial(Pump *p, PumpWorker *home, uint64_t sid, int cfd, int family,
              const unsigned char *addr, int port, OpenSession *opened) {
    if (!home && (p->closed || !p->started)) return ESHUTDOWN;
    Dial *d = calloc(1, sizeof *d);
    if (d == NULL) return ENOMEM;
    d->sid = sid;
    d->cfd = cfd;
    d->sfd = -1;
    d->family = family;
    memcpy(d->addr, addr, family == AF_INET ? 4 : 16);
    d->port = port;
    d->opened = opened;
    count_live(p, 1);
    if (home) {            /* the worker that accepted: no hand-over, no wake-up */
        dial_start(home, d);
        return 0;
    }
    Worker *w = next_worker(p);
    lock_gil_free(&w->mu);
    d->next = w->dial_inbox;
    w->dial_inbox = d;
    int due = wake_due_locked(w);
    pthread_mutex_unlock(&w->mu);
    if (due) wake(w);
    return 0;
}

/* connect(session_id, client_fd, host, port): a worker connects upstream,
 * then relays; a failed or timed-out connect resets the client and ends the
 * session "upstream failed: ...". The pump owns client_fd from here. */
static PyObject *Pump_connect(Pump *p, PyObject *args) {
    unsigned long long sid;
    int cfd, port;
    const char *host;
    if (!PyArg_ParseTuple(args, "Kisi", &sid, &cfd, &host, &port) || check_open(p) < 0)
        return NULL;
    unsigned char addr[16];
    int family = inet_pton(AF_INET, host, addr) == 1 ? AF_INET
               : inet_pton(AF_INET6, host, addr) == 1 ? AF_INET6 : 0;
    if (!family || port < 1 || port > 65535) {
        PyErr_Format(PyExc_ValueError, "not an address and port: %s %d", host, port);
        return NULL;
    }
    int err = pump_dial(p, NULL, sid, cfd, family, addr, port, NULL);
    return none_or_oserror(err);
}

/* finished() -> [(session_id, reason, client_bytes, server_bytes, store_errno)] */
static PyObject *Pump_finished(Pump *p, PyObject *unused) {
    uint64_t n;
    (void)!read(p->done_fd, &n, sizeof n);
    size_t count;
    pthread_mutex_lock(&p->done_mu);
    Done *done = batch_take(&p->done, &count);
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

/* (client, original destination) of a handed-over session's client socket, or None. */
static PyObject *handed_addresses(int cfd) {
    struct sockaddr_storage peer, dst;
    socklen_t len = sizeof peer;
    PyObject *t = NULL;
    if (getpeername(cfd, (struct sockaddr *)&peer, &len) == 0
        && original_dst(cfd, (struct sockaddr *)&peer, &dst) == 0)
        t = accepted_tuple(cfd, (struct sockaddr *)&peer, (struct sockaddr *)&dst);
    if (t == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *out = PyTuple_GetSlice(t, 1, 3);
    Py_DECREF(t);
    return out;
}

static PyObject *handed_tuple(const Handed *h) {
    PyObject *addrs = handed_addresses(h->fd[CLIENT]);
    if (addrs == NULL) return NULL;
    return Py_BuildValue("(KiiKKy#y#iiKN)", h->sid, h->fd[CLIENT], h->fd[SERVER],
                         h->bytes[CLIENT], h->bytes[SERVER],
                         h->pend[CLIENT] ? h->pend[CLIENT] : "", (Py_ssize_t)h->pend_len[CLIENT],
                         h->pend[SERVER] ? h->pend[SERVER] : "", (Py_ssize_t)h->pend_len[SERVER],
                         h->state[CLIENT], h->state[SERVER], h->opened_ns, addrs);
}

/* close(reason, hand_over=False). hand_over: live sessions are not reset
 * but returned, their sockets open, for the next agent (Pump.resume). */
static PyObject *Pump_close(Pump *p, PyObject *args) {
    const char *reason = "agent stopping";
    int handing = 0;
    if (!PyArg_ParseTuple(args, "|sp", &reason, &handing)) return NULL;
    Batch handed = {0};
    Py_BEGIN_ALLOW_THREADS
    stop_workers(p, reason, handing ? &handed : NULL);
    Py_END_ALLOW_THREADS
    if (!handing) Py_RETURN_NONE;
    size_t count;
    Handed *hs = batch_take(&handed, &count);
    PyObject *out = PyList_New((Py_ssize_t)count);
    for (size_t i = 0; out && i < count; i++) {
        PyObject *t = handed_tuple(&hs[i]);
        if (t == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    for (size_t i = 0; i < count; i++) {
        if (out == NULL) {   /* nobody will take their sockets: reset, as without a hand-over */
            tg_close_reset(hs[i].fd[CLIENT]);
            tg_close_reset(hs[i].fd[SERVER]);
        }
        free(hs[i].pend[CLIENT]);
        free(hs[i].pend[SERVER]);
    }
    free(hs);
    return out;
}

/* resume(session_id, client_fd, server_fd, client_bytes, server_bytes,
 *        client_pending, server_pending, client_state, server_state) */
static PyObject *Pump_resume(Pump *p, PyObject *args) {
    Handed h = {0};
    const char *pend[2];
    Py_ssize_t plen[2];
    if (!PyArg_ParseTuple(args, "KiiKKy#y#ii", &h.sid, &h.fd[CLIENT], &h.fd[SERVER],
                          &h.bytes[CLIENT], &h.bytes[SERVER], &pend[CLIENT], &plen[CLIENT],
                          &pend[SERVER], &plen[SERVER], &h.state[CLIENT], &h.state[SERVER])
        || check_open(p) < 0)
        return NULL;
    for (int i = 0; i < 2; i++) {
        if ((h.state[i] != HAND_LIVE && h.state[i] != HAND_DONE)
            || (h.state[i] == HAND_DONE && plen[i])) {
            PyErr_SetString(PyExc_ValueError, "not a state a hand-over leaves");
            return NULL;
        }
    }
    if (h.state[CLIENT] == HAND_DONE && h.state[SERVER] == HAND_DONE) {
        PyErr_SetString(PyExc_ValueError, "both directions finished: the session had ended");
        return NULL;
    }
    for (int i = 0; i < 2; i++) {
        h.pend_len[i] = (size_t)plen[i];
        h.pend[i] = plen[i] ? malloc((size_t)plen[i]) : NULL;
        if (plen[i] && h.pend[i] == NULL) {
            free(h.pend[CLIENT]);
            return PyErr_NoMemory();
        }
        if (plen[i]) memcpy(h.pend[i], pend[i], (size_t)plen[i]);
    }
    count_live(p, 1);
    int err = start_relay(p, h.sid, h.fd[CLIENT], h.fd[SERVER], NULL, NULL, &h);
    if (err) {
        count_live(p, -1);
        free(h.pend[CLIENT]);
        free(h.pend[SERVER]);
    }
    return none_or_oserror(err);
}

static PyObject *Pump_get_live(Pump *p, void *unused) {
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&p->live_count, __ATOMIC_RELAXED));
}

static PyObject *Pump_get_done_fd(Pump *p, void *unused) { return PyLong_FromLong(p->done_fd); }

static void Pump_dealloc(Pump *p) {
    Py_BEGIN_ALLOW_THREADS
    stop_workers(p, "pump released", NULL);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < p->nworkers; i++) {
        Worker *w = &p->workers[i];
        close(w->ep);
        close(w->wake);
        free(w->buf);
    }
    free(p->workers);
    free(p->done.items);
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
    {"connect", (PyCFunction)Pump_connect, METH_VARARGS,
     "connect(session_id, client_fd, host, port): connect upstream, then relay"},
    {"finished", (PyCFunction)Pump_finished, METH_NOARGS,
     "ended sessions since the last call: (id, reason, client_bytes, server_bytes, store_errno)"},
    {"close", (PyCFunction)Pump_close, METH_VARARGS,
     "close(reason, hand_over=False): stop the threads; reset every session and end it "
     "with reason, or (hand_over) return the live ones unended: [(id, client_fd, server_fd, "
     "client_bytes, server_bytes, client_pending, server_pending, client_state, "
     "server_state, opened_ns, (client, original_dst) or None)]"},
    {"resume", (PyCFunction)Pump_resume, METH_VARARGS,
     "resume(id, client_fd, server_fd, client_bytes, server_bytes, client_pending, "
     "server_pending, client_state, server_state): relay a handed-over session on"},
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
    .tp_doc = "Pump(chain, workers, buffer_bytes, connect_timeout_s=10): relay threads.",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Pump_new,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
    .tp_getset = Pump_getset,
};
