"""EDA-style augmentation (Wei & Zou, 2019): swap, delete, insert, synonym replacement.

Seeded per record (seed + record hash), so the same inputs always give the same copies,
whatever the order or the number of worker processes. Insertions draw from a corpus
vocabulary; synonyms come from a user file (one group per line, separated by commas or
tabs): homeforge ships no word lists.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

from homeforge.errors import HomeforgeError


def load_synonyms(path: str | Path) -> dict[str, list[str]]:
    p = Path(path)
    if not p.is_file():
        raise HomeforgeError(f"synonyms file {p} does not exist", fix="set augment.synonyms_file to a file with one group per line")
    table: dict[str, list[str]] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        group = [w.strip() for w in re.split(r"[,\t]", line) if w.strip()]
        for w in group:
            table.setdefault(w.lower(), []).extend(x for x in group if x != w)
    return table


class Augmenter:
    def __init__(self, ops: list[str], alpha: float, seed: int, vocab: list[str], synonyms: dict[str, list[str]] | None):
        self.ops = [o for o in ops if o != "synonym" or synonyms] or ["swap"]
        self.alpha = alpha
        self.seed = seed
        self.vocab = vocab
        self.synonyms = synonyms or {}

    def augment(self, text: str, copy: int) -> str:
        key = hashlib.sha256(f"{self.seed}\0{copy}\0{text}".encode()).digest()
        rng = random.Random(key)
        words = text.split(" ")
        if len(words) < 2:
            return text
        n = max(1, int(self.alpha * len(words)))
        op = rng.choice(self.ops)
        if op == "swap":
            for _ in range(n):
                i, j = rng.randrange(len(words)), rng.randrange(len(words))
                words[i], words[j] = words[j], words[i]
        elif op == "delete":
            drop = set(rng.sample(range(len(words)), min(n, len(words) - 1)))
            words = [w for i, w in enumerate(words) if i not in drop]
        elif op == "insert" and self.vocab:
            for _ in range(n):
                words.insert(rng.randrange(len(words) + 1), rng.choice(self.vocab))
        elif op == "synonym":
            idx = [i for i, w in enumerate(words) if w.lower() in self.synonyms]
            for i in rng.sample(idx, min(n, len(idx))):
                words[i] = rng.choice(self.synonyms[words[i].lower()])
        return " ".join(words)


class Reservoir:
    """A fixed-size uniform sample of words from a stream (seeded): the insertion vocabulary."""

    def __init__(self, size: int = 5000, seed: int = 0):
        self.size, self.rng, self.seen, self.items = size, random.Random(seed), 0, []

    def add_text(self, text: str) -> None:
        for w in text.split():
            if not w.isalpha():
                continue
            self.seen += 1
            if len(self.items) < self.size:
                self.items.append(w)
            else:
                j = self.rng.randrange(self.seen)
                if j < self.size:
                    self.items[j] = w
