"""method: classify — a sequence-classification head on a local checkpoint or a preset.

The model is transformers' ``AutoModelForSequenceClassification`` for the architecture
(for decoders: a linear ``score`` head on the last non-padding token; for BERT-like
encoders: the pooled [CLS] state), so the output directory loads with
``AutoModelForSequenceClassification.from_pretrained`` anywhere. Labels come from the
dataset (kind ``classification``: ``input_ids`` + ``label`` per line, ``labels.json``
naming the classes). The loss is the summed cross-entropy over the samples of a batch;
``accuracy`` of the batch is logged beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from homeforge.errors import HomeforgeError
from homeforge.train.methods.common import (
    check_token_range,
    check_tokenizers_match,
    open_dataset,
    read_token_records,
    seeded_order,
)


def read_labels(ds) -> list[str]:
    p = ds.root / "labels.json"
    if not p.is_file():
        raise HomeforgeError(f"classification dataset {ds.root} has no labels.json", where=str(ds.root),
                             fix="re-run `homeforge prepare` with kind=classification")
    names = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(names, list) or len(names) < 2:
        raise HomeforgeError("labels.json must list at least two label names", where=str(p),
                             fix="re-run `homeforge prepare` on data with two or more classes")
    return [str(n) for n in names]


class LabelledSource:
    """A ``BatchSource`` of (input_ids, label) records, right-padded per micro-batch."""

    def __init__(self, records: list[dict], seq_len: int, pad_id: int, seed: int = 0, shuffle: bool = True):
        self.ids = [np.asarray(r["input_ids"][:seq_len], dtype=np.int64) for r in records]
        self.labels = np.asarray([int(r["label"]) for r in records], dtype=np.int64)
        self.pad_id, self.seed, self.shuffle = pad_id, seed, shuffle
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        return len(self.ids)

    def _index(self, k: int) -> int:
        epoch, i = divmod(k, len(self.ids))
        if not self.shuffle:
            return i
        if epoch != self._order_epoch:
            self._order, self._order_epoch = seeded_order(len(self.ids), self.seed, epoch), epoch
        return int(self._order[i])

    def _collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.ids[i]) for i in idx)
        ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
        att = np.zeros((len(idx), width), dtype=np.int64)
        for b, i in enumerate(idx):
            ids[b, :len(self.ids[i])] = self.ids[i]
            att[b, :len(self.ids[i])] = 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(att),
                "labels": torch.from_numpy(self.labels[idx])}

    def batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        return self._collate([self._index(k) for k in range(start, start + size)])

    def eval_batches(self, size: int, max_batches: int | None = None):
        n = (len(self.ids) + size - 1) // size
        for b in range(n if max_batches is None else min(n, max_batches)):
            yield self._collate(list(range(b * size, min(len(self.ids), (b + 1) * size))))


def classification_loss(model, batch: dict[str, torch.Tensor]):
    from homeforge.train.task import StepLoss

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"]
    loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
    acc = float((logits.detach().argmax(-1) == labels).float().mean())
    return StepLoss(loss_sum, int(labels.numel()), {"accuracy": acc})


def build_classifier(cfg, ds, labels: list[str]):
    """(model, model_dir or None) with a freshly initialised head of ``len(labels)`` classes."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from homeforge.models.io import check_model_dir, load_tokenizer
    from homeforge.models.presets import preset_config

    hf_logging.disable_progress_bar()
    id2label = dict(enumerate(labels))
    label2id = {n: i for i, n in id2label.items()}
    pad = ds.tokenizer.pad_token_id if ds.tokenizer.pad_token_id is not None else ds.tokenizer.eos_token_id
    from homeforge.runtime import seeded

    if cfg.model.path:
        model_dir = check_model_dir(cfg.model.path)
        with seeded(cfg.seed):  # the new head's initialisation
            model = _load_base_classifier(model_dir, id2label, label2id)
        model_tok = load_tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() or \
            (model_dir / "tokenizer_config.json").is_file() else None
        check_tokenizers_match(ds, model_tok, model_dir, model.get_input_embeddings().num_embeddings)
    else:
        if not cfg.model.preset:
            raise HomeforgeError("no model given", fix="set model.path (a local HF directory) or model.preset")
        config = preset_config(cfg.model.preset, ds.vocab_size, bos_token_id=ds.tokenizer.bos_token_id,
                               eos_token_id=ds.tokenizer.eos_token_id, pad_token_id=pad,
                               overrides=cfg.model.overrides)
        config.num_labels, config.id2label, config.label2id = len(labels), id2label, label2id
        with seeded(cfg.seed):
            model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        model_dir = None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad  # decoders pick the last non-pad token
    if cfg.classify.freeze_base:
        head = {id(p) for n, p in model.named_parameters() if n.split(".")[0] in ("score", "classifier")}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    return model.train(), model_dir


def save_classifier(model, out_dir: Path, tokenizer) -> None:
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def build_task(cfg, data_dir):
    from homeforge.train.task import TrainTask

    ds = open_dataset(data_dir, "classify")
    labels = read_labels(ds)
    model, model_dir = build_classifier(cfg, ds, labels)
    n_emb = model.get_input_embeddings().num_embeddings
    pad = model.config.pad_token_id
    sources = []
    for split, shuffle in (("train", True), ("val", False)):
        if split == "val" and not ds.has_split("val"):
            sources.append(None)
            continue
        records = read_token_records(ds, split, ("input_ids", "label"))
        bad = [i for i, r in enumerate(records, 1) if not 0 <= int(r["label"]) < len(labels)]
        if bad:
            raise HomeforgeError(f"{len(bad)} records have a label outside 0..{len(labels) - 1} (first at line "
                                 f"{bad[0]})", where=str(ds.root / f"{split}.tokens.jsonl"),
                                 fix="labels are indices into labels.json; re-run `homeforge prepare`")
        records = [r for r in records if r["input_ids"]]
        max_id = max((max(r["input_ids"]) for r in records), default=0)
        check_token_range(ds, max_id, n_emb, str(ds.root / f"{split}.tokens.jsonl"))
        if not records:
            if split == "train":
                raise HomeforgeError("the train split has no records", where=str(ds.root), fix="add data")
            sources.append(None)
            continue
        sources.append(LabelledSource(records, cfg.seq_len, pad, seed=cfg.seed, shuffle=shuffle))
    from homeforge.train.flops import flops_per_token

    return TrainTask(
        model=model, train=sources[0], val=sources[1], loss_fn=classification_loss,
        save_final=save_classifier, tokenizer=ds.tokenizer,
        flops_per_token=flops_per_token(model, cfg.seq_len, frozen_backward=not cfg.classify.freeze_base),
        info={"method": "classify", "kind": "sequence-classification", "architecture": type(model).__name__,
              "loss_unit": "samples",
              "base": str(model_dir) if model_dir else None, "labels": labels,
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)},
    )


def _load_base_classifier(model_dir: Path, id2label: dict, label2id: dict):
    """A classifier on a local checkpoint: its body's weights, a new head (``models.io.load_model``)."""
    from homeforge.models.io import load_model

    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id}
    model, _ = load_model(model_dir, head="classifier", config_updates=labels, new_head=True, with_tokenizer=False)
    return model
