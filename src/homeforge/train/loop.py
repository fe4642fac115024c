"""The training loop: one readable screen; setup and I/O live in named helpers.

The contract a training method fulfils (``TrainTask``, ``BatchSource``, ``StepLoss``) is in
``homeforge.train.task``; ``train_task(task, cfg, run_dir)`` here runs it.
"""

from __future__ import annotations

import copy
import math
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from homeforge.artifacts import write_artifact
from homeforge.config import TrainConfig
from homeforge.errors import HomeforgeError
from homeforge.train.checkpoint import (
    check_resume_config,
    checkpoint_dir,
    load_checkpoint,
    load_weights,
    prune,
    read_config,
    read_manifest_of,
    read_meta,
    save_checkpoint,
)
from homeforge.train.distributed import DistInfo, grad_sync, init_distributed, unwrap, wrap_model
from homeforge.train.optim import build_optimizer, lr_factor
from homeforge.train.pace import Budget, Speedometer, fit_to_budget, stop_decision
from homeforge.train.plots import plot_history
from homeforge.train.precision import autocast, resolve_precision
from homeforge.train.task import TrainTask
from homeforge.train.tracking import Tracker


class TrainingDiverged(HomeforgeError):
    """Loss became NaN/inf."""


class TrainingInterrupted(HomeforgeError):
    """Stopped on SIGINT/SIGTERM after checkpointing the step just finished."""

    exit_code = 130


class StopSignal:
    """SIGINT/SIGTERM while training: finish the current step, checkpoint it, stop. A second signal aborts."""

    def __init__(self):
        self.flag = False
        self.old: dict = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.flag:
            self.__exit__()
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        self.old = {}

    def requested(self, info: DistInfo) -> bool:
        """True on every rank once any rank was signalled (one tiny collective when distributed)."""
        return info.all_sum([float(self.flag)])[0] > 0 if info.enabled else self.flag


@dataclass
class RunState:
    step: int = 0  # optimizer steps taken
    samples: int = 0  # training samples consumed (the data position)
    total_steps: int = 0  # steps the schedule spans
    best_val: float = math.inf
    history: list[dict] = field(default_factory=list)
    bad_evals: int = 0  # evaluations since the last validation-loss improvement (early stopping)
    stop_reason: str = ""  # max_steps | time budget | early stopping
    elapsed_s: float = 0.0  # wall-clock seconds of training so far (all sessions of a resumed run)
    final_weights: str = "last"  # "best" when early stopping restored the best checkpoint
    resumed: list[dict] = field(default_factory=list)  # checkpoints this run continued from (lineage)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


# =========================================================================== the engine


def train_task(task: TrainTask, cfg: TrainConfig, run_dir: str | Path, *, resume: Path | None = None,
               info: DistInfo | None = None, progress: Callable[[RunState, dict], None] | None = None) -> RunState:
    """Train ``task`` as configured; checkpoints, metrics and plots go to ``run_dir``.

    Runs the same in one process and under torchrun (DDP / FSDP2). ``resume`` is a
    checkpoint directory (see ``checkpoint.resolve_resume``). Returns the final state;
    the trained model is ``task.model`` (see ``save_final_model``). The caller's torch
    threads and random states are as they were afterwards.
    """
    from homeforge.runtime import preserved_random_state, torch_threads

    with torch_threads(cfg.threads), preserved_random_state():
        return _train(task, cfg, Path(run_dir), resume, info, progress)


def _train(task: TrainTask, cfg: TrainConfig, run_dir: Path, resume: Path | None, info: DistInfo | None,
           progress: Callable[[RunState, dict], None] | None) -> RunState:
    info = info or init_distributed(cfg.distributed.backend)
    config = cfg.model_dump(mode="json")
    precision = resolve_precision(cfg.precision, info.device)
    skeleton = copy.deepcopy(task.model) if info.enabled and cfg.distributed.strategy == "fsdp" and info.is_main else None
    model, opt, sched, scaler, state = setup_training(task, cfg, info, precision)
    model, opt, private = setup_privacy(task, model, opt, cfg)
    if resume is not None:
        restore(resume, model, opt, sched, scaler, state, config, info)
    tracker = Tracker(run_dir, cfg.tracking, config, resume_step=state.step if resume else None) if info.is_main else None
    speed = Speedometer(task, unwrap(model), cfg, info, precision)
    clock = Budget(cfg.max_minutes, state.elapsed_s)
    last_ckpt = resume
    stop = StopSignal().__enter__()
    try:
        while state.step < state.total_steps:
            loss, n_tokens, n_inputs, extra = forward_backward(model, task, cfg, state, info, precision, scaler)
            if not math.isfinite(loss):
                raise diverged(loss, state, last_ckpt)
            gnorm = optimizer_step(model, opt, sched, scaler, cfg, info, n_tokens, private)
            if not math.isfinite(gnorm) and not scaler.is_enabled():
                raise diverged(f"{loss / max(1, n_tokens):.4f} with a gradient norm of {gnorm}", state, last_ckpt)
            state.step += 1
            state.samples += cfg.micro_batch_size * cfg.grad_accum * info.world
            record = {"step": state.step, "loss": loss / max(1, n_tokens), "lr": sched.get_last_lr()[0], "grad_norm": gnorm,
                      **extra, **speed.update(n_tokens, n_inputs)}
            if task.metrics_fn is not None:
                record.update(task.metrics_fn(unwrap(model)))
            state.elapsed_s = clock.elapsed()
            state.total_steps = fit_to_budget(cfg, state, clock, info)
            improved = False
            if task.val is not None and (state.step % cfg.eval_every == 0 or state.step == state.total_steps):
                record["val_loss"], val_metrics = evaluate(model, task, cfg, state, info, precision)
                record.update(val_metrics)
                improved = record["val_loss"] < state.best_val - cfg.early_stopping_min_delta
                state.best_val, state.bad_evals = (record["val_loss"], 0) if improved else (state.best_val, state.bad_evals + 1)
            state.total_steps, state.stop_reason = stop_decision(cfg, state)
            if state.step % cfg.log_every == 0 or "val_loss" in record or state.step == state.total_steps:
                record.update(speed.memory())
                state.history.append(record)
                if tracker is not None:
                    tracker.log(record)
            if progress is not None and info.is_main:  # every step: the bar moves from step 1
                progress(state, record)
            if improved and cfg.checkpoint.best:
                save(run_dir, "best", model, opt, sched, scaler, state, config, info)
            if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or state.step >= state.total_steps:
                last_ckpt = save(run_dir, f"step-{state.step:08d}", model, opt, sched, scaler, state, config, info)
            if stop.requested(info) and state.step < state.total_steps:
                if last_ckpt is None or last_ckpt.name != f"step-{state.step:08d}":
                    last_ckpt = save(run_dir, f"step-{state.step:08d}", model, opt, sched, scaler, state, config, info)
                raise TrainingInterrupted(f"training stopped on request after step {state.step}; checkpoint {last_ckpt}",
                                          fix="continue exactly where it stopped with `homeforge train --resume latest` "
                                              "(same config and --output)")
            speed.reset_clock()  # evaluation, logging and checkpoint I/O do not count as training time
        if state.stop_reason.startswith("early stopping") and (checkpoint_dir(run_dir) / "best").is_dir():
            load_weights(checkpoint_dir(run_dir) / "best", model)  # the final model is the best one
            state.final_weights = "best"
        if task.save_final is not None:
            save_final_model(task, model, cfg, run_dir, state, info, skeleton)
        elif info.is_main:  # the caller keeps the trained model in memory
            plot_history(state.history, run_dir / "loss.png")
    except BaseException as exc:
        if tracker is not None:
            tracker.close(status="KILLED" if isinstance(exc, (TrainingInterrupted, KeyboardInterrupt)) else "FAILED")
        raise
    finally:
        stop.__exit__()
    if tracker is not None:
        tracker.close()
    return state


# --------------------------------------------------------------------------- engine helpers


def setup_training(task: TrainTask, cfg: TrainConfig, info: DistInfo, precision: str):
    """Seeds, device, activation checkpointing, DDP/FSDP wrap, optimizer, schedule, scaler."""
    seed_everything(cfg.seed + info.rank)
    model = task.model.to(info.device)
    model.train()
    if cfg.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise HomeforgeError(f"activation checkpointing needs a transformers model, got {type(model).__name__}",
                                 fix="set activation_checkpointing=false")
    if len(task.train) == 0:
        raise HomeforgeError("the training data holds no complete sample", fix="add data or lower seq_len")
    if not any(p.requires_grad for p in model.parameters()):
        raise HomeforgeError("the model has no trainable parameters", fix="check the method's settings (e.g. lora targets)")
    model = wrap_model(model, info, cfg.distributed.strategy)
    opt = build_optimizer(model, cfg.optim)
    state = RunState(total_steps=cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, state.total_steps, cfg.schedule))
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")
    return model, opt, sched, scaler, state


def setup_privacy(task: TrainTask, model, opt, cfg: TrainConfig):
    """The differential-privacy seam: ``train.privacy.make_private`` wraps model and optimizer (Opacus)."""
    privacy = getattr(cfg, "privacy", None)
    if privacy is None or not getattr(privacy, "enabled", False):
        return model, opt, False
    from homeforge.train.privacy import make_private

    model, opt = make_private(task, model, opt, cfg)
    return model, opt, True


def save_final_model(task: TrainTask, model, cfg: TrainConfig, run_dir: Path, state: RunState, info: DistInfo,
                     skeleton: torch.nn.Module | None = None) -> Path:
    """Write ``RUN/model`` (an artifact: the method's HF / adapter output + manifest) and ``RUN/loss.png``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out = run_dir / "model"
    full = None
    if skeleton is not None or info.enabled:  # gather the full weights from every rank first
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        final = unwrap(model).to("cpu")
        if skeleton is not None:  # FSDP2 parameters are shards: put the gathered weights into a plain copy
            params = dict(skeleton.named_parameters())
            for name, value in full.items():
                if name in params:
                    params[name].data = value
            final = skeleton
        final.eval()
        extra_metrics = {}
        if task.final_eval is not None:
            with torch.no_grad():
                extra_metrics = task.final_eval(final)
        plot_history(state.history, run_dir / "loss.png")
        config = cfg.model_dump(mode="json")
        inputs = {"dataset": cfg.data} if cfg.data else {}
        # the run directory is this run's own: its model/ is replaced (a foreign folder is moved aside)
        with write_artifact(out, stage="train", config=config, inputs=inputs, force=True, encrypt=cfg.encrypt) as art:
            task.save_final(final, art.dir, task.tokenizer)
            shutil.copy2(run_dir / "loss.png", art.dir / "loss.png")
            art.metrics = {**final_metrics(state), **extra_metrics}
            art.extra.update(kind=task.info.get("kind", "causal-lm"), method=cfg.method, task=task.info)
            if state.resumed:  # the config recorded is the one used: resume refuses any other (checkpoint.py)
                art.extra["resumed_from"] = state.resumed
        final.to(info.device)
    info.barrier()
    return out


def final_metrics(state: RunState) -> dict:
    def median(key):
        values = sorted(r[key] for r in state.history if r.get(key) is not None)
        return values[len(values) // 2] if values else None

    last = state.history[-1] if state.history else {}
    vals = [r for r in state.history if "val_loss" in r]
    val_metrics = {k: v for k, v in vals[-1].items() if k.startswith("val_") and k != "val_loss"} if vals else {}
    return {**val_metrics, "steps": state.step, "samples": state.samples, "final_loss": last.get("loss"),
            "val_loss": vals[-1]["val_loss"] if vals else None, "best_val_loss": state.best_val if vals else None,
            "tokens_per_s": median("tokens_per_s"), "mfu": median("mfu"), "stop_reason": state.stop_reason,
            "final_weights": state.final_weights}


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def forward_backward(model, task: TrainTask, cfg: TrainConfig, state: RunState, info: DistInfo, precision: str,
                     scaler) -> tuple[float, int, int, dict]:
    """All micro-batches of one step on this rank; returns global (loss_sum, n_tokens, n_inputs, metrics)."""
    loss_sum, n_tokens, n_inputs, metrics = 0.0, 0, 0, {}
    for m in range(cfg.grad_accum):
        start = state.samples + (m * info.world + info.rank) * cfg.micro_batch_size
        batch = {k: v.to(info.device, non_blocking=True) for k, v in task.train.batch(start, cfg.micro_batch_size).items()}
        try:
            with grad_sync(model, m == cfg.grad_accum - 1), autocast(precision, info.device):
                out = task.loss_fn(model, batch)
            scaler.scale(out.loss_sum).backward()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            raise out_of_memory(exc, cfg) from None
        loss_sum += out.loss_sum.item()
        n_tokens += out.n_tokens
        mask = batch.get("attention_mask")
        if mask is not None:
            n_inputs += int(mask.sum())
        else:  # images: one input per sample
            n_inputs += batch["input_ids"].numel() if "input_ids" in batch else out.n_tokens
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + float(v) / cfg.grad_accum
    names = sorted(metrics)
    totals = info.all_sum([loss_sum, n_tokens, n_inputs, *(metrics[k] for k in names)])
    extra = {k: v / info.world for k, v in zip(names, totals[3:], strict=True)}
    return totals[0], int(totals[1]), int(totals[2]), extra


def optimizer_step(model, opt, sched, scaler, cfg: TrainConfig, info: DistInfo, n_tokens: int, private: bool) -> float:
    """Normalise gradients by the step's global token count, clip, step, schedule; returns the grad norm."""
    scaler.unscale_(opt)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # DDP/FSDP averaged the summed-loss gradients over ranks; we want their sum over ranks / tokens
    scale = 1.0 if private else info.world / max(1, n_tokens)
    norm = torch.nn.utils.get_total_norm(grads)
    gnorm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm) * scale  # FSDP2: a DTensor
    if not math.isfinite(gnorm) and not scaler.is_enabled():  # (fp16's scaler skips such steps itself)
        opt.zero_grad(set_to_none=True)
        return gnorm
    if not private:  # the DP optimizer owns clipping; else normalise and clip in one pass
        clip = cfg.optim.grad_clip
        torch._foreach_mul_(grads, scale * (min(1.0, clip / (gnorm + 1e-6)) if clip else 1.0))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return gnorm


@torch.no_grad()
def evaluate(model, task: TrainTask, cfg: TrainConfig, state: RunState, info: DistInfo,
             precision: str) -> tuple[float, dict[str, float]]:
    """Mean validation loss over ``cfg.eval_batches`` unshuffled batches (every rank sees the same ones),
    and the method's own metrics over the same batches (a classifier's accuracy) as ``val_NAME``,
    each batch weighted by its size."""
    model.eval()
    total, count, sums = 0.0, 0, {}
    for batch in task.val.eval_batches(cfg.micro_batch_size, cfg.eval_batches):
        with autocast(precision, info.device):
            out = task.loss_fn(model, {k: v.to(info.device) for k, v in batch.items()})
        total += out.loss_sum.item()
        count += out.n_tokens
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * out.n_tokens
    model.train()
    return total / max(1, count), {f"val_{k}": v / max(1, count) for k, v in sums.items()}


def save(run_dir: Path, name: str, model, opt, sched, scaler, state: RunState, config: dict, info: DistInfo) -> Path:
    trainer = {"scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "state": state.to_dict()}
    meta = {"step": state.step, "samples": state.samples, "best_val": state.best_val,
            "loss": state.history[-1]["loss"] if state.history else None}
    if config.get("data") and Path(config["data"]).exists():  # which dataset: a resume can check it is the same
        from homeforge.artifacts import hash_input

        meta["dataset"] = hash_input(config["data"])
    path = save_checkpoint(run_dir, name, model=model, optimizer=opt, trainer=trainer, config=config, meta=meta,
                           rank=info.rank, world=info.world, barrier=info.barrier)
    if name != "best" and info.is_main:
        prune(run_dir, config["checkpoint"]["keep"])
    return path or checkpoint_dir(run_dir) / name


def restore(path: Path, model, opt, sched, scaler, state: RunState, config: dict, info: DistInfo) -> None:
    """Model, optimizer, scheduler, scaler, RNG and data position from checkpoint ``path``."""
    check_resume_config(path, read_config(path), config, defaults=TrainConfig().model_dump(mode="json"))
    meta = read_meta(path)
    if meta.get("world_size", 1) != info.world:
        raise HomeforgeError(f"cannot resume: the checkpoint was written by {meta.get('world_size')} processes, "
                             f"this run has {info.world}", where=str(path),
                             fix=f"resume with --nproc {meta.get('world_size')}")
    trainer = load_checkpoint(path, model=model, optimizer=opt, rank=info.rank)
    sched.load_state_dict(trainer["scheduler"])
    scaler.load_state_dict(trainer["scaler"])
    for k, v in trainer["state"].items():
        setattr(state, k, v)
    state.stop_reason = ""
    manifest = read_manifest_of(path)
    state.resumed = [*state.resumed, {"checkpoint": str(path), "step": state.step,
                                      "content_hash": (manifest or {}).get("content_hash")}]


def diverged(loss: float | str, state: RunState, last_ckpt: Path | None) -> TrainingDiverged:
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    return TrainingDiverged(f"training diverged: the loss became {loss} at step {state.step + 1}; stopped before "
                            f"the optimizer step, {where} (untouched)",
                            fix="lower optim.lr, raise schedule.warmup_steps, lower optim.grad_clip or use precision=fp32; "
                                "then `homeforge train --resume latest` with the same config, or start again")


def out_of_memory(exc: BaseException, cfg: TrainConfig) -> BaseException:
    text = str(exc).lower()
    if not isinstance(exc, torch.OutOfMemoryError) and "alloc" not in text and "out of memory" not in text:
        return exc
    return HomeforgeError(
        f"one micro-batch does not fit in memory (micro_batch_size={cfg.micro_batch_size}, seq_len={cfg.seq_len})",
        fix=f"lower micro_batch_size (e.g. micro_batch_size={max(1, cfg.micro_batch_size // 2)} "
            f"grad_accum={cfg.grad_accum * 2} keeps the same global batch), set activation_checkpointing=true, "
            "or lower seq_len")
