/* Subject TCP sockets: connect and every state change after it.
 *
 * Hook: tracepoint sock:inet_sock_set_state. Its arguments (socket address,
 * states, 4-tuple, family) come from tracefs, so they match the running
 * kernel, and it fires for every way a connection starts: connect(),
 * sendto(MSG_FASTOPEN), io_uring, MPTCP subflows. SYN_SENT is set in the
 * connecting task's context, so that is where we decide "subject" and
 * remember who it was, keyed by the socket address; later changes
 * (ESTABLISHED, CLOSE) run in softirq where `current` is anybody, so they
 * look the socket up instead. The entry is deleted at CLOSE.
 * Only what the verdict needs goes to user space: SYN_SENT, ESTABLISHED,
 * and CLOSE of a socket that never established; -DTG_ALL_TCP_STATES
 * (WitnessConfig.all_tcp_states) asks for every state change.
 *
 * With -DPROXY_PORT, the proxy's side of each redirected connection is
 * remembered too: an accepted socket on the proxy port reaching ESTABLISHED,
 * whose peer is the subject's socket. That is the kernel's own proof that a
 * connection went into the proxy, microseconds after the subject's side
 * established, so the cross-check need not wait for the proxy's accept to
 * call a bypass. It goes into the LRU map `proxied`, not the ring buffer:
 * the cross-check asks the proxy's session table first, which knows nearly
 * every connection by then, and reads the map only when it does not (an
 * event per connection cost user space a third of the witness's time).
 */
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_CLOSE 7
#define TCP_LISTEN 10
#define TCP_NEW_SYN_RECV 12

struct tg_conn {
    struct tg_header h;   /* the connecting task, captured at SYN_SENT */
    u32 established;
    u32 _pad;
};

BPF_HASH(conns, u64, struct tg_conn, MAX_SOCKETS);
#ifdef PROXY_PORT
BPF_TABLE("lru_hash", struct tg_peer, struct tg_proxy_side, proxied, MAX_SOCKETS);
#endif

struct tracepoint__sock__inet_sock_set_state;
static __always_inline void
tg_emit_tcp(struct tracepoint__sock__inet_sock_set_state *args, u64 sk, struct tg_header *who);

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != IPPROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    /* Some kernel paths free a socket without a traced CLOSE, so an entry
     * can outlive its socket: a new connect replaces it, and a passive
     * (accepted) socket at the same address drops it. */
    if (args->newstate == TCP_SYN_SENT) {
        if (!tg_is_subject()) {
            conns.delete(&sk);
            return 0;
        }
        struct tg_conn fresh = {};
        tg_fill_header(&fresh.h, TG_EV_TCP_STATE);
        conns.update(&sk, &fresh);
    } else if (args->oldstate == TCP_SYN_RECV || args->oldstate == TCP_NEW_SYN_RECV
               || args->newstate == TCP_SYN_RECV || args->oldstate == TCP_LISTEN) {
        conns.delete(&sk);
#ifdef PROXY_PORT
        if (args->newstate == TCP_ESTABLISHED && args->sport == PROXY_PORT) {
            struct tg_peer peer = {.port = args->dport};
            struct tg_proxy_side side = {.ts_ns = bpf_ktime_get_ns(), .family = args->family};
            __builtin_memcpy(peer.addr, args->daddr_v6, 16);
            __builtin_memcpy(side.local, args->saddr_v6, 16);
            proxied.update(&peer, &side);
        }
#endif
        return 0;
    }
    struct tg_conn *conn = conns.lookup(&sk);
    if (!conn)
        return 0;
    struct tg_header who = conn->h;
    int was_established = conn->established;
    if (args->newstate == TCP_ESTABLISHED)
        conn->established = 1;
    /* Forget the socket at CLOSE even if its event is lost: the address
     * is reused at once, maybe by a socket that is not a subject's. */
    if (args->newstate == TCP_CLOSE)
        conns.delete(&sk);
#ifndef TG_ALL_TCP_STATES
    /* The verdict needs only these; the rest would cost user space time. */
    if (args->newstate != TCP_SYN_SENT && args->newstate != TCP_ESTABLISHED
        && !(args->newstate == TCP_CLOSE && !was_established))
        return 0;
#endif
    tg_emit_tcp(args, sk, &who);
    return 0;
}

static __always_inline void
tg_emit_tcp(struct tracepoint__sock__inet_sock_set_state *args, u64 sk, struct tg_header *who)
{
    struct tg_tcp_event *e = tg_reserve(sizeof(*e));
    if (!e)
        return;
    e->h = *who;
    e->h.ts_ns = bpf_ktime_get_ns();
    e->sk = sk;
    e->family = args->family;
    e->sport = args->sport;
    e->dport = args->dport;
    e->oldstate = args->oldstate;
    e->newstate = args->newstate;
    if (args->family == AF_INET) {
        __builtin_memcpy(e->saddr, args->saddr, 4);
        __builtin_memcpy(e->daddr, args->daddr, 4);
    } else {
        __builtin_memcpy(e->saddr, args->saddr_v6, 16);
        __builtin_memcpy(e->daddr, args->daddr_v6, 16);
    }
    events.ringbuf_submit(e, 0);
}
