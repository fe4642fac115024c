"""method sft: assistant-only loss mask, packing without cross-sample leakage, training end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import methods_data as md  # noqa: E402

from homeforge.train.methods import build_task  # noqa: E402
from homeforge.train.methods.common import IGNORE, causal_lm_loss  # noqa: E402
from homeforge.train.methods.sft import ChatSource, chat_samples, pack  # noqa: E402

# train loss at steps 1 and 6 of the SFT run below (tiny Llama from a saved checkpoint, seed 7, fp32)
GOLDEN_SFT = {1: 6.0119, 6: 5.2188}


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return md.write_chat_dataset(tmp_path_factory.mktemp("chat") / "data")


def test_labels_are_exactly_the_assistant_tokens(chat_dir):
    tok = md.tokenizer()
    convs = md.conversations(40, 0)
    records = [json.loads(line) for line in (chat_dir / "train.tokens.jsonl").read_text().splitlines()]
    samples, dropped = chat_samples(records, seq_len=10_000)
    assert not dropped and len(samples) == len(convs)
    for (ids, labels), msgs in zip(samples, convs, strict=True):
        # labels are the next token where it is an assistant token; every other position is ignored
        bearing = labels[labels != IGNORE]
        want = "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")
        assert tok.decode(bearing.tolist(), skip_special_tokens=False) == want
        assert np.array_equal(labels[:-1][labels[:-1] != IGNORE], ids[1:][labels[:-1] != IGNORE])
        assert labels[-1] == IGNORE
        # no system/user content and no role headers bear loss
        assert tok.convert_tokens_to_ids("<|im_start|>") not in bearing.tolist()


def test_packed_batches_carry_every_assistant_token_once(chat_dir):
    records = [json.loads(line) for line in (chat_dir / "train.tokens.jsonl").read_text().splitlines()]
    samples, _ = chat_samples(records, seq_len=128)
    src = ChatSource(samples, 128, pad_id=1, seed=0, packing=True)
    n = len(src)
    total = sum(int((src.batch(k, 1)["labels"] != IGNORE).sum()) for k in range(n))
    assert total == sum(int((s[1] != IGNORE).sum()) for s in samples)
    # deterministic in (seed, index): the same batch twice, another epoch in another order
    assert torch.equal(src.batch(3, 4)["input_ids"], src.batch(3, 4)["input_ids"])
    assert n < len(samples) / 2  # packing actually packs


def test_pack_best_fit_decreasing():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, 500).tolist()
    rows = pack(lengths, 128)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    lower_bound = -(-sum(lengths) // 128)  # no packing can use fewer rows
    assert len(rows) <= 1.06 * lower_bound, (len(rows), lower_bound)
    assert rows == pack(lengths, 128)


@pytest.mark.parametrize("arch", md.ARCHES)
def test_packed_logits_equal_each_sample_alone(arch, chat_dir):
    """No cross-sample attention: a packed row gives every sample exactly its solo logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(md.tiny_config(arch, len(md.tokenizer())), dtype=torch.float32).eval()
    records = [json.loads(line) for line in (chat_dir / "train.tokens.jsonl").read_text().splitlines()]
    samples, _ = chat_samples(records, seq_len=128)
    src = ChatSource(samples, 128, pad_id=1, seed=0, packing=True)
    row = max(src.rows, key=len)
    assert len(row) >= 3
    batch = src._collate([row])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # plain causal mask over the row
        at = 0
        for i in row:
            ids = torch.from_numpy(samples[i][0])[None]
            alone = model(input_ids=ids, use_cache=False).logits[0]
            torch.testing.assert_close(packed[at:at + ids.shape[1]], alone, atol=2e-5, rtol=1e-4)
            if at > 0:  # the same row without restarted positions would attend across samples
                assert (leaky[at:at + ids.shape[1]] - alone).abs().max() > 1e-3
            at += ids.shape[1]


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_loss_on_selected_positions_equals_full_cross_entropy(arch, chat_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(md.tiny_config(arch, len(md.tokenizer())), dtype=torch.float32)
    records = [json.loads(line) for line in (chat_dir / "train.tokens.jsonl").read_text().splitlines()]
    samples, _ = chat_samples(records, seq_len=64)
    for packing in (True, False):
        batch = ChatSource(samples, 64, pad_id=1, seed=0, packing=packing).batch(0, 4)
        res = causal_lm_loss(model, batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        want = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1), ignore_index=IGNORE,
                               reduction="sum")
        assert res.n_tokens == int((batch["labels"] != IGNORE).sum())
        torch.testing.assert_close(res.loss_sum, want, atol=1e-4, rtol=1e-5)


def test_unpacked_batches_are_padded_with_attention_mask(chat_dir):
    records = [json.loads(line) for line in (chat_dir / "train.tokens.jsonl").read_text().splitlines()]
    samples, _ = chat_samples(records, seq_len=64)
    src = ChatSource(samples, 64, pad_id=1, seed=0, packing=False)
    b = src.batch(0, 4)
    assert len(src) == len(samples) and "position_ids" not in b
    assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()


def test_too_long_conversations_are_truncated_or_dropped_and_counted():
    recs = [{"input_ids": list(range(10, 60)), "loss_mask": [0] * 10 + [1] * 40},
            {"input_ids": [5, 6, 7], "loss_mask": [0, 0, 0]},
            {"input_ids": [5, 6], "loss_mask": [0]}]
    samples, dropped = chat_samples(recs, seq_len=32, truncate=True)
    assert len(samples) == 1 and len(samples[0][0]) == 32
    assert dropped == {"no assistant tokens (within seq_len)": 1, "input_ids and loss_mask differ in length": 1}
    samples, dropped = chat_samples(recs, seq_len=32, truncate=False)
    assert not samples and dropped["longer than seq_len=32"] == 1


def test_sft_run_golden_loss_and_output(chat_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from homeforge.train.loop import train_task

    base = md.tiny_model_dir(tmp_path / "base", "llama")
    cfg = md.make_cfg(tmp_path / "run", "method=sft", f"model.path={base}")
    task = build_task(cfg, chat_dir)
    assert task.info["packing"] and task.info["rows"] < task.info["conversations"]
    state = train_task(task, cfg, tmp_path / "run")
    losses = {r["step"]: r["loss"] for r in state.history}
    for step, want in GOLDEN_SFT.items():
        assert losses[step] == pytest.approx(want, abs=2e-4), str(losses)
    out = tmp_path / "run" / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, task.model.eval()(input_ids=ids).logits)


def test_fast_packed_mask_equals_transformers_mask():
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask

    from homeforge.train.methods.common import packed_attention_mask

    model = AutoModelForCausalLM.from_config(md.tiny_config("llama", 64))
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]])
    want = create_causal_mask(config=model.config, inputs_embeds=torch.zeros(2, 10, 64), attention_mask=None,
                              past_key_values=None, position_ids=pos)
    assert torch.equal(packed_attention_mask(pos), want)


def test_labels_from_a_real_prepare_dataset_are_the_assistant_contents(tmp_path):
    """`homeforge prepare --kind chat` output feeds SFT: the loss falls exactly on the assistant replies."""
    from rich.console import Console

    from homeforge.config import PrepareConfig, load_config
    from homeforge.data.prepare import run as prepare
    from homeforge.train.methods.common import open_dataset, read_token_records

    tok = md.tokenizer()
    tok.save_pretrained(str(tmp_path / "tok"))
    convs = md.conversations(30, seed=4)
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    cfg = load_config(PrepareConfig, None, [f"inputs={json.dumps([str(src)])}", f"output_dir={tmp_path / 'data'}",
                                            "kind=chat", f"tokenizer.from_dir={tmp_path / 'tok'}", "workers=1",
                                            "pii.enabled=false", "dedup.near=false", "clean.min_words=0",
                                            "clean.min_chars=0"])
    prepare(cfg, console=Console(quiet=True))
    ds = open_dataset(tmp_path / "data", "sft")
    records = read_token_records(ds, "train", ("input_ids", "loss_mask"))
    samples, dropped = chat_samples(records, seq_len=10_000)
    assert samples and not dropped
    replies = {m["content"] for c in convs for m in c if m["role"] == "assistant"}
    for _, labels in samples:
        text = tok.decode(labels[labels != IGNORE].tolist(), skip_special_tokens=False)
        parts = [p.strip() for p in text.split("<|im_end|>")]
        assert parts[-1] == "" and all(p in replies for p in parts[:-1]), text


def test_sft_resume_across_an_epoch_boundary_equals_uninterrupted(chat_dir, tmp_path):
    from homeforge.train import checkpoint as ck
    from homeforge.train.loop import train_task

    base = md.tiny_model_dir(tmp_path / "base", "qwen2")
    overrides = ("method=sft", f"model.path={base}", "max_steps=6", "checkpoint.every=2")
    cfg = md.make_cfg(tmp_path / "full", *overrides)
    full = build_task(cfg, chat_dir)
    assert len(full.train) < 6 * cfg.micro_batch_size  # the run wraps into a second, reshuffled epoch
    train_task(full, cfg, tmp_path / "full")

    class Interrupt(Exception):
        pass

    def stop(state, record):
        if state.step == 5:
            raise Interrupt

    cfg = md.make_cfg(tmp_path / "cut", *overrides)
    with pytest.raises(Interrupt):
        train_task(build_task(cfg, chat_dir), cfg, tmp_path / "cut", progress=stop)
    task = build_task(cfg, chat_dir)
    train_task(task, cfg, tmp_path / "cut", resume=ck.resolve_resume(tmp_path / "cut", "latest"))
    want = dict(full.model.named_parameters())
    for name, p in task.model.named_parameters():
        assert torch.equal(p, want[name]), name
