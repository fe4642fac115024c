"""Tiny datasets (layout of docs/DEVELOPING.md) and tiny local checkpoints for the method tests.

Chat datasets are tokenized here segment by segment with ChatML, so the loss mask is known
by construction (1 exactly on assistant contents and the <|im_end|> closing them).
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

from homeforge.config import TrainConfig, load_config

WORDS = ("the cat sat on a mat while two dogs ran past the red barn and a bird sang in the old oak tree near "
         "water where fish swim slowly under bright summer light every day people walk along quiet roads").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@lru_cache(maxsize=1)
def tokenizer():
    from homeforge.data.tokenizer import train_bpe

    rng = random.Random(0)
    return train_bpe([sentence(rng, 30) for _ in range(300)], vocab_size=400, min_frequency=2)


def conversations(n: int, seed: int = 0, max_words: int = 12) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "be brief"})
        for _ in range(1 + (i % 2)):
            msgs.append({"role": "user", "content": sentence(rng, rng.randint(2, max_words))})
            msgs.append({"role": "assistant", "content": sentence(rng, rng.randint(1, max_words))})
        out.append(msgs)
    return out


def tokenize_chatml(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    ids, mask = [], []

    def add(text, m):
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(t)
        mask.extend([m] * len(t))

    for msg in messages:
        add(f"<|im_start|>{msg['role']}\n", 0)
        is_asst = int(msg["role"] == "assistant")
        add(msg["content"], is_asst)
        add("<|im_end|>", is_asst)
        add("\n", 0)
    return ids, mask


def _write_common(root: Path, tok, kind: str, splits: dict[str, int], vocab_size: int | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(root / "tokenizer"))
    index = {"format": "tokens-jsonl-v1", "kind": kind, "dtype": "uint16", "vocab_size": vocab_size or len(tok),
             "eos_id": tok.eos_token_id, "splits": {s: {"records": n} for s, n in splits.items()}}
    (root / "index.json").write_text(json.dumps(index))


def write_chat_dataset(root: Path, tok=None, n_train: int = 40, n_val: int = 8, max_words: int = 12) -> Path:
    tok = tok or tokenizer()
    counts = {}
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        with open(root / f"{split}.tokens.jsonl", "w") as f:
            for msgs in conversations(n, seed, max_words):
                ids, mask = tokenize_chatml(tok, msgs)
                f.write(json.dumps({"input_ids": ids, "loss_mask": mask}) + "\n")
        counts[split] = n
    _write_common(root, tok, "chat", counts)
    return root


def write_text_dataset(root: Path, tok=None, n_docs: int = 200) -> Path:
    from homeforge.data.shards import write_shards

    tok = tok or tokenizer()
    rng = random.Random(2)
    root.mkdir(parents=True, exist_ok=True)
    docs = {s: [tok(sentence(rng, 40), add_special_tokens=False)["input_ids"] for _ in range(n)]
            for s, n in (("train", n_docs), ("val", n_docs // 10))}
    index = write_shards(root, docs, len(tok), tok.eos_token_id)
    index["kind"] = "text"
    (root / "index.json").write_text(json.dumps(index))
    tok.save_pretrained(str(root / "tokenizer"))
    return root


def write_classification_dataset(root: Path, tok=None, n_train: int = 64, n_val: int = 16) -> Path:
    """Two classes a model can learn fast: texts about animals vs. texts about places."""
    tok = tok or tokenizer()
    rng = random.Random(3)
    topics = [["cat", "dogs", "bird", "fish"], ["barn", "roads", "tree", "water"]]
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        with open(root / f"{split}.tokens.jsonl", "w") as f:
            for i in range(n):
                label = i % 2
                text = " ".join(rng.choice(topics[label]) for _ in range(rng.randint(3, 10)))
                f.write(json.dumps({"input_ids": tok(text, add_special_tokens=False)["input_ids"], "label": label})
                        + "\n")
    (root / "labels.json").write_text(json.dumps(["animal", "place"]))
    _write_common(root, tok, "classification", {"train": n_train, "val": n_val})
    return root


ARCHES = ("llama", "qwen2", "deepseek_v3", "qwen2_moe")


def tiny_config(arch: str, vocab: int, tok=None):
    from transformers import DeepseekV3Config, LlamaConfig, Qwen2Config, Qwen2MoeConfig

    tok = tok or tokenizer()
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(**common, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                              num_experts_per_tok=2, router_aux_loss_coef=0.01)
    if arch == "deepseek_v3":
        common["num_key_value_heads"] = 4
        return DeepseekV3Config(**common, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                                n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    raise ValueError(arch)


def tiny_model_dir(root: Path, arch: str, tok=None, seed: int = 0) -> Path:
    """A saved tiny random checkpoint (weights + tokenizer) of ``arch``."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tok or tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), tok), dtype=torch.float32)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(root))
    tok.save_pretrained(str(root))
    return root


def make_cfg(out: Path, *overrides: str) -> TrainConfig:
    base = ["seq_len=128", "micro_batch_size=4", "max_steps=6", "optim.lr=3e-3", "schedule.warmup_steps=1",
            "eval_every=3", "eval_batches=2", "log_every=1", "checkpoint.every=3", "threads=1",
            "tracking.tensorboard=false", "peak_tflops=0.05", f"output_dir={out}", "seed=7"]
    return load_config(TrainConfig, None, [*base, *overrides])
