/* The store's append point in C: header, SHA-256 chain, crc32, one writev.
 *
 * A record's hash is SHA-256(header || BLAKE3(payload)) (format version 3):
 * the payload's digest needs no lock, so relay threads hash in parallel and
 * the lock covers only a 88-byte hash, the crc and the write.
 *
 * The same frame agent/store/format.py reads; the writer (writer.py) keeps
 * everything else: recovery, rotation, seals, deferral.  A Chain is also the
 * writer's lock (`with chain:`), so Python code that reads the head, rotates
 * or seals excludes the relay threads' appends without holding the GIL
 * against them.
 */
#include "native.h"

#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <isa-l/crc.h>   /* zlib's crc32 (reflected IEEE), ~20x faster here */
#include <blake3.h>
#include <structmember.h>

static void put_be32(uint8_t *p, uint32_t v) {
    for (int i = 3; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}

static void put_be64(uint8_t *p, uint64_t v) {
    for (int i = 7; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A failed write leaves no partial frame: cut back to the last whole record. */
static int write_frame(Chain *c, struct iovec *iov, int n, size_t total) {
    ssize_t w = writev(c->fd, iov, n);
    if (w == (ssize_t)total) return 0;
    int err = w < 0 ? errno : ENOSPC;  /* a regular file writes short only when full */
    if (ftruncate(c->fd, (off_t)c->seg_bytes) != 0) c->dirty = 1;
    return err;
}

/* Fetched once: EVP_sha256() in each init makes OpenSSL 3 look the
 * algorithm up again, ~0.5 us per record (more than hashing a small one). */
static EVP_MD *sha256_md;
static pthread_once_t sha256_once = PTHREAD_ONCE_INIT;

static void fetch_sha256(void) {
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
}

static const EVP_MD *sha256(void) {
    pthread_once(&sha256_once, fetch_sha256);
    return sha256_md;
}

/* Relay threads hashing with SHA-256 keep a context each; Python's appends
 * use the chain's, which the lock they hold makes theirs. */
static __thread EVP_MD_CTX *thread_md;

void chain_thread_exit(void) {
    EVP_MD_CTX_free(thread_md);
    thread_md = NULL;
}

static int sha256_digest(EVP_MD_CTX *md, const void *prefix, size_t plen, const void *payload,
                         size_t len, uint8_t *out) {
    unsigned int n = 0;
    const EVP_MD *sha = sha256();
    if (md == NULL && (md = thread_md) == NULL && (md = thread_md = EVP_MD_CTX_new()) == NULL)
        return EIO;
    if (sha == NULL || !EVP_DigestInit_ex(md, sha, NULL)) return EIO;
    if ((plen && !EVP_DigestUpdate(md, prefix, plen))
        || (len && !EVP_DigestUpdate(md, payload, len)))
        return EIO;
    return EVP_DigestFinal_ex(md, out, &n) ? 0 : EIO;
}

int payload_digest(int version, EVP_MD_CTX *md, const void *prefix, size_t plen,
                   const void *payload, size_t len, uint8_t *out) {
    if (version == TG_FORMAT_SHA256) return sha256_digest(md, prefix, plen, payload, len, out);
    blake3_hasher h;
    blake3_hasher_init(&h);
    blake3_hasher_update(&h, prefix, plen);
    blake3_hasher_update(&h, payload, len);
    blake3_hasher_finalize(&h, out, 32);
    return 0;
}

/* One record's frame around its payload, chained to `head` as number seq. */
typedef struct {
    uint8_t header[TG_HEADER_SIZE], crc[TG_CRC_SIZE], digest[32];
    size_t size;
} Frame;

static int build_frame(Chain *c, Frame *f, uint64_t seq, const uint8_t *head, int kind,
                       uint64_t ts_ns, const void *prefix, size_t plen, const void *payload,
                       size_t len, const uint8_t *pdigest) {
    size_t length = plen + len;
    if (length > TG_MAX_PAYLOAD) return EFBIG;
    uint8_t *h = f->header;
    h[0] = 'T'; h[1] = 'G'; h[2] = (uint8_t)c->version; h[3] = (uint8_t)kind;
    put_be32(h + 4, (uint32_t)length);
    put_be64(h + 8, seq);
    put_be64(h + 16, ts_ns);
    memcpy(h + 24, head, 32);

    /* crc32 stays over the bytes on disk (torn-tail check); ISA-L makes it cheap. */
    uint32_t crc = crc32_gzip_refl(0, h, TG_HEADER_SIZE);
    if (plen) crc = crc32_gzip_refl(crc, prefix, plen);
    if (len) crc = crc32_gzip_refl(crc, payload, len);
    unsigned int dlen = 0;
    if (!EVP_DigestInit_ex(c->md, NULL, NULL)
        || !EVP_DigestUpdate(c->md, h, TG_HEADER_SIZE)
        || !EVP_DigestUpdate(c->md, pdigest, 32)
        || !EVP_DigestFinal_ex(c->md, f->digest, &dlen)) return EIO;
    put_be32(f->crc, crc);
    f->size = length + TG_HEADER_SIZE + TG_CRC_SIZE;
    return 0;
}

/* Frames are written only from a clean segment end. */
static int ready_to_write(Chain *c) {
    if (c->fd < 0) return EBADF;
    if (c->dirty) {
        if (ftruncate(c->fd, (off_t)c->seg_bytes) != 0) return errno;
        c->dirty = 0;
    }
    return 0;
}

/* A frame's pieces in write order: header, prefix, payload, crc. */
static int frame_iov(struct iovec *iov, Frame *f, const void *prefix, size_t plen,
                     const void *payload, size_t len) {
    int n = 0;
    iov[n++] = (struct iovec){f->header, TG_HEADER_SIZE};
    if (plen) iov[n++] = (struct iovec){(void *)prefix, plen};
    if (len) iov[n++] = (struct iovec){(void *)payload, len};
    iov[n++] = (struct iovec){f->crc, TG_CRC_SIZE};
    return n;
}

/* A written frame becomes the chain's head. */
static uint64_t commit_frame(Chain *c, const Frame *f) {
    memcpy(c->head, f->digest, 32);
    c->seg_bytes += f->size;
    c->seal_bytes += f->size;
    c->records++;
    c->bytes += f->size;
    return c->next_seq++;
}

int chain_append_locked(Chain *c, int kind, uint64_t ts_ns, const void *prefix, size_t plen,
                        const void *payload, size_t len, const uint8_t *pdigest, uint64_t *seq) {
    Frame f;
    int err = build_frame(c, &f, c->next_seq, c->head, kind, ts_ns, prefix, plen, payload, len,
                          pdigest);
    if (err || (err = ready_to_write(c))) return err;
    struct iovec iov[4];
    int n = frame_iov(iov, &f, prefix, plen, payload, len);
    if ((err = write_frame(c, iov, n, f.size))) return err;
    *seq = commit_frame(c, &f);
    return 0;
}

int chain_append_data(Chain *c, uint64_t session, int direction, const void *data, size_t len) {
    uint8_t head[TG_DATA_HEAD_SIZE], pdigest[32];
    put_be64(head, session);
    head[8] = (uint8_t)direction;
    if (payload_digest(c->version, NULL, head, sizeof head, data, len, pdigest))  /* unlocked */
        return EIO;
    uint64_t seq, ts = now_ns();
    pthread_mutex_lock(&c->mu);
    int err = c->healthy ? chain_append_locked(c, TG_KIND_DATA, ts, head, sizeof head,
                                               data, len, pdigest, &seq) : EIO;
    if (err) {
        c->healthy = 0;   /* the writer records why when it next looks (fail closed) */
    } else if (!c->wake_sent && c->wake_fd >= 0
               && (c->seg_bytes >= c->seg_max || c->seal_bytes >= c->seal_every)) {
        c->wake_sent = 1;
        uint64_t one = 1;
        if (write(c->wake_fd, &one, sizeof one) < 0) c->wake_sent = 0;
    }
    pthread_mutex_unlock(&c->mu);
    return err;
}

/* -- the Python type ------------------------------------------------------------ */

static PyObject *Chain_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Chain *c = (Chain *)type->tp_alloc(type, 0);
    if (c == NULL) return NULL;
    pthread_mutex_init(&c->mu, NULL);
    c->fd = c->wake_fd = -1;
    c->healthy = 1;
    c->version = TG_FORMAT_VERSION;
    c->seg_max = c->seal_every = UINT64_MAX;
    c->md = EVP_MD_CTX_new();
    const EVP_MD *sha = sha256();
    if (c->md == NULL || sha == NULL || !EVP_DigestInit_ex(c->md, sha, NULL)) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    return (PyObject *)c;
}

static void Chain_dealloc(Chain *c) {
    if (c->md) EVP_MD_CTX_free(c->md);
    pthread_mutex_destroy(&c->mu);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *Chain_acquire(Chain *c, PyObject *unused) {
    lock_gil_free(&c->mu);
    Py_INCREF(c);
    return (PyObject *)c;
}

static PyObject *Chain_release(Chain *c, PyObject *args) {
    pthread_mutex_unlock(&c->mu);
    Py_RETURN_NONE;
}

/* Below this, an append keeps the GIL: hashing and a small writev take a few
 * microseconds, less than handing the GIL to another Python thread (the
 * witness's) and waiting to get it back, which costs each side a futex wait
 * and a context switch. */
#define GIL_KEPT_BELOW 4096

static int append_digested(Chain *c, int kind, uint64_t ts, Py_buffer *prefix,
                           Py_buffer *payload, uint8_t *pdigest, uint64_t *seq) {
    int err = payload_digest(c->version, c->md, prefix->buf, (size_t)prefix->len, payload->buf,
                             (size_t)payload->len, pdigest);
    if (err) return err;
    return chain_append_locked(c, kind, ts, prefix->buf, (size_t)prefix->len, payload->buf,
                               (size_t)payload->len, pdigest, seq);
}

static PyObject *raise_append_error(int err) {
    if (err == EFBIG) {
        PyErr_Format(PyExc_ValueError, "record exceeds %u bytes", TG_MAX_PAYLOAD);
        return NULL;
    }
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* append(kind, payload, ts_ns, prefix=b"") -> seq; the caller holds the lock. */
static PyObject *Chain_append(Chain *c, PyObject *args, PyObject *kw) {
    static char *names[] = {"kind", "payload", "ts_ns", "prefix", NULL};
    int kind;
    unsigned long long ts;
    Py_buffer payload, prefix = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iy*K|y*", names, &kind, &payload, &ts, &prefix))
        return NULL;
    uint64_t seq = 0;
    uint8_t pdigest[32];
    int err;
    if ((size_t)payload.len < GIL_KEPT_BELOW) {
        err = append_digested(c, kind, ts, &prefix, &payload, pdigest, &seq);
    } else {
        Py_BEGIN_ALLOW_THREADS
        err = append_digested(c, kind, ts, &prefix, &payload, pdigest, &seq);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&payload);
    if (prefix.obj) PyBuffer_Release(&prefix);
    if (err) return raise_append_error(err);
    return PyLong_FromUnsignedLongLong(seq);
}

/* Records a caller has together (a session's opening and its process)
 * cost one write, not one each. */
#define MANY_MAX 8

static int append_many_locked(Chain *c, Py_buffer *pay, int *kinds, int n, uint64_t ts,
                              uint64_t *first) {
    Frame f[MANY_MAX];
    struct iovec iov[4 * MANY_MAX];
    size_t total = 0;
    int k = 0, err;
    for (int i = 0; i < n; i++) {
        uint8_t pdigest[32];
        if ((err = payload_digest(c->version, c->md, NULL, 0, pay[i].buf, (size_t)pay[i].len,
                                  pdigest)))
            return err;
        if ((err = build_frame(c, &f[i], c->next_seq + (uint64_t)i,
                               i ? f[i - 1].digest : c->head, kinds[i], ts, NULL, 0,
                               pay[i].buf, (size_t)pay[i].len, pdigest)))
            return err;
        k += frame_iov(iov + k, &f[i], NULL, 0, pay[i].buf, (size_t)pay[i].len);
        total += f[i].size;
    }
    if ((err = ready_to_write(c)) || (err = write_frame(c, iov, k, total))) return err;
    *first = c->next_seq;
    for (int i = 0; i < n; i++) commit_frame(c, &f[i]);
    return 0;
}

/* append_many(((kind, payload), ...), ts_ns) -> the first one's seq; all
 * or none are written; the caller holds the lock. */
static PyObject *Chain_append_many(Chain *c, PyObject *args) {
    PyObject *records;
    unsigned long long ts;
    if (!PyArg_ParseTuple(args, "OK", &records, &ts)) return NULL;
    PyObject *seq_of = PySequence_Fast(records, "records must be a sequence");
    if (seq_of == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq_of);
    if (n < 1 || n > MANY_MAX) {
        Py_DECREF(seq_of);
        return PyErr_Format(PyExc_ValueError, "append_many takes 1 to %d records", MANY_MAX);
    }
    Py_buffer pay[MANY_MAX];
    int kinds[MANY_MAX], got = 0;
    for (; got < n; got++) {
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq_of, got), "iy*", &kinds[got],
                              &pay[got]))
            break;
    }
    uint64_t first = 0;
    int err = got == n ? append_many_locked(c, pay, kinds, (int)n, ts, &first) : 0;
    for (int i = 0; i < got; i++) PyBuffer_Release(&pay[i]);
    Py_DECREF(seq_of);
    if (got != n) return NULL;
    if (err) return raise_append_error(err);
    return PyLong_FromUnsignedLongLong(first);
}

static PyObject *Chain_get_head(Chain *c, void *unused) {
    return PyBytes_FromStringAndSize((const char *)c->head, 32);
}

static int Chain_set_head(Chain *c, PyObject *v, void *unused) {
    char *buf;
    Py_ssize_t n;
    if (v == NULL || PyBytes_AsStringAndSize(v, &buf, &n) < 0) return -1;
    if (n != 32) {
        PyErr_SetString(PyExc_ValueError, "head is 32 bytes");
        return -1;
    }
    memcpy(c->head, buf, 32);
    return 0;
}

static PyMethodDef Chain_methods[] = {
    {"acquire", (PyCFunction)Chain_acquire, METH_NOARGS, "take the writer's lock"},
    {"release", (PyCFunction)Chain_release, METH_NOARGS, "give it back"},
    {"__enter__", (PyCFunction)Chain_acquire, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Chain_release, METH_VARARGS, NULL},
    {"append", (PyCFunction)(void (*)(void))Chain_append, METH_VARARGS | METH_KEYWORDS,
     "append(kind, payload, ts_ns, prefix=b'') -> seq, with the lock held"},
    {"append_many", (PyCFunction)Chain_append_many, METH_VARARGS,
     "append_many(((kind, payload), ...), ts_ns) -> first seq, one write, with the lock held"},
    {NULL},
};

#define FIELD(name, type, doc) {#name, type, offsetof(Chain, name), 0, doc}
static PyMemberDef Chain_members[] = {
    FIELD(fd, T_INT, "the active segment"),
    FIELD(dirty, T_INT, "a failed write may have left bytes past seg_bytes"),
    FIELD(healthy, T_INT, "0: relay appends fail until the writer recovers"),
    FIELD(wake_fd, T_INT, "eventfd written when rotation or a seal is due"),
    FIELD(wake_sent, T_INT, "the eventfd was written and not yet seen"),
    FIELD(next_seq, T_ULONGLONG, NULL),
    FIELD(seg_bytes, T_ULONGLONG, NULL),
    FIELD(seal_bytes, T_ULONGLONG, NULL),
    FIELD(records, T_ULONGLONG, "appended since open"),
    FIELD(bytes, T_ULONGLONG, "appended since open"),
    FIELD(seg_max, T_ULONGLONG, "segment size at which upkeep is woken"),
    FIELD(seal_every, T_ULONGLONG, "bytes since the last seal at which upkeep is woken"),
    {NULL},
};

static PyObject *Chain_get_version(Chain *c, void *unused) {
    return PyLong_FromLong(c->version);
}

static int Chain_set_version(Chain *c, PyObject *v, void *unused) {
    long version = v ? PyLong_AsLong(v) : -1;
    if (version != TG_FORMAT_VERSION && version != TG_FORMAT_SHA256) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "frames are written as version %d or %d",
                         TG_FORMAT_VERSION, TG_FORMAT_SHA256);
        return -1;
    }
    c->version = (int)version;
    return 0;
}

static PyGetSetDef Chain_getset[] = {
    {"version", (getter)Chain_get_version, (setter)Chain_set_version,
     "format version of the frames written: 3 (BLAKE3 payload digest) or 2 (SHA-256)", NULL},
    {"head", (getter)Chain_get_head, (setter)Chain_set_head, "SHA-256 of the last frame", NULL},
    {NULL},
};

PyTypeObject ChainType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.native._native.Chain",
    .tp_doc = "The store's append point and the writer's lock.",
    .tp_basicsize = sizeof(Chain),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Chain_new,
    .tp_dealloc = (destructor)Chain_dealloc,
    .tp_methods = Chain_methods,
    .tp_members = Chain_members,
    .tp_getset = Chain_getset,
};
