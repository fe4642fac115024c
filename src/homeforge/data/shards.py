"""Packed token shards: one flat uint16/uint32 token file per split plus an index.

Documents are concatenated, each followed by the EOS id. ``index.json`` records the dtype
and token count per split and ``{split}.docs.npy`` the start offset of every document,
so training can pack sequences and still know document boundaries.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable
from pathlib import Path

import numpy as np

INDEX = "index.json"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


class ShardWriter:
    """Streams token lists of one split to ``{split}.bin``; memory does not grow with size."""

    def __init__(self, root: str | Path, split: str, vocab_size: int, eos_id: int):
        self.root = Path(root)
        self.split = split
        self.dtype = token_dtype(vocab_size)
        self.eos_id = eos_id
        self.file = open(self.root / f"{split}.bin", "wb")
        self.n_tokens = 0
        self.starts = array("q")  # compact: 8 bytes per document

    def add(self, ids: list[int]) -> None:
        self.start_doc()
        self.extend(ids)
        self.end_doc()

    def start_doc(self) -> None:
        self.starts.append(self.n_tokens)

    def extend(self, ids: list[int]) -> None:
        """Append a piece of the current document (long documents arrive piece by piece)."""
        if len(ids):
            self.file.write(np.asarray(ids, dtype=self.dtype).tobytes())
            self.n_tokens += len(ids)

    def end_doc(self) -> None:
        self.file.write(np.asarray([self.eos_id], dtype=self.dtype).tobytes())
        self.n_tokens += 1

    def close(self) -> dict:
        self.file.close()
        np.save(self.root / f"{self.split}.docs.npy", np.asarray(self.starts, dtype=np.int64))
        return {"file": f"{self.split}.bin", "tokens": self.n_tokens, "docs": len(self.starts)}


def write_shards(root: str | Path, splits: dict[str, Iterable[list[int]]], vocab_size: int, eos_id: int) -> dict:
    """Write every split and the index; returns the index."""
    index = {"format": "packed-tokens-v1", "dtype": np.dtype(token_dtype(vocab_size)).name,
             "vocab_size": vocab_size, "eos_id": eos_id, "splits": {}}
    for split, seqs in splits.items():
        w = ShardWriter(root, split, vocab_size, eos_id)
        for ids in seqs:
            w.add(ids)
        index["splits"][split] = w.close()
    (Path(root) / INDEX).write_text(json.dumps(index, indent=2))
    return index


def read_index(root: str | Path) -> dict:
    """The dataset's index, checked against its manifest (``data.dataset.DatasetReader``)."""
    from homeforge.data.dataset import DatasetReader

    return DatasetReader.open(root).index


def load_tokens(root: str | Path, split: str) -> np.ndarray:
    """Memory-map the packed tokens of ``split`` (read-only), checked first (``data.dataset.DatasetReader``)."""
    from homeforge.data.dataset import DatasetReader

    return DatasetReader.open(root).tokens(split)
