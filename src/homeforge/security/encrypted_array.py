"""``EncryptedArray``: random access to an encrypted token file, like a read-only memmap."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from homeforge.security.crypto import CryptoError, _Chunks
from homeforge.security.keys import DataKey


class EncryptedArray:
    """A read-only 1-D array view of an encrypted token file, decrypted chunk by chunk on access.

    Supports ``len``, integer indexing and contiguous slices (what ``np.memmap`` is used
    for in training and eval) and ``np.asarray(arr)`` for the whole thing. Every chunk's
    tag is checked once on open, so a tampered or truncated file is refused before any
    token is used. Memory: a small LRU cache of decrypted chunks.
    """

    def __init__(self, path: str | Path, dtype, length: int | None = None, key: DataKey | None = None,
                 cache_chunks: int = 64, verify: bool = True):
        self._c = _Chunks(path, key)
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if verify:
            self._c.verify_all()
        n = self._c.size // self.dtype.itemsize
        if self._c.size % self.dtype.itemsize or (length is not None and length != n):
            raise CryptoError(f"{path} holds {self._c.size} bytes, which is not {length} tokens of {self.dtype}",
                              where=str(path), fix="re-run the stage that made it")
        self.shape = (n,)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = cache_chunks
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 1

    def _chunk(self, k: int) -> bytes:
        with self._lock:
            data = self._cache.get(k)
            if data is not None:
                self._cache.move_to_end(k)
                return data
        data = self._c.chunk(k)
        with self._lock:
            self._cache[k] = data
            if len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return data

    def _read(self, start: int, stop: int) -> np.ndarray:
        isz = self.dtype.itemsize
        b0, b1 = start * isz, stop * isz
        if b1 <= b0:
            return np.zeros(0, dtype=self.dtype)
        cs = self._c.cs
        parts = []
        for k in range(b0 // cs, (b1 - 1) // cs + 1):
            data = self._chunk(k)
            lo = max(b0 - k * cs, 0)
            hi = min(b1 - k * cs, len(data))
            parts.append(data[lo:hi])
        return np.frombuffer(b"".join(parts), dtype=self.dtype)

    def __getitem__(self, idx):
        n = len(self)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            arr = self._read(start, max(start, stop)) if step == 1 else self._read(0, n)[idx]
            return arr
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + (n if idx < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {idx} is out of bounds for {n} tokens")
            return self._read(i, i + 1)[0]
        return self._read(0, n)[idx]

    def __array__(self, dtype=None, copy=None):
        arr = self._read(0, len(self))
        return arr.astype(dtype) if dtype is not None else arr

    def close(self) -> None:
        self._c.close()
