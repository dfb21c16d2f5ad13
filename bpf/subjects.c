/* Who is a subject, and the shared plumbing every other program uses.
 *
 * A task is a subject if its real uid is in subject_uids (filled from the
 * config) or its tgid is in subject_tgids (inherited on fork by process.c),
 * so a subject stays one after sudo, a set-user-ID binary or a cgroup move.
 * The loader compiles this file first, then the concern files after it, as
 * one BCC program so they share these maps.
 *
 * Kernel struct members are read at offsets taken from the running kernel's
 * BTF (OFF_* cflags, see agent/witness/btf.py), never from the 6.1 headers.
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include <linux/socket.h>
#include <uapi/linux/in.h>
#include "events.h"

BPF_HASH(subject_uids, u32, u8, 64);
BPF_HASH(subject_tgids, u32, u32, MAX_SUBJECT_TASKS);   /* pid -> uid it inherited from */
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost, u64, 1);                          /* ring buffer full: counted, never silent */

static __always_inline int tg_is_subject(void)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, pid = (u32)id;
    u32 uid = (u32)bpf_get_current_uid_gid();
    return subject_uids.lookup(&uid) || subject_tgids.lookup(&tgid)
        || subject_tgids.lookup(&pid);
}

/* What a subject thread asked for at syscall entry, kept for its exit (or
 * for sock_send_length inside the call). A thread is in one syscall at a
 * time, so one map keyed by thread id serves every concern; the syscall
 * number tags the entry so one left by a killed thread is never read as
 * another call's. */
struct tg_stash {
    u32 syscall;
    u32 old_netns;     /* netns.c */
    u64 value;         /* netns.c: flags; udp_send.c: user sockaddr pointer */
    s32 family;        /* sockets.c */
    s32 type;
    s32 protocol;
    u32 uid;           /* process.c: ids before set*uid */
    u32 euid;
    u32 _pad;
};

BPF_HASH(stash, u32, struct tg_stash, MAX_SUBJECT_TASKS);

static __always_inline void tg_stash_put(struct tg_stash *s)
{
    u32 pid = (u32)bpf_get_current_pid_tgid();
    stash.update(&pid, s);
}

/* Copy this thread's entry to out (if its syscall is nr, or any when nr < 0). */
static __always_inline int tg_stash_get(int nr, struct tg_stash *out)
{
    u32 pid = (u32)bpf_get_current_pid_tgid();
    struct tg_stash *s = stash.lookup(&pid);
    if (!s || (nr >= 0 && s->syscall != (u32)nr))
        return 0;
    *out = *s;
    return 1;
}

/* tg_stash_get, then forget the entry: for syscall exits. Most threads
 * (every one not a subject's) have none, and a delete takes the bucket's
 * lock even to find nothing: it runs only on an entry. */
static __always_inline int tg_stash_take(int nr, struct tg_stash *out)
{
    u32 pid = (u32)bpf_get_current_pid_tgid();
    int found = tg_stash_get(nr, out);
    if (found || stash.lookup(&pid))
        stash.delete(&pid);
    return found;
}

static __always_inline void *tg_read_ptr(void *base, int off)
{
    void *p = 0;
    bpf_probe_read_kernel(&p, sizeof(p), (char *)base + off);
    return p;
}

static __always_inline u32 tg_read_u32(void *base, int off)
{
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (char *)base + off);
    return v;
}

static __always_inline u32 tg_current_netns(void)
{
    void *task = (void *)bpf_get_current_task();
    void *nsproxy = tg_read_ptr(task, OFF_TASK_NSPROXY);
    if (!nsproxy)
        return 0;
    void *net = tg_read_ptr(nsproxy, OFF_NSPROXY_NET);
    return net ? tg_read_u32(net, OFF_NET_NS + OFF_NS_INUM) : 0;
}

static __always_inline u32 tg_current_euid(void)
{
    void *task = (void *)bpf_get_current_task();
    void *cred = tg_read_ptr(task, OFF_TASK_CRED);
    return cred ? tg_read_u32(cred, OFF_CRED_EUID) : (u32)-1;
}

static __always_inline void tg_fill_header(struct tg_header *h, u32 type)
{
    u64 id = bpf_get_current_pid_tgid();
    h->ts_ns = bpf_ktime_get_ns();
    h->cgroup_id = bpf_get_current_cgroup_id();
    h->type = type;
    h->pid = (u32)id;
    h->tgid = id >> 32;
    h->uid = (u32)bpf_get_current_uid_gid();
    h->netns = tg_current_netns();
    bpf_get_current_comm(h->comm, sizeof(h->comm));
}

static __always_inline void tg_count_lost(void)
{
    int zero = 0;
    u64 *n = lost.lookup(&zero);
    if (n)
        *n += 1;
}

/* Reserve a zeroed event in the ring buffer, or count it lost and return 0. */
static __always_inline void *tg_reserve(u32 size)
{
    void *e = events.ringbuf_reserve(size);
    if (!e) {
        tg_count_lost();
        return 0;
    }
    __builtin_memset(e, 0, size);
    return e;
}
