"""Whether a store URL can answer, asked in seconds and before anything is written.

MLflow retries an unreachable database for about 100 s and SQLAlchemy prints pages on the way;
Optuna creates a SQLite file's folder-less path with a traceback. One TCP probe (database servers)
or one folder check (SQLite files) says the same in one line. And a new SQLite store is created
by one process at a time (``first_use_lock``), in write-ahead-log mode (``start_in_wal``)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from urllib.parse import unquote, urlsplit

from altrack.errors import ConfigError
from altrack.redaction import redact

DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "http": 80, "https": 443}
PROBE_SECONDS = 5.0


def probe(url: str, what: str) -> None:
    """Raise ``ConfigError`` (one line, password redacted) when ``url`` cannot be reached: a
    database or HTTP server that refuses a TCP connection, or a SQLite file whose folder does not
    exist or cannot be written. Other schemes (and plain paths) pass."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0].lower()
    if scheme == "sqlite":
        path = sqlite_file(url)
        if path is None:
            return
        folder = path.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {redact(url)}: the folder {folder} does not exist or is not writable")
        return
    if scheme not in DEFAULT_PORTS:
        return
    host = parts.hostname
    if not host:  # a unix socket: the driver will say
        return
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ConfigError(f"{what} {redact(url)}: bad port") from exc
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{what} {redact(url)} is unreachable: {host}:{port}: {reason}") from exc


def sqlite_file(url: str) -> Path | None:
    """The resolved file of a SQLite URL; None for another scheme or an in-memory database."""
    parts = urlsplit(url)
    if parts.scheme.split("+")[0].lower() != "sqlite":
        return None
    path = unquote(parts.path)[1:] if parts.path.startswith("/") else unquote(parts.path)
    return None if path in ("", ":memory:") else Path(path).expanduser().resolve()


@contextmanager
def first_use_lock(url: str) -> Iterator[None]:
    """Hold, while this process touches the SQLite store at ``url``, a lock no other altrack
    process on this machine holds at once. MLflow creates and migrates a new database on first
    use, and processes doing that together fail (three at once on a fresh file: two or three of
    them failed) and can leave the file unusable for good (a leftover ``_alembic_tmp_tags``
    table). The lock is a file in the temp folder named after the database's path, so nothing
    new appears beside the user's database. Other stores need no lock: a server migrates once."""
    path = sqlite_file(url)
    if path is None:
        yield
        return
    name = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"altrack-store-{name}.lock"
    try:  # read-only and without O_CREAT: a lock file another user made opens too (flock needs no write)
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)
        with suppress(OSError):  # readable by other users whatever the umask (another's may have made it)
            os.fchmod(fd, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# filesystems of one machine's own disks or memory, on which SQLite's write-ahead log is safe. Its
# index is shared memory, which processes on different hosts of a network or cluster filesystem do
# not share (sqlite.org/wal.html), so the log is used only where the type is known to be local
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs", "tmpfs",
                               "overlay", "bcachefs", "nilfs2", "hfsplus", "apfs"})  # fmt: skip
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem ``path`` lies on: the mount with the longest mount point that
    holds it, the last one listed where one point is mounted over another (as the kernel does:
    an autofs point with NFS mounted on it is NFS). ``mounts`` is /proc/mounts' text (read when
    None); None where there is none (not Linux)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    best, kind = "", None
    target = str(path)
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])  # spaces, tabs: \040, \011
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def start_in_wal(url: str) -> bool:
    """Create the SQLite database at ``url``, not there yet, in write-ahead-log mode, before
    MLflow's first touch creates its tables. In its default rollback-journal mode each commit
    syncs a journal and the database, and MLflow commits several times per logged item: on this
    project's machine logging a model took 96 ms and a metric 24 ms, against 45 and 6.4 ms with
    the log, and creating the store 5.8 s against 2.2 s. The mode is kept in the file, so the
    MLflow UI and later runs use it too. An existing database is left as it is (switching needs
    every other connection closed), and so is one whose filesystem is not known to be local
    (``LOCAL_FILESYSTEMS``): on a network filesystem the log's shared index does not work. Where
    no mount table exists (macOS) the disk is taken as local. Call it under ``first_use_lock``.
    Returns whether it did."""
    path = sqlite_file(url)
    if path is None or path.exists():
        return False
    kind = filesystem_type(path.parent)
    if kind is not None and kind not in LOCAL_FILESYSTEMS:
        return False
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
