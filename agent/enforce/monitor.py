"""The kernel's word that a ruleset changed: nftables notifications.

The kernel sends every nftables change (any table's, any process's) to the
netlink group NFNLGRP_NFTABLES, as `nft monitor` shows them. The daemon
waits on this instead of reading its table on a fast beat: a change to
tollgate's table is seen at once, and an idle agent does not wake to look.
What changed is not parsed (a plain netlink socket is enough for that);
the daemon reads its table back and compares, as it always did.
"""

from __future__ import annotations

import errno
import socket

from pyroute2.netlink import NETLINK_NETFILTER
from pyroute2.netlink.nfnetlink import NFNLGRP_NFTABLES


class RulesetChanges:
    """Readable when any ruleset changed since drain()."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                   NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        except OSError:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> None:
        """Take what is queued; an overflow (ENOBUFS) also means: changed."""
        while True:
            try:
                self._sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:   # dropped notifications: the caller looks anyway
                    raise

    def close(self) -> None:
        self._sock.close()
