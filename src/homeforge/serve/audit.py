"""Per-request audit lines for the server, written off the request path.

Lines go through the security stage's hash-chained log (``homeforge.security.audit``)
from a background thread, so an fsync never adds to a request's latency. Prompt and
completion text are only recorded when enabled, and then PII-scrubbed with the data
stage's detectors (``homeforge.data.pii``).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path


class RequestAudit:
    def __init__(self, path: str | Path | None = None, log_text: bool = False):
        from homeforge import paths
        from homeforge.security.audit import AuditLog

        self.path = Path(path) if path else paths.serve_audit_file()
        self.log = AuditLog(self.path)
        self.log_text = log_text
        self._scrubber = None
        if log_text:
            from homeforge.data.pii import Scrubber

            self._scrubber = Scrubber()
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="homeforge-audit", daemon=True)
        self._thread.start()
        self.errors = 0

    def scrub(self, text: str) -> str:
        return self._scrubber.scrub(text)[0] if self._scrubber else text

    def append(self, record: dict) -> None:
        """Queue one record (any thread); text fields (``prompt``, ``completion``) are scrubbed or dropped.

        Scrubbing happens on the writer thread, never on the caller's (an engine or request thread).
        """
        rec = dict(record)
        if not self.log_text:
            rec.pop("prompt", None)
            rec.pop("completion", None)
        self._q.put(rec)

    def _scrubbed(self, rec: dict) -> dict:
        for k in ("prompt", "completion"):
            if k in rec:
                if isinstance(rec[k], str):
                    rec[k] = self.scrub(rec[k])
                else:
                    rec.pop(k)
        return rec

    def _run(self) -> None:
        while True:
            rec = self._q.get()
            if rec is None:
                return
            try:
                self.log.append(self._scrubbed(rec))
            except Exception:  # an audit failure is counted and shown in /metrics, never crashes the server
                self.errors += 1
            finally:
                self._q.task_done()

    def flush(self) -> None:
        self._q.join()

    def close(self) -> None:
        self.flush()
        self._q.put(None)
        self._thread.join(5)
