"""Attach a cgroup program so that it cannot outlive the agent.

A legacy attachment (BPF_PROG_ATTACH) stays on the cgroup after its loader
dies: every agent that was SIGKILLed left its guard behind, and at 64 the
kernel refuses a new one (E2BIG), so the next agent's witness does not start.
A BPF link (BPF_LINK_CREATE) belongs to its file descriptor instead: the kernel
detaches it when the agent exits, however it exits. `sweep_legacy` removes
guards earlier versions left attached the old way; it cannot touch a link, so
it never detaches the guard of another running agent.

Calls go to libbpf through agent/witness/libbpf.py.
"""

from __future__ import annotations

import ctypes as ct
import os

from agent.witness.libbpf import check, lib

_BPF_OBJ_NAME_LEN = 16
_PROG_INFO_NAME_OFFSET = 64       # struct bpf_prog_info: name follows map_ids
_PROG_INFO_BYTES = 256            # room for the whole struct; the tail stays zero
_MAX_QUERY = 64                   # the kernel's limit on programs per cgroup hook


def link(prog_fd: int, cgroup_fd: int, attach_type: int) -> int:
    """Attach `prog_fd` to the cgroup; returns the link fd. Closing it detaches."""
    return check(lib().bpf_link_create(prog_fd, cgroup_fd, attach_type, None),
                 "BPF_LINK_CREATE")


def attached_ids(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to this cgroup at this hook."""
    ids = (ct.c_uint32 * _MAX_QUERY)()
    count, flags = ct.c_uint32(_MAX_QUERY), ct.c_uint32(0)
    check(lib().bpf_prog_query(cgroup_fd, attach_type, 0, ct.byref(flags), ids,
                               ct.byref(count)), "BPF_PROG_QUERY")
    return list(ids[:count.value])


def program_name(prog_fd: int) -> str:
    """The program's name (truncated by the kernel to 15 bytes)."""
    info = ct.create_string_buffer(_PROG_INFO_BYTES)
    size = ct.c_uint32(_PROG_INFO_BYTES)
    check(lib().bpf_obj_get_info_by_fd(prog_fd, info, ct.byref(size)), "BPF_OBJ_GET_INFO_BY_FD")
    raw = info.raw[_PROG_INFO_NAME_OFFSET:_PROG_INFO_NAME_OFFSET + _BPF_OBJ_NAME_LEN]
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def sweep_legacy(cgroup_fd: int, attach_type: int, name: str) -> int:
    """Detach every legacy attachment of a program called `name`; returns how many."""
    wanted, swept = name[:_BPF_OBJ_NAME_LEN - 1], 0
    for prog_id in attached_ids(cgroup_fd, attach_type):
        fd = lib().bpf_prog_get_fd_by_id(prog_id)
        if fd < 0:
            continue   # gone meanwhile
        try:
            # Detaching fails with ENOENT for a link-attached program: that one is alive.
            if (program_name(fd) == wanted
                    and lib().bpf_prog_detach2(fd, cgroup_fd, attach_type) == 0):
                swept += 1
        finally:
            os.close(fd)
    return swept
