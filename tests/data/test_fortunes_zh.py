"""Chinese quotes and poems from Debian's fortunes-zh through `homeforge prepare` (slow: fetched with apt-get).

What must hold on real unspaced Chinese nobody here wrote: at most 2% of the clean quotes
dropped by the quality filters, near duplicates made from real quotes by changing one or
two characters removed (the original kept), full-width punctuation kept byte for byte,
ANSI colour codes gone.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
from rich.console import Console

from homeforge.config import PrepareConfig, load_config
from homeforge.data.prepare import run

from .debian import fortunes_zh

pytestmark = pytest.mark.slow

HAN = re.compile(r"[\u4e00-\u9fff]")
FULL_WIDTH_PUNCT = re.compile(r"[\u3001-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff60\uffe0-\uffe6\u2026]")


def near_copies(quotes: list[dict], rng: random.Random, n_each: int = 150) -> list[dict]:
    """1 Han character changed in quotes of >= 20 Han characters, 2 in quotes of >= 40; replacements from the corpus."""
    pool = sorted({c for q in quotes for c in HAN.findall(q["plain"])})
    out = []
    for changes, min_han in ((1, 20), (2, 40)):
        cands = [q for q in quotes if len(HAN.findall(q["plain"])) >= min_han]
        for q in rng.sample(cands, n_each):
            chars = list(q["plain"])
            for j in rng.sample([j for j, c in enumerate(chars) if HAN.match(c)], changes):
                chars[j] = rng.choice([c for c in rng.sample(pool, 8) if c != chars[j]])
            out.append({"id": f"near{changes}:{q['id']}", "of": q["id"], "text": "".join(chars), "changes": changes})
    return out


def test_fortunes_zh_clean_quotes_kept_near_duplicates_removed_punctuation_intact(tmp_path):
    fortunes = fortunes_zh()
    clean = [f for f in fortunes if not f["technical"]]
    assert len(clean) > 4000
    near = near_copies(clean, random.Random(0))
    line_of = {q["id"]: i for i, q in enumerate(fortunes, 1)}
    with open(tmp_path / "fortunes.jsonl", "w", encoding="utf-8") as f:
        for q in fortunes:  # the raw fortunes, ANSI colours and all
            f.write(json.dumps({"id": q["id"], "text": q["raw"]}, ensure_ascii=False) + "\n")
        for q in near:
            f.write(json.dumps({"id": q["id"], "text": q["text"]}, ensure_ascii=False) + "\n")
    cfg = load_config(PrepareConfig, overrides=[f"inputs={json.dumps([str(tmp_path / 'fortunes.jsonl')])}",
                                                f"output_dir={tmp_path / 'out'}", "fields.id=id", "split.val=0",
                                                "tokenizer.vocab_size=2000"])
    res = run(cfg, console=Console(quiet=True))
    out = res["out"]
    drops = [json.loads(x) for x in (out / "drops.jsonl").read_text(encoding="utf-8").splitlines()]
    by_id = {d["id"]: d for d in drops}
    clean_ids = {q["id"] for q in clean}

    # 1. the quality filters drop at most 2% of the clean quotes
    filtered = [d for d in drops if d["stage"] == "clean" and d["id"] in clean_ids]
    rate = len(filtered) / len(clean)
    print(f"\nclean quotes: {len(clean)}; dropped by filters: {len(filtered)} ({rate:.2%}) "
          f"{dict(Counter(d['reason'] for d in filtered))}; technical: "
          f"{sum(f['technical'] for f in fortunes)}, dropped "
          f"{dict(Counter(d['reason'] for d in drops if d['stage'] == 'clean' and d['id'] not in clean_ids))}")
    assert rate <= 0.02, Counter(d["reason"] for d in filtered)

    # 2. near duplicates with one or two characters changed are removed, in favour of their original
    removed, total = Counter(), Counter()
    for q in near:
        d = by_id.get(q["id"])
        if q["of"] in by_id:  # the original itself was filtered: its copy must go as well
            assert d is not None, q["id"]
            continue
        total[q["changes"]] += 1
        if d is not None and d["stage"] == "dedup" and d["kept"].endswith(f":{line_of[q['of']]}"):
            removed[q["changes"]] += 1
    print(f"near duplicates removed: 1 character changed {removed[1]}/{total[1]}, "
          f"2 characters {removed[2]}/{total[2]}")
    assert removed[1] == total[1] and removed[2] >= 0.98 * total[2]

    # 3. kept records: no ANSI codes, full-width punctuation exactly as in the source
    kept = {r["id"]: r["text"] for r in map(json.loads, (out / "train.jsonl").read_text(encoding="utf-8").splitlines())}
    assert not any("\x1b" in t for t in kept.values())
    src = {q["id"]: q["plain"] for q in fortunes}
    checked = 0
    for rid, text in kept.items():
        if rid in src:
            assert FULL_WIDTH_PUNCT.findall(text) == FULL_WIDTH_PUNCT.findall(src[rid]), rid
            checked += 1
    assert checked > 4000
