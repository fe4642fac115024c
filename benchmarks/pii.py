"""Benchmark: the PII scrubber's throughput and accuracy, phone validation by rules vs `phonenumbers`.

Corpora (all in memory, timed per call of ``scrub``):
- English, mostly PII-free: docstrings of the running interpreter's standard library;
- Chinese, mostly PII-free: Debian's `fortunes-zh` (Debian tips, Tang and Song poems), fetched with
  `apt-get download` into ~/.cache/homeforge (falls back to generated Chinese prose when apt cannot);
- PII-dense: the seeded benchmark of tests/data/pii_bench.py (identifiers and decoys).

Scrubbers: homeforge with phone validation by our rules (the default) and by `phonenumbers`;
optionally an older pii.py given with --baseline (e.g. `git show main~N:src/homeforge/data/pii.py`),
and datatrove's PIIFormatter (e-mail and IP only) when datatrove is installed (`homeforge[bench]`).
Rounds alternate the scrubbers; medians of characters per second and ratios are printed, then
recall per type and decoys untouched on the benchmark for each scrubber.

    python benchmarks/pii.py --quick
    python benchmarks/pii.py --baseline /tmp/pii_old.py
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path.home() / ".cache" / "homeforge" / "fortunes-zh"


def chinese_corpus(max_chars: int) -> tuple[list[str], str]:
    fort = CACHE / "x" / "usr" / "share" / "games" / "fortunes"
    if not fort.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["apt-get", "download", "fortunes-zh"], cwd=CACHE, check=True, capture_output=True, timeout=300)
            deb = next(CACHE.glob("fortunes-zh_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(CACHE / "x")], check=True, capture_output=True)
        except (OSError, subprocess.SubprocessError, StopIteration):
            pass
    docs: list[str] = []
    if fort.is_dir():
        for name in ("chinese", "tang300", "song100"):
            text = re.sub(r"\x1b\[[0-9;]*m", "", (fort / name).read_text(encoding="utf-8", errors="replace"))
            docs += [d.strip() for d in text.split("\n%\n") if d.strip()]
        source = "Debian fortunes-zh"
    else:
        from tests.data.pii_bench import ZH_FILLERS

        rng = random.Random(0)
        words = "我们今天在医院完成了系统升级工作人员对数据进行了整理并且确认所有记录都已经归档"
        docs = ["".join(rng.choice(words) for _ in range(200)) + rng.choice(ZH_FILLERS) for _ in range(4000)]
        source = "generated Chinese prose (apt could not fetch fortunes-zh)"
    out, n = [], 0
    for d in docs:
        out.append(d)
        n += len(d)
        if n >= max_chars:
            break
    return out, source


def english_corpus(max_chars: int) -> list[str]:
    from homeforge.data.corpus import stdlib_docstrings

    return stdlib_docstrings(max_chars)


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("pii_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Scrubber()


def datatrove_scrub():
    try:
        from datatrove.pipeline.formatters.pii import PIIFormatter
    except ImportError:
        return None
    f = PIIFormatter()

    def scrub(text: str):
        return f.format(text), None
    return scrub


def time_corpus(scrub, docs: list[str]) -> float:
    t0 = time.perf_counter()
    for d in docs:
        scrub(d)
    return sum(map(len, docs)) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small corpora, one round")
    ap.add_argument("--baseline", help="an older pii.py to compare with (its Scrubber(), default types)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from tests.data.pii_bench import evaluate, make_records, render

    from homeforge.data.pii import Scrubber

    size = 200_000 if args.quick else 2_000_000
    rounds = 1 if args.quick else args.rounds
    en = english_corpus(size)
    zh, zh_source = chinese_corpus(size)
    recs = make_records(0, 300 if args.quick else 1200)
    dense = [render(r) for r in recs]
    scrubbers = {"rules": Scrubber(phone="rules").scrub, "phonenumbers": Scrubber(phone="phonenumbers").scrub}
    if args.baseline:
        scrubbers["baseline"] = load_baseline(args.baseline).scrub
    dt = datatrove_scrub()
    if dt:
        scrubbers["datatrove PIIFormatter"] = dt
    corpora = {"English (stdlib docstrings)": en, f"Chinese ({zh_source})": zh, "PII benchmark records": dense}
    speeds: dict = {(s, c): [] for s in scrubbers for c in corpora}
    for _ in range(rounds):
        for c, docs in corpora.items():
            for s, fn in scrubbers.items():
                speeds[(s, c)].append(time_corpus(fn, docs))
    print(f"{'corpus':44s} {'chars':>10s}  " + "  ".join(f"{s:>22s}" for s in scrubbers))
    for c, docs in corpora.items():
        base = statistics.median(speeds[("rules", c)])
        cells = []
        for s in scrubbers:
            v = statistics.median(speeds[(s, c)])
            cells.append(f"{v / 1e6:8.2f} Mc/s ({v / base:4.2f}x)")
        print(f"{c:44s} {sum(map(len, docs)):>10d}  " + "  ".join(f"{x:>22s}" for x in cells))
    print("\nrecall per type / decoys untouched on the benchmark records")
    results = {s: evaluate(fn, recs) for s, fn in scrubbers.items() if s != "datatrove PIIFormatter"}
    types = sorted(next(iter(results.values()))["recall"])
    print(f"{'type':18s} {'n':>5s}  " + "  ".join(f"{s:>12s}" for s in results))
    for t in types:
        n = next(iter(results.values()))["recall"][t][0]
        print(f"{t:18s} {n:5d}  " + "  ".join(f"{r['recall'][t][1] / n:12.1%}" for r in results.values()))
    for s, r in results.items():
        n = sum(v[0] for k, v in r["untouched"].items() if k != "context")
        k = sum(v[1] for k, v in r["untouched"].items() if k != "context")
        print(f"decoys untouched ({s}): {k}/{n} = {k / n:.2%}; records with their fixed text intact: "
              f"{r['untouched']['context'][1]}/{r['untouched']['context'][0]}")


if __name__ == "__main__":
    main()
