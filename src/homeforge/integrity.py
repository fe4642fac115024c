"""Integrity of what homeforge reads: sealed manifests, and files checked against them before use.

**Seal.** Every manifest carries ``seal = {format, digest, hmac?, key, key_id}``: ``digest`` is the
SHA-256 of the manifest's canonical JSON without the seal (every field: config, inputs, metrics,
privacy record, lineage, file hashes), so a hand edit of any field is caught. When this machine
has a signing key (the audit key, else the data key), ``hmac`` is HMAC-SHA256 over the same
bytes under a key derived from it, so an edit *with the digest recomputed* is caught too. With
a signing key present, a manifest that is not signed by one of this machine's keys (written
before the key existed, on another machine, or stripped of its signature) is refused until a
person adopts it (``homeforge verify --adopt DIR``: every file re-checked, then signed).
Without any key, unsigned manifests are read (their digest is still checked).

**Verify on load.** ``verified_load(path)`` checks, before the loader's result may be used:
the seal, that every recorded file is present with its recorded size, that no file the
manifest does not list was added, and every file's SHA-256. Hashing runs in a background
thread while the loader reads the same files (the page cache serves the second reader), and
after the hashes, every file's identity (inode, size, mtime, ctime) is compared with the one
that was hashed, so a file swapped or rewritten during the load is caught. A mismatch raises
``IntegrityError`` naming the file; an exception the loader raised on a damaged file is
replaced by that error.

**Verified-hash cache**: ``hashcache`` (hashes of unchanged files are not recomputed).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homeforge import paths
from homeforge._fs import last_line
from homeforge.errors import ArtifactError
from homeforge.hashcache import file_digest, identity

MANIFEST = "homeforge.json"
SEAL_FORMAT = "homeforge-seal-v1"
_SUBKEY_LABEL = b"homeforge manifest seal v1"


class IntegrityError(ArtifactError):
    """An artifact whose files or manifest do not match what was recorded when it was made."""


# --------------------------------------------------------------------------- process switches (set by the CLI)

_state: dict[str, Any] = {"verify": True, "skipped": []}


def set_verify(enabled: bool, new_command: bool = False) -> None:
    """``homeforge --no-verify``: skip checks on load (audited: see ``skipped()``); ``new_command`` also
    forgets what earlier commands of this process skipped."""
    _state["verify"] = enabled
    if new_command:
        _state["skipped"] = []


def verify_enabled() -> bool:
    return _state["verify"]


def note_skipped(path: str | Path) -> None:
    _state["skipped"].append(str(Path(path).absolute()))


def skipped() -> list[str]:
    """Artifacts loaded without verification in this process (for the command's audit line)."""
    return list(dict.fromkeys(_state["skipped"]))


# --------------------------------------------------------------------------- signing keys


@dataclass(frozen=True)
class SealKey:
    kind: str  # "audit" | "data"
    key_id: str
    secret: bytes = field(repr=False)

    def mac(self, body: bytes) -> str:
        sub = hmac.new(self.secret, _SUBKEY_LABEL, hashlib.sha256).digest()
        return hmac.new(sub, body, hashlib.sha256).hexdigest()


def local_keys() -> list[SealKey]:
    """This machine's signing keys, preferred first: the audit key, then the data key.

    A key file others can read is refused here as everywhere (``keys.check_permissions``)."""
    from homeforge.security import keys

    out = []
    audit = paths.audit_key_file()
    if audit.is_file():
        k = keys.read_key_file(audit)
        out.append(SealKey("audit", k.key_id, k.secret))
    data = keys.load_key(required=False)
    if data is not None and all(k.key_id != data.key_id for k in out):
        out.append(SealKey("data", data.key_id, data.secret))
    return out


# --------------------------------------------------------------------------- seal


def canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "seal"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def seal(manifest: dict, key: SealKey | None | str = "local") -> dict:
    """``manifest`` with a fresh ``seal`` (digest, and an HMAC when a signing key is given or local)."""
    m = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "seal"}, default=str))  # as read back
    if key == "local":
        found = local_keys()
        key = found[0] if found else None
    body = canonical(m)
    s: dict[str, Any] = {"format": SEAL_FORMAT, "digest": hashlib.sha256(body).hexdigest()}
    if key is not None:
        s.update(key=key.kind, key_id=key.key_id, hmac=key.mac(body))
    m["seal"] = s
    return m


@dataclass
class SealStatus:
    state: str  # "signed" | "digest" (no key here; digest checked) | "unsealed" (older homeforge, no key here)
    detail: str


def check_seal(manifest: dict, where: Path | str) -> SealStatus:
    """Raise IntegrityError if the manifest was edited (digest/HMAC) or, with a signing key on this machine,
    is not signed by one of its keys; else say how far it could be checked."""
    keys = local_keys()
    s = manifest.get("seal")
    adopt = f"homeforge verify --adopt {Path(where).parent}"
    if not isinstance(s, dict) or (keys and not s.get("hmac")):
        if keys:
            raise IntegrityError(
                f"the manifest {where} is not signed, and this machine has a signing key ({keys[0].kind} key "
                f"{keys[0].key_id}): it was written before the key existed, by an older homeforge or elsewhere, or "
                "its signature was removed", where=str(where),
                fix=f"re-run the stage that made it, or if you trust it: `{adopt}` (re-checks every file, then signs it)")
        return SealStatus("unsealed", "manifest not sealed (written by an older homeforge): its fields are not covered")
    body = canonical(manifest)
    if s.get("digest") != hashlib.sha256(body).hexdigest():
        raise IntegrityError(f"the manifest {where} was edited after it was written: its seal does not match its "
                             "content (config, inputs, metrics, files or lineage changed)", where=str(where),
                             fix="restore the artifact from a backup or re-run the stage that made it")
    mine = next((k for k in keys if k.key_id == s.get("key_id")), None)
    if mine is not None:
        if not hmac.compare_digest(str(s.get("hmac", "")), mine.mac(body)):
            raise IntegrityError(f"the manifest {where} has a forged signature (HMAC does not match {mine.kind} key "
                                 f"{mine.key_id}): it was edited", where=str(where),
                                 fix="restore the artifact from a backup or re-run the stage that made it")
        return SealStatus("signed", f"manifest signed with this machine's {mine.kind} key {mine.key_id}")
    if keys:
        who = f"key {s['key_id']}, which is not on this machine" if s.get("key_id") else "no key"
        fix = f"re-run the stage here, or if you trust it: `{adopt}` (re-checks every file, then signs it)"
        if s.get("key") == "data":
            fix = ("if it was made with another data key, use that key (HOMEFORGE_KEY_FILE, HOMEFORGE_KEY or "
                   f"HOMEFORGE_KEY_COMMAND); else {fix}")
        raise IntegrityError(
            f"the manifest {where} is signed with {who}; this machine signs with {keys[0].kind} key {keys[0].key_id}",
            where=str(where), fix=fix)
    if s.get("key_id"):
        return SealStatus("digest", f"digest checked; HMAC not checked (key {s['key_id']} is not on this machine)")
    return SealStatus("digest", "digest checked (no signing key when it was written)")


# --------------------------------------------------------------------------- checking an artifact


def artifact_root(path: Path) -> Path | None:
    """The artifact ``path`` is (or lies in, up to two levels deep), or None."""
    p = Path(path).absolute()
    for cand in (p, p.parent, p.parent.parent):
        if (cand / MANIFEST).is_file():
            return cand
    return None


def read_manifest_file(root: Path) -> dict:
    mf = root / MANIFEST
    try:
        m = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"the manifest of {root} is unreadable ({exc})", where=str(mf),
                             fix="restore it from a backup or re-run the stage with --force") from None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict) or "content_hash" not in m:
        raise IntegrityError(f"the manifest of {root} is damaged (no file list)", where=str(mf),
                             fix="restore it from a backup or re-run the stage with --force")
    return m


def files_hash(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def check_structure(root: Path, manifest: dict, rels: list[str] | None = None) -> None:
    """Cheap checks, before any loader runs: file list hash, every file present with its size, nothing added."""
    files: dict[str, str] = manifest["files"]
    sizes: dict[str, int] = manifest.get("sizes", {})
    if files_hash(files) != manifest["content_hash"]:
        raise IntegrityError(f"the manifest of {root} was edited: its file list does not match its content hash",
                             where=str(root / MANIFEST), fix="restore the artifact or re-run the stage with --force")
    for rel in rels if rels is not None else files:
        fp = root / rel
        try:
            st = fp.stat()
        except OSError:
            raise IntegrityError(f"artifact {root} is incomplete: {rel} is missing", where=str(fp),
                                 fix="restore the file, or re-run the stage that made it (with --force)") from None
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"artifact {root} is damaged: {rel} is not a regular file", where=str(fp),
                                 fix="re-run the stage that made it (with --force)")
        if rel in sizes and st.st_size != sizes[rel]:
            how = "truncated" if st.st_size < sizes[rel] else "longer than recorded"
            raise IntegrityError(f"artifact {root} is corrupted: {rel} is {how} ({st.st_size} bytes, recorded "
                                 f"{sizes[rel]})", where=str(fp), fix="restore the file or re-run the stage (with --force)")
    added = unexpected_files(root, files, under=_common_prefix(rels))
    if added:
        raise IntegrityError(f"artifact {root} holds {added[0]}, which its manifest does not list (added after it "
                             "was made)" + (f", and {len(added) - 1} more" if len(added) > 1 else ""),
                             where=str(root / added[0]), fix="remove what was added, or re-run the stage (with --force)")


def _common_prefix(rels: list[str] | None) -> str:
    if not rels:
        return ""
    return os.path.commonpath(rels) if len(rels) > 1 or "/" in rels[0] else ""


def unexpected_files(root: Path, files: dict[str, str], under: str = "") -> list[str]:
    """Regular, non-hidden files under ``root`` (or its subfolder ``under``) not in ``files``."""
    base = root / under if under and (root / under).is_dir() else root
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or name == MANIFEST and dirpath == str(root):
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel not in files:
                out.append(rel)
    return sorted(out)


class Hashing:
    """Hash some files of an artifact in a background thread; ``result()`` joins and raises the first mismatch."""

    def __init__(self, root: Path, manifest: dict, rels: list[str]):
        self.root, self.manifest, self.rels = root, manifest, rels
        self.problem: IntegrityError | None = None
        self.seen: dict[str, tuple] = {}
        self.thread = threading.Thread(target=self._run, name="homeforge-verify", daemon=True)

    def start(self) -> Hashing:
        self.thread.start()
        return self

    def _run(self) -> None:
        files = self.manifest["files"]
        for rel in self.rels:
            fp = self.root / rel
            try:
                digest, st = file_digest(fp)
            except OSError as exc:
                self.problem = IntegrityError(f"artifact {self.root}: {rel} cannot be read ({exc.strerror or exc})",
                                              where=str(fp), fix="restore the file or re-run the stage")
                return
            self.seen[rel] = identity(st)
            if digest != files[rel]:
                self.problem = IntegrityError(
                    f"artifact {self.root} is corrupted: {rel} does not match its recorded hash (it was modified, "
                    "replaced or damaged after the artifact was made); nothing of it was used",
                    where=str(fp), fix="restore the file from a backup, or re-run the stage that made it (with --force)")
                return

    def result(self) -> None:
        if self.thread.ident is not None:  # (hash_files runs it in the caller's thread)
            self.thread.join()
        if self.problem is not None:
            raise self.problem
        for rel, ident in self.seen.items():  # changed while the loader read it?
            try:
                now = identity((self.root / rel).stat())
            except OSError:
                now = None
            if now != ident:
                raise IntegrityError(f"artifact {self.root}: {rel} changed while it was being loaded",
                                     where=str(self.root / rel), fix="load it again when nothing else writes to it")


def hash_files(root: Path, manifest: dict, rels: list[str]) -> None:
    """Hash ``rels`` now (in this thread) and raise the first mismatch with ``manifest`` (already sealed-checked)."""
    h = Hashing(root, manifest, rels)
    h._run()
    h.result()


def open_manifest(root: Path) -> dict | None:
    """The checked manifest of artifact ``root`` (seal, and every file present with its size, nothing added);
    None when verification is off (recorded for the audit line) or ``root`` has no manifest."""
    if not (root / MANIFEST).is_file():
        return None
    if not verify_enabled():
        note_skipped(root)
        return None
    manifest = read_manifest_file(root)
    check_seal(manifest, root / MANIFEST)
    check_structure(root, manifest)
    return manifest


def open_artifact(path: str | Path, rels: list[str] | None = None) -> tuple[Path, dict, Hashing] | None:
    """Start checking the artifact ``path`` is (or lies in): seal and structure now, hashes in the background.

    ``rels``: only these files (default: every file under ``path``, or ``path`` itself and its
    companions ``path.*`` when it is a file). None when ``path`` is not in an
    artifact (a plain directory from elsewhere: nothing was recorded to check it against)."""
    p = Path(path).absolute()
    root = artifact_root(p)
    if root is None:
        return None
    if not verify_enabled():
        note_skipped(root)
        return None
    manifest = read_manifest_file(root)
    check_seal(manifest, root / MANIFEST)
    if rels is None and p.is_file():  # one file (and its companions, e.g. model.onnx + model.onnx.data)
        rel = p.relative_to(root).as_posix()
        rels = [r for r in manifest["files"] if r == rel or r.startswith(rel + ".")] or [rel]
    if rels is None:
        sub = "" if p == root else p.relative_to(root).as_posix() + "/"
        rels = [r for r in manifest["files"] if r.startswith(sub)]
        if not rels and sub:
            raise IntegrityError(f"{p} lies in the artifact {root}, whose manifest lists no file under it", where=str(p),
                                 fix="restore the artifact or re-run the stage that made it")
    else:
        missing = [r for r in rels if r not in manifest["files"]]
        if missing:
            raise IntegrityError(f"artifact {root}: {missing[0]} is not in its manifest", where=str(root / missing[0]),
                                 fix="restore the artifact or re-run the stage that made it")
    check_structure(root, manifest, rels)
    return root, manifest, Hashing(root, manifest, rels).start()


@contextlib.contextmanager
def verified_load(path: str | Path, rels: list[str] | None = None) -> Iterator[dict | None]:
    """Check ``path``'s artifact while the block loads it; leave only when every file matched.

    Yields the manifest (None for a directory that is not an artifact). An exception raised by the
    loader on a damaged file is replaced by the integrity error that names the file."""
    opened = open_artifact(path, rels)
    if opened is None:
        yield None
        return
    _root, manifest, hashing = opened
    try:
        yield manifest
    except BaseException:
        hashing.thread.join()
        if hashing.problem is not None:
            raise hashing.problem from None
        raise
    hashing.result()


def check_now(path: str | Path, rels: list[str] | None = None) -> dict | None:
    """``verified_load`` for readers that read later: check everything now, return the manifest."""
    with verified_load(path, rels) as manifest:
        return manifest


# --------------------------------------------------------------------------- audit anchor


def audit_anchor() -> dict | None:
    """The audit log's current last line (seq and hash), written into every manifest so that lines cut
    from the end of the log contradict the (sealed) artifacts made after them."""
    log = paths.audit_log()
    try:
        with open(log, "rb") as f:
            line = last_line(f)
    except OSError:
        return None
    if not line:
        return None
    try:
        seq = int(json.loads(line)["seq"])
    except (ValueError, KeyError, TypeError):
        return None
    return {"log": str(log.absolute()), "seq": seq, "hash": hashlib.sha256(line).hexdigest()}


def adopt(path: str | Path, key: SealKey | None = None) -> dict:
    """Sign an artifact's manifest with this machine's key after checking every file against it."""
    from homeforge._fs import atomic_write_text

    root = Path(path).absolute()
    manifest = read_manifest_file(root)
    s = manifest.get("seal")
    if isinstance(s, dict) and s.get("digest") != hashlib.sha256(canonical(manifest)).hexdigest():
        raise IntegrityError(f"the manifest of {root} was edited after it was written; refusing to adopt it",
                             where=str(root / MANIFEST), fix="restore the artifact or re-run the stage")
    check_structure(root, manifest)
    Hashing(root, manifest, list(manifest["files"])).start().result()
    keys = [key] if key is not None else local_keys()
    if not keys:
        raise IntegrityError("there is no signing key on this machine", fix="create one with `homeforge keys init`")
    previous = {k: s.get(k) for k in ("key", "key_id")} if isinstance(s, dict) else None
    manifest["adopted"] = [*manifest.get("adopted", []), {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                           "previous_signature": previous}]
    sealed = seal(manifest, keys[0])
    atomic_write_text(root / MANIFEST, json.dumps(sealed, indent=2, default=str))
    return sealed


__all__ = ["IntegrityError", "SealKey", "adopt", "audit_anchor", "check_now", "check_seal", "file_digest",
           "local_keys", "open_artifact", "seal", "set_verify", "skipped", "verified_load"]
