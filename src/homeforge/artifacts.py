"""Artifact directories: atomic writes, manifests, content hashes, skip-if-unchanged.

Every stage writes one directory. It is built in a private temp dir beside the target,
every file is fsynced, the manifest (``homeforge.json``) is written last, and the temp
dir is renamed into place. A reader therefore sees either no artifact or a complete one;
``verify`` re-hashes the files to detect later corruption.

The manifest holds: stage, fingerprint (hash of stage + resolved config + input hashes),
the resolved config, input hashes, per-file hashes and the artifact's content hash,
versions, host facts, timings and metrics.

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

from homeforge._fs import (
    fsync_tree,
    pid_alive,
    private_temp_dir,
    sha256_file,
    sha256_json,
    swap_dir,
)
from homeforge.errors import ArtifactError, HomeforgeError

MANIFEST = "homeforge.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- hashing


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
    import hashlib

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


def fingerprint(stage: str, config: dict, input_hashes: dict[str, str], encrypt: bool = False) -> str:
    payload = {"stage": stage, "config": config, "inputs": input_hashes, "format": FORMAT_VERSION}
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
    if not isinstance(manifest, dict):
        raise ArtifactError(f"the manifest of {p} is not a JSON object", where=str(mf), fix="re-run the stage with --force")
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
        m = read_manifest(out)
    except ArtifactError:
        return "foreign", f"a folder homeforge did not write ({sum(1 for _ in out.rglob('*'))} entries)"
    return "artifact", f"a `{m.get('stage')}` artifact made {m.get('created', '?')}"


def _own_artifact(out: Path, stage: str, input_hashes: dict[str, str]) -> bool:
    """``out`` is this stage's artifact of the same inputs (so re-running with another config may replace it)."""
    try:
        m = read_manifest(out)
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
        tmp = private_temp_dir(self.out.parent, self.out.name)
        writer = ArtifactWriter(out=self.out, dir=tmp, stage=self.stage, config=self.config, inputs=self.inputs,
                                fingerprint=self.fingerprint)
        try:
            yield writer
            if key is not None:
                writer.extra["encryption"] = atrest.encrypt_tree(tmp, key)
            manifest = writer.manifest()
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
            os.chmod(tmp, 0o755)  # private while it was built; an artifact is readable like any folder
            fsync_tree(tmp)
            if found is not None and found[0] == "foreign":
                self.moved_aside = self.out.with_name(f"{self.out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            swap_dir(tmp, self.out, keep_old=self.moved_aside)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
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
    p = Plan(out_p, stage, config, input_hashes, fingerprint(stage, config, input_hashes, encrypt), force, encrypt)
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
