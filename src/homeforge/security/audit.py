"""Tamper-evident, append-only audit log: one JSON object per line, chained by SHA-256.

Every line carries ``seq`` (1, 2, ...) and ``prev``: the SHA-256 of the previous line's
exact bytes (64 zeros for the first line of a log that was never pruned). With a key,
each line also ends with ``"mac"``: HMAC-SHA256 of the line's bytes before the mac, so a
person who can write the file but does not hold the key cannot rewrite the chain either.
Once the audit key exists every line must be signed: the key is created under the log's lock
together with a signed ``audit-key-created`` line (``create_key``), writers read the key under
the same lock for every line (so no line is written unsigned after it appeared), and ``verify``
refuses unsigned lines except before that event. A log stripped of its signatures therefore
reads BROKEN, not "intact without HMAC". A sidecar ``<log>.head`` records the last ``seq``
and line hash (a missing head is itself an error), and every artifact manifest records the
log's head when it was made (sealed: ``check_anchor``), so lines cut from the end together
with ``.head`` still contradict the artifacts made after them.

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

import contextlib
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
from homeforge._fs import flock, last_line
from homeforge.errors import HomeforgeError
from homeforge.security.masking import is_secret_name, mask_args  # noqa: F401  (their home; kept importable here)

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


_last_line = last_line


def audit_key_path() -> Path:
    """``$HOMEFORGE_AUDIT_KEY_FILE`` or ``<HOMEFORGE_HOME>/keys/audit.key`` (made by ``homeforge keys init``)."""
    return paths.audit_key_file()


def default_key() -> bytes | None:
    """The audit log's HMAC key, if one was created (``homeforge keys init``); else None (chain only).

    It is its own key, not the data key, so rotating the data key never invalidates old lines.
    A key file others can read is refused like the data key (``HOMEFORGE_KEY_INSECURE_OK=1``
    accepts it with a warning): a key that exists but cannot be trusted never turns signing off.
    """
    path = audit_key_path()
    if not path.is_file():
        return None
    from homeforge.security import keys

    return keys.read_key_file(path).secret


KEY_EVENT = "audit-key-created"


class AuditLog:
    """Append-only, hash-chained JSONL log; safe across threads and processes (flock)."""

    def __init__(self, path: str | Path | None = None, key: bytes | None | str = "default", fsync: bool = True):
        self.path = Path(path) if path is not None else default_path()
        self._key_spec = key  # "default": the audit key file, read under the log's lock for every line
        if key == "default":
            default_key()  # a key file that cannot be trusted fails now, before the command runs
        self.fsync = fsync
        with _locks_guard:
            self._lock = _locks.setdefault(str(self.path.absolute()), threading.Lock())

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    @property
    def key(self) -> bytes | None:
        return default_key() if self._key_spec == "default" else self._key_spec

    def append(self, record: dict[str, Any]) -> dict:
        """Append one record (``time``, ``user``, ``pid`` added when missing); return the entry."""
        entry = self._entry(record)
        try:
            with self._locked() as f:
                self._append_locked(f, entry, self.key)  # the key as it is now, under the lock
        except OSError as exc:
            raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror or exc}", where=str(self.path),
                             fix="make the directory writable, or set HOMEFORGE_AUDIT_LOG to a writable file") from None
        return entry

    def create_key(self):
        """Create the audit key (if there is none) under this log's lock and log its creation as a signed line.

        A writer that started before reads the key under the same lock for its next line, so
        no unsigned line can follow the key's creation. Returns the new key, or None if one existed."""
        from homeforge.security import keys

        with self._locked() as f:
            created = keys.init_audit_key()
            if created is not None:
                self._append_locked(f, self._entry({"event": KEY_EVENT, "key_id": created.key_id}), created.secret)
        return created

    @staticmethod
    def _entry(record: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = {"seq": 0, "prev": GENESIS, "time": now_iso(), "user": current_user(), "pid": os.getpid()}
        for k, v in record.items():
            if k in ("seq", "prev", "mac"):
                raise AuditError(f"audit record field {k!r} is reserved", fix="rename the field")
            entry[k] = v
        return entry

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock, open(self.path, "a+b") as f:
            os.chmod(self.path, 0o600) if f.tell() == 0 else None
            flock(f, True)
            try:
                yield f
            finally:
                flock(f, False)

    def _append_locked(self, f, entry: dict[str, Any], key: bytes | None) -> None:
        last = _last_line(f)
        if last is not None:
            try:
                prev_entry = json.loads(last)
                entry["seq"] = int(prev_entry["seq"]) + 1
            except (ValueError, KeyError, TypeError):
                raise AuditError(f"the audit log {self.path} ends with a corrupted line", where=str(self.path),
                                 fix="run `homeforge audit verify` to see where; keep the file as evidence "
                                     "and start a new log with HOMEFORGE_AUDIT_LOG") from None
            entry["prev"] = _line_hash(last)
            if prev_entry.get("event") == "retention-checkpoint" and f.tell() == len(last) + 1:
                entry["prev"] = prev_entry["prev"]  # a checkpoint stands for the dropped lines
        else:
            entry["seq"] = 1
        line = _encode(entry, key)
        f.seek(0, os.SEEK_END)
        f.write(line + b"\n")
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        self._write_head(entry["seq"], _line_hash(line), key)

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

    def _write_head(self, seq: int, digest: str, key: bytes | None) -> None:
        head = _encode({"seq": seq, "hash": digest}, key)
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
            if k is not None and not hmac.compare_digest(mac, _mac(k, body)):
                return VerifyResult(False, n, lineno, "HMAC signature does not match: the line was edited or forged")
            if k is not None and not seen_mac and n > 1 and entry.get("event") != KEY_EVENT:
                return VerifyResult(False, n, lineno, f"the {n - 1} unsigned lines before this one are not followed by "
                                    "the signed creation of the audit key: signatures were removed from them")
            seen_mac = True
        elif k is not None and seen_mac:
            return VerifyResult(False, n, lineno, "unsigned line in a signed log: inserted or rewritten without the key")
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
    if k is not None and n and not seen_mac:
        return VerifyResult(False, n, 1, "no line is signed although the audit key exists: the signatures were "
                            "removed and the chain recomputed (the key's creation is always a signed line)")
    head_p = p.with_name(p.name + ".head")
    if n and not head_p.is_file():
        return VerifyResult(False, n, n, f"the head record {head_p.name} is missing: lines may have been deleted from "
                            "the end together with it")
    if head_p.is_file():
        head_line = head_p.read_bytes().strip()
        body, mac = _split_mac(head_line)
        try:
            head = json.loads(head_line)
        except json.JSONDecodeError:
            return VerifyResult(False, n, n, "the head record (.head file) is corrupted")
        if k is not None and (mac is None or not hmac.compare_digest(mac, _mac(k, body))):
            return VerifyResult(False, n, n, "the head record's HMAC is missing or does not match: it was forged")
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
                log._write_head(cp["seq"], cp["prev"], k)
            return n_dropped
        finally:
            flock(f, False)


# --------------------------------------------------------------------------- anchors in manifests


def check_anchor(anchor: dict, where: str = "") -> str | None:
    """A problem if the audit line a (sealed) manifest recorded as the log's head is gone or changed, else None.

    Lines cut from the end of the log, even together with ``.head``, contradict every artifact
    made after them. An anchor in another log than this machine's is not checked."""
    log = Path(str(anchor.get("log", "")))
    if log.absolute() != default_path().absolute() and not log.is_file():
        return None
    if not log.is_file():
        return f"the audit log {log} is gone, but {where or 'this artifact'} was made when it held {anchor.get('seq')} lines"
    seq, digest = anchor.get("seq"), anchor.get("hash")
    last_seq = 0
    for _, line in _iter_lines(log):
        try:
            e = json.loads(line)
            s_ = int(e["seq"])
        except (ValueError, KeyError, TypeError):
            continue
        if e.get("event") == "retention-checkpoint" and s_ >= (seq or 0):
            return None  # the line was pruned: the checkpoint vouches for it
        if s_ == seq:
            if _line_hash(line) != digest:
                return (f"audit log line {seq} is not the one {where or 'this artifact'} recorded when it was made: "
                        "the log was rewritten")
            return None
        last_seq = s_
    return (f"the audit log ends at line {last_seq}, but {where or 'this artifact'} was made when it held {seq} lines: "
            "lines were deleted from its end")
