"""TLS records up to the point they turn encrypted.

Visible in the clear: ClientHello (SNI, ALPN, supported versions), ServerHello
(version, cipher), and in TLS 1.2 and older the server Certificate. A
direction turns ENCRYPTED at its ChangeCipherSpec or first application-data
record (TLS 1.3 sends the rest of its handshake as application data), and
from there only byte counts are reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import (
    Decoder, Direction, Error, Event, Malformed, Message, Mode, Reader, text,
)

__all__ = ["TlsDecoder", "TlsClientHello", "TlsServerHello", "TlsCertificate", "der_subject"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsClientHello(Event):
    sni: str | None
    alpn: tuple[str, ...]
    versions: tuple[str, ...]
    ciphers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsServerHello(Event):
    version: str
    cipher: str
    alpn: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsCertificate(Event):
    subject: str
    issuer: str


_CHANGE_CIPHER_SPEC, _ALERT, _HANDSHAKE, _APPLICATION_DATA, _HEARTBEAT = 20, 21, 22, 23, 24
_MAX_RECORD = (1 << 14) + 2048
_VERSIONS = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2", 0x0304: "TLS 1.3"}
_CIPHERS = {
    0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384", 0x1303: "TLS_CHACHA20_POLY1305_SHA256",
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", 0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", 0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", 0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    0x009C: "TLS_RSA_WITH_AES_128_GCM_SHA256", 0x009D: "TLS_RSA_WITH_AES_256_GCM_SHA384",
    0x009E: "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", 0x009F: "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    0x00FF: "TLS_EMPTY_RENEGOTIATION_INFO_SCSV",
}
_HANDSHAKE_NAMES = {
    0: "HelloRequest", 4: "NewSessionTicket", 8: "EncryptedExtensions", 12: "ServerKeyExchange",
    13: "CertificateRequest", 14: "ServerHelloDone", 15: "CertificateVerify", 16: "ClientKeyExchange",
    20: "Finished", 22: "CertificateStatus",
}
_ALERTS = {
    0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 40: "handshake_failure",
    42: "bad_certificate", 45: "certificate_expired", 46: "certificate_unknown", 47: "illegal_parameter",
    48: "unknown_ca", 50: "decode_error", 51: "decrypt_error", 70: "protocol_version", 80: "internal_error",
    86: "inappropriate_fallback", 90: "user_canceled", 112: "unrecognized_name", 120: "no_application_protocol",
}
_EXT_SNI, _EXT_ALPN, _EXT_SUPPORTED_VERSIONS = 0, 16, 43
# X.520 attribute OIDs (DER content bytes) -> short names, for subjects.
_OIDS = {
    b"\x55\x04\x03": "CN", b"\x55\x04\x06": "C", b"\x55\x04\x07": "L", b"\x55\x04\x08": "ST",
    b"\x55\x04\x0a": "O", b"\x55\x04\x0b": "OU", b"\x2a\x86\x48\x86\xf7\x0d\x01\x09\x01": "emailAddress",
}


def _grease(value: int) -> bool:
    """RFC 8701 GREASE values are noise a client adds on purpose."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


def _version(value: int) -> str:
    return _VERSIONS.get(value, f"0x{value:04x}")


def _cipher(value: int) -> str:
    return _CIPHERS.get(value, f"0x{value:04x}")


def _extensions(r: Reader) -> dict[int, Reader]:
    found: dict[int, Reader] = {}
    if r.remaining == 0:
        return found
    block = r.sub(r.u16())
    while block.remaining:
        kind = block.u16()
        found[kind] = block.sub(block.u16())
    return found


def _names(r: Reader, length_bytes: int, item_length_bytes: int) -> tuple[str, ...]:
    block = r.sub(r.uint(length_bytes))
    out = []
    while block.remaining:
        out.append(text(block.vec(item_length_bytes)))
    return tuple(out)


def _sni(r: Reader) -> str | None:
    block = r.sub(r.u16())
    while block.remaining:
        kind, name = block.u8(), block.vec(2)
        if kind == 0:
            return text(name)
    return None


class TlsDecoder(Decoder):
    name = "tls"

    def __init__(self) -> None:
        super().__init__()
        # Handshake messages may span records and records may hold several.
        self._handshake = {d: bytearray() for d in Direction}

    def _step(self, direction: Direction, buf: bytearray, pos: int) -> int:
        head = Reader(buf, pos, streaming=True)
        kind, version, length = head.u8(), head.u16(), head.u16()
        if kind not in (_CHANGE_CIPHER_SPEC, _ALERT, _HANDSHAKE, _APPLICATION_DATA, _HEARTBEAT):
            raise Malformed(f"record type {kind}")
        if version >> 8 != 3 or length > _MAX_RECORD:
            raise Malformed(f"record version 0x{version:04x} length {length}")
        body = head.sub(length)  # raises Incomplete until the record is all here
        if kind == _HANDSHAKE:
            self._handshake[direction] += body.rest()
            self._parse_handshakes(direction)
        elif kind == _ALERT:
            self._parse_alert(direction, body)
        elif kind == _CHANGE_CIPHER_SPEC:
            self._emit(Message(direction=direction, name="ChangeCipherSpec"))
            self._set_mode(direction, Mode.ENCRYPTED)
        elif kind == _APPLICATION_DATA:
            # TLS 1.3 hides the rest of its handshake here: count from this record on.
            self._set_mode(direction, Mode.ENCRYPTED)
            return 0
        else:
            self._emit(Message(direction=direction, name="Heartbeat"))
        return 5 + length

    def _parse_alert(self, direction: Direction, r: Reader) -> None:
        level, code = r.u8(), r.u8()
        name = _ALERTS.get(code, str(code))
        self._emit(Error(direction=direction, message=f"{'fatal' if level == 2 else 'warning'} alert: {name}", code=str(code)))

    def _parse_handshakes(self, direction: Direction) -> None:
        pending = self._handshake[direction]
        while len(pending) >= 4:
            length = int.from_bytes(pending[1:4], "big")
            if len(pending) < 4 + length:
                return
            kind, body = pending[0], Reader(bytes(pending[4 : 4 + length]))
            del pending[: 4 + length]
            self._parse_handshake(direction, kind, body)

    def _parse_handshake(self, direction: Direction, kind: int, r: Reader) -> None:
        if kind == 1:
            self._parse_client_hello(direction, r)
        elif kind == 2:
            self._parse_server_hello(direction, r)
        elif kind == 11:
            self._parse_certificate(direction, r)
        else:
            self._emit(Message(direction=direction, name=_HANDSHAKE_NAMES.get(kind, f"handshake {kind}")))

    def _parse_client_hello(self, direction: Direction, r: Reader) -> None:
        legacy = r.u16()
        r.take(32)  # random
        r.vec(1)  # session id
        suites = r.sub(r.u16())
        ciphers = [suites.u16() for _ in range(suites.remaining // 2)]
        r.vec(1)  # compression methods
        ext = _extensions(r)
        versions = [legacy]
        if _EXT_SUPPORTED_VERSIONS in ext:
            block = ext[_EXT_SUPPORTED_VERSIONS].sub(ext[_EXT_SUPPORTED_VERSIONS].u8())
            versions = [block.u16() for _ in range(block.remaining // 2)]
        self._emit(
            TlsClientHello(
                direction=direction,
                sni=_sni(ext[_EXT_SNI]) if _EXT_SNI in ext else None,
                alpn=_names(ext[_EXT_ALPN], 2, 1) if _EXT_ALPN in ext else (),
                versions=tuple(_version(v) for v in versions if not _grease(v)),
                ciphers=tuple(_cipher(c) for c in ciphers if not _grease(c)),
            )
        )

    def _parse_server_hello(self, direction: Direction, r: Reader) -> None:
        version = r.u16()
        r.take(32)
        r.vec(1)
        cipher = r.u16()
        r.u8()  # compression
        ext = _extensions(r)
        if _EXT_SUPPORTED_VERSIONS in ext:
            version = ext[_EXT_SUPPORTED_VERSIONS].u16()
        alpn = _names(ext[_EXT_ALPN], 2, 1) if _EXT_ALPN in ext else ()
        self._emit(TlsServerHello(direction=direction, version=_version(version), cipher=_cipher(cipher), alpn=alpn[0] if alpn else None))

    def _parse_certificate(self, direction: Direction, r: Reader) -> None:
        chain = r.sub(r.uint(3))
        if not chain.remaining:
            self._emit(Message(direction=direction, name="Certificate", fields=(("chain", "empty"),)))
            return
        subject, issuer = der_subject(chain.vec(3))
        self._emit(TlsCertificate(direction=direction, subject=subject, issuer=issuer))


# -- minimal DER: enough to read a certificate's subject and issuer -------------


def _der(r: Reader) -> tuple[int, Reader]:
    tag, length = r.u8(), r.u8()
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise Malformed("DER length")
        length = r.uint(count)
    return tag, r.sub(length)


def _der_name(r: Reader) -> str:
    parts = []
    while r.remaining:
        _, rdn = _der(r)  # SET
        while rdn.remaining:
            _, pair = _der(rdn)  # SEQUENCE { OID, value }
            _, oid = _der(pair)
            _, value = _der(pair)
            key = oid.rest()
            parts.append(f"{_OIDS.get(key, key.hex())}={text(value.rest())}")
    return ", ".join(parts)


def der_subject(cert: bytes) -> tuple[str, str]:
    """(subject, issuer) of a DER X.509 certificate, as ``O=..., CN=...`` strings."""
    _, certificate = _der(Reader(cert))
    _, tbs = _der(certificate)
    if tbs.remaining and tbs.data[tbs.pos] == 0xA0:  # [0] EXPLICIT version
        _der(tbs)
    for _ in range(2):  # serialNumber, signature algorithm
        _der(tbs)
    issuer = _der_name(_der(tbs)[1])
    _der(tbs)  # validity
    subject = _der_name(_der(tbs)[1])
    return subject, issuer
