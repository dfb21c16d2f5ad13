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
from dataclasses import dataclass, replace

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
    exe_cut: int = 0   # bytes of the path the exec event could not carry
    # An exec event carries the first 128 bytes of the path and 256 of argv:
    # /proc may have the rest while the program runs.
    partial: bool = False

    def evidence(self) -> dict:
        return {"pid": self.pid, "ppid": self.ppid, "uid": self.uid, "exe": self.exe,
                **({"exe_cut_bytes": self.exe_cut} if self.exe_cut else {}),
                **self.argv.evidence()}


class ProcessTable:
    def __init__(self, is_subject_uid: Callable[[int], bool]):
        self._is_subject_uid = is_subject_uid
        self._procs: OrderedDict[int, Proc] = OrderedDict()
        self._subjects: set[int] = set()   # pids the kernel reported as subjects
        # Processes read from /proc (the login above a subject, or one older
        # than the witness): asked for on every connection, so kept briefly.
        self._read: ReadCache[int, Proc | None] = ReadCache(READ_TTL_S, MAX_PROCESSES)
        # Chains already built, by (table generation, pid): a client makes
        # many connections, and building its chain again each time was a
        # tenth of the proxy's Python per connection. Any change to the
        # table starts a new generation; reads of /proc stand READ_TTL_S.
        self._chains: ReadCache[tuple[int, int], list[dict]] = ReadCache(READ_TTL_S, 4096)
        self._generation = 0
        self._listeners: list[Callable[[int], None]] = []
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """Changes whenever a process is added or completed: what was built
        from the table before (a chain) may be out of date."""
        return self._generation

    def on_new_generation(self, listener: Callable[[int], None]) -> None:
        """listener(generation) after each change, in order (under the table's
        lock: it must be quick and must not use the table)."""
        with self._lock:
            self._listeners.append(listener)

    def _changed_locked(self) -> None:
        self._generation += 1
        for listener in self._listeners:
            listener(self._generation)

    def _put(self, proc: Proc) -> None:
        with self._lock:
            self._changed_locked()
            self._procs[proc.pid] = proc
            self._procs.move_to_end(proc.pid)
            self._subjects.add(proc.pid)
            while len(self._procs) > MAX_PROCESSES:
                old, _ = self._procs.popitem(last=False)
                self._subjects.discard(old)

    def on_exec(self, ev: ExecEvent) -> None:
        partial = not ev.argv.args or ev.argv.cut > 0 or ev.filename_cut > 0
        self._put(Proc(ev.tgid, ev.ppid, ev.uid, ev.filename, ev.argv, ev.filename_cut,
                       partial))

    def on_fork(self, ev: ForkEvent) -> None:
        parent = self.get(ev.tgid)
        if parent is None:
            self._put(Proc(ev.child_pid, ev.tgid, ev.uid, "", Argv(()), partial=True))
        else:
            self._put(replace(parent, pid=ev.child_pid, ppid=ev.tgid, uid=ev.uid))

    def get(self, pid: int) -> Proc | None:
        with self._lock:
            proc = self._procs.get(pid)
        if proc is not None:
            return self._complete(proc) if proc.partial else proc
        return self._read.get(pid, _from_psutil)

    def _complete(self, proc: Proc) -> Proc:
        """The exec event has the first bytes of the path and of argv only, or
        no argv (the kernel refused the user read): take them from /proc
        while the same program still runs there."""
        live = _from_psutil(proc.pid)
        if live is None or not live.argv.args or not _same_program(proc, live.exe):
            return proc
        full = Proc(proc.pid, proc.ppid, proc.uid, live.exe if proc.exe_cut else proc.exe,
                    live.argv)
        with self._lock:
            if proc.pid in self._procs:
                self._changed_locked()
                self._procs[proc.pid] = full
        return full

    def _is_subject(self, proc: Proc) -> bool:
        return proc.pid in self._subjects or self._is_subject_uid(proc.uid)

    def chain(self, pid: int) -> list[dict]:
        """The process and its ancestors up to the subject's login (first subject
        process whose parent is not one), nearest first. Shared between
        callers: not to be changed."""
        # The generation is read before the build: a change meanwhile makes
        # the next call build again.
        return self._chains.get((self._generation, pid), self._build_chain)

    def _build_chain(self, key: tuple[int, int]) -> list[dict]:
        pid = key[1]
        out: list[dict] = []
        proc = self.get(pid)
        while proc is not None and len(out) < MAX_DEPTH:
            out.append(proc.evidence())
            parent = self.get(proc.ppid) if proc.ppid > 1 else None
            if parent is None or not self._is_subject(parent):
                break
            proc = parent
        return out


def _same_program(proc: Proc, live_exe: str) -> bool:
    """Does /proc's exe name the program the exec event did? A cut path
    must be the start of it."""
    if proc.exe_cut:
        return live_exe.startswith(proc.exe)
    return live_exe == os.path.realpath(proc.exe)


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
