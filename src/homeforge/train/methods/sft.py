"""method: sft — full fine-tune on chat data, loss on the assistant tokens only.

The dataset (kind ``chat``) holds each conversation rendered with the chat template and
tokenized, with ``loss_mask`` = 1 exactly on assistant contents and the end-of-turn token
closing each assistant message. A token at position t+1 with mask 1 becomes the label of
position t; everything else is ignored (-100), so prompts never bear loss.

Packing (``sft.packing``, on by default) puts several conversations into one row of
``seq_len`` tokens (best-fit decreasing, so rows are nearly full) instead of padding each
to the longest in its batch. Conversations never see each other: ``position_ids`` restart
at 0 for every conversation and no 2-D attention mask is passed, which makes transformers
build a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``); with
flash-attention the same position ids select the varlen kernel. The logits of a packed row
therefore equal those of each conversation run alone (tested), and the LM head runs only
on loss-bearing positions.
"""

from __future__ import annotations

import bisect
from collections import Counter

import numpy as np
import torch

from homeforge.errors import HomeforgeError
from homeforge.train.methods.common import (
    IGNORE,
    build_causal_lm,
    check_token_range,
    open_dataset,
    read_token_records,
    seeded_order,
)


def chat_samples(records: list[dict], seq_len: int, truncate: bool = True) -> tuple[list[tuple], Counter]:
    """(input_ids, labels) int64 arrays per conversation, and the dropped records by reason.

    labels[t] = input_ids[t+1] where loss_mask[t+1] == 1, else -100 (the last position
    has no next token). Longer conversations are cut to ``seq_len`` (or dropped).
    """
    samples, dropped = [], Counter()
    for rec in records:
        ids = np.asarray(rec["input_ids"], dtype=np.int64)
        mask = np.asarray(rec["loss_mask"], dtype=bool)
        if len(ids) != len(mask):
            dropped["input_ids and loss_mask differ in length"] += 1
            continue
        if len(ids) < 2:
            dropped["shorter than 2 tokens"] += 1
            continue
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        labels[:-1] = np.where(mask[1:], ids[1:], IGNORE)
        if len(ids) > seq_len:
            if not truncate:
                dropped[f"longer than seq_len={seq_len}"] += 1
                continue
            ids, labels = ids[:seq_len], labels[:seq_len]
        if not (labels != IGNORE).any():
            dropped["no assistant tokens (within seq_len)"] += 1
            continue
        samples.append((ids, labels))
    return samples, dropped


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: rows of sample indices whose lengths sum to <= capacity.

    Deterministic (ties broken by index); O(n log n) with a sorted list of free space.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, r = free.pop(at)
            rows[r].append(i)
            if space - n > 0:
                bisect.insort(free, (space - n, r))
        else:
            rows.append([i])
            if capacity - n > 0:
                bisect.insort(free, (capacity - n, len(rows) - 1))
    return rows


class ChatSource:
    """A ``BatchSource`` of chat samples: packed rows or padded single conversations.

    Packed: ``len`` = packed rows; batches are {input_ids, labels, position_ids} of shape
    [size, seq_len]. Unpacked: ``len`` = conversations; batches are padded to the longest
    in the micro-batch, with an attention mask. The order of an epoch is a seeded
    permutation, so sample ``k`` of the run depends only on (seed, k).
    """

    def __init__(self, samples: list[tuple], seq_len: int, pad_id: int, seed: int = 0, shuffle: bool = True,
                 packing: bool = True):
        if not samples:
            raise HomeforgeError("no usable conversations in the split", fix="check the dataset (see dropped counts)")
        self.samples, self.seq_len, self.pad_id = samples, seq_len, pad_id
        self.seed, self.shuffle, self.packing = seed, shuffle, packing
        lengths = [len(s[0]) for s in samples]
        self.rows = pack(lengths, seq_len) if packing else [[i] for i in range(len(samples))]
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def loss_tokens(self) -> int:
        return int(sum((s[1] != IGNORE).sum() for s in self.samples))

    def _row_index(self, k: int) -> int:
        epoch, i = divmod(k, len(self.rows))
        if not self.shuffle:
            return i
        if epoch != self._order_epoch:
            self._order, self._order_epoch = seeded_order(len(self.rows), self.seed, epoch), epoch
        return int(self._order[i])

    def _collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = self.seq_len if self.packing else max(sum(len(self.samples[i][0]) for i in r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
        pos = np.zeros((len(rows), width), dtype=np.int64)
        for b, row in enumerate(rows):
            at = 0
            for i in row:
                x, y = self.samples[i]
                ids[b, at:at + len(x)], labels[b, at:at + len(x)] = x, y
                pos[b, at:at + len(x)] = np.arange(len(x))
                at += len(x)
            pos[b, at:] = np.arange(width - at)  # padding: its own segment, no label
        out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.packing:
            out["position_ids"] = torch.from_numpy(pos)
        else:
            lengths = torch.tensor([len(self.samples[r[0]][0]) for r in rows])
            out["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return out

    def batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        return self._collate([self.rows[self._row_index(k)] for k in range(start, start + size)])

    def eval_batches(self, size: int, max_batches: int | None = None):
        n = (len(self.rows) + size - 1) // size
        for b in range(n if max_batches is None else min(n, max_batches)):
            yield self._collate(self.rows[b * size:(b + 1) * size])


def chat_sources(cfg, ds, n_embeddings: int):
    """(train, val) ChatSources of a chat dataset; dropped records are counted in ``ds.dropped``."""
    pad = ds.tokenizer.pad_token_id
    pad = pad if pad is not None else (ds.tokenizer.eos_token_id or 0)
    out = []
    for split, shuffle in (("train", True), ("val", False)):
        if split == "val" and not ds.has_split("val"):
            out.append(None)
            continue
        records = read_token_records(ds, split, ("input_ids", "loss_mask"))
        max_id = max((max(r["input_ids"]) for r in records if r["input_ids"]), default=0)
        check_token_range(ds, max_id, n_embeddings, str(ds.root / f"{split}.tokens.jsonl"))
        samples, dropped = chat_samples(records, cfg.seq_len, cfg.sft.truncate)
        ds.dropped[split] = dict(dropped)
        if split == "val" and not samples:
            out.append(None)
            continue
        if not samples:
            raise HomeforgeError(f"no usable conversations in the train split of {ds.root} "
                                 f"(dropped: {dict(dropped)})", where=str(ds.root),
                                 fix="check that the data has assistant turns; raise train.seq_len")
        out.append(ChatSource(samples, cfg.seq_len, pad, seed=cfg.seed, shuffle=shuffle, packing=cfg.sft.packing))
    return out[0], out[1]


def build_task(cfg, data_dir):
    from homeforge.train.methods.pretrain import causal_lm_task

    ds = open_dataset(data_dir, "sft")
    model, model_dir = build_causal_lm(cfg, ds)
    train, val = chat_sources(cfg, ds, model.get_input_embeddings().num_embeddings)
    return causal_lm_task(cfg, ds, model, model_dir, train, val, method="sft", packing=cfg.sft.packing,
                          rows=len(train), conversations=len(train.samples), loss_tokens=train.loss_tokens,
                          dropped=ds.dropped)
