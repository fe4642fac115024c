"""Auditable drops: every record `homeforge prepare` read and did not keep, in one file.

``drops.jsonl`` in the dataset artifact has one line per dropped record (and per input
file skipped whole), in a fixed order (ingest problems, then quality filters, then
duplicates, each in input order), so the same inputs give the same file:

    {"stage": "ingest", "source": "a.jsonl:31", "reason": "malformed_json", "detail": "Expecting value"}
    {"stage": "clean", "source": "b.csv:7", "reason": "symbol_ratio", "value": 0.41, "limit": 0.3,
     "detail": "symbol ratio 0.41 > 0.30", "label": "billing", "text": "<excerpt, PII already replaced>"}
    {"stage": "dedup", "source": "b.csv:9", "reason": "near_duplicate", "value": 0.86, "limit": 0.8,
     "detail": "...", "kept": "b.csv:3", "label": "fraud", "kept_label": "billing", "text": "..."}

Excerpts are cut from the text *after* PII scrubbing, so no detected personal value is
written here. The file is a data file like ``train.jsonl``: with encryption on it is
encrypted with the rest (``security/atrest.py``). The report shows a few examples per
reason, and their excerpts only when the dataset is not encrypted.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

EXCERPT_CHARS = 200
STAGES = ("ingest", "clean", "dedup")
FILE = "drops.jsonl"


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def clean_entry(source: str, drop, text: str, label: str | None = None, rec_id: str | None = None) -> dict:
    """A quality-filter drop (built in the worker processes from ``clean.Drop``)."""
    e: dict = {"stage": "clean", "source": source}
    if rec_id is not None:
        e["id"] = rec_id
    e["reason"] = drop.reason
    if drop.value is not None:
        e["value"], e["limit"] = drop.value, drop.limit
    e["detail"] = drop.detail()
    if label is not None:
        e["label"] = label
    e["text"] = excerpt(text)
    return e


class DropLog:
    """Writes drop entries per stage into a work directory and keeps what the report needs."""

    def __init__(self, work: Path, examples_per_reason: int = 3):
        self.work = Path(work)
        self.paths = {s: self.work / f"drops.{s}.jsonl" for s in STAGES}
        self.files = {s: open(p, "w", encoding="utf-8") for s, p in self.paths.items()}
        self.k = examples_per_reason
        self.counts: Counter = Counter()
        self.examples: dict[str, list[dict]] = {}
        self.by_class: dict[str, Counter] = {}  # label -> Counter(reason)
        self.conflicts: Counter = Counter()  # (kept label, dropped label) of duplicates
        self.conflict_examples: list[dict] = []

    def add(self, entry: dict) -> None:
        self.files[entry["stage"]].write(json.dumps(entry, ensure_ascii=False) + "\n")
        reason = entry["reason"]
        if not entry.get("file_skipped"):
            self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.k:
            ex.append(entry)
        if "label" in entry:
            self.by_class.setdefault(entry["label"], Counter())[reason] += 1
            if "kept_label" in entry and entry["kept_label"] != entry["label"]:
                self.conflicts[(entry["kept_label"], entry["label"])] += 1
                if len(self.conflict_examples) < 2 * self.k:
                    self.conflict_examples.append(entry)

    def ingest(self, reason: str, file: str, line: int | None, detail: str) -> None:
        """An ``ingest.Issues`` sink: a bad line (one record) or a file skipped whole."""
        e: dict = {"stage": "ingest", "source": file if line is None else f"{file}:{line}", "reason": reason,
                   "detail": detail}
        if line is None:
            e["file_skipped"] = True
        self.add(e)

    def close(self) -> None:
        for f in self.files.values():
            if not f.closed:
                f.close()

    def finish(self, dest: Path) -> None:
        """Concatenate the stages into ``dest/drops.jsonl``."""
        self.close()
        with open(dest / FILE, "wb") as out:
            for s in STAGES:
                with open(self.paths[s], "rb") as f:
                    shutil.copyfileobj(f, out)

    def summary(self, with_text: bool) -> dict:
        """The report's ``drops`` section: totals and a few examples per reason (excerpts only if ``with_text``)."""
        def show(e: dict) -> dict:
            return {k: v for k, v in e.items() if with_text or k != "text"}

        out: dict = {"file": FILE, "records": int(sum(self.counts.values())),
                     "examples": {r: [show(e) for e in ex] for r, ex in sorted(self.examples.items())},
                     "excerpts": "shown" if with_text else "withheld: the dataset is encrypted (see drops.jsonl)"}
        return out

    def conflicting_labels(self, with_text: bool) -> dict:
        return {"count": int(sum(self.conflicts.values())),
                "pairs": [{"kept": k, "dropped": d, "count": int(n)} for (k, d), n in sorted(self.conflicts.items())],
                "examples": [{k: v for k, v in e.items() if with_text or k != "text"} for e in self.conflict_examples]}
