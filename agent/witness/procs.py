"""Process chains for evidence: exe + argv from the subject's login down.

Built from exec and fork events as they arrive (so a process that connected
and exited at once still has a chain), falling back to psutil for processes
that started before the witness. Bounded: the oldest entries go first.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from agent.proctext import Argv, fs_text, read_argv
from agent.readcache import READ_TTL_S, ReadCache
from agent.witness.events import ExecEvent, ForkEvent

MAX_PROCESSES = 16384
MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    ppid: int
    uid: int
    exe: str
    argv: Argv
    # The exec event's argv is its first 256 bytes: /proc may still have more.
    argv_short: bool = False

    def evidence(self) -> dict:
        return {"pid": self.pid, "ppid": self.ppid, "uid": self.uid, "exe": self.exe,
                **self.argv.evidence()}


class ProcessTable:
    def __init__(self, is_subject_uid: Callable[[int], bool]):
        self._is_subject_uid = is_subject_uid
        self._procs: OrderedDict[int, Proc] = OrderedDict()
        self._subjects: set[int] = set()   # pids the kernel reported as subjects
        # Processes read from /proc (the login above a subject, or one older
        # than the witness): asked for on every connection, so kept briefly.
        self._read: ReadCache[int, Proc | None] = ReadCache(READ_TTL_S, MAX_PROCESSES)
        self._lock = threading.Lock()

    def _put(self, proc: Proc) -> None:
        with self._lock:
            self._procs[proc.pid] = proc
            self._procs.move_to_end(proc.pid)
            self._subjects.add(proc.pid)
            while len(self._procs) > MAX_PROCESSES:
                old, _ = self._procs.popitem(last=False)
                self._subjects.discard(old)

    def on_exec(self, ev: ExecEvent) -> None:
        short = not ev.argv.args or ev.argv.cut > 0
        self._put(Proc(ev.tgid, ev.ppid, ev.uid, ev.filename, ev.argv, short))

    def on_fork(self, ev: ForkEvent) -> None:
        parent = self.get(ev.tgid)
        if parent is None:
            self._put(Proc(ev.child_pid, ev.tgid, ev.uid, "", Argv(()), True))
        else:
            self._put(Proc(ev.child_pid, ev.tgid, ev.uid, parent.exe, parent.argv,
                           parent.argv_short))

    def get(self, pid: int) -> Proc | None:
        with self._lock:
            proc = self._procs.get(pid)
        if proc is not None:
            return self._complete(proc) if proc.argv_short else proc
        return self._read.get(pid, _from_psutil)

    def _complete(self, proc: Proc) -> Proc:
        """The exec event has argv's first bytes only, or none (the kernel
        refused the user read): take it from /proc while the same program
        still runs there."""
        live = _from_psutil(proc.pid)
        if live is None or not live.argv.args or live.exe != os.path.realpath(proc.exe):
            return proc
        full = Proc(proc.pid, proc.ppid, proc.uid, proc.exe, live.argv)
        with self._lock:
            if proc.pid in self._procs:
                self._procs[proc.pid] = full
        return full

    def _is_subject(self, proc: Proc) -> bool:
        return proc.pid in self._subjects or self._is_subject_uid(proc.uid)

    def chain(self, pid: int) -> list[dict]:
        """The process and its ancestors up to the subject's login (first subject
        process whose parent is not one), nearest first."""
        out: list[dict] = []
        proc = self.get(pid)
        while proc is not None and len(out) < MAX_DEPTH:
            out.append(proc.evidence())
            parent = self.get(proc.ppid) if proc.ppid > 1 else None
            if parent is None or not self._is_subject(parent):
                break
            proc = parent
        return out


def _from_psutil(pid: int) -> Proc | None:
    argv = read_argv(pid)
    if argv is None:
        return None
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return Proc(pid, p.ppid(), p.uids().real, fs_text(p.exe() or p.name()), argv)
    except (psutil.Error, OSError):
        return None
