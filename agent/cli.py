"""The `tollgate` command: parse, call, print. Nothing else lives here."""

from __future__ import annotations

import os
import sys
from typing import Any

import click
import orjson

from agent import config as config_mod
from agent.config import Config, ConfigError


class Failure(click.ClickException):
    """One line on stderr, exit code 2; never a traceback."""
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"tollgate: {self.format_message()}", err=True)


def _load(ctx: click.Context, confinable: bool = False) -> Config:
    try:
        return config_mod.load(ctx.obj["config_path"], confinable=confinable)
    except ConfigError as e:
        raise Failure(str(e)) from None


def _store(cfg: Config) -> str:
    """The store's directory, for the commands that read it. A path with no
    store is an error, not an empty store: a mistyped --config or store.path
    must not list "no sessions", nor have a report's ACCESS record create a
    new store there."""
    return _store_at(cfg.store.path, f"store.path in {cfg.source}")


def _store_at(path: str, named_by: str) -> str:
    if not os.path.isdir(path):
        raise Failure(f"{path}: no store here ({named_by}); nothing was recorded there")
    return path


def _json(obj: Any) -> None:
    click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2, default=str).decode())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help=f"config file (default {config_mod.DEFAULT_PATH})")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """tollgate: records everything a subject user sends and receives on the
    network, and proves nothing went around the record."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


@main.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the agent: apply rules, proxy and record until stopped."""
    from agent import daemon, logs
    cfg = _load(ctx)
    logs.setup(cfg.log_level)
    try:
        daemon.run(cfg)
    except daemon.StartError as e:
        raise Failure(str(e)) from None


@main.command()
@click.option("--keep", is_flag=True, help="leave the sandbox up after the demo (until Ctrl-C)")
def demo(keep: bool) -> None:
    """Build a throwaway sandbox, send a subject's traffic through tollgate, show the record."""
    from agent.demo import run_demo
    try:
        run_demo(keep=keep, echo=click.echo)
    except RuntimeError as e:
        raise Failure(str(e)) from None


@main.group()
def rules() -> None:
    """Show, apply or remove tollgate's nftables rules."""


@rules.command("show")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rules_show(ctx: click.Context, as_json: bool) -> None:
    """Print the live table and whether it matches the config."""
    from agent.daemon import ruleset_for
    from agent.enforce import Nft
    from agent.enforce.apply import verify
    cfg = _load(ctx)
    nft, want = Nft(), ruleset_for(cfg)
    problems = verify(nft, want)
    if as_json:
        _json({"table": nft.list_table("inet", want.table), "matches_config": not problems,
               "problems": problems})
        return
    text = nft.table_text("inet", want.table)
    click.echo(text if text is not None
               else f"table inet {want.table}: absent (subjects are NOT confined)")
    click.echo("matches config" if not problems else "DIFFERS from config: " + "; ".join(problems))
    sys.exit(0 if not problems else 1)


@rules.command("apply")
@click.option("--reason", default="", help="why; recorded with the act")
@click.pass_context
def rules_apply(ctx: click.Context, reason: str) -> None:
    """Apply the rules now (the running agent does this itself on start).

    A subject name that cannot be resolved now (at boot, a directory's user)
    does not leave the others free: they are confined, and the command
    fails naming it."""
    from agent import control
    cfg = _load(ctx, confinable=True)
    try:
        control.request(cfg.run_dir, "rules_apply")   # the agent resolved its subjects
        offline = False
    except control.NotRunning:
        _apply_offline(cfg, reason)
        offline = True
    click.echo("rules applied")
    if offline and cfg.unresolved:
        raise Failure(f"{cfg.source}: subjects: {', '.join(cfg.unresolved)}: cannot be resolved "
                      "now, so not confined (list by uid); the others are confined")


def _apply_offline(cfg: Config, reason: str) -> None:
    from agent import control
    from agent.daemon import ruleset_for
    from agent.enforce import Nft, NftError
    from agent.enforce.apply import apply
    try:
        apply(Nft(), ruleset_for(cfg))
    except NftError as e:
        raise Failure(str(e)) from None
    unresolved = {"unresolved": list(cfg.unresolved)} if cfg.unresolved else {}
    control.record(cfg.run_dir, cfg.store, "EVENT",
                   {"event": "rules_applied", "why": "operator", "reason": reason, **unresolved},
                   control.me())


@rules.command("remove")
@click.option("--reason", default="", help="why; recorded with the act")
@click.pass_context
def rules_remove(ctx: click.Context, reason: str) -> None:
    """Remove the rules: the subject's traffic is no longer forced or recorded."""
    from agent import control
    from agent.alerts import make_alert, AlertType
    from agent.enforce import Nft
    from agent.enforce.apply import remove
    cfg = _load(ctx)
    try:
        reply = control.request(cfg.run_dir, "rules_remove", reason=reason)
        removed = reply.get("removed")
    except control.NotRunning:
        alert = make_alert(AlertType.RULES_REMOVED, "operator removed tollgate's rules",
                           reason=reason, by=control.me())
        try:
            control.append_offline(cfg.store, "ALERT", alert)
        except RuntimeError as e:
            raise Failure(str(e)) from None
        removed = remove(Nft(), cfg.enforce.table)
    click.echo("rules removed; the act is recorded" if removed else "no rules were in place")


@main.command()
@click.option("--subject", help="user name or uid")
@click.option("--dst", help="ip, ip:port, [ipv6]:port, CIDR or :port")
@click.option("--protocol", help="detected protocol: postgres, mysql, http, redis, tls, ssh, dns, opaque")
@click.option("--since", help="open at or after: ISO time (UTC unless given) or a time ago (10m, 2h, 1d)")
@click.option("--until", help="open at or before: ISO time or a time ago")
@click.option("--grep", help="text in what the subject asked (queries, requests, commands), any case")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def sessions(ctx: click.Context, subject: str | None, dst: str | None, protocol: str | None,
             since: str | None, until: str | None, grep: str | None, as_json: bool) -> None:
    """List recorded sessions with their process chains; filter them."""
    from agent.review import search
    from agent.review.listing import session_lines
    from agent.review.text import json_text
    cfg = _load(ctx)
    try:
        wanted = search.SessionFilter(
            subject=subject, dst=search.parse_destination(dst) if dst else None, protocol=protocol,
            since_ns=search.parse_time(since) if since else None,
            until_ns=search.parse_time(until) if until else None, grep=grep)
    except ValueError as e:
        raise Failure(str(e)) from None
    items = search.search_sessions(_store(cfg), wanted)
    if as_json:
        click.echo(json_text([s.as_dict() for s in items]))
        return
    for line in session_lines(items):
        click.echo(line)


def _audit(cfg: Config, act: dict) -> None:
    """The ACCESS record of a replay, export or report: written before the act."""
    from agent import control
    try:
        control.record(cfg.run_dir, cfg.store, "ACCESS", act, control.me())
    except RuntimeError as e:
        raise Failure(f"cannot record this access, so not doing it: {e}") from None


def _open_session(cfg: Config, session_id: int, follow: bool = False):
    from agent.review.replay import open_session
    try:
        return open_session(_store(cfg), session_id, follow)
    except LookupError as e:
        raise Failure(str(e)) from None


@main.command()
@click.argument("session_id", type=int)
@click.option("--raw", type=click.Choice(["client", "server"]),
              help="write the exact bytes of one direction to stdout")
@click.option("--hex", "as_hex", is_flag=True, help="hexdump of both directions, record by record")
@click.option("--text", "as_text", is_flag=True, help="the bytes as text, not decoded")
@click.option("--json", "as_json", is_flag=True, help="the decoded events as JSON")
@click.option("--follow", "-f", is_flag=True, help="a live session: keep printing until it closes")
@click.pass_context
def replay(ctx: click.Context, session_id: int, raw: str | None, as_hex: bool, as_text: bool,
           as_json: bool, follow: bool) -> None:
    """Replay a session decoded (queries and results, requests, ...), with timestamps."""
    from agent.review.replay import VIEWS, json_document, raw_bytes
    from agent.review.text import json_text
    from agent.store import Direction
    cfg = _load(ctx)
    chosen = [name for name, on in (("raw", raw), ("hex", as_hex), ("text", as_text), ("json", as_json)) if on]
    if len(chosen) > 1:
        raise Failure("choose one of --raw, --hex, --text, --json")
    view = chosen[0] if chosen else "decoded"
    records = _open_session(cfg, session_id, follow)
    _audit(cfg, {"act": "replay", "session": session_id, "view": view, "raw": raw, "follow": follow})
    try:
        if raw:
            out = sys.stdout.buffer
            for chunk in raw_bytes(records, Direction[raw.upper()]):
                out.write(chunk)
                if follow:
                    out.flush()
            out.flush()
        elif as_json and not follow:
            click.echo(json_text(json_document(records)))
        else:
            for line in VIEWS[view](records):
                click.echo(line)
    except KeyboardInterrupt:
        sys.exit(130)


@main.command()
@click.argument("session_id", type=int)
@click.option("--pcap", "pcap_file", required=True, type=click.Path(dir_okay=False),
              help="write a pcapng file (Wireshark, tshark) of the session's TCP conversation")
@click.pass_context
def export(ctx: click.Context, session_id: int, pcap_file: str) -> None:
    """Export a session as a packet capture that Wireshark and tshark decode."""
    from agent.review.pcap import write_pcapng
    cfg = _load(ctx)
    records = _open_session(cfg, session_id)
    _audit(cfg, {"act": "export", "session": session_id, "format": "pcapng",
                 "file": os.path.abspath(pcap_file)})
    try:
        with open(pcap_file, "wb") as f:
            packets = write_pcapng(records, f)
    except OSError as e:
        raise Failure(f"{pcap_file}: {e.strerror or e}") from None
    click.echo(f"wrote {packets} packets of session {session_id} to {pcap_file}")


@main.command()
@click.option("--html", "html_file", required=True, type=click.Path(dir_okay=False),
              help="write one self-contained HTML page")
@click.option("--key", "key_file", type=click.Path(dir_okay=False),
              help="verification key file (checks seal MACs in the verify section)")
@click.pass_context
def report(ctx: click.Context, html_file: str, key_file: str | None) -> None:
    """A static page for a reviewer: sessions, alerts, a timeline, the verify status."""
    from agent.review.report import gather, render_html
    from agent.store import SealKeyError, load_verification_key
    cfg = _load(ctx)
    try:
        key = load_verification_key(key_file) if key_file else None
    except SealKeyError as e:
        raise Failure(str(e)) from None
    data = gather(_store(cfg), key)
    _audit(cfg, {"act": "report", "file": os.path.abspath(html_file), "sessions": len(data.sessions)})
    try:
        with open(html_file, "w", encoding="utf-8") as f:
            f.write(render_html(data))
    except OSError as e:
        raise Failure(f"{html_file}: {e.strerror or e}") from None
    click.echo(f"wrote {html_file}: {len(data.sessions)} sessions, {len(data.alerts)} alerts, "
               f"store verify {'OK' if data.verify.ok else 'NOT OK'}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """What the running agent is doing, and what it has counted."""
    from agent import control
    cfg = _load(ctx)
    try:
        st = control.request(cfg.run_dir, "status")["status"]
    except control.NotRunning:
        if as_json:
            _json({"running": False})
        else:
            click.echo("agent: not running (rules, if present, keep refusing subject traffic)")
        sys.exit(3)
    if as_json:
        _json({"running": True, **st})
        return
    _print_tree(st)


def _print_tree(d: dict, indent: int = 0) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            click.echo(" " * indent + f"{k}:")
            _print_tree(v, indent + 2)
        else:
            click.echo(" " * indent + f"{k}: {v}")


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def alerts(ctx: click.Context, as_json: bool) -> None:
    """List alerts with their process chains, unacknowledged first."""
    if ctx.invoked_subcommand:
        return
    from agent.review.listing import alert_lines
    from agent.review.sessions import list_alerts, sorted_alerts
    from agent.review.text import json_text
    cfg = _load(ctx)
    items = sorted_alerts(list_alerts(_store(cfg)))
    if as_json:
        click.echo(json_text(items))
        return
    for line in alert_lines(items):
        click.echo(line)


def _find_alert(cfg: Config, alert_id: str) -> dict:
    from agent.review.sessions import list_alerts
    for a in list_alerts(_store(cfg)):
        if a["id"] == alert_id:
            return a
    raise Failure(f"no alert {alert_id}")


@alerts.command("show")
@click.argument("alert_id")
@click.pass_context
def alerts_show(ctx: click.Context, alert_id: str) -> None:
    """One alert with all its evidence and its process chain."""
    from agent.review.text import json_text
    click.echo(json_text(_find_alert(_load(ctx), alert_id)))


@alerts.command("ack")
@click.argument("alert_id")
@click.option("--reason", required=True, help="why it needs no further action; recorded")
@click.pass_context
def alerts_ack(ctx: click.Context, alert_id: str, reason: str) -> None:
    """Acknowledge an alert: an ACK record saying who, when and why (append-only)."""
    from agent import control
    cfg = _load(ctx)
    alert = _find_alert(cfg, alert_id)
    if alert["ack"]:
        who = (alert["ack"].get("by") or {}).get("user", "?")
        raise Failure(f"alert {alert_id} is already acknowledged by {who}")
    me = control.me()
    try:
        seq = control.record(cfg.run_dir, cfg.store, "ACK",
                             {"alert": alert_id, "reason": reason, "operator": me["user"]}, me)
    except RuntimeError as e:
        raise Failure(str(e)) from None
    click.echo(f"alert {alert_id} acknowledged (record {seq})")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def runs(ctx: click.Context, as_json: bool) -> None:
    """The agent's runs: when it recorded, with the witness and seals or
    without, and how each run ended (a gap in coverage shows here)."""
    from agent.review.listing import run_lines
    from agent.review.runs import as_dicts, list_runs
    from agent.review.text import json_text
    found = list_runs(_store(_load(ctx)))
    if as_json:
        click.echo(json_text(list(as_dicts(found))))
        return
    for line in run_lines(found):
        click.echo(line)


@main.command()
@click.option("--once", is_flag=True, required=True,
              help="ship what the store holds now, then exit (`tollgate run` ships continuously)")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="config file (overrides the one given before the command)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ship(ctx: click.Context, once: bool, config_path: str | None, as_json: bool) -> None:
    """Ship the store to Cloud Logging once; transient errors are retried until they pass."""
    from google.api_core.exceptions import GoogleAPICallError
    from agent.ship import Shipper, ShipperBusy, TransportError
    if config_path:
        ctx.obj["config_path"] = config_path
    cfg = _load(ctx)
    try:
        shipper = Shipper(cfg, _store(cfg))
        result = shipper.run_once()
    except (ShipperBusy, TransportError, GoogleAPICallError, FileNotFoundError) as e:
        raise Failure(str(e)) from None
    stats = shipper.statistics()
    shipper.close()
    if as_json:
        _json({"result": result, "statistics": stats})
        return
    click.echo(f"shipped {result.records} records in {result.entries} entries; "
               f"{result.rejected} refused and kept in {cfg.ship.state_dir}/quarantine")
    click.echo(f"backlog: {stats.backlog_records} records, {stats.backlog_bytes} bytes")


@main.command("verify")
@click.option("--key", "key_file", type=click.Path(dir_okay=False),
              help="verification key file from `tollgate keys init` (checks seal MACs)")
@click.option("--store", "store_dir", help="store directory (default: from the config)")
@click.option("--live", is_flag=True, help="tolerate a partial last record (agent running)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def verify_cmd(ctx: click.Context, key_file: str | None, store_dir: str | None, live: bool,
               as_json: bool) -> None:
    """Prove the store whole: checksums, chain, segments, seals. Exit 1 on any failure."""
    from agent.store import SealKeyError, load_verification_key, verify
    store_dir = _store_at(store_dir, "--store") if store_dir else _store(_load(ctx))
    try:
        key = load_verification_key(key_file) if key_file else None
    except SealKeyError as e:
        raise Failure(str(e)) from None
    r = verify(store_dir, key, allow_torn_tail=live)
    if as_json:
        _json(r.to_json())
    else:
        _print_verify(r)
    sys.exit(0 if r.ok else 1)


def _print_verify(r) -> None:
    click.echo(f"store {r.store_id}: records {r.first_seq}..{r.last_seq} ({r.records} records,"
               f" {r.bytes} bytes, {len(r.segments)} segments) in {r.seconds:.2f}s")
    if r.gc_before is not None:
        click.echo(f"earlier records removed by recorded gc; store starts at seq {r.gc_before}")
    seals = f"{r.seals} seals, epochs {r.first_epoch}..{r.last_epoch}" if r.seals else "no seals"
    click.echo(f"sealed up to seq {r.sealed_upto} ({seals}); {r.unsealed_records} records after"
               f" the last seal" + ("" if r.keyed else "; seal MACs NOT checked (no --key)"))
    for f in r.failures:
        click.echo(f"FAILED at {f.segment} offset {f.offset} seq {f.seq}: {f.reason}")
    click.echo("OK" if r.ok else "NOT OK")


@main.group()
def keys() -> None:
    """The forward-secure sealing key."""


@keys.command("init")
@click.option("--force", is_flag=True, help="replace an existing key (old seals then need the old key)")
@click.pass_context
def keys_init(ctx: click.Context, force: bool) -> None:
    """Create the sealing key and print the verification key to keep OFF this host."""
    from agent.store import SealKeyError, init_key
    from agent.store.keys import verification_key_text
    cfg = _load(ctx)
    try:
        k0 = init_key(cfg.store.key_path, force=force)
    except (SealKeyError, OSError) as e:
        raise Failure(str(e)) from None
    click.echo(f"sealing key created: {cfg.store.key_path}")
    click.echo("verification key (store it off this host; `tollgate verify --key FILE`):")
    click.echo(verification_key_text(k0))


@main.command("gc")
@click.option("--unshipped", is_flag=True,
              help="allow deleting segments that were never shipped (no shipping cursor)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def gc_cmd(ctx: click.Context, unshipped: bool, as_json: bool) -> None:
    """Delete segments older than store.retention_days that are already shipped; recorded."""
    from agent import control
    from agent.store.gc import delete_segments, gc_event, plan_gc
    cfg = _load(ctx)
    plan = plan_gc(cfg.store.path, cfg.store.retention_days, _shipped_upto(cfg),
                   allow_unshipped=unshipped)
    if plan:
        # the record goes first: a crash before the deletion leaves evidence, not a gap
        try:
            control.record(cfg.run_dir, cfg.store, "EVENT", gc_event(plan), control.me())
        except RuntimeError as e:
            raise Failure(str(e)) from None
        delete_segments(cfg.store.path, plan)
    if as_json:
        _json({"deleted": plan})
        return
    click.echo(f"deleted {len(plan)} segments" + "".join(f"\n  {d['segment']}" for d in plan))


def _shipped_upto(cfg: Config) -> int | None:
    """Last seq every shipping lane has confirmed; None when nothing ships."""
    from pathlib import Path
    positions = []
    try:
        store_id = (Path(cfg.store.path) / "store.id").read_text().strip()
    except OSError:
        return None
    for p in Path(cfg.ship.state_dir).glob("cursor-*.json"):
        try:
            doc = orjson.loads(p.read_bytes())
            if doc["store_id"] != store_id:
                return None  # a cursor of another store says nothing about this one
            positions.append(doc["next_seq"] - 1)
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
            return None  # an unreadable cursor proves nothing was shipped
    return min(positions) if cfg.ship.enabled and positions else None


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check this host can run the agent: kernel, BCC, config, store, rules, shipping, clock."""
    from agent.doctor import format_line, run_checks
    checks = run_checks(ctx.obj["config_path"])
    ok = all(c.ok for c in checks)
    if as_json:
        _json({"ok": ok, "checks": [c.as_dict() for c in checks]})
    else:
        for c in checks:
            click.echo(format_line(c))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
