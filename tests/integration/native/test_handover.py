"""A live session handed from one pump to the next (an agent restarting):
Pump.close(hand_over=True) lets go of it without ending it, Pump.resume
relays it on. The subject and the destination see one unbroken connection;
bytes recorded and not yet sent when the first pump stopped are sent by the
second, once; a direction already finished stays finished."""

from __future__ import annotations

import socket
import time

import pytest

from agent.native import Pump
from agent.store import Direction

from test_pump import Rig, recv_exactly, round_trip

LIVE, DONE = 0, 2


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}-workers")
def rig(request, tmp_path):
    r = Rig(tmp_path / "store", request.param, buffer_bytes=16 << 10)
    yield r
    r.close()


def hand_over(rig: Rig) -> list[tuple]:
    """The rig's pump stops handing its sessions over; a new one resumes them."""
    handed = rig.pump.close("agent stopping: restart", True)
    assert rig.pump.finished() == []        # nothing ended
    rig.pump = Pump(rig.writer.chain, 2, 16 << 10)
    for sid, cfd, sfd, cb, sb, cpend, spend, cstate, sstate, _opened, _addrs in handed:
        rig.pump.resume(sid, cfd, sfd, cb, sb, cpend, spend, cstate, sstate)
    return handed


def test_a_session_goes_on_through_the_next_pump(rig):
    subject, dest = rig.session(7)
    round_trip(subject, dest, b"before", b"ok1")
    [handed] = hand_over(rig)
    assert handed[0] == 7 and handed[3:9] == (6, 3, b"", b"", LIVE, LIVE)
    assert handed[10] is None               # a plain pair: no redirect to read back
    round_trip(subject, dest, b"after", b"ok2")
    subject.shutdown(socket.SHUT_WR)
    assert dest.recv(1) == b""
    dest.close()
    assert subject.recv(1) == b""
    assert rig.wait_ended() == [(7, "closed", 11, 6, 0)]   # counts across both pumps
    assert rig.data() == [(7, Direction.CLIENT, b"before"), (7, Direction.SERVER, b"ok1"),
                          (7, Direction.CLIENT, b"after"), (7, Direction.SERVER, b"ok2")]


def _stuff(subject: socket.socket) -> bytes:
    """Send until the relay has stopped reading: it does so only while its
    last read waits to be sent (the destination reads nothing)."""
    subject.setblocking(False)
    sent, block, stalled = bytearray(), bytes(range(256)) * 64, 0
    while stalled < 3:
        try:
            sent += block[:subject.send(block)]
            stalled = 0
        except BlockingIOError:
            stalled += 1
            time.sleep(0.1)
    subject.setblocking(True)
    subject.settimeout(10)
    return bytes(sent)


@pytest.mark.parametrize("then_eof", [False, True], ids=["open", "eof"])
def test_bytes_recorded_not_yet_sent_are_sent_by_the_next_pump_once(rig, then_eof):
    subject, dest = rig.session(8)
    sent = _stuff(subject)                 # the destination reads nothing yet
    if then_eof:
        subject.shutdown(socket.SHUT_WR)
    [handed] = hand_over(rig)
    pending = handed[5]
    # The subject's EOF, if sent, is not read while bytes wait: still in its socket.
    assert pending and handed[7:9] == (LIVE, LIVE)
    got = recv_exactly(dest, len(sent))
    assert got == sent
    if then_eof:
        assert dest.recv(1) == b""
    subject.close()
    dest.close()
    rig.wait_ended()
    recorded = b"".join(d for _, direction, d in rig.data() if direction == Direction.CLIENT)
    assert recorded == sent                # the pending bytes recorded once, by the first pump


def test_a_finished_direction_stays_finished(rig):
    subject, dest = rig.session(9)
    subject.sendall(b"question")
    subject.shutdown(socket.SHUT_WR)
    assert recv_exactly(dest, 8) == b"question" and dest.recv(1) == b""
    [handed] = hand_over(rig)
    assert handed[7:9] == (DONE, LIVE)
    dest.sendall(b"answer")
    dest.shutdown(socket.SHUT_WR)
    assert recv_exactly(subject, 6) == b"answer" and subject.recv(1) == b""
    assert rig.wait_ended()[0][:4] == (9, "closed", 8, 6)


def test_resume_refuses_a_state_no_hand_over_leaves(rig):
    a, b = socket.socketpair()
    with pytest.raises(ValueError):
        rig.pump.resume(1, a.fileno(), b.fileno(), 0, 0, b"", b"", 1, LIVE)
    with pytest.raises(ValueError):
        rig.pump.resume(1, a.fileno(), b.fileno(), 0, 0, b"x", b"", DONE, LIVE)   # finished, bytes to send
    with pytest.raises(ValueError):
        rig.pump.resume(1, a.fileno(), b.fileno(), 0, 0, b"", b"", DONE, DONE)
    a.close()
    b.close()
