"""A fake Cloud Logging: a real gRPC server on 127.0.0.1 with scriptable faults.

It serves google.logging.v2.LoggingServiceV2/WriteLogEntries with the
library's own request/response types, keeps every entry it commits (in
arrival order) and checks what the real API checks that matters here: at
most 1000 entries and 10 MB per request, 256 KiB per entry, and partial
errors (WriteLogEntriesPartialErrors) when partial_success is set.

Faults are a plan consumed request by request:

    server.plan(("exhausted", 20), ("unavailable_s", 3600), ("drop", 3),
                ("slow", 2, 0.5), ("ok", 4), ("hang",))

exhausted n     RESOURCE_EXHAUSTED, n requests
unavailable_s t UNAVAILABLE until the clock passed t seconds from the first hit
drop n          commit the entries, then fail UNAVAILABLE (response lost)
slow n d        commit, then answer after d real seconds
ok n            answer normally n times
hang            block until release(); `hung` is set while blocked
A rejection predicate refuses matching entries with INVALID_ARGUMENT.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Callable

import grpc
from google.cloud.logging_v2.types import logging as logging_types
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

Request = logging_types.WriteLogEntriesRequest
Response = logging_types.WriteLogEntriesResponse
PartialErrors = logging_types.WriteLogEntriesPartialErrors.pb()

SERVICE = "google.logging.v2.LoggingServiceV2"
MAX_REQUEST_BYTES = 10_000_000
MAX_ENTRIES = 1000
MAX_ENTRY_BYTES = 256 << 10


class Aborted(Exception):
    """Raised inside the handler to end a request with a status."""

    def __init__(self, status: status_pb2.Status):
        self.status = status


class FakeCloudLogging:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.entries: list = []          # committed LogEntry protos, arrival order
        self.requests: list[tuple[int, int]] = []  # (bytes, entries) of every request
        self.committed_requests: list[list] = []   # entries of each committed request
        self.hung = threading.Event()
        self._release = threading.Event()
        self._plan: list[list] = []
        self._reject: Callable | None = None
        self._reject_partial = True
        self._lock = threading.Lock()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            options=[("grpc.max_receive_message_length", 32 << 20)])
        handler = grpc.unary_unary_rpc_method_handler(
            self._write, request_deserializer=Request.deserialize,
            response_serializer=Response.serialize)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"WriteLogEntries": handler}),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "FakeCloudLogging":
        self._server.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.stop(grace=None)

    # -- scripting ---------------------------------------------------------

    def plan(self, *steps: tuple) -> None:
        with self._lock:
            self._plan.extend(list(s) for s in steps)

    def reject(self, predicate: Callable | None, partial: bool = True) -> None:
        """Refuse entries for which predicate(entry) is true (INVALID_ARGUMENT);
        partial=False: fail the whole request without per-entry details."""
        self._reject, self._reject_partial = predicate, partial

    def plan_left(self) -> list:
        """Steps not yet consumed (empty: every scripted fault happened)."""
        with self._lock:
            return [list(s) for s in self._plan]

    def release(self) -> None:
        self._release.set()

    # -- the RPC -------------------------------------------------------------

    def _write(self, request, context: grpc.ServicerContext):
        pb = Request.pb(request)
        with self._lock:
            self.requests.append((pb.ByteSize(), len(pb.entries)))
        try:
            self._check_limits(pb)
            after = self._before_commit()
            self._commit(pb)
            self._after_commit(after)
        except Aborted as a:
            context.abort_with_status(rpc_status.to_status(a.status))
        return Response()

    def _check_limits(self, pb) -> None:
        if pb.ByteSize() > MAX_REQUEST_BYTES or len(pb.entries) > MAX_ENTRIES:
            raise Aborted(_status(code_pb2.INVALID_ARGUMENT, "request too large"))

    def _before_commit(self) -> tuple:
        """Apply the plan's next step; returns what to do after committing."""
        with self._lock:
            step = self._plan[0] if self._plan else ["ok", 1]
            kind = step[0]
            if kind == "unavailable_s":
                if len(step) == 2:
                    step.append(self.clock() + step[1])
                if self.clock() < step[2]:
                    raise Aborted(_status(code_pb2.UNAVAILABLE, "outage"))
                self._plan.pop(0)
                return ()
            if kind == "hang":
                self._plan.pop(0)
            elif self._plan:
                step[1] -= 1
                if step[1] <= 0:
                    self._plan.pop(0)
        if kind == "exhausted":
            raise Aborted(_status(code_pb2.RESOURCE_EXHAUSTED, "quota"))
        if kind == "hang":
            self.hung.set()
            self._release.wait()
            raise Aborted(_status(code_pb2.UNAVAILABLE, "released"))
        return tuple(step)

    def _commit(self, pb) -> None:
        bad = {i: "entry larger than 256 KiB" for i, e in enumerate(pb.entries)
               if e.ByteSize() > MAX_ENTRY_BYTES}
        if self._reject:
            bad.update({i: "rejected by test" for i, e in enumerate(pb.entries)
                        if self._reject(e)})
        if bad and not (pb.partial_success and self._reject_partial):
            raise Aborted(_status(code_pb2.INVALID_ARGUMENT, "invalid entry"))
        kept = [e for i, e in enumerate(pb.entries) if i not in bad]
        with self._lock:
            self.entries.extend(kept)
            self.committed_requests.append(kept)
        if bad:
            raise Aborted(_partial_status(bad))

    @staticmethod
    def _after_commit(step: tuple) -> None:
        if step and step[0] == "drop":
            raise Aborted(_status(code_pb2.UNAVAILABLE, "connection lost after commit"))
        if step and step[0] == "slow":
            time.sleep(step[2])

    # -- reading back ------------------------------------------------------

    def by_insert_id(self) -> dict[str, list]:
        out: dict[str, list] = {}
        with self._lock:
            for e in self.entries:
                out.setdefault(e.insert_id, []).append(e)
        return out


def _status(code: int, message: str, details=()) -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message, details=list(details))


def _partial_status(bad: dict[int, str]) -> status_pb2.Status:
    errors = PartialErrors()
    for index, message in bad.items():
        errors.log_entry_errors[index].CopyFrom(
            _status(code_pb2.INVALID_ARGUMENT, message))
    detail = any_pb2.Any()
    detail.Pack(errors)
    return _status(code_pb2.INVALID_ARGUMENT, "some entries were refused", [detail])
