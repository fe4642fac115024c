"""Contract between the engine (``homeforge.train.loop.train_task``) and a training method
(``homeforge.train.methods``: pretrain, sft, lora, classify). It is kept stable.

A method turns a resolved ``TrainConfig`` into a ``TrainTask``; the engine calls
``homeforge.train.methods.build_task(cfg: TrainConfig, data_dir: Path) -> TrainTask``
(dispatching on ``cfg.method``) on every rank, then ``train_task(task, cfg, run_dir)``.
Method-specific settings live in their own sections of ``TrainConfig`` (owned by the
methods work); engine settings (checkpoint, tracking, distributed, ...) in theirs.

``TrainTask.model``
    an ``nn.Module`` on the CPU in fp32, ready to train (LoRA already applied, head
    attached). Trainable = ``requires_grad``; the engine builds AdamW over exactly those
    parameters, moves the model to the device, applies activation checkpointing and
    wraps it for DDP / FSDP2. Checkpoints hold the *trainable* parameters only (so a
    LoRA checkpoint is the adapter plus optimizer state; a frozen base is rebuilt by the
    method from its path on resume). Build the model deterministically from
    ``cfg.seed`` so that a resumed run rebuilds the same frozen parts.

``TrainTask.train`` / ``TrainTask.val`` (a ``BatchSource``)
    ``len(src)`` = samples per epoch; ``src.batch(start, size) -> dict[str, Tensor]``
    returns samples ``start .. start+size-1`` of the *run* (``start`` may exceed
    ``len``: the source wraps into the next epoch with its own seeded order). It must
    be a pure function of (seed, start, size): exact resume stores only the sample
    index. Under DDP/FSDP every rank asks for its own disjoint slice of the global
    batch. ``src.eval_batches(size, max_batches) -> Iterator[dict]`` is an unshuffled
    pass for validation. Tensors are on the CPU; the engine moves them.

``TrainTask.loss_fn(model, batch) -> StepLoss``
    ``StepLoss(loss_sum, n_tokens, metrics)``: the *summed* (not mean) loss over the
    loss-bearing tokens (or samples, for classification) of the micro-batch, their
    count, and optional float metrics (e.g. ``{"moe_aux_loss": ..., "router_balance":
    ...}``) that are averaged over the micro-batches of a step and logged; at each
    evaluation they are also computed over the validation batches, weighted by ``n_tokens``,
    and logged as ``val_NAME`` (a classifier's ``val_accuracy``). The engine
    backpropagates ``loss_sum`` and divides the gradients by the global count of the
    step (all micro-batches, all ranks), so variable-length SFT batches are weighted
    per token, exactly as one big batch would be. An auxiliary loss (MoE balance) is
    added into ``loss_sum`` by the method, scaled by ``n_tokens``.

``TrainTask.save_final(model, out_dir, tokenizer)``
    writes the final output into ``out_dir`` (a temp dir made atomic by the engine):
    an HF model directory for pretrain/sft/classify; for LoRA the adapter in
    ``out_dir/adapter`` plus, when ``lora.merge`` is set, the merged HF model in
    ``out_dir`` itself. ``model`` is the unwrapped module on the CPU. ``None``: no model
    artifact is written; the caller keeps ``task.model`` (compress's QAT and distillation).

``TrainTask.flops_per_token``
    training FLOPs per token (forward + backward) for MFU; ``None`` = the engine
    estimates it from the model (``train.flops.flops_per_token``).

``TrainTask.metrics_fn(model) -> dict[str, float]`` (optional)
    extra metrics computed at log steps (outside the loss), merged into the log.

``TrainTask.final_eval(model) -> dict`` (optional)
    run once on the final model (CPU, eval mode, no grad) before it is saved; the result
    goes into the model manifest's metrics (e.g. the quickstart's full validation
    perplexity against a unigram baseline).

Privacy seam: ``homeforge.train.privacy.make_private(task, model, optimizer, cfg)``
(owned by the security work) is called by ``setup_privacy`` in ``train.loop`` after the
optimizer is built and before the first step, when ``cfg.privacy.enabled`` is set; it
returns ``(model, optimizer)`` (e.g. Opacus' GradSampleModule and DPOptimizer). With
privacy on, the optimizer owns per-sample clipping and noise: the engine then skips its
own global-norm clipping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F


class StepLoss(NamedTuple):
    """What a method's ``loss_fn`` returns for one micro-batch (see the module docstring)."""

    loss_sum: torch.Tensor  # summed loss over the loss-bearing tokens of the micro-batch
    n_tokens: int  # how many tokens (or samples) the sum is over
    metrics: dict[str, float] = {}  # optional extra metrics, averaged over micro-batches


@runtime_checkable
class BatchSource(Protocol):
    def __len__(self) -> int: ...

    def batch(self, start: int, size: int) -> dict[str, torch.Tensor]: ...

    def eval_batches(self, size: int, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]: ...


@dataclass
class TrainTask:
    """Everything a method hands the engine (see the module docstring)."""

    model: torch.nn.Module
    train: BatchSource
    val: BatchSource | None
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], StepLoss]
    save_final: Callable[[torch.nn.Module, Path, Any], None] | None  # None: no model artifact, the caller keeps it
    tokenizer: Any = None
    flops_per_token: float | None = None
    metrics_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None
    final_eval: Callable[[torch.nn.Module], dict] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # e.g. architecture, params; goes into the manifest


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> StepLoss:
    """Summed next-token loss; ``labels`` are aligned with ``input_ids`` (already shifted), -100 = ignored."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return StepLoss(loss, int((labels != -100).sum()))
