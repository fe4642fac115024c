"""What the audit log must not hold in clear: secrets (by name and by value) and prompt text.

A command line is masked before it is logged:

- **by name**: the value of an option or ``KEY=VALUE`` override whose name says secret
  (``--api-key X``, ``--token=X``, ``serve.auth.token=X``, ``serve.api_keys=X``,
  ``db.passphrase=X``), and of every option the CLI declares secret (``-k`` of ``chat``);
  ``--key-file PATH`` is not masked (a path is not a secret);
- **by value**: any argument that contains a secret this process knows: the data and audit
  keys (hex and base64, from their files, ``HOMEFORGE_KEY`` or the key command), the value of
  every environment variable whose name says secret (``HOMEFORGE_PII_SECRET``, ``*_TOKEN``,
  ``*_PASSWORD``, ``*_API_KEY`` ...), and homeforge API keys (``hfk_...``) wherever they appear;
- **URL credentials**: ``scheme://user:pass@host`` becomes ``scheme://***@host``;
- **prompts** (``generate --prompt``, ``chat --system``, declared by the CLI) are logged as
  ``<prompt sha256:... len=N>`` unless ``HOMEFORGE_AUDIT_PROMPTS=1``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
from collections.abc import Iterable

from homeforge import paths

_SECRET_PARTS = {"key", "keys", "token", "secret", "secrets", "password", "passwd", "pass", "passphrase",
                 "credential", "credentials", "auth", "apikey", "pwd"}
_NOT_SECRET_LAST = ("file", "path", "dir", "id", "name", "env", "command", "ok", "count", "size", "length")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s]+)@")
_API_KEY = re.compile(r"hfk_[A-Za-z0-9_-]{8,}")
MIN_SECRET_LEN = 6


def is_secret_name(name: str) -> bool:
    """``--api-key``, ``--token``, ``serve.auth.token``, ``db.passphrase``: yes; ``--key-file``, ``--max-new-tokens``: no."""
    parts = [x for x in re.split(r"[-_.]+", name.lower().lstrip("-")) if x]
    if not parts or parts[-1] in _NOT_SECRET_LAST:
        return False
    return any(x in _SECRET_PARTS for x in parts)


def _key_forms(secret: bytes) -> set[str]:
    return {secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()}


def secret_values() -> set[str]:
    """Every secret value this process knows (see the module docstring)."""
    out: set[str] = set()
    for name, value in os.environ.items():
        if value and len(value) >= MIN_SECRET_LEN and is_secret_name(name):
            out.add(value)
    from homeforge.security import keys

    for path in (paths.data_key_file(), paths.audit_key_file()):
        with contextlib.suppress(Exception):  # unreadable or malformed: nothing to mask from it
            text = path.read_text(encoding="utf-8")
            with contextlib.suppress(Exception):
                import json

                out |= _key_forms(keys._decode(json.loads(text)["key"], str(path)))
                continue
            out |= _key_forms(keys._decode(text, str(path)))
    for value in ("HOMEFORGE_KEY", "HOMEFORGE_NEW_KEY"):
        with contextlib.suppress(Exception):
            if raw := paths.env(value):
                out |= _key_forms(keys._decode(raw, value))
    for secret in getattr(keys, "_command_cache", {}).values():
        out |= _key_forms(secret)
    return {v for v in out if len(v) >= MIN_SECRET_LEN}


def mask_text(text: str, values: Iterable[str] = ()) -> str:
    """``text`` with secret values, API keys and URL credentials replaced by ``***``."""
    for v in sorted(set(values), key=len, reverse=True):  # longest first: a value may contain another
        if v and v in text:
            text = text.replace(v, "***")
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    return _API_KEY.sub("hfk_***", text)


def prompt_digest(text: str) -> str:
    return f"<prompt sha256:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]} len={len(text)}>"


def mask_args(argv: list[str], secret_flags: Iterable[str] = (), prompt_flags: Iterable[str] = (),
              values: Iterable[str] | None = None) -> list[str]:
    """Replace secrets in a command line by ``***`` and prompts by their hash and length."""
    secret_flags, prompt_flags = set(secret_flags), set(prompt_flags)
    keep_prompts = paths.audit_prompts()
    known = set(secret_values() if values is None else values)
    out: list[str] = []
    pending: str | None = None  # "secret" | "prompt": what the previous option's value is
    for arg in argv:
        if pending is not None:
            out.append("***" if pending == "secret" else (arg if keep_prompts else prompt_digest(arg)))
            pending = None
            continue
        if arg.startswith("-") and "=" in arg:
            name, value = arg.split("=", 1)
            if name in secret_flags or is_secret_name(name):
                known.add(value)
                out.append(f"{name}=***")
            elif name in prompt_flags and not keep_prompts:
                out.append(f"{name}={prompt_digest(value)}")
            else:
                out.append(arg)
        elif arg.startswith("-") and len(arg) > 1:
            out.append(arg)
            if arg in secret_flags or (arg.startswith("--") and is_secret_name(arg)):
                pending = "secret"
            elif arg in prompt_flags:
                pending = "prompt"
        elif "=" in arg:
            name, value = arg.split("=", 1)
            if is_secret_name(name.rsplit(".", 1)[-1]) or is_secret_name(name):
                known.add(value)
                out.append(f"{name}=***")
            else:
                out.append(arg)
        else:
            out.append(arg)
    known = {v for v in known if len(v) >= MIN_SECRET_LEN}
    return [mask_text(a, known) for a in out]
