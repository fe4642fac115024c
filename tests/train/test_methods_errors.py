"""Bad input to the training methods: a clear message naming what, where and how to fix; nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import methods_data as md  # noqa: E402

from homeforge.errors import HomeforgeError  # noqa: E402
from homeforge.train.methods import build_task  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    md.write_chat_dataset(root / "chat", n_train=8, n_val=2)
    md.write_text_dataset(root / "text", n_docs=30)
    md.tiny_model_dir(root / "llama", "llama")
    return root


def test_dataset_kind_must_suit_the_method(dirs, tmp_path):
    with pytest.raises(HomeforgeError) as err:
        build_task(md.make_cfg(tmp_path, "method=pretrain", "model.preset=debug"), dirs / "chat")
    msg = str(err.value)
    assert "kind 'chat'" in msg and "method 'pretrain'" in msg and "use method sft or lora" in msg
    with pytest.raises(HomeforgeError, match="trains on chat data"):
        build_task(md.make_cfg(tmp_path, "method=sft", "model.preset=debug"), dirs / "text")
    with pytest.raises(HomeforgeError, match="train.data is not set"):
        build_task(md.make_cfg(tmp_path, "method=sft", "model.preset=debug"), None)


def test_dataset_made_with_another_tokenizer_is_refused(dirs, tmp_path):
    from homeforge.data.tokenizer import train_bpe

    other = train_bpe(["completely different words in another corpus " * 20] * 50, vocab_size=280)
    model_dir = md.tiny_model_dir(tmp_path / "other", "llama", tok=other)
    with pytest.raises(HomeforgeError) as err:
        build_task(md.make_cfg(tmp_path, "method=sft", f"model.path={model_dir}"), dirs / "chat")
    msg = str(err.value)
    assert "larger than the model's embedding table" in msg and "tokenizer.from_dir=MODEL_DIR" in msg
    # same size, different tokens
    import random

    rng = random.Random(5)
    text = [" ".join("".join(rng.choice("qxzjvkwy") for _ in range(5)) for _ in range(60)) for _ in range(200)]
    same_size = train_bpe(text, vocab_size=len(md.tokenizer()))
    assert len(same_size) == len(md.tokenizer())
    model_dir = md.tiny_model_dir(tmp_path / "same", "llama", tok=same_size)
    with pytest.raises(HomeforgeError, match="different tokenizer than the model's"):
        build_task(md.make_cfg(tmp_path, "method=sft", f"model.path={model_dir}"), dirs / "chat")


def test_token_ids_beyond_the_vocabulary_are_refused(dirs, tmp_path):
    bad = tmp_path / "ids"
    bad.mkdir()
    (bad / "tokenizer").symlink_to(dirs / "chat" / "tokenizer")
    (bad / "index.json").write_text((dirs / "chat" / "index.json").read_text())
    (bad / "train.tokens.jsonl").write_text(json.dumps({"input_ids": [5, 99999, 6], "loss_mask": [0, 1, 1]}) + "\n")
    with pytest.raises(HomeforgeError, match="token id 99999"):
        build_task(md.make_cfg(tmp_path, "method=sft", "model.preset=debug"), bad)
    (bad / "train.tokens.jsonl").write_text('{"input_ids": [5, 6]\n')
    with pytest.raises(HomeforgeError, match="line 1 is not valid JSON"):
        build_task(md.make_cfg(tmp_path, "method=sft", "model.preset=debug"), bad)


def test_checkpoint_dir_that_is_not_a_model(dirs, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    for method, data in (("sft", "chat"), ("lora", "chat"), ("pretrain", "text"), ("classify", None)):
        cfg = md.make_cfg(tmp_path, f"method={method}", f"model.path={tmp_path / 'notes'}")
        ds = dirs / data if data else md.write_classification_dataset(tmp_path / "cls", n_train=4, n_val=2)
        with pytest.raises(HomeforgeError, match="is not a model directory: it has no config.json"):
            build_task(cfg, ds)


def test_cli_reports_bad_lora_target_and_exits_2(dirs, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HOMEFORGE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "homeforge", "train", "--data", str(dirs / "chat"), "--output", str(out),
         "--method", "lora", f"model.path={dirs / 'llama'}", "lora.target_modules=[q_proj,attn_out]", "threads=1"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "['attn_out']" in proc.stderr and "down_proj" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "model").exists() and not list(out.glob("checkpoints/step-*"))


@pytest.mark.parametrize("name", ["lora-smollm2.yaml", "pretrain-moe.yaml", "sft.yaml", "classify.yaml"])
def test_example_configs_validate(name):
    from homeforge.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[2] / "examples" / name)
    assert cfg.method in ("lora", "pretrain", "sft", "classify")
    if name == "pretrain-moe.yaml":
        from homeforge.models.presets import preset_config

        mc = preset_config(cfg.model.preset, 512, overrides=cfg.model.overrides)
        assert mc.num_experts == 16 and mc.num_experts_per_tok == 2
