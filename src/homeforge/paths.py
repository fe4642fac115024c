"""Every ``HOMEFORGE_*`` environment setting and default location, read in one place.

A leaf module (imports nothing of homeforge). Values are read when asked for, not at import,
so a test or a parent process can change them; paths are expanded once, here (``~`` and
``$VARS``), so every module sees the same location for the same setting.

| variable | meaning | default |
| --- | --- | --- |
| HOMEFORGE_HOME | keys, API keys, audit log | ~/.homeforge |
| HOMEFORGE_CACHE | measured peak FLOP/s, built peers | ~/.cache/homeforge |
| HOMEFORGE_ENCRYPT | encrypt what every stage writes (like --encrypt) | off |
| HOMEFORGE_KEY / _KEY_COMMAND / _KEY_FILE | where the data key comes from | HOME/keys/data.key |
| HOMEFORGE_KEY_INSECURE_OK | accept a key file others can read | off |
| HOMEFORGE_NEW_KEY | the new key for `keys rotate` | generated |
| HOMEFORGE_AUDIT_LOG | the command audit log | HOME/audit/audit.jsonl |
| HOMEFORGE_AUDIT_KEY_FILE | the audit log's HMAC key | HOME/keys/audit.key |
| HOMEFORGE_AUDIT_RETENTION_DAYS | `audit prune` keeps this many days | 183 |
| HOMEFORGE_AUDIT_REQUIRED | refuse to run when the audit log cannot be written | off |
| HOMEFORGE_ALLOW_NETWORK | switch the egress guard off (1) | off |
| HOMEFORGE_ALLOW_HOSTS | hosts allowed besides loopback, comma-separated | none |
| HOMEFORGE_PII_SECRET | pseudonym secret (name configurable: pii.secret_env) | none |
| HOMEFORGE_VERIFY_CACHE | remember verified file hashes (0 = hash every file on every load) | on |
| HOMEFORGE_SCRATCH | where an `--encrypt` stage builds its plaintext files (memory-backed) | /dev/shm |
| HOMEFORGE_LLAMACPP | a llama.cpp build or source tree (converter, llama-server) | CACHE/llamacpp |
| HOMEFORGE_AUDIT_PROMPTS | log prompt text verbatim in the audit log (else a hash and a length) | off |
| HOMEFORGE_REGISTRY | the model registry (`homeforge registry`, `serve registry:NAME@ALIAS`) | HOME/registry |
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = ("1", "true", "yes", "on")


def env(name: str) -> str | None:
    """The raw value of a setting; None when unset or empty."""
    value = os.environ.get(name)
    return value if value else None


def flag(name: str) -> bool:
    return (os.environ.get(name) or "").strip().lower() in _TRUE


def _path(value: str) -> Path:
    return Path(os.path.expandvars(value)).expanduser()


def env_path(name: str) -> Path | None:
    value = env(name)
    return _path(value) if value else None


# --------------------------------------------------------------------------- locations


def home() -> Path:
    """``$HOMEFORGE_HOME`` or ``~/.homeforge``: keys, API keys and the audit log live here."""
    return env_path("HOMEFORGE_HOME") or Path.home() / ".homeforge"


def cache_dir() -> Path:
    return env_path("HOMEFORGE_CACHE") or Path.home() / ".cache" / "homeforge"


def llamacpp_dir() -> Path:
    """``$HOMEFORGE_LLAMACPP`` or ``CACHE/llamacpp``: where a llama.cpp build is looked for (export/llamacpp.py)."""
    return env_path("HOMEFORGE_LLAMACPP") or cache_dir() / "llamacpp"


def data_key_file() -> Path:
    return env_path("HOMEFORGE_KEY_FILE") or home() / "keys" / "data.key"


def audit_key_file() -> Path:
    return env_path("HOMEFORGE_AUDIT_KEY_FILE") or home() / "keys" / "audit.key"


def audit_log() -> Path:
    return env_path("HOMEFORGE_AUDIT_LOG") or home() / "audit" / "audit.jsonl"


def api_keys_file() -> Path:
    return home() / "api_keys.json"


def serve_audit_file() -> Path:
    return home() / "audit" / "serve.jsonl"


def registry_dir() -> Path:
    """``$HOMEFORGE_REGISTRY`` or HOME/registry: the model registry's versions and aliases."""
    return env_path("HOMEFORGE_REGISTRY") or home() / "registry"


def logs_dir() -> Path:
    """Logs of processes homeforge starts (e.g. the gateway's managed upstream server)."""
    return home() / "logs"


def verify_cache_file() -> Path | None:
    """The verified-hash cache (``hashcache``); None when ``HOMEFORGE_VERIFY_CACHE=0``."""
    if (os.environ.get("HOMEFORGE_VERIFY_CACHE") or "").strip().lower() in ("0", "false", "no", "off"):
        return None
    return home() / "cache" / "verified-v1.sqlite"


def scratch_dir() -> Path | None:
    """Memory-backed storage for the plaintext of an ``--encrypt`` stage: ``$HOMEFORGE_SCRATCH``, else
    ``/dev/shm`` when it exists and is writable, else None (no memory-backed storage on this system)."""
    if given := env_path("HOMEFORGE_SCRATCH"):
        return given
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


def pending_dir() -> Path:
    """Where every process registers the temp folders it is writing (removed when it finishes; a
    crashed process's folders are deleted at the next start of any homeforge command)."""
    return home() / "pending"


# --------------------------------------------------------------------------- switches


def encrypt_default() -> bool:
    """``HOMEFORGE_ENCRYPT=1``: every stage config's ``encrypt`` defaults to true."""
    return flag("HOMEFORGE_ENCRYPT")


def key_insecure_ok() -> bool:
    return env("HOMEFORGE_KEY_INSECURE_OK") == "1"


def audit_required() -> bool:
    return env("HOMEFORGE_AUDIT_REQUIRED") == "1"


def network_allowed() -> bool:
    return env("HOMEFORGE_ALLOW_NETWORK") == "1"


def audit_prompts() -> bool:
    """``HOMEFORGE_AUDIT_PROMPTS=1``: prompts are logged verbatim (else as sha256 + length)."""
    return flag("HOMEFORGE_AUDIT_PROMPTS")


def allowed_hosts() -> set[str]:
    return {h.strip() for h in (env("HOMEFORGE_ALLOW_HOSTS") or "").split(",") if h.strip()}
