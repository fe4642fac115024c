"""Artifact directories: atomic writes, manifests, content hashes, skip-if-unchanged.

Every stage writes one directory. It is built in a hidden temp dir beside the target,
every file is fsynced, the manifest (``homeforge.json``) is written last, and the temp
dir is renamed into place. A reader therefore sees either no artifact or a complete one;
``verify`` re-hashes the files to detect later corruption.

The manifest holds: stage, fingerprint (hash of stage + resolved config + input hashes),
the resolved config, input hashes, per-file hashes and the artifact's content hash,
versions, host facts, timings and metrics.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import platform
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from homeforge.errors import ArtifactError, HomeforgeError

MANIFEST = "homeforge.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def hash_tree(root: str | Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every regular file under ``root``, keyed by POSIX relative path."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel not in exclude:
                out[rel] = sha256_file(p)
    return out


def content_hash(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def hash_input(path: str | Path) -> str:
    """Hash of one input: an artifact's recorded content hash, a file's or a folder's bytes."""
    p = Path(path)
    if not p.exists():
        raise HomeforgeError(f"input {p} does not exist", fix="check the path")
    if p.is_dir():
        if (p / MANIFEST).is_file():
            return read_manifest(p)["content_hash"]
        return content_hash(hash_tree(p, exclude=()))
    return sha256_file(p)


def fingerprint(stage: str, config: dict, input_hashes: dict[str, str]) -> str:
    payload = {"stage": stage, "config": config, "inputs": input_hashes, "format": FORMAT_VERSION}
    if os.environ.get("HOMEFORGE_ENCRYPT", "").lower() in ("1", "true", "yes", "on"):
        payload["encrypted"] = True  # a plain artifact is never "up to date" for an encrypted run
    return sha256_json(payload)


# --------------------------------------------------------------------------- facts


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("homeforge", "torch", "transformers", "tokenizers", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def host_facts() -> dict[str, Any]:
    import psutil

    return {
        "hostname": socket.gethostname(),
        "user": _user(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


# --------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> dict:
    """Read and sanity-check an artifact's manifest; raise ArtifactError if missing/corrupt."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"artifact {p} does not exist", fix="check the path, or create it with the stage that makes it")
    mf = p / MANIFEST
    if not mf.is_file():
        raise ArtifactError(
            f"{p} is not a complete homeforge artifact: it has no {MANIFEST}",
            where=str(p),
            fix="it may be half-written or made by another tool; re-run the stage that makes it (with --force)",
        )
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"the manifest of {p} is unreadable ({exc})", where=str(mf), fix="re-run the stage with --force") from None
    for key in ("stage", "fingerprint", "files", "content_hash"):
        if key not in manifest:
            raise ArtifactError(f"the manifest of {p} lacks {key!r}", where=str(mf), fix="re-run the stage with --force")
    return manifest


def verify(path: str | Path, deep: bool = True) -> dict:
    """Check every file recorded in the manifest: present, same size (and same hash if deep).

    Returns the manifest; raises ArtifactError naming the first problem.
    """
    p = Path(path)
    manifest = read_manifest(p)
    files: dict[str, str] = manifest["files"]
    sizes: dict[str, int] = manifest.get("sizes", {})
    if content_hash(files) != manifest["content_hash"]:
        raise ArtifactError(f"the manifest of {p} was edited: its file list does not match its content hash", where=str(p / MANIFEST))
    for rel, digest in files.items():
        fp = p / rel
        if not fp.is_file():
            raise ArtifactError(f"artifact {p} is incomplete: {rel} is missing", where=str(fp), fix="re-run the stage with --force")
        if rel in sizes and fp.stat().st_size != sizes[rel]:
            raise ArtifactError(f"artifact {p} is corrupted: {rel} has the wrong size", where=str(fp), fix="re-run the stage with --force")
        if deep and sha256_file(fp) != digest:
            raise ArtifactError(f"artifact {p} is corrupted: {rel} does not match its recorded hash", where=str(fp), fix="re-run the stage with --force")
    return manifest


def is_up_to_date(out: str | Path, fp: str) -> bool:
    """True if ``out`` is a complete artifact made from the same stage, config and inputs."""
    p = Path(out)
    if not (p / MANIFEST).is_file():
        return False
    try:
        manifest = verify(p, deep=False)
    except ArtifactError:
        return False
    return manifest.get("fingerprint") == fp


# --------------------------------------------------------------------------- writing


def fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem supports directory fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write one file atomically (temp file in the same dir, fsync, rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        _fsync_dir(p.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _clean_stale_temps(out: Path) -> None:
    """Remove temp dirs of earlier runs that were killed (their pid no longer exists)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_writable(out: Path) -> None:
    parent = out.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise HomeforgeError(
            f"cannot write to {out}: {probe} is not writable",
            where=str(probe),
            fix="choose another output directory (--output) or fix its permissions",
        )


@dataclass
class ArtifactWriter:
    """Handle given to a stage while it builds its artifact in ``dir`` (a temp dir)."""

    out: Path
    dir: Path
    stage: str
    config: dict
    inputs: dict[str, str]
    fingerprint: str
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 3)

    def manifest(self) -> dict:
        files = hash_tree(self.dir)
        sizes = {rel: (self.dir / rel).stat().st_size for rel in files}
        return {
            "format": FORMAT_VERSION,
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": self.inputs,
            "config": self.config,
            "metrics": self.metrics,
            **self.extra,
            "versions": versions(),
            "host": host_facts(),
            "timings": {"total_s": round(time.time() - self.started, 3), **self.timings},
            "files": files,
            "sizes": sizes,
            "content_hash": content_hash(files),
        }


def begin(
    out: str | Path,
    *,
    stage: str,
    config: dict,
    inputs: dict[str, str | Path] | None = None,
) -> tuple[Path, str, dict[str, str]]:
    """Resolve output path, hash inputs and compute the fingerprint (before any work)."""
    out_p = Path(out).expanduser().absolute()
    input_hashes = {name: hash_input(p) for name, p in (inputs or {}).items()}
    return out_p, fingerprint(stage, config, input_hashes), input_hashes


@contextlib.contextmanager
def write_artifact(
    out: str | Path,
    *,
    stage: str,
    config: dict,
    inputs: dict[str, str | Path] | None = None,
    force: bool = False,
    encrypt: bool | None = None,
) -> Iterator[ArtifactWriter]:
    """Build an artifact atomically. On any exception the target is left untouched.

    An existing directory at ``out`` is replaced only if ``force`` is set (or it is an
    artifact of the same fingerprint, which callers normally skip via ``is_up_to_date``).
    ``encrypt`` (default: ``--encrypt`` / ``HOMEFORGE_ENCRYPT``) encrypts the data files
    before the manifest is written (``security.storage``); the key is loaded first, so a
    missing key fails before any work.
    """
    from homeforge.security import storage

    if encrypt is None:
        encrypt = storage.encryption_requested() or bool(config.get("encrypt"))
    key = storage.load_key(required=True) if encrypt else None
    out_p, fp, input_hashes = begin(out, stage=stage, config=config, inputs=inputs)
    check_writable(out_p)
    if out_p.exists() and not force and not is_up_to_date(out_p, fp):
        raise HomeforgeError(
            f"{out_p} already exists and was not made from these inputs and config",
            where=str(out_p),
            fix="pass --force to replace it, or choose another output directory",
        )
    out_p.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(out_p)
    tmp = out_p.parent / f".{out_p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    writer = ArtifactWriter(out=out_p, dir=tmp, stage=stage, config=config, inputs=input_hashes, fingerprint=fp)
    try:
        yield writer
        if key is not None:
            writer.extra["encryption"] = storage.encrypt_tree(tmp, key)
        manifest = writer.manifest()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        fsync_tree(tmp)
        if out_p.exists():
            old = out_p.parent / f".{out_p.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(out_p, old)
            os.replace(tmp, out_p)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_p)
        _fsync_dir(out_p.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
