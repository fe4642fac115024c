"""One audit line per CLI invocation (``audited_command``), and one per refused connection.

The line says who ran what (secrets and prompts masked: ``security.masking``), the hashes of
the artifacts and files named on the command line before it ran (``inputs``) and of those it
created or changed (``outputs``), the outcome, and the artifacts it loaded without checking
them (``unverified``, with ``--no-verify``). A log that cannot be written is a warning unless
``HOMEFORGE_AUDIT_REQUIRED=1``; an audit key that cannot be trusted (others can read it) is an
error: the command does not run, so a loose key never silently turns signing off.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from homeforge import paths
from homeforge.errors import HomeforgeError
from homeforge.security.audit import AuditError, AuditLog
from homeforge.security.masking import mask_args, mask_text, secret_values

_command_notes: dict[str, Any] = {}


def note_command(**fields: Any) -> None:
    """Add fields to this process's command audit line (e.g. the signal that stopped a server)."""
    _command_notes.update(fields)


def _path_candidates(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        value = arg.split("=", 1)[1] if "=" in arg else arg
        if value and not value.startswith(("-", "<prompt")) and "***" not in value and \
                ("/" in value or os.path.exists(value)):
            out.append(value)
    return out


def _hash_of(path: str) -> str | None:
    from homeforge import artifacts
    from homeforge._fs import sha256_file

    p = Path(path)
    try:
        if p.is_dir() and (p / artifacts.MANIFEST).is_file():
            return artifacts.read_manifest(p, check=False)["content_hash"]
        if p.is_file() and p.stat().st_size <= 256 << 20:
            return "sha256:" + sha256_file(p)
    except (OSError, HomeforgeError):
        return None
    return None


def _is_key_problem(exc: Exception) -> bool:
    from homeforge.security.keys import KeyError_

    return isinstance(exc, KeyError_)


class audited_command:  # noqa: N801 - used as a context manager
    """Append one ``command`` line per CLI invocation: who, what (masked), inputs/outputs, outcome.

    ``secret_flags``/``prompt_flags``: options the CLI declares secret (masked) or prompt text
    (logged as a hash and a length unless ``HOMEFORGE_AUDIT_PROMPTS=1``).
    """

    def __init__(self, argv: list[str], secret_flags: Iterable[str] = (), prompt_flags: Iterable[str] = ()):
        self.argv = list(argv)
        self.secret_flags, self.prompt_flags = set(secret_flags), set(prompt_flags)
        self.skip = not argv or any(a in ("-h", "--help", "--version") for a in argv)
        self.log: AuditLog | None = None
        self.before: dict[str, str | None] = {}
        self.secrets: set[str] = set()
        self.masked: list[str] = []

    def __enter__(self):
        if self.skip:
            return self
        self.t0 = time.perf_counter()
        self.secrets = secret_values()
        self.masked = mask_args(self.argv, self.secret_flags, self.prompt_flags, values=self.secrets)
        self.before = {p: _hash_of(p) for p in _path_candidates(self.masked)}
        try:
            self.log = AuditLog()
            self.log.check()  # fail (HOMEFORGE_AUDIT_REQUIRED=1) or warn before the command runs
        except HomeforgeError as exc:
            self.log = None
            if _is_key_problem(exc):  # an audit key that exists but cannot be trusted: never run unsigned
                raise AuditError(f"the audit key cannot be used: {exc.what}", where=exc.where, fix=exc.fix) from None
            self._fail_open(exc)
        return self

    def _fail_open(self, exc: Exception) -> None:
        if paths.audit_required():
            raise exc if isinstance(exc, HomeforgeError) else AuditError(str(exc))
        print(f"warning: the audit log could not be written: {exc}", file=sys.stderr)

    def __exit__(self, exc_type, exc, tb):
        if self.skip or self.log is None:
            return False
        from homeforge import integrity

        if exc_type is None or (exc_type is SystemExit and exc.code in (0, None)):
            outcome, code, error = "ok", 0, None
        elif exc_type is SystemExit and exc.code == 130:  # Ctrl-C, as the CLI framework reports it
            outcome, code, error = "interrupted", 130, None
        elif exc_type is SystemExit:
            outcome, code, error = "error", exc.code if isinstance(exc.code, int) else 1, None
        elif exc_type is KeyboardInterrupt:
            outcome, code, error = "interrupted", 130, None
        elif isinstance(exc, HomeforgeError):
            outcome, code, error = "error", exc.exit_code, exc.what
        else:
            outcome, code, error = "crash", 1, f"{exc_type.__name__}: {exc}"
        after = {p: _hash_of(p) for p in _path_candidates(self.masked)}
        inputs = {p: h for p, h in self.before.items() if h is not None}
        outputs = {p: h for p, h in after.items() if h is not None and h != self.before.get(p)}
        i = next((j for j, a in enumerate(self.argv) if not a.startswith("-")), len(self.argv))
        command = self.argv[i] if i < len(self.argv) else ""
        sub = [a for a in self.argv[i + 1 : i + 2] if not a.startswith("-")]
        record = {"event": "command", "command": " ".join([command, *sub]) if command in ("keys", "audit", "config") else command,
                  "args": self.masked, "cwd": os.getcwd(), "inputs": inputs, "outputs": outputs,
                  "outcome": outcome, "exit_code": code, "duration_s": round(time.perf_counter() - self.t0, 3)}
        if error:  # an error message may echo a value given on the command line
            secrets = self.secrets | {a.split("=", 1)[1] for a in self.argv if "=" in a} - \
                {a.split("=", 1)[1] for a in self.masked if "=" in a}
            record["error"] = mask_text(error, {v for v in secrets if len(v) >= 6})[:500]
        if unverified := integrity.skipped():
            record["unverified"] = unverified  # loaded with --no-verify
        record.update({k: v for k, v in _command_notes.items() if k not in record})  # note_command
        _command_notes.clear()
        try:
            self.log.append(record)
        except HomeforgeError as e:
            self._fail_open(e)
        return False


def egress_refused(host: str, port, what: str) -> None:
    """The egress guard's ``on_refuse`` callback: one audit line per refused connection."""
    AuditLog().append({"event": "egress-refused", "host": host, "port": port, "what": what,
                       "command": " ".join(mask_args(sys.argv[1:3], values=()))})
