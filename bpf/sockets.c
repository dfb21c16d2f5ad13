/* Raw and packet socket creation by subjects: a way to send without TCP.
 *
 * Hooks: tracepoints syscalls:sys_enter_socket (what was asked: family,
 * type, protocol) and sys_exit_socket (what came of it: an fd, or EPERM
 * when guard.c refused it). Both run in the caller's context and their
 * arguments come from tracefs. Kept in the per-thread stash between enter and exit.
 */
#define TG_AF_NETLINK 16
#define TG_AF_PACKET 17
#define TG_SOCK_RAW 3
#define TG_SOCK_PACKET 10
#define TG_SOCK_TYPE_MASK 0xf

TRACEPOINT_PROBE(syscalls, sys_enter_socket)
{
    int kind = args->type & TG_SOCK_TYPE_MASK;
    if (args->family != TG_AF_PACKET && kind != TG_SOCK_RAW && kind != TG_SOCK_PACKET)
        return 0;
    /* Netlink is SOCK_RAW too but talks to this kernel only, never the
     * network; glibc opens one in every getaddrinfo(AI_ADDRCONFIG), and `ip`
     * and `ss` use it: reporting it flooded review with false alerts. */
    if (args->family == TG_AF_NETLINK)
        return 0;
    if (!tg_is_subject())
        return 0;
    struct tg_stash req = {.syscall = args->__syscall_nr, .family = args->family,
                           .type = args->type, .protocol = args->protocol};
    tg_stash_put(&req);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
    struct tg_stash r = {};
    if (!tg_stash_take(args->__syscall_nr, &r))
        return 0;
    struct tg_socket_event *e = tg_reserve(sizeof(*e));
    if (!e)
        return 0;
    tg_fill_header(&e->h, TG_EV_SOCKET);
    e->family = r.family;
    e->type = r.type;
    e->protocol = r.protocol;
    e->ret = args->ret;
    events.ringbuf_submit(e, 0);
    return 0;
}
