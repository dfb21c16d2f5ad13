"""Compile bpf/*.c through BCC, attach, and turn the ring buffer into typed events.

The concern files are compiled as one BCC program (subjects.c first) so they
share the subject maps and the one ring buffer. Parameters go in through
cflags; kernel struct offsets come from BTF (btf.py). Records the ring buffer
could not take are counted in the kernel and handed to on_lost, never dropped
silently.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import logging
import os
import select
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

from agent.witness import btf, cgroup_link, libbpf
from agent.witness.events import (TCP_EVENT_SIZE, Event, Peer, Pending, ProxySide, decode,
                                  mapped_text, peer_key)

log = logging.getLogger("tollgate.witness")

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
# subjects.c holds the shared maps and helpers, so it comes first.
SOURCES = ("subjects.c", "process.c", "tcp_connect.c", "udp_send.c", "sockets.c",
           "netns.c", "guard.c")
def cgroup2_root(mounts_file: str = "/proc/mounts") -> str | None:
    """Where the cgroup2 hierarchy is mounted: /sys/fs/cgroup on a unified
    host, /sys/fs/cgroup/unified on a hybrid one (like the CI kernel)."""
    try:
        with open(mounts_file) as f:
            found = [line.split()[1] for line in f if line.split()[2] == "cgroup2"]
    except OSError:
        return None
    return min(found, key=len) if found else None
MAX_SUBJECT_TASKS = 65536
MAX_SOCKETS = 65536
# Subject sockets not yet proven to go into the proxy (bpf/tcp_connect.c):
# connects of the last few microseconds, and bypasses younger than the
# window. When full, events take the ring buffer as before.
MAX_PENDING = 16384
WILDCARDS = ("0.0.0.0", "::")


class WitnessUnavailable(Exception):
    """BPF cannot be used here: no BCC, no privilege, or the program did not load."""


def _bcc():
    try:
        import bcc
    except ImportError as e:
        raise WitnessUnavailable(
            "BCC is not importable (install python3-bpfcc and use a venv made with "
            "--system-site-packages)") from e
    return bcc


def ring_pages(requested: int) -> int:
    """The ring buffer needs a power-of-two page count; round up."""
    return 1 << max(0, requested - 1).bit_length()


def program_text(sources: Iterable[str] = SOURCES) -> str:
    return "\n".join((BPF_DIR / name).read_text() for name in sources)


def cflags(pages: int, all_tcp_states: bool = False, proxy_port: int | None = None) -> list[str]:
    try:
        offsets = btf.offset_cflags()
    except (OSError, btf.BTFError) as e:
        raise WitnessUnavailable(f"kernel BTF unusable: {e}") from e
    return [f"-I{BPF_DIR}", f"-DRINGBUF_PAGES={ring_pages(pages)}",
            f"-DMAX_SUBJECT_TASKS={MAX_SUBJECT_TASKS}", f"-DMAX_SOCKETS={MAX_SOCKETS}",
            f"-DMAX_PENDING={MAX_PENDING}",
            *(["-DTG_ALL_TCP_STATES"] if all_tcp_states else []),
            *([f"-DPROXY_PORT={proxy_port}"] if proxy_port else []), *offsets]


def subject_descendants(uids: Iterable[int]) -> dict[int, int]:
    """pid -> inherited uid for running processes that are or descend from a subject."""
    uids = set(uids)
    procs = {p.pid: p.info for p in psutil.process_iter(["ppid", "uids"])}
    found: dict[int, int] = {}

    def origin(pid: int, depth: int = 0) -> int | None:
        if pid in found:
            return found[pid]
        info = procs.get(pid)
        if info is None or depth > 64 or info["uids"] is None:
            return None
        uid = info["uids"].real
        return uid if uid in uids else origin(info["ppid"], depth + 1)

    for pid in procs:
        uid = origin(pid)
        if uid is not None:
            found[pid] = uid
    return found


class Probes:
    """The compiled program: attach, poll events, count losses, detach."""

    def __init__(self, subject_uids: Iterable[int], *, pages: int, guard: bool,
                 on_event: Callable[[Event], None], all_tcp_states: bool = False,
                 proxy_port: int | None = None, proxy_listen: Iterable[str] = ()):
        self.subject_uids = tuple(subject_uids)
        self.pages = ring_pages(pages)
        self.guard = guard
        self.all_tcp_states = all_tcp_states
        self.proxy_port = proxy_port
        self.proxy_listen = tuple(proxy_listen)
        self._on_event = on_event
        self._bpf = None
        self._guard_link = -1
        self._fds: dict[str, int] = {}
        self._lost_seen = 0
        self.attached: list[str] = []
        self.handler_errors = 0

    def start(self) -> None:
        bcc = _bcc()
        if os.geteuid() != 0:
            raise WitnessUnavailable("the witness needs root (CAP_BPF, CAP_PERFMON)")
        try:
            self._bpf = bcc.BPF(text=program_text().encode(), cflags=cflags(self.pages, self.all_tcp_states,
                                                          self.proxy_port))
        except Exception as e:  # BCC raises bare Exception for compile and load errors
            raise WitnessUnavailable(f"BPF program did not compile or load: {e}") from e
        self._fill_subjects()
        self._fill_proxy_local()
        self._bpf[b"events"].open_ring_buffer(self._on_ring)
        self._ring = _RingReader(self._bpf._ringbuf_manager)
        self.attached = self._autoloaded()
        if self.guard:
            self._attach_guard(bcc)

    def _fill_subjects(self) -> None:
        uids, tgids = self._bpf[b"subject_uids"], self._bpf[b"subject_tgids"]
        for uid in self.subject_uids:
            uids[ct.c_uint32(uid)] = ct.c_uint8(1)
        for pid, uid in subject_descendants(self.subject_uids).items():
            tgids[ct.c_uint32(pid)] = ct.c_uint32(uid)

    @property
    def quiet(self) -> bool:
        """Whether the kernel proves proxied connections itself, sending user
        space no event for them (bpf/tcp_connect.c, TG_QUIET)."""
        return self.proxy_port is not None and not self.all_tcp_states

    def _fill_proxy_local(self) -> None:
        if not self.quiet:
            return
        # Asked per connection and every poll: the fds once, not BCC's table lookup each time.
        self._fds = {name: self._bpf[name.encode()].map_fd
                     for name in ("pending", "pending_peer", "attributed", "wake_armed")}
        fd, one = self._bpf[b"proxy_local"].map_fd, ct.c_uint8(1)
        for addr in self.proxy_listen:
            key = bytes(Peer()) if addr in WILDCARDS else peer_key(addr, 0)
            libbpf.check(libbpf.lib().bpf_map_update_elem(fd, key, ct.byref(one), 0),
                         f"proxy address {addr} into the witness")

    def _autoloaded(self) -> list[str]:
        """Names of the tracepoints BCC attached from the TRACEPOINT_PROBE macros."""
        names = [f"tracepoint:{_text(tp)}" for tp in self._bpf.tracepoint_fds]
        names += [f"raw_tracepoint:{_text(tp)}"
                  for tp in self._bpf.raw_tracepoint_fds]
        return sorted(names)

    def _attach_guard(self, bcc) -> None:
        try:
            fn = self._bpf.load_func(b"tg_guard_sock_create", bcc.BPF.CGROUP_SOCK)
            root = cgroup2_root()
            if root is None:
                raise OSError("no cgroup2 file system is mounted")
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except Exception as e:
            raise WitnessUnavailable(f"guard program did not load: {e}") from e
        hook = bcc.BPFAttachType.CGROUP_INET_SOCK_CREATE
        try:
            self._guard_link = cgroup_link.link(fn.fd, fd, hook)
            swept = cgroup_link.sweep_legacy(fd, hook, "tg_guard_sock_create")
        except OSError as e:
            self._unlink_guard()   # attached but the start fails: detach it now
            raise WitnessUnavailable(f"guard did not attach to the cgroup2 root: {e}") from e
        finally:
            os.close(fd)
        if swept:
            log.warning("detached %d guard(s) an earlier agent left on %s", swept, root)
        self.attached.append(f"cgroup_inet_sock_create:{root}")

    def _unlink_guard(self) -> None:
        if self._guard_link >= 0:
            os.close(self._guard_link)   # closing the link detaches the guard
            self._guard_link = -1

    def _on_ring(self, _ctx, data, size) -> None:
        # An exception here would be swallowed by ctypes: count and log it instead.
        try:
            event = decode(data, size)
            if event is not None:
                self._on_event(event)
        except Exception:
            self.handler_errors += 1
            log.exception("witness event handling failed")

    def poll(self, timeout_ms: int) -> bool:
        """Wait up to timeout_ms for the ring buffer and read it; False if
        the wait timed out with nothing to read."""
        return self._ring.poll(timeout_ms)

    def drain(self) -> bool:
        """Hand what the ring buffer holds now to on_event, in the calling
        thread (the proxy's, when it needs a connect event at once); False
        if the poll thread is reading it just then."""
        return self._bpf is not None and self._ring.drain()

    def take_lost(self) -> int:
        """Records lost since the last call (ring buffer full)."""
        total = sum(self._bpf[b"lost"][ct.c_int(0)])
        delta, self._lost_seen = total - self._lost_seen, total
        return delta

    def proxied(self, ip: str, port: int) -> tuple[int, str, int] | None:
        """When the proxy's side of a connection from (ip, port) established,
        its local address, and the subject socket it proved (0: not known);
        None if the kernel saw none (or no proxy port)."""
        if self.proxy_port is None or self._bpf is None:
            return None
        side = ProxySide()
        if libbpf.lib().bpf_map_lookup_elem(self._bpf[b"proxied"].map_fd, peer_key(ip, port),
                                            ct.byref(side)) != 0:
            return None
        return side.ts_ns, mapped_text(side.family, side.local), side.sk

    def take_unproven(self, older_than_ns: int) -> list[Event]:
        """Take from `pending` the sockets whose last event is older than
        older_than_ns (CLOCK_MONOTONIC) and not proven to be the proxy's:
        their held events, in order, for the cross-check to judge."""
        if not self.quiet or self._bpf is None:
            return []
        bpf, fd = libbpf.lib(), self._fds["pending"]
        keys, key, nxt = [], None, ct.c_uint64()
        while bpf.bpf_map_get_next_key(fd, key, ct.byref(nxt)) == 0:
            keys.append(nxt.value)
            key = ct.byref(ct.c_uint64(nxt.value))
        found, held = [], Pending()
        for sk in keys:
            k = ct.c_uint64(sk)
            if bpf.bpf_map_lookup_elem(fd, ct.byref(k), ct.byref(held)) != 0:
                continue    # proven (or released) meanwhile
            last = held.est.h.ts_ns if held.est.newstate else held.syn.h.ts_ns
            if last > older_than_ns:
                continue
            if bpf.bpf_map_lookup_and_delete_elem(fd, ct.byref(k), ct.byref(held)) != 0:
                continue
            found.append(decode(bytes(held.syn), TCP_EVENT_SIZE))
            if held.est.newstate:
                found.append(ev := decode(bytes(held.est), TCP_EVENT_SIZE))
                bpf.bpf_map_delete_elem(self._fds["pending_peer"],
                                        peer_key(ev.saddr, ev.sport))
        return [ev for ev in found if ev is not None]

    def holding(self) -> bool:
        """Whether `pending` holds sockets the poll must look at soon. If
        not, arms the kernel to wake the poll when it next holds one."""
        if not self.quiet or self._bpf is None:
            return False
        if self._any_pending():
            return True
        zero, one = ct.c_uint32(0), ct.c_uint32(1)
        libbpf.lib().bpf_map_update_elem(self._fds["wake_armed"], ct.byref(zero),
                                         ct.byref(one), 0)
        return self._any_pending()   # held before the arming: no wake-up for it

    def _any_pending(self) -> bool:
        key = ct.c_uint64()
        return libbpf.lib().bpf_map_get_next_key(self._fds["pending"], None, ct.byref(key)) == 0

    def pending(self, ip: str, port: int) -> bool:
        """Whether the established subject socket (ip, port) waits in the
        kernel, neither proven nor yet taken by take_unproven."""
        if not self.quiet or self._bpf is None:
            return False
        sk = ct.c_uint64()
        return libbpf.lib().bpf_map_lookup_elem(self._fds["pending_peer"],
                                                peer_key(ip, port), ct.byref(sk)) == 0

    def attributed(self, ip: str, port: int) -> Event | None:
        """The ESTABLISHED event of the subject socket (ip, port) the kernel
        proved went into the proxy, taken from the map; None if it has none."""
        if not self.quiet or self._bpf is None:
            return None
        raw = ct.create_string_buffer(TCP_EVENT_SIZE)
        if libbpf.lib().bpf_map_lookup_and_delete_elem(
                self._fds["attributed"], peer_key(ip, port), raw) != 0:
            return None
        return decode(raw.raw, TCP_EVENT_SIZE)

    @property
    def attributed_fd(self) -> int:
        """The `attributed` map's descriptor, for the native opener; -1 if
        the kernel proves nothing (not quiet, or not loaded)."""
        return self._fds["attributed"] if self.quiet and self._bpf is not None else -1

    def proven(self) -> int:
        """Subject connections the kernel saw go into the proxy (no event sent)."""
        return sum(self._bpf[b"proven"][ct.c_int(0)]) if self.quiet and self._bpf else 0

    def subject_pids(self) -> set[int]:
        return {k.value for k in self._bpf[b"subject_tgids"].keys()}

    def close(self) -> None:
        if self._bpf is None:
            return
        self._unlink_guard()
        self._bpf.cleanup()
        self._bpf = None
        self.attached = []


class _RingReader:
    """Waits for the ring buffer with the GIL released, then reads all of it
    with the GIL held.

    BCC's ring_buffer_poll releases the GIL for the whole call, so every
    record's callback had to take it back: per subject connection three
    contended hand-overs with the proxy's thread. Here the wait is a plain
    poll(2) on libbpf's epoll fd and the read goes through a PyDLL handle
    (the GIL stays held), so the callbacks re-enter Python cheaply.
    """

    def __init__(self, manager: int) -> None:
        held = ct.PyDLL(ctypes.util.find_library("bcc") or "libbcc.so.0")
        held.bpf_consume_ringbuf.argtypes = [ct.c_void_p]
        held.bpf_consume_ringbuf.restype = ct.c_int
        self._consume, self._manager = held.bpf_consume_ringbuf, manager
        self._reading = threading.Lock()
        self._waiter = select.poll()
        self._waiter.register(libbpf.lib().ring_buffer__epoll_fd(manager), select.POLLIN)

    def poll(self, timeout_ms: int) -> bool:
        if not self._waiter.poll(timeout_ms):
            return False   # timed out: nothing to read
        with self._reading:
            self._consume(self._manager)
        return True

    def drain(self) -> bool:
        """Read what the buffer holds now, from any thread; False (nothing
        read) if another thread is reading it. libbpf allows one reader at a
        time, and a callback's Python code can hand the GIL over midway."""
        if not self._reading.acquire(blocking=False):
            return False
        try:
            self._consume(self._manager)
        finally:
            self._reading.release()
        return True


def _text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name
