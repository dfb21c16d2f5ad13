"""The agent's runs, from its own start and stop records: when recording
held, with which guarantees (the kernel witness on, the store sealed, the
durability), and how each run ended. A run with no stop record was killed
or crashed; its last record says how far it got, not counting what came
after it that the agent cannot have written: a torn tail's RECOVERED (the
next writer's) or a record a command wrote while no agent ran (`offline`).
Between runs the rules stay in the kernel, so the subjects were refused,
not unrecorded, unless the run stopped with them removed (`tollgate rules
remove`), which it says; sessions open at a restart went on through the
next run (handed over, which it also says)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from agent.review.fold import fold
from agent.store import Kind, Record

__all__ = ["AgentRun", "RunFold", "as_dicts", "list_runs"]


@dataclass(slots=True)
class AgentRun:
    started_ns: int
    pid: int | None
    version: str
    # None: recorded by a version that did not say.
    witness: bool | None
    sealed: bool | None
    durability: str | None
    data_plane: str | None
    last_record_ns: int
    stopped: str | None = None           # the stop's reason; None: no stop record
    rules_left_in_place: bool | None = None
    handed_over: int = 0                 # sessions it left open for the next run
    gaps: list[str] = field(default_factory=list)   # what this run lacked

    def ended(self, running: bool) -> str:
        if self.stopped is not None:
            handed = (f"; {self.handed_over} open session{'s' if self.handed_over > 1 else ''} "
                      "handed to the next run") if self.handed_over else ""
            return f"stopped: {self.stopped}{handed}"
        return "no stop record yet (running, or killed)" if running else \
            "no stop record (killed or crashed)"


def _start(ts_ns: int, j: dict) -> AgentRun:
    run = AgentRun(ts_ns, j.get("pid"), str(j.get("version", "?")), j.get("witness"),
                   j.get("sealed"), j.get("durability"), j.get("data_plane"), ts_ns)
    if run.witness is False:
        run.gaps.append("witness off: bypasses were not watched for")
    if run.sealed is False:
        run.gaps.append("store not sealed")
    return run


# Kinds a command writes too (control.append_offline), which say so.
_ALSO_OFFLINE = frozenset({Kind.EVENT, Kind.ALERT, Kind.ACCESS, Kind.ACK})


def _not_the_agents(r: Record) -> bool:
    """Whether a record shows the run before it had ended: the next writer's
    RECOVERED after a crash, or a command's record with no agent running."""
    return r.kind == Kind.RECOVERED or (r.kind in _ALSO_OFFLINE and r.json().get("offline") is True)


def _stop(run: AgentRun, j: dict) -> None:
    run.stopped = str(j.get("reason", ""))
    run.rules_left_in_place = j.get("rules_left_in_place")
    if run.rules_left_in_place is False:
        run.gaps.append("stopped with the rules removed: the subjects were free until the next start")


class RunFold:
    """Every run the store holds, oldest first."""

    def __init__(self) -> None:
        self.runs: list[AgentRun] = []
        self._alive: AgentRun | None = None     # the run whose records these may still be

    def add(self, r: Record) -> None:
        if self._alive is not None and _not_the_agents(r):
            self._alive = None
        # A segment's first record is written just before the record that
        # needs it, and also when a command opens the store: not evidence.
        if self._alive is not None and r.kind != Kind.SEGMENT_START:
            self._alive.last_record_ns = r.ts_ns
        if r.kind != Kind.EVENT:
            return
        j = r.json()
        if j.get("event") == "agent_start":
            self._alive = _start(r.ts_ns, j)
            self.runs.append(self._alive)
        elif j.get("event") == "sessions_handed_over" and self._alive is not None:
            self._alive.handed_over += len(j.get("sessions") or ())
        elif j.get("event") == "agent_stop" and self._alive is not None:
            _stop(self._alive, j)
            self._alive = None

    def result(self) -> list[AgentRun]:
        return self.runs


def list_runs(store_dir: str) -> list[AgentRun]:
    """Every run the store holds, oldest first (live: a torn tail is allowed)."""
    return fold(store_dir, RunFold())[0]


def as_dicts(runs: list[AgentRun]) -> Iterator[dict]:
    """The runs as `tollgate runs --json` and the tables show them; only the
    last one may still be running."""
    for i, run in enumerate(runs):
        yield {"started_ns": run.started_ns, "last_record_ns": run.last_record_ns,
               "ended": run.ended(running=i == len(runs) - 1), "pid": run.pid,
               "version": run.version, "witness": run.witness, "sealed": run.sealed,
               "durability": run.durability, "data_plane": run.data_plane,
               "rules_left_in_place": run.rules_left_in_place,
               "handed_over": run.handed_over, "gaps": run.gaps}
