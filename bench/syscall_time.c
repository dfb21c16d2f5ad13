/* Time spent in each relaying syscall of one process (bench/hops.py).
 *
 * TGID and the SYSCALLS list are filled in by hops.py; for each syscall the
 * enter and exit tracepoints add the call's duration and one to its slot.
 */
BPF_HASH(entered, u32, u64);                 /* thread -> when its call began */
BPF_ARRAY(total_ns, u64, NSYSCALLS);
BPF_ARRAY(calls, u64, NSYSCALLS);

static __always_inline int tg_enter(void)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TGID)
        return 0;
    u32 tid = id;
    u64 now = bpf_ktime_get_ns();
    entered.update(&tid, &now);
    return 0;
}

static __always_inline int tg_exit(int slot)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TGID)
        return 0;
    u32 tid = id;
    u64 *began = entered.lookup(&tid);
    if (!began)
        return 0;
    u64 took = bpf_ktime_get_ns() - *began;
    entered.delete(&tid);
    u64 *t = total_ns.lookup(&slot), *n = calls.lookup(&slot);
    if (t && n) {
        __sync_fetch_and_add(t, took);
        __sync_fetch_and_add(n, 1);
    }
    return 0;
}

PROBES
