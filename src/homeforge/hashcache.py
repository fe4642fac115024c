"""The verified-hash cache: SHA-256 of files, not recomputed while a file is unchanged.

**Verified-hash cache.** Re-hashing a 500 MB model on every load costs several times more than
memory-mapping it, so every hash computed (on load, and when an artifact is written) is
remembered in ``$HOMEFORGE_HOME/cache/verified-v1.sqlite`` keyed on the file's (device, inode)
with its (size, mtime_ns, ctime_ns); an artifact renamed into place keeps its files' inodes and
times, so the hashes taken while writing it serve its first load. What an attacker with write
access to the file can and cannot fake: size and mtime can be set back (``truncate``,
``touch -d``), an inode can be reused, but ctime is set by the kernel on every write, rename
or ``utime`` and cannot be set by a user process; only root (changing the clock, or writing the
raw block device) can rewrite a file while keeping its ctime. Timestamps are coarse (a clock
tick, or 1-2 s on some filesystems), so a hash is only remembered when the file's ctime and
mtime are older than the moment hashing began by more than that (``FINE_RACY_SECONDS`` where
timestamps have sub-second digits, else ``RACY_SECONDS``): a rewrite after the hash then
always gets a different ctime. The cache is as trusted as ``$HOMEFORGE_HOME`` itself (who can
write it can also replace the keys there). ``HOMEFORGE_VERIFY_CACHE=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

from homeforge import paths
from homeforge._fs import CHUNK

RACY_SECONDS = 2.0  # filesystems with 1-2 s timestamps (FAT, HFS+, ext3 small inodes)
FINE_RACY_SECONDS = 0.1  # filesystems with sub-second timestamps: a kernel clock tick is 1-10 ms


class _Cache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._path: Path | None = None

    def _conn(self) -> sqlite3.Connection | None:
        path = paths.verify_cache_file()
        if path is None:
            return None
        if self._db is not None and self._path == path:
            return self._db
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            db = sqlite3.connect(str(path), timeout=5, check_same_thread=False, isolation_level=None)
            db.execute("CREATE TABLE IF NOT EXISTS files (dev INT, ino INT, size INT, mtime INT, ctime INT, "
                       "digest TEXT, PRIMARY KEY (dev, ino))")
        except (OSError, sqlite3.Error):
            return None
        self._db, self._path = db, path
        return db

    def get(self, st: os.stat_result) -> str | None:
        with self._lock:
            db = self._conn()
            if db is None:
                return None
            try:
                row = db.execute("SELECT size, mtime, ctime, digest FROM files WHERE dev = ? AND ino = ?",
                                 (st.st_dev, st.st_ino)).fetchone()
            except sqlite3.Error:
                return None
        if row and tuple(row[:3]) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            return row[3]
        return None

    def put(self, st: os.stat_result, digest: str, started_ns: int) -> None:
        newest = max(st.st_ctime_ns, st.st_mtime_ns)
        fine = st.st_ctime_ns % 1_000_000_000 or st.st_mtime_ns % 1_000_000_000
        if started_ns - newest < (FINE_RACY_SECONDS if fine else RACY_SECONDS) * 1e9:
            return  # too fresh: a same-size rewrite in the same timestamp tick would look identical
        with self._lock:
            db = self._conn()
            if db is None:
                return
            with contextlib.suppress(sqlite3.Error):
                db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                           (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest))


_cache = _Cache()


def identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_digest(path: str | Path, use_cache: bool = True) -> tuple[str, os.stat_result]:
    """(SHA-256, the stat of the file that was hashed), from the cache when the file is unchanged."""
    p = Path(path).absolute()
    started = time.time_ns()
    with open(p, "rb") as f:
        st = os.fstat(f.fileno())
        if use_cache and (hit := _cache.get(st)) is not None:
            return hit, st
        h = hashlib.sha256()
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if use_cache:
        _cache.put(st, digest, started)
    return digest, st
