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
 *
 * With a proxy port (and without all_tcp_states) the kernel goes one step
 * further, so that a proxied connection costs user space nothing: a subject
 * socket's SYN_SENT and ESTABLISHED events wait in the map `pending` instead
 * of the ring buffer. When the proxy's side of it establishes on one of the
 * proxy's own addresses (map `proxy_local`), that is the proof: the entry
 * goes, its ESTABLISHED event moves to the LRU map `attributed` for the
 * proxy to name the process from, and the counter `proven` counts it. What
 * is not proven within the witness's window (a bypass) the witness takes
 * from `pending` itself (Probes.take_unproven) and judges as before; a
 * socket that closes still pending sends its events at once, since its
 * address may be reused; a full map sends them at once as well. The proof
 * names the subject's socket by address and port only, so two live subject
 * sockets on one address and port (SO_REUSEADDR) void it for that peer (map
 * `collided`): both go to user space, and `proxied` is not written for it.
 *
 * User space looks at `pending` every few milliseconds only while it holds
 * something; before it sleeps longer it sets `wake_armed`, and the next
 * socket held sends one header-only WAKE record, which ends that sleep.
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
#ifndef TG_ALL_TCP_STATES
#define TG_QUIET
BPF_PERCPU_ARRAY(scratch_pending, struct tg_pending, 1);         /* too big for the stack */
BPF_HASH(pending, u64, struct tg_pending, MAX_PENDING);           /* by socket address */
BPF_HASH(pending_peer, struct tg_peer, u64, MAX_PENDING);         /* established ones */
BPF_TABLE("lru_hash", struct tg_peer, struct tg_tcp_event, attributed, MAX_PENDING);
BPF_HASH(proxy_local, struct tg_peer, u8, 16);   /* the proxy's addresses (port 0); :: = any */
BPF_PERCPU_ARRAY(proven, u64, 1);
/* Peers (address, port) two live subject sockets shared: no proof by peer. */
BPF_TABLE("lru_hash", struct tg_peer, u8, collided, MAX_PENDING);
BPF_ARRAY(wake_armed, u32, 1);   /* 1: user space sleeps, nothing held */
#endif
#endif

struct tracepoint__sock__inet_sock_set_state;
static __always_inline void
tg_emit_tcp(struct tracepoint__sock__inet_sock_set_state *args, u64 sk, struct tg_header *who);
static __always_inline void
tg_fill_tcp(struct tg_tcp_event *e, struct tracepoint__sock__inet_sock_set_state *args, u64 sk,
            struct tg_header *who);
#ifdef TG_QUIET
static __always_inline int
tg_hold(struct tracepoint__sock__inet_sock_set_state *args, u64 sk, struct tg_header *who);
static __always_inline u64 tg_prove(struct tg_peer *peer, struct tg_peer *local);
static __always_inline void tg_release(u64 sk, struct tg_pending *p);
#endif

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
#ifdef TG_QUIET
        if (tg_hold(args, sk, &fresh.h))
            return 0;
#endif
    } else if (args->oldstate == TCP_SYN_RECV || args->oldstate == TCP_NEW_SYN_RECV
               || args->newstate == TCP_SYN_RECV || args->oldstate == TCP_LISTEN) {
        conns.delete(&sk);
#ifdef PROXY_PORT
        if (args->newstate == TCP_ESTABLISHED && args->sport == PROXY_PORT) {
            struct tg_peer peer = {.port = args->dport};
            struct tg_proxy_side side = {.ts_ns = bpf_ktime_get_ns(), .family = args->family};
            __builtin_memcpy(peer.addr, args->daddr_v6, 16);
            __builtin_memcpy(side.local, args->saddr_v6, 16);
#ifdef TG_QUIET
            /* The proxy's side names its peer by address and port alone. Two
             * subject sockets bound to one (SO_REUSEADDR), one of them dialing
             * the proxy, must not make the other look proxied. */
            if (collided.lookup(&peer)) {
                proxied.delete(&peer);
                return 0;
            }
            struct tg_peer local = {};
            __builtin_memcpy(local.addr, side.local, 16);   /* ctx is read once, above */
            side.sk = tg_prove(&peer, &local);
#endif
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
#ifdef TG_QUIET
    struct tg_pending *p = pending.lookup(&sk);
    if (p) {
        if (args->newstate == TCP_ESTABLISHED) {
            tg_fill_tcp(&p->est, args, sk, &who);
            struct tg_peer peer = {.port = args->sport};
            __builtin_memcpy(peer.addr, args->saddr_v6, 16);
            u64 *other = pending_peer.lookup(&peer);
            if (other && *other != sk) {   /* another live socket has this address and port */
                u64 first = *other;
                u8 one = 1;
                collided.update(&peer, &one);
                struct tg_pending *q = pending.lookup(&first);
                if (q)
                    tg_release(first, q);
            } else if (pending_peer.update(&peer, &sk) == 0) {
                return 0;
            }
            tg_release(sk, p);   /* cannot be proven: judged from the ring buffer */
            return 0;
        }
        if (args->newstate != TCP_CLOSE)
            return 0;
        tg_release(sk, p);
    }
#endif
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
    tg_fill_tcp(e, args, sk, who);
    events.ringbuf_submit(e, 0);
}

static __always_inline void
tg_fill_tcp(struct tg_tcp_event *e, struct tracepoint__sock__inet_sock_set_state *args, u64 sk,
            struct tg_header *who)
{
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
}

#ifdef TG_QUIET
/* SYN_SENT of a subject socket: keep its event in `pending`; 0 if the map
 * is full (then it goes to the ring buffer as before). */
static __always_inline int
tg_hold(struct tracepoint__sock__inet_sock_set_state *args, u64 sk, struct tg_header *who)
{
    struct tg_pending *old = pending.lookup(&sk);
    if (old)     /* this address's last socket closed untraced: its events go now */
        tg_release(sk, old);
    int zero = 0;
    struct tg_pending *p = scratch_pending.lookup(&zero);
    if (!p)
        return 0;
    __builtin_memset(p, 0, sizeof(*p));
    tg_fill_tcp(&p->syn, args, sk, who);
    if (pending.update(&sk, p) != 0)
        return 0;
    u32 *armed = wake_armed.lookup(&zero);
    if (armed && *armed) {   /* two CPUs may both send one: harmless */
        *armed = 0;
        struct tg_header *e = tg_reserve(sizeof(*e));
        if (e) {
            tg_fill_header(e, TG_EV_WAKE);
            events.ringbuf_submit(e, 0);
        }
    }
    return 1;
}

/* The proxy's side of a connection from peer established at local: the
 * subject socket that proves, or 0. */
static __always_inline u64 tg_prove(struct tg_peer *peer, struct tg_peer *local)
{
    struct tg_peer any = {};
    if (!proxy_local.lookup(local) && !proxy_local.lookup(&any))
        return 0;
    u64 *skp = pending_peer.lookup(peer);
    if (!skp)
        return 0;
    u64 sk = *skp;
    pending_peer.delete(peer);
    struct tg_pending *p = pending.lookup(&sk);
    if (!p || p->est.newstate != TCP_ESTABLISHED || p->est.sport != peer->port)
        return 0;   /* the address was reused meanwhile */
    attributed.update(peer, &p->est);
    pending.delete(&sk);
    int zero = 0;
    u64 *n = proven.lookup(&zero);
    if (n)
        *n += 1;
    return sk;
}

/* Send what waited for this socket to the ring buffer, and forget it. */
static __always_inline void tg_release(u64 sk, struct tg_pending *p)
{
    if (events.ringbuf_output(&p->syn, sizeof(p->syn), 0))
        tg_count_lost();
    if (p->est.newstate == TCP_ESTABLISHED) {
        if (events.ringbuf_output(&p->est, sizeof(p->est), 0))
            tg_count_lost();
        struct tg_peer peer = {.port = p->est.sport};
        if (p->est.family == AF_INET) {  /* as the tracepoint's saddr_v6: ::ffff:a.b.c.d */
            peer.addr[10] = peer.addr[11] = 0xff;
            __builtin_memcpy(&peer.addr[12], p->est.saddr, 4);
        } else {
            __builtin_memcpy(peer.addr, p->est.saddr, 16);
        }
        pending_peer.delete(&peer);
    }
    pending.delete(&sk);
}
#endif
