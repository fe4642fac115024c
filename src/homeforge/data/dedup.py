"""Exact and near-duplicate detection that scales by sorting, not by an in-memory index.

Per document (in the worker processes): a 64-bit hash of the normalised text (lower case,
punctuation and spacing removed) and a MinHash signature (``datasketch.MinHash`` with
shared permutations) over word n-gram shingles, or character n-grams for text that is
mostly CJK (Chinese, Japanese; bigrams by default: most Chinese words are two characters,
and a one- or two-character edit of a 40-character quote keeps a bigram Jaccard above
0.8, where 5-grams fall to 0.6). Shingles are fed to MinHash in batches, so one huge
document never becomes a Python list of millions of strings.

The signature is cut into ``b`` bands of ``r`` rows, with the most rows that still make
two documents *at* the threshold LSH candidates with probability >= 95% (the usual
optimiser that weighs false positives and false negatives equally misses a third of the
pairs at Jaccard 0.85). Each band is hashed to 64 bits.

After the streaming pass the hashes live in flat files. ``find_duplicates`` sorts one band
column at a time (documents that share a band are LSH candidates), verifies each candidate
against its group's first document with the estimated Jaccard similarity (and, within
``EXACT_MARGIN`` of the threshold, with the exact Jaccard of the two shingle sets when
the texts are at hand), and unions the pairs; the earliest document of each cluster is
kept. Memory is a few arrays of N integers, never a Python object per shingle or per document.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from collections import deque
from functools import lru_cache
from pathlib import Path

import numpy as np

_NORM = re.compile(r"[\W_]+", re.U)


_LONG = 1 << 16
_WORD_GAP = re.compile(r"(?<=[^\W_]) (?=[^\W_])")


def exact_key(text: str) -> int:
    """64-bit hash of the text lower-cased, with every run of punctuation/spacing made one space, stripped.

    A long text is hashed slice by slice, cut before a space between two word characters
    (where normalising the slices gives the same string as normalising the whole), so
    re.sub never holds a piece per word of a huge text.
    """
    from homeforge.data.clean import last_match

    h = hashlib.blake2b(digest_size=8)
    low = text.lower()
    if len(low) <= _LONG:
        h.update(_NORM.sub(" ", low).strip().encode("utf-8"))
    else:
        start, parts = 0, []
        while start < len(low):
            end = min(len(low), start + _LONG)
            if end < len(low):
                m = last_match(_WORD_GAP, low, start + _LONG // 2, end)
                end = m.start() if m is not None else end
            parts.append((start, end))
            start = end
        for k, (a, b) in enumerate(parts):
            norm = _NORM.sub(" ", low[a:b])
            if k == 0:
                norm = norm.lstrip(" ")
            if k == len(parts) - 1:
                norm = norm.rstrip(" ")
            h.update(norm.encode("utf-8"))
    return int.from_bytes(h.digest(), "little")


SHINGLE_BATCH = 4096  # MinHash.update_batch builds a (num_perm x batch) uint64 matrix: 4 MB at 128 perms
_TOKEN = re.compile(r"[^\W_]+", re.U)
_WS = re.compile(r"\s+")


def iter_shingles(text: str, ngram: int, char_ngram: int, batch: int = SHINGLE_BATCH):
    """Batches (lists of at most ``batch``) of UTF-8 shingles, streamed; repeats are harmless to MinHash."""
    from homeforge.data.clean import cjk_fraction

    low = text.lower()
    if cjk_fraction(low) > 0.3:
        chars, n = _WS.sub("", low), char_ngram
        last = max(1, len(chars) - n + 1)
        for start in range(0, last, batch):
            yield [chars[i:i + n].encode("utf-8") for i in range(start, min(last, start + batch))]
        return
    window: deque[str] = deque(maxlen=ngram)
    out: list[bytes] = []
    full = False
    for m in _TOKEN.finditer(low):
        window.append(m.group())
        if len(window) == ngram:
            full = True
            out.append(" ".join(window).encode("utf-8"))
            if len(out) >= batch:
                yield out
                out = []
    if not full:  # fewer words than the shingle size: the whole text is one shingle
        out.append(" ".join(window).encode("utf-8"))
    if out:
        yield out


def shingles(text: str, ngram: int, char_ngram: int) -> set[bytes]:
    """The shingle set of ``text`` (character n-grams when it is mostly CJK, word n-grams otherwise)."""
    return {g for b in iter_shingles(text, ngram, char_ngram) for g in b}


def jaccard(a: str, b: str, ngram: int, char_ngram: int) -> float:
    sa, sb = shingles(a, ngram, char_ngram), shingles(b, ngram, char_ngram)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def _crc32(b: bytes) -> int:
    return zlib.crc32(b)


@lru_cache(maxsize=8)
def lsh_params(threshold: float, num_perm: int, recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows): the most rows per band for which a pair at ``threshold`` is a candidate with P >= recall."""
    for r in range(num_perm, 0, -1):
        b = num_perm // r
        if 1 - (1 - threshold ** r) ** b >= recall:
            return b, r
    return num_perm, 1


class Signer:
    """MinHash signatures and LSH band hashes with permutations shared across documents."""

    def __init__(self, num_perm: int = 128, threshold: float = 0.8, ngram: int = 5, char_ngram: int = 2, seed: int = 1):
        from datasketch import MinHash

        self._MinHash = MinHash
        self.num_perm = num_perm
        self.ngram, self.char_ngram = ngram, char_ngram
        proto = MinHash(num_perm=num_perm, seed=seed, hashfunc=_crc32, scheme="affine32")
        self.permutations = proto.permutations
        self.bands, self.rows = lsh_params(threshold, num_perm)
        rng = np.random.default_rng(seed)
        self._mult = (rng.integers(1, 2**63, size=self.rows, dtype=np.uint64) | np.uint64(1))

    def signature(self, text: str) -> np.ndarray:
        m = self._MinHash(num_perm=self.num_perm, hashfunc=_crc32, permutations=self.permutations, scheme="affine32")
        for batch in iter_shingles(text, self.ngram, self.char_ngram):
            m.update_batch(batch)
        return m.hashvalues.astype(np.uint32)

    def band_hashes(self, sigs: np.ndarray) -> np.ndarray:
        """(n, num_perm) uint32 signatures -> (n, bands) uint64 band hashes."""
        used = sigs[:, : self.bands * self.rows].astype(np.uint64).reshape(len(sigs), self.bands, self.rows)
        with np.errstate(over="ignore"):
            h = (used * self._mult).sum(axis=2, dtype=np.uint64)
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(32)
        return h


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index (earlier document) is the root: first copy is kept
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


def _group_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, other) index pairs: each document whose key equals an earlier one's, with that earliest one."""
    order = np.argsort(keys, kind="stable")
    v = keys[order]
    new = np.empty(len(v), dtype=bool)
    if len(v):
        new[0] = True
        new[1:] = v[1:] != v[:-1]
    run = np.cumsum(new) - 1
    first = order[np.flatnonzero(new)][run]
    dup = first != order
    return first[dup], order[dup]


EXACT_MARGIN = 0.1  # candidates whose estimate is this close to the threshold get the exact Jaccard


def find_duplicates(n: int, exact: np.ndarray | None, bands: list | None, sigs: np.ndarray | None,
                    threshold: float, exact_similarity=None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster documents; returns (root per doc, exact-duplicate mask); a doc is kept iff root == itself.

    ``exact``: (n,) uint64; ``bands``: a list of callables, each returning one band column as an (n, 1)
    uint64 array (a memmap, opened and released one at a time); ``sigs``: (n, num_perm) uint32;
    ``exact_similarity(a, b)``: the exact Jaccard of two documents' shingle sets, asked only for
    candidates whose estimate lies within ``EXACT_MARGIN`` of the threshold.
    """
    uf = _UnionFind(n)
    exact_dup = np.zeros(n, dtype=bool)
    if exact is not None and n:
        first, other = _group_pairs(np.asarray(exact))
        exact_dup[other] = True
        for a, b in zip(first.tolist(), other.tolist(), strict=False):
            uf.union(a, b)
    if bands is not None and n:
        pairs = []
        for open_band in bands:
            col = open_band()
            first, other = _group_pairs(np.array(col[:, 0]))
            del col
            keep = ~exact_dup[other]
            if keep.any():
                pairs.append(np.stack([first[keep], other[keep]], 1))
        if pairs:
            cand = np.unique(np.concatenate(pairs), axis=0)
            for start in range(0, len(cand), 65536):
                chunk = cand[start:start + 65536]
                sim = (np.asarray(sigs[chunk[:, 0]]) == np.asarray(sigs[chunk[:, 1]])).mean(1)
                for (a, b), s in zip(chunk.tolist(), sim.tolist(), strict=False):
                    if exact_similarity is not None and abs(s - threshold) < EXACT_MARGIN:
                        s = exact_similarity(a, b)
                    if s >= threshold:
                        uf.union(a, b)
    roots = np.fromiter((uf.find(i) for i in range(n)), dtype=np.int64, count=n)
    return roots, exact_dup


def similarity(sigs, a: int, b: int) -> float:
    return float((np.asarray(sigs[a]) == np.asarray(sigs[b])).mean())


class SpillArray:
    """Append-only rows of a fixed dtype/width in a flat file; ``open`` memory-maps it."""

    def __init__(self, path: Path, dtype, width: int):
        self.path, self.dtype, self.width = Path(path), np.dtype(dtype), width
        self.f = open(self.path, "wb")
        self.n = 0

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype).reshape(-1, self.width)
        self.f.write(rows.tobytes())
        self.n += len(rows)

    def rows(self) -> RowReader:
        """Random row access by ``pread`` (the page cache, not this process, holds the file)."""
        self.f.close()
        return RowReader(self.path, self.dtype, self.width, self.n)

    def open(self) -> np.ndarray:
        self.f.close()
        if self.n == 0:
            return np.zeros((0, self.width), dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n, self.width))


class RowReader:
    """``reader[i]`` / ``reader[array_of_i]`` rows of a flat file, read with ``os.pread``.

    Unlike a memmap, pages read here do not stay mapped in the process, so looking up
    rows scattered over a large file does not grow the resident set.
    """

    def __init__(self, path: Path, dtype, width: int, n: int):
        self.path, self.dtype, self.width, self.n = path, np.dtype(dtype), width, n
        self.row_bytes = self.dtype.itemsize * width
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx):
        if np.isscalar(idx):
            return np.frombuffer(os.pread(self.fd, self.row_bytes, int(idx) * self.row_bytes), dtype=self.dtype)
        idx = np.asarray(idx).ravel()
        out = np.empty((len(idx), self.width), dtype=self.dtype)
        for k, i in enumerate(idx.tolist()):
            out[k] = np.frombuffer(os.pread(self.fd, self.row_bytes, i * self.row_bytes), dtype=self.dtype)
        return out

    def close(self) -> None:
        os.close(self.fd)
