/* Subject UDP datagrams (QUIC included): the ruleset rejects them, we report them.
 *
 * Hook: tracepoint sock:sock_send_length. It fires in sock_sendmsg for
 * every send path (send, sendto, sendmsg, sendmmsg, write, io_uring) in the
 * sending task's context, with the socket's family and protocol from
 * tracefs. fentry on udp_sendmsg would be closer but fentry programs do
 * not load on this kernel (EPERM). The destination comes from the
 * sendto/sendmsg/sendmmsg address the syscall tracepoints put in the
 * per-thread stash; without one (a connected socket, write, io_uring) it is the
 * socket's peer, read at BTF offsets of struct sock_common.
 */
static __always_inline int tg_stash_dest(u32 nr, const void *uaddr)
{
    if (!tg_is_subject())
        return 0;
    struct tg_stash d = {.syscall = nr, .value = (u64)uaddr};   /* 0: no address given */
    tg_stash_put(&d);
    return 0;
}

static __always_inline int tg_drop_dest(int nr)
{
    struct tg_stash unused = {};
    tg_stash_take(nr, &unused);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{
    return tg_stash_dest(args->__syscall_nr, args->addr);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg)
{
    void *name = 0;   /* msg_name is the first member of struct user_msghdr */
    bpf_probe_read_user(&name, sizeof(name), args->msg);
    return tg_stash_dest(args->__syscall_nr, name);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmmsg)
{
    void *name = 0;   /* the first message's msg_name; later ones are not read */
    bpf_probe_read_user(&name, sizeof(name), args->mmsg);
    return tg_stash_dest(args->__syscall_nr, name);
}

TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return tg_drop_dest(args->__syscall_nr); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return tg_drop_dest(args->__syscall_nr); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmmsg) { return tg_drop_dest(args->__syscall_nr); }

/* sockaddr_in and sockaddr_in6 share family and port at offsets 0 and 2. */
static __always_inline void tg_dest_from_user(struct tg_udp_event *e, u64 uaddr)
{
    u16 fam_port[2] = {};
    bpf_probe_read_user(fam_port, sizeof(fam_port), (void *)uaddr);
    e->family = fam_port[0];
    e->dport = bpf_ntohs(fam_port[1]);
    if (e->family == AF_INET)
        bpf_probe_read_user(e->daddr, 4, (char *)uaddr + 4);
    else if (e->family == AF_INET6)
        bpf_probe_read_user(e->daddr, 16, (char *)uaddr + 8);
}

static __always_inline void tg_dest_from_sock(struct tg_udp_event *e, void *sk)
{
    u16 port = 0;
    bpf_probe_read_kernel(&e->family, 2, (char *)sk + OFF_SKC_FAMILY);
    bpf_probe_read_kernel(&port, 2, (char *)sk + OFF_SKC_DPORT);
    e->dport = bpf_ntohs(port);
    if (e->family == AF_INET)
        bpf_probe_read_kernel(e->daddr, 4, (char *)sk + OFF_SKC_DADDR);
    else
        bpf_probe_read_kernel(e->daddr, 16, (char *)sk + OFF_SKC_V6_DADDR);
}

TRACEPOINT_PROBE(sock, sock_send_length)
{
    if (args->protocol != IPPROTO_UDP && args->protocol != IPPROTO_UDPLITE)
        return 0;
    if (!tg_is_subject())
        return 0;
    struct tg_stash d = {};
    int stashed = tg_stash_get(-1, &d);
    struct tg_udp_event *e = tg_reserve(sizeof(*e));
    if (!e)
        return 0;
    tg_fill_header(&e->h, TG_EV_UDP_SEND);
    e->ret = args->ret;
    e->syscall = stashed ? d.syscall : 0;
    if (stashed && d.value)
        tg_dest_from_user(e, d.value);
    else
        tg_dest_from_sock(e, args->sk);
    events.ringbuf_submit(e, 0);
    return 0;
}
