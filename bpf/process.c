/* Subject processes: who they are (exec), who descends from them (fork),
 * when they go (exit) and when their uid changes.
 *
 * Hooks:
 * - raw tracepoint sched_process_fork: gets both task pointers, so a new
 *   process (child pid == child tgid) is told from a new thread; a child of
 *   a subject becomes a subject (subject_tgids), whatever uid it later takes.
 * - tracepoint sched:sched_process_exit: drops the process from
 *   subject_tgids when its leader exits.
 * - tracepoint sched:sched_process_exec: filename from tracefs, argv from
 *   the new mm's arg area, parent and euid at BTF offsets; an euid that is
 *   not the real uid after exec means a set-user-ID program: a uid event.
 * - tracepoints syscalls:sys_enter/exit of setuid, setreuid, setresuid:
 *   uid and euid before and after, reported when the call changed them.
 */
static __always_inline u32 tg_current_ppid(void)
{
    void *task = (void *)bpf_get_current_task();
    void *parent = tg_read_ptr(task, OFF_TASK_REAL_PARENT);
    return parent ? tg_read_u32(parent, OFF_TASK_TGID) : 0;
}

RAW_TRACEPOINT_PROBE(sched_process_fork)
{
    void *child = (void *)ctx->args[1];
    u32 child_pid = tg_read_u32(child, OFF_TASK_PID);
    if (child_pid != tg_read_u32(child, OFF_TASK_TGID) || !tg_is_subject())
        return 0;
    u32 uid = (u32)bpf_get_current_uid_gid();
    subject_tgids.update(&child_pid, &uid);
    struct tg_fork_event *e = tg_reserve(sizeof(*e));
    if (!e)
        return 0;
    tg_fill_header(&e->h, TG_EV_FORK);
    e->child_pid = child_pid;
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if ((u32)id != tgid || !tg_is_subject())
        return 0;
    subject_tgids.delete(&tgid);
    struct tg_header *e = tg_reserve(sizeof(*e));
    if (!e)
        return 0;
    tg_fill_header(e, TG_EV_EXIT);
    events.ringbuf_submit(e, 0);
    return 0;
}

/* A subject by uid only becomes one by tgid before it can drop that uid
 * (exec of a set-user-ID program, set*uid). */
static __always_inline void tg_pin_subject(void)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 uid = (u32)bpf_get_current_uid_gid();
    subject_tgids.update(&tgid, &uid);
}

static __always_inline void tg_read_args(struct tg_exec_event *e)
{
    void *task = (void *)bpf_get_current_task();
    void *mm = tg_read_ptr(task, OFF_TASK_MM);
    if (!mm)
        return;
    u64 start = (u64)tg_read_ptr(mm, OFF_MM_ARG_START);
    u64 end = (u64)tg_read_ptr(mm, OFF_MM_ARG_END);
    if (end > start)
        e->args_size = end - start;   /* what user space did not get, it can say */
    /* A constant-size read keeps the verifier simple; the arg area is
     * followed by the environment on the stack, so 256 bytes are mapped. */
    if (end <= start || bpf_probe_read_user(e->args, TG_ARGS_LEN, (void *)start) != 0)
        return;
    e->args_len = end - start < TG_ARGS_LEN ? end - start : TG_ARGS_LEN;
}

static __always_inline void tg_emit_uid(u32 nr, u32 old_uid, u32 old_euid)
{
    struct tg_uid_event *e = tg_reserve(sizeof(*e));
    if (!e)
        return;
    tg_fill_header(&e->h, TG_EV_UID);
    e->old_uid = old_uid;
    e->new_uid = e->h.uid;
    e->old_euid = old_euid;
    e->new_euid = tg_current_euid();
    e->syscall = nr;
    events.ringbuf_submit(e, 0);
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    if (!tg_is_subject())
        return 0;
    tg_pin_subject();
    struct tg_exec_event *e = tg_reserve(sizeof(*e));
    if (!e)
        return 0;
    tg_fill_header(&e->h, TG_EV_EXEC);
    e->ppid = tg_current_ppid();
    e->euid = tg_current_euid();
    TP_DATA_LOC_READ_STR(e->filename, filename, sizeof(e->filename));
    e->filename_size = args->data_loc_filename >> 16;   /* __data_loc: length << 16 | offset */
    tg_read_args(e);
    u32 uid = e->h.uid, euid = e->euid;
    events.ringbuf_submit(e, 0);
    if (euid != uid)
        tg_emit_uid(0, uid, uid);
    return 0;
}

static __always_inline int tg_uid_enter(int nr)
{
    if (!tg_is_subject())
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, pid = (u32)id;
    /* A root process wearing a subject's real uid for a moment (su, runuser
     * and cron juggle their ids under PAM) is no subject gaining root: with
     * effective uid 0 only one descended from a subject is watched. A subject's
     * own ids are never 0, so its escalations are all still reported. */
    if (tg_current_euid() == 0 && !subject_tgids.lookup(&tgid) && !subject_tgids.lookup(&pid))
        return 0;
    tg_pin_subject();
    struct tg_stash ids = {.syscall = nr, .uid = (u32)bpf_get_current_uid_gid(),
                           .euid = tg_current_euid()};
    tg_stash_put(&ids);
    return 0;
}

static __always_inline int tg_uid_exit(u32 nr, long ret)
{
    struct tg_stash b = {};
    if (!tg_stash_take(nr, &b))
        return 0;
    if (ret == 0 && (b.uid != (u32)bpf_get_current_uid_gid() || b.euid != tg_current_euid()))
        tg_emit_uid(nr, b.uid, b.euid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_setuid) { return tg_uid_enter(args->__syscall_nr); }
TRACEPOINT_PROBE(syscalls, sys_enter_setreuid) { return tg_uid_enter(args->__syscall_nr); }
TRACEPOINT_PROBE(syscalls, sys_enter_setresuid) { return tg_uid_enter(args->__syscall_nr); }
TRACEPOINT_PROBE(syscalls, sys_exit_setuid) { return tg_uid_exit(args->__syscall_nr, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_setreuid) { return tg_uid_exit(args->__syscall_nr, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_setresuid) { return tg_uid_exit(args->__syscall_nr, args->ret); }
