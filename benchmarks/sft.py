"""SFT speed and memory: homeforge's packed SFT vs Hugging Face ``Trainer`` with padding, side by side.

Both train the same Llama-architecture model (preset ``small``, ~30M parameters with a
8192-token vocabulary, same seed), fp32, torch AdamW (same lr, betas, weight decay, warmup
+ cosine), one epoch over the same chat conversations with realistic, varied lengths
(log-normal, median ~190 tokens, 32..1024; prompts unmasked, answers ~60% of the tokens,
loss only on answer tokens). The figure of merit is *useful* tokens/s: loss-bearing
(assistant) tokens trained per second of training loop (ours: the engine's per-step clock,
batch building included; Trainer: on_train_begin .. on_train_end, data loading included).

- ours: ``homeforge.train.methods.sft`` (best-fit packing into rows of ``seq_len`` with
  position ids restarting per conversation, so no cross-sample attention; LM head only
  on loss-bearing positions) run by the homeforge engine (``train_task``);
- peer: ``transformers.Trainer`` with ``DataCollatorForSeq2Seq`` (pads every batch to its
  longest conversation, labels padded with -100), the standard SFT setup without packing.

The batch holds about the same number of real tokens in both: Trainer takes ``--hf-batch``
conversations per step, ours ``--hf-batch x mean length / seq_len`` packed rows. Each run is
its own process (peak RSS is per run); runs alternate (ours, HF, ours, HF, ...); medians
and the ratio are printed.

    python benchmarks/sft.py --quick     # smoke run (debug model, a few conversations)
    python benchmarks/sft.py             # the full run (~10-15 minutes on 2 quiet cores)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(preset="small", vocab=8192, seq_len=1024, n_conv=160, hf_batch=8, rounds=2, median_len=190)
QUICK = dict(preset="debug", vocab=512, seq_len=256, n_conv=24, hf_batch=4, rounds=1, median_len=60)


def conversations(p: dict) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) per conversation: 1-3 turns, prompt unmasked, answer masked."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(p["n_conv"]):
        total = int(np.clip(rng.lognormal(math.log(p["median_len"]), 0.7), 32, p["seq_len"]))
        turns = int(rng.integers(1, 4))
        ids, mask = [], []
        for t in range(turns):
            n = total // turns if t < turns - 1 else total - len(ids)
            n_prompt = max(4, int(n * rng.uniform(0.25, 0.55)))
            ids += rng.integers(4, p["vocab"], n).tolist()
            mask += [0] * n_prompt + [1] * (n - n_prompt)
        out.append((ids[: p["seq_len"]], mask[: p["seq_len"]]))
    return out


def _model(p: dict):
    from homeforge.models.presets import build_model, preset_config

    return build_model(preset_config(p["preset"], p["vocab"], eos_token_id=0, pad_token_id=1), seed=1234)


def useful_tokens(convs) -> int:
    return sum(sum(m[1:]) for _, m in convs)  # a masked token at position t+1 is the label of position t


# --------------------------------------------------------------------------- workers (one run per process)


def worker_ours(p: dict) -> dict:
    import torch

    torch.set_num_threads(p["threads"])
    from homeforge.config import TrainConfig, load_config
    from homeforge.train.loop import train_task
    from homeforge.train.methods.common import causal_lm_loss
    from homeforge.train.methods.sft import ChatSource, chat_samples
    from homeforge.train.task import TrainTask

    convs = conversations(p)
    samples, _ = chat_samples([{"input_ids": i, "loss_mask": m} for i, m in convs], p["seq_len"])
    src = ChatSource(samples, p["seq_len"], pad_id=1, seed=1234, packing=True)
    mean_len = sum(len(i) for i, _ in convs) / len(convs)
    micro = max(1, round(p["hf_batch"] * mean_len / p["seq_len"]))
    steps = math.ceil(len(src) / micro)
    cfg = load_config(TrainConfig, None, [
        "method=sft", f"seq_len={p['seq_len']}", f"micro_batch_size={micro}", f"max_steps={steps}",
        "optim.lr=5e-4", "optim.weight_decay=0.0", "optim.betas=[0.9,0.999]", "schedule.warmup_steps=2",
        "schedule.min_lr_ratio=0.0", "log_every=1", "checkpoint.every=0", "checkpoint.best=false",
        "tracking.tensorboard=false", "precision=fp32", f"threads={p['threads']}", f"output_dir={p['out']}",
        "peak_tflops=0.1"])
    task = TrainTask(model=_model(p), train=src, val=None, loss_fn=causal_lm_loss,
                     save_final=lambda m, out, tok: None)
    state = train_task(task, cfg, p["out"])
    seconds = sum(r["step_s"] for r in state.history)
    tokens = sum(round(r["loss_tokens_per_s"] * r["step_s"]) for r in state.history)  # loss tokens actually trained
    return {"useful_tokens": tokens, "seconds": seconds, "steps": steps, "rows": len(src), "micro": micro,
            "padded_tokens": len(src) * p["seq_len"], "final_loss": state.history[-1]["loss"]}


def worker_hf(p: dict) -> dict:
    import torch

    torch.set_num_threads(p["threads"])
    from transformers import (
        DataCollatorForSeq2Seq,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    convs = conversations(p)
    # transformers shifts labels inside the model: labels = the token itself where it bears loss
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [i if m else -100 for i, m in zip(ids, mask, strict=True)]}
            for ids, mask in convs]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, k):
            return rows[k]

    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 1, "<eos>": 0}, "<pad>")),
                                  pad_token="<pad>", eos_token="<eos>")
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    model = _model(p)

    padded = []

    def counting(feats):
        batch = collator(feats)
        padded.append(batch["input_ids"].numel())
        return batch

    args = TrainingArguments(output_dir=p["out"], per_device_train_batch_size=p["hf_batch"], num_train_epochs=1,
                             learning_rate=5e-4, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                             warmup_steps=2, lr_scheduler_type="cosine", max_grad_norm=1.0, optim="adamw_torch",
                             logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, seed=1234,
                             dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
    from transformers import TrainerCallback

    clock = {}

    class Clock(TrainerCallback):  # the training loop only, as the engine's step clock for ours
        def on_train_begin(self, args, state, control, **kw):
            clock["t0"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            clock["t1"] = time.perf_counter()

    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=counting, callbacks=[Clock()])
    out = trainer.train()
    seconds = clock["t1"] - clock["t0"]
    return {"useful_tokens": useful_tokens(convs), "seconds": seconds, "steps": out.global_step,
            "padded_tokens": sum(padded), "final_loss": out.training_loss}


def run_worker(kind: str, p: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--params", json.dumps(p)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: debug model, a few conversations")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 2, quick 1)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        import resource

        p = json.loads(a.params)
        res = (worker_ours if a.worker == "ours" else worker_hf)(p)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    p = dict(QUICK if a.quick else FULL, threads=a.threads)
    rounds = a.rounds or p["rounds"]
    convs = conversations(p)
    lengths = sorted(len(i) for i, _ in convs)
    print(f"SFT benchmark: preset {p['preset']}, {len(convs)} conversations, lengths {lengths[0]}..{lengths[-1]} "
          f"(median {lengths[len(lengths) // 2]}), {useful_tokens(convs)} loss-bearing tokens, seq_len "
          f"{p['seq_len']}, {a.threads} threads, {rounds} round(s)")
    results: dict[str, list[dict]] = {"ours": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for kind in ("ours", "hf"):
                res = run_worker(kind, dict(p, out=str(Path(tmp) / f"{kind}-{r}")))
                res["useful_tps"] = res["useful_tokens"] / res["seconds"]
                results[kind].append(res)
                print(f"  round {r + 1} {kind:4s}: {res['useful_tps']:8.1f} useful tok/s  {res['seconds']:7.1f} s  "
                      f"{res['steps']:4d} steps  padded/useful {res['padded_tokens'] / res['useful_tokens']:.2f}  "
                      f"peak RSS {res['peak_rss_mb']:.0f} MB  final loss {res['final_loss']:.3f}")
    med = {k: statistics.median(x["useful_tps"] for x in v) for k, v in results.items()}
    rss = {k: statistics.median(x["peak_rss_mb"] for x in v) for k, v in results.items()}
    print(f"useful tokens/s: homeforge {med['ours']:.1f}, HF Trainer {med['hf']:.1f}; "
          f"ratio {med['ours'] / med['hf']:.2f}x (goal >= 1.5x)")
    print(f"peak RSS: homeforge {rss['ours']:.0f} MB, HF Trainer {rss['hf']:.0f} MB")


if __name__ == "__main__":
    main()
