"""The Cloud Logging gRPC client, built from ShipConfig.

google-cloud-logging's own LoggingServiceV2Client over its gRPC transport;
the library's retry is switched off (retry=None) because tollgate owns it.
Credentials: a root-only key file, or Application Default Credentials (the
VM's service account). `insecure` gives a plaintext channel with no
credentials, and only to a loopback endpoint: it exists for the test server.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from typing import Sequence

import grpc
from google.cloud.logging_v2.services.logging_service_v2 import LoggingServiceV2Client
from google.cloud.logging_v2.services.logging_service_v2.transports.grpc import (
    LoggingServiceV2GrpcTransport,
)
from google.cloud.logging_v2.types import logging as logging_types

from agent.config import ShipConfig

SCOPES = ("https://www.googleapis.com/auth/logging.write",)
DEFAULT_ENDPOINT = "logging.googleapis.com:443"
# Our requests reach 10 MB; gRPC's default message cap is 4 MiB.
CHANNEL_OPTIONS = (("grpc.max_send_message_length", 16 << 20),
                   ("grpc.max_receive_message_length", 16 << 20))

WriteRequest = logging_types.WriteLogEntriesRequest


class TransportError(Exception):
    """The client cannot be built from this config (one clear line)."""


class LogWriter:
    """One method: write entries, raise google.api_core exceptions."""

    def __init__(self, cfg: ShipConfig):
        self._timeout = cfg.rpc_timeout_s
        self._channel = _channel(cfg)
        self.client = LoggingServiceV2Client(
            transport=LoggingServiceV2GrpcTransport(channel=self._channel))

    def write(self, entries: Sequence) -> None:
        # partial_success: valid entries are written even if one is refused;
        # the refused ones come back by index in WriteLogEntriesPartialErrors.
        request = logging_types.WriteLogEntriesRequest.pb()(
            entries=entries, partial_success=True)
        self.client.write_log_entries(
            request=WriteRequest.wrap(request), retry=None, timeout=self._timeout)

    def close(self) -> None:
        self._channel.close()


def _channel(cfg: ShipConfig) -> grpc.Channel:
    target = cfg.endpoint or DEFAULT_ENDPOINT
    if cfg.insecure:
        if not _is_loopback(target):
            raise TransportError(f"ship.insecure needs a loopback endpoint, not {target!r}")
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    return LoggingServiceV2GrpcTransport.create_channel(
        target, credentials=_credentials(cfg), scopes=SCOPES, options=CHANNEL_OPTIONS)


def _credentials(cfg: ShipConfig):
    import google.auth
    from google.oauth2 import service_account
    if not cfg.credentials:
        creds, _ = google.auth.default(scopes=SCOPES)
        return creds
    _check_key_file(cfg.credentials)
    return service_account.Credentials.from_service_account_file(cfg.credentials,
                                                                 scopes=SCOPES)


def _check_key_file(path: str) -> None:
    """The key writes to the project's logs: the subject must not read it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise TransportError(f"ship.credentials: cannot read {path}: {e.strerror}") from None
    if st.st_uid != 0 or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TransportError(f"ship.credentials: {path} must be owned by root "
                             f"and readable by root only (mode 0600)")


def _is_loopback(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
