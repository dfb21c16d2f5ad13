"""The figures of one run and the table printed from them."""

from __future__ import annotations

from dataclasses import dataclass, field

BASELINES = ("direct", "socat", "haproxy")
# Every row label the table prints, in order (the smoke test checks them all).
ROWS = ("bulk 1 conn", "bulk 8 conns", "latency p50", "latency p99",
        "latency p50, guest halt polling", "latency p99, guest halt polling", "connection rate",
        "witness cost", "bypass detection", "agent RSS", "store append", "tollgate verify",
        "shipper", "machine: BLAKE3", "machine: page-cache writes", "machine: disk writes",
        "relay CPU per MB", "relay CPU per round trip", "relay CPU per connection")


# The ping-pong as the host is, then again with the guest's halt polling on
# (bench/run.py, guest_halt_polling): the same target for both.
POLLING = "_poll"   # the halt-polling rounds' row keys: rtt_p50 + POLLING
LATENCY_ROWS = (("rtt_p50", "latency p50"), ("rtt_p99", "latency p99"),
                ("rtt_p50" + POLLING, "latency p50, guest halt polling"),
                ("rtt_p99" + POLLING, "latency p99, guest halt polling"))


@dataclass
class Results:
    machine: dict
    command: str
    scale: dict
    figures: dict[str, dict[str, float | str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def put(self, row: str, col: str, value: float | str) -> None:
        self.figures.setdefault(row, {})[col] = value

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_json(self) -> dict:
        return {"machine": self.machine, "command": self.command, "scale": self.scale,
                "figures": self.figures, "notes": self.notes, "seconds": self.seconds}


def _num(v) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _signed(v) -> str:
    """+12.3 or -4.5: an added latency can be negative when a baseline's p99 is noise."""
    return f"+{_num(v)}" if isinstance(v, (int, float)) and v >= 0 else _num(v)


def ratio(a, b) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return None


def _verdict(r: float | None, target: float, higher_is_better: bool) -> str:
    if r is None:
        return "n/a"
    return "yes" if (r >= target if higher_is_better else r <= target) else "MISSED"


def _tollgate_cols(fig: dict) -> list[str]:
    return [c for c in fig if c.startswith("tollgate")]


def rows(res: Results) -> list[list[str]]:
    f = res.figures
    out: list[list[str]] = []

    def base(row: str) -> list[str]:
        return [_num(f.get(row, {}).get(b)) for b in BASELINES]

    for key, label in (("bulk1", "bulk 1 conn"), ("bulk8", "bulk 8 conns")):
        fig = f.get(key, {})
        for col in _tollgate_cols(fig) or ["tollgate"]:
            v = fig.get(col)
            r = ratio(v, fig.get("socat"))
            rh = ratio(v, fig.get("haproxy"))
            write = "write" in col
            out.append([f"{label}, MB/s both ways", *base(key), f"{col}: {_num(v)}",
                        f"{_num(r)}x socat, {_num(rh)}x haproxy",
                        ">= 1.0x socat" if write else "-",
                        _verdict(r, 1.0, True) if write else "-"])
    for key, label in LATENCY_ROWS:
        polled = key.endswith(POLLING)
        if key not in f and polled:
            out.append([f"{label}, us", "-", "-", "-", "n/a: the host polls already, or has "
                        "no haltpoll knob", "-", "<= 1.0x", "n/a"])
            continue
        fig = f.get(key, {})
        d = fig.get("direct")
        for col in _tollgate_cols(fig) or ["tollgate"]:
            v = fig.get(col)
            added = v - d if isinstance(v, float) and isinstance(d, float) else None
            h = fig.get("haproxy")
            h_added = h - d if isinstance(h, float) and isinstance(d, float) else None
            # haproxy no slower than direct (noise at p99): no ratio to speak of
            r = ratio(added, h_added) if h_added is not None and h_added > 0 else None
            shown = f"{_num(r)}x" if r is not None else "n/a:"
            out.append([f"{label}, us" + ("" if polled else " (1-byte RTT)"),
                        *base(key),
                        f"{col}: {_num(v)} ({_signed(added)})",
                        f"{shown} haproxy's added ({_signed(h_added)})",
                        "<= 1.0x", _verdict(r, 1.0, False)])
    fig = f.get("rate", {})
    for col in _tollgate_cols(fig) or ["tollgate"]:
        r = ratio(fig.get(col), fig.get("haproxy"))
        out.append(["connection rate, conn/s", *base("rate"), f"{col}: {_num(fig.get(col))}",
                    f"{_num(r)}x haproxy", ">= 0.5x", _verdict(r, 0.5, True)])
    fig = f.get("witness", {})
    r = ratio(fig.get("on"), fig.get("off"))
    shown = fig["on"] if isinstance(fig.get("on"), str) else \
        f"on {_num(fig.get('on'))} / off {_num(fig.get('off'))} conn/s"
    out.append(["witness cost, conn rate on/off", "-", "-", "-", shown, _num(r) if r else "n/a",
                ">= 0.95", _verdict(r, 0.95, True)])
    v = f.get("bypass", {}).get("tollgate")
    if isinstance(v, dict):
        out.append(["bypass detection, ms", "-", "-", "-",
                    f"p50 {_num(v['p50_ms'])} / p99 {_num(v['p99_ms'])}", "-",
                    "p99 <= 100 ms", _verdict(v["p99_ms"], 100, False)])
    else:
        out.append(["bypass detection, ms", "-", "-", "-", _num(v), "-", "p99 <= 100 ms", "n/a"])
    fig = f.get("rss", {})
    for col in _tollgate_cols(fig) or ["tollgate"]:
        v = fig.get(col)
        out.append([f"agent RSS, MiB, {res.scale.get('idle')} idle sessions", "-", "-", "-",
                    f"{col}: {_num(v)}", "-", "<= 150 MiB",
                    _verdict(v if isinstance(v, float) else None, 150, False)])
    for key, label in (("cpu_mb", "relay CPU per MB relayed (bulk 1), ms"),
                       ("cpu_rtt", "relay CPU per round trip, us"),
                       ("cpu_conn", "relay CPU per connection, us")):
        fig = f.get(key, {})
        for col in _tollgate_cols(fig) or ["tollgate"]:
            r = ratio(fig.get(col), fig.get("haproxy"))
            out.append([label, "-", "-", _num(fig.get("haproxy")), f"{col}: {_num(fig.get(col))}",
                        f"{_num(r)}x haproxy" if r else "-", "-", "-"])
    for key, label in (("append_MBps", "store append, MB/s"),
                       ("verify_MBps", "tollgate verify, MB/s"),
                       ("ship_MBps", "shipper to fake Cloud Logging, MB/s"),
                       ("blake3_MBps", "machine: BLAKE3, MB/s (one core)"),
                       ("pagecache_MBps", "machine: page-cache writes, MB/s"),
                       ("disk_MBps", "machine: disk writes + fsync, MB/s")):
        out.append([label, "-", "-", "-", _num(f.get(key, {}).get("tollgate")), "-", "-", "-"])
    return out


def render(res: Results) -> str:
    head = ["measurement", *BASELINES, "tollgate", "ratio", "target", "met"]
    body = rows(res)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    m = res.machine
    out = [f"tollgate bench: {res.command}",
           f"machine: nproc {m['nproc']}, {m['cpu']}, kernel {m['kernel']}, "
           f"python {m['python']}; run took {res.seconds:.0f} s", "",
           line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
           *(line(r) for r in body)]
    if res.notes:
        out += ["", *(f"note: {n}" for n in res.notes)]
    return "\n".join(out)
