"""Member offsets of kernel structs, read from the running kernel's BTF.

BCC compiles against Debian's 6.1 headers, whose struct layouts need not
match the kernel we run on (struct cred's usage counter grew, ns_common was
reworked, ...). Dereferencing `task->nsproxy` in C would silently use the
header's offset. Instead the loader asks this module for the offsets in
/sys/kernel/btf/vmlinux and passes them as -DOFF_*=n cflags; the C code
reads through bpf_probe_read_kernel at those offsets (a poor man's CO-RE).

Only what that needs is parsed: type records are indexed, structs and
unions decoded on demand, anonymous members searched through.
"""

from __future__ import annotations

import struct
from functools import lru_cache

VMLINUX = "/sys/kernel/btf/vmlinux"

_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_MEMBER = struct.Struct("<III")
_STRUCT, _UNION, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG = 4, 5, 8, 9, 10, 11, 18
# Bytes that follow the 12-byte type record, by kind: fixed, or per vlen item.
_FIXED_TAIL = {1: 4, 3: 12, 14: 4, 17: 4}
_PER_ITEM = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


class BTFError(Exception):
    """The kernel's BTF lacks a struct or member the witness needs."""


class BTF:
    def __init__(self, data: bytes):
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _ = _HEADER.unpack_from(data)
        if magic != 0xEB9F:
            raise BTFError("not a BTF blob (bad magic)")
        self._data = data
        self._strings = hdr_len + str_off
        self._offsets = [0]  # type id -> byte offset of its record; id 0 is void
        self._by_name: dict[str, int] = {}
        self._index(hdr_len + type_off, hdr_len + type_off + type_len)

    def _index(self, pos: int, end: int) -> None:
        while pos < end:
            name_off, info, _ = _TYPE.unpack_from(self._data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind in (_STRUCT, _UNION) and name_off:
                self._by_name.setdefault(self._str(name_off), len(self._offsets))
            self._offsets.append(pos)
            pos += _TYPE.size + _FIXED_TAIL.get(kind, 0) + _PER_ITEM.get(kind, 0) * vlen

    def _str(self, off: int) -> str:
        start = self._strings + off
        return self._data[start:self._data.index(b"\0", start)].decode()

    def _record(self, type_id: int) -> tuple[int, int, int, int, int]:
        """(name_off, kind, vlen, kind_flag, size_or_type) of one type."""
        name_off, info, st = _TYPE.unpack_from(self._data, self._offsets[type_id])
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, st

    def _members(self, type_id: int):
        _, _, vlen, kind_flag, _ = self._record(type_id)
        pos = self._offsets[type_id] + _TYPE.size
        for i in range(vlen):
            name_off, mtype, bits = _MEMBER.unpack_from(self._data, pos + i * _MEMBER.size)
            yield name_off, mtype, (bits & 0xFFFFFF) if kind_flag else bits

    def _strip(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        while True:
            _, kind, _, _, st = self._record(type_id)
            if kind not in (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG):
                return type_id
            type_id = st

    def _find(self, type_id: int, member: str) -> int | None:
        """Byte offset of member in a struct/union, looking into anonymous members."""
        for name_off, mtype, bit_off in self._members(type_id):
            if name_off and self._str(name_off) == member:
                return bit_off // 8
            inner = self._strip(mtype)
            if not name_off and self._record(inner)[1] in (_STRUCT, _UNION):
                found = self._find(inner, member)
                if found is not None:
                    return bit_off // 8 + found
        return None

    def offset(self, struct_name: str, member: str) -> int:
        type_id = self._by_name.get(struct_name)
        if type_id is None:
            raise BTFError(f"struct {struct_name} not in the kernel's BTF")
        off = self._find(type_id, member)
        if off is None:
            raise BTFError(f"struct {struct_name} has no member {member}")
        return off


@lru_cache(maxsize=1)
def vmlinux() -> BTF:
    with open(VMLINUX, "rb") as f:
        return BTF(f.read())


# The members the C side reads, as cflag name -> (struct, member).
OFFSETS = {
    "OFF_TASK_NSPROXY": ("task_struct", "nsproxy"),
    "OFF_TASK_CRED": ("task_struct", "cred"),
    "OFF_TASK_MM": ("task_struct", "mm"),
    "OFF_TASK_REAL_PARENT": ("task_struct", "real_parent"),
    "OFF_TASK_TGID": ("task_struct", "tgid"),
    "OFF_TASK_PID": ("task_struct", "pid"),
    "OFF_NSPROXY_NET": ("nsproxy", "net_ns"),
    "OFF_NET_NS": ("net", "ns"),
    "OFF_NS_INUM": ("ns_common", "inum"),
    "OFF_CRED_UID": ("cred", "uid"),
    "OFF_CRED_EUID": ("cred", "euid"),
    "OFF_MM_ARG_START": ("mm_struct", "arg_start"),
    "OFF_MM_ARG_END": ("mm_struct", "arg_end"),
    "OFF_SKC_DADDR": ("sock_common", "skc_daddr"),
    "OFF_SKC_DPORT": ("sock_common", "skc_dport"),
    "OFF_SKC_FAMILY": ("sock_common", "skc_family"),
    "OFF_SKC_V6_DADDR": ("sock_common", "skc_v6_daddr"),
}


def offset_cflags() -> list[str]:
    """-DOFF_*=n for every member in OFFSETS; raises BTFError if one is missing."""
    btf = vmlinux()
    return [f"-D{name}={btf.offset(s, m)}" for name, (s, m) in OFFSETS.items()]
