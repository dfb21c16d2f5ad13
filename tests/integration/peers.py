"""Test peers run inside the sandbox: a server and a client that each report
SHA-256 of what they sent and received, so a test can hold them against the
store. Standalone script: `python peers.py server PORT OUT` / `client HOST PORT
SIZE`, and `halfclose-server PORT REPLY_BYTES`, `halfclose-client HOST PORT`.
"""

import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time

CHUNK = 1 << 16


def _block_size():
    """Mixed sizes: tiny writes right behind big ones reach the proxy as small
    reads while a big chunk of the same side is still being recorded."""
    r = os.urandom(4)
    return 1 + int.from_bytes(r[:3], "big") % (64 if r[3] < 80 else 256 << 10)


def _send_random(sock, size, digest):
    left = size
    while left:
        block = os.urandom(min(_block_size(), left))
        digest.update(block)
        sock.sendall(block)
        left -= len(block)


def _recv_all(sock, digest, limit=None, counter=None):
    total = 0
    while limit is None or total < limit:
        data = sock.recv(CHUNK if limit is None else min(CHUNK, limit - total))
        if not data:
            break
        digest.update(data)
        total += len(data)
        if counter is not None:
            counter[0] = total
    return total


def _listen(port):
    """Dual-stack: one listener serves the IPv4 and IPv6 tests."""
    ls = socket.socket(socket.AF_INET6)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", port))
    ls.listen(16)
    return ls


def server(port, out):
    ls = _listen(port)
    while True:
        conn, _ = ls.accept()
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:  # a readiness probe, not a transfer
            conn.close()
            continue
        size = struct.unpack("!Q", head)[0]
        sent, recvd = hashlib.sha256(), hashlib.sha256(head)
        t = threading.Thread(target=_send_random, args=(conn, size, sent), daemon=True)
        t.start()
        box = [0]
        try:
            _recv_all(conn, recvd, counter=box)
            t.join()
        except OSError:  # the relay died: what arrived so far is the record
            pass
        n = len(head) + box[0]
        conn.close()
        with open(out, "a") as f:
            f.write(json.dumps({"recv_sha": recvd.hexdigest(), "recv_bytes": n,
                                "sent_sha": sent.hexdigest(), "size": size}) + "\n")


def client(host, port, size):
    try:
        s = socket.create_connection((host, port))
    except OSError as e:  # refused (an agent killed before we dialled): say so, as data
        print(json.dumps({"connected": False, "recv_bytes": 0, "error": e.strerror}))
        return
    head = struct.pack("!Q", size)
    s.sendall(head)
    sent, recvd = hashlib.sha256(head), hashlib.sha256()

    def send():
        _send_random(s, size, sent)
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send, daemon=True)
    t.start()
    box = [0]
    try:
        box[0] = _recv_all(s, recvd, counter=box)
        t.join()
        error = None
    except OSError as e:  # cut mid-transfer: still say exactly what arrived
        error = e.strerror
    print(json.dumps({"sent_sha": sent.hexdigest(), "recv_sha": recvd.hexdigest(),
                      "recv_bytes": box[0], "error": error}))


def halfclose_server(port, reply_bytes):
    ls = _listen(port)
    while True:
        conn, _ = ls.accept()
        try:
            got = _recv_all(conn, hashlib.sha256())  # until the client's EOF
            conn.sendall(f"got {got} bytes;".encode() + b"r" * reply_bytes)
        except OSError:  # a readiness probe that left early
            pass
        conn.close()


def halfclose_client(host, port):
    s = socket.create_connection((host, port))
    s.sendall(b"q" * 100000)
    s.shutdown(socket.SHUT_WR)
    chunks = []
    while data := s.recv(CHUNK):
        chunks.append(data)
    reply = b"".join(chunks)
    print(json.dumps({"head": reply[:40].decode(errors="replace"), "len": len(reply)}))


def stall_server(port, seconds):
    """Accepts, then reads nothing for a while: a slow reader."""
    ls = _listen(port)
    while True:
        conn, _ = ls.accept()
        time.sleep(float(seconds))
        conn.close()


def flood_client(host, port, seconds):
    """Sends as fast as the path lets it for a while; prints how much went."""
    s = socket.create_connection((host, port))
    s.settimeout(0.2)
    block, sent, end = b"f" * CHUNK, 0, time.monotonic() + float(seconds)
    while time.monotonic() < end:
        try:
            sent += s.send(block)
        except socket.timeout:
            continue
    print(json.dumps({"sent": sent}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "server":
        server(int(args[0]), args[1])
    elif cmd == "client":
        client(args[0], int(args[1]), int(args[2]))
    elif cmd == "halfclose-server":
        halfclose_server(int(args[0]), int(args[1]))
    elif cmd == "halfclose-client":
        halfclose_client(args[0], int(args[1]))
    elif cmd == "stall-server":
        stall_server(int(args[0]), args[1])
    elif cmd == "flood-client":
        flood_client(args[0], int(args[1]), args[2])
