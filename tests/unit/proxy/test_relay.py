"""The sans-IO relay (agent/proxy/relay.py): events in, commands out."""

from __future__ import annotations

from agent.proxy.relay import Close, Finish, HalfClose, Record, Relay, Send, Side
from agent.store.format import Direction

C, S = Side.CLIENT, Side.SERVER


def test_every_chunk_is_recorded_before_it_is_sent():
    r = Relay()
    assert r.data_received(C, b"SELECT 1") == [Record(Direction.CLIENT, b"SELECT 1"),
                                               Send(S, b"SELECT 1")]
    assert r.data_received(S, b"1 row") == [Record(Direction.SERVER, b"1 row"),
                                            Send(C, b"1 row")]


def test_half_close_then_close_when_both_sides_ended():
    r = Relay()
    assert r.eof_received(C) == [HalfClose(S)]
    assert r.eof_received(C) == []                       # a second EOF says nothing new
    assert r.data_received(S, b"late answer")[1] == Send(C, b"late answer")
    assert r.eof_received(S) == [HalfClose(C), Close(C, False), Close(S, False),
                                 Finish("closed")]
    assert r.finished and r.data_received(C, b"x") == []


def test_a_side_lost_without_eof_resets_the_other():
    r = Relay()
    assert r.connection_lost(S, "ECONNRESET") == [Close(C, True),
                                                   Finish("server lost: ECONNRESET")]
    assert r.connection_lost(C, None) == []              # already finished


def test_a_side_lost_after_its_eof_is_a_clean_end_of_that_side():
    r = Relay()
    r.eof_received(C)
    assert r.connection_lost(C, None) == []
    assert r.connection_lost(S, None) == [Close(C, True), Finish("server lost: closed without EOF")]


def test_abort_and_upstream_failure_reset():
    assert Relay().upstream_failed("refused") == [Close(C, True), Finish("upstream failed: refused")]
    r = Relay()
    assert r.abort("store failed: full") == [Close(C, True), Close(S, True),
                                             Finish("store failed: full")]
    assert r.abort("again") == []


def test_byte_counts_are_what_the_store_holds():
    r = Relay()
    r.data_received(C, b"abc")
    r.data_received(C, b"defg")     # read, then its append failed: never recorded()
    r.data_received(S, b"xy")
    r.recorded(C, 3)
    r.recorded(S, 2)
    assert r.bytes == [3, 2]
