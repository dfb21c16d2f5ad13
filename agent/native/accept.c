/* Accepting redirected connections: accept4, then where each was going
 * before nftables redirected it (conntrack's NAT record, SO_ORIGINAL_DST or
 * IP6T_SO_ORIGINAL_DST), for a whole wake-up of a listening socket, in the
 * relay worker the wake-up woke (opening.c).  In Python the same took a
 * socket object per connection (with its enum conversions), getpeername,
 * an ipaddress parse and a getsockopt: about a sixth of the proxy thread's
 * time per short connection, and a wake-up of that thread for each.
 *
 * Addresses come out spelled as the rest of tollgate spells them: an IPv4
 * client on a dual-stack listener (::ffff:a.b.c.d) as plain a.b.c.d.
 */
#include "native.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#define SO_ORIGINAL_DST 80          /* linux/netfilter_ipv4.h */
#define IP6T_SO_ORIGINAL_DST 80     /* linux/netfilter_ipv6/ip6_tables.h */

static int v4_mapped(const struct sockaddr *sa) {
    return sa->sa_family == AF_INET6
        && IN6_IS_ADDR_V4MAPPED(&((const struct sockaddr_in6 *)sa)->sin6_addr);
}

void address_text(const struct sockaddr *sa, char *text, unsigned *port) {
    text[0] = 0;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, text, INET6_ADDRSTRLEN);
        *port = ntohs(in->sin_port);
    } else {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        if (v4_mapped(sa)) inet_ntop(AF_INET, &in6->sin6_addr.s6_addr[12], text, INET6_ADDRSTRLEN);
        else inet_ntop(AF_INET6, &in6->sin6_addr, text, INET6_ADDRSTRLEN);
        *port = ntohs(in6->sin6_port);
    }
}

/* (ip, port) of a socket address, IPv4-mapped IPv6 as plain IPv4. */
static PyObject *address(const struct sockaddr *sa) {
    char text[INET6_ADDRSTRLEN];
    unsigned port;
    address_text(sa, text, &port);
    return Py_BuildValue("(sI)", text, port);
}

/* An IPv4 client on a dual-stack listener has an IPv4 NAT record, so it is
 * asked with the v4 option. */
int original_dst(int fd, const struct sockaddr *peer, struct sockaddr_storage *dst) {
    socklen_t len = sizeof *dst;
    int v6 = peer->sa_family == AF_INET6 && !v4_mapped(peer);
    int rc = v6 ? getsockopt(fd, IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, dst, &len)
                : getsockopt(fd, IPPROTO_IP, SO_ORIGINAL_DST, dst, &len);
    return rc == 0 ? 0 : errno;
}

PyObject *accepted_tuple(int fd, const struct sockaddr *peer, const struct sockaddr *dst) {
    PyObject *client = address(peer), *to = client ? address(dst) : NULL;
    PyObject *item = to ? Py_BuildValue("(iOO)", fd, client, to) : NULL;
    Py_XDECREF(client);
    Py_XDECREF(to);
    return item;
}

int accept_redirected(int lfd, int most, accept_take take, void *ctx, int *not_redirected) {
    for (int i = 0; i < most; i++) {
        struct sockaddr_storage peer, dst;
        socklen_t len = sizeof peer;
        int fd = accept4(lfd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : errno;
        }
        if (original_dst(fd, (struct sockaddr *)&peer, &dst) != 0) {
            close(fd);
            (*not_redirected)++;
            continue;
        }
        take(ctx, fd, (struct sockaddr *)&peer, (struct sockaddr *)&dst);
    }
    return 0;
}

/* original_dst(fd) -> (ip, port); OSError if the connection was not
 * redirected (the asyncio relay's accept, agent/proxy/origdst.py). */
static PyObject *py_original_dst(PyObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd)) return NULL;
    struct sockaddr_storage peer, dst;
    socklen_t len = sizeof peer;
    if (getpeername(fd, (struct sockaddr *)&peer, &len) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    int err = original_dst(fd, (struct sockaddr *)&peer, &dst);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return address((struct sockaddr *)&dst);
}

PyMethodDef accept_methods[] = {
    {"original_dst", py_original_dst, METH_VARARGS,
     "original_dst(fd) -> (ip, port) before the redirect; OSError if not redirected"},
    {NULL, NULL, 0, NULL},
};
