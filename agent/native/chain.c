/* The store's append point in C: header, SHA-256 chain, crc32, the write.
 *
 * A record's hash is SHA-256(header || BLAKE3(payload)) (format version 3):
 * the payload's digest needs no lock, so relay threads hash in parallel and
 * the lock covers only a 88-byte hash, the crc and the write.
 *
 * The write: a small frame (most records of an interactive session) is
 * copied into a window of the segment mapped and faulted in ahead of the
 * records, instead of a writev: the syscall and ext4's per-write inode
 * update were most of a small record's cost (2.6 -> 1.5 us an append),
 * paid twice in every round trip before anything is forwarded (invariant
 * 1). Mapped or written, the bytes are in the page cache when the append
 * returns, as before. Frames of 2 KiB and more still go by pwritev: there
 * the copy is the cost, and a mapped page costs more than a written one on
 * this host (3 KB appends 9.4 us written, 10.0 copied). Either way the
 * first byte of a write's first frame (its magic's 'T') is written last, in
 * one store: a reader that finds a zero byte where a frame should start has
 * reached the end of what is written (the rest of the segment is zeros, or
 * a frame being written), and never sees the start of a frame before all of
 * it. The segment is cut back to seg_bytes (trim) before it is finished.
 *
 * The same frame agent/store/format.py reads; the writer (writer.py) keeps
 * everything else: recovery, rotation, seals, deferral.  A Chain is also the
 * writer's lock (`with chain:`), so Python code that reads the head, rotates
 * or seals excludes the relay threads' appends without holding the GIL
 * against them.
 */
#include "native.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
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

#define MAP_WINDOW (2ull << 20)    /* mapped at a time: the RSS the store costs */
/* Faulted in at a time as the records reach it, and unmapped behind them:
 * a whole window at once stalled every relay behind the chain's lock for
 * ~4 ms here (populating 512 pages, each reserving its blocks, then ~0.2 ms
 * unmapping them); a step costs ~50 us of the same total. */
#define POPULATE_STEP (64u << 10)
#define MAPPED_BELOW (2u << 10)    /* larger: written (mapped pages cost more here, measured) */
/* A new window is mapped only after this many small frames in a row: in a
 * bulk transfer, large frames run past every window, and faulting in one
 * for the odd small frame between them halved the store's rate (measured:
 * 256 KiB frames with a 100-byte one between each, 1,880 -> 551 MB/s). */
#define MAP_AFTER_SMALL 16
/* The upkeep thread reads the segment's pages up to this far past the
 * window's start into the page cache (Chain.warm: readahead of the zeros
 * ahead of the records), off the chain's lock. The first fault of a fresh
 * range of an ext4 file cost ~1 ms, once a window, with every relay waiting
 * behind the lock (100-byte appends: max 1.1-1.3 ms). Readahead only adds
 * pages the cache lacks, so it cannot race an append. */
#define WARM_AHEAD (2 * MAP_WINDOW)

static void wake_upkeep(Chain *c) {
    if (c->wake_sent || c->wake_fd < 0) return;
    c->wake_sent = 1;
    if (tg_signal(c->wake_fd) < 0) c->wake_sent = 0;
}

static void forget_warm(Chain *c) {
    c->warm_to = c->warmed = 0;
    c->warm_gen++;
}

static void drop_window(Chain *c) {
    if (c->map != NULL) munmap(c->map, (size_t)c->map_len);
    c->map = NULL;
    c->map_off = c->map_len = c->map_ready = c->map_done = 0;
}

/* Cut the segment back to its whole records (nothing may be mapped past them). */
static int cut_to_records(Chain *c) {
    drop_window(c);
    forget_warm(c);
    if (ftruncate(c->fd, (off_t)c->seg_bytes) != 0) return errno;
    c->file_end = c->seg_bytes;
    return 0;
}

static unsigned long long page_mask(void) {
    static unsigned long long page;
    if (!page) page = (unsigned long long)sysconf(_SC_PAGESIZE);
    return page - 1;
}

static unsigned long long page_up(unsigned long long n) {
    return (n + page_mask()) & ~page_mask();
}

/* Fault in the window's pages from map_ready to `end`. That reserves their
 * space (ext4's delayed allocation, tmpfs pages), so a copy into them never
 * meets a full disk, which would be SIGBUS: a full disk is the populate's
 * failure instead (EFAULT, said as ENOSPC). */
static int populate_to(Chain *c, unsigned long long end) {
    if (madvise(c->map + c->map_ready, (size_t)(end - c->map_ready), MADV_POPULATE_WRITE) != 0)
        /* EINVAL: a kernel before 5.14, which cannot populate: written frames only. */
        return errno == EFAULT ? ENOSPC : errno == EINVAL ? EOPNOTSUPP : errno;
    c->map_ready = end;
    return 0;
}

/* Unmap the pages wholly behind the write point (their records stay in the
 * page cache): only RSS and teardown, so a failure changes nothing. */
static void unmap_behind(Chain *c) {
    unsigned long long done = (c->seg_bytes - c->map_off) & ~page_mask();
    if (done >= c->map_done + POPULATE_STEP
        && madvise(c->map + c->map_done, (size_t)(done - c->map_done), MADV_DONTNEED) == 0)
        c->map_done = done;
}

/* Make the window ready to `need` bytes from its start, a step ahead. */
static int populate(Chain *c, unsigned long long need) {
    unmap_behind(c);
    need = page_up(need);
    unsigned long long end = c->map_ready + POPULATE_STEP;
    if (end < need) end = need;
    if (end > c->map_len) end = c->map_len;
    int err = populate_to(c, end);
    /* Nearly full: only the pages this frame needs, so records go on to
     * the last byte, as written ones would. */
    if (err == ENOSPC && end > need) err = populate_to(c, need);
    return err;
}

/* Map [start, start + len) of the segment, growing the file to hold it. */
static int map_range(Chain *c, unsigned long long start, unsigned long long len) {
    if (start + len > c->file_end) {
        if (ftruncate(c->fd, (off_t)(start + len)) != 0) return errno;
        c->file_end = start + len;
    }
    void *m = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd, (off_t)start);
    if (m == MAP_FAILED) return errno;
    c->map = m;
    c->map_off = start;
    c->map_len = len;
    c->map_ready = c->map_done = 0;
    c->windows++;
    if (start + WARM_AHEAD > c->warm_to) {
        c->warm_to = start + WARM_AHEAD;
        wake_upkeep(c);
    }
    return 0;
}

/* Map the window from the page holding `at` on. */
static int map_window(Chain *c, unsigned long long at, size_t total) {
    drop_window(c);
    unsigned long long start = at & ~page_mask();
    int err = map_range(c, start, MAP_WINDOW);
    if (err != EFBIG) return err;
    /* At the file size limit: only the pages this frame needs. */
    return map_range(c, start, page_up(at + total - start));
}

static int in_window(const Chain *c, size_t total) {
    return c->map != NULL && c->seg_bytes >= c->map_off
           && c->seg_bytes + total <= c->map_off + c->map_len;
}

static int copy_frames(Chain *c, const struct iovec *iov, int n, size_t total) {
    int err = in_window(c, total) ? 0 : map_window(c, c->seg_bytes, total);
    unsigned long long need = c->seg_bytes + total - c->map_off;
    if (!err && need > c->map_ready) err = populate(c, need);
    if (err) {
        drop_window(c);
        return err;
    }
    uint8_t *p = c->map + (c->seg_bytes - c->map_off), first = *(uint8_t *)iov[0].iov_base;
    memcpy(p + 1, (uint8_t *)iov[0].iov_base + 1, iov[0].iov_len - 1);
    size_t off = iov[0].iov_len;
    for (int i = 1; i < n; i++, off += iov[i - 1].iov_len)
        memcpy(p + off, iov[i].iov_base, iov[i].iov_len);
    __atomic_store_n(p, first, __ATOMIC_RELEASE);   /* the first byte after its frames */
    return 0;
}

/* At the file's end one pwritev, as an append: a reader sees the file grow
 * only as its bytes are copied. Into preallocated zeros, the first byte
 * goes last, in a write of its own. */
static int pwrite_frames(Chain *c, const struct iovec *iov, int n, size_t total) {
    struct iovec rest[4 * TG_MANY_MAX];
    off_t at = (off_t)c->seg_bytes;
    int appending = (unsigned long long)at >= c->file_end;
    ssize_t w, want = (ssize_t)total;
    if (appending) {
        w = pwritev(c->fd, iov, n, at);
    } else {
        rest[0] = (struct iovec){(uint8_t *)iov[0].iov_base + 1, iov[0].iov_len - 1};
        memcpy(rest + 1, iov + 1, sizeof *iov * (size_t)(n - 1));
        w = pwritev(c->fd, rest, n, at + 1);
        if (w == want - 1) w = pwrite(c->fd, iov[0].iov_base, 1, at), want = 1;
    }
    if (w != want) return w < 0 ? errno : ENOSPC;   /* short only when full */
    if ((unsigned long long)at + total > c->file_end) c->file_end = at + total;
    return 0;
}

/* Write whole frames at seg_bytes. A failed write leaves no partial frame:
 * the segment is cut back to the last whole record, now or before the next. */
static int write_frame(Chain *c, struct iovec *iov, int n, size_t total) {
    int err = 0, copied = 0, small = total < MAPPED_BELOW;
    c->small_run = small ? c->small_run + 1 : 0;
    if (!c->no_map && small && (in_window(c, total) || c->small_run >= MAP_AFTER_SMALL)) {
        err = copy_frames(c, iov, n, total);
        copied = err != EOPNOTSUPP && err != ENODEV;
        if (!copied) c->no_map = 1;   /* this filesystem maps nothing: said by stats */
    }
    if (!copied) err = pwrite_frames(c, iov, n, total);
    if (err && cut_to_records(c) != 0) c->dirty = 1;
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
    if (length > TG_MAX_PAYLOAD) return EMSGSIZE;   /* not EFBIG: that is the file's limit */
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
        int err = cut_to_records(c);
        if (err) return err;
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

/* After an append from C, with the lock held: a failure fails the chain
 * closed (the writer records why when it next looks); a full segment or a
 * seal due wakes the upkeep thread. */
static void settle_locked(Chain *c, int err) {
    if (err) c->healthy = 0;
    else if (c->seg_bytes >= c->seg_max || c->seal_bytes >= c->seal_every) wake_upkeep(c);
}

int chain_append_data(Chain *c, uint64_t session, int direction, const void *data, size_t len) {
    uint8_t head[TG_DATA_HEAD_SIZE], pdigest[32];
    put_be64(head, session);
    head[8] = (uint8_t)direction;
    if (payload_digest(c->version, NULL, head, sizeof head, data, len, pdigest))  /* unlocked */
        return EIO;
    uint64_t seq, ts = tg_clock_ns(CLOCK_REALTIME);
    pthread_mutex_lock(&c->mu);
    int err = c->healthy ? chain_append_locked(c, TG_KIND_DATA, ts, head, sizeof head,
                                               data, len, pdigest, &seq) : EIO;
    settle_locked(c, err);
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
    c->small_run = MAP_AFTER_SMALL;
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
    drop_window(c);
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

/* Below this, an append keeps the GIL: hashing and a small write take a few
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
    if (err == EMSGSIZE) {
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
 * cost one write, not one each (TG_MANY_MAX, native.h). */

static int append_many_locked(Chain *c, const struct iovec *pay, const int *kinds, int n,
                              uint64_t ts, uint64_t *first) {
    Frame f[TG_MANY_MAX];
    struct iovec iov[4 * TG_MANY_MAX];
    size_t total = 0;
    int k = 0, err;
    for (int i = 0; i < n; i++) {
        uint8_t pdigest[32];
        if ((err = payload_digest(c->version, c->md, NULL, 0, pay[i].iov_base, pay[i].iov_len,
                                  pdigest)))
            return err;
        if ((err = build_frame(c, &f[i], c->next_seq + (uint64_t)i,
                               i ? f[i - 1].digest : c->head, kinds[i], ts, NULL, 0,
                               pay[i].iov_base, pay[i].iov_len, pdigest)))
            return err;
        k += frame_iov(iov + k, &f[i], NULL, 0, pay[i].iov_base, pay[i].iov_len);
        total += f[i].size;
    }
    if ((err = ready_to_write(c)) || (err = write_frame(c, iov, k, total))) return err;
    *first = c->next_seq;
    for (int i = 0; i < n; i++) commit_frame(c, &f[i]);
    return 0;
}

int chain_append_records(Chain *c, int gil_held, struct iovec *pay, const int *kinds, int n,
                         uint64_t ts, chain_fill fill, void *ctx, uint64_t *first) {
    if (n < 1 || n > TG_MANY_MAX) return EINVAL;
    if (gil_held) lock_gil_free(&c->mu);
    else pthread_mutex_lock(&c->mu);
    if (fill && c->healthy) fill(ctx, c->next_seq, pay);
    int err = c->healthy ? append_many_locked(c, pay, kinds, n, ts, first) : EIO;
    settle_locked(c, err);
    pthread_mutex_unlock(&c->mu);
    return err;
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
    if (n < 1 || n > TG_MANY_MAX) {
        Py_DECREF(seq_of);
        return PyErr_Format(PyExc_ValueError, "append_many takes 1 to %d records", TG_MANY_MAX);
    }
    Py_buffer pay[TG_MANY_MAX];
    struct iovec iov[TG_MANY_MAX];
    int kinds[TG_MANY_MAX], got = 0;
    for (; got < n; got++) {
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq_of, got), "iy*", &kinds[got],
                              &pay[got]))
            break;
        iov[got] = (struct iovec){pay[got].buf, (size_t)pay[got].len};
    }
    uint64_t first = 0;
    int err = got == n ? append_many_locked(c, iov, kinds, (int)n, ts, &first) : 0;
    for (int i = 0; i < got; i++) PyBuffer_Release(&pay[i]);
    Py_DECREF(seq_of);
    if (got != n) return NULL;
    if (err) return raise_append_error(err);
    return PyLong_FromUnsignedLongLong(first);
}

/* trim(): the active segment cut back to its whole records, its window
 * unmapped, before it is finished or closed; the caller holds the lock. */
static PyObject *Chain_trim(Chain *c, PyObject *unused) {
    if (c->fd < 0) Py_RETURN_NONE;
    int err = cut_to_records(c);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* warm(): read the segment from the window's end to warm_to into the page
 * cache (see WARM_AHEAD), growing the file to hold it; the slow part without
 * the lock or the GIL. The upkeep thread calls it when woken. */
static PyObject *Chain_warm(Chain *c, PyObject *unused) {
    lock_gil_free(&c->mu);
    unsigned long long from = c->map_off + c->map_len, to = c->warm_to;
    if (from < c->warmed) from = c->warmed;
    unsigned gen = c->warm_gen;
    int fd = -1;
    if (c->map != NULL && c->fd >= 0 && from < to) {
        if (to > c->file_end && ftruncate(c->fd, (off_t)to) == 0) c->file_end = to;
        if (to <= c->file_end) fd = fcntl(c->fd, F_DUPFD_CLOEXEC, 0);  /* rotation may close it */
    }
    pthread_mutex_unlock(&c->mu);
    if (fd < 0) Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    (void)posix_fadvise(fd, (off_t)from, (off_t)(to - from), POSIX_FADV_WILLNEED);
    close(fd);
    Py_END_ALLOW_THREADS
    lock_gil_free(&c->mu);
    if (c->warm_gen == gen && to > c->warmed) c->warmed = to;
    pthread_mutex_unlock(&c->mu);
    Py_RETURN_NONE;
}

static PyObject *Chain_get_fd(Chain *c, void *unused) {
    return PyLong_FromLong(c->fd);
}

/* A new segment: the old one's window goes (trim() has cut it already).
 * Its size is read once here; from then on every change to it is the
 * chain's (appends, trim), so file_end stays true. */
static int Chain_set_fd(Chain *c, PyObject *v, void *unused) {
    struct stat st = {0};
    long fd = v ? PyLong_AsLong(v) : -2;
    if (fd < -1) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "fd is a descriptor or -1");
        return -1;
    }
    if (fd >= 0 && fstat((int)fd, &st) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    drop_window(c);
    forget_warm(c);
    c->fd = (int)fd;
    c->file_end = (unsigned long long)st.st_size;
    c->small_run = MAP_AFTER_SMALL;   /* a new segment's first small frame maps */
    return 0;
}

static PyObject *Chain_get_mapped(Chain *c, void *unused) {
    return PyBool_FromLong(!c->no_map);
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
    {"trim", (PyCFunction)Chain_trim, METH_NOARGS,
     "cut the segment back to its records and unmap it, with the lock held"},
    {"warm", (PyCFunction)Chain_warm, METH_NOARGS,
     "read the segment ahead of the window into the page cache, without the lock held"},
    {NULL},
};

#define FIELD(name, type, doc) {#name, type, offsetof(Chain, name), 0, doc}
static PyMemberDef Chain_members[] = {
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
    {"windows", T_ULONGLONG, offsetof(Chain, windows), READONLY, "windows of segments mapped"},
    {"warmed", T_ULONGLONG, offsetof(Chain, warmed), READONLY,
     "the segment is in the page cache up to here (warm)"},
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
    {"fd", (getter)Chain_get_fd, (setter)Chain_set_fd,
     "the active segment, opened read-write; setting it unmaps the last one's window", NULL},
    {"mapped", (getter)Chain_get_mapped, NULL,
     "small frames are copied into a mapping (False: the filesystem cannot)", NULL},
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
