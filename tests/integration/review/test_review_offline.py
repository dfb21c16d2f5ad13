"""The review views over synthetic stores: no sandbox, no root. Random and
mutated sessions never crash a view nor put a control character on the
terminal; the pcapng numbers TCP exactly; filters parse what they promise;
``--follow`` sees records as they are appended."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.review.attribution import alert_chain, one_line
from agent.review.follow import follow_session
from agent.review.hexdump import render_hex
from agent.review.pcap import MAX_SEGMENT, pcapng_blocks
from agent.review.replay import json_lines, render_decoded, render_text
from agent.review.search import parse_destination, parse_time
from agent.review.sessions import session_records
from agent.store import Direction, Kind, StoreWriter

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])
PORTS = [22, 25, 80, 443, 3306, 5432, 6379]
# first bytes that steer detection into each decoder, so fuzzing reaches past it
PREFIXES = [b"", b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"GET / HTTP/1.1\r\n", b"*1\r\n$4\r\nPING\r\n",
            b"SSH-2.0-x\r\n", b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00"]
chunks = st.lists(st.tuples(st.sampled_from(list(Direction)), st.binary(min_size=1, max_size=96)),
                  min_size=1, max_size=10)


def write_session(store: Path, chunks: list[tuple[Direction, bytes]], port: int = 5432,
                  client: str = "10.77.0.1", server: str = "10.77.0.2", protocol: str | None = None) -> int:
    w = StoreWriter(store, immutable=False)
    try:
        sid = w.append_json(Kind.SESSION_OPEN, {"client": [client, 40000], "original_dst": [server, port],
                                                "time_ns": time.time_ns(), "protocol": protocol})
        w.append_json(Kind.SESSION_INFO, {"session": sid, "uid": 0, "chain": [
            {"pid": 2, "exe": "/bin/\x1b[2Jevil", "argv": ["evil", "\x1b]0;title\x07"], "uid": 0}]})
        for d, data in chunks:
            w.append_data(sid, d, data)
        sent = [sum(len(b) for dd, b in chunks if dd == d) for d in Direction]
        w.append_json(Kind.SESSION_CLOSE, {"session": sid, "reason": "closed",
                                           "client_bytes": sent[0], "server_bytes": sent[1]})
    finally:
        w.close()
    return sid


def all_views(store: Path, sid: int) -> str:
    records = list(session_records(str(store), sid))
    out = [*render_decoded(records), *render_text(records), *render_hex(records), *json_lines(records)]
    b"".join(pcapng_blocks(records))
    return "\n".join(out)


@FUZZ
@given(data=chunks, port=st.sampled_from(PORTS), prefix=st.sampled_from(PREFIXES))
def test_random_sessions_never_crash_a_view_nor_reach_the_terminal(tmp_path_factory, data, port, prefix):
    store = tmp_path_factory.mktemp("store")
    sid = write_session(store, [(Direction.CLIENT, prefix)] * bool(prefix) + data, port)
    shown = all_views(store, sid)
    assert not any(ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) < 0xA0 for c in shown)


def test_undecodable_bytes_are_shown_as_recorded(tmp_path):
    garbage = b"\x00\x00\x00\x09\x00\x03\x00\x00" + b"NOT-A-STARTUP-MESSAGE"
    sid = write_session(tmp_path, [(Direction.CLIENT, b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
                                   (Direction.SERVER, b"N"), (Direction.CLIENT, garbage)])
    out = "\n".join(render_decoded(session_records(str(tmp_path), sid)))
    # the 9-byte "startup" takes the N; the rest cannot be a message
    assert "SSLRequest" in out and "not decodable from byte 17" in out and "OT-A-STARTUP-MESSAGE" in out


def test_unknown_protocol_is_the_text_view_with_times(tmp_path):
    sid = write_session(tmp_path, [(Direction.CLIENT, b"EHLO corp\r\n"), (Direction.SERVER, b"250 hi\r\n")], 25)
    out = list(render_decoded(session_records(str(tmp_path), sid)))
    assert any("-> 11 bytes (as recorded" in line for line in out)
    assert any(line.strip() == "EHLO corp\\r" for line in out)


# -- pcapng ------------------------------------------------------------------------------


def packets(blob: bytes) -> list[bytes]:
    """The packet data of every EPB of a little-endian pcapng."""
    out, at = [], 0
    while at < len(blob):
        kind, total = struct.unpack_from("<II", blob, at)
        if kind == 6:
            length = struct.unpack_from("<I", blob, at + 20)[0]
            out.append(blob[at + 28:at + 28 + length])
        at += total
    return out


@pytest.mark.parametrize("client,server", [("10.77.0.1", "10.77.0.2"), ("fd77::1", "fd77::2")])
def test_pcap_numbers_tcp_like_the_streams(tmp_path, client, server):
    big = bytes(range(256)) * 600  # > 2 segments
    sid = write_session(tmp_path, [(Direction.CLIENT, b"hello"), (Direction.SERVER, big),
                                   (Direction.CLIENT, b"bye")], 80, client, server)
    pkts = packets(b"".join(pcapng_blocks(session_records(str(tmp_path), sid))))
    ip_len = 20 if ":" not in client else 40
    tcp = [p[ip_len:] for p in pkts]
    flags = [t[13] for t in tcp]
    assert flags[:3] == [0x02, 0x12, 0x10] and flags[-3:] == [0x11, 0x11, 0x10]
    data = [(struct.unpack_from("!HI", t)[0], struct.unpack_from("!I", t, 4)[0], t[(t[12] >> 4) * 4:])
            for t in tcp[3:-3]]
    assert max(len(d) for _, _, d in data) <= MAX_SEGMENT and len(data) == 2 + -(-len(big) // MAX_SEGMENT)
    server_bytes = b"".join(d for port, _, d in data if port == 80)
    assert server_bytes == big
    seqs = [seq for port, seq, _ in data if port == 80]
    assert seqs == [seqs[0] + i * MAX_SEGMENT for i in range(len(seqs))]


def test_dns_over_udp_is_decoded_and_exported_as_datagrams(tmp_path):
    stream = Path(__file__).parents[2] / "fixtures" / "streams" / "dns-tcp.jsonl"
    lines = [json.loads(line) for line in stream.read_text().splitlines()]
    datagrams = [(Direction.CLIENT if m["dir"] == "c" else Direction.SERVER, bytes.fromhex(m["hex"])[2:])
                 for m in lines][:2]  # the TCP stream's first query and answer, without length prefixes
    sid = write_session(tmp_path, datagrams, 53, protocol="dns/udp")
    records = list(session_records(str(tmp_path), sid))
    out = "\n".join(render_decoded(records))
    assert "protocol: dns-udp" in out and "DNS query #48879: example.com. A" in out and "DNS answer #48879" in out
    pcap = tmp_path / "dns.pcapng"
    pcap.write_bytes(b"".join(pcapng_blocks(records)))
    if shutil.which("tshark"):
        names = subprocess.run(["tshark", "-r", str(pcap), "-Y", "dns", "-T", "fields", "-e", "dns.qry.name"],
                               capture_output=True, text=True, timeout=60).stdout.split()
        assert names == ["example.com", "example.com"]


# -- search ---------------------------------------------------------------------------


def test_parse_time_and_destination():
    now = 1_000_000 * 10**9
    assert parse_time("10m", now) == now - 600 * 10**9
    assert parse_time("1970-01-01T00:00:10Z") == 10 * 10**9
    assert parse_time("1970-01-01T01:00:10+01:00") == 10 * 10**9
    with pytest.raises(ValueError):
        parse_time("last tuesday")
    assert parse_destination("10.0.0.0/8:5432").matches(("10.1.2.3", 5432))
    assert not parse_destination("10.0.0.0/8:5432").matches(("10.1.2.3", 80))
    assert parse_destination("[fd77::2]:22").matches(("fd77::2", 22))
    assert parse_destination("fd77::/64").matches(("fd77::9", 1))
    assert parse_destination(":443").matches(("192.0.2.1", 443))
    with pytest.raises(ValueError):
        parse_destination("not-an-ip")


# -- attribution ----------------------------------------------------------------------


def test_alert_chain_from_witness_session_or_operator():
    near_first = [{"pid": 3, "uid": 1000, "exe": "/usr/bin/curl", "argv": ["curl", "x"]},
                  {"pid": 2, "uid": 1000, "exe": "/bin/bash", "argv": ["-bash"]}]
    witness = {"evidence": {"process_chain": near_first, "probe": "udp"}}
    chain, source = alert_chain(witness, {})
    assert [p["pid"] for p in chain] == [2, 3] and source == "witness (udp)"
    proxy = {"evidence": {"session": 7}}
    chain, source = alert_chain(proxy, {7: {"chain": near_first}})
    assert source == "session 7" and one_line(chain).startswith("bash[2 uid 1000] > curl[3 uid 1000]: curl x")
    assert alert_chain({"evidence": {"by": {"pid": 9, "uid": 0}}}, {})[1] == "operator"
    assert alert_chain({"evidence": {}}, {}) == ([], "none")


# -- follow ---------------------------------------------------------------------------


def test_follow_yields_appended_records_until_close(tmp_path):
    w = StoreWriter(tmp_path, immutable=False, segment_max_bytes=4096)
    sid = w.append_json(Kind.SESSION_OPEN, {"client": ["10.77.0.1", 1], "original_dst": ["10.77.0.2", 6379],
                                            "time_ns": 1})

    def talk():
        for i in range(20):  # across several segments (4 KiB each)
            time.sleep(0.02)
            w.append_data(sid, Direction.CLIENT, b"*1\r\n$4\r\nPING\r\n" + b" " * 500 * (i % 2))
        w.append_json(Kind.SESSION_CLOSE, {"session": sid, "reason": "closed", "client_bytes": 0,
                                           "server_bytes": 0})
    t = threading.Thread(target=talk)
    t.start()
    seen = list(follow_session(str(tmp_path), sid, poll_s=0.01, stop=lambda: False))
    t.join()
    w.close()
    assert [r.kind for r in seen] == [Kind.SESSION_OPEN] + [Kind.DATA] * 20 + [Kind.SESSION_CLOSE]
    assert len(list(Path(tmp_path).glob("*.seg"))) > 1
