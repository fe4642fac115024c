"""method: image-classify — an EfficientNet-Lite image classifier, or an image+text fusion model.

The dataset is a ``prepare --kind image-classification`` artifact (uint8 shards, labels,
optional per-record text). The backbone starts from local ImageNet weights
(``vision.weights``) or from scratch; training images get RandAugment, RandomErasing and
optionally MixUp/CutMix (``homeforge.vision.augment``), drawn from a generator seeded by
the sample position so resume is exact. With ``vision.fusion`` set, each record's text goes
through a Hugging Face encoder (MiniLM by default) and is fused with the image (late or
cross-attention), or one encoder is used alone as the baseline. The loss is the summed
cross-entropy over the batch (soft targets under MixUp/CutMix); ``accuracy`` is logged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from homeforge.errors import HomeforgeError
from homeforge.vision import task as vt


def image_loss(model, batch: dict[str, torch.Tensor]):
    from homeforge.train.task import StepLoss

    if "input_ids" in batch:
        logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    else:
        logits = model(batch["pixel_values"])
    labels = batch["labels"]
    if "targets" in batch:
        loss_sum = -(batch["targets"] * F.log_softmax(logits.float(), -1)).sum()
    else:
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
    acc = float((logits.detach().argmax(-1) == labels).float().mean())
    return StepLoss(loss_sum, int(labels.numel()), {"accuracy": acc})


def build_task(cfg, data_dir):
    from homeforge.runtime import seeded
    from homeforge.train.task import TrainTask

    if data_dir is None:
        raise HomeforgeError("no dataset given", fix="set data=DATASET_DIR (made by `homeforge prepare --kind "
                                                     "image-classification`)")
    v = cfg.vision
    if cfg.privacy.enabled and not v.freeze_backbone:
        raise HomeforgeError("differential privacy (privacy.epsilon) cannot train the image backbone: its batch norm "
                             "mixes the samples of a batch, so per-sample gradients do not exist (Opacus refuses it)",
                             fix="set vision.freeze_backbone=true (DP-SGD then trains the head(s)), or drop "
                                 "privacy.epsilon")
    root, labels, splits = vt.open_image_dataset(data_dir)
    if "train" not in splits:
        raise HomeforgeError("the train split has no images", where=str(root), fix="add data")
    train = splits["train"]
    if v.image_size is None:
        v = v.model_copy(update={"image_size": int(train.images.shape[1])})
    if v.fusion != "none" and train.texts is None:
        raise HomeforgeError(f"vision.fusion={v.fusion} needs a text per record; {root} has none", where=str(root),
                             fix="prepare a CSV/JSONL listing with a text column (fields.text=...), or set "
                                 "vision.fusion=none")
    with seeded(cfg.seed):
        model, tok, meta = vt.build_model(v, len(labels))
    meta.update(labels=labels, image_size=v.image_size)
    model.eval()
    fps = vt.conv_flops_per_sample(model, v.image_size, v.fusion != "none")
    model.train()
    sources = [vt.ImageSource(splits[s], len(labels), v, cfg.seed, shuffle=(s == "train"), tokenizer=tok)
               if s in splits else None for s in ("train", "val")]

    def save(m, out_dir, _tok):
        vt.save_model(m, out_dir, meta, tok)

    return TrainTask(
        model=model, train=sources[0], val=sources[1], loss_fn=image_loss, save_final=save, tokenizer=None,
        flops_per_token=fps,
        info={"method": "image-classify", "kind": "image-classification", "architecture": type(model).__name__,
              "loss_unit": "samples", "backbone": v.backbone, "base": v.weights, "labels": labels,
              "fusion": v.fusion, "image_size": v.image_size,
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)},
    )
