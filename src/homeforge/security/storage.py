"""Encrypted artifacts: which files are encrypted, the readers' helpers, key rotation.

An artifact written with encryption on (``homeforge --encrypt STAGE ...``,
``HOMEFORGE_ENCRYPT=1``, a stage's ``encrypt: true``) has its data files (token shards,
JSONL records, weights, checkpoints; ``atrest``) encrypted with ``crypto`` before the
manifest is written; the manifest hashes the ciphertext (so ``homeforge verify`` needs no
key) and records ``encryption: {format, key_id, files}``. Small metadata (manifest,
``index.json``, ``config.json``, the tokenizer, plots) stays readable.

Readers never look at the manifest to decide: every encrypted file starts with a magic
header, and the helpers below decrypt it transparently (plain files pass through).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from homeforge import artifacts, integrity
from homeforge._fs import fsync_tree, swap_dir
from homeforge.errors import HomeforgeError
from homeforge.security import crypto
from homeforge.security.atrest import TOKENIZER_FILES
from homeforge.security.keys import DataKey

# --------------------------------------------------------------------------- readers


@contextlib.contextmanager
def decrypted_tokenizer_dir(path: str | Path):
    """A directory ``AutoTokenizer.from_pretrained`` can read: ``path`` itself if nothing in it is
    encrypted, else a private (0700) copy in memory-backed /dev/shm (if present) with the
    tokenizer files decrypted, deleted on exit. Weights are never copied."""
    p = Path(path)
    if not any(crypto.is_encrypted(p / n) for n in TOKENIZER_FILES if (p / n).is_file()):
        yield p
        return
    import tempfile

    from homeforge import scratch

    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    tmp = Path(tempfile.mkdtemp(prefix="homeforge-tok-", dir=base))  # mode 0700
    scratch.register(tmp)  # removed at the next homeforge start if this process is killed
    try:
        for f in p.iterdir():
            if f.is_file() and (f.name in TOKENIZER_FILES or f.suffix in (".json", ".jinja", ".txt", ".model")):
                if f.name.endswith(".safetensors") or f.stat().st_size > 256 << 20:
                    continue
                fd = os.open(tmp / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(crypto.read_bytes(f))
        yield tmp
    finally:
        scratch.release(tmp)


def load_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """``safetensors.torch.load_file`` that also reads encrypted files (authenticated before use)."""
    from safetensors.torch import load, load_file

    if crypto.is_encrypted(path):
        return {k: v.to(device) for k, v in load(crypto.read_bytes(path)).items()}
    return load_file(str(path), device=device)


def safetensors_header(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header (plain or encrypted; reads the header only)."""
    import struct as _struct

    with crypto.open_read(path) as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise HomeforgeError(f"{path} is not a safetensors file", where=str(path), fix="re-run the stage that made it")
        (n,) = _struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise HomeforgeError(f"{path} has a corrupted safetensors header", where=str(path),
                                 fix="re-run the stage that made it")
        header = json.loads(f.read(n))
    return {k: (v["dtype"], list(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def torch_load(path: str | Path, **kwargs):
    """``torch.load`` that also reads encrypted files."""
    import torch

    if crypto.is_encrypted(path):
        return torch.load(io.BytesIO(crypto.read_bytes(path)), **kwargs)
    return torch.load(path, **kwargs)


def weight_files(model_dir: str | Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def has_encrypted_weights(model_dir: str | Path) -> bool:
    return any(crypto.is_encrypted(p) for p in weight_files(model_dir))


# --------------------------------------------------------------------------- rotation


def rotate_artifact(path: str | Path, old: DataKey, new: DataKey) -> int:
    """Re-encrypt an artifact's encrypted files under ``new``, atomically; returns files changed.

    A copy of the artifact is built beside it (encrypted files re-encrypted, others hard-linked
    or copied), its manifest updated (``files``, ``sizes``, ``content_hash``, ``encryption.key_id``
    and a ``rotations`` entry that remembers the previous content hash, so downstream
    manifests that recorded it still verify), and swapped in with renames. A crash leaves
    either the old or the new artifact, never a mix.
    """
    p = Path(path).absolute()
    manifest = artifacts.verify(p, deep=True)
    enc = manifest.get("encryption")
    if not enc:
        return 0
    if enc.get("key_id") == new.key_id:
        return 0
    if enc.get("key_id") != old.key_id:
        raise HomeforgeError(f"{p} is encrypted with key {enc.get('key_id')}, not with the current key {old.key_id}",
                             where=str(p), fix="set HOMEFORGE_KEY_FILE to the key that encrypted it")
    tmp = p.parent / f".{p.name}.rotate-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(p, tmp, copy_function=shutil.copy2)
        changed = 0
        for rel in enc["files"]:
            if crypto.reencrypt(tmp / rel, old, new):
                changed += 1
        files = artifacts.hash_tree(tmp)
        rotations = [*manifest.get("rotations", []),
                     {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "from_key_id": old.key_id,
                      "to_key_id": new.key_id, "previous_content_hash": manifest["content_hash"]}]
        manifest.update(files=files, sizes={rel: (tmp / rel).stat().st_size for rel in files},
                        content_hash=artifacts.content_hash(files), rotations=rotations,
                        encryption={**enc, "key_id": new.key_id})
        manifest = integrity.seal(manifest, seal_key_after_rotation(new))
        (tmp / artifacts.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        fsync_tree(tmp)
        swap_dir(tmp, p)
        return changed
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def seal_key_after_rotation(new: DataKey) -> integrity.SealKey:
    """The key manifests are signed with once ``new`` replaces the data key: the audit key if there is one."""
    audit = [k for k in integrity.local_keys() if k.kind == "audit"]
    return audit[0] if audit else integrity.SealKey("data", new.key_id, new.secret)


def find_artifacts(root: str | Path, encrypted_only: bool = False) -> list[Path]:
    """Artifact directories under ``root`` (inclusive); only those whose manifest records encryption if asked."""
    root = Path(root)
    found = []
    for mf in sorted([root / artifacts.MANIFEST, *root.rglob(artifacts.MANIFEST)]):
        if mf.is_file() and ".tmp-" not in str(mf) and ".old-" not in str(mf):
            try:
                if not encrypted_only or json.loads(mf.read_text(encoding="utf-8")).get("encryption"):
                    found.append(mf.parent)
            except (OSError, json.JSONDecodeError):
                continue
    return sorted(set(found))


def find_encrypted_artifacts(root: str | Path) -> list[Path]:
    """Artifact directories under ``root`` (inclusive) whose manifest records encryption."""
    return find_artifacts(root, encrypted_only=True)


def reseal(path: Path, old_key_id: str, new: integrity.SealKey) -> bool:
    """Re-sign a manifest signed with ``old_key_id`` (the data key being retired) with ``new``."""
    from homeforge._fs import atomic_write_text

    m = artifacts.read_manifest(path)
    if (m.get("seal") or {}).get("key_id") != old_key_id or new.key_id == old_key_id:
        return False
    atomic_write_text(path / artifacts.MANIFEST, json.dumps(integrity.seal(m, new), indent=2, default=str))
    return True


def rotate_loose_files(root: str | Path, old: DataKey, new: DataKey, skip: list[Path] = ()) -> int:
    """Re-encrypt encrypted files outside artifacts (checkpoints, logs) under ``root``, each atomically."""
    root = Path(root)
    skip = [Path(s).absolute() for s in skip]
    changed = 0
    for p in sorted([root] if root.is_file() else root.rglob("*")):
        if not p.is_file() or p.name == artifacts.MANIFEST or p.name.startswith("."):
            continue
        a = p.absolute()
        if any(s == a or s in a.parents for s in skip):
            continue
        if crypto.is_encrypted(p) or crypto.is_encrypted_log(p):
            if crypto.reencrypt(p, old, new):
                changed += 1
    return changed
