"""Experience replay: a batch source that mixes new samples with a fixed sample of the old data.

Sample ``k`` of the run is a replay sample when ``floor((k + 1) * ratio) > floor(k * ratio)``
(an exact, evenly spread share ``ratio`` of every run), else the next new sample. Both
sources are ``BatchSource``s (``train.loop``), so sample ``k`` stays a pure function of
(seed, k) and an interrupted run resumes exactly. The replay buffer is ``buffer`` windows of
the old training split drawn once with the seed (all of them when ``buffer`` is 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from homeforge.errors import HomeforgeError


class BufferSource:
    """``buffer`` samples of ``src`` chosen once with ``seed``, cycled in a seeded order per epoch."""

    def __init__(self, src, buffer: int, seed: int):
        n = len(src)
        if n == 0:
            raise HomeforgeError("the replay data holds no complete sample", fix="lower seq_len or pass more old data")
        self.src = src
        rng = np.random.default_rng([seed, 7])
        self.index = np.sort(rng.choice(n, size=min(buffer, n), replace=False)) if 0 < buffer < n else np.arange(n)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.index)

    def sample(self, k: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(k, len(self.index))
        order = np.random.default_rng([self.seed, 11, epoch]).permutation(len(self.index))
        return _row(self.src, int(self.index[order[i]]))


def _row(src, j: int) -> dict[str, torch.Tensor]:
    """Sample ``j`` of ``src`` in its own unshuffled order (a window, or a chat sample)."""
    windows = getattr(src, "windows", None)
    if windows is not None:  # a WindowSource: window j directly
        t = torch.from_numpy(windows.window(j)[None])
        return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}
    return src.batch(j, 1)


def replay_count(k: int, ratio: float) -> int:
    """How many of the samples ``0 .. k-1`` are replay samples."""
    return math.floor(k * ratio + 1e-9)


class ReplaySource:
    """``BatchSource`` over new samples with a share ``ratio`` of replayed old ones (see the module doc)."""

    def __init__(self, new, old: BufferSource, ratio: float):
        if not 0 <= ratio < 1:
            raise HomeforgeError(f"replay.ratio must be in [0, 1), got {ratio}", fix="e.g. replay.ratio=0.3")
        self.new, self.old, self.ratio = new, old, ratio

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.new) / (1 - self.ratio)))

    def batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        rows = []
        for k in range(start, start + size):
            r_before, r_after = replay_count(k, self.ratio), replay_count(k + 1, self.ratio)
            if r_after > r_before:
                rows.append(self.old.sample(r_before))
            else:
                rows.append(self.new.batch(k - r_before, 1))
        return _stack(rows)

    def eval_batches(self, size: int, max_batches: int | None = None):
        return self.new.eval_batches(size, max_batches)


def _stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of rows from both sources: a text window (input_ids, labels) next to a packed chat row
    (+ position_ids) or a padded one (+ attention_mask) gets the missing field (one segment, all attended)."""
    keys = set().union(*(r.keys() for r in rows))
    width = max(r["input_ids"].shape[-1] for r in rows)
    out = {}
    for k in sorted(keys):
        pad = {"labels": -100}.get(k, 0)
        parts = []
        for r in rows:
            n = r["input_ids"].shape[-1]
            v = r.get(k)
            if v is None:
                v = torch.arange(n)[None] if k == "position_ids" else torch.ones(1, n, dtype=torch.long)
            parts.append(torch.nn.functional.pad(v, (0, width - v.shape[-1]), value=pad))
        out[k] = torch.cat(parts, 0)
    return out
