"""The report reads the store once for all its views (review.fold): what it
shows must be what each view's own command shows, session by session."""

from __future__ import annotations

import itertools

from agent.review.report import gather
from agent.review.runs import as_dicts, list_runs
from agent.review.search import digest_sessions
from agent.review.sessions import list_alerts, list_sessions, sorted_alerts
from agent.store import Direction, Kind, StoreWriter

from _streams import load


def _store(path) -> None:
    """Two agent runs, sessions of two protocols open at once over several
    segments, an unclosed one, alerts with and without an ack."""
    w = StoreWriter(path, immutable=False, segment_max_bytes=4000)
    w.append_json(Kind.EVENT, {"event": "agent_start", "pid": 1, "version": "t", "witness": True})
    streams = {5432: load("postgres-psql"), 80: load("http-curl"), 8080: load("http-pipelined")}
    sids = {port: w.append_json(Kind.SESSION_OPEN, {"client": ["10.0.0.1", 40000 + port],
                                                    "original_dst": ["10.0.0.2", port]})
            for port in streams}
    for port, sid in sids.items():
        w.append_json(Kind.SESSION_INFO, {"session": sid, "uid": 1000, "chain": [{"comm": "c", "user": "u"}]})
    for chunks in itertools.zip_longest(*([(sids[p], c) for c in s] for p, s in streams.items())):
        for sid, (direction, data) in filter(None, chunks):
            w.append_data(sid, Direction[direction.name], data)
    w.append_json(Kind.ALERT, {"id": "a1", "type": "bypass", "severity": "high", "summary": "x",
                               "session": sids[80]})
    for port in (5432, 80):
        w.append_json(Kind.SESSION_CLOSE, {"session": sids[port], "reason": "closed"})
    w.append_json(Kind.ACK, {"alert": "a1", "reason": "known"})
    w.append_json(Kind.EVENT, {"event": "sessions_handed_over", "sessions": [sids[8080]]})
    w.append_json(Kind.EVENT, {"event": "agent_stop", "reason": "SIGTERM"})
    w.append_json(Kind.EVENT, {"event": "agent_start", "pid": 2, "version": "t", "witness": False})
    w.append_json(Kind.ALERT, {"id": "a2", "type": "bypass", "severity": "high", "summary": "y"})
    w.close()


def test_the_reports_one_pass_shows_what_each_view_shows(tmp_path):
    _store(tmp_path)
    assert len(list(tmp_path.glob("*.seg"))) > 1        # the views cross segments
    d = gather(str(tmp_path))
    sessions = list_sessions(str(tmp_path))
    assert [s.as_dict() for s in d.sessions] == [s.as_dict() for s in sessions]
    assert [s.state for s in sessions] == ["closed", "closed", "open"]
    assert d.digests == digest_sessions(str(tmp_path), [s.id for s in sessions], keep=5)
    assert {d.digests[s.id].protocol for s in sessions} == {"postgres", "http"}
    assert all(d.digests[s.id].action_count for s in sessions)
    assert d.alerts == sorted_alerts(list_alerts(str(tmp_path)))
    assert [a["ack"] is None for a in d.alerts] == [True, False]
    assert list(as_dicts(d.runs)) == list(as_dicts(list_runs(str(tmp_path))))
    assert [r.stopped for r in d.runs] == ["SIGTERM", None]
    assert d.runs[0].ended(running=False) == "stopped: SIGTERM; 1 open session handed to the next run"
