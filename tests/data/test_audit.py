"""Auditable drops, per-class losses, PII over all records, encryption of samples, bad labels, encoder tokenizers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from rich.console import Console

from homeforge.config import PrepareConfig, load_config
from homeforge.data.prepare import run
from homeforge.errors import HomeforgeError

from .fixtures import bert_like_dir, doc
from .test_clean import CLEAN

QUIET = Console(quiet=True)
BASE = ["tokenizer.vocab_size=300", "workers=1", "split.val=0"]


def prep(inputs, out, *extra, **kw):
    cfg = load_config(PrepareConfig, overrides=[f"inputs={json.dumps([str(i) for i in inputs])}",
                                                f"output_dir={out}", *BASE, *extra])
    return run(cfg, console=QUIET, **kw)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "homeforge", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


def cli_inproc(*args):
    """`homeforge ARGS` in this process (as `homeforge.cli.main` runs it): (exit code, output)."""
    from typer.testing import CliRunner

    from homeforge.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if isinstance(result.exception, HomeforgeError):
        return result.exception.exit_code, result.output + result.exception.render()
    return result.exit_code, result.output


def jsonl(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_mixed_chinese_english_corpus_keeps_every_clean_record_byte_for_byte(tmp_path):
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in CLEAN),
                                          encoding="utf-8")
    res = prep([tmp_path / "mixed.jsonl"], tmp_path / "out")
    assert res["report"]["records"]["dropped"] == {} and res["report"]["records"]["out"] == len(CLEAN)
    # nothing to fix in clean text: every record comes out exactly as it went in (full-width punctuation included)
    assert sorted(r["text"] for r in jsonl(res["out"] / "train.jsonl")) == sorted(CLEAN)


def test_drops_jsonl_has_source_reason_value_and_scrubbed_excerpt(tmp_path):
    rng = random.Random(0)
    rows = [{"text": doc(rng, 30) + " write to zhang.wei@hospital.example.cn"},
            {"text": "#### zhang.li@bank.example.cn $$$$ %%%% ^^^^ &&&& **** ~~~~ @@@@"},  # symbol_ratio
            {"text": "好"},  # too_short
            {"text": doc(rng, 30)}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    res = prep([tmp_path / "d.jsonl"], tmp_path / "out")
    rep, out = res["report"], res["out"]
    assert rep["pii"]["counts"] == {"EMAIL": 2}  # the dropped record's address is counted too
    drops = jsonl(out / "drops.jsonl")
    assert [(d["source"], d["reason"]) for d in drops] == [("d.jsonl:2", "symbol_ratio"), ("d.jsonl:3", "too_short")]
    sym = drops[0]
    text = rows[1]["text"]
    expected = sum(1 for c in text if not c.isalnum() and not c.isspace()) / len(text)  # counted here, by hand
    assert sym["limit"] == 0.3 and abs(sym["value"] - expected) < 1e-4 and sym["detail"].startswith("symbol ratio ")
    assert "zhang.li" not in sym["text"] and "<EMAIL>" in sym["text"]
    assert drops[1]["value"] == 3 and drops[1]["limit"] == 20
    # the report shows them, and still holds no PII value
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "d.jsonl:2" in md and "symbol ratio" in md and "zhang.li" not in md
    assert rep["drops"]["examples"]["too_short"][0]["source"] == "d.jsonl:3"


def test_classification_losses_per_class_conflicting_labels_and_splits(tmp_path):
    rng = random.Random(1)
    a = [doc(rng, 25) for _ in range(20)]
    b = [doc(rng, 25) for _ in range(10)]
    rows = [(t, "alpha") for t in a] + [(t, "beta") for t in b] + [(t.upper(), "beta") for t in b]  # beta: half dups
    rows += [(t, "gamma") for t in a[:3]]  # copies of alpha records labelled otherwise
    (tmp_path / "t.csv").write_text("text,team\n" + "\n".join(f'"{t}",{lab}' for t, lab in rows) + "\n")
    res = prep([tmp_path / "t.csv"], tmp_path / "out", "kind=classification", "fields.label=team", "split.val=0.3",
               "dedup.near=false")
    lab = res["report"]["labels"]
    assert lab["by_class"]["beta"] == {"read": 20, "kept": 10, "dropped": {"exact_duplicate": 10}, "lost_fraction": 0.5}
    assert lab["by_class"]["gamma"] == {"read": 3, "kept": 0, "dropped": {"exact_duplicate": 3}, "lost_fraction": 1.0}
    assert lab["by_class"]["alpha"]["lost_fraction"] == 0.0
    assert lab["conflicting_duplicates"]["count"] == 3
    assert lab["conflicting_duplicates"]["pairs"] == [{"kept": "alpha", "dropped": "gamma", "count": 3}]
    ex = lab["conflicting_duplicates"]["examples"][0]
    assert ex["kept_label"] == "alpha" and ex["label"] == "gamma" and ex["kept"] == "t.csv:2"
    w = " ".join(res["report"]["warnings"])
    assert "'beta' lost 10 of its 20" in w and "'gamma' lost all its 3" in w and "another label" in w
    # labels per split, counted from the written split files
    for split in ("train", "val"):
        recs = jsonl(res["out"] / f"{split}.jsonl")
        counts = {k: sum(1 for r in recs if r["label"] == k) for k in ("alpha", "beta")}
        assert lab["by_split"][split] == {k: v for k, v in counts.items() if v}
    md = (res["out"] / "report.md").read_text()
    assert "| label | train | val | total | read | lost | lost to |" in md and "| alpha | gamma | 3 |" in md


def test_encrypted_dataset_has_no_plaintext_samples(tmp_path, monkeypatch):
    from homeforge.security import crypto, keys

    monkeypatch.setenv("HOMEFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HOMEFORGE_KEY_FILE", raising=False)
    monkeypatch.delenv("HOMEFORGE_KEY", raising=False)
    keys.init_key()
    monkeypatch.setenv("HOMEFORGE_ENCRYPT", "1")
    rng = random.Random(2)
    secret_text = "#### classified-marker-xyz $$$$ %%%% ^^^^ &&&& **** ~~~~"
    rows = [{"text": doc(rng, 30)} for _ in range(4)] + [{"text": secret_text}]
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = prep([tmp_path / "e.jsonl"], tmp_path / "out")["out"]
    assert crypto.is_encrypted(out / "drops.jsonl")
    plain = [p for p in out.rglob("*") if p.is_file() and not crypto.is_encrypted(p)]
    assert not any(b"classified-marker" in p.read_bytes() for p in plain)  # report, manifest, index: no excerpt
    with crypto.open_text(out / "drops.jsonl") as f:
        drops = [json.loads(x) for x in f]
    assert drops[0]["reason"] == "symbol_ratio" and "classified-marker" in drops[0]["text"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["drops"]["examples"]["symbol_ratio"][0]["source"] == "e.jsonl:5"
    assert "text" not in rep["drops"]["examples"]["symbol_ratio"][0]


def test_missing_label_is_an_error_naming_file_and_line_unless_asked_to_drop(tmp_path):
    rng = random.Random(3)
    rows = [{"text": doc(rng, 20), "label": "x" if i % 2 else "y"} for i in range(6)]
    del rows[2]["label"]
    rows[4]["label"] = " "
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    r = cli("prepare", tmp_path / "t.jsonl", "--kind", "classification", "-o", tmp_path / "out", "workers=1")
    assert r.returncode == 2 and "t.jsonl:3" in r.stderr and "fields.missing_label=drop" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    res = prep([tmp_path / "t.jsonl"], tmp_path / "out", "kind=classification", "fields.missing_label=drop")
    drops = jsonl(res["out"] / "drops.jsonl")
    assert [(d["source"], d["reason"]) for d in drops] == [("t.jsonl:3", "missing_label"), ("t.jsonl:5", "missing_label")]
    assert res["report"]["records"]["dropped"] == {"missing_label": 2} and res["report"]["records"]["out"] == 4


def test_chat_without_a_length_bound_is_refused(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi there friend"},
                                                               {"role": "assistant", "content": "hello to you"}]}))
    with pytest.raises(HomeforgeError, match="clean.max_chars"):
        prep([tmp_path / "c.jsonl"], tmp_path / "out", "kind=chat", "clean.max_chars=0")
    assert not (tmp_path / "out").exists()


def test_bert_like_encoder_tokenizer_for_classification_then_train(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rng = random.Random(4)
    rows = [{"text": doc(rng, 12) + (" ward nurse" if i % 2 else " loan audit"), "label": "care" if i % 2 else "bank"}
            for i in range(40)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    enc = bert_like_dir(tmp_path / "encoder", [r["text"] for r in rows], with_model=True)
    oracle = AutoTokenizer.from_pretrained(str(enc))
    assert oracle.eos_token_id is None and oracle.cls_token_id is not None
    code, text = cli_inproc("prepare", tmp_path / "t.jsonl", "--kind", "classification", "--tokenizer-from", enc,
                            "-o", tmp_path / "ds", "workers=1", "split.val=0.2")
    assert code == 0, text
    ds = tmp_path / "ds"
    recs, toks = jsonl(ds / "train.jsonl"), jsonl(ds / "train.tokens.jsonl")
    for rec, t in zip(recs, toks, strict=True):
        assert t["input_ids"] == oracle(rec["text"], truncation=True, max_length=64)["input_ids"]
        assert t["input_ids"][0] == oracle.cls_token_id and t["input_ids"][-1] == oracle.sep_token_id
    idx = json.loads((ds / "index.json").read_text())
    assert idx["eos_id"] is None and idx["pad_id"] == oracle.pad_token_id and idx["max_length"] == 64
    code, text = cli_inproc("train", "--data", ds, "--output", tmp_path / "run", "method=classify", f"model.path={enc}",
                            "max_steps=3", "seq_len=64", "micro_batch_size=4", "eval_every=3", "eval_batches=1",
                            "checkpoint.every=0", "threads=1", "tracking.tensorboard=false")
    assert code == 0, text
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "run" / "model"))
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.id2label == {0: "bank", 1: "care"}
