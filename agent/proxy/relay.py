"""The relay of one session, sans-IO: events in, commands out.

For every chunk the relay yields Record before Send, so a byte reaches a
peer only after it is in the store (DESIGN.md invariant 1); the executor in
server.py may not reorder them. Half-close is explicit: an EOF from one side
becomes a HalfClose of the other, and the session ends when both sides have
finished or one is lost.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.store.format import Direction


class Side(enum.IntEnum):
    CLIENT = 0  # the subject's socket
    SERVER = 1  # our upstream socket to the original destination

    @property
    def other(self) -> "Side":
        return Side(1 - self)


@dataclass(frozen=True, slots=True)
class Record:
    direction: Direction
    data: bytes


@dataclass(frozen=True, slots=True)
class Send:
    to: Side
    data: bytes


@dataclass(frozen=True, slots=True)
class HalfClose:
    to: Side


@dataclass(frozen=True, slots=True)
class Close:
    side: Side
    reset: bool  # RST (the peer sees a reset), not FIN


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str


Command = Record | Send | HalfClose | Close | Finish


class Relay:
    def __init__(self) -> None:
        # Bytes of each side the store holds (recorded()), not merely read:
        # the close record counts what the evidence contains.
        self.bytes = [0, 0]
        self.eof = [False, False]
        self.finished = False

    def data_received(self, side: Side, data: bytes) -> list[Command]:
        if self.finished:
            return []
        return [Record(Direction(side), data), Send(side.other, data)]

    def recorded(self, side: Side, size: int) -> None:
        """A chunk of side's data is in the store."""
        self.bytes[side] += size

    def eof_received(self, side: Side) -> list[Command]:
        if self.finished or self.eof[side]:
            return []
        self.eof[side] = True
        cmds: list[Command] = [HalfClose(side.other)]
        if all(self.eof):
            cmds += [Close(Side.CLIENT, False), Close(Side.SERVER, False)]
            cmds.append(self._finish("closed"))
        return cmds

    def connection_lost(self, side: Side, error: str | None) -> list[Command]:
        """A transport is gone. Clean after its EOF: nothing to do; else cut."""
        if self.finished or (error is None and self.eof[side]):
            return []
        why = error or "closed without EOF"
        return [Close(side.other, True), self._finish(f"{side.name.lower()} lost: {why}")]

    def upstream_failed(self, error: str) -> list[Command]:
        return [Close(Side.CLIENT, True), self._finish(f"upstream failed: {error}")]

    def abort(self, reason: str) -> list[Command]:
        if self.finished:
            return []
        return [Close(Side.CLIENT, True), Close(Side.SERVER, True), self._finish(reason)]

    def _finish(self, reason: str) -> Finish:
        self.finished = True
        return Finish(reason)
