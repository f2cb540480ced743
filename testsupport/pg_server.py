"""A Postgres of the test session's own, on a free loopback TCP port (so a proxy can be put in between), from the
binaries the ``pgserver`` package ships: what a machine without Postgres gets.

As root (postgres refuses to run as root) it runs as pgserver's own system user ``pgserver``, as pgserver does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from testsupport.redis_server import free_port


class PgServer:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.data = directory / "data"
        self.port = 0
        self._user: str | None = None

    def _bin(self, name: str) -> str:
        from pgserver._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _run(self, *args: str, timeout: float = 120) -> None:
        subprocess.run(
            list(args), check=True, user=self._user, timeout=timeout, capture_output=True, cwd=self.dir, text=True
        )

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            import pwd
            import stat

            from pgserver._commands import POSTGRES_BIN_PATH
            from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

            ensure_user_exists("pgserver")
            self._user = "pgserver"
            ensure_prefix_permissions(self.dir)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
            ensure_folder_permissions(POSTGRES_BIN_PATH, execute | read)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
            pw = pwd.getpwnam("pgserver")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run(
            self._bin("initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres", "--encoding=utf8", "--no-sync"
        )
        for attempt in range(5):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            opts = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c synchronous_commit=off"
            try:
                self._run(
                    self._bin("pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-l", str(self.dir / "log"),
                    "-o", opts, "start",
                )  # fmt: skip
                break
            except subprocess.CalledProcessError as err:
                if attempt == 4:
                    log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
                    raise RuntimeError(f"embedded test postgres did not start: {err.stderr}\n{log}") from None
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run(self._bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
