"""Replay and EWC on a tiny pinned setup: the penalty's shape, the replay mix, and less forgetting than naive."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

VOCAB = 96


def stream(mult: int, add: int, n: int, seed: int) -> np.ndarray:
    """A learnable token stream (a pattern over the vocabulary with 10% noise): one 'domain' per (mult, add)."""
    rng = np.random.default_rng(seed)
    base = (np.arange(n) * mult + add) % VOCAB
    return np.where(rng.random(n) < 0.1, rng.integers(0, VOCAB, n), base).astype(np.uint16)


def model(seed: int = 0):
    from homeforge.models.presets import build_model, preset_config

    return build_model(preset_config("debug", VOCAB, eos_token_id=0), seed=seed)


def cfg(tmp, *extra):
    from homeforge.config import TrainConfig, load_config

    return load_config(TrainConfig, None, ["seq_len=32", "micro_batch_size=8", "optim.lr=3e-3", "optim.weight_decay=0",
                                           "schedule.warmup_steps=2", "eval_every=1000", "log_every=1000",
                                           "checkpoint.every=0", "checkpoint.best=false", "threads=1",
                                           "tracking.tensorboard=false", "peak_tflops=0.05", f"output_dir={tmp}",
                                           *extra])


def test_ewc_penalty_zero_at_anchor_and_quadratic():
    from homeforge.continual.ewc import EWC

    m = model()
    fisher = {n: torch.full_like(p, 2.0) for n, p in m.named_parameters()}
    e = EWC(m, fisher, lam=10.0)
    assert float(e.penalty().detach()) == 0.0
    p = dict(m.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    with torch.no_grad():
        p.add_(0.01)
    one = float(e.penalty().detach())
    assert one == pytest.approx(0.5 * 10 * 2 * 0.01 ** 2 * p.numel(), rel=1e-4)
    with torch.no_grad():
        p.add_(0.01)  # twice the distance: four times the penalty
    assert float(e.penalty().detach()) == pytest.approx(4 * one, rel=1e-4)
    e.penalty().backward()
    assert float((p.grad * 1).mean()) > 0  # the gradient points back towards the anchor


def test_fisher_estimate_store_and_lora_delta(tmp_path):
    from homeforge.continual.ewc import EWC, estimate_fisher, load_fisher, save_fisher
    from homeforge.models.lora import apply_lora
    from homeforge.train.data import WindowSource
    from homeforge.train.task import causal_lm_loss

    m = model()
    src = WindowSource(stream(7, 0, 4000, 0), 32, shuffle=False)
    f = estimate_fisher(m, src.eval_batches(4), causal_lm_loss, max_samples=8)
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in f.values()) and sum(v.sum() for v in f.values()) > 0
    assert m.training and all(p.requires_grad for p in m.parameters())  # left as it was
    save_fisher(f, tmp_path)
    back = load_fisher(tmp_path)
    assert back.keys() == f.keys() and all(torch.equal(back[k], f[k]) for k in f)
    peft_model = apply_lora(m, r=4, alpha=8, dropout=0.0, target_modules=None, target_parameters=None, seed=0)
    e = EWC(peft_model, f, lam=1e3)
    assert e.lora and float(e.penalty().detach()) == 0.0  # B = 0 at the start: no delta, no penalty
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.add_(0.05)
    assert float(e.penalty().detach()) > 0


def test_replay_mix_is_exact_and_deterministic():
    from homeforge.continual.replay import BufferSource, ReplaySource
    from homeforge.train.data import WindowSource

    new = WindowSource(stream(5, 3, 20_000, 1), 32, seed=1)
    old = BufferSource(WindowSource(stream(7, 0, 20_000, 0), 32, seed=0), buffer=50, seed=0)
    mix = ReplaySource(new, old, 0.25)
    a = mix.batch(0, 40)["input_ids"]
    assert torch.equal(a, mix.batch(0, 40)["input_ids"])
    assert torch.equal(a[10:20], mix.batch(10, 10)["input_ids"])  # sample k is a pure function of k
    is_old = [bool(((row[1:].long() - row[:-1].long()) % VOCAB == 7).float().mean() > 0.5) for row in a]
    assert sum(is_old) == 10  # exactly a quarter replayed
    buffer_rows = {tuple(old.sample(k)["input_ids"][0].tolist()) for k in range(50)}
    assert all(tuple(row.tolist()) in buffer_rows for row, o in zip(a, is_old, strict=True) if o)


def _old_loss(m, src) -> float:
    from homeforge.continual.learn import heldout_loss
    from homeforge.train.task import causal_lm_loss

    return heldout_loss(m, src, causal_lm_loss, 8, 8)


def test_replay_and_ewc_reduce_forgetting(tmp_path):
    """Champion on domain A, then 40 steps on domain B: replay and EWC forget less of A than naive fine-tuning."""
    import copy

    from homeforge.continual.ewc import EWC, estimate_fisher
    from homeforge.continual.replay import BufferSource, ReplaySource
    from homeforge.train.data import WindowSource
    from homeforge.train.loop import train_task
    from homeforge.train.task import TrainTask, causal_lm_loss

    a_train, a_val = WindowSource(stream(7, 0, 30_000, 0), 32, seed=0), WindowSource(stream(7, 0, 3000, 9), 32,
                                                                                       shuffle=False)
    b_train, b_val = WindowSource(stream(5, 3, 30_000, 1), 32, seed=1), WindowSource(stream(5, 3, 3000, 8), 32,
                                                                                       shuffle=False)
    champ = model()
    train_task(TrainTask(champ, a_train, None, causal_lm_loss, None), cfg(tmp_path / "a", "max_steps=80"),
               tmp_path / "a")
    before_a, before_b = _old_loss(champ, a_val), _old_loss(champ, b_val)
    fisher = estimate_fisher(champ, a_train.eval_batches(8), causal_lm_loss, 32)
    out = {}
    for name in ("naive", "replay", "ewc"):
        m = copy.deepcopy(champ)
        src, loss = b_train, causal_lm_loss
        if name == "replay":
            src = ReplaySource(b_train, BufferSource(a_train, 200, 0), 0.3)
        if name == "ewc":
            loss = EWC(m, fisher, lam=1e4).wrap(causal_lm_loss)
        train_task(TrainTask(m, src, None, loss, None), cfg(tmp_path / name, "max_steps=40"), tmp_path / name)
        out[name] = (_old_loss(m, a_val) - before_a, before_b - _old_loss(m, b_val))
    naive_forget, naive_gain = out["naive"]
    assert naive_forget > 0.3 and naive_gain > 0.5, out  # the setup does forget: the test can tell
    for name in ("replay", "ewc"):
        forget, gain = out[name]
        assert forget < 0.5 * naive_forget, (name, out)
        assert gain > 0.5 * naive_gain, (name, out)
    assert math.isfinite(before_a)
