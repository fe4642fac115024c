"""Tiny models and dataset artifacts for the eval and compress tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from homeforge import artifacts


def train_debug_model(dataset: Path, tok, out: Path, steps: int = 40, seed: int = 0) -> Path:
    """A `debug` preset model trained for a few steps (perplexity well below the vocabulary)."""
    from homeforge.data.shards import load_tokens
    from homeforge.models.io import save_model_dir
    from homeforge.models.presets import build_model, preset_config
    from homeforge.train.data import PackedWindows

    torch.manual_seed(seed)
    model = build_model(preset_config("debug", len(tok), eos_token_id=tok.eos_token_id), seed=seed)
    win = PackedWindows(load_tokens(dataset, "train"), 64, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        x, y = win.batch(step * 8, 8)
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_model_dir(model, tok, out)
    return out


def write_dataset(out: Path, kind: str, splits: dict[str, list[dict]], tok, labels: list[str] | None = None,
                  labels_in_index: bool = False) -> Path:
    """A dataset artifact in the documented layout (records, tokens, tokenizer, index).

    Label names go to labels.json, or with ``labels_in_index`` into index.json (as
    `homeforge prepare` writes them)."""
    with artifacts.write_artifact(out, stage="dataset", config={"kind": kind, "n": len(splits)}, force=True) as art:
        tok.save_pretrained(str(art.dir / "tokenizer"))
        index = {"format": "test", "kind": kind, "splits": {}}
        for split, rows in splits.items():
            with open(art.dir / f"{split}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            if kind == "classification":
                with open(art.dir / f"{split}.tokens.jsonl", "w") as f:
                    for r in rows:
                        ids = tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                        f.write(json.dumps({"input_ids": ids, "label": r["label"]}) + "\n")
            index["splits"][split] = {"records": len(rows)}
        if labels and labels_in_index:
            index["labels"] = labels
        (art.dir / "index.json").write_text(json.dumps(index))
        if labels and not labels_in_index:
            (art.dir / "labels.json").write_text(json.dumps(labels))
        art.extra["kind"] = kind
    return out
