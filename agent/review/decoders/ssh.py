"""SSH transport (RFC 4253) up to NEWKEYS.

Each side sends an identification line ``SSH-2.0-...`` (a server may send
other lines first), then binary packets ``uint32 length, byte padding,
payload, padding`` with no MAC until keys are in use. KEXINIT's name-lists
are decoded; after a side's NEWKEYS its bytes are encrypted.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Decoder, Direction, Event, Malformed, Message, Mode, Reader, text

__all__ = ["SshDecoder", "SshBanner", "SshKexInit"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SshBanner(Event):
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SshKexInit(Event):
    kex: tuple[str, ...]
    host_key: tuple[str, ...]
    ciphers: tuple[str, ...]  # client-to-server list (the other way is almost always the same)
    macs: tuple[str, ...]
    compression: tuple[str, ...]


_MAX_PACKET = 35000  # RFC 4253 section 6.1
_MAX_LINE = 8192
_KEXINIT, _NEWKEYS = 20, 21
_NAMES = {
    1: "DISCONNECT", 2: "IGNORE", 3: "UNIMPLEMENTED", 4: "DEBUG", 5: "SERVICE_REQUEST", 6: "SERVICE_ACCEPT",
    7: "EXT_INFO", 30: "KEX_ECDH_INIT", 31: "KEX_ECDH_REPLY", 32: "KEX_DH_GEX_INIT", 33: "KEX_DH_GEX_REPLY",
    34: "KEX_DH_GEX_REQUEST",
}


def _name_list(r: Reader) -> tuple[str, ...]:
    raw = text(r.vec(4))
    return tuple(raw.split(",")) if raw else ()


class SshDecoder(Decoder):
    name = "ssh"

    def __init__(self) -> None:
        super().__init__()
        self._banner_seen = {d: False for d in Direction}

    def _step(self, direction: Direction, buf: bytearray, pos: int) -> int:
        if not self._banner_seen[direction]:
            return self._parse_line(direction, buf, pos)
        head = Reader(buf, pos, streaming=True)
        length = head.u32()
        if not 5 <= length <= _MAX_PACKET:
            raise Malformed(f"packet length {length}")
        packet = head.sub(length)
        padding = packet.u8()
        if padding < 4 or padding >= length:
            raise Malformed(f"padding length {padding}")
        self._parse_payload(direction, packet.sub(length - 1 - padding))
        return 4 + length

    def _parse_line(self, direction: Direction, buf: bytearray, pos: int) -> int:
        end = buf.find(b"\n", pos, pos + _MAX_LINE)
        if end < 0:
            if len(buf) - pos >= _MAX_LINE:
                raise Malformed("identification line too long")
            return 0
        line = text(bytes(buf[pos:end]).rstrip(b"\r"))
        if line.startswith("SSH-"):
            self._banner_seen[direction] = True
            self._emit(SshBanner(direction=direction, text=line))
        else:
            self._emit(Message(direction=direction, name="PreBannerLine", fields=(("text", line),)))
        return end + 1 - pos

    def _parse_payload(self, direction: Direction, r: Reader) -> None:
        kind = r.u8()
        if kind == _KEXINIT:
            r.take(16)  # cookie
            lists = [_name_list(r) for _ in range(10)]
            self._emit(
                SshKexInit(
                    direction=direction, kex=lists[0], host_key=lists[1], ciphers=lists[2], macs=lists[4],
                    compression=lists[6],
                )
            )
        elif kind == _NEWKEYS:
            self._emit(Message(direction=direction, name="NEWKEYS"))
            self._set_mode(direction, Mode.ENCRYPTED)
        else:
            self._emit(Message(direction=direction, name=_NAMES.get(kind, f"message {kind}")))
