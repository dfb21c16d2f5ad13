"""The C append point writes byte for byte the frame format.py describes
(SHA-256 chain over BLAKE3 or SHA-256 payload digests, crc32 as zlib
computes it), for every payload size class and both versions it writes."""

from __future__ import annotations

import os

import psutil
import pytest

from agent.native import Chain
from agent.store.format import ZERO_HASH, encode_header, frame_digest
from page_cache import cached_bytes

# Small ones are copied into the mapped window, large ones written into it;
# the last past the window's end, where a write appends to the file.
SIZES = [0, 1, 7, 8, 9, 55, 56, 63, 64, 65, 127, 128, 255, 1000, 4095, 4096, 65_537, 1 << 20,
         1 << 20, 1 << 20, 100, 3000]


def python_frame(kind: int, seq: int, ts: int, prev: bytes, prefix: bytes,
                 payload: bytes, version: int) -> tuple[bytes, bytes]:
    header = encode_header(kind, len(prefix) + len(payload), seq, ts, prev, version)
    digest, crc = frame_digest(header, prefix, payload)
    return header + prefix + payload + crc, digest


@pytest.mark.parametrize("version", [3, 2], ids=["blake3", "sha256"])
def test_frames_match_the_python_format(tmp_path, version):
    path = tmp_path / "seg"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    chain, expected, head = Chain(), b"", ZERO_HASH
    chain.fd, chain.version = fd, version
    try:
        for seq, size in enumerate(SIZES):
            payload, prefix = os.urandom(size), os.urandom(seq % 10)
            with chain:
                assert chain.append(3, payload, 1_700_000_000_000_000_000 + seq, prefix) == seq
            frame, head = python_frame(3, seq, 1_700_000_000_000_000_000 + seq, head,
                                       prefix, payload, version)
            expected += frame
            assert chain.head == head and chain.next_seq == seq + 1
            # copied (below 2 KiB) or written (above): after the frames, only zeros
            data = path.read_bytes()
            assert data[:len(expected)] == expected and not data[len(expected):].strip(b"\0")
        with chain:
            chain.trim()
    finally:
        os.close(fd)
    assert path.read_bytes() == expected
    assert chain.seg_bytes == len(expected) == chain.bytes


def test_a_chain_writes_only_versions_it_can_hash():
    chain = Chain()
    assert chain.version == 3
    with pytest.raises(ValueError):
        chain.version = 1


def test_failed_write_leaves_the_chain_as_it_was(tmp_path):
    chain = Chain()
    chain.fd = os.open(tmp_path / "seg", os.O_RDONLY | os.O_CREAT, 0o600)  # not writable
    try:
        with chain, pytest.raises(OSError):
            chain.append(3, b"x", 1)
        assert (chain.next_seq, chain.head, chain.seg_bytes) == (0, ZERO_HASH, 0)
    finally:
        os.close(chain.fd)


def _appends(chain: Chain, sizes) -> None:
    for i, size in enumerate(sizes):
        with chain:
            chain.append(3, bytes([i % 251]) * size, i)


def test_small_frames_are_copied_large_ones_written_without_mapping_for_strays(tmp_path):
    """An interactive stream maps one window per 2 MiB; a bulk stream with
    a small frame between its large ones maps none for those strays."""
    fd = os.open(tmp_path / "seg", os.O_RDWR | os.O_CREAT, 0o600)
    chain = Chain()
    chain.fd = fd
    try:
        _appends(chain, [100] * 30_000)              # ~5 MiB of small frames
        assert chain.mapped and 2 <= chain.windows <= 4
        before = chain.windows
        _appends(chain, [256 << 10, 100] * 40)       # 10 MiB of bulk, strays between
        assert chain.windows == before
        _appends(chain, [100] * 20)                   # interactive again: a window soon
        assert chain.windows == before + 1
        with chain:
            chain.trim()
        assert os.fstat(fd).st_size == chain.seg_bytes
    finally:
        os.close(fd)


def _mapped_rss(path) -> int:
    return sum(m.rss for m in psutil.Process().memory_maps(grouped=False) if m.path == str(path))


WINDOW = 2 << 20


def test_the_segment_ahead_of_the_window_is_read_into_the_page_cache(tmp_path):
    """warm() (the upkeep thread's, off the chain's lock) puts the next
    window's pages in the page cache before the records reach them: the
    first fault of a fresh file range cost ~1 ms under the lock. It only
    reads (zeros past the records); trim cuts the segment back as before."""
    path = tmp_path / "seg"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    chain = Chain()
    chain.fd = fd
    try:
        _appends(chain, [100] * 20)                  # maps the first window
        assert chain.windows == 1 and chain.warmed == 0
        assert path.stat().st_size == WINDOW         # nothing ahead of the window yet
        cached = cached_bytes(path)
        chain.warm()
        assert chain.warmed == 2 * WINDOW
        assert path.stat().st_size == 2 * WINDOW
        assert cached_bytes(path) - cached == WINDOW  # all of [WINDOW, 2 * WINDOW)
        with open(path, "rb") as f:
            f.seek(chain.seg_bytes)
            assert f.read() == bytes(2 * WINDOW - chain.seg_bytes)
        chain.warm()                                 # nothing more asked for: no change
        assert chain.warmed == 2 * WINDOW
        _appends(chain, [100] * 20)
        with chain:
            chain.trim()
        assert chain.warmed == 0                     # forgotten with the file's tail
    finally:
        os.close(fd)
    assert path.stat().st_size == chain.seg_bytes


def test_the_window_is_faulted_in_ahead_of_the_records_and_let_go_behind(tmp_path):
    """Pages are faulted in a step ahead of the write point and unmapped a
    step behind it: no append pays for a whole window at once (~4 ms here),
    and a busy store keeps ~128 KiB of its segment mapped, not 2 MiB."""
    path = tmp_path / "seg"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    chain = Chain()
    chain.fd = fd
    try:
        _appends(chain, [100] * 20)
        assert chain.mapped and 0 < _mapped_rss(path) <= 128 << 10
        _appends(chain, [100] * 9_000)               # ~1.5 MiB: still the first window
        assert chain.windows == 1
        assert 0 < _mapped_rss(path) <= 192 << 10
        with chain:
            chain.trim()
    finally:
        os.close(fd)
    assert path.stat().st_size == chain.seg_bytes
