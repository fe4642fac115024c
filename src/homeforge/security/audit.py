"""Tamper-evident, append-only audit log: one JSON object per line, chained by SHA-256.

Every line carries ``seq`` (1, 2, ...) and ``prev``: the SHA-256 of the previous line's
exact bytes (64 zeros for the first line of a log that was never pruned). With a key,
each line also ends with ``"mac"``: HMAC-SHA256 of the line's bytes before the mac, so a
person who can write the file but does not hold the key cannot rewrite the chain either.
A sidecar ``<log>.head`` records the last ``seq`` and line hash, which catches lines
deleted from the end.

``verify`` re-walks the chain and names the first bad line (edited, deleted, inserted or
reordered lines all break ``prev`` or ``seq``). ``prune`` drops lines older than the
retention period (default 183 days) and puts a checkpoint line in their place that
records the hash of the last dropped line, so the rest of the chain still verifies.

API (stable; the server writes per-request lines through it)::

    log = AuditLog()                     # default_path(); HMAC key = keys/audit.key if present
    log.append({"event": "request", "user": "alice", "outcome": "ok"})
    result = verify(path)                # VerifyResult(ok, lines, first_bad, reason)
    rows = show(path, since=..., user=..., command=..., artifact=...)
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import hmac
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homeforge import paths
from homeforge._fs import flock
from homeforge.errors import HomeforgeError

GENESIS = "0" * 64
DEFAULT_RETENTION_DAYS = 183  # at least six months
_MAC_RE = re.compile(rb',"mac":"([0-9a-f]{64})"\}$')
_locks: dict[str, threading.Lock] = {}


_locks_guard = threading.Lock()


class AuditError(HomeforgeError):
    """The audit log cannot be written or read."""


# --------------------------------------------------------------------------- locations


def default_path() -> Path:
    """``$HOMEFORGE_AUDIT_LOG`` or ``<HOMEFORGE_HOME>/audit/audit.jsonl``."""
    return paths.audit_log()


def retention_days() -> int:
    raw = paths.env("HOMEFORGE_AUDIT_RETENTION_DAYS")
    if raw is None:
        return DEFAULT_RETENTION_DAYS
    try:
        days = int(raw)
    except ValueError:
        raise AuditError(f"HOMEFORGE_AUDIT_RETENTION_DAYS={raw!r} is not a whole number of days",
                         fix="set it to a number of days, e.g. 183 (six months) or 2555 (seven years)") from None
    if days < 1:
        raise AuditError("HOMEFORGE_AUDIT_RETENTION_DAYS must be at least 1", fix="e.g. 183 (six months)")
    return days


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(value: str) -> dt.datetime:
    v = value.strip()
    if v.endswith("Z"):
        v = v[:-1] + "+00:00"
    t = dt.datetime.fromisoformat(v)
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


# --------------------------------------------------------------------------- masking


_SECRET_PARTS = {"key", "token", "secret", "password", "passwd", "pass", "credential", "credentials", "auth",
                 "apikey", "pwd"}


def is_secret_name(name: str) -> bool:
    """``--api-key``, ``--token``, ``serve.auth.token``, ``--password``: yes; ``--key-file``, ``--max-new-tokens``: no."""
    parts = [x for x in re.split(r"[-_.]+", name.lower().lstrip("-")) if x]
    if not parts or parts[-1] in ("file", "path", "dir", "id", "name", "env", "command"):
        return False
    return any(x in _SECRET_PARTS for x in parts)


def mask_args(argv: list[str]) -> list[str]:
    """Replace the values of secret-looking options and KEY=VALUE overrides by ``***``.

    ``--api-key X``, ``--api-key=X``, ``serve.auth.token=X``, ``--password X`` are masked;
    ``--key-file PATH`` is not (a path is not a secret).
    """
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            out.append("***")
            mask_next = False
            continue
        if arg.startswith("-") and "=" in arg:
            name, _ = arg.split("=", 1)
            out.append(f"{name}=***" if is_secret_name(name) else arg)
        elif arg.startswith("--"):
            out.append(arg)
            mask_next = is_secret_name(arg)
        elif "=" in arg and not arg.startswith("-"):
            name, _ = arg.split("=", 1)
            out.append(f"{name}=***" if is_secret_name(name.rsplit(".", 1)[-1]) else arg)
        else:
            out.append(arg)
    return out


# --------------------------------------------------------------------------- writing


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _encode(entry: dict, key: bytes | None) -> bytes:
    body = json.dumps(entry, separators=(",", ":"), default=str, ensure_ascii=False).encode("utf-8")
    if key is None:
        return body
    return body[:-1] + b',"mac":"' + _mac(key, body).encode() + b'"}'


def _split_mac(line: bytes) -> tuple[bytes, str | None]:
    m = _MAC_RE.search(line)
    if m is None:
        return line, None
    return line[: m.start()] + b"}", m.group(1).decode()


def _last_line(f) -> bytes | None:
    """The last non-empty line of an open binary file (reads backwards in blocks)."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if end == 0:
        return None
    buf = b""
    pos = end
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        stripped = buf.rstrip(b"\n")
        if b"\n" in stripped or pos == 0:
            return stripped.rsplit(b"\n", 1)[-1] if stripped else None
    return None


def audit_key_path() -> Path:
    """``$HOMEFORGE_AUDIT_KEY_FILE`` or ``<HOMEFORGE_HOME>/keys/audit.key`` (made by ``homeforge keys init``)."""
    return paths.audit_key_file()


def default_key() -> bytes | None:
    """The audit log's HMAC key, if one was created (``homeforge keys init``); else None (chain only).

    It is its own key, not the data key, so rotating the data key never invalidates old lines.
    """
    path = audit_key_path()
    if not path.is_file():
        return None
    from homeforge.security import keys

    return keys.read_key_file(path).secret


class AuditLog:
    """Append-only, hash-chained JSONL log; safe across threads and processes (flock)."""

    def __init__(self, path: str | Path | None = None, key: bytes | None | str = "default", fsync: bool = True):
        self.path = Path(path) if path is not None else default_path()
        self.key = default_key() if key == "default" else key
        self.fsync = fsync
        with _locks_guard:
            self._lock = _locks.setdefault(str(self.path.absolute()), threading.Lock())

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    def append(self, record: dict[str, Any]) -> dict:
        """Append one record (``time``, ``user``, ``pid`` added when missing); return the entry."""
        entry: dict[str, Any] = {"seq": 0, "prev": GENESIS, "time": now_iso(), "user": current_user(), "pid": os.getpid()}
        for k, v in record.items():
            if k in ("seq", "prev", "mac"):
                raise AuditError(f"audit record field {k!r} is reserved", fix="rename the field")
            entry[k] = v
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with self._lock, open(self.path, "a+b") as f:
                os.chmod(self.path, 0o600) if f.tell() == 0 else None
                flock(f, True)
                try:
                    last = _last_line(f)
                    if last is not None:
                        try:
                            prev_entry = json.loads(last)
                            entry["seq"] = int(prev_entry["seq"]) + 1
                        except (ValueError, KeyError, TypeError):
                            raise AuditError(f"the audit log {self.path} ends with a corrupted line",
                                             where=str(self.path),
                                             fix="run `homeforge audit verify` to see where; keep the file as evidence "
                                                 "and start a new log with HOMEFORGE_AUDIT_LOG") from None
                        entry["prev"] = _line_hash(last)
                        if prev_entry.get("event") == "retention-checkpoint" and f.tell() == len(last) + 1:
                            entry["prev"] = prev_entry["prev"]  # a checkpoint stands for the dropped lines
                    else:
                        entry["seq"] = 1
                    line = _encode(entry, self.key)
                    f.seek(0, os.SEEK_END)
                    f.write(line + b"\n")
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
                    self._write_head(entry["seq"], _line_hash(line))
                finally:
                    flock(f, False)
        except OSError as exc:
            raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror or exc}", where=str(self.path),
                             fix="make the directory writable, or set HOMEFORGE_AUDIT_LOG to a writable file") from None
        return entry

    def check(self) -> None:
        """Raise AuditError if the log cannot take another line (unwritable, or a corrupted last line)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():
                if not os.access(self.path.parent, os.W_OK):
                    raise PermissionError(f"{self.path.parent} is not writable")
                return
            if not os.access(self.path, os.W_OK):
                raise PermissionError(f"{self.path} is not writable")
            with open(self.path, "rb") as f:
                last = _last_line(f)
        except OSError as exc:
            raise AuditError(f"cannot write the audit log {self.path}: {exc}", where=str(self.path),
                             fix="make it writable, or set HOMEFORGE_AUDIT_LOG to a writable file") from None
        if last is not None:
            try:
                int(json.loads(last)["seq"])
            except (ValueError, KeyError, TypeError):
                raise AuditError(f"the audit log {self.path} ends with a corrupted line", where=str(self.path),
                                 fix="run `homeforge audit verify` to see where; keep the file as evidence "
                                     "and start a new log with HOMEFORGE_AUDIT_LOG") from None

    def _write_head(self, seq: int, digest: str) -> None:
        head = _encode({"seq": seq, "hash": digest}, self.key)
        tmp = self.head_path.with_name(self.head_path.name + f".tmp-{os.getpid()}-{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(head + b"\n")
        os.replace(tmp, self.head_path)


# --------------------------------------------------------------------------- verifying


@dataclass
class VerifyResult:
    ok: bool
    lines: int
    first_bad: int | None = None  # 1-based line number in the file
    reason: str = ""
    macs_checked: bool = False
    checkpoint: dict | None = None

    def summary(self) -> str:
        if self.ok:
            extra = "; HMAC signatures checked" if self.macs_checked else "; HMAC not checked (no key)"
            cp = f"; starts at a retention checkpoint (seq {self.checkpoint['seq']})" if self.checkpoint else ""
            return f"audit log intact: {self.lines} lines, chain verified{extra}{cp}"
        return f"audit log BROKEN at line {self.first_bad}: {self.reason}"


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            line = raw.rstrip(b"\n")
            if line:
                yield i, line


def verify(path: str | Path | None = None, key: bytes | None | str = "default") -> VerifyResult:
    """Walk the chain; return the first bad line (1-based) and why, or ok."""
    p = Path(path) if path is not None else default_path()
    if not p.is_file():
        raise AuditError(f"audit log {p} does not exist", where=str(p),
                         fix="run any homeforge command to start it, or point HOMEFORGE_AUDIT_LOG at the log")
    k = default_key() if key == "default" else key
    prev = GENESIS
    expected_seq = 1
    n = 0
    checkpoint = None
    seen_mac = False
    last_hash = None
    recent: dict[int, str] = {}  # the last few (seq -> line hash), for a head one write behind
    for lineno, line in _iter_lines(p):
        n += 1
        body, mac = _split_mac(line)
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return VerifyResult(False, n, lineno, "not valid JSON (the line was edited or cut)")
        if not isinstance(entry, dict) or "seq" not in entry or "prev" not in entry:
            return VerifyResult(False, n, lineno, "not an audit entry (no seq/prev): inserted by hand?")
        if mac is not None:
            seen_mac = True
            if k is not None and not hmac.compare_digest(mac, _mac(k, body)):
                return VerifyResult(False, n, lineno, "HMAC signature does not match: the line was edited or forged")
        elif k is not None and seen_mac:
            return VerifyResult(False, n, lineno, "unsigned line in a signed log: inserted without the key")
        if n == 1 and entry.get("event") == "retention-checkpoint":
            checkpoint = entry
            prev, expected_seq = entry["prev"], int(entry["seq"])
        if entry["prev"] != prev:
            why = ("the previous line was edited, or a line was deleted, inserted or moved here"
                   if n > 1 else "the first line does not start the chain: lines were deleted from the start")
            return VerifyResult(False, n, lineno, f"chain broken ({why})")
        if entry["seq"] != expected_seq:
            return VerifyResult(False, n, lineno, f"sequence number {entry['seq']} where {expected_seq} was expected "
                                                  "(lines deleted, inserted or reordered)")
        prev = _line_hash(line)
        if checkpoint is not None and n == 1:
            prev = entry["prev"]  # the next line chains to the last dropped line
            expected_seq = int(entry["seq"]) + 1
        else:
            expected_seq += 1
        last_hash = _line_hash(line) if checkpoint is None or n > 1 else entry["prev"]
        recent[int(entry["seq"])] = last_hash
        if len(recent) > 8:
            recent.pop(min(recent))
    head_p = p.with_name(p.name + ".head")
    if head_p.is_file():
        head_line = head_p.read_bytes().strip()
        body, mac = _split_mac(head_line)
        try:
            head = json.loads(head_line)
        except json.JSONDecodeError:
            return VerifyResult(False, n, n, "the head record (.head file) is corrupted")
        if mac is not None and k is not None and not hmac.compare_digest(mac, _mac(k, body)):
            return VerifyResult(False, n, n, "the head record's HMAC does not match: it was forged")
        lagging = isinstance(head.get("seq"), int) and head["seq"] < expected_seq - 1 and \
            recent.get(head["seq"]) == head.get("hash")  # a crash between a line and its head write
        if not lagging and (head.get("seq") != expected_seq - 1 or
                            (last_hash is not None and head.get("hash") != last_hash)):
            return VerifyResult(False, n, n + 1 if head.get("seq", 0) > expected_seq - 1 else n,
                                f"the log ends at seq {expected_seq - 1} but its head record says seq {head.get('seq')}: "
                                "lines were deleted from (or the last line edited at) the end")
    return VerifyResult(True, n, macs_checked=seen_mac and k is not None, checkpoint=checkpoint)


# --------------------------------------------------------------------------- reading


def read_entries(path: str | Path | None = None) -> Iterator[dict]:
    p = Path(path) if path is not None else default_path()
    if not p.is_file():
        raise AuditError(f"audit log {p} does not exist", where=str(p),
                         fix="run any homeforge command to start it, or point HOMEFORGE_AUDIT_LOG at the log")
    for lineno, line in _iter_lines(p):
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            raise AuditError(f"line {lineno} of the audit log is corrupted", where=str(p),
                             fix="run `homeforge audit verify` for details") from None


def _mentions(entry: dict, needle: str) -> bool:
    def walk(v) -> bool:
        if isinstance(v, dict):
            return any(walk(x) for x in v.values()) or any(needle in str(k) for k in v)
        if isinstance(v, list):
            return any(walk(x) for x in v)
        return needle in str(v)

    return walk({k: entry.get(k) for k in ("inputs", "outputs", "args", "artifact", "path")})


def show(path: str | Path | None = None, *, since: str | None = None, until: str | None = None,
         user: str | None = None, command: str | None = None, artifact: str | None = None,
         event: str | None = None) -> list[dict]:
    """Entries matching every given filter (times are ISO 8601; artifact matches a path or hash part)."""
    t0 = _parse_time(since) if since else None
    t1 = _parse_time(until) if until else None
    out = []
    for e in read_entries(path):
        if t0 or t1:
            try:
                t = _parse_time(str(e.get("time", "")))
            except ValueError:
                continue
            if (t0 and t < t0) or (t1 and t > t1):
                continue
        if user and e.get("user") != user:
            continue
        if command and command not in (e.get("command") or ""):
            continue
        if event and e.get("event") != event:
            continue
        if artifact and not _mentions(e, artifact):
            continue
        out.append(e)
    return out


# --------------------------------------------------------------------------- retention


def prune(path: str | Path | None = None, keep_days: int | None = None, key: bytes | None | str = "default",
          now: dt.datetime | None = None) -> int:
    """Drop entries older than ``keep_days`` (default: retention_days()); return how many.

    The dropped lines are replaced by one ``retention-checkpoint`` line whose ``prev`` is the
    hash of the last dropped line, so the remaining chain still verifies. The log must verify
    before pruning; the rewrite is atomic (temp file + rename) and holds the append lock.
    """
    p = Path(path) if path is not None else default_path()
    days = keep_days if keep_days is not None else retention_days()
    k = default_key() if key == "default" else key
    cutoff = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(days=days)
    log = AuditLog(p, key=k)
    with log._lock, open(p, "a+b") as f:
        flock(f, True)
        try:
            res = verify(p, key=k)
            if not res.ok:
                raise AuditError(f"refusing to prune a broken audit log: {res.summary()}", where=str(p),
                                 fix="keep the file as evidence; start a new log with HOMEFORGE_AUDIT_LOG")
            lines = [line for _, line in _iter_lines(p)]
            drop = 0
            for i, line in enumerate(lines):
                e = json.loads(line)
                if e.get("event") == "retention-checkpoint" and i == 0:
                    continue
                try:
                    if _parse_time(e["time"]) >= cutoff:
                        break
                except (KeyError, ValueError):
                    break
                drop = i + 1
            if drop == 0:
                return 0
            last_dropped = json.loads(lines[drop - 1])
            cp = {"seq": last_dropped["seq"], "prev": _line_hash(lines[drop - 1]), "time": now_iso(),
                  "user": current_user(), "event": "retention-checkpoint", "dropped_through_seq": last_dropped["seq"],
                  "dropped_until": last_dropped.get("time"), "retention_days": days}
            n_dropped = drop - (1 if json.loads(lines[0]).get("event") == "retention-checkpoint" else 0)
            new = [_encode(cp, k)] + lines[drop:]
            tmp = p.with_name(f".{p.name}.prune-{os.getpid()}")
            with open(tmp, "wb") as g:
                g.write(b"".join(x + b"\n" for x in new))
                g.flush()
                os.fsync(g.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, p)
            if drop == len(lines):  # everything dropped: the head now points at the checkpoint
                log._write_head(cp["seq"], cp["prev"])
            return n_dropped
        finally:
            flock(f, False)


# --------------------------------------------------------------------------- commands


def _path_candidates(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        value = arg.split("=", 1)[1] if "=" in arg else arg
        if value and not value.startswith("-") and ("/" in value or os.path.exists(value)):
            out.append(value)
    return out


def _hash_of(path: str) -> str | None:
    from homeforge import artifacts

    p = Path(path)
    try:
        if p.is_dir() and (p / artifacts.MANIFEST).is_file():
            return artifacts.read_manifest(p)["content_hash"]
        if p.is_file() and p.stat().st_size <= 256 << 20:
            return "sha256:" + artifacts.sha256_file(p)
    except (OSError, HomeforgeError):
        return None
    return None


_command_notes: dict[str, Any] = {}


def note_command(**fields: Any) -> None:
    """Add fields to this process's command audit line (e.g. the signal that stopped a server)."""
    _command_notes.update(fields)


class audited_command:  # noqa: N801 - used as a context manager
    """Append one ``command`` line per CLI invocation: who, what (masked), inputs/outputs, outcome.

    Inputs are the hashes of the artifacts/files named on the command line before it runs;
    outputs are the artifacts named on it that were created or changed by it. A log that
    cannot be written is a warning, unless ``HOMEFORGE_AUDIT_REQUIRED=1`` (then the
    command fails before doing anything).
    """

    def __init__(self, argv: list[str]):
        self.argv = list(argv)
        self.skip = not argv or any(a in ("-h", "--help", "--version") for a in argv)
        self.log: AuditLog | None = None
        self.before: dict[str, str | None] = {}

    def __enter__(self):
        if self.skip:
            return self
        import time

        self.t0 = time.perf_counter()
        self.before = {p: _hash_of(p) for p in _path_candidates(self.argv)}
        try:
            self.log = AuditLog()
            self.log.check()  # fail (HOMEFORGE_AUDIT_REQUIRED=1) or warn before the command runs
        except HomeforgeError as exc:
            self.log = None
            self._fail_open(exc)
        return self

    def _fail_open(self, exc: Exception) -> None:
        if paths.audit_required():
            raise exc if isinstance(exc, HomeforgeError) else AuditError(str(exc))
        import sys

        print(f"warning: the audit log could not be written: {exc}", file=sys.stderr)

    def __exit__(self, exc_type, exc, tb):
        if self.skip or self.log is None:
            return False
        import time

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
        after = {p: _hash_of(p) for p in _path_candidates(self.argv)}
        inputs = {p: h for p, h in self.before.items() if h is not None}
        outputs = {p: h for p, h in after.items() if h is not None and h != self.before.get(p)}
        i = next((j for j, a in enumerate(self.argv) if not a.startswith("-")), len(self.argv))
        command = self.argv[i] if i < len(self.argv) else ""
        sub = [a for a in self.argv[i + 1 : i + 2] if not a.startswith("-")]
        record = {"event": "command", "command": " ".join([command, *sub]) if command in ("keys", "audit", "config") else command,
                  "args": mask_args(self.argv), "cwd": os.getcwd(), "inputs": inputs, "outputs": outputs,
                  "outcome": outcome, "exit_code": code, "duration_s": round(time.perf_counter() - self.t0, 3)}
        if error:
            record["error"] = error[:500]
        record.update({k: v for k, v in _command_notes.items() if k not in record})
        _command_notes.clear()
        try:
            self.log.append(record)
        except HomeforgeError as e:
            self._fail_open(e)
        return False


def egress_refused(host: str, port, what: str) -> None:
    """The egress guard's ``on_refuse`` callback: one audit line per refused connection."""
    import sys

    AuditLog().append({"event": "egress-refused", "host": host, "port": port, "what": what,
                       "command": " ".join(mask_args(sys.argv[1:3]))})
