"""A tiny pretraining task for engine tests (also run as a torchrun worker by test_distributed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from homeforge.config import TrainConfig, load_config

VOCAB = 96


def tokens(n: int = 20_000, seed: int = 0) -> np.ndarray:
    """A learnable stream: a noisy repeating pattern over the vocabulary."""
    rng = np.random.default_rng(seed)
    base = np.arange(n) * 7 % VOCAB
    noise = rng.integers(0, VOCAB, n)
    return np.where(rng.random(n) < 0.2, noise, base).astype(np.uint16)


def make_cfg(tmp: Path, *overrides: str) -> TrainConfig:
    base = ["model.preset=debug", "seq_len=32", "micro_batch_size=4", "max_steps=12", "optim.lr=3e-3",
            "schedule.warmup_steps=2", "eval_every=4", "eval_batches=2", "log_every=1", "checkpoint.every=4",
            "threads=1", "tracking.tensorboard=false", "peak_tflops=0.05", f"output_dir={tmp}"]
    return load_config(TrainConfig, None, [*base, *overrides])


def make_task(cfg: TrainConfig):
    from homeforge.models.presets import build_model, preset_config
    from homeforge.train.data import WindowSource
    from homeforge.train.task import TrainTask, causal_lm_loss

    model = build_model(preset_config("debug", VOCAB, eos_token_id=0), seed=cfg.seed)
    return TrainTask(model=model, train=WindowSource(tokens(), cfg.seq_len, seed=cfg.seed),
                     val=WindowSource(tokens(4000, seed=1), cfg.seq_len, shuffle=False), loss_fn=causal_lm_loss,
                     save_final=lambda m, out, tok: m.save_pretrained(out))


if __name__ == "__main__":  # torchrun worker: engine_task.py OUT [overrides...]
    import json
    import os

    import torch

    from homeforge.train.distributed import init_distributed, shutdown, unwrap
    from homeforge.train.loop import train_task

    cfg = make_cfg(Path(sys.argv[1]), *sys.argv[2:])
    info = init_distributed()
    task = make_task(cfg)
    resume = os.environ.get("ENGINE_RESUME")  # a checkpoint directory to resume from
    state = train_task(task, cfg, cfg.output_dir, info=info, resume=Path(resume) if resume else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(task.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        torch.save(sd, Path(cfg.output_dir) / "final_weights.pt")
        Path(cfg.output_dir, "losses.json").write_text(json.dumps([r["loss"] for r in state.history]))
    shutdown()
    _ = unwrap
