"""method pretrain: dense and MoE presets (Qwen2-MoE, DeepSeek-V3) on packed shards; router balance logged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import methods_data as md  # noqa: E402

from homeforge.errors import HomeforgeError  # noqa: E402
from homeforge.models.presets import build_model, preset_config  # noqa: E402
from homeforge.train.loop import train_task  # noqa: E402
from homeforge.train.methods import build_task  # noqa: E402
from homeforge.train.methods.common import RouterMonitor, causal_lm_loss  # noqa: E402

# train loss at steps 1 and 6 of the moe-debug run below (seed 7, fp32, 1 thread)
GOLDEN_MOE = {1: 5.9937, 6: 4.9994}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return md.write_text_dataset(tmp_path_factory.mktemp("text") / "data", n_docs=80)


def test_moe_preset_pretrain_golden_loss_aux_loss_and_balance(text_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = md.make_cfg(tmp_path, "method=pretrain", "model.preset=moe-debug")
    task = build_task(cfg, text_dir)
    assert task.info["moe"] and type(task.model).__name__ == "Qwen2MoeForCausalLM"
    from homeforge.train.flops import flops_per_token

    experts = sum(p.numel() for n, p in task.model.named_parameters() if ".experts." in n)
    dense = flops_per_token(task.model, cfg.seq_len)  # as if every expert ran on every token
    assert task.flops_per_token == pytest.approx(dense - 6 * experts * (1 - 2 / 4))  # only top-2 of 4 count
    state = train_task(task, cfg, tmp_path)
    losses = {r["step"]: r["loss"] for r in state.history}
    for step, want in GOLDEN_MOE.items():
        assert losses[step] == pytest.approx(want, abs=2e-4), str(losses)
    rec = state.history[-1]
    assert rec["moe_aux_loss"] > 0 and 1.0 <= rec["router_balance"] <= 4 / 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.num_experts == 4 and model.config.num_experts_per_tok == 2
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, task.model.eval()(input_ids=ids).logits)


def test_aux_loss_is_added_with_its_coefficient():
    torch.manual_seed(0)
    model = build_model(preset_config("moe-debug", 128, overrides={"router_aux_loss_coef": 0.5}), seed=0)
    x = torch.randint(0, 128, (2, 16))
    batch = {"input_ids": x, "labels": torch.roll(x, -1, 1)}
    res = causal_lm_loss(model, batch)
    out = model(input_ids=x, use_cache=False)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 128), batch["labels"].reshape(-1), reduction="sum")
    torch.testing.assert_close(res.loss_sum, ce + 0.5 * out.aux_loss * 32, rtol=1e-5, atol=1e-4)
    assert res.metrics["moe_aux_loss"] == pytest.approx(float(out.aux_loss.detach()), rel=1e-5)


def test_experts_and_top_k_are_configurable():
    cfg = preset_config("moe-debug", 128, overrides={"num_experts": 8, "num_experts_per_tok": 3})
    model = build_model(cfg, seed=0)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 8
    mon = RouterMonitor(model)
    model(input_ids=torch.randint(0, 128, (2, 10)), use_cache=False)
    assert all(int(c.sum()) == 2 * 10 * 3 for c in mon.counts.values())  # every token goes to top-3
    with pytest.raises(HomeforgeError, match="num_experts_per_tok=9"):
        preset_config("moe-debug", 128, overrides={"num_experts_per_tok": 9})


def test_deepseek_preset_trains_and_logs_balance(text_dir, tmp_path):
    cfg = md.make_cfg(tmp_path, "method=pretrain", "model.preset=deepseek-debug", "max_steps=2", "checkpoint.every=0")
    task = build_task(cfg, text_dir)
    assert type(task.model).__name__ == "DeepseekV3ForCausalLM"
    state = train_task(task, cfg, tmp_path)
    assert "router_balance" in state.history[-1] and "moe_aux_loss" not in state.history[-1]


def test_dense_preset_and_continued_pretraining_from_a_checkpoint(text_dir, tmp_path):
    cfg = md.make_cfg(tmp_path / "a", "method=pretrain", "model.preset=debug", "max_steps=2", "checkpoint.every=0")
    task = build_task(cfg, text_dir)
    assert not task.info["moe"] and task.flops_per_token is None
    train_task(task, cfg, tmp_path / "a")
    cfg = md.make_cfg(tmp_path / "b", "method=pretrain", f"model.path={tmp_path / 'a' / 'model'}", "max_steps=2",
                      "checkpoint.every=0")
    task = build_task(cfg, text_dir)
    assert task.info["base"] == str(tmp_path / "a" / "model")
    state = train_task(task, cfg, tmp_path / "b")
    assert state.step == 2
