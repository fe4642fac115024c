"""method classify: a sequence-classification head on a preset or a local checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import methods_data as md  # noqa: E402

from homeforge.errors import HomeforgeError  # noqa: E402
from homeforge.train.loop import train_task  # noqa: E402
from homeforge.train.methods import build_task  # noqa: E402


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory):
    return md.write_classification_dataset(tmp_path_factory.mktemp("cls") / "data")


def accuracy(model, src) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for b in src.eval_batches(16):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            right += int((logits.argmax(-1) == b["labels"]).sum())
            total += len(b["labels"])
    return right / total


def test_classify_preset_learns_and_saves_a_loadable_classifier(cls_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    cfg = md.make_cfg(tmp_path, "method=classify", "model.preset=debug", "max_steps=25", "eval_every=25",
                      "checkpoint.every=0", "micro_batch_size=8")
    task = build_task(cfg, cls_dir)
    assert task.info["labels"] == ["animal", "place"] and task.info["kind"] == "sequence-classification"
    state = train_task(task, cfg, tmp_path)
    assert "accuracy" in state.history[-1]
    assert state.history[-1]["val_loss"] < 0.3, state.history[-1]
    assert accuracy(task.model, task.val) == 1.0
    out = tmp_path / "model"
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.id2label == {0: "animal", 1: "place"}
    b = next(task.val.eval_batches(4))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   task.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)
    manifest = json.loads((out / "homeforge.json").read_text())
    assert manifest["kind"] == "sequence-classification" and manifest["task"]["labels"] == ["animal", "place"]


def test_validation_reports_the_classifier_accuracy_over_uneven_batches(cls_dir, tmp_path):
    """val_accuracy is the accuracy over every validation record, not a mean of batch means."""
    from homeforge.train.distributed import DistInfo
    from homeforge.train.loop import evaluate, final_metrics

    cfg = md.make_cfg(tmp_path, "method=classify", "model.preset=debug", "micro_batch_size=5", "eval_batches=100",
                      "seed=3")
    task = build_task(cfg, cls_dir)  # an untrained head: an accuracy strictly between 0 and 1
    n_val = sum(len(b["labels"]) for b in task.val.eval_batches(5))
    assert n_val % 5  # a short last batch, which a mean of batch means would over-weight
    loss, metrics = evaluate(task.model, task, cfg, None, DistInfo(), "fp32")
    expected = accuracy(task.model, task.val)
    assert 0 < expected < 1, expected
    assert metrics == {"val_accuracy": pytest.approx(expected)}
    state = train_task(task, md.make_cfg(tmp_path / "run", "method=classify", "model.preset=debug", "max_steps=3",
                                         "eval_every=3", "checkpoint.every=0"), tmp_path / "run")
    assert state.history[-1]["val_accuracy"] == final_metrics(state)["val_accuracy"]


def test_classify_on_a_local_checkpoint_keeps_its_body(cls_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = md.tiny_model_dir(tmp_path / "base", "qwen2")
    cfg = md.make_cfg(tmp_path / "run", "method=classify", f"model.path={base}", "classify.freeze_base=true")
    task = build_task(cfg, cls_dir)
    assert type(task.model).__name__ == "Qwen2ForSequenceClassification"
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert trainable == ["score.weight"]
    lm = AutoModelForCausalLM.from_pretrained(base)
    torch.testing.assert_close(task.model.model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)
    # the padded batch picks the last real token: same logits as each sample alone
    b = task.train.batch(0, 4)
    task.model.eval()
    with torch.no_grad():
        batched = task.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for i in range(4):
            n = int(b["attention_mask"][i].sum())
            alone = task.model(input_ids=b["input_ids"][i:i + 1, :n]).logits
            torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_classify_rejects_bad_labels(cls_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in cls_dir.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    (bad / "tokenizer").symlink_to(cls_dir / "tokenizer")
    lines = (bad / "train.tokens.jsonl").read_text().splitlines()
    lines[4] = json.dumps({"input_ids": [5, 6], "label": 7})
    (bad / "train.tokens.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(HomeforgeError, match="label outside 0..1 .first at line 5"):
        build_task(md.make_cfg(tmp_path, "method=classify", "model.preset=debug"), bad)
    (bad / "labels.json").unlink()
    with pytest.raises(HomeforgeError, match="no labels.json"):
        build_task(md.make_cfg(tmp_path, "method=classify", "model.preset=debug"), bad)


def test_classify_on_a_bert_like_encoder(cls_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForMaskedLM

    tok = md.tokenizer()
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    cfg = md.make_cfg(tmp_path / "run", "method=classify", f"model.path={tmp_path / 'bert'}", "max_steps=3",
                      "checkpoint.every=0")
    task = build_task(cfg, cls_dir)
    assert type(task.model).__name__ == "BertForSequenceClassification"
    train_task(task, cfg, tmp_path / "run")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model").eval()
    b = next(task.val.eval_batches(4))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   task.model.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)
