"""Whether a store URL can answer, asked in seconds and before anything is written.

MLflow retries an unreachable database for about 100 s and SQLAlchemy prints pages on the way;
Optuna creates a SQLite file's folder-less path with a traceback. One TCP probe (database servers)
or one folder check (SQLite files) says the same in one line. And a new SQLite store is created
by one process at a time (``first_use_lock``)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    with open(Path(tempfile.gettempdir()) / f"altrack-store-{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
