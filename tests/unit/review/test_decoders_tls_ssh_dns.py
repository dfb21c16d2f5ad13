from __future__ import annotations

from _streams import client_hello_record, decode, feed_all, of

from agent.review.decoders import (
    DnsDatagramDecoder, DnsDecoder, DnsMessage, DnsRecord, Direction, Encrypted, Error, SshBanner, SshKexInit,
    TlsCertificate, TlsClientHello, TlsDecoder, TlsServerHello, Undecodable,
)

C, S = Direction.CLIENT, Direction.SERVER


def test_tls12_hello_certificate_then_counts() -> None:
    events = decode("tls12-curl")
    hello = of(events, TlsClientHello)[0]
    assert (hello.sni, hello.alpn) == ("tollgate.test", ("h2", "http/1.1"))
    server = of(events, TlsServerHello)[0]
    assert (server.version, server.alpn) == ("TLS 1.2", "http/1.1")
    assert server.cipher.startswith("TLS_ECDHE_")
    assert of(events, TlsCertificate)[0].subject == "O=Tollgate Test, CN=tollgate.test"
    encrypted = of(events, Encrypted)
    assert len(encrypted) <= 6 and sum(e.byte_count for e in encrypted) > 300  # one per turn, not per record


def test_tls13_certificate_is_not_visible() -> None:
    events = decode("tls13-curl")
    assert of(events, TlsClientHello)[0].versions[0] == "TLS 1.3"
    assert of(events, TlsServerHello)[0].version == "TLS 1.3"
    assert not of(events, TlsCertificate)


def test_hello_split_across_records_and_alert() -> None:
    record = client_hello_record("split.example", (b"h2",))
    body = record[5:]
    first, second = body[:20], body[20:]
    stream = [
        (C, b"\x16\x03\x01" + len(first).to_bytes(2, "big") + first),
        (C, b"\x16\x03\x01" + len(second).to_bytes(2, "big") + second),
        (S, b"\x15\x03\x03\x00\x02\x02\x28"),
    ]
    events = feed_all(TlsDecoder(), stream)
    assert (of(events, TlsClientHello)[0].sni, of(events, TlsClientHello)[0].alpn) == ("split.example", ("h2",))
    assert of(events, Error)[0].message == "fatal alert: handshake_failure"


def test_not_tls_is_undecodable() -> None:
    events = feed_all(TlsDecoder(), [(C, b"GET / HTTP/1.1\r\n\r\n")])
    assert of(events, Undecodable)[0].offset == 0


def test_ssh_banners_and_kexinit() -> None:
    events = decode("ssh-client")
    assert [b.text for b in of(events, SshBanner)] == ["SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10"] * 2
    client, server = of(events, SshKexInit)
    assert "curve25519-sha256" in client.kex and "ssh-ed25519" in server.host_key
    assert "chacha20-poly1305@openssh.com" in client.ciphers and client.macs
    assert [e.direction for e in of(events, Encrypted)][:2] == [S, C]


def test_dns_over_tcp_with_compression() -> None:
    query, answer = of(decode("dns-tcp"), DnsMessage)
    assert (query.id, query.is_response, query.questions[0].name) == (0xBEEF, False, "example.com.")
    assert answer.is_response and answer.rcode == "NOERROR"
    assert [(a.name, a.type, a.data) for a in answer.answers] == [
        ("example.com.", "CNAME", "www.example.net."),
        ("www.example.net.", "A", "93.184.216.34"),
        ("example.com.", "TXT", '"v=spf1 " "-all ok"'),
    ]


_HEADER = bytes.fromhex("1234 8183 0001 0000 0000 0000")  # a response, NXDOMAIN, one question


def test_dns_pointer_loop_is_undecodable_and_udp_keeps_going() -> None:
    looping = _HEADER + b"\x01a\xc0\x0c\x00\x01\x00\x01"  # the name points at itself
    good = _HEADER + b"\x01a\x00\x00\x01\x00\x01"
    events = feed_all(DnsDatagramDecoder(), [(S, looping), (S, good)])
    assert isinstance(events[0], Undecodable) and "pointer" in events[0].reason
    assert isinstance(events[1], DnsMessage) and events[1].rcode == "NXDOMAIN" and events[1].questions[0].name == "a."


def test_dns_aaaa_record() -> None:
    answer = (b"\x00\x01\x81\x80\x00\x00\x00\x01\x00\x00\x00\x00" + b"\x01x\x00" + b"\x00\x1c\x00\x01\x00\x00\x00\x3c\x00\x10"
              + bytes.fromhex("20010db8000000000000000000000001"))
    message = feed_all(DnsDecoder(), [(S, len(answer).to_bytes(2, "big") + answer)])[0]
    assert message.answers == (DnsRecord(name="x.", type="AAAA", cls="IN", ttl=60, data="2001:db8::1"),)
