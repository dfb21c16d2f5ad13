/* Subjects creating or entering a network namespace, where our nftables
 * rules do not apply.
 *
 * Hooks: tracepoints syscalls:sys_enter/sys_exit of unshare, setns, clone
 * and clone3. Enter stashes the flags and the task's netns inode (read at
 * BTF offsets); exit reports when the namespace changed, a clone made one
 * for its child, or a CLONE_NEWNET attempt failed. setns with nstype 0
 * may target any namespace type, so only an actual netns change counts.
 */
#define TG_CLONE_NEWNET 0x40000000ULL

static __always_inline int tg_ns_enter(u32 nr, u64 flags, int always)
{
    if (!always && !(flags & TG_CLONE_NEWNET))
        return 0;
    if (!tg_is_subject())
        return 0;
    struct tg_stash req = {.syscall = nr, .value = flags, .old_netns = tg_current_netns()};
    tg_stash_put(&req);
    return 0;
}

static __always_inline int tg_ns_exit(int nr, long ret, int is_clone)
{
    struct tg_stash r = {};
    if (!tg_stash_take(nr, &r))
        return 0;
    u32 now = tg_current_netns();
    int newnet = (r.value & TG_CLONE_NEWNET) != 0;
    if (!(now != r.old_netns || (is_clone && ret > 0) || (ret < 0 && newnet)))
        return 0;
    struct tg_netns_event *e = tg_reserve(sizeof(*e));
    if (!e)
        return 0;
    tg_fill_header(&e->h, TG_EV_NETNS);
    e->flags = r.value;
    e->syscall = r.syscall;
    e->ret = ret;
    e->old_netns = r.old_netns;
    e->new_netns = is_clone ? 0 : now;
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_unshare)
{
    return tg_ns_enter(args->__syscall_nr, args->unshare_flags, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_setns)
{
    return tg_ns_enter(args->__syscall_nr, (u32)args->flags, 1);
}

TRACEPOINT_PROBE(syscalls, sys_enter_clone)
{
    return tg_ns_enter(args->__syscall_nr, args->clone_flags, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_clone3)
{
    u64 flags = 0;   /* flags is the first member of struct clone_args */
    bpf_probe_read_user(&flags, sizeof(flags), args->uargs);
    return tg_ns_enter(args->__syscall_nr, flags, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_unshare) { return tg_ns_exit(args->__syscall_nr, args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_setns) { return tg_ns_exit(args->__syscall_nr, args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_clone) { return tg_ns_exit(args->__syscall_nr, args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_clone3) { return tg_ns_exit(args->__syscall_nr, args->ret, 1); }
