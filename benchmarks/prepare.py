"""Benchmark: `homeforge prepare` vs an equivalent datatrove pipeline, side by side.

A generated corpus (Zipf-distributed pseudo-words, ~150 words/doc) with injected exact
duplicates (5%), near duplicates (5%) and PII (10%: e-mails, IPs, phones, IDs). Both run
the full pipeline on it: quality filters + PII scrubbing + MinHash near-dedup + tokenize
with the same pre-trained byte-level BPE (trained once, outside the timing).

- homeforge: `homeforge prepare DIR --tokenizer-from TOK workers=2 split.val=0.01`
  (clean + quality filters + exact + near dedup + PII + split + tokenize + report).
- datatrove: JsonlReader -> GopherRepetitionFilter + GopherQualityFilter -> PIIFormatter
  -> JsonlWriter; MinhashDedupSignature -> Buckets -> Cluster -> Filter ->
  DocumentTokenizer (its documented 4-stage MinHash recipe), 2 workers.

Each run is its own subprocess; peak RSS is the peak of the summed RSS of its process
tree, sampled every 50 ms. Rounds alternate the two tools; medians and ratios are printed.
Peak RSS is measured at 1x and 4x the corpus size (goal: flat, 4x/1x <= 1.2).

    python benchmarks/prepare.py --quick          # ~5k docs, one round (smoke test)
    python benchmarks/prepare.py                  # 200k docs, 3 rounds, + 4x RSS runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable


# --------------------------------------------------------------------------- corpus


def make_corpus(root: Path, n_docs: int, seed: int = 0, n_files: int = 8) -> None:
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "di", "fe", "go", "hu", "ja", "be", "co"]
    stop = ["the", "of", "and", "to", "in", "that", "with", "for", "is", "on", "was", "have", "be", "this", "from"]
    vocab = stop + ["".join(rng.choice(syll) for _ in range(rng.randint(2, 4))) for _ in range(6000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    root.mkdir(parents=True, exist_ok=True)
    files = [open(root / f"part{i:02d}.jsonl", "w", encoding="utf-8") for i in range(n_files)]
    recent: list[str] = []
    for i in range(n_docs):
        r = rng.random()
        if r < 0.05 and recent:
            text = rng.choice(recent)  # exact duplicate
        elif r < 0.10 and recent:
            ws = rng.choice(recent).split(" ")
            for _ in range(2):  # 2 of 80-220 words: word 5-gram Jaccard ~0.85-0.94
                ws[rng.randrange(len(ws))] = rng.choice(vocab)
            text = " ".join(ws)  # near duplicate
        else:
            n = rng.randint(80, 220)
            ws = rng.choices(vocab, weights, k=n)
            sentences = []
            for k in range(0, n, 15):
                s = " ".join(ws[k:k + 15])
                sentences.append(s[:1].upper() + s[1:] + ".")
            text = " ".join(sentences)
            if rng.random() < 0.10:
                pii = rng.choice([f"user{i}@mail.example.com", f"10.{i % 250}.{(i // 250) % 250}.7",
                                  f"+86 139{i % 10**8:08d}", "11010519491231002X"])
                text += f" Contact {pii} for details."
            recent.append(text)
            if len(recent) > 500:
                recent.pop(rng.randrange(len(recent)))
        files[i % n_files].write(json.dumps({"text": text, "id": str(i)}) + "\n")
    for f in files:
        f.close()


def make_tokenizer(corpus: Path, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from homeforge.data.tokenizer import train_bpe

    def texts():
        with open(corpus / "part00.jsonl", encoding="utf-8") as f:
            for k, line in enumerate(f):
                if k >= 5000:
                    break
                yield json.loads(line)["text"]

    tok = train_bpe(texts(), vocab_size=8192)
    tok.save_pretrained(str(out))


# --------------------------------------------------------------------------- the two sides (child processes)


def run_homeforge(corpus: Path, tok: Path, work: Path) -> int:
    cmd = [PY, "-m", "homeforge", "prepare", str(corpus), "-o", str(work / "hf-out"), "--tokenizer-from", str(tok),
           "--force", "workers=2", "split.val=0.01"]
    env = {**os.environ, "COLUMNS": "120", "TERM": "dumb"}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    rep = json.loads((work / "hf-out" / "report.json").read_text())
    return rep["records"]["out"]


def run_datatrove(corpus: Path, tok: Path, work: Path) -> int:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    w = work / "dt"
    shutil.rmtree(w, ignore_errors=True)
    tasks, workers = 8, 2
    mh = MinhashConfig()
    common = dict(tasks=tasks, workers=workers, start_method="spawn")
    s0 = LocalPipelineExecutor([JsonlReader(str(corpus)), GopherRepetitionFilter(), GopherQualityFilter(min_doc_words=20),
                                PIIFormatter(), JsonlWriter(str(w / "clean"))], logging_dir=str(w / "logs0"), **common)
    s1 = LocalPipelineExecutor([JsonlReader(str(w / "clean")), MinhashDedupSignature(str(w / "sigs"), config=mh)],
                               logging_dir=str(w / "logs1"), depends=s0, **common)
    s2 = LocalPipelineExecutor([MinhashDedupBuckets(str(w / "sigs"), str(w / "buckets"), config=mh)],
                               tasks=mh.num_buckets, workers=workers, start_method="spawn", logging_dir=str(w / "logs2"),
                               depends=s1)
    s3 = LocalPipelineExecutor([MinhashDedupCluster(str(w / "buckets"), str(w / "remove"), config=mh)],
                               tasks=1, workers=1, start_method="spawn", logging_dir=str(w / "logs3"), depends=s2)
    s4 = LocalPipelineExecutor([JsonlReader(str(w / "clean")), MinhashDedupFilter(str(w / "remove")),
                                DocumentTokenizer(str(w / "tokens"), str(tok / "tokenizer.json"), eos_token="<|endoftext|>",
                                                  shuffle_documents=False)],
                               logging_dir=str(w / "logs4"), depends=s3, **common)
    s4.run()
    kept = 0
    for stats in (w / "logs4" / "stats").glob("*.json"):
        for step in json.loads(stats.read_text()):
            if "MinHash stage 4" in step["name"]:
                kept += int(step["stats"].get("forwarded", 0))
    return kept


def child(args) -> None:
    import logging

    logging.disable(logging.WARNING)
    os.environ.setdefault("LOGURU_LEVEL", "ERROR")
    t0 = time.perf_counter()
    fn = run_homeforge if args.child == "homeforge" else run_datatrove
    kept = fn(Path(args.corpus), Path(args.tok), Path(args.work))
    print(json.dumps({"seconds": time.perf_counter() - t0, "kept": kept}))


# --------------------------------------------------------------------------- parent


def measure(tool: str, corpus: Path, tok: Path, work: Path) -> dict:
    import psutil

    p = subprocess.Popen([PY, __file__, "--child", tool, "--corpus", str(corpus), "--tok", str(tok), "--work", str(work)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "LOGURU_LEVEL": "ERROR"})
    proc = psutil.Process(p.pid)
    peak = 0
    while p.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = p.stdout.read()
    if p.returncode != 0:
        raise SystemExit(f"{tool} failed (exit {p.returncode}); rerun the child by hand to see why")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = peak / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~5k docs, one round, no 4x run (smoke test)")
    ap.add_argument("--docs", type=int, default=None, help="documents at 1x (default 200000; --quick 5000)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; --quick 1)")
    ap.add_argument("--no-peer-4x", action="store_true",
                    help="run only homeforge at 4x (the flat-memory goal is ours; datatrove at 4x takes ~30 min here)")
    ap.add_argument("--child", choices=["homeforge", "datatrove"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--tok", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    n = args.docs or (5000 if args.quick else 200_000)
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="hf-bench-prepare-") as tmp:
        tmp = Path(tmp)
        print(f"generating {n:,} documents (+ {4 * n:,} for the 4x memory run)" if not args.quick else f"generating {n:,} documents")
        make_corpus(tmp / "c1", n)
        make_tokenizer(tmp / "c1", tmp / "tok")
        res: dict[str, list[dict]] = {"homeforge": [], "datatrove": []}
        for r in range(rounds):
            order = ("homeforge", "datatrove") if r % 2 == 0 else ("datatrove", "homeforge")
            for tool in order:
                m = measure(tool, tmp / "c1", tmp / "tok", tmp / "w")
                res[tool].append(m)
                print(f"round {r + 1} {tool:10s} {m['seconds']:7.1f}s  {n / m['seconds']:8.0f} docs/s  "
                      f"peak RSS {m['peak_rss_mb']:7.0f} MB  kept {m['kept']:,}")
        med = {t: statistics.median(x["seconds"] for x in v) for t, v in res.items()}
        rss1 = {t: max(x["peak_rss_mb"] for x in v) for t, v in res.items()}
        print(f"\n1x ({n:,} docs): homeforge {n / med['homeforge']:.0f} docs/s, datatrove {n / med['datatrove']:.0f} docs/s, "
              f"speed ratio homeforge/datatrove = {med['datatrove'] / med['homeforge']:.2f}x")
        if not args.quick:
            make_corpus(tmp / "c4", 4 * n, seed=1)
            for tool in ("homeforge",) if args.no_peer_4x else ("homeforge", "datatrove"):
                m = measure(tool, tmp / "c4", tmp / "tok", tmp / "w4")
                print(f"4x {tool:10s} {m['seconds']:7.1f}s  {4 * n / m['seconds']:8.0f} docs/s  peak RSS {m['peak_rss_mb']:7.0f} MB "
                      f"(4x/1x = {m['peak_rss_mb'] / rss1[tool]:.2f})")
        print(f"peak RSS at 1x: homeforge {rss1['homeforge']:.0f} MB, datatrove {rss1['datatrove']:.0f} MB")


if __name__ == "__main__":
    main()
