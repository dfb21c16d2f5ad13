/* Event records the witness sends to user space, declared once.
 *
 * Mirrored once in agent/witness/events.py (ctypes). Every field has an
 * explicit width and the structs are padded by hand so that the C and the
 * ctypes layouts cannot drift apart silently: events.py asserts the sizes.
 */
#ifndef TOLLGATE_EVENTS_H
#define TOLLGATE_EVENTS_H

#define TG_COMM_LEN 16
#define TG_FILENAME_LEN 128
#define TG_ARGS_LEN 256

enum tg_event_type {
    TG_EV_TCP_STATE = 1,  /* a subject TCP socket changed state */
    TG_EV_UDP_SEND = 2,   /* a subject sent a UDP datagram */
    TG_EV_SOCKET = 3,     /* a subject asked for a raw or packet socket */
    TG_EV_NETNS = 4,      /* a subject created or entered a network namespace */
    TG_EV_EXEC = 5,       /* a subject process executed a program */
    TG_EV_UID = 6,        /* a subject's real or effective uid changed */
    TG_EV_FORK = 7,       /* a subject process forked (descendant tracking) */
    TG_EV_EXIT = 8,       /* a subject process exited */
    TG_EV_WAKE = 9,       /* a header only: a socket is held in `pending` (tcp_connect.c) */
};

/* Who did it; first member of every event. 56 bytes. */
struct tg_header {
    __u64 ts_ns;          /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u64 cgroup_id;
    __u32 type;           /* enum tg_event_type */
    __u32 pid;            /* thread id */
    __u32 tgid;           /* process id */
    __u32 uid;            /* real uid, initial user namespace */
    __u32 netns;          /* network namespace inode of the task */
    __u32 _pad;
    char comm[TG_COMM_LEN];
};

struct tg_tcp_event {     /* 104 bytes */
    struct tg_header h;
    __u64 sk;             /* socket address: identity across state changes */
    __u16 family;
    __u16 sport;
    __u16 dport;
    __u8 oldstate;
    __u8 newstate;
    __u8 saddr[16];       /* IPv4 in the first 4 bytes */
    __u8 daddr[16];
};

struct tg_udp_event {     /* 88 bytes */
    struct tg_header h;
    __u16 family;         /* 0 when the destination is the connected peer (unknown here) */
    __u16 dport;
    __s32 ret;            /* bytes sent or -errno */
    __u8 daddr[16];
    __u32 syscall;        /* syscall number of the send */
    __u32 _pad;
};

struct tg_socket_event {  /* 72 bytes */
    struct tg_header h;
    __s32 family;
    __s32 type;
    __s32 protocol;
    __s32 ret;            /* fd or -errno (EPERM when the guard refused it) */
};

struct tg_netns_event {   /* 88 bytes */
    struct tg_header h;
    __u64 flags;          /* clone/unshare flags, or setns nstype */
    __u32 syscall;
    __s32 ret;
    __u32 old_netns;
    __u32 new_netns;      /* 0 for clone: the child's namespace is not ours */
    __u64 _pad;
};

struct tg_exec_event {    /* 464 bytes */
    struct tg_header h;
    __u32 ppid;
    __u32 euid;
    __u32 args_len;       /* bytes valid in args (NUL-separated argv) */
    __u32 args_size;      /* bytes in the whole argv area: more than args_len if cut */
    __u32 filename_size;  /* the whole path's bytes with its NUL: more than filename holds if cut */
    __u32 _pad;
    char filename[TG_FILENAME_LEN];
    char args[TG_ARGS_LEN];
};

struct tg_uid_event {     /* 80 bytes */
    struct tg_header h;
    __u32 old_uid;
    __u32 new_uid;
    __u32 old_euid;
    __u32 new_euid;
    __u32 syscall;        /* 0: exec of a set-user-ID program */
    __u32 _pad;
};

struct tg_fork_event {    /* 64 bytes */
    struct tg_header h;
    __u32 child_pid;
    __u32 _pad;
};

/* Not an event: the map `proxied` (tcp_connect.c), read by the cross-check
 * only for a subject socket the proxy's own table does not know. */
struct tg_peer {          /* key, 24 bytes: the subject's socket as the proxy's peer */
    __u8 addr[16];        /* IPv4 as ::ffff:a.b.c.d, as the tracepoint stores it */
    __u16 port;
    __u8 _pad[6];
};

struct tg_proxy_side {    /* value, 40 bytes: the proxy's accepted socket */
    __u64 ts_ns;          /* when it reached ESTABLISHED (CLOCK_MONOTONIC) */
    __u8 local[16];       /* its local address (a listener's), IPv4 mapped */
    __u16 family;
    __u8 _pad[6];
    __u64 sk;             /* the subject socket it proved (tcp_connect.c); 0: not known */
};

/* Not an event either: the map `pending` (tcp_connect.c), a subject socket
 * the kernel has not yet seen go into the proxy, with the events it would
 * have sent. The witness takes entries older than its window and judges
 * them as if they had come through the ring buffer. */
struct tg_pending {       /* value, 208 bytes */
    struct tg_tcp_event syn;   /* SYN_SENT */
    struct tg_tcp_event est;   /* ESTABLISHED; newstate 0 until then */
};

#endif
