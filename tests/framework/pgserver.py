"""A throwaway PostgreSQL server for the tests, as CI can run one: Debian's `postgresql` package, a cluster made with
initdb in a temporary directory, listening only on a unix socket there (no TCP), stopped by its pid.

The cluster trades durability for speed (fsync off): it lives for one test session. Its directory is 0700 and the
postgres user's, so no other local user can reach the socket; root (the tests) can.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

# How long a fresh server may take to accept connections before the fixture gives up: generous, so that a slow
# machine is not mistaken for a broken one (no test measures it).
START_DEADLINE_S = 120.0


def postgres_bin() -> Path | None:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


class PgServer:
    def __init__(self, primary: PgServer | None = None) -> None:
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (`make deps` installs Debian's postgresql package)")
        self.bindir = bindir
        # Short, under /tmp: the socket's path must fit in 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="hvpg-", dir="/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._names = itertools.count(1)
        self.proc: subprocess.Popen[bytes] | None = None
        # initdb and the server refuse to run as root: as root, they run as the postgres user.
        self._user = "postgres" if os.geteuid() == 0 else None
        try:
            self._start(primary)
        except BaseException:
            self.stop()
            raise

    @classmethod
    def replica_of(cls, primary: PgServer) -> PgServer:
        """A streaming standby of ``primary``: a base backup of it, started in recovery, named "replica"."""
        return cls(primary)

    def _start(self, primary: PgServer | None) -> None:
        self.root.chmod(0o700)
        if self._user:
            shutil.chown(self.root, self._user, self._user)
        if primary is None:
            self.data.mkdir(mode=0o700)
            if self._user:
                shutil.chown(self.data, self._user, self._user)
            subprocess.run([self.bindir / "initdb", "-D", self.data, "-U", "hvctl", "--auth=trust", "-E", "UTF8",
                            "--no-sync", "--no-instructions"], user=self._user, check=True, capture_output=True,
                           timeout=300)
        else:
            # -R writes the standby's connection to the primary (primary_conninfo) and standby.signal.
            subprocess.run([self.bindir / "pg_basebackup", "-D", self.data, "-h", primary.root, "-U", "hvctl", "-R",
                            "-X", "stream", "-c", "fast",
                            "-d", f"host={primary.root} user=hvctl application_name=replica"],
                           user=self._user, check=True, capture_output=True, timeout=300)
        self.launch()

    def wait_for_replay(self, lsn: str) -> None:
        """Until this standby has replayed the primary's WAL up to ``lsn``."""
        deadline = time.monotonic() + START_DEADLINE_S
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            while not (db.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone() or (False,))[0]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the standby did not replay up to {lsn}")
                time.sleep(0.1)

    def launch(self) -> None:
        """Start the server on the cluster (again, after ``kill``), and wait until it accepts connections."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.bindir / "postgres", "-D", self.data, "-k", self.root, "-c", "listen_addresses=",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=200"],
                user=self._user, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=5).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not accept connections: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        """Stop the server by its pid (fast shutdown: its clients are disconnected), keeping the cluster."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def url(self, database: str) -> str:
        return f"postgresql://hvctl@/{database}?host={self.root}"

    def new_database(self) -> str:
        """A fresh, empty database's URL."""
        name = f"t{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Stop the server by its pid, and remove the cluster."""
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
