"""Compression: fp32 vs homeforge int8 (torch.ao dynamic, via `homeforge compress`) vs ONNX
Runtime fp32 / int8, side by side in one run.

Model: the ``small`` preset (~30M parameters with an 8192-token BPE; ``debug`` with
``--quick``), *trained briefly* here on the quickstart corpus (Python stdlib docstrings)
so that perplexity means something; or pass ``--model DIR`` (e.g. a quickstart model).
ONNX: ``homeforge export --format onnx --int8`` (the export developer's code, with its
parity check) when it works, else ``torch.onnx.export(dynamo=True)`` + onnxruntime
``quantize_dynamic`` inside this script (the report says which).

Measured, in one process, alternating variants round by round:
* size of the Linear weights (goal: int8 >= 3.5x smaller) and of all weights;
* latency of one forward pass at batch 1 and batch 8 x ``seq`` tokens (median over rounds;
  goal: int8 >= 1.8x faster than fp32 PyTorch);
* perplexity on the held-out split, each document cut to ``seq`` tokens, identical for
  every variant (goal: int8 <= +1%);
* resident memory added by loading each variant, and the process's peak RSS.

    python benchmarks/compress.py --quick     # smoke run (debug model, ~1 minute)
    python benchmarks/compress.py             # full run (~10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(preset="small", vocab=8192, chars=2_500_000, train_steps=300, train_seq=128, train_batch=8, lr=2e-3,
            seq=128, rounds=7, ppl_docs=200)
QUICK = dict(preset="debug", vocab=512, chars=200_000, train_steps=30, train_seq=64, train_batch=8, lr=3e-3,
             seq=32, rounds=2, ppl_docs=20)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_data(p: dict, root: Path) -> Path:
    from rich.console import Console

    from homeforge.config import QuickstartConfig, load_config
    from homeforge.quickstart import build_dataset

    cfg = load_config(QuickstartConfig, overrides=[f"corpus.max_chars={p['chars']}", f"tokenizer.vocab_size={p['vocab']}"])
    return build_dataset(cfg, root / "data", force=False, console=Console(quiet=True))


def train_model(p: dict, data: Path, out: Path) -> Path:
    """The preset trained for a few hundred steps (AdamW, cosine): a model with real perplexity."""
    import torch

    from homeforge.data.shards import load_tokens
    from homeforge.models.io import load_tokenizer, save_model_dir
    from homeforge.models.presets import build_model, preset_config
    from homeforge.train.data import PackedWindows

    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(data / "tokenizer")
    model = build_model(preset_config(p["preset"], len(tok), eos_token_id=tok.eos_token_id), seed=0)
    win = PackedWindows(load_tokens(data, "train"), p["train_seq"], seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    steps = p["train_steps"]
    t0 = time.time()
    model.train()
    for s in range(steps):
        lr = p["lr"] * min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = win.batch(s * p["train_batch"], p["train_batch"])
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if s % 50 == 0 or s == steps - 1:
            print(f"  train step {s + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    save_model_dir(model, tok, out)
    return out


def onnx_export(model_dir: Path, out: Path, threads: int) -> tuple[Path, Path, str]:
    """(fp32 .onnx, int8 .onnx, how): homeforge export when it works, else a local export."""
    r = subprocess.run([sys.executable, "-m", "homeforge", "export", str(model_dir), "--format", "onnx", "--int8",
                        "-o", str(out / "hf-onnx"), "onnx.kv_cache=false", "--force"],
                       capture_output=True, text=True, timeout=3600)
    fp32, int8 = out / "hf-onnx" / "model.onnx", out / "hf-onnx" / "model.int8.onnx"
    if r.returncode == 0 and fp32.is_file() and int8.is_file():
        return fp32, int8, "homeforge export --format onnx --int8 (parity checked)"
    print(f"  homeforge export failed (rc {r.returncode}): {r.stderr.strip().splitlines()[-1:]}; exporting locally")
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from homeforge.models.io import load_causal_lm

    model, _ = load_causal_lm(model_dir, with_tokenizer=False)
    model.config.use_cache = False

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    (out / "local-onnx").mkdir(parents=True, exist_ok=True)
    fp32, int8 = out / "local-onnx" / "model.onnx", out / "local-onnx" / "model.int8.onnx"
    x = torch.zeros((2, 16), dtype=torch.long)
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
    torch.onnx.export(Logits(model), (x,), str(fp32), dynamo=True, input_names=["input_ids"], output_names=["logits"],
                      dynamic_shapes={"input_ids": {0: b, 1: s}}, external_data=False)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return fp32, int8, "torch.onnx.export(dynamo=True) + onnxruntime quantize_dynamic (in this script)"


def ort_session(path: Path, threads: int, optimized: bool):
    """An ONNX Runtime CPU session. Spinning is off: idle ORT threads that spin would steal
    the cores from the PyTorch variants measured right after them in this process."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimized  # optimised at export
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run on the debug preset")
    ap.add_argument("--model", type=Path, help="use this trained model directory instead of training one")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", type=Path, default=None, help="cache for data/model (default: a temp dir)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime variants")
    args = ap.parse_args()
    p = QUICK if args.quick else FULL

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from rich.console import Console

    from homeforge.compress import run as C
    from homeforge.compress.quantize import linear_weight_bytes
    from homeforge.config import CompressConfig, load_config
    from homeforge.data.dataset import read_jsonl
    from homeforge.evaluate.lm import text_docs
    from homeforge.models.io import load_causal_lm

    work = args.workdir or Path(tempfile.mkdtemp(prefix="hf-bench-compress-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; work dir {work}")
    t0 = time.time()
    data = build_data(p, work)
    if args.model:
        model_dir, how_model = args.model, f"given: {args.model}"
    else:
        print(f"training the {p['preset']} preset for {p['train_steps']} steps (seq {p['train_seq']}, batch "
              f"{p['train_batch']})")
        model_dir = train_model(p, data, work / f"model-{p['preset']}")
        how_model = f"preset {p['preset']} trained {p['train_steps']} steps on stdlib docstrings"
    int8_dir = work / "model-int8-dynamic"
    cfg = load_config(CompressConfig, overrides=["method=int8-dynamic", "latency_repeats=1", "max_examples=8",
                                                 f"latency_seq_len={p['seq']}", "gates.max_ppl_increase=1.0"])
    C.run(model_dir, data, cfg, int8_dir, True, Console(quiet=True))

    variants: dict[str, object] = {}
    mem: dict[str, float] = {}
    base = rss_mb()
    fp32, tok = load_causal_lm(model_dir)
    variants["torch fp32"], mem["torch fp32"] = fp32, rss_mb() - base
    base = rss_mb()
    q8, _ = load_causal_lm(int8_dir)
    variants["homeforge int8"], mem["homeforge int8"] = q8, rss_mb() - base
    sizes = {"torch fp32": linear_weight_bytes(model_dir), "homeforge int8": linear_weight_bytes(int8_dir)}
    how_onnx = "skipped"
    if not args.no_onnx:
        onnx_fp32, onnx_int8, how_onnx = onnx_export(model_dir, work, args.threads)
        for name, path in (("ORT fp32", onnx_fp32), ("ORT int8", onnx_int8)):
            base = rss_mb()
            variants[name] = ort_session(path, args.threads, optimized="homeforge" in how_onnx)
            mem[name] = rss_mb() - base
            total = path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob(path.name + "*.data"))
            sizes[name] = (None, total)

    def forward(name, m, x: np.ndarray) -> np.ndarray:
        if name.startswith("ORT"):
            ins = {i.name for i in m.get_inputs()}
            feed = {"input_ids": x}
            if "attention_mask" in ins:
                feed["attention_mask"] = np.ones_like(x)
            if "position_ids" in ins:
                feed["position_ids"] = np.broadcast_to(np.arange(x.shape[1]), x.shape).copy()
            return m.run(["logits"], feed)[0]
        with torch.no_grad():
            return m(input_ids=torch.from_numpy(x)).logits.numpy()

    rng = np.random.default_rng(0)
    vocab = fp32.config.vocab_size
    xs = {b: rng.integers(0, vocab, size=(b, p["seq"])).astype(np.int64) for b in (1, 8)}
    times: dict[str, dict[int, list[float]]] = {n: {1: [], 8: []} for n in variants}
    for name, m in variants.items():  # warm-up
        for b in (1, 8):
            forward(name, m, xs[b])
    for r in range(p["rounds"]):
        for b in (1, 8):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                t = time.perf_counter()
                forward(name, variants[name], xs[b])
                times[name][b].append((time.perf_counter() - t) * 1000)

    # perplexity: the same val documents, each cut to `seq` tokens, for every variant
    rows = read_jsonl(data / "val.jsonl", p["ppl_docs"])
    docs = [d[: p["seq"]] for d in text_docs(rows, tok, data / "val.jsonl")[0] if len(d) >= 8]
    ppl = {}
    for name, m in variants.items():
        nll, n = 0.0, 0
        for d in docs:
            x = np.array([d], dtype=np.int64)
            logits = forward(name, m, x)[0, :-1].astype(np.float64)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            nll += float((logz - logits[np.arange(len(d) - 1), d[1:]]).sum())
            n += len(d) - 1
        ppl[name] = math.exp(nll / n)

    med = {n: {b: statistics.median(v) for b, v in d.items()} for n, d in times.items()}
    ref = "torch fp32"
    print(f"\nmodel: {how_model}; {sum(p_.numel() for p_ in fp32.parameters()) / 1e6:.1f}M parameters")
    print(f"ONNX: {how_onnx}")
    print(f"latency: median of {p['rounds']} alternating rounds, forward over batch x {p['seq']} tokens, "
          f"{args.threads} threads; perplexity on {len(docs)} val docs cut to {p['seq']} tokens\n")
    hdr = f"{'variant':<16}{'linear MB':>10}{'file MB':>9}{'b1 ms':>9}{'b8 ms':>9}{'b1 x':>7}{'b8 x':>7}{'ppl':>10}{'ppl chg':>9}{'+RSS MB':>9}"
    print(hdr)
    print("-" * len(hdr))
    for name in variants:
        lin, tot = sizes[name]
        lin_s = f"{lin / 1e6:.2f}" if lin else "-"
        print(f"{name:<16}{lin_s:>10}{tot / 1e6:>9.2f}{med[name][1]:>9.2f}{med[name][8]:>9.2f}"
              f"{med[ref][1] / med[name][1]:>6.2f}x {med[ref][8] / med[name][8]:>6.2f}x{ppl[name]:>10.3f}"
              f"{ppl[name] / ppl[ref] - 1:>+9.2%}{mem[name]:>9.1f}")
    lin_ratio = sizes[ref][0] / sizes["homeforge int8"][0]
    print(f"\nhomeforge int8 vs fp32: Linear weights {lin_ratio:.2f}x smaller (goal >= 3.5x), "
          f"batch 1 {med[ref][1] / med['homeforge int8'][1]:.2f}x / batch 8 {med[ref][8] / med['homeforge int8'][8]:.2f}x "
          f"faster (goal >= 1.8x), perplexity {ppl['homeforge int8'] / ppl[ref] - 1:+.2%} (goal <= +1%)")
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MB; total time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
