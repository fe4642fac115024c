"""The pace of a run: the wall-clock budget (``max_minutes``), when to stop, and the speed
(tokens/s, MFU) measured over training time only."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from homeforge.config import TrainConfig
from homeforge.train.distributed import DistInfo
from homeforge.train.flops import flops_per_token, peak_flops, refresh_peak_flops

if TYPE_CHECKING:
    from homeforge.train.loop import RunState
    from homeforge.train.task import TrainTask


class Budget:
    """The wall-clock budget (``max_minutes``): time used so far, and the steps that still fit."""

    def __init__(self, max_minutes: float | None, already_s: float = 0.0):
        self.limit = max_minutes * 60 if max_minutes else None
        self.before = already_s  # used by earlier sessions of a resumed run
        self.t0 = time.monotonic()
        self.steps = 0  # steps taken in this session

    def elapsed(self) -> float:
        self.steps += 1
        return self.before + time.monotonic() - self.t0

    def steps_left(self, info: DistInfo) -> int | None:
        """Steps that fit in the time left at this session's pace (evaluation and checkpoints included)."""
        if self.limit is None or self.steps == 0:
            return None
        used, pace = self.before + time.monotonic() - self.t0, (time.monotonic() - self.t0) / self.steps
        if info.enabled:  # every rank must agree on when to stop
            used, pace = (x / info.world for x in info.all_sum([used, pace]))
        return int(max(0.0, self.limit - used) // pace)


def fit_to_budget(cfg: TrainConfig, state: RunState, clock: Budget, info: DistInfo) -> int:
    """The step count, re-fitted to the time left under ``max_minutes`` (so the learning-rate schedule
    ends when the time does): before every step of a single-process run; in a distributed run at the
    first 3 steps of a session and then at every log step, since the ranks must agree through a
    collective. The run stops before a step that would not finish within the budget at the pace so
    far: a wall-clock cap, give or take how much one step differs from the average."""
    refit = clock.steps <= 3 or state.step % cfg.log_every == 0 or not info.enabled
    if clock.limit is None or not refit:
        return state.total_steps
    left = clock.steps_left(info)
    return state.total_steps if left is None else min(cfg.max_steps, state.step + left)


def stop_decision(cfg: TrainConfig, state: RunState) -> tuple[int, str]:
    """(total_steps, reason once training is to stop): early stopping, the time budget or max_steps."""
    if cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
        return state.step, f"early stopping: no validation improvement in {state.bad_evals} evaluations"
    if state.step >= state.total_steps:
        return state.step, "time budget" if state.total_steps < cfg.max_steps else "max_steps"
    return state.total_steps, ""


class Speedometer:
    """Tokens/s and MFU over the training time only (evaluation and checkpoint I/O excluded)."""

    def __init__(self, task: TrainTask, model, cfg: TrainConfig, info: DistInfo, precision: str):
        self.fpt = task.flops_per_token or flops_per_token(model, cfg.seq_len)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.peak = peak_flops(info.device, self.dtype, cfg.peak_tflops) * info.world
        self.reprobed = cfg.peak_tflops is not None  # a given peak is the user's: never re-measured
        self.unit = "samples_per_s" if task.info.get("loss_unit") == "samples" else "loss_tokens_per_s"
        self.info = info
        self.steps = 0  # steps timed in this process (a resumed run starts again at 0)
        self.train_seconds = 0.0
        self.t = time.perf_counter()

    def update(self, n_tokens: int, n_inputs: int) -> dict:
        """``n_inputs``: input tokens processed (padding excluded); ``n_tokens``: loss-bearing units
        (tokens, or samples for a classifier)."""
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        self.steps += 1
        self.train_seconds += dt
        mfu = n_inputs * self.fpt / dt / self.peak
        if mfu > 1.0 and not self.reprobed:  # the cached peak was measured on a busy machine: measure again
            self.reprobed = True
            self.peak = max(self.peak, refresh_peak_flops(self.info.device, self.dtype) * self.info.world)
            mfu = n_inputs * self.fpt / dt / self.peak
        return {"tokens_per_s": n_inputs / dt, self.unit: n_tokens / dt, "mfu": mfu if mfu <= 1.0 else None,
                "step_s": dt}

    def memory(self) -> dict:
        import resource

        out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.info.device.type == "cuda":
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.info.device) / 2**20
        return out

    def reset_clock(self) -> None:
        self.t = time.perf_counter()
