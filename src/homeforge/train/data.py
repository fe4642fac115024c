"""Deterministic batches from packed token shards.

The token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (inputs and
shifted labels). Sample ``k`` of the run is a pure function of (seed, k): window
``perm_epoch[k mod n]`` with ``epoch = k // n``. Resuming therefore needs only ``k``.
"""

from __future__ import annotations

import numpy as np
import torch


class PackedWindows:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.n = max(0, (len(tokens) - 1) // seq_len)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def window_index(self, k: int) -> int:
        epoch, i = divmod(k, self.n)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def window(self, w: int) -> np.ndarray:
        s = w * self.seq_len
        return np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64)

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. start+size-1`` of the run as (input_ids, labels)."""
        rows = np.stack([self.window(self.window_index(k)) for k in range(start, start + size)])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def sequential(self, batch_size: int, max_batches: int | None = None):
        """Unshuffled pass for evaluation: yields (input_ids, labels)."""
        n_batches = (self.n + batch_size - 1) // batch_size
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            idx = range(b * batch_size, min(self.n, (b + 1) * batch_size))
            rows = np.stack([self.window(i) for i in idx])
            t = torch.from_numpy(rows)
            yield t[:, :-1].contiguous(), t[:, 1:].contiguous()


class WindowSource:
    """A ``BatchSource`` (see ``train.loop``) over packed token windows, for pretraining.

    ``batch(start, size)`` -> ``{"input_ids", "labels"}`` (labels already shifted, aligned
    with ``input_ids``); deterministic in the sample index, so resume needs only ``start``.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.windows = PackedWindows(tokens, seq_len, seed=seed, shuffle=shuffle)

    def __len__(self) -> int:
        return len(self.windows)

    def batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        x, y = self.windows.batch(start, size)
        return {"input_ids": x, "labels": y}

    def eval_batches(self, size: int, max_batches: int | None = None):
        for x, y in self.windows.sequential(size, max_batches):
            yield {"input_ids": x, "labels": y}
