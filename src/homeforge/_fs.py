"""Filesystem primitives: hashing, fsync, atomic file writes, atomic folder swaps, locks.

A leaf module: it imports nothing of homeforge, so every layer (artifacts, security,
checkpoints, the audit log, the key store) can use it without import cycles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def fsync_dir(path: str | Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem supports directory fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: str | Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write one file atomically (temp file in the same dir, fsync, rename); ``mode`` e.g. 0o600."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        fsync_dir(p.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def swap_dir(new: Path, dest: Path, keep_old: Path | None = None) -> None:
    """Put the complete directory ``new`` at ``dest`` with renames; the old ``dest`` (if any) is
    deleted after the swap, or moved to ``keep_old`` when given. A crash leaves either the old or the
    new directory at ``dest`` (and at worst a hidden ``.NAME.old-*`` beside it), never a mix."""
    if dest.exists() or dest.is_symlink():
        old = keep_old or dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
        os.replace(new, dest)
        if keep_old is None:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)
    fsync_dir(dest.parent)


def private_temp_dir(parent: Path, prefix: str) -> Path:
    """A new directory only its owner can enter (0700), inside ``parent``: ``.PREFIX.tmp-PID-RANDOM``."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=0o700)
    os.chmod(tmp, 0o700)  # mkdir's mode is masked by the umask
    return tmp


def last_line(f) -> bytes | None:
    """The last non-empty line of an open binary file (reads backwards in blocks)."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if end == 0:
        return None
    buf = b""
    pos = end
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        stripped = buf.rstrip(b"\n")
        if b"\n" in stripped or pos == 0:
            return stripped.rsplit(b"\n", 1)[-1] if stripped else None
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def flock(f, exclusive: bool) -> None:
    """Advisory whole-file lock across processes (POSIX flock; a no-op where there is none)."""
    try:
        import fcntl
    except ImportError:  # Windows: callers' in-process locks still serialise threads
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_UN)


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the duration of the block."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+b") as f:
        flock(f, True)
        try:
            yield
        finally:
            flock(f, False)
