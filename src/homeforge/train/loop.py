"""The training loop: one readable screen; setup and I/O live in named helpers."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

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
