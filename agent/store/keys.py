"""Forward-secure sealing keys: a one-way ratchet, one step per seal.

    k_0                 32 random bytes from `keys init`: the VERIFICATION key,
                        printed once and kept off the host by compliance
    k_{n+1}           = HMAC-SHA256(k_n, "tollgate ratchet v1")
    mac key of epoch n = HMAC-SHA256(k_n, "tollgate seal v1")
    key id            = SHA-256("tollgate key id v1" || k_0)[:8]

The agent holds only k_n, the key of the next seal: it steps to k_{n+1} in
memory as soon as seal n is written (step). The file follows once the seals
before its new key are on disk (persist): it is overwritten in place with the
newest key and the older one is zeroed, so an intruder who takes the host
cannot compute any key older than the file's and so cannot re-seal what was
sealed before it (HMAC is one-way in its key). The writer persists at most
once per seal interval (writer.py), because each persist needs an fsync of
the store first: sealing every MiB at hundreds of MB/s would otherwise fsync
hundreds of times a second. The verifier, holding k_0, walks the ratchet
forward to every epoch it meets.

The key file holds two slots, each in its own 512-byte block so that one
write never tears both: the new key goes into the other slot and is synced
before the old slot is zeroed, so a crash leaves at least one valid slot.
Overwriting in place (not write-and-rename) is what erases the old key on a
non-copy-on-write filesystem: a rename would leave it in a freed block.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import zlib
from pathlib import Path

KEY_BYTES = 32
SLOT = struct.Struct(">4sQ32s8sI")  # magic, epoch, key, key id, crc32
SLOT_MAGIC = b"TGK1"
SLOT_SPAN = 512
RATCHET_LABEL = b"tollgate ratchet v1"
MAC_LABEL = b"tollgate seal v1"


class SealKeyError(Exception):
    """The key file is missing, unreadable or has no valid slot."""


def key_id(k0: bytes) -> bytes:
    return hashlib.sha256(b"tollgate key id v1" + k0).digest()[:8]


def next_key(k: bytes) -> bytes:
    return hmac.digest(k, RATCHET_LABEL, "sha256")


def mac_key(k: bytes) -> bytes:
    return hmac.digest(k, MAC_LABEL, "sha256")


class Ratchet:
    """The verifier's side: k_0 walked forward, never back."""

    def __init__(self, k0: bytes) -> None:
        self.key_id = key_id(k0)
        self.epoch, self._k = 0, k0

    def mac_key(self, epoch: int) -> bytes:
        if epoch < self.epoch:
            raise ValueError(f"epoch {epoch} is before {self.epoch}: the ratchet only goes forward")
        while self.epoch < epoch:
            self._k, self.epoch = next_key(self._k), self.epoch + 1
        return mac_key(self._k)


def _pack_slot(epoch: int, k: bytes, kid: bytes) -> bytes:
    body = SLOT.pack(SLOT_MAGIC, epoch, k, kid, 0)[:-4]
    return (body + struct.pack(">I", zlib.crc32(body))).ljust(SLOT_SPAN, b"\0")


def _unpack_slot(raw: bytes) -> tuple[int, bytes, bytes] | None:
    if len(raw) < SLOT.size:
        return None
    magic, epoch, k, kid, crc = SLOT.unpack_from(raw)
    if magic != SLOT_MAGIC or crc != zlib.crc32(raw[:SLOT.size - 4]):
        return None
    return epoch, k, kid


def init_key(path: str | os.PathLike, *, force: bool = False) -> bytes:
    """Create the sealing key file (0600 in a 0700 dir); returns k_0.

    Refuses to replace an existing key unless force: a new key cannot verify
    seals made with the old one.
    """
    p = Path(path)
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(p.parent, 0o700)
    if force:
        p.unlink(missing_ok=True)
    k0 = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise SealKeyError(f"{p}: a key already exists (use force to replace it)") from None
    try:
        os.write(fd, _pack_slot(0, k0, key_id(k0)) + b"\0" * SLOT_SPAN)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(p.parent)
    return k0


def verification_key_text(k0: bytes) -> str:
    return f"tollgate-vk1:{key_id(k0).hex()}:{k0.hex()}"


def load_verification_key(text_or_path: str | os.PathLike) -> bytes:
    """k_0 from the text verification_key_text() printed, or a file holding it."""
    text = str(text_or_path).strip()
    if not text.startswith("tollgate-vk1:"):
        try:
            text = Path(text_or_path).read_text().strip()
        except OSError as e:
            raise SealKeyError(f"{text_or_path}: cannot read verification key: {e.strerror}") from None
    parts = text.split(":")
    try:
        if len(parts) != 3 or parts[0] != "tollgate-vk1":
            raise ValueError
        kid, k0 = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        raise SealKeyError("not a tollgate verification key (tollgate-vk1:<id>:<key>)") from None
    if len(k0) != KEY_BYTES or key_id(k0) != kid:
        raise SealKeyError("verification key is damaged: its id does not match the key")
    return k0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SealKey:
    """The host's side: k_n for the next seal, advanced one way in memory
    (step) and on disk (persist, advance)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise SealKeyError(f"{self.path}: cannot open sealing key: {e.strerror}") from None
        slots = [_unpack_slot(os.pread(self._fd, SLOT_SPAN, i * SLOT_SPAN)) for i in (0, 1)]
        valid = [(s, i) for i, s in enumerate(slots) if s is not None]
        if not valid:
            os.close(self._fd)
            raise SealKeyError(f"{self.path}: no valid key slot")
        (epoch, k, kid), idx = max(valid, key=lambda v: v[0][0])
        self.epoch, self.key_id, self._k, self._slot = epoch, kid, bytearray(k), idx
        self.file_epoch = epoch  # the file's key; older ones are erased everywhere
        if len(valid) == 2:
            # A crash between writing the new slot and zeroing the old one.
            self._zero_slot(1 - idx)

    def mac_key(self) -> bytes:
        return mac_key(bytes(self._k))

    def advance(self, to_epoch: int | None = None) -> None:
        """Move to to_epoch (default: the next one) and erase every key before
        it, in memory and on disk."""
        target = self.epoch + 1 if to_epoch is None else to_epoch
        while self.epoch < target:
            self.step()
        self.persist(self.checkpoint())

    def step(self) -> None:
        """The next epoch's key, in memory only: the file keeps an older one
        until persist() (call it once the seals before it are on disk)."""
        k = next_key(bytes(self._k))
        for i in range(len(self._k)):  # best effort: drop the old key from memory
            self._k[i] = 0
        self.epoch, self._k = self.epoch + 1, bytearray(k)

    def checkpoint(self) -> tuple[int, bytes]:
        """(epoch, key) now, for a persist() once what was sealed before is durable."""
        return self.epoch, bytes(self._k)

    def persist(self, state: tuple[int, bytes]) -> None:
        """Overwrite the file with a checkpoint's key and erase the older one."""
        epoch, k = state
        if epoch <= self.file_epoch:
            return
        new = 1 - self._slot
        os.pwrite(self._fd, _pack_slot(epoch, k, self.key_id), new * SLOT_SPAN)
        os.fdatasync(self._fd)
        self._zero_slot(self._slot)
        self.file_epoch, self._slot = epoch, new

    def _zero_slot(self, idx: int) -> None:
        os.pwrite(self._fd, b"\0" * SLOT_SPAN, idx * SLOT_SPAN)
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
