"""End-to-end `homeforge prepare` on generated corpora (real files of every format)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from homeforge import artifacts
from homeforge.config import PrepareConfig, load_config
from homeforge.data.prepare import run
from homeforge.errors import HomeforgeError

from .fixtures import card, cn_id, doc, make_corpus

QUIET = Console(quiet=True)
BASE = ["tokenizer.vocab_size=400", "workers=1", "split.val=0.1", "pii.terms=[Lin Wei]"]


def prep(inputs, out, *extra, **kw):
    cfg = load_config(PrepareConfig, overrides=[f"inputs={json.dumps([str(i) for i in inputs])}",
                                                f"output_dir={out}", *BASE, *extra])
    return run(cfg, console=QUIET, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    inj = make_corpus(root / "in")
    res = prep([root / "in"], root / "out")
    return root, inj, res


def test_counts_dups_pii_and_problems(corpus):
    root, inj, res = corpus
    out = root / "out"
    rep = json.loads((out / "report.json").read_text())
    r = rep["records"]
    assert r["in"] == inj["good_docs"] + inj["exact"] + inj["near"] + inj["malformed_lines"]
    assert r["dropped"] == {"exact_duplicate": inj["exact"], "near_duplicate": inj["near"], "malformed_json": 1}
    assert r["out"] == inj["good_docs"] == sum(r["splits"].values())
    assert r["in"] == r["out"] + sum(r["dropped"].values())  # nothing dropped silently
    assert rep["inputs"]["files_skipped"] == inj["files_skipped"]
    named = {(p["reason"], Path(p["file"]).name, p["line"]) for p in rep["problems"]}
    assert {("malformed_json", "records.jsonl", 31), ("unreadable_file", "broken.pdf", None),
            ("unknown_encoding", "latin.txt", None), ("binary_file", "garbage.txt", None)} <= named
    assert rep["pii"]["counts"] == inj["pii"]
    assert rep["dedup"]["clusters"] == inj["exact"] + inj["near"]
    drops = [json.loads(x) for x in (out / "drops.jsonl").read_text().splitlines()]
    dedup = [d for d in drops if d["stage"] == "dedup"]
    assert sorted(d["reason"] for d in dedup) == ["exact_duplicate"] * 3 + ["near_duplicate"] * 2
    assert all(d["kept"].endswith((":2", ":3", ":4", ":6", ":7")) for d in dedup)  # first copies kept
    assert all(d["limit"] == 0.8 and 0.8 <= d["value"] < 1 for d in dedup if d["reason"] == "near_duplicate")
    # one place to look: every record counted as dropped is listed, and the files skipped
    listed = Counter(d["reason"] for d in drops if not d.get("file_skipped"))
    assert listed == Counter(r["dropped"])
    assert {d["source"] for d in drops if d.get("file_skipped")} == {"in/broken.pdf", "in/latin.txt", "in/garbage.txt"}
    assert any({"source": "in/records.jsonl:31", "reason": "malformed_json"}.items() <= d.items() for d in drops)
    assert any(p["a"] == "dose_mg" and p["b"] == "dose_g" for p in rep["tabular"]["in/table.csv"])
    # the cleaned records: no valid PII value anywhere, invalid-checksum numbers intact
    text = "".join((out / f"{s}.jsonl").read_text() for s in ("train", "val") if (out / f"{s}.jsonl").exists())
    for value in (cn_id(1), card(2), "zhang.wei@hospital.example.cn", "13912345678", "62345678", "7946 0958",
                  "58.217.200.37", "8a2e:370:7334", "s3cret", "Lin Wei"):
        assert value not in text
    for bad in inj["bad_numbers"]:
        assert bad in text
    assert "<CN_ID>" in text and "<NAME>" in text
    # PII values never reach a report, log or manifest
    blob = (out / "report.md").read_text() + (out / "report.json").read_text() + (out / "homeforge.json").read_text()
    assert cn_id(1) not in blob and "zhang.wei" not in blob
    for name in ("lengths.png", "report.md", "tokenizer/tokenizer.json"):
        assert (out / name).stat().st_size > 500


def test_text_shards_match_records(corpus):
    root, _, _ = corpus
    out = root / "out"
    from homeforge.data.shards import load_tokens, read_index
    from homeforge.models.io import load_tokenizer

    artifacts.verify(out)
    idx = read_index(out)
    tok = load_tokenizer(out / "tokenizer")
    assert idx["kind"] == "text" and idx["eos_id"] == tok.eos_token_id and idx["vocab_size"] == len(tok)
    recs = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    toks = load_tokens(out, "train")
    starts = np.load(out / "train.docs.npy")
    assert len(starts) == len(recs) == idx["splits"]["train"]["docs"]
    first = toks[starts[0]:starts[1]].tolist()
    assert first == tok(recs[0]["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_same_inputs_same_hash_changed_inputs_new_hash(corpus, tmp_path):
    root, _, res = corpus
    first = artifacts.read_manifest(root / "out")["content_hash"]
    again = prep([root / "in"], tmp_path / "again", "workers=2")  # other workers, other dir: same dataset
    assert artifacts.read_manifest(again["out"])["content_hash"] == first
    assert prep([root / "in"], root / "out")["skipped"]
    (root / "in" / "notes.md").write_text(doc(__import__("random").Random(9)), encoding="utf-8")
    try:
        changed = prep([root / "in"], tmp_path / "changed")
        assert artifacts.read_manifest(changed["out"])["content_hash"] != first
    finally:
        make_corpus(root / "in")


def test_strict_names_file_and_line_and_writes_nothing(tmp_path):
    make_corpus(tmp_path / "in")
    with pytest.raises(HomeforgeError) as e:
        prep([tmp_path / "in"], tmp_path / "out", "strict=true")
    assert "records.jsonl:31" in str(e.value) or "broken.pdf" in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_check_only_writes_nothing(tmp_path):
    make_corpus(tmp_path / "in")
    res = prep([tmp_path / "in"], tmp_path / "out", check_only=True)
    assert res["out"] is None and res["report"]["records"]["dropped"]["exact_duplicate"] == 3
    assert not (tmp_path / "out").exists()


def test_chinese_near_duplicates_use_character_shingles(tmp_path):
    base = "患者入院后进行了全面检查，医生根据检查结果制定了治疗方案，护士每天记录体温和血压的变化情况。" * 3
    near = base[:-6] + "情况良好。"
    other = "工厂生产线今天完成了设备维护，质量检查人员对每一批产品进行了抽样检验并填写报告。" * 3
    (tmp_path / "zh.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in (base, other, near)))
    rep = prep([tmp_path / "zh.jsonl"], tmp_path / "out", "split.val=0", check_only=True)["report"]
    assert rep["dedup"]["near_duplicates"] == 1 and rep["records"]["out"] == 2


def test_classification_labels_and_one_class_error(tmp_path):
    import random

    rng = random.Random(0)
    rows = ["text,team"] + [f"\"{doc(rng, 20)}\",{'billing' if i % 4 else 'fraud'}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    res = prep([tmp_path / "t.csv"], tmp_path / "out", "kind=classification", "fields.label=team",
               "report.min_class_fraction=0.3")
    out = res["out"]
    assert json.loads((out / "labels.json").read_text()) == ["billing", "fraud"]
    rep = res["report"]
    assert rep["labels"]["counts"] == {"billing": 30, "fraud": 10}
    assert any("fraud" in w for w in rep["warnings"]) and (out / "labels.png").exists()
    rec = json.loads((out / "train.tokens.jsonl").read_text().splitlines()[0])
    assert rec["label"] in (0, 1) and len(rec["input_ids"]) > 5
    (tmp_path / "one.csv").write_text("text,team\n" + "\n".join(f"\"{doc(rng, 20)}\",ops" for _ in range(10)) + "\n")
    with pytest.raises(HomeforgeError, match="1 class"):
        prep([tmp_path / "one.csv"], tmp_path / "out1", "kind=classification", "fields.label=team")
    assert not (tmp_path / "out1").exists()
    with pytest.raises(HomeforgeError, match="no column 'body'") as e:
        prep([tmp_path / "t.csv"], tmp_path / "out2", "kind=classification", "fields.text=body")
    assert "text, team" in str(e.value)


def test_chat_shapes_and_loss_mask(tmp_path):
    import random

    rng = random.Random(1)
    rows = []
    for i in range(12):
        q, a = doc(rng, 12), doc(rng, 15)
        if i % 3 == 0:
            rows.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                                      {"role": "assistant", "content": a}]})
        elif i % 3 == 1:
            rows.append({"instruction": q, "input": "", "output": a})
        else:
            rows.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    rows.append({"prompt": "no chat shape here"})
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    res = prep([tmp_path / "c.jsonl"], tmp_path / "out", "kind=chat", "split.val=0")
    out = res["out"]
    assert res["report"]["records"]["dropped"] == {"bad_chat_record": 1}
    from homeforge.models.io import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    recs = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    toks = [json.loads(x) for x in (out / "train.tokens.jsonl").read_text().splitlines()]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for rec, t in zip(recs, toks, strict=True):
        ids, mask = t["input_ids"], t["loss_mask"]
        assert len(ids) == len(mask) and tok.decode(ids) == tok.apply_chat_template(rec["messages"], tokenize=False)
        learned = [i for i, m in zip(ids, mask, strict=True) if m]
        answer = next(m["content"] for m in rec["messages"] if m["role"] == "assistant")
        assert learned[-1] == im_end and tok.decode(learned[:-1]) == answer
        assert sum(1 for i, m in zip(ids, mask, strict=True) if m and i == im_end) == 1


def test_augmentation_is_seeded(tmp_path):
    import random

    rng = random.Random(2)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": doc(rng, 30)}) for _ in range(20)))
    (tmp_path / "syn.txt").write_text("river,stream\nstone,rock\n")
    extra = ["augment.enabled=true", "augment.copies=2", f"augment.synonyms_file={tmp_path / 'syn.txt'}", "split.val=0"]
    a = prep([tmp_path / "a.jsonl"], tmp_path / "o1", *extra)
    b = prep([tmp_path / "a.jsonl"], tmp_path / "o2", *extra)
    assert a["report"]["augmented"] == 40
    la = (a["out"] / "train.jsonl").read_text().splitlines()
    assert la == (b["out"] / "train.jsonl").read_text().splitlines() and len(la) == 60
    assert sum(json.loads(x).get("augmented", False) for x in la) == 40


def test_cli_prepare_bad_input(tmp_path):
    def hf(*args):
        return subprocess.run([sys.executable, "-m", "homeforge", *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "200"})

    r = hf("prepare", "--help")
    assert r.returncode == 0 and "Examples" in r.stdout and "--check-only" in r.stdout
    (tmp_path / "empty").mkdir()
    r = hf("prepare", tmp_path / "empty", "-o", tmp_path / "out")
    assert r.returncode == 2 and "no input files" in r.stderr and "Traceback" not in r.stderr
    r = hf("prepare", tmp_path / "empty", "clean.min_charz=3")
    assert r.returncode == 2 and "min_charz" in r.stderr
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": doc(__import__("random").Random(3), 30)}) + "\n{oops\n")
    r = hf("prepare", tmp_path / "x.jsonl", "--check-only", "--strict")
    assert r.returncode == 2 and "x.jsonl:2" in r.stderr
    r = hf("prepare", tmp_path / "x.jsonl", "--check-only", "split.val=0")
    assert r.returncode == 0 and "malformed_json" in r.stdout and "Dataset report" in r.stdout
    assert not (tmp_path / "out").exists()


def test_tokenizer_from_model_dir_uses_its_chat_template(tmp_path, tiny_dataset):
    """A model dir with another template (Zephyr-like, EOS closes a turn): mask follows that template."""
    from homeforge.models.io import load_tokenizer

    tok = load_tokenizer(tiny_dataset / "tokenizer")  # a private copy: the session fixture stays untouched
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
                         "{% endfor %}")
    tok.save_pretrained(str(tmp_path / "model"))
    rows = [{"messages": [{"role": "user", "content": f"question number {i} about the ward"},
                          {"role": "assistant", "content": f"answer number {i} about the clinic"}]} for i in range(6)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    res = prep([tmp_path / "c.jsonl"], tmp_path / "out", "kind=chat", "split.val=0", "dedup.near=false",
               f"tokenizer.from_dir={tmp_path / 'model'}")
    t2 = load_tokenizer(res["out"] / "tokenizer")
    assert t2.get_vocab() == load_tokenizer(tmp_path / "model").get_vocab() and "eos_token" in t2.chat_template
    recs = [json.loads(x) for x in (res["out"] / "train.jsonl").read_text().splitlines()]
    toks = [json.loads(x) for x in (res["out"] / "train.tokens.jsonl").read_text().splitlines()]
    for rec, t in zip(recs, toks, strict=True):
        learned = [i for i, m in zip(t["input_ids"], t["loss_mask"], strict=True) if m]
        assert learned[-1] == t2.eos_token_id and t2.decode(learned[:-1]) == rec["messages"][1]["content"]


def test_pseudonym_needs_secret_and_is_stable(tmp_path, monkeypatch):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": f"write to ops{i % 2}@harbor-bank.com about the loan "
                                                                    f"ledger batch {i} and the audit report"}) for i in range(6)))
    monkeypatch.delenv("HOMEFORGE_PII_SECRET", raising=False)
    with pytest.raises(HomeforgeError, match="HOMEFORGE_PII_SECRET"):
        prep([tmp_path / "p.jsonl"], tmp_path / "o", "pii.mode=pseudonym", "dedup.near=false")
    monkeypatch.setenv("HOMEFORGE_PII_SECRET", "x" * 32)
    rep = prep([tmp_path / "p.jsonl"], tmp_path / "o", "pii.mode=pseudonym", "dedup.near=false", "split.val=0")
    text = (rep["out"] / "train.jsonl").read_text()
    assert rep["report"]["pii"]["counts"] == {"EMAIL": 6} and "harbor-bank" not in text
    assert len(set(__import__("re").findall(r"<EMAIL_[0-9a-f]{10}>", text))) == 2
    assert "x" * 32 not in (rep["out"] / "homeforge.json").read_text()


def test_dataset_hash_does_not_depend_on_cwd(tmp_path, monkeypatch):
    make_corpus(tmp_path / "data" / "in")
    a = prep([tmp_path / "data" / "in"], tmp_path / "a", "dedup.near=false", check_only=False)
    monkeypatch.chdir(tmp_path / "data")
    b = prep(["in"], tmp_path / "b", "dedup.near=false")
    assert artifacts.read_manifest(a["out"])["content_hash"] == artifacts.read_manifest(b["out"])["content_hash"]


def test_parquet_missing_field_and_unsupported_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a b c d e f g"] * 3}), tmp_path / "t.parquet")
    with pytest.raises(HomeforgeError, match="no column 'text'") as e:
        prep([tmp_path / "t.parquet"], tmp_path / "o")
    assert "body" in str(e.value) and "t.parquet" in str(e.value)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(doc(__import__("random").Random(4), 40))
    (tmp_path / "d" / "b.xyz").write_text("what is this")
    rep = prep([tmp_path / "d"], tmp_path / "o2", "split.val=0", check_only=True)["report"]
    assert rep["inputs"]["files_skipped"] == {"unsupported_format": 1} and rep["records"]["out"] == 1


def test_encodings_bom_and_bad_bytes_mid_file(tmp_path):
    import random

    rng = random.Random(5)
    rows = [json.dumps({"text": "患者 " + doc(rng, 25)}, ensure_ascii=False) for _ in range(3)]
    (tmp_path / "gb.jsonl").write_bytes("\n".join(rows).encode("gb18030"))
    (tmp_path / "u16.jsonl").write_bytes("\n".join(rows[:1]).encode("utf-16"))  # with BOM
    big = [json.dumps({"text": doc(rng, 40)}) for _ in range(300)]  # > 64 KiB before the bad line
    (tmp_path / "late.jsonl").write_bytes(("\n".join(big) + "\n").encode() + b'{"text": "\xff\xfe bad"}\n' + big[0].encode())
    rep = prep([tmp_path], tmp_path / "o", "encodings=[utf-8,gb18030]", "dedup.near=false", "dedup.exact=false",
               "split.val=0", check_only=True)["report"]
    r = rep["records"]
    assert r["in"] == 3 + 1 + 300 + 1 + 1 and r["dropped"]["unknown_encoding"] == 1 and not rep["inputs"]["files_skipped"]
    assert r["in"] == r["out"] + sum(r["dropped"].values())
    bad = [p for p in rep["problems"] if p["reason"] == "unknown_encoding"]
    assert len(bad) == 1 and bad[0]["file"].endswith("late.jsonl") and bad[0]["line"] == 301
