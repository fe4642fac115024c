"""Seeded character- and word-level perturbations of text, for robustness metrics.

The same (seed, text) always gives the same perturbed text, so a model and its baseline
see identical noisy inputs and their scores stay paired.
"""

from __future__ import annotations

import hashlib
import random
import string

KINDS = ("char", "word")
_LETTERS = string.ascii_lowercase


def _rng(seed: int, kind: str, text: str) -> random.Random:
    h = hashlib.sha256(f"{seed}\0{kind}\0{text}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def perturb_chars(text: str, rate: float, seed: int = 0) -> str:
    """Typos: each letter is, with probability ``rate``, swapped with the next, deleted,
    replaced or followed by an inserted random letter (equally likely)."""
    rng = _rng(seed, "char", text)
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        c = chars[i]
        if c.isalpha() and rng.random() < rate:
            op = rng.randrange(4)
            if op == 0 and i + 1 < len(chars):
                out += [chars[i + 1], c]
                i += 2
                continue
            if op == 1:
                i += 1
                continue
            if op == 2:
                out.append(rng.choice(_LETTERS))
            else:
                out += [c, rng.choice(_LETTERS)]
        else:
            out.append(c)
        i += 1
    return "".join(out)


def perturb_words(text: str, rate: float, seed: int = 0) -> str:
    """Each word is, with probability ``rate``, dropped or swapped with its neighbour."""
    rng = _rng(seed, "word", text)
    words = text.split(" ")
    out: list[str] = []
    i = 0
    while i < len(words):
        if words[i] and rng.random() < rate:
            if rng.random() < 0.5 and i + 1 < len(words):
                out += [words[i + 1], words[i]]
                i += 2
                continue
            i += 1
            continue
        out.append(words[i])
        i += 1
    return " ".join(out)


def perturb(text: str, kind: str, rate: float, seed: int = 0) -> str:
    if kind == "char":
        return perturb_chars(text, rate, seed)
    if kind == "word":
        return perturb_words(text, rate, seed)
    raise ValueError(f"unknown perturbation {kind!r}; choose one of {KINDS}")
