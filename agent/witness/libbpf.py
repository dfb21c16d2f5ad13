"""The few libbpf calls the witness makes beside BCC, bound once through ctypes.

libbpf is the library BCC itself is built on (libbpf1); BCC exposes neither
BPF links nor the ring buffer's epoll fd, and its map lookups parse the key
types from C text (the mirrors in events.py are what the witness checks).
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import functools
import os


@functools.cache
def lib() -> ct.CDLL:
    bpf = ct.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    bpf.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
    bpf.bpf_prog_query.argtypes = [ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                                   ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)]
    bpf.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
    bpf.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    bpf.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
    bpf.ring_buffer__epoll_fd.argtypes = [ct.c_void_p]
    bpf.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    bpf.bpf_map_lookup_and_delete_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    bpf.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
    bpf.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
    bpf.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    return bpf


def check(rc: int, what: str) -> int:
    # libbpf returns -errno (and sets errno) on failure.
    if rc < 0:
        err = -rc if rc != -1 else ct.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc
