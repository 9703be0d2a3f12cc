"""A real PostgreSQL server for the tests, started from Debian's `postgresql` package (tests/test_postgres.py).

initdb into a temporary directory and `pg_ctl start -w`, as the unprivileged `postgres` user when the tests
run as root (postgres refuses to run as root), listening on 127.0.0.1 only, on a free port, with its unix
socket in that directory. A watchdog process outlives the test process on purpose: it waits for the end
of a pipe that only the test process holds, so when that process ends, however it ends (SIGKILL too), the
watchdog stops the server (`pg_ctl stop -m immediate`, SIGKILL to the postmaster if that fails) and
removes the directory. No server started here outlives the tests that started it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USER = "corral"
PASSWORD = "pg-test-secret"  # only ever on 127.0.0.1 of the tests' own network namespace

_WATCHDOG = r"""
import os, shutil, signal, subprocess, sys, time
pg_ctl, data, root, user, pid = sys.argv[1:6]
sys.stdin.buffer.read()  # returns at EOF: the test process closed its end, or died
subprocess.run([pg_ctl, "stop", "-D", data, "-m", "immediate", "-w", "-t", "20"], user=user or None,
               group=user or None, extra_groups=[] if user else None, stdin=subprocess.DEVNULL,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
pid = int(pid)
def postmaster():
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return data.encode() in f.read()
    except OSError:
        return False
if pid and postmaster():
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not postmaster():
            break
        time.sleep(0.05)
shutil.rmtree(root, ignore_errors=True)
"""


def server_binaries() -> Path | None:
    """The newest of Debian's PostgreSQL server bin directories (/usr/lib/postgresql/<version>/bin)."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")]
    found = [d for d in found if (d / "initdb").exists() and (d / "postgres").exists()]
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0, default=None)


def run_as() -> str | None:
    """The user the server runs as: `postgres` when we are root (None: ourselves)."""
    if os.geteuid() != 0:
        return None
    pwd.getpwnam("postgres")  # KeyError when the package's system user is missing
    return "postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One PostgreSQL cluster in a temporary directory; start(), stop() (and start() again), close()."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.user = run_as()
        self.root = Path(tempfile.mkdtemp(prefix="corral-pg-"))  # /tmp: reachable by the postgres user
        self.data, self.sockdir, self.log = self.root / "data", self.root / "sock", self.root / "server.log"
        self.port = free_port()
        self.pid = 0
        self._watchdog: subprocess.Popen | None = None
        try:
            self.sockdir.mkdir()
            pwfile = self.root / "pwfile"
            pwfile.write_text(PASSWORD + "\n")
            if self.user:
                pw = pwd.getpwnam(self.user)
                for p in (self.root, self.sockdir, pwfile):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
            self._pg("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                     "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")
            pwfile.unlink()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        p = subprocess.run([str(self.bindir / tool), *args], user=self.user, group=self.user,
                           extra_groups=[] if self.user else None, cwd=self.root, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout,
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"})
        if p.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}\n{log}")
        return p

    def start(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockdir} -c fsync=off "
                "-c full_page_writes=off -c max_connections=60 -c shared_buffers=16MB")
        self._pg("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", opts)
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        if self._watchdog is None:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(self.bindir / "pg_ctl"), str(self.data), str(self.root),
                 self.user or "", str(self.pid)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # not in the test's process group: a Ctrl-C there leaves it to clean up

    def stop(self) -> None:
        self._pg("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60")

    def alive(self) -> bool:
        """Whether this cluster's postmaster runs (a zombie, or a process that took its pid, does not count)."""
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                return str(self.data).encode() in f.read()
        except OSError:
            return False

    def url(self, database: str = "corral", *, password: str = PASSWORD, port: int | None = None) -> str:
        return f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{port or self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname=database,
                               autocommit=True, connect_timeout=10)

    def create_database(self, name: str) -> str:
        with self.connect() as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        """pg_ctl stop -m fast, then the watchdog's end of the pipe closed: it finds nothing left to stop
        and removes the directory."""
        try:
            if self.pid and self.alive():
                self.stop()
        finally:
            if self._watchdog is not None:
                assert self._watchdog.stdin is not None
                self._watchdog.stdin.close()
                try:
                    self._watchdog.wait(60)
                except subprocess.TimeoutExpired:
                    self._watchdog.kill()
            if self.pid and self.alive():
                os.kill(self.pid, signal.SIGKILL)
            shutil.rmtree(self.root, ignore_errors=True)

    def wait_gone(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True
