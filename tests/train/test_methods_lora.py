"""method lora on tiny Llama, Qwen2, DeepSeek-V3 and Qwen2-MoE checkpoints made from configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import methods_data as md  # noqa: E402

from homeforge.errors import HomeforgeError  # noqa: E402
from homeforge.train import checkpoint as ck  # noqa: E402
from homeforge.train.loop import train_task  # noqa: E402
from homeforge.train.methods import build_task  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    md.write_chat_dataset(root / "chat", n_train=24, n_val=4)
    md.write_text_dataset(root / "text", n_docs=60)
    for arch in md.ARCHES:
        md.tiny_model_dir(root / arch, arch)
    return root


def ids():
    return torch.tensor([[2, 40, 41, 42, 43, 44, 3, 50, 51]])


@pytest.mark.parametrize("arch", md.ARCHES)
def test_lora_trains_only_adapters_and_merged_equals_base_plus_adapter(arch, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = md.make_cfg(tmp_path, "method=lora", f"model.path={data / arch}", "max_steps=3", "checkpoint.every=0",
                      "lora.r=4", "optim.lr=1e-2")
    task = build_task(cfg, data / "chat")
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    if arch in ("deepseek_v3", "qwen2_moe"):  # routed experts (fused 3-D parameters) are adapted too
        assert any("experts" in n for n in trainable)
        assert task.info["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    base_sd = AutoModelForCausalLM.from_pretrained(data / arch).state_dict()
    train_task(task, cfg, tmp_path)
    # the frozen base did not move
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in task.model.state_dict().items() if "lora_" not in k}
    for k, v in base_sd.items():
        assert torch.equal(after[k], v), k
    # the adapter did
    assert any(p.abs().sum() > 0 for n, p in task.model.named_parameters() if "lora_B" in n)
    out = tmp_path / "model"
    peft_model = task.model.eval()
    with torch.no_grad():
        want = peft_model(input_ids=ids()).logits
        merged = AutoModelForCausalLM.from_pretrained(out).eval()  # the merged directory needs no peft
        torch.testing.assert_close(merged(input_ids=ids()).logits, want, atol=1e-4, rtol=1e-4)
        fresh = AutoModelForCausalLM.from_pretrained(data / arch).eval()
        base_logits = fresh(input_ids=ids()).logits
        reloaded = PeftModel.from_pretrained(fresh, out / "adapter").eval()
        torch.testing.assert_close(reloaded(input_ids=ids()).logits, want, atol=1e-5, rtol=1e-5)
        assert (want - base_logits).abs().max() > 1e-3  # the adapter changes the model


def test_lora_interrupted_and_resumed_equals_uninterrupted(data, tmp_path):
    overrides = ("method=lora", f"model.path={data / 'deepseek_v3'}", "max_steps=6", "checkpoint.every=2",
                 "lora.r=4", "optim.lr=1e-2")
    full_cfg = md.make_cfg(tmp_path / "full", *overrides)
    full_task = build_task(full_cfg, data / "chat")
    train_task(full_task, full_cfg, tmp_path / "full")

    class Interrupt(Exception):
        pass

    def stop_at_5(state, record):
        if state.step == 5:
            raise Interrupt

    cfg = md.make_cfg(tmp_path / "cut", *overrides)
    with pytest.raises(Interrupt):
        train_task(build_task(cfg, data / "chat"), cfg, tmp_path / "cut", progress=stop_at_5)
    latest = ck.resolve_resume(tmp_path / "cut", "latest")
    assert latest.name == "step-00000004"
    stored = load_file(latest / "model.safetensors")
    assert stored and all("lora_" in k for k in stored)  # the checkpoint holds the adapter only
    task = build_task(cfg, data / "chat")
    state = train_task(task, cfg, tmp_path / "cut", resume=latest)
    assert state.step == 6
    a = dict(full_task.model.named_parameters())
    for name, p in task.model.named_parameters():
        assert torch.equal(p, a[name]), name
    full_adapter = load_file(tmp_path / "full" / "model" / "adapter" / "adapter_model.safetensors")
    cut_adapter = load_file(tmp_path / "cut" / "model" / "adapter" / "adapter_model.safetensors")
    assert full_adapter.keys() == cut_adapter.keys()
    assert all(torch.equal(full_adapter[k], cut_adapter[k]) for k in full_adapter)


def test_lora_on_text_data_and_explicit_targets(data, tmp_path):
    cfg = md.make_cfg(tmp_path, "method=lora", f"model.path={data / 'llama'}", "lora.target_modules=[q_proj,v_proj]",
                      "lora.merge=false", "max_steps=2", "checkpoint.every=0")
    task = build_task(cfg, data / "text")
    assert task.info["data_kind"] == "text" and task.info["target_modules"] == ["q_proj", "v_proj"]
    assert {n.split(".")[-4] for n, p in task.model.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}
    train_task(task, cfg, tmp_path)
    assert (tmp_path / "model" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "model" / "model.safetensors").exists()  # merge off: adapter only


def test_lora_unknown_target_lists_the_existing_ones(data, tmp_path):
    cfg = md.make_cfg(tmp_path, "method=lora", f"model.path={data / 'qwen2'}", "lora.target_modules=[q_proj,qkv]")
    with pytest.raises(HomeforgeError) as err:
        build_task(cfg, data / "chat")
    msg = str(err.value)
    assert "['qkv']" in msg and "q_proj" in msg and "down_proj" in msg and "lm_head" not in msg
    cfg = md.make_cfg(tmp_path, "method=lora", f"model.path={data / 'llama'}", "lora.target_parameters=[experts.w1]")
    with pytest.raises(HomeforgeError, match="not an MoE model"):
        build_task(cfg, data / "chat")
    cfg = md.make_cfg(tmp_path, "method=lora", f"model.path={data / 'qwen2_moe'}", "lora.dropout=0.1")
    with pytest.raises(HomeforgeError, match="lora.dropout=0"):
        build_task(cfg, data / "chat")


def test_lora_needs_a_local_model(data, tmp_path):
    with pytest.raises(HomeforgeError, match="model.path"):
        build_task(md.make_cfg(tmp_path, "method=lora", "model.preset=debug"), data / "chat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HomeforgeError, match="not a model directory"):
        build_task(md.make_cfg(tmp_path, "method=lora", f"model.path={tmp_path / 'empty'}"), data / "chat")


def test_lora_all_linear(data, tmp_path):
    cfg = md.make_cfg(tmp_path, "method=lora", f"model.path={data / 'qwen2'}", "lora.target_modules=[all-linear]")
    task = build_task(cfg, data / "chat")
    assert task.info["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
