"""FS_IMMUTABLE_FL through ioctl: finished segments become unchangeable.

Even root must clear the flag first (which needs CAP_LINUX_IMMUTABLE), so a
stray write, a careless `rm`, or an unprivileged process cannot alter
evidence. Not every filesystem supports the flag (ext4, xfs, btrfs and tmpfs
since Linux 6.0 do); callers report the reason when it cannot be set.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
_FLAGS = struct.Struct("=l")  # the ioctl's argument is declared long, read as int


def _ioctl_flags(fd: int, request: int, flags: int = 0) -> int:
    buf = bytearray(_FLAGS.pack(flags))
    fcntl.ioctl(fd, request, buf)
    return _FLAGS.unpack(buf)[0] & 0xFFFFFFFF


def is_immutable(path: str | os.PathLike) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return bool(_ioctl_flags(fd, FS_IOC_GETFLAGS) & FS_IMMUTABLE_FL)
    except OSError:
        return False
    finally:
        os.close(fd)


def set_immutable(path: str | os.PathLike, on: bool = True) -> str | None:
    """Set or clear the flag. None when done, else why not (for statistics)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open: {e.strerror}"
    try:
        flags = _ioctl_flags(fd, FS_IOC_GETFLAGS)
        want = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        if want != flags:
            _ioctl_flags(fd, FS_IOC_SETFLAGS, want)
        return None
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return "filesystem does not support the immutable flag"
        return f"cannot set the immutable flag: {e.strerror}"
    finally:
        os.close(fd)


def probe(path: str | os.PathLike) -> str | None:
    """None if the filesystem under path can hold the flag, else why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open: {e.strerror}"
    try:
        _ioctl_flags(fd, FS_IOC_GETFLAGS)
        return None if os.geteuid() == 0 else "not root (CAP_LINUX_IMMUTABLE needed)"
    except OSError:
        return "filesystem does not support the immutable flag"
    finally:
        os.close(fd)
