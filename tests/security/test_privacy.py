"""DP-SGD through the training engine: epsilon matches Opacus' accountant, per-sample gradients clipped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from engine_task import make_cfg, make_task  # noqa: E402

from homeforge.errors import ConfigError  # noqa: E402
from homeforge.train import privacy  # noqa: E402


def test_dp_run_reports_opacus_epsilon(tmp_path):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    from homeforge.train.loop import train_task

    cfg = make_cfg(tmp_path, "privacy.epsilon=8", "privacy.delta=1e-4", "privacy.max_grad_norm=0.5",
                   "max_steps=6", "grad_accum=2", "checkpoint.every=0", "eval_every=100")
    task = make_task(cfg)
    n = len(task.train)
    state = train_task(task, cfg, tmp_path)
    manifest = json.loads((tmp_path / "model" / "homeforge.json").read_text())
    rep = manifest["task"]["privacy"]
    q = cfg.micro_batch_size * cfg.grad_accum / n
    sigma = get_noise_multiplier(target_epsilon=8, target_delta=1e-4, sample_rate=q, steps=6, accountant="rdp",
                                 epsilon_tolerance=0.001)
    acc = RDPAccountant()
    for _ in range(6):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert rep["noise_multiplier"] == pytest.approx(sigma, rel=1e-9)
    assert rep["sample_rate"] == pytest.approx(q)
    assert rep["steps"] == state.step == 6
    assert rep["epsilon_spent"] == pytest.approx(acc.get_epsilon(1e-4), rel=1e-9)
    assert 7.0 < rep["epsilon_spent"] <= 8.0 + 1e-6  # the budget is spent, not exceeded
    logged = [r["dp_epsilon"] for r in state.history]
    assert logged == sorted(logged) and logged[-1] == pytest.approx(rep["epsilon_spent"])
    assert privacy.spent_epsilon(sigma, q, 6, 1e-4) == pytest.approx(rep["epsilon_spent"], rel=1e-9)
    # the saved model is a plain HF model (no Opacus wrapper prefixes)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "model" / "model.safetensors").keys()
    assert not any(k.startswith("_module") for k in keys)


def test_per_sample_gradients_are_exact_and_clipped(tmp_path):
    """Opacus' per-sample gradients on the HF Llama (Linear, Embedding, RMSNorm, tied head) equal
    one-sample backward passes, and the optimizer sums exactly the clipped ones."""
    from homeforge.train.task import causal_lm_loss

    cfg = make_cfg(tmp_path, "privacy.epsilon=50", "privacy.max_grad_norm=0.05")
    task = make_task(cfg)
    torch.manual_seed(0)
    reference = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    opt = torch.optim.SGD(task.model.parameters(), lr=0.0)
    gsm, dp_opt = privacy.make_private(task, task.model, opt, cfg)
    batch = task.train.batch(0, 4)
    causal_lm_loss(gsm, batch).loss_sum.backward()
    params = [p for p in gsm.parameters() if p.requires_grad]
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 4 for p in params)

    # exact per-sample gradients: one backward per sample on a plain copy of the model
    from engine_task import VOCAB

    from homeforge.models.presets import build_model, preset_config

    plain = build_model(preset_config("debug", VOCAB, eos_token_id=0), seed=cfg.seed)
    plain.load_state_dict(reference, strict=False)  # tied lm_head: one parameter
    names = [n for n, p in plain.named_parameters() if p.requires_grad]
    norms = []
    for i in range(4):
        plain.zero_grad()
        causal_lm_loss(plain, {k: v[i : i + 1] for k, v in batch.items()}).loss_sum.backward()
        grads = dict(plain.named_parameters())
        for name, p in zip(names, params, strict=True):
            torch.testing.assert_close(p.grad_sample[i], grads[name].grad, rtol=1e-4, atol=1e-6)
        norms.append(torch.sqrt(sum((grads[n].grad ** 2).sum() for n in names)))
    norms = torch.stack(norms)
    assert (norms > 0.05).all()  # clipping is active for every sample
    dp_opt.clip_and_accumulate()
    factors = (0.05 / (norms + 1e-6)).clamp(max=1.0)
    total_sq = 0.0
    for p in params:
        expected = torch.einsum("i,i...->...", factors, p.grad_sample)
        torch.testing.assert_close(p.summed_grad, expected, rtol=1e-4, atol=1e-7)
        total_sq += float((p.summed_grad ** 2).sum())
    assert total_sq ** 0.5 <= 4 * 0.05 + 1e-5  # a sum of 4 clipped gradients


def test_budget_that_cannot_be_met(tmp_path):
    cfg = make_cfg(tmp_path, "privacy.epsilon=1e-6", "privacy.delta=1e-6", "max_steps=100000")
    task = make_task(cfg)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.1)
    with pytest.raises(privacy.PrivacyError, match="cannot be met"):
        privacy.make_private(task, task.model, opt, cfg)


def test_delta_must_be_below_one_over_n(tmp_path):
    cfg = make_cfg(tmp_path, "privacy.epsilon=3", "privacy.delta=0.01")
    task = make_task(cfg)
    with pytest.raises(privacy.PrivacyError, match="not below 1/"):
        privacy.make_private(task, task.model, torch.optim.SGD(task.model.parameters(), lr=0.1), cfg)


@pytest.mark.parametrize("override,message", [("privacy.epsilon=0", "greater than 0"),
                                              ("privacy.epsilon=-2", "greater than 0"),
                                              ("privacy.sigma=1", "unknown key")])
def test_bad_privacy_config(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(tmp_path, override)


def test_lora_per_sample_gradients(tmp_path):
    """LoRA (peft) under Opacus: only the adapter is trainable; its per-sample grads are exact."""
    from engine_task import VOCAB

    from homeforge.models.lora import apply_lora
    from homeforge.models.presets import build_model, preset_config
    from homeforge.train.task import causal_lm_loss

    cfg = make_cfg(tmp_path, "privacy.epsilon=50", "privacy.max_grad_norm=1e-4")
    task = make_task(cfg)
    torch.manual_seed(0)
    task.model = apply_lora(build_model(preset_config("debug", VOCAB, eos_token_id=0), seed=0), r=4, dropout=0.0,
                            seed=0)
    for n, p in task.model.named_parameters():  # non-zero B so that A gets gradients too
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    state = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    gsm, dp_opt = privacy.make_private(task, task.model, torch.optim.SGD(
        [p for p in task.model.parameters() if p.requires_grad], lr=0.0), cfg)
    batch = task.train.batch(0, 3)
    causal_lm_loss(gsm, batch).loss_sum.backward()
    trainable = [(n, p) for n, p in gsm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    plain = apply_lora(build_model(preset_config("debug", VOCAB, eos_token_id=0), seed=0), r=4, dropout=0.0, seed=0)
    plain.load_state_dict(state)
    ref = dict(plain.named_parameters())
    for i in range(3):
        plain.zero_grad()
        causal_lm_loss(plain, {k: v[i : i + 1] for k, v in batch.items()}).loss_sum.backward()
        for n, p in trainable:
            torch.testing.assert_close(p.grad_sample[i], ref[n.removeprefix("_module.")].grad, rtol=1e-4, atol=1e-7)


def test_resumed_dp_run_counts_the_steps_before_the_checkpoint(tmp_path):
    from opacus.accountants import RDPAccountant

    from homeforge.train.checkpoint import resolve_resume
    from homeforge.train.loop import train_task

    over = ["privacy.epsilon=8", "privacy.delta=1e-4", "max_steps=6", "checkpoint.every=3", "eval_every=100"]
    cfg = make_cfg(tmp_path / "a", *over)
    first = make_task(cfg)
    train_task(first, cfg, tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step-00000003"
    assert ckpt.is_dir()
    cfg_b = make_cfg(tmp_path / "a", *over)
    task = make_task(cfg_b)
    state = train_task(task, cfg_b, tmp_path / "a", resume=resolve_resume(tmp_path / "a", str(ckpt)))
    rep = json.loads((tmp_path / "a" / "model" / "homeforge.json").read_text())["task"]["privacy"]
    acc = RDPAccountant()
    acc.history = [(rep["noise_multiplier"], rep["sample_rate"], 6)]
    assert state.step == 6 and rep["steps"] == 6
    assert rep["epsilon_spent"] == pytest.approx(acc.get_epsilon(1e-4), rel=1e-9)
    assert rep["epsilon_spent"] == pytest.approx(first.info["privacy"]["epsilon_spent"], rel=1e-9)
