"""A session that went on across an agent restart (agent/proxy/handover.py)
replays whole, with the restart shown where it happened: a reviewer sees
why the conversation paused, and that it is one connection."""

from __future__ import annotations

from agent.review.replay import json_document, render_decoded, render_hex, render_text
from agent.review.sessions import session_records
from agent.store import Direction, Kind, StoreWriter


def _store(path) -> tuple[int, int]:
    w = StoreWriter(path, immutable=False)
    sid = w.append_json(Kind.SESSION_OPEN, {"client": ["10.0.0.1", 40000], "original_dst": ["10.0.0.2", 6379]})
    other = w.append_json(Kind.SESSION_OPEN, {"client": ["10.0.0.1", 40001], "original_dst": ["10.0.0.2", 6379]})
    w.append_data(sid, Direction.CLIENT, b"PING\r\n")
    w.append_data(sid, Direction.SERVER, b"+PONG\r\n")
    w.append_json(Kind.EVENT, {"event": "sessions_handed_over", "sessions": [sid, other],
                               "pending": {str(other): [0, 9], str(sid): [5, 0]}})
    w.append_json(Kind.EVENT, {"event": "agent_stop", "reason": "SIGTERM"})
    w.append_json(Kind.EVENT, {"event": "agent_start", "pid": 2})
    w.append_json(Kind.EVENT, {"event": "sessions_resumed", "sessions": [other], "not_resumed": [sid]})
    w.append_json(Kind.EVENT, {"event": "sessions_resumed", "sessions": [sid], "not_resumed": []})
    w.append_data(sid, Direction.CLIENT, b"ECHO hi\r\n")
    w.append_data(sid, Direction.SERVER, b"$2\r\nhi\r\n")
    w.append_json(Kind.SESSION_CLOSE, {"session": sid, "reason": "closed"})
    w.close()
    return sid, other


def test_the_restart_shows_where_it_happened(tmp_path):
    sid, _ = _store(tmp_path)
    lines = list(render_decoded(session_records(str(tmp_path), sid)))
    text = "\n".join(lines)
    at = [text.index(s) for s in ("PING", "handed to the next run", "goes on through this run",
                                  "ECHO", "close (closed)")]
    assert at == sorted(at), text
    assert text.count("goes on through this run") == 1          # not the other session's
    assert "(5 bytes to the server and 0 to the client, recorded before the stop" in text
    for view in (render_text, render_hex):
        assert "handed to the next run" in "\n".join(view(session_records(str(tmp_path), sid)))
    events = [e["type"] for e in json_document(session_records(str(tmp_path), sid))["events"]]
    assert events.count("handedover") == 2
