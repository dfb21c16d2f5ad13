"""The one place that talks to nftables, through its official JSON binding
(Debian python3-nftables). Every call is logged and every failure raises
NftError with nft's own message.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tollgate.enforce")


class NftError(Exception):
    pass


class Nft:
    def __init__(self) -> None:
        try:
            import nftables
        except ImportError as e:  # pragma: no cover - packaging error
            raise NftError("python3-nftables is not installed") from e
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)

    def run(self, commands: list[dict[str, Any]]) -> dict:
        """Run commands as one transaction; all or nothing."""
        log.debug("nft: %s", commands)
        rc, out, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError((err or "nft failed").strip().splitlines()[0])
        return out or {}

    def list_table(self, family: str, name: str) -> list[dict] | None:
        """The table's objects as nft prints them, or None if it is absent."""
        rc, out, err = self._nft.json_cmd(
            {"nftables": [{"list": {"table": {"family": family, "name": name}}}]})
        if not _listed(rc, err):
            return None
        return [o for o in out["nftables"] if "metainfo" not in o]

    def table_text(self, family: str, name: str) -> str | None:
        """The table as `nft list table` prints it (for people), or None if absent."""
        self._nft.set_json_output(False)
        try:
            rc, out, err = self._nft.cmd(f"list table {family} {name}")
        finally:
            self._nft.set_json_output(True)
        return out.rstrip() if _listed(rc, err) else None


def _listed(rc: int, err: str | None) -> bool:
    """A list command's outcome: True if listed, False if the table is absent."""
    if rc == 0:
        return True
    if "No such file or directory" in (err or ""):
        return False
    raise NftError((err or "nft list failed").strip().splitlines()[0])
