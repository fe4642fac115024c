"""The data key: a 256-bit AES key that encrypts artifacts at rest.

Where the key comes from, first match wins:

1. ``HOMEFORGE_KEY``: the key itself (64 hex characters or base64 of 32 bytes), for
   people whose secret manager injects environment variables;
2. ``HOMEFORGE_KEY_COMMAND``: a command that prints the key (e.g. a KMS/Vault/HSM CLI);
   run without a shell, its output is cached for the life of the process;
3. ``HOMEFORGE_KEY_FILE``, else ``<HOMEFORGE_HOME or ~/.homeforge>/keys/data.key``: a
   key file created by ``homeforge keys init``, readable by its owner only. A key file
   that group or others can read is refused (``force=True`` / ``HOMEFORGE_KEY_INSECURE_OK=1``
   accepts it with a warning).

A key is named by its id: the first 16 hex digits of SHA-256("homeforge key id" || key).
Encrypted files record the id, so a wrong key is named as such, never guessed at.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
import secrets
import shlex
import stat
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from homeforge import paths
from homeforge.errors import HomeforgeError

KEY_BYTES = 32
_command_cache: dict[str, bytes] = {}


class KeyError_(HomeforgeError):
    """A data key that is missing, malformed or unsafely stored."""


@dataclass(frozen=True)
class DataKey:
    secret: bytes
    key_id: str
    source: str  # "env", "command", or the key file path

    def __repr__(self) -> str:  # never print the secret
        return f"DataKey(id={self.key_id}, source={self.source})"


def key_id(secret: bytes) -> str:
    return hashlib.sha256(b"homeforge key id\0" + secret).hexdigest()[:16]


def default_key_file() -> Path:
    return paths.data_key_file()


def _decode(text: str, where: str) -> bytes:
    t = text.strip()
    raw: bytes | None = None
    if len(t) == 2 * KEY_BYTES:
        try:
            raw = bytes.fromhex(t)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.b64decode(t, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != KEY_BYTES:
        raise KeyError_(f"the data key from {where} is not a 256-bit key", where=where,
                        fix="give 64 hex characters or the base64 of 32 bytes (e.g. `openssl rand -hex 32`)")
    return raw


def _from_command(cmd: str) -> bytes:
    if cmd in _command_cache:
        return _command_cache[cmd]
    try:
        proc = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KeyError_(f"HOMEFORGE_KEY_COMMAND could not be run: {exc}", where="HOMEFORGE_KEY_COMMAND",
                        fix="check the command prints the key on stdout") from None
    if proc.returncode != 0:
        raise KeyError_(f"HOMEFORGE_KEY_COMMAND exited with {proc.returncode}: {proc.stderr.strip()[:200]}",
                        where="HOMEFORGE_KEY_COMMAND", fix="check the command prints the key on stdout")
    secret = _decode(proc.stdout, "HOMEFORGE_KEY_COMMAND")
    _command_cache[cmd] = secret
    return secret


def check_permissions(path: Path, force: bool = False) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        forced = force or paths.key_insecure_ok()
        msg = f"the key file {path} can be read by other users (mode {mode:o})"
        if not forced:
            raise KeyError_(msg, where=str(path),
                            fix=f"run `chmod 600 {path}` (or pass --force / HOMEFORGE_KEY_INSECURE_OK=1 to use it anyway)")
        warnings.warn(msg + "; used anyway because it was forced", stacklevel=2)
        print(f"warning: {msg}; used anyway because it was forced", file=sys.stderr)
    if path.stat().st_uid != os.getuid():
        raise KeyError_(f"the key file {path} belongs to another user", where=str(path),
                        fix="use a key file you own (homeforge keys init)")


def read_key_file(path: Path, force: bool = False) -> DataKey:
    if not path.is_file():
        raise KeyError_(f"no data key at {path}", where=str(path),
                        fix="create one with `homeforge keys init`, or set HOMEFORGE_KEY / HOMEFORGE_KEY_COMMAND")
    check_permissions(path, force)
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
        secret = _decode(doc["key"], str(path))
    except (json.JSONDecodeError, KeyError, TypeError):
        secret = _decode(text, str(path))  # a bare hex/base64 key is accepted too
    return DataKey(secret, key_id(secret), str(path))


def load_key(required: bool = True, force: bool = False) -> DataKey | None:
    """The configured data key; None if there is none and ``required`` is False."""
    if value := paths.env("HOMEFORGE_KEY"):
        secret = _decode(value, "HOMEFORGE_KEY")
        return DataKey(secret, key_id(secret), "env")
    if command := paths.env("HOMEFORGE_KEY_COMMAND"):
        secret = _from_command(command)
        return DataKey(secret, key_id(secret), "command")
    path = default_key_file()
    if not path.exists() and not required:
        return None
    return read_key_file(path, force)


def write_key_file(path: Path, secret: bytes, *, replace: bool = False) -> DataKey:
    """Write a key file with mode 0600 (directory 0700), atomically; refuse to overwrite unless ``replace``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    kid = key_id(secret)
    doc = {"format": "homeforge-data-key-v1", "key_id": kid, "key": base64.b64encode(secret).decode(),
           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the path exists: never overwrite a key by accident
            except FileExistsError:
                raise KeyError_(f"a key file already exists at {path}", where=str(path),
                                fix="keep it (your encrypted data needs it); to change keys use `homeforge keys rotate`") from None
    finally:
        tmp.unlink(missing_ok=True)
    return DataKey(secret, kid, str(path))


def init_key(path: Path | None = None) -> DataKey:
    """Create a new random data key file (``homeforge keys init``)."""
    return write_key_file(path or default_key_file(), secrets.token_bytes(KEY_BYTES))


def init_audit_key() -> DataKey | None:
    """Create the audit log's HMAC key beside the data key if there is none yet; None if it exists."""
    path = paths.audit_key_file()
    if path.exists():
        return None
    return write_key_file(path, secrets.token_bytes(KEY_BYTES))


def destroy_key_file(path: Path) -> None:
    """Overwrite a key file with random bytes, then delete it (best effort on journaling/SSD storage)."""
    try:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.write(secrets.token_bytes(max(size, 64)))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        pass
    path.unlink(missing_ok=True)
