"""The training loop: one readable screen; setup and I/O live in named helpers.

Contract between the engine (this module, ``train_task``) and a training method
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
    ...}``) that are averaged over the micro-batches of a step and logged. The engine
    backpropagates ``loss_sum`` and divides the gradients by the global count of the
    step (all micro-batches, all ranks), so variable-length SFT batches are weighted
    per token, exactly as one big batch would be. An auxiliary loss (MoE balance) is
    added into ``loss_sum`` by the method, scaled by ``n_tokens``.

``TrainTask.save_final(model, out_dir, tokenizer)``
    writes the final output into ``out_dir`` (a temp dir made atomic by the engine):
    an HF model directory for pretrain/sft/classify; for LoRA the adapter in
    ``out_dir/adapter`` plus, when ``lora.merge`` is set, the merged HF model in
    ``out_dir`` itself. ``model`` is the unwrapped module on the CPU.

``TrainTask.flops_per_token``
    training FLOPs per token (forward + backward) for MFU; ``None`` = the engine
    estimates it from the model (``train.flops.flops_per_token``).

``TrainTask.metrics_fn(model) -> dict[str, float]`` (optional)
    extra metrics computed at log steps (outside the loss), merged into the log.

Privacy seam: ``homeforge.train.privacy.make_private(task, model, optimizer, cfg)``
(owned by the security work) is called by ``setup_privacy`` in this module after the
optimizer is built and before the first step, when ``cfg.privacy.enabled`` is set; it
returns ``(model, optimizer)`` (e.g. Opacus' GradSampleModule and DPOptimizer). With
privacy on, the optimizer owns per-sample clipping and noise: the engine then skips its
own global-norm clipping.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from homeforge.config import TrainConfig
from homeforge.errors import HomeforgeError
from homeforge.evaluate.perplexity import mean_loss
from homeforge.train.data import PackedWindows
from homeforge.train.optim import build_optimizer, lr_factor
from homeforge.train.precision import autocast, pick_device, resolve_precision


class TrainingDiverged(HomeforgeError):
    """Loss became NaN/inf."""


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
    save_final: Callable[[torch.nn.Module, Path, Any], None]
    tokenizer: Any = None
    flops_per_token: float | None = None
    metrics_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # e.g. architecture, params; goes into the manifest


@dataclass
class RunState:
    step: int = 0  # optimizer steps taken
    samples: int = 0  # training samples consumed (the data position)
    total_steps: int = 0  # steps the schedule spans
    best_val: float = math.inf
    history: list[dict] = field(default_factory=list)


class MetricsLog:
    """Append-only metrics JSONL (one object per logged step)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def lm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def train_lm(model, cfg: TrainConfig, train_data: PackedWindows, val_data: PackedWindows | None,
             run_dir: Path, progress=None) -> RunState:
    """Pretrain ``model`` on packed windows. ``progress(state, record)`` is called on every log."""
    device = pick_device()
    precision = resolve_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    opt = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    state = RunState(total_steps=cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, state.total_steps, cfg.schedule))
    log = MetricsLog(run_dir / "metrics.jsonl")
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * cfg.seq_len
    t_start = t_log = time.perf_counter()
    try:
        while state.step < state.total_steps:
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                x, y = train_data.batch(state.samples, cfg.micro_batch_size)
                state.samples += cfg.micro_batch_size
                with autocast(precision, device):
                    loss = lm_loss(model, x.to(device), y.to(device)) / cfg.grad_accum
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"loss became {loss.item()} at step {state.step}",
                                           fix="lower optim.lr, raise schedule.warmup_steps, or use precision=fp32")
                scaler.scale(loss).backward()
                loss_sum += loss.item()
            scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            state.step += 1
            elapsed = time.perf_counter() - t_start
            if state.step == 5 and budget < math.inf:  # fit the schedule to the time budget
                state.total_steps = max(6, min(cfg.max_steps, int(budget / (elapsed / 5))))
            record = None
            if state.step % cfg.log_every == 0 or state.step == state.total_steps:
                now = time.perf_counter()
                steps_since = cfg.log_every if state.step % cfg.log_every == 0 else state.step % cfg.log_every
                record = {"step": state.step, "loss": loss_sum, "lr": sched.get_last_lr()[0],
                          "grad_norm": float(gnorm), "tokens_per_s": steps_since * tokens_per_step / (now - t_log),
                          "elapsed_s": round(elapsed, 2)}
                t_log = now
            if val_data is not None and (state.step % cfg.eval_every == 0 or state.step == state.total_steps):
                val_loss, _ = mean_loss(model, val_data, cfg.micro_batch_size, cfg.eval_batches)
                state.best_val = min(state.best_val, val_loss)
                record = {**(record or {"step": state.step}), "val_loss": val_loss}
            if record is not None:
                state.history.append(record)
                log.write(record)
                if progress is not None:
                    progress(state, record)
            if elapsed >= budget:
                break
    finally:
        log.close()
    return state
