"""The native relay threads on real TCP sockets and a real store: what the
asyncio relay promises (relay.py), the pump keeps: record before forward,
half-close passed on, a lost side resets the other, a failed append resets
both and forwards nothing."""

from __future__ import annotations

import contextlib
import fcntl
import errno
import os
import socket
import struct
import termios
import time

import pytest

from agent.native import Pump
from agent.store import Direction, Kind, StoreWriter, iter_records, verify
from agent.store.reader import segment_paths


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as ls:
        a = socket.create_connection(ls.getsockname())
        b, _ = ls.accept()
    return a, b


class Rig:
    """subject <-> [pump] <-> destination, as the proxy hands them over."""

    def __init__(self, store, workers: int = 2, buffer_bytes: int = 256 << 10,
                 **writer) -> None:
        self.writer = StoreWriter(store, immutable=False, **writer)
        self.pump = Pump(self.writer.chain, workers, buffer_bytes)
        self.ended: list[tuple] = []

    def session(self, sid: int) -> tuple[socket.socket, socket.socket]:
        subject, proxy_client = tcp_pair()
        proxy_server, dest = tcp_pair()
        for s in (proxy_client, proxy_server):
            s.setblocking(False)
        self.pump.add(sid, proxy_client.detach(), proxy_server.detach())
        for s in (subject, dest):
            s.settimeout(10)
        return subject, dest

    def wait_ended(self, n: int = 1, timeout: float = 10) -> list[tuple]:
        deadline = time.monotonic() + timeout
        while len(self.ended) < n and time.monotonic() < deadline:
            self.ended += self.pump.finished()
            time.sleep(0.01)
        assert len(self.ended) >= n, f"{len(self.ended)} of {n} sessions ended"
        return self.ended

    def data(self) -> list[tuple[int, Direction, bytes]]:
        return [r.data() for r in iter_records(self.writer.dir) if r.kind == Kind.DATA]

    def close(self) -> None:
        self.pump.close("test over")
        self.writer.close()


# One worker: both directions of a session on one thread; more: on two.
@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}-workers")
def rig(request, tmp_path):
    r = Rig(tmp_path / "store", request.param)
    yield r
    r.close()


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return out


def round_trip(subject: socket.socket, dest: socket.socket, up: bytes, down: bytes) -> None:
    """One request and its reply through the pump, each arriving whole."""
    subject.sendall(up)
    assert recv_exactly(dest, len(up)) == up
    dest.sendall(down)
    assert recv_exactly(subject, len(down)) == down


def exchange(subject: socket.socket, dest: socket.socket, up: bytes, down: bytes) -> None:
    """One request and its reply through the pump; then both ends close."""
    round_trip(subject, dest, up, down)
    subject.close()
    dest.close()


def test_both_ways_recorded_then_forwarded_and_closed(rig):
    subject, dest = rig.session(7)
    round_trip(subject, dest, b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\nhi")
    subject.shutdown(socket.SHUT_WR)
    assert dest.recv(10) == b""
    dest.close()
    assert subject.recv(10) == b""
    assert rig.wait_ended() == [(7, "closed", 18, 21, 0)]
    rig.writer.close()
    assert rig.data() == [(7, Direction.CLIENT, b"GET / HTTP/1.0\r\n\r\n"),
                          (7, Direction.SERVER, b"HTTP/1.0 200 OK\r\n\r\nhi")]
    assert verify(rig.writer.dir).ok


def test_a_sha256_store_gets_version_2_frames_from_the_relay_threads(tmp_path):
    """store.payload_hash = "sha256" (FIPS-approved hashes only) reaches the
    relay threads' appends, not only Python's."""
    rig = Rig(tmp_path / "store", 2, payload_hash="sha256")
    try:
        exchange(*rig.session(9), b"ping", b"pong")
        rig.wait_ended()
    finally:
        rig.close()
    records = list(iter_records(rig.writer.dir))
    assert {r.version for r in records} == {2}
    assert [r.data() for r in records if r.kind == Kind.DATA] == [
        (9, Direction.CLIENT, b"ping"), (9, Direction.SERVER, b"pong")]
    assert verify(rig.writer.dir).ok


def test_half_close_then_reply_arrives_whole(rig):
    subject, dest = rig.session(1)
    subject.sendall(b"question")
    subject.shutdown(socket.SHUT_WR)
    assert recv_exactly(dest, 8) == b"question" and dest.recv(1) == b""
    reply = bytes(range(256)) * 4096  # 1 MiB after the subject's FIN
    dest.sendall(reply)
    dest.shutdown(socket.SHUT_WR)
    assert recv_exactly(subject, len(reply)) == reply and subject.recv(1) == b""
    assert rig.wait_ended()[0][1:4] == ("closed", 8, len(reply))


def test_destination_reset_resets_the_subject(rig):
    subject, dest = rig.session(2)
    subject.sendall(b"x")
    recv_exactly(dest, 1)
    dest.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    dest.close()
    with pytest.raises(ConnectionResetError):
        subject.recv(1)
    sid, reason, *_ = rig.wait_ended()[0]
    assert (sid, reason) == (2, "server lost: Connection reset by peer")


def test_failed_append_forwards_nothing_and_resets_both(rig):
    subject, dest = rig.session(3)
    subject.sendall(b"recorded")
    assert recv_exactly(dest, 8) == b"recorded"
    with rig.writer.chain:
        rig.writer.chain.healthy = 0  # as after a failed write (disk full)
    subject.sendall(b"never forwarded")
    with pytest.raises(ConnectionResetError):
        dest.recv(100)
    with pytest.raises(ConnectionResetError):
        subject.recv(100)
    sid, reason, client_bytes, _, err = rig.wait_ended()[0]
    assert sid == 3 and reason.startswith("store failed:") and err == errno.EIO
    assert rig.data() == [(3, Direction.CLIENT, b"recorded")]


def test_close_resets_live_sessions_with_the_reason(rig):
    pairs = [rig.session(sid) for sid in (10, 11, 12)]
    for subject, dest in pairs:
        subject.sendall(b"up")
        recv_exactly(dest, 2)
    rig.pump.close("agent stopping: test")
    assert sorted(e[:2] for e in rig.wait_ended(3)) == [
        (sid, "agent stopping: test") for sid in (10, 11, 12)]
    for subject, _ in pairs:
        with pytest.raises(ConnectionResetError):
            subject.recv(1)


def test_full_segments_wake_the_writer_to_rotate_and_seal(tmp_path):
    # Upkeep would only come every 60 s: rotation within seconds proves the wake-up.
    rig = Rig(tmp_path / "store", segment_max_bytes=1 << 20, maintain_interval_s=60)
    try:
        subject, dest = rig.session(5)
        block = b"\xa5" * (64 << 10)
        # One segment's worth at a time, then wait for its rotation: the relays
        # never wait for the writer, so a burst may outrun a slow rotation
        # (a segment past its size is allowed); each wake-up must still come.
        for segments in (2, 3, 4):
            for _ in range(17):  # 1 MiB and a block
                subject.sendall(block)
                recv_exactly(dest, len(block))
            deadline = time.monotonic() + 30  # upkeep's own interval: 60 s
            while len(segment_paths(rig.writer.dir)) < segments and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(segment_paths(rig.writer.dir)) >= segments
    finally:
        rig.close()
    assert verify(tmp_path / "store").ok
    assert sum(len(d) for _, _, d in rig.data()) == 3 * 17 * len(block)


def test_many_sessions_both_ways_at_once_arrive_whole_and_recorded(rig):
    """Each direction of a session may run on a different thread: bytes,
    half-closes and records must still come out exact, per session."""
    import threading

    def talk(sock: socket.socket, payload: bytes, got: list) -> None:
        sender = threading.Thread(target=lambda: (sock.sendall(payload),
                                                  sock.shutdown(socket.SHUT_WR)))
        sender.start()
        chunks = []
        while (b := sock.recv(1 << 16)):
            chunks.append(b)
        sender.join()
        got.append(b"".join(chunks))

    sessions = {}
    for sid in range(100, 140):
        subject, dest = rig.session(sid)
        up, down = os.urandom(200_000 + sid), os.urandom(100_000 + sid)
        sessions[sid] = (subject, dest, up, down, [], [])
    threads = []
    for subject, dest, up, down, got_dest, got_subject in sessions.values():
        threads += [threading.Thread(target=talk, args=(subject, up, got_subject)),
                    threading.Thread(target=talk, args=(dest, down, got_dest))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ended = {e[0]: e for e in rig.wait_ended(len(sessions))}
    rig.writer.close()
    recorded: dict = {}
    for sid, direction, data in rig.data():
        recorded.setdefault((sid, direction), []).append(data)
    for sid, (_, _, up, down, got_dest, got_subject) in sessions.items():
        assert got_dest == [up] and got_subject == [down]
        assert ended[sid] == (sid, "closed", len(up), len(down), 0)
        assert b"".join(recorded[(sid, Direction.CLIENT)]) == up
        assert b"".join(recorded[(sid, Direction.SERVER)]) == down
    assert verify(rig.writer.dir).ok


def dial(rig: Rig, sid: int, port: int) -> socket.socket:
    """subject <-> [pump connects to 127.0.0.1:port itself]."""
    subject, proxy_client = tcp_pair()
    proxy_client.setblocking(False)
    rig.pump.connect(sid, proxy_client.detach(), "127.0.0.1", port)
    subject.settimeout(10)
    return subject


def test_pump_connects_upstream_then_relays(rig):
    with socket.create_server(("127.0.0.1", 0)) as ls:
        subject = dial(rig, 20, ls.getsockname()[1])
        dest, _ = ls.accept()
    dest.settimeout(10)
    exchange(subject, dest, b"SELECT 1;", b"1 row")
    assert rig.wait_ended() == [(20, "closed", 9, 5, 0)]


def test_refused_connect_resets_the_subject(rig):
    with socket.create_server(("127.0.0.1", 0)) as ls:
        port = ls.getsockname()[1]  # closed again: nothing listens there
    subject = dial(rig, 21, port)
    with pytest.raises(ConnectionResetError):
        subject.recv(1)
    assert rig.wait_ended() == [(21, "upstream failed: Connection refused", 0, 0, 0)]


@contextlib.contextmanager
def unanswered_port():
    """A port whose listener's accept queue is full: further SYNs are dropped,
    so a connect there hangs."""
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(0)
        with socket.create_connection(ls.getsockname(), 2):  # backlog 0: one fills it
            yield ls.getsockname()[1]


def test_connect_that_never_completes_times_out(tmp_path):
    rig = Rig(tmp_path / "store")
    rig.pump = Pump(rig.writer.chain, 2, 1 << 16, 0.3)
    try:
        with unanswered_port() as port:
            started = time.monotonic()  # before the dial: the pump's clock starts inside it
            subject = dial(rig, 22, port)
            assert rig.wait_ended(timeout=8) == [(22, "upstream failed: TimeoutError", 0, 0, 0)]
            # At least the 0.3 s asked for; well under the 10 s default.
            assert 0.3 <= time.monotonic() - started < 8
            with pytest.raises(ConnectionResetError):
                subject.recv(1)
    finally:
        rig.close()


def test_close_ends_connects_in_progress_with_the_reason(tmp_path):
    rig = Rig(tmp_path / "store")
    try:
        with unanswered_port() as port:
            subject = dial(rig, 23, port)
            time.sleep(0.2)
            rig.pump.close("agent stopping: test")
            assert rig.wait_ended() == [(23, "agent stopping: test", 0, 0, 0)]
            with pytest.raises(ConnectionResetError):
                subject.recv(1)
    finally:
        rig.close()


BIGGEST = (16 << 20) - 9  # the store's frame limit less the DATA head (session, direction)
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python does not name it


def test_a_read_as_big_as_buffer_bytes_allows_is_one_record(tmp_path):
    """The largest buffer the pump takes still fits a whole read in one
    record: 16 MiB less 9 bytes queued at once arrive as a single DATA record
    and the store stays healthy (a bigger read would fail the store)."""
    rig = Rig(tmp_path / "store", 1, BIGGEST)
    try:
        with socket.socket() as ls:
            # forced past rmem_max (root) so the whole payload queues before the pump reads
            ls.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
            ls.bind(("127.0.0.1", 0))
            ls.listen()
            subject = socket.create_connection(ls.getsockname())
            proxy_client, _ = ls.accept()
        proxy_server, dest = tcp_pair()
        payload = os.urandom(BIGGEST)
        subject.sendall(payload)
        deadline = time.monotonic() + 10
        while queued(proxy_client) < BIGGEST and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queued(proxy_client) == BIGGEST
        for s in (proxy_client, proxy_server):
            s.setblocking(False)
        rig.pump.add(1, proxy_client.detach(), proxy_server.detach())
        dest.settimeout(10)
        assert recv_exactly(dest, BIGGEST) == payload
        subject.close()
        dest.close()
    finally:
        rig.close()
    assert rig.data() == [(1, Direction.CLIENT, payload)]
    assert verify(rig.writer.dir).ok


def queued(s: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def test_a_buffer_whose_read_would_not_fit_one_record_is_refused(tmp_path):
    writer = StoreWriter(tmp_path / "store", immutable=False)
    try:
        with pytest.raises(ValueError, match=f"buffer_bytes must be at most {BIGGEST}"):
            Pump(writer.chain, 1, BIGGEST + 1)
    finally:
        writer.close()
