"""`tollgate report --html`: one static page for a reviewer, usable offline.

Self-contained on purpose: inline CSS, an inline SVG timeline, no scripts,
no fonts or images fetched, so the file can be mailed, archived and opened
on an air-gapped machine, and shows the same thing in ten years. Every
recorded string is escaped twice over: control characters (text.clean),
then HTML.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Iterable

from agent.review import attribution
from agent.review.fold import fold
from agent.review.runs import AgentRun, RunFold, as_dicts
from agent.review.search import Digest, DigestFold
from agent.review.sessions import AlertFold, SessionFold, SessionSummary, sorted_alerts
from agent.review.text import address, clean, stamp
from agent.store import VerifyReport, verify

__all__ = ["ReportData", "gather", "render_html"]

# The timeline draws at most this many sessions (the tables list them all).
TIMELINE_ROWS = 200
_WIDTH, _ROW, _LEFT = 1000, 14, 60  # timeline geometry, px
ACTIONS_SHOWN = 5


@dataclass(slots=True)
class ReportData:
    store_dir: str
    generated_ns: int
    sessions: list[SessionSummary]
    digests: dict[int, Digest]
    alerts: list[dict]
    verify: VerifyReport
    runs: list[AgentRun]


def gather(store_dir: str, key: bytes | None = None) -> ReportData:
    """Everything the page shows, read from the store (live: a torn tail is allowed)."""
    sessions, digests, alerts, runs = fold(store_dir, SessionFold(), DigestFold(keep=ACTIONS_SHOWN),
                                           AlertFold(), RunFold())
    return ReportData(store_dir, time.time_ns(), sessions, digests, sorted_alerts(alerts),
                      verify(store_dir, key, allow_torn_tail=True), runs)


def _e(value: object) -> str:
    return html.escape(clean(str(value), newlines=False))


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1b1f24;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
.meta{color:#57606a}.cards{display:flex;gap:12px;margin:16px 0}
.card{border:1px solid #d0d7de;border-radius:6px;padding:10px 16px;min-width:150px}
.card b{display:block;font-size:26px}.ok{color:#1a7f37}.bad{color:#cf222e}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 6px;text-align:left;vertical-align:top;overflow-wrap:break-word}
td.nw{white-space:nowrap}td.wrap{min-width:180px;overflow-wrap:anywhere}
th{background:#f6f8fa}code,.mono{font-family:ui-monospace,monospace;font-size:12px}
tr.new td:first-child{border-left:4px solid #cf222e}ul{margin:0;padding-left:16px}
.sev-critical{color:#cf222e;font-weight:bold}.sev-high{color:#bc4c00;font-weight:bold}
"""


def render_html(d: ReportData) -> str:
    unacked = sum(1 for a in d.alerts if not a["ack"])
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>tollgate review report</title><style>", _CSS, "</style></head><body>",
        "<h1>tollgate review report</h1>",
        f"<div class='meta'>store {_e(d.store_dir)} &middot; generated {_e(stamp(d.generated_ns))}</div>",
        _cards(d, unacked),
        "<h2>Timeline</h2>", _timeline(d.sessions, d.alerts),
        f"<h2 id='alerts'>Alerts ({len(d.alerts)}, {unacked} unacknowledged)</h2>", _alerts(d.alerts),
        f"<h2 id='sessions'>Sessions ({len(d.sessions)})</h2>", _sessions(d.sessions, d.digests),
        f"<h2 id='runs'>Agent runs ({len(d.runs)})</h2>", _runs(d.runs),
        "<h2 id='verify'>Store verification</h2>", _verify(d.verify),
        "</body></html>",
    ]
    return "".join(parts)


def _cards(d: ReportData, unacked: int) -> str:
    status = ("<b class='ok'>OK</b>" if d.verify.ok else "<b class='bad'>NOT OK</b>")
    cards = [
        f"<div class='card'><b id='session-count'>{len(d.sessions)}</b>sessions</div>",
        f"<div class='card'><b>{len(d.alerts)}</b>alerts</div>",
        f"<div class='card'><b class='{'bad' if unacked else 'ok'}'>{unacked}</b>unacknowledged</div>",
        f"<div class='card'>{status}store verify</div>",
    ]
    return "<div class='cards'>" + "".join(cards) + "</div>"


def _table(headers: Iterable[str], rows: Iterable[str]) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _chain_html(chain: list[dict]) -> str:
    if not chain:
        return "<span class='meta'>not attributed</span>"
    return "<br>".join(f"<span class='mono'>{_e(line)}</span>" for line in attribution.detail_lines(chain))


def _alerts(alerts: list[dict]) -> str:
    if not alerts:
        return "<p class='meta'>No alerts.</p>"
    rows = []
    for a in alerts:
        ack = a["ack"]
        status = (f"acked by {_e((ack.get('by') or {}).get('user', '?'))}: {_e(ack.get('reason', ''))}"
                  if ack else "<b>NEW</b>")
        rows.append(
            f"<tr class='{'' if ack else 'new'}'><td class='mono nw'>{_e(a['id'])}</td>"
            f"<td class='nw'>{_e(stamp(a['time_ns']))}</td><td class='nw sev-{_e(a['severity'])}'>{_e(a['severity'])}</td>"
            f"<td class='nw'>{_e(a['type'])}</td><td>{_e(a['summary'])}</td><td>{status}</td>"
            f"<td class='wrap'>{_chain_html(a['chain'])}<div class='meta'>from {_e(a['chain_source'])}</div></td></tr>")
    return _table(["ID", "Time", "Severity", "Type", "Summary", "Status", "Process chain (login first)"], rows)


def _sessions(sessions: list[SessionSummary], digests: dict[int, Digest]) -> str:
    if not sessions:
        return "<p class='meta'>No sessions.</p>"
    rows = []
    for s in sessions:
        dg = digests.get(s.id) or Digest()
        did = "".join(f"<li class='mono'>{_e(a[:200])}</li>" for a in dg.actions)
        more = f"<div class='meta'>{dg.action_count} in all</div>" if dg.action_count > len(dg.actions) else ""
        rows.append(
            f"<tr><td class='nw'>{s.id}</td><td class='nw'>{_e(stamp(s.start_ns))}</td><td class='nw'>{_e(s.subject)}</td>"
            f"<td class='mono nw'>{_e(address(s.original_dst))}</td>"
            f"<td class='nw'>{_e(dg.protocol if dg.protocol != '-' else s.protocol)}</td>"
            f"<td class='nw'>{s.bytes[0]} / {s.bytes[1]}</td><td>{_e(s.state)}</td>"
            f"<td class='wrap'>{_chain_html(s.chain)}</td><td class='wrap'><ul>{did}</ul>{more}</td></tr>")
    return _table(["ID", "Start", "Subject", "Destination", "Protocol", "Bytes sent / received", "State",
                    "Process chain (login first)", "What the subject asked"], rows)


def _runs(runs: list[AgentRun]) -> str:
    """When recording held and with what; a run that lacked the witness or
    the seals is marked, as is one that ended without a stop record."""
    if not runs:
        return "<p class='meta'>No agent start recorded.</p>"
    rows = []
    for run, d in zip(runs, as_dicts(runs)):
        lacks = d["gaps"] + ([d["ended"]] if run.stopped is None else [])
        said = "<br>".join(f"<span class='bad'>{_e(g)}</span>" for g in lacks) or "<span class='ok'>—</span>"
        rows.append(
            f"<tr class='{'new' if lacks else ''}'><td class='nw'>{_e(stamp(d['started_ns']))}</td>"
            f"<td class='nw'>{_e(stamp(d['last_record_ns']))}</td><td>{_e(d['ended'])}</td>"
            f"<td class='nw'>{_e(d['version'])}</td><td class='nw'>{_e(d['witness'])}</td>"
            f"<td class='nw'>{_e(d['sealed'])}</td><td class='nw'>{_e(d['durability'])}</td>"
            f"<td class='nw'>{_e(d['data_plane'])}</td><td>{said}</td></tr>")
    return (_table(["Started", "Last record", "Ended", "Version", "Witness", "Sealed", "Durability",
                    "Data plane", "Lacked"], rows)
            + "<p class='meta'>Between runs the rules stay in the kernel: the subjects were "
              "refused, not unrecorded.</p>")


def _timeline(sessions: list[SessionSummary], alerts: list[dict]) -> str:
    shown = sessions[-TIMELINE_ROWS:]
    times = [s.start_ns for s in shown] + [s.end_ns for s in shown if s.end_ns] + [a["time_ns"] for a in alerts]
    if not times:
        return "<p class='meta'>Nothing recorded yet.</p>"
    t0, t1 = min(times), max(times)
    x = lambda t: _LEFT + (t - t0) / max(t1 - t0, 1) * (_WIDTH - _LEFT - 10)
    svg = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{_WIDTH}' height='{40 + _ROW * (len(shown) + 1)}' "
           "role='img' aria-label='timeline'>",
           f"<text x='0' y='12' font-size='11'>{_e(stamp(t0))}</text>",
           f"<text x='{_WIDTH}' y='12' font-size='11' text-anchor='end'>{_e(stamp(t1))}</text>",
           "<text x='0' y='32' font-size='11'>alerts</text>"]
    for a in alerts:
        svg.append(f"<circle cx='{x(a['time_ns']):.1f}' cy='28' r='5' fill='{'#8c959f' if a['ack'] else '#cf222e'}'>"
                   f"<title>{_e(a['type'])}: {_e(a['summary'])}</title></circle>")
    svg += [_bar(s, 40 + _ROW * i, x(s.start_ns), x(s.end_ns or t1)) for i, s in enumerate(shown)]
    note = (f"<p class='meta'>The last {TIMELINE_ROWS} of {len(sessions)} sessions are drawn.</p>"
            if len(sessions) > TIMELINE_ROWS else "")
    return "".join(svg) + "</svg>" + note


def _bar(s: SessionSummary, y: int, start: float, end: float) -> str:
    """One session's row: its id, and a bar from open to close (green while open)."""
    return (f"<text x='0' y='{y + 10}' font-size='10'>#{s.id}</text>"
            f"<rect x='{start:.1f}' y='{y}' width='{max(end - start, 2):.1f}' height='{_ROW - 4}' "
            f"fill='{'#0969da' if s.close else '#1a7f37'}'>"
            f"<title>#{s.id} {_e(address(s.original_dst))} {_e(s.protocol)}</title></rect>")


def _verify(r: VerifyReport) -> str:
    seals = f"{r.seals} seals, sealed up to seq {r.sealed_upto}" if r.seals else "no seals"
    keyed = "seal MACs checked with the verification key" if r.keyed else "seal MACs NOT checked (no --key)"
    lines = [f"<p class='{'ok' if r.ok else 'bad'}'><b>{'OK' if r.ok else 'NOT OK'}</b></p><ul>",
             f"<li>records {r.first_seq}..{r.last_seq} ({r.records} records, {r.bytes} bytes, "
             f"{len(r.segments)} segments)</li>",
             f"<li>{_e(seals)}; {r.unsealed_records} records after the last seal; {_e(keyed)}</li>"]
    if r.gc_before is not None:
        lines.append(f"<li>records before seq {r.gc_before} removed by a recorded gc</li>")
    lines += [f"<li class='bad'>FAILED at {_e(f.segment)} offset {f.offset} seq {f.seq}: {_e(f.reason)}</li>"
              for f in r.failures]
    return "".join(lines) + "</ul>"
