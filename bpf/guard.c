/* Guard: refuse raw sockets to subjects (they could send around the proxy).
 *
 * Hook: cgroup BPF_CGROUP_INET_SOCK_CREATE, attached through a BPF link to
 * the cgroup2 root so it covers every task whatever its cgroup, coexists
 * with other programs there, and is detached by the kernel when the agent
 * exits, even by SIGKILL (agent/witness/cgroup_link.py). It runs in
 * inet_create/inet6_create in the caller's context; returning 0 makes
 * socket() fail with EPERM.
 * Packet sockets (AF_PACKET) never reach this hook; the BPF LSM hook
 * socket_create would cover them but LSM programs do not load on this
 * kernel (EPERM), so packet sockets are reported by sockets.c, not refused.
 */
#include <uapi/linux/bpf.h>

int tg_guard_sock_create(struct bpf_sock *ctx)
{
    if (ctx->type != 3 /* SOCK_RAW */)
        return 1;
    return tg_is_subject() ? 0 : 1;
}
