"""Training methods: each turns a ``TrainConfig`` and a dataset into a ``TrainTask``.

One module per method, each with ``build_task(cfg, data_dir) -> TrainTask`` (see the
contract at the top of ``homeforge.train.loop``):

- ``pretrain``: a preset (dense Llama or MoE) or a local checkpoint on packed token shards;
- ``sft``: full fine-tune on chat data, loss on assistant tokens only, optional packing;
- ``lora``: PEFT LoRA adapters on a local causal LM, on chat (or text) data;
- ``classify``: a sequence-classification head on a local checkpoint or a preset;
- ``image-classify`` (module ``image``): an EfficientNet-Lite image classifier, or image+text fusion.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

_MODULES = {"image-classify": "image"}
METHODS = ("pretrain", "sft", "lora", "classify", "image-classify")


def build_task(cfg, data_dir: str | Path | None = None):
    """Dispatch on ``cfg.method``; ``data_dir`` defaults to ``cfg.data``."""
    from homeforge.errors import HomeforgeError

    if cfg.method not in METHODS:
        raise HomeforgeError(f"unknown training method {cfg.method!r}", fix=f"choose one of: {', '.join(METHODS)}")
    module = import_module(f"homeforge.train.methods.{_MODULES.get(cfg.method, cfg.method)}")
    return module.build_task(cfg, data_dir if data_dir is not None else cfg.data)
