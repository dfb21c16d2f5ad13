"""Structured log lines on stderr (the journal under systemd): logfmt, one
event a line, so `journalctl -u tollgate` can be grepped by key."""

from __future__ import annotations

import logging
import sys


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().replace('"', "'")
        line = f'level={record.levelname.lower()} part={record.name.removeprefix("tollgate.")} msg="{msg}"'
        if record.exc_info:
            line += f' error="{self.formatException(record.exc_info).splitlines()[-1]}"'
        return line


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("tollgate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
