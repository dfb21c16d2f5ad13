"""Store records -> Cloud Logging LogEntry protos, one record at a time.

An entry carries the whole raw payload (base64) with the frame fields, so the
cloud copy alone proves a record: frame_hash(encode_header(kind, len, seq,
ts, prev, format_version), payload) == hash, which for format_version 3 is
sha256(header + blake3(payload)); stores written before hold 2,
sha256(header + sha256(payload)), and 1, sha256(header + payload). insertId
and timestamp depend only on the record, so a retried or re-read batch folds
into the entries already written.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from urllib.parse import quote

import orjson
from google.cloud.logging_v2.types import log_entry as log_entry_types
from google.logging.type import log_severity_pb2
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from agent.store.format import DATA_HEAD, Kind, Record

LogEntry = log_entry_types.LogEntry.pb()
Severity = log_severity_pb2.LogSeverity

# Cloud Logging rejects entries over 256 KiB; keep well below it.
MAX_ENTRY_BYTES = 200 << 10
# Raw bytes per split part: base64 makes 128 KiB into ~171 KiB.
SPLIT_CHUNK = 128 << 10

TOMBSTONE_SUFFIX = ".tombstone"

PRIORITY_KINDS = frozenset({Kind.ALERT, Kind.ACK, Kind.SEAL, Kind.SEGMENT_START})

SEVERITY = {
    Kind.ALERT: Severity.ALERT, Kind.ACK: Severity.NOTICE, Kind.SEAL: Severity.NOTICE,
    Kind.SEGMENT_START: Severity.NOTICE, Kind.RECOVERED: Severity.WARNING,
    Kind.ACCESS: Severity.NOTICE, Kind.EVENT: Severity.INFO,
    Kind.SESSION_OPEN: Severity.INFO, Kind.SESSION_CLOSE: Severity.INFO,
    Kind.SESSION_INFO: Severity.INFO, Kind.DATA: Severity.DEFAULT,
}


@dataclass(frozen=True, slots=True)
class Target:
    """Where entries go: project, log names, monitored resource, host."""
    project_id: str
    log_name: str
    alert_log_name: str
    seal_log_name: str
    resource_type: str
    resource_labels: dict[str, str]
    host: str
    store_id: str

    def log_path(self, kind: Kind) -> str:
        name = {Kind.ALERT: self.alert_log_name, Kind.ACK: self.alert_log_name,
                Kind.SEAL: self.seal_log_name,
                Kind.SEGMENT_START: self.seal_log_name}.get(kind, self.log_name)
        return f"projects/{self.project_id}/logs/{quote(name, safe='')}"


def insert_id(store_id: str, seq: int, part: int | None = None) -> str:
    base = f"tg-{store_id}-{seq}"
    return base if part is None else f"{base}.{part}"


def session_of(record: Record) -> int | None:
    """The session a record belongs to, if any."""
    if record.kind is Kind.DATA:
        return DATA_HEAD.unpack_from(record.payload)[0]
    if record.kind is Kind.SESSION_OPEN:
        return record.seq
    if record.kind in (Kind.SESSION_CLOSE, Kind.SESSION_INFO):
        doc = _json_or_none(record.payload)
        sid = doc.get("session") if isinstance(doc, dict) else None
        return sid if isinstance(sid, int) else None
    return None


def build_entries(record: Record, target: Target, subject: str | None) -> list:
    """One LogEntry, or several split parts when the record is too large."""
    body = _body(record)
    entry = _entry(record, target, subject, insert_id(target.store_id, record.seq))
    doc = _json_or_none(record.payload) if record.kind is not Kind.DATA else None
    body["payload_b64"] = base64.b64encode(record.payload).decode()
    # The parsed record is for queries only; payload_b64 is the evidence, so
    # a record JSON that Struct cannot hold is simply left unparsed.
    if not (isinstance(doc, dict) and _try_set_payload(entry, {**body, "record": doc})):
        _set_payload(entry, body)
    if entry.ByteSize() <= MAX_ENTRY_BYTES:
        return [entry]
    return _split(record, target, subject)


def _split(record: Record, target: Target, subject: str | None) -> list:
    """Parts of at most SPLIT_CHUNK raw bytes, tied by LogSplit (uid = hash)."""
    chunks = [record.payload[i:i + SPLIT_CHUNK]
              for i in range(0, len(record.payload), SPLIT_CHUNK)]
    parts = []
    for index, chunk in enumerate(chunks):
        entry = _entry(record, target, subject, insert_id(target.store_id, record.seq, index))
        body = _body(record)
        body.update(payload_len=len(record.payload), part_offset=index * SPLIT_CHUNK,
                    payload_b64=base64.b64encode(chunk).decode())
        _set_payload(entry, body)
        entry.split.uid = record.hash.hex()
        entry.split.index = index
        entry.split.total_splits = len(chunks)
        parts.append(entry)
    return parts


def tombstone(rejected, record_hash: str, error: str, ts_ns: int) -> object:
    """A small entry that stands in for one the server refused."""
    entry = LogEntry(log_name=rejected.log_name, insert_id=rejected.insert_id + TOMBSTONE_SUFFIX,
                     severity=Severity.WARNING, timestamp=_timestamp(ts_ns))
    entry.resource.CopyFrom(rejected.resource)
    entry.labels.update(rejected.labels)
    _set_payload(entry, {"tombstone": True, "rejected_insert_id": rejected.insert_id,
                         "hash": record_hash, "error": error[:1000],
                         "seq": rejected.labels.get("seq", "")})
    return entry


def _entry(record: Record, target: Target, subject: str | None, iid: str):
    entry = LogEntry(log_name=target.log_path(record.kind), insert_id=iid,
                     severity=SEVERITY.get(record.kind, Severity.DEFAULT),
                     timestamp=_timestamp(record.ts_ns))
    entry.resource.type = target.resource_type
    entry.resource.labels.update(target.resource_labels)
    labels = {"host": target.host, "store_id": target.store_id, "seq": str(record.seq),
              "kind": record.kind.name.lower()}
    sid = session_of(record)
    if sid is not None:
        labels["session"] = str(sid)
    if subject:
        labels["subject"] = subject
    entry.labels.update(labels)
    return entry


def _body(record: Record) -> dict:
    body = {"seq": record.seq, "ts_ns": str(record.ts_ns), "kind": record.kind.name,
            "hash": record.hash.hex(), "prev": record.prev.hex(),
            "format_version": record.version}
    if record.kind is Kind.DATA:
        sid, direction, _ = record.data()
        body.update(session=sid, direction=direction.name.lower())
    return body


def _set_payload(entry, body: dict) -> None:
    struct = struct_pb2.Struct()
    json_format.ParseDict(body, struct)
    entry.json_payload.CopyFrom(struct)


def _try_set_payload(entry, body: dict) -> bool:
    try:
        _set_payload(entry, body)
    except (json_format.ParseError, ValueError, TypeError):
        return False
    return True


def _timestamp(ts_ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ts_ns)
    return ts


def _json_or_none(payload: bytes):
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
