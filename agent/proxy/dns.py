"""The DNS recorder: the subject's UDP port 53 is redirected here; each query
and its answer are recorded as a session (open, query bytes, answer bytes,
close) and forwarded to the configured resolver. Recorded before forwarded,
like the TCP relay; a malformed datagram is recorded and forwarded verbatim.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Awaitable, Callable

from agent.proxy.origdst import plain_ip
from agent.store.format import Direction, Kind

log = logging.getLogger("tollgate.dns")
DNS_TIMEOUT_S = 5.0


def system_resolver(path: str = "/etc/resolv.conf") -> str | None:
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    return parts[1]
    except OSError:
        pass
    return None


class DnsRecorder(asyncio.DatagramProtocol):
    def __init__(self, store, resolver: str, attribute: Callable[..., Awaitable[dict]],
                 on_store_error: Callable[[Exception], None]) -> None:
        self.store, self.resolver = store, resolver
        self.attribute, self.on_store_error = attribute, on_store_error
        self.transport: asyncio.DatagramTransport | None = None
        self.stats = {"queries": 0, "answered": 0, "timeouts": 0}

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.stats["queries"] += 1
        asyncio.get_running_loop().create_task(self._exchange(data, addr))

    async def _exchange(self, query: bytes, addr) -> None:
        client = (plain_ip(addr[0]), addr[1])
        dst = (self.resolver, 53)
        try:
            sid = self.store.append_json(Kind.SESSION_OPEN, {
                "client": client, "original_dst": dst, "protocol": "dns/udp",
                "time_ns": time.time_ns()})
            info = await self.attribute(client, dst)
            self.store.append_json(Kind.SESSION_INFO, {"session": sid, **info})
            self.store.append_data(sid, Direction.CLIENT, query)
        except Exception as e:
            self.on_store_error(e)
            return
        answer, reason = await self._ask(query)
        try:
            if answer is not None:
                self.store.append_data(sid, Direction.SERVER, answer)
            self.store.append_json(Kind.SESSION_CLOSE, {
                "session": sid, "reason": reason, "client_bytes": len(query),
                "server_bytes": len(answer or b"")})
        except Exception as e:
            self.on_store_error(e)
            return
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)
            self.stats["answered"] += 1

    async def _ask(self, query: bytes) -> tuple[bytes | None, str]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        class Once(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                if not fut.done():
                    fut.set_result(data)

            def error_received(self, exc):
                if not fut.done():
                    fut.set_exception(exc)
        transport, _ = await loop.create_datagram_endpoint(Once, remote_addr=(self.resolver, 53))
        try:
            transport.sendto(query)
            return await asyncio.wait_for(fut, DNS_TIMEOUT_S), "closed"
        except asyncio.TimeoutError:
            self.stats["timeouts"] += 1
            return None, "resolver timeout"
        except OSError as e:
            return None, f"resolver failed: {e.strerror or e}"
        finally:
            transport.close()


async def listen(addresses: tuple[str, ...], port: int,
                 make: Callable[[], DnsRecorder]) -> list[DnsRecorder]:
    """One recorder per address: an answer must leave by the socket the
    query came in on, or conntrack cannot map it back to the subject."""
    loop = asyncio.get_running_loop()
    recorders = []
    for addr in addresses:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        try:
            _, rec = await loop.create_datagram_endpoint(make, local_addr=(addr, port),
                                                         family=family)
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on [{addr}]:{port}/udp: {e.strerror}") from None
        recorders.append(rec)
    return recorders
