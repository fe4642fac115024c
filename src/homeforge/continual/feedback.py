"""The feedback log of `homeforge serve` (``feedback.enabled``): exchanges and ratings, private at rest.

Every answered request becomes an ``exchange`` record (response id, model arm, prompt or
messages, response text, latency, token counts) and every ``POST /v1/feedback`` a
``feedback`` record (the response id, a rating, an optional correction). Records are

- PII-scrubbed before they reach disk (the data stage's ``data.pii.Scrubber``);
- encrypted (``security.crypto.EncryptedLog``: each record sealed with AES-256-GCM, so an
  edited, reordered or foreign record fails to read; no data key -> no capture);
- written off the request path by one background thread, to ``feedback-TIMESTAMP.log``
  files that rotate at ``max_mb`` and are deleted after ``retention_days`` or beyond
  ``max_files`` (each deletion is a line in the audit log).

``read_records`` reads a folder of rotated files (or one file) in order; ``export_records``
turns exchanges into chat records for `homeforge learn` (a correction replaces the answer;
``min_rating`` keeps only well-rated ones).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from homeforge.errors import HomeforgeError

TEXT_FIELDS = ("prompt", "response", "correction", "comment")
PREFIX = "feedback-"


class FeedbackLog:
    def __init__(self, folder: str | Path, *, encrypt: bool = True, max_mb: float = 16.0, retention_days: float = 30.0,
                 max_files: int = 50, scrub: bool = True):
        self.folder = Path(folder).expanduser()
        self.key = None
        if encrypt:
            from homeforge.security import keys

            self.key = keys.load_key(required=False)
            if self.key is None:
                raise HomeforgeError("feedback capture encrypts what it records and there is no data key",
                                     where=str(self.folder),
                                     fix="create one with `homeforge keys init`, or set feedback.encrypt=false "
                                         "(plaintext at rest, not recommended)")
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.retention_s = retention_days * 86400
        self.max_files = max_files
        self._scrubber = None
        if scrub:
            from homeforge.data.pii import Scrubber

            self._scrubber = Scrubber()
        self._current: Path | None = None
        self._log = None
        self.errors = 0
        self.written = 0
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="homeforge-feedback", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ writing (one thread)

    def append(self, record: dict) -> None:
        """Queue one record (any thread); scrubbing, encryption and I/O happen on the writer thread."""
        self._q.put(dict(record, time=record.get("time") or time.time()))

    def scrub(self, rec: dict) -> dict:
        if self._scrubber is None:
            return rec
        for k in TEXT_FIELDS:
            if isinstance(rec.get(k), str):
                rec[k] = self._scrubber.scrub(rec[k])[0]
        if isinstance(rec.get("messages"), list):
            rec["messages"] = [{**m, "content": self._scrubber.scrub(m["content"])[0]}
                               if isinstance(m.get("content"), str) else m for m in rec["messages"]]
        return rec

    def _run(self) -> None:
        while True:
            rec = self._q.get()
            try:
                if rec is None:
                    return
                self._write(self.scrub(rec))
                self.written += 1
            except Exception:  # a failed write is counted (shown in /metrics), never crashes the server
                self.errors += 1
            finally:
                self._q.task_done()

    def _write(self, rec: dict) -> None:
        line = json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"
        path = self._target(len(line.encode()))
        if self.key is not None:
            from homeforge.security.crypto import EncryptedLog

            if self._log is None or self._log.path != path:
                self._log = EncryptedLog(path, self.key)
            self._log.append(line)
        else:
            import os

            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(line)

    def _target(self, size: int) -> Path:
        """The file to append to: the newest one, or a new one when it is full (then old files are pruned)."""
        cur = self._current or (log_files(self.folder) or [None])[-1]
        if cur is None or (cur.exists() and cur.stat().st_size + size > self.max_bytes and cur.stat().st_size > 0):
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            n = 0
            while (self.folder / f"{PREFIX}{stamp}-{n:03d}.log").exists():
                n += 1
            cur = self.folder / f"{PREFIX}{stamp}-{n:03d}.log"
            self.prune(keep=cur)
        self._current = cur
        return cur

    def prune(self, keep: Path | None = None, now: float | None = None) -> list[Path]:
        """Delete files past the retention time or beyond ``max_files`` (oldest first); audited."""
        now = time.time() if now is None else now
        files = [f for f in log_files(self.folder) if f != keep]
        gone = [f for f in files if now - f.stat().st_mtime > self.retention_s]
        rest = [f for f in files if f not in gone]
        limit = max(0, self.max_files - (1 if keep is not None else 0))
        gone += rest[:max(0, len(rest) - limit)]
        if gone:
            for f in gone:
                f.unlink(missing_ok=True)
            from homeforge.security.audit import AuditLog

            AuditLog().append({"event": "feedback-prune", "folder": str(self.folder), "files": [f.name for f in gone]})
        return gone

    def flush(self) -> None:
        self._q.join()

    def close(self) -> None:
        self.flush()
        self._q.put(None)
        self._thread.join(5)


# ------------------------------------------------------------------ reading


def log_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(p.glob(f"{PREFIX}*.log")) if p.is_dir() else []


def read_records(path: str | Path) -> Iterator[dict]:
    """Every record of a feedback folder (rotated files in order) or file; decrypted with the data key."""
    files = log_files(path)
    if not files:
        raise HomeforgeError(f"no feedback log at {path}", where=str(path),
                             fix="pass the folder `homeforge serve` writes with feedback.enabled=true "
                                 "(default $HOMEFORGE_HOME/feedback) or one of its feedback-*.log files")
    from homeforge.security import crypto

    for f in files:
        with crypto.open_text(f) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except ValueError:
                    raise HomeforgeError(f"{f} line {n} is not a JSON record", where=f"{f}:{n}",
                                         fix="the feedback log was changed by hand; restore it or remove that "
                                             "line") from None


def joined(path: str | Path) -> list[dict]:
    """Exchanges with their feedback folded in (``rating``, ``correction``; the last feedback wins)."""
    exchanges: dict[str, dict] = {}
    for rec in read_records(path):
        if rec.get("type") == "exchange":
            exchanges[rec["id"]] = rec
        elif rec.get("type") == "feedback" and rec.get("id") in exchanges:
            ex = exchanges[rec["id"]]
            for k in ("rating", "correction"):
                if rec.get(k) is not None:
                    ex[k] = rec[k]
    return list(exchanges.values())


def export_records(path: Path, out: Path, min_rating: float | None = None) -> tuple[Path, int]:
    """Chat records (``{"messages": [...]}``) of the exchanges worth learning from, as JSONL at ``out`` (0600;
    already PII-scrubbed; the caller puts it in a private temp folder and removes it after use)."""
    rows = []
    for ex in joined(path):
        answer = ex.get("correction") or ex.get("response")
        if not answer:
            continue
        if not ex.get("correction") and min_rating is not None and (ex.get("rating") is None or
                                                                    ex["rating"] < min_rating):
            continue
        msgs = ex.get("messages") or [{"role": "user", "content": ex.get("prompt", "")}]
        rows.append({"messages": [*msgs, {"role": "assistant", "content": answer}]})
    if not rows:
        raise HomeforgeError(f"the feedback log {path} holds no exchange to learn from"
                             + (f" rated at least {min_rating} or corrected" if min_rating is not None else ""),
                             where=str(path), fix="collect more feedback, or lower min_rating")
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    from homeforge._fs import atomic_write_bytes

    atomic_write_bytes(out, data, mode=0o600)
    return out, len(rows)
