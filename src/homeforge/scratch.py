"""Temp folders that stages write into, and removing what a crashed process left behind.

Every temp folder homeforge writes (an artifact being built, a checkpoint being saved, an
encrypted stage's plaintext in memory-backed storage, a decrypted tokenizer) is private
(0700) and registered in ``$HOMEFORGE_HOME/pending/`` under the writing process's id and
start time. The registration is removed with the folder when the work ends. A process killed
with -9 cannot clean up, so the next start of any homeforge command (``clean_leftovers``,
called by the CLI) deletes the folders of processes that no longer exist, and ``homeforge
doctor`` lists what it removed. Only folders with homeforge's temp names are ever deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from homeforge import paths
from homeforge._fs import private_temp_dir

_removed: list[str] = []  # what clean_leftovers removed in this process (doctor shows it)
_warned: set[str] = set()


def process_start(pid: int) -> str | None:
    """A token that identifies a process over PID reuse (its start time), None if it does not exist."""
    try:
        import psutil

        return f"{psutil.Process(pid).create_time():.3f}"
    except Exception:  # gone, or no permission to look (then it exists: say so)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"


_self_start: str | None = None


def _entry_name() -> str:
    global _self_start
    if _self_start is None:
        _self_start = process_start(os.getpid()) or "?"
    return f"{os.getpid()}-{_self_start}-{uuid.uuid4().hex[:8]}"


def register(path: Path) -> Path | None:
    """Record that this process is writing ``path``; returns the registration (None if it cannot be kept)."""
    try:
        d = paths.pending_dir()
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        entry = d / _entry_name()
        fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(str(Path(path).absolute()))
        return entry
    except OSError:
        return None


def unregister(path: Path) -> None:
    target = str(Path(path).absolute())
    d = paths.pending_dir()
    prefix = f"{os.getpid()}-"
    with contextlib.suppress(OSError):
        for entry in d.iterdir():
            if entry.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    if entry.read_text(encoding="utf-8") == target:
                        entry.unlink()


def private_dir(parent: Path, prefix: str) -> Path:
    """A registered 0700 temp folder ``.PREFIX.tmp-PID-RANDOM`` inside ``parent``."""
    tmp = private_temp_dir(parent, prefix)
    register(tmp)
    return tmp


def memory_dir(prefix: str) -> Path | None:
    """A registered 0700 folder in memory-backed storage (``paths.scratch_dir``), None if there is none."""
    base = paths.scratch_dir()
    if base is None:
        return None
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / f"homeforge-{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(mode=0o700)
        os.chmod(tmp, 0o700)
    except OSError:
        return None
    register(tmp)
    return tmp


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        import sys

        print(f"warning: {message}", file=sys.stderr)


def release(path: Path) -> None:
    """Delete a registered temp folder (if still there) and its registration."""
    shutil.rmtree(path, ignore_errors=True)
    unregister(path)


def _ours(path: Path) -> bool:
    """Only homeforge's temp folder names are ever deleted, whatever a registration file says."""
    name = path.name
    return ".tmp-" in name or name.startswith(("homeforge-tok-", ".tmp-"))


def clean_leftovers() -> list[str]:
    """Delete the registered temp folders of processes that no longer run; returns what was removed."""
    d = paths.pending_dir()
    removed = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    for entry in entries:
        try:
            pid_s, start, _rest = entry.name.split("-", 2)
            pid = int(pid_s)
        except ValueError:
            continue
        now = process_start(pid)
        if now is not None and (now == start or "?" in (now, start)):
            continue  # still running
        try:
            target = Path(entry.read_text(encoding="utf-8").strip())
        except OSError:
            continue
        if target.exists() and _ours(target):
            shutil.rmtree(target, ignore_errors=True)
            if not target.exists():
                removed.append(str(target))
        with contextlib.suppress(OSError):
            if not target.exists():
                entry.unlink()
    _removed.extend(removed)
    return removed


def removed_this_run() -> list[str]:
    return list(_removed)


def pending() -> list[tuple[int, str]]:
    """(pid, folder) of every registered temp folder (running or not)."""
    out = []
    with contextlib.suppress(OSError):
        for entry in paths.pending_dir().iterdir():
            with contextlib.suppress(OSError, ValueError):
                out.append((int(entry.name.split("-", 1)[0]), entry.read_text(encoding="utf-8").strip()))
    return out
