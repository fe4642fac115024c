"""One huge record: tokenized piece by piece (same ids as whole), and prepare's peak memory stays a few copies of it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

from homeforge.data.tokenizer import encode_stream, text_pieces, train_bpe

from .fixtures import WORDS, bert_like_dir


def long_text(n_chars: int, seed: int = 0) -> str:
    """English words with single and repeated spaces, newlines, punctuation, and unspaced Chinese runs."""
    rng = random.Random(seed)
    zh = "患者入院后进行了全面检查，医生根据检查结果制定了治疗方案。护士每天记录体温和血压的变化情况；"
    parts, size = [], 0
    while size < n_chars:
        r = rng.random()
        p = zh[rng.randrange(len(zh) // 2):] if r < 0.2 else rng.choice(WORDS) + rng.choice(["", ",", "."])
        p += rng.choice([" "] * 8 + ["  ", "\n", "\n\n", " \n "])
        parts.append(p)
        size += len(p)
    return "".join(parts)


def test_pieces_cut_where_tokenization_cannot_change():
    text = long_text(300_000)
    pieces = list(text_pieces(text, 4096))
    assert "".join(pieces) == text and len(pieces) > 70 and max(map(len, pieces)) <= 4096
    zh_only = "床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 2000  # no spaces: cut after punctuation
    zp = list(text_pieces(zh_only, 4096))
    assert "".join(zp) == zh_only and all(p[-1] in "，。" for p in zp[:-1])


def test_piecewise_encoding_equals_whole_encoding():
    text = long_text(200_000, seed=1)
    bpe = train_bpe([long_text(50_000, seed=2)], vocab_size=400)
    bert = __import__("transformers").AutoTokenizer.from_pretrained(
        str(bert_like_dir(__import__("pathlib").Path(os.environ.get("TMPDIR", "/tmp")) / f"bert-{os.getpid()}",
                          [long_text(20_000, seed=3)])))
    for tok in (bpe, bert):
        whole = tok(text, add_special_tokens=False)["input_ids"]  # the oracle: one call on the whole text
        pieces = list(encode_stream(tok, [text, "short one"], piece=4096, budget=16_384))
        assert [d for d, _ in pieces].count(0) > 40
        assert [i for d, ids in pieces if d == 0 for i in ids] == whole
        assert [ids for d, ids in pieces if d == 1] == [tok("short one", add_special_tokens=False)["input_ids"]]
    zh = "床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 1000
    assert [i for _, ids in encode_stream(bpe, [zh], piece=4096) for i in ids] == bpe(zh, add_special_tokens=False)["input_ids"]


PROBE = textwrap.dedent("""
    import json, resource, sys
    from rich.console import Console
    from homeforge.config import PrepareConfig, load_config
    from homeforge.data.prepare import run
    peaks = []
    for src, out in zip(sys.argv[1::2], sys.argv[2::2]):
        cfg = load_config(PrepareConfig, overrides=[f"inputs={json.dumps([src])}", f"output_dir={out}", "workers=1",
                          "clean.max_chars=0", "tokenizer.vocab_size=300", "split.val=0", "dedup.near=true"])
        run(cfg, console=Console(quiet=True))
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(peaks))
""")


def test_one_huge_line_costs_a_few_copies_not_gigabytes(tmp_path):
    """Peak memory grows by a few bytes per character of a single-line record (it grew ~290x its size).

    One process prepares a small file, a 0.5 MB line and a 1.5 MB line (clean.max_chars=0); the
    peak's growth between the two big ones is the per-character cost (fixed buffers cancel out).
    """
    rng = random.Random(5)
    words = [rng.choice(WORDS) for _ in range(1_500_000 // 7)]
    files = {}
    for name, n in (("small", 3000), ("one", len(words) // 3), ("three", len(words))):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text(" ".join(words[:n]))
    args = [a for name in files for a in (files[name], tmp_path / f"out-{name}")]
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    _, one, three = json.loads(r.stdout.strip().splitlines()[-1])
    grown = three - one
    size = files["three"].stat().st_size - files["one"].stat().st_size
    assert grown < 10 * size, f"peak grew by {grown / 1e6:.0f} MB for {size / 1e6:.1f} MB more text in one line"
    from homeforge.data.shards import load_tokens

    out = tmp_path / "out-three"
    idx = json.loads((out / "index.json").read_text())
    tokens = load_tokens(out, "train")
    assert idx["splits"]["train"]["docs"] == 1 and tokens[-1] == idx["eos_id"] and len(tokens) > len(words)
