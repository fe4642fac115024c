"""Benchmark: `homeforge learn` on a two-domain sequence: naive fine-tuning vs replay vs EWC vs replay+EWC.

Real text nobody here wrote, both on this machine:

- domain A (old): Python standard-library docstrings (`builtin:stdlib-docstrings`);
- domain B (new): Debian package long descriptions from the apt lists' Translation-en files
  (`/usr/lib/apt/apt-helper cat-file`; run `apt-get update` once if there are none).

1. `homeforge prepare` A (its own BPE tokenizer) and B (with the champion's tokenizer);
2. `homeforge train` the champion on A (preset `debug` by default, `--preset tiny` for a bigger one);
3. four `homeforge learn` runs from that champion on B with the same step budget, seed and
   learning rate: naive (replay.ratio=0, ewc.lam=0), replay only, EWC only, replay+EWC;
4. per run: forgetting = old (A) held-out perplexity after - before, gain = new (B) held-out
   perplexity before - after (the figures `learn` records in the candidate's manifest).

Goal: replay+EWC cuts forgetting by >= 50% vs naive while keeping >= 80% of naive's gain.

    python benchmarks/continual.py --quick   # a smoke run (~2 min)
    python benchmarks/continual.py           # the full run (~10 min on 2 busy cores)
    python benchmarks/continual.py --preset tiny --pretrain-steps 1500   # a bigger champion (a quiet machine)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def debian_texts(folder: Path, max_chars: int) -> int:
    """Long package descriptions (one file each) from the apt lists, up to ``max_chars`` characters."""
    folder.mkdir(parents=True, exist_ok=True)
    n, total, seen = 0, 0, set()
    for p in sorted(Path("/var/lib/apt/lists").glob("*Translation-en*"), key=lambda p: -p.stat().st_size):
        r = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(p)], capture_output=True, text=True)
        for block in r.stdout.split("\n\n"):
            m = re.search(r"^Description-en: (.*?)(?=\n\S|\Z)", block, re.S | re.M)
            if not m:
                continue
            text = m.group(1).replace("\n .\n", "\n\n").replace("\n ", "\n").strip()
            if len(text) < 200 or text in seen:
                continue
            seen.add(text)
            (folder / f"{n:06d}.txt").write_text(text, encoding="utf-8")
            n, total = n + 1, total + len(text)
            if total >= max_chars:
                return n
    if n == 0:
        sys.exit("no Debian descriptions found: run `apt-get update` once to fill /var/lib/apt/lists")
    return n


def hf(work: Path, *args) -> float:
    t = time.time()
    env = {**os.environ, "HOMEFORGE_REGISTRY": str(work / "registry"), "HOMEFORGE_HOME": str(work / "home"),
           "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "homeforge", *map(str, args)], env=env, text=True, cwd=work,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"homeforge {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout[-3000:]}")
    return time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer characters and steps: a smoke run")
    ap.add_argument("--preset", default="debug", help="champion preset (default debug)")
    ap.add_argument("--chars", type=int, default=None, help="characters per domain (default 1.2M; 300k with --quick)")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="champion steps on A (default 800; 150 quick)")
    ap.add_argument("--steps", type=int, default=None, help="learn steps on B, every variant (default 200; 60 quick)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learn learning rate (every variant)")
    ap.add_argument("--ratio", type=float, default=0.3, help="replay share")
    ap.add_argument("--lam", type=float, default=None, help="EWC lambda (default 500)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1: on a shared machine 2 can be far slower)")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()
    preset = a.preset
    chars = a.chars or (300_000 if a.quick else 1_200_000)
    pre_steps = a.pretrain_steps or (150 if a.quick else 800)
    steps = a.steps or (60 if a.quick else 200)
    lam = a.lam if a.lam is not None else 500.0
    work = a.work or Path(tempfile.mkdtemp(prefix="homeforge-continual-"))
    work.mkdir(parents=True, exist_ok=True)
    common = [f"threads={a.threads}", "seq_len=128", "micro_batch_size=8", "tracking.tensorboard=false"]
    t0 = time.time()
    n_b = debian_texts(work / "debian", chars)
    print(f"work: {work}; domain B: {n_b} Debian descriptions", flush=True)
    times = {}
    times["prepare A"] = hf(work, "prepare", "builtin:stdlib-docstrings", "--output", "dsA",
                            f"max_builtin_chars={chars}", "tokenizer.vocab_size=2048", "workers=1", "split.val=0.1")
    times["train champion"] = hf(work, "train", "--data", "dsA", "--output", "champion", f"model.preset={preset}",
                                 f"max_steps={pre_steps}", "optim.lr=3e-3", "eval_every=200", "checkpoint.every=0",
                                 *common)
    times["prepare B"] = hf(work, "prepare", "debian", "--output", "dsB", "tokenizer.from_dir=champion/model",
                            "workers=1", "split.val=0.1")
    variants = {"naive": ("replay.ratio=0", "ewc.lam=0"), "replay": (f"replay.ratio={a.ratio}", "ewc.lam=0"),
                "ewc": ("replay.ratio=0", f"ewc.lam={lam}"), "replay+ewc": (f"replay.ratio={a.ratio}", f"ewc.lam={lam}")}
    rows = {}
    for name, opts in variants.items():
        out = f"learn-{name.replace('+', '-')}"
        times[name] = hf(work, "learn", "champion/model", "--data", "dsB", "--output", out, *opts,
                         f"train.max_steps={steps}", f"train.optim.lr={a.lr}", "eval_batches=40", "ewc.samples=64",
                         *(f"train.{c}" for c in common))
        m = json.loads((work / out / "model" / "homeforge.json").read_text())["metrics"]
        rows[name] = {k: m[k] for k in ("old_ppl_before", "old_ppl_after", "new_ppl_before", "new_ppl_after",
                                        "forgetting", "gain")}
        print(name, json.dumps(rows[name]), f"{times[name]:.0f}s", flush=True)
    naive = rows["naive"]
    print(f"\npreset {preset}, {chars:,} chars per domain, champion {pre_steps} steps, learn {steps} steps at "
          f"lr {a.lr}, replay {a.ratio}, EWC lambda {lam:g}\n")
    print("| variant | old ppl before -> after | forgetting | vs naive | new ppl before -> after | gain | vs naive | "
          "time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        fr = r["forgetting"] / naive["forgetting"] if naive["forgetting"] > 0 else float("nan")
        gr = r["gain"] / naive["gain"] if naive["gain"] > 0 else float("nan")
        print(f"| {name} | {r['old_ppl_before']:.2f} -> {r['old_ppl_after']:.2f} | {r['forgetting']:+.2f} | "
              f"{fr:.0%} | {r['new_ppl_before']:.2f} -> {r['new_ppl_after']:.2f} | {r['gain']:+.2f} | {gr:.0%} | "
              f"{times[name]:.0f} s |")
    best = rows["replay+ewc"]
    cut = 1 - best["forgetting"] / naive["forgetting"] if naive["forgetting"] > 0 else float("nan")
    kept = best["gain"] / naive["gain"] if naive["gain"] > 0 else float("nan")
    ok = cut >= 0.5 and kept >= 0.8
    print(f"\nreplay+EWC: forgetting cut by {cut:.0%} (goal >= 50%), gain kept {kept:.0%} (goal >= 80%): "
          f"{'MET' if ok else 'NOT MET'}; total {time.time() - t0:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "times": times, "cut": cut, "kept": kept, "met": ok}, indent=2))


if __name__ == "__main__":
    main()
