"""Encryption at rest: cost of reading an encrypted token shard vs the plain one, side by side.

One packed uint16 shard is written twice, plain and encrypted (``security.crypto``, the
format `homeforge --encrypt prepare` writes). Both are read through the real loader path
(``data.shards.load_tokens`` -> ``train.data.WindowSource.batch``: shuffled windows of the
quickstart's seq_len x micro-batch), in alternating rounds, plus:

* open cost: the encrypted reader authenticates every chunk once on open (GB/s);
* streaming decrypt throughput (``crypto.iter_plain``, GB/s) vs a plain read;
* the quickstart model's training step (forward + backward + AdamW, the quickstart's preset,
  seq_len and micro-batch, fp32, this machine's threads), so the loader's extra time per
  step is shown as a fraction of a step (goal: <= 15%);
* peak traced memory of each reader (tracemalloc), to show it does not grow with file size.

    python benchmarks/crypto.py --quick     # smoke run (small shard, few batches)
    python benchmarks/crypto.py             # full run (~256 MB shard; a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

FULL = dict(tokens=128_000_000, batches=400, rounds=5, steps=6)
QUICK = dict(tokens=2_000_000, batches=50, rounds=2, steps=1)


def write_shards(root: Path, n_tokens: int) -> tuple[Path, Path]:
    import numpy as np

    from homeforge.security import crypto

    plain, enc = root / "plain", root / "enc"
    for d in (plain, enc):
        d.mkdir()
    rng = np.random.default_rng(0)
    index = {"format": "packed-tokens-v1", "dtype": "uint16", "vocab_size": 8192, "eos_id": 0,
             "splits": {"train": {"file": "train.bin", "tokens": n_tokens, "docs": 1}}}
    block = 4_000_000
    with open(plain / "train.bin", "wb") as f, crypto.open_write(enc / "train.bin") as w:
        for s in range(0, n_tokens, block):
            data = rng.integers(0, 8192, size=min(block, n_tokens - s), dtype=np.uint16).tobytes()
            f.write(data)
            w.write(data)
    for d in (plain, enc):
        (d / "index.json").write_text(json.dumps(index))
    return plain, enc


def loader_round(root: Path, seq_len: int, micro: int, batches: int, seed: int) -> dict:
    from homeforge.data.shards import load_tokens
    from homeforge.train.data import WindowSource

    tracemalloc.start()
    t0 = time.perf_counter()
    tokens = load_tokens(root, "train")
    t_open = time.perf_counter() - t0
    src = WindowSource(tokens, seq_len, seed=seed)
    t1 = time.perf_counter()
    checksum = 0
    for b in range(batches):
        checksum += int(src.batch(b * micro, micro)["input_ids"][0, 0])
    t_read = time.perf_counter() - t1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"open_s": t_open, "per_batch_s": t_read / batches, "peak_mb": peak / 2**20, "checksum": checksum}


def stream_round(path: Path, encrypted: bool) -> float:
    from homeforge.security import crypto

    t0 = time.perf_counter()
    n = 0
    if encrypted:
        for data in crypto.iter_plain(path):
            n += len(data)
    else:
        with open(path, "rb") as f:
            while data := f.read(1 << 20):
                n += len(data)
    return n / (time.perf_counter() - t0) / 1e9


def step_time(steps: int) -> tuple[float, dict]:
    import torch

    from homeforge.config import QuickstartConfig
    from homeforge.models.presets import build_model, preset_config

    q = QuickstartConfig().train
    vocab = QuickstartConfig().tokenizer.vocab_size
    model = build_model(preset_config(q.model.preset, vocab, eos_token_id=0), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, vocab, (q.micro_batch_size, q.seq_len))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times), {"preset": q.model.preset, "seq_len": q.seq_len, "micro": q.micro_batch_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    p = QUICK if args.quick else FULL
    import torch

    torch.set_num_threads(args.threads)
    from homeforge.config import QuickstartConfig

    q = QuickstartConfig().train
    with tempfile.TemporaryDirectory(prefix="hf-crypto-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["HOMEFORGE_HOME"] = str(tmp / "home")
        os.environ.pop("HOMEFORGE_KEY", None)
        os.environ.pop("HOMEFORGE_KEY_FILE", None)
        from homeforge.security import keys

        keys.init_key()
        t0 = time.perf_counter()
        plain, enc = write_shards(tmp, p["tokens"])
        mb = p["tokens"] * 2 / 2**20
        print(f"shard: {p['tokens']:,} uint16 tokens ({mb:.0f} MB), written plain + encrypted in "
              f"{time.perf_counter() - t0:.1f}s; reads: {p['batches']} batches of {q.micro_batch_size}x{q.seq_len} "
              f"tokens, {p['rounds']} alternating rounds, {args.threads} threads")
        res = {"plain": [], "encrypted": []}
        streams = {"plain": [], "encrypted": []}
        for r in range(p["rounds"]):
            for name, root in (("plain", plain), ("encrypted", enc)) if r % 2 == 0 else (("encrypted", enc), ("plain", plain)):
                res[name].append(loader_round(root, q.seq_len, q.micro_batch_size, p["batches"], seed=r))
                streams[name].append(stream_round(root / "train.bin", name == "encrypted"))
        assert all(a["checksum"] == b["checksum"] for a, b in zip(res["plain"], res["encrypted"], strict=True))
        med = {n: {k: statistics.median(x[k] for x in v) for k in ("open_s", "per_batch_s", "peak_mb")}
               for n, v in res.items()}
        step_s, step_info = step_time(p["steps"])
        extra = med["encrypted"]["per_batch_s"] - med["plain"]["per_batch_s"]
        print(f"{'reader':<11}{'open':>10}{'per batch':>13}{'tokens/s':>14}{'stream GB/s':>13}{'peak MB':>10}")
        for n in ("plain", "encrypted"):
            m = med[n]
            tps = q.micro_batch_size * q.seq_len / m["per_batch_s"]
            print(f"{n:<11}{m['open_s']:>9.3f}s{m['per_batch_s'] * 1e3:>11.3f}ms{tps:>14,.0f}"
                  f"{statistics.median(streams[n]):>13.2f}{m['peak_mb']:>10.1f}")
        print(f"open: encrypted authenticates {mb / med['encrypted']['open_s'] / 1024:.2f} GB/s "
              f"({med['encrypted']['open_s']:.2f}s for this shard, once per run)")
        print(f"loader time ratio encrypted/plain: {med['encrypted']['per_batch_s'] / med['plain']['per_batch_s']:.2f}x")
        print(f"quickstart training step ({step_info['preset']}, {step_info['micro']}x{step_info['seq_len']}, fp32): "
              f"{step_s * 1e3:.0f} ms")
        frac = extra / step_s
        print(f"encryption cost per training step: {extra * 1e3:.3f} ms = {100 * frac:.2f}% of a step "
              f"(goal <= 15%: {'met' if frac <= 0.15 else 'NOT met'})")
    sys.exit(0)


if __name__ == "__main__":
    main()
