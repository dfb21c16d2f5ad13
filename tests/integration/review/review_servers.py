"""Real servers in the sandbox's corp namespace for the review tests: MariaDB,
Redis, nginx (HTTP and HTTPS) and OpenSSH, each in a temporary directory,
plus a statement log for the demo PostgreSQL so a test can ask the
server how many statements it executed.

Directories the subject must read (its ssh key) are made world-traversable:
pytest's own tmp dirs are 0700 root.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from agent.demo.sandbox import CORP_V4, Sandbox, wait_for, which
from agent.demo.servers import Postgres, _pg_bin, port_open

HTTP_BODY = b"hello from nginx in corp\n"
TLS_NAME = "tollgate.test"
SSH_PORT = 2222


def _tempdir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


def _listening(sb: Sandbox, port: int, what: str, timeout: float = 30) -> None:
    wait_for(lambda: port_open(sb, sb.corp, CORP_V4, port), timeout, what=f"{what} to listen")


def with_statement_log(pg: Postgres) -> Path:
    """Make PostgreSQL log every statement it executes (simple, or each Execute
    of a prepared one) to a file; returns the file. pg_stat_statements would be
    the obvious counter, but PostgreSQL 15 counts a prepared utility statement
    (pgbench's BEGIN and END) once, not once an execution.

    The log needs a restart with a log file; pg_ctl keeps the original options.
    """
    log = pg.dir / "pg.log"
    pg.psql_admin("ALTER SYSTEM SET log_statement = 'all'")
    pg.sb.run(pg.sb.corp, [_pg_bin("pg_ctl"), "-D", str(pg.dir / "data"), "-l", str(log),
                           "-m", "fast", "-w", "restart"], user="postgres", check=True)
    _listening(pg.sb, pg.port, "PostgreSQL (restarted)")
    return log


# "LOG:  statement: ..." (simple query) or "LOG:  execute <name>: ..." (extended)
_EXECUTED = re.compile(r" LOG:  (statement|execute [^:]*): ")


def executed_statements(log: Path, since_offset: int) -> int:
    """Statements PostgreSQL logged as executed after ``since_offset`` of its log."""
    with open(log, "rb") as f:
        f.seek(since_offset)
        text = f.read().decode("utf-8", "replace")
    return sum(1 for line in text.splitlines() if _EXECUTED.search(line))


class MariaDb:
    USER, PASSWORD, DB = "app", "app-pw", "app"

    def __init__(self, sb: Sandbox) -> None:
        self.sb, self.dir = sb, _tempdir("tgr-mariadb-")

    def start(self) -> "MariaDb":
        data, sock = self.dir / "data", self.dir / "mysqld.sock"
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                        "--skip-test-db", "--auth-root-authentication-method=socket"],
                       check=True, capture_output=True)
        self.sb.spawn(self.sb.corp, [which("mariadbd"), "--no-defaults", f"--datadir={data}",
                                     f"--socket={sock}", f"--bind-address={CORP_V4}", "--port=3306",
                                     "--user=root", f"--pid-file={self.dir}/pid",
                                     f"--log-error={self.dir}/error.log", "--innodb-buffer-pool-size=16M"])
        _listening(self.sb, 3306, "MariaDB")
        subprocess.run(["mariadb", "--no-defaults", f"--socket={sock}", "-u", "root", "-e",
                        f"CREATE DATABASE {self.DB}; CREATE USER '{self.USER}'@'%' IDENTIFIED BY "
                        f"'{self.PASSWORD}'; GRANT ALL ON {self.DB}.* TO '{self.USER}'@'%';"],
                       check=True, capture_output=True)
        return self

    def stop(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    def __init__(self, sb: Sandbox) -> None:
        self.sb, self.dir = sb, _tempdir("tgr-redis-")

    def start(self) -> "Redis":
        self.sb.spawn(self.sb.corp, [which("redis-server"), "--bind", CORP_V4, "--port", "6379",
                                     "--save", "", "--appendonly", "no", "--protected-mode", "no",
                                     "--dir", str(self.dir)])
        _listening(self.sb, 6379, "Redis")
        return self

    def stop(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


NGINX_CONF = """daemon off; master_process off; worker_processes 1;
pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  types {{ text/plain txt; }}
  server {{
    listen {ip}:80; listen {ip}:443 ssl; server_name {name};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;
    root {d}/www;
  }}
}}
"""


class Nginx:
    def __init__(self, sb: Sandbox) -> None:
        self.sb, self.dir = sb, _tempdir("tgr-nginx-")

    def start(self) -> "Nginx":
        d = self.dir
        (d / "www").mkdir()
        (d / "tmp").mkdir()
        (d / "www" / "hello.txt").write_bytes(HTTP_BODY)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2",
                        "-subj", f"/CN={TLS_NAME}", "-addext", f"subjectAltName=DNS:{TLS_NAME}"],
                       check=True, capture_output=True)
        (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, ip=CORP_V4, name=TLS_NAME))
        self.sb.spawn(self.sb.corp, [which("nginx"), "-p", str(d), "-c", str(d / "nginx.conf"),
                                     "-e", str(d / "error.log")])
        _listening(self.sb, 80, "nginx")
        _listening(self.sb, 443, "nginx (TLS)")
        return self

    def stop(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


SSHD_CONF = """Port {port}
ListenAddress {ip}
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
"""


class Sshd:
    """OpenSSH on corp; the subject logs in as root with a key it owns."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb, self.dir = sb, _tempdir("tgr-sshd-")
        self.client_key = self.dir / "client_key"

    def start(self) -> "Sshd":
        d = self.dir
        for key in (d / "host_key", self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        subject = pwd.getpwnam(self.sb.subject)
        os.chown(self.client_key, subject.pw_uid, subject.pw_gid)  # ssh wants its key private to its user
        (d / "sshd_config").write_text(SSHD_CONF.format(port=SSH_PORT, ip=CORP_V4, d=d))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        self.sb.spawn(self.sb.corp, [which("sshd"), "-D", "-e", "-f", str(d / "sshd_config")])
        _listening(self.sb, SSH_PORT, "sshd")
        return self

    def ssh_argv(self, *command: str) -> list[str]:
        return ["ssh", "-i", str(self.client_key), "-p", str(SSH_PORT), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                f"root@{CORP_V4}", *command]

    def stop(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
