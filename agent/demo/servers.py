"""Real servers for the sandbox's `corp` host: PostgreSQL and an HTTP server,
each in a temporary directory, listening on corp's IPv4 and IPv6 addresses."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from agent.demo.sandbox import CORP_V4, CORP_V6, Sandbox, wait_for


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (run `make setup`)")
    return found[-1]


def port_open(sb: Sandbox, ns: str, host: str, port: int) -> bool:
    code = (f"import socket,sys; s=socket.socket(socket.AF_INET6 if ':' in {host!r} "
            f"else socket.AF_INET); s.settimeout(1); sys.exit(s.connect_ex(({host!r},{port})))")
    return sb.run(ns, [sys.executable, "-c", code]).returncode == 0


class Postgres:
    """A private cluster: trust auth, database `corp` with a table to query."""

    def __init__(self, sb: Sandbox, port: int = 5432) -> None:
        self.sb, self.port = sb, port
        self.dir = Path(tempfile.mkdtemp(prefix="tg-pg-"))
        pg = pwd.getpwnam("postgres")
        os.chown(self.dir, pg.pw_uid, pg.pw_gid)

    def start(self) -> "Postgres":
        data = self.dir / "data"
        subprocess.run(["runuser", "-u", "postgres", "--", _pg_bin("initdb"), "-D", str(data),
                        "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True)
        with open(data / "pg_hba.conf", "a") as f:
            f.write("host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n")
        self.sb.spawn(self.sb.corp, [_pg_bin("postgres"), "-D", str(data), "-k", str(self.dir),
                                     "-h", f"{CORP_V4},{CORP_V6}", "-p", str(self.port),
                                     "-c", "fsync=off"], user="postgres")
        wait_for(lambda: port_open(self.sb, self.sb.corp, CORP_V4, self.port), 30,
                 what="PostgreSQL to listen")
        self.psql_admin("CREATE DATABASE corp")
        self.psql_admin("CREATE TABLE customers(id int, name text); "
                        "INSERT INTO customers VALUES (1,'Ada'),(2,'Grace')", db="corp")
        return self

    def psql_admin(self, sql: str, db: str = "postgres") -> str:
        r = self.sb.run(self.sb.corp, ["psql", "-h", str(self.dir), "-p", str(self.port),
                                       "-U", "postgres", "-d", db, "-Atc", sql], check=True,
                        text=True)
        return r.stdout

    def stop(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class HttpServer:
    """Python's http.server, dual-stack on corp, serving a known file."""

    BODY = b"hello from corp\n"

    def __init__(self, sb: Sandbox, port: int = 8080) -> None:
        self.sb, self.port = sb, port
        self.dir = Path(tempfile.mkdtemp(prefix="tg-http-"))
        (self.dir / "hello.txt").write_bytes(self.BODY)
        self.dir.chmod(0o755)

    def start(self) -> "HttpServer":
        self.sb.spawn(self.sb.corp, [sys.executable, "-m", "http.server", "--bind", "::",
                                     "--directory", str(self.dir), str(self.port)])
        wait_for(lambda: port_open(self.sb, self.sb.corp, CORP_V4, self.port), 15,
                 what="HTTP server to listen")
        return self

    def stop(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
