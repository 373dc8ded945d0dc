"""A real PostgreSQL server for the tests: the binaries of the ``pgserver`` wheel (PostgreSQL 16, a dev-extra
dependency, so a fresh clone and CI have it), a data directory of the test's, TCP on 127.0.0.1 only, password
authentication (scram-sha-256) as a team's server has it. Started, crashed, restarted and stopped by the tests.

PostgreSQL refuses to run as root (CI and these machines run as root): the server then runs as ``nobody``, which
owns only the data directory. ``nobody`` must also reach the binaries, and a checkout (its virtual environment with
the wheel) may sit in root's 0700 home: as root the wheel's ``pginstall`` is therefore copied once per process into
a world-readable folder of its own, and run from there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

USER, PASSWORD = "lade", "lade-team-secret"


def wheel_install() -> Path:
    """The ``pginstall`` folder (bin, lib, share) of the wheel that carries the server binaries, found without
    importing it (its package starts a server manager)."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None:
        raise RuntimeError("the postgres tests need the dev extra's pgserver: pip install -e '.[dev]'")
    return Path(spec.submodule_search_locations[0]) / "pginstall"


_READABLE: dict[Path, Path] = {}  # a pginstall -> its world-readable copy, made once per process


def readable_install(install: Path) -> Path:
    """``install`` copied into a fresh folder every user can traverse (0755 up to /tmp), for a server run as
    ``nobody``: wherever the checkout is, the server never needs a path through the user's home. Removed at exit."""
    if install not in _READABLE:
        import atexit

        root = Path(tempfile.mkdtemp(prefix="lade-pginstall-"))
        # The wheel's layout, kept: the binaries find lib/ and share/ beside bin/, and the libraries the wheel
        # vendors (libpq) through their RPATH $ORIGIN/../../../pgserver.libs.
        copy = root / install.parent.name / install.name
        for part in ("bin", "lib", "share"):
            shutil.copytree(install / part, copy / part, symlinks=True)
        vendored = install.parent.parent / f"{install.parent.name}.libs"
        if vendored.is_dir():
            shutil.copytree(vendored, root / vendored.name, symlinks=True)
        # Readable (and, where the owner may run it, runnable) by all, whatever umask made the environment.
        for folder, _, files in os.walk(root):
            os.chmod(folder, 0o755)
            for f in files:
                path = os.path.join(folder, f)
                if not os.path.islink(path):
                    mode = os.stat(path).st_mode
                    os.chmod(path, mode | 0o444 | (0o111 if mode & 0o100 else 0))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _READABLE[install] = copy
    return _READABLE[install]


class PostgresServer:
    """``initdb`` once, then ``start``/``stop``/``crash`` on one port; ``uri(db)`` is what ``mlflow server
    --backend-store-uri`` takes (SQLAlchemy's psycopg 3 driver, named so that no default-driver guess is made)."""

    def __init__(self, port: int, install: Path | None = None):
        self.port = port
        # Not under pytest's tmp dirs: those are 0700 to root, and the server user must reach its data directory.
        self.root = Path(tempfile.mkdtemp(prefix="lade-pg-"))
        self.root.chmod(0o755)
        self.data, self.log = self.root / "data", self.root / "postgres.log"
        self._as = {"user": "nobody", "group": "nogroup"} if os.geteuid() == 0 else {}
        install = install or wheel_install()
        self.install = readable_install(install) if self._as else install
        self.data.mkdir()
        (self.root / "pw").write_text(PASSWORD)
        if self._as:
            shutil.chown(self.data, "nobody", "nogroup")
            shutil.chown(self.root, "nobody", "nogroup")
        self._run(self._bin("initdb"), "-D", str(self.data), "-U", USER, "--pwfile", str(self.root / "pw"),
                  "-E", "UTF8", "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "--no-sync")
        (self.root / "pw").unlink()

    def _bin(self, name: str) -> str:
        return str(self.install / "bin" / name)

    def _run(self, *cmd: str) -> None:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **self._as)
        if p.returncode:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout}{p.stderr}{log}")

    def start(self) -> None:
        # -k '': no Unix socket, TCP on loopback only; fsync off: a test server, restarted cleanly or crashed
        # (``crash``) with its WAL on a disk that stays up, which is what fsync protects against.
        self._run(self._bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o",
                  f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off -c max_connections=200", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown; ``immediate``: the server processes quit at once, as in a crash (the next
        start replays the WAL)."""
        self._run(self._bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.uri("postgres", driver=False), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def uri(self, database: str, driver: bool = True, password: bool = True) -> str:
        """``password=False``: the URI a team writes on a command line, the password left to libpq's password file
        (``passfile``) so that it shows in no process list or shell history."""
        scheme = "postgresql+psycopg" if driver else "postgresql"
        secret = f":{PASSWORD}" if password else ""
        return f"{scheme}://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def passfile(self, path: Path) -> Path:
        """A libpq password file for this server (``PGPASSFILE``; libpq ignores one others can read)."""
        path.write_text(f"127.0.0.1:{self.port}:*:{USER}:{PASSWORD}\n")
        path.chmod(0o600)
        return path

    def close(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass  # already stopped
        for _ in range(50):
            try:
                shutil.rmtree(self.root)
                return
            except OSError:
                time.sleep(0.1)
