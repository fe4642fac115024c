"""Artifact directories: atomic writes, manifests, content hashes, skip-if-unchanged.

Every stage writes one directory. It is built in a private temp dir beside the target,
every file is fsynced, the manifest (``homeforge.json``) is written last, and the temp
dir is renamed into place. A reader therefore sees either no artifact or a complete one;
``verify`` re-hashes the files to detect later corruption.

The manifest holds: stage, fingerprint (hash of stage + resolved config + input hashes),
the resolved config, input hashes and where the inputs were (``input_paths``: absolute, and
relative to the artifact), per-file hashes and sizes, the artifact's content hash, versions,
host facts, timings, metrics, the audit log's head when it was made (``audit``), and a
``seal`` over all of it (``integrity``: digest, and an HMAC when a signing key exists).

With ``encrypt`` the stage writes its files into a private folder in memory-backed storage
(``scratch.memory_dir``); they are encrypted from there into the temp dir beside the target,
so plaintext never reaches the output's disk.

A stage starts with ``plan(out, stage=..., config=..., inputs=..., force=..., encrypt=...)``:
it hashes the inputs, says whether ``out`` is already up to date, and refuses (before any
work) to replace anything at ``out`` that is not this stage's own artifact of the same
inputs, unless forced. ``Plan.write()`` then builds the artifact.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import platform
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from homeforge import integrity, scratch
from homeforge._fs import (
    fsync_tree,
    pid_alive,
    sha256_json,
    swap_dir,
)
from homeforge.errors import ArtifactError, HomeforgeError

MANIFEST = integrity.MANIFEST
FORMAT_VERSION = 2  # 2: sealed manifests, input_paths, audit anchor (format 1 is still read)


# --------------------------------------------------------------------------- hashing


def hash_tree(root: str | Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every regular file under ``root``, keyed by POSIX relative path."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel not in exclude:
                out[rel] = integrity.file_digest(p)[0]
    return out


def content_hash(files: dict[str, str]) -> str:
    return integrity.files_hash(files)


def hash_input(path: str | Path) -> str:
    """Hash of one input: an artifact's recorded content hash, a file's or a folder's bytes."""
    p = Path(path)
    if not p.exists():
        raise HomeforgeError(f"input {p} does not exist", fix="check the path")
    if p.is_dir():
        if (p / MANIFEST).is_file():
            return read_manifest(p)["content_hash"]
        return content_hash(hash_tree(p, exclude=()))
    return integrity.file_digest(p)[0]


def fingerprint(stage: str, config: dict, input_hashes: dict[str, str], encrypt: bool = False) -> str:
    payload = {"stage": stage, "config": config, "inputs": input_hashes, "format": 1}  # unchanged by format 2
    if encrypt:
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


def read_manifest(path: str | Path, check: bool = True) -> dict:
    """Read and sanity-check an artifact's manifest; raise ArtifactError if missing/corrupt.

    ``check``: also its seal (``integrity.check_seal``): an edited manifest, or with a signing key
    on this machine one it did not sign, is refused. Only code that decides whether a folder may be
    replaced reads without it."""
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
    if not isinstance(manifest, dict):
        raise ArtifactError(f"the manifest of {p} is not a JSON object", where=str(mf), fix="re-run the stage with --force")
    for key in ("stage", "fingerprint", "files", "content_hash"):
        if key not in manifest:
            raise ArtifactError(f"the manifest of {p} lacks {key!r}", where=str(mf), fix="re-run the stage with --force")
    if check:
        integrity.check_seal(manifest, mf)
    return manifest


def verify(path: str | Path, deep: bool = True) -> dict:
    """Check the manifest's seal and every file it records: present, same size, nothing added (and the same
    hash if deep; unchanged files come from the verified-hash cache).

    Returns the manifest; raises ArtifactError (``integrity.IntegrityError``) naming the first problem.
    """
    p = Path(path).absolute()
    manifest = read_manifest(p)
    integrity.check_structure(p, manifest)
    if deep:
        integrity.Hashing(p, manifest, list(manifest["files"])).start().result()
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


# --------------------------------------------------------------------------- what is at the output path


def existing(out: Path) -> tuple[str, str] | None:
    """What is at ``out``: None (nothing, or an empty folder), else (kind, words) with kind
    ``artifact`` (a homeforge artifact) or ``foreign`` (a file or a folder homeforge did not write)."""
    if not out.exists() and not out.is_symlink():
        return None
    if out.is_symlink() or not out.is_dir():
        return "foreign", "a file"
    if not any(out.iterdir()):
        return None
    try:
        m = read_manifest(out, check=False)
    except ArtifactError:
        return "foreign", f"a folder homeforge did not write ({sum(1 for _ in out.rglob('*'))} entries)"
    return "artifact", f"a `{m.get('stage')}` artifact made {m.get('created', '?')}"


def _own_artifact(out: Path, stage: str, input_hashes: dict[str, str]) -> bool:
    """``out`` is this stage's artifact of the same inputs (so re-running with another config may replace it)."""
    try:
        m = read_manifest(out, check=False)
    except ArtifactError:
        return False
    return m.get("stage") == stage and m.get("inputs") == input_hashes


def check_replaceable(out: Path, stage: str, input_hashes: dict[str, str], force: bool) -> tuple[str, str] | None:
    """Refuse, before any work, to replace what this stage did not write from these inputs.

    Returns ``existing(out)`` when it may be replaced. With ``force`` anything may be replaced;
    a file or folder homeforge did not write is then moved aside, never deleted (``Plan.write``)."""
    found = existing(out)
    if found is None or force or _own_artifact(out, stage, input_hashes):
        return found
    raise HomeforgeError(
        f"{out} already exists and is {found[1]}, not this `{stage}` stage's output for these inputs; "
        "nothing was changed",
        where=str(out),
        fix="choose another output directory, or pass --force to replace it (what homeforge did not write "
            "is then moved aside to NAME.replaced-TIME, never deleted)",
    )


def check_writable(out: Path) -> None:
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise HomeforgeError(
            f"cannot write to {out}: {probe} is not writable",
            where=str(probe),
            fix="choose another output directory (--output) or fix its permissions",
        )


def clean_stale_temps(parent: Path) -> list[Path]:
    """Remove temp dirs of killed writers (``.NAME.tmp-PID-*`` whose PID is gone) in ``parent``."""
    removed = []
    if not parent.is_dir():
        return removed
    for tmp in parent.glob(".*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        except (ValueError, IndexError):
            continue
        if tmp.is_dir() and not pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


# --------------------------------------------------------------------------- writing


@dataclass
class ArtifactWriter:
    """Handle given to a stage while it builds its artifact in ``dir`` (a private temp dir)."""

    out: Path
    dir: Path
    stage: str
    config: dict
    inputs: dict[str, str]
    fingerprint: str
    input_paths: dict[str, dict] = field(default_factory=dict)
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
        """The sealed manifest of what is in ``dir`` now."""
        files = hash_tree(self.dir)
        sizes = {rel: (self.dir / rel).stat().st_size for rel in files}
        return integrity.seal({
            "format": FORMAT_VERSION,
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": self.inputs,
            "input_paths": self.input_paths,
            "config": self.config,
            "metrics": self.metrics,
            **self.extra,
            "versions": versions(),
            "host": host_facts(),
            "timings": {"total_s": round(time.time() - self.started, 3), **self.timings},
            "audit": integrity.audit_anchor(),
            "files": files,
            "sizes": sizes,
            "content_hash": content_hash(files),
        })


def input_locations(out: Path, inputs: dict[str, str | Path]) -> dict[str, dict]:
    """Where each input was: its absolute path, the same relative to the artifact, and the working directory."""
    cwd = os.getcwd()
    locs = {}
    for name, p in inputs.items():
        a = Path(p).expanduser().absolute()
        try:
            rel = os.path.relpath(a, out)
        except ValueError:  # another drive (Windows)
            rel = None
        locs[name] = {"path": str(a), "from_artifact": rel, "cwd": cwd}
    return locs


@dataclass
class Plan:
    """A stage's output, decided before any work: ``up_to_date`` or ``write()`` it."""

    out: Path
    stage: str
    config: dict
    inputs: dict[str, str]
    fingerprint: str
    force: bool = False
    encrypt: bool = False
    moved_aside: Path | None = None  # where a replaced foreign file/folder went (set by write)
    input_paths: dict[str, dict] = field(default_factory=dict)

    @property
    def up_to_date(self) -> bool:
        return not self.force and is_up_to_date(self.out, self.fingerprint)

    @contextlib.contextmanager
    def write(self) -> Iterator[ArtifactWriter]:
        """Build the artifact atomically. On any exception the target is left untouched.

        With ``encrypt`` the data files are encrypted (``security.atrest``) before the manifest
        is written; the key is loaded first, so a missing key fails before any work."""
        from homeforge.security import atrest

        key = atrest.load_key_for(self.encrypt)
        found = check_replaceable(self.out, self.stage, self.inputs, self.force)
        check_writable(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.out.parent)
        tmp = scratch.private_dir(self.out.parent, self.out.name)
        build = tmp
        if key is not None:  # plaintext only in memory-backed storage; encrypted into tmp at the end
            build = scratch.memory_dir(self.out.name) or tmp
            if build == tmp:
                scratch.warn_once("no-scratch", "no memory-backed storage (/dev/shm) for the plaintext of an encrypted "
                                  f"stage: it is built in {tmp} (mode 700) and removed when the stage ends or, after "
                                  "a crash, at the next homeforge command; set HOMEFORGE_SCRATCH to a tmpfs to avoid it")
        writer = ArtifactWriter(out=self.out, dir=build, stage=self.stage, config=self.config, inputs=self.inputs,
                                fingerprint=self.fingerprint, input_paths=self.input_paths)
        try:
            try:
                yield writer
            except OSError as exc:
                if build != tmp and exc.errno == 28:  # ENOSPC in the memory-backed folder
                    raise HomeforgeError(f"the memory-backed work area {build.parent} is full ({exc.strerror})",
                                         where=str(build.parent),
                                         fix="free memory, or set HOMEFORGE_SCRATCH to a larger tmpfs or to a "
                                             "folder on an encrypted filesystem") from None
                raise
            if key is not None:
                writer.extra["encryption"] = atrest.encrypt_tree(build, key, into=tmp)
                if build != tmp:
                    scratch.release(build)
                    writer.dir = tmp
            manifest = writer.manifest()
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
            os.chmod(tmp, 0o755)  # private while it was built; an artifact is readable like any folder
            fsync_tree(tmp)
            if found is not None and found[0] == "foreign":
                self.moved_aside = self.out.with_name(f"{self.out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            swap_dir(tmp, self.out, keep_old=self.moved_aside)
            scratch.unregister(tmp)
        except BaseException:
            if build != tmp:
                scratch.release(build)
            scratch.release(tmp)
            raise


def plan(
    out: str | Path,
    *,
    stage: str,
    config: dict,
    inputs: dict[str, str | Path] | None = None,
    force: bool = False,
    encrypt: bool = False,
) -> Plan:
    """Resolve the output, hash the inputs, fingerprint; refuse a foreign ``out`` now, before any work
    (unless it is up to date, which the caller then skips)."""
    out_p = Path(out).expanduser().absolute()
    input_hashes = {name: hash_input(p) for name, p in (inputs or {}).items()}
    p = Plan(out_p, stage, config, input_hashes, fingerprint(stage, config, input_hashes, encrypt), force, encrypt,
             input_paths=input_locations(out_p, inputs or {}))
    if not p.up_to_date:
        check_replaceable(out_p, stage, input_hashes, force)
        check_writable(out_p)
        if encrypt:  # a missing data key fails now, before the stage's work
            from homeforge.security import atrest

            atrest.load_key_for(True)
    return p


@contextlib.contextmanager
def write_artifact(
    out: str | Path,
    *,
    stage: str,
    config: dict,
    inputs: dict[str, str | Path] | None = None,
    force: bool = False,
    encrypt: bool = False,
) -> Iterator[ArtifactWriter]:
    """``plan(...).write()`` in one call, for stages with nothing to skip."""
    with plan(out, stage=stage, config=config, inputs=inputs, force=force, encrypt=encrypt).write() as w:
        yield w
