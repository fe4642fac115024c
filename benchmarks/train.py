"""Training speed and memory: homeforge's engine vs Hugging Face ``Trainer``, side by side.

Pretraining part: the same Llama-architecture model (preset ``small``, ~30M parameters,
same seed), the same AdamW (one optimizer object built by homeforge and handed to
``Trainer``), the same lr schedule, fp32, the same token windows, the same global batch,
the same torch thread count. Each run is its own process (so peak RSS is per run); the
runs alternate (ours, HF, ours, HF, ...). Tokens/s is measured over the steps after the
first ``--warmup`` ones. MFU is against a peak FLOP/s measured once here with a matmul
probe (``homeforge.train.flops``). Activation checkpointing is measured on our engine
(peak RSS and tokens/s with and without).

    python benchmarks/train.py --quick      # smoke run (debug model, few steps)
    python benchmarks/train.py              # the full run (takes ~10-15 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

FULL = dict(preset="small", vocab=8192, seq_len=256, micro=8, accum=1, steps=30, warmup=5, rounds=3)
QUICK = dict(preset="debug", vocab=512, seq_len=64, micro=4, accum=1, steps=6, warmup=2, rounds=1)


# --------------------------------------------------------------------------- workers (one run per process)


def _setup(p: dict):
    import numpy as np
    import torch

    torch.set_num_threads(p["threads"])
    from homeforge.config import TrainConfig, load_config
    from homeforge.models.presets import build_model, preset_config

    cfg = load_config(TrainConfig, None, [
        f"model.preset={p['preset']}", f"seq_len={p['seq_len']}", f"micro_batch_size={p['micro']}",
        f"grad_accum={p['accum']}", f"max_steps={p['steps']}", "optim.lr=1e-3", "schedule.warmup_steps=5",
        "log_every=1", "checkpoint.every=0", "tracking.tensorboard=false", "precision=fp32", f"threads={p['threads']}",
        f"output_dir={p['out']}", f"activation_checkpointing={str(p.get('ckpt', False)).lower()}"])
    tokens = np.random.default_rng(0).integers(0, p["vocab"], size=p["seq_len"] * p["micro"] * p["accum"]
                                               * (p["steps"] + 2) * 2 + 1).astype(np.uint16)
    model = build_model(preset_config(p["preset"], p["vocab"], eos_token_id=0), seed=cfg.seed)
    return cfg, tokens, model


def worker_ours(p: dict) -> dict:
    import torch

    from homeforge.train.data import WindowSource
    from homeforge.train.flops import flops_per_token, peak_flops
    from homeforge.train.loop import train_task
    from homeforge.train.task import TrainTask, causal_lm_loss

    cfg, tokens, model = _setup(p)
    stamps: list[float] = []
    task = TrainTask(model=model, train=WindowSource(tokens, cfg.seq_len, seed=cfg.seed), val=None,
                     loss_fn=causal_lm_loss, save_final=lambda m, out, tok: None)
    fpt = flops_per_token(model, cfg.seq_len)
    state = train_task(task, cfg, p["out"], progress=lambda s, r: stamps.append(time.perf_counter()))
    return {"stamps": stamps, "flops_per_token": fpt, "losses": [r["loss"] for r in state.history],
            "peak": peak_flops(torch.device("cpu")), "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker_hf(p: dict) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from homeforge.train.data import PackedWindows
    from homeforge.train.optim import build_optimizer, build_scheduler

    cfg, tokens, model = _setup(p)
    windows = PackedWindows(tokens, cfg.seq_len, seed=cfg.seed)
    n = cfg.max_steps * cfg.micro_batch_size * cfg.grad_accum

    class Windows(torch.utils.data.Dataset):  # the same samples, in the same order, as ours
        def __len__(self):
            return n

        def __getitem__(self, k):
            x, y = windows.batch(k, 1)  # labels already shifted, exactly as ours: no shift inside the loss
            return {"input_ids": x[0], "labels": y[0], "shift_labels": y[0]}

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.max_steps, cfg.schedule)
    args = TrainingArguments(output_dir=p["out"], per_device_train_batch_size=cfg.micro_batch_size,
                             gradient_accumulation_steps=cfg.grad_accum, max_steps=cfg.max_steps, logging_steps=1,
                             save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, seed=cfg.seed,
                             dataloader_num_workers=0, max_grad_norm=cfg.optim.grad_clip, disable_tqdm=True,
                             remove_unused_columns=False,
                             gradient_checkpointing=bool(p.get("ckpt")))
    trainer = Trainer(model=model, args=args, train_dataset=Windows(), optimizers=(opt, sched), callbacks=[Stamp()])
    trainer.train_dataset_sampler = None
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(n))  # our order
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"stamps": stamps, "losses": losses,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --------------------------------------------------------------------------- driver


def run_worker(kind: str, p: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(p["threads"]), "HOMEFORGE_BENCH": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--params", json.dumps(p)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    st = res["stamps"][p["warmup"]:]
    tokens = p["seq_len"] * p["micro"] * p["accum"]
    res["tokens_per_s"] = tokens * (len(st) - 1) / (st[-1] - st[0])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: debug model, few steps, one round")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per run")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 3, quick 1)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        p = json.loads(a.params)
        print(json.dumps((worker_ours if a.worker == "ours" else worker_hf)(p)))
        return
    import tempfile

    base = dict(QUICK if a.quick else FULL, threads=a.threads)
    rounds = a.rounds or base["rounds"]
    tmp = Path(tempfile.mkdtemp(prefix="hf-bench-train-"))
    print(f"pretraining benchmark: preset {base['preset']}, seq_len {base['seq_len']}, batch {base['micro']}x"
          f"{base['accum']}, {base['steps']} steps ({base['warmup']} warm-up), {base['threads']} threads, fp32, "
          f"{rounds} alternating rounds", flush=True)
    ours, hf = [], []
    for r in range(rounds):
        for kind, acc in (("ours", ours), ("hf", hf)) if r % 2 == 0 else (("hf", hf), ("ours", ours)):
            res = run_worker(kind, {**base, "out": str(tmp / f"{kind}{r}")})
            acc.append(res)
            print(f"  round {r + 1} {kind:4s}: {res['tokens_per_s']:8.0f} tokens/s  peak RSS {res['rss_mb']:6.0f} MB  "
                  f"loss at step {len(res['losses'])} {res['losses'][-1]:.4f}", flush=True)
    t_ours = statistics.median(x["tokens_per_s"] for x in ours)
    t_hf = statistics.median(x["tokens_per_s"] for x in hf)
    fpt = ours[0]["flops_per_token"]
    import torch

    from homeforge.train.flops import probe_peak_flops

    torch.set_num_threads(base["threads"])
    peak = max(probe_peak_flops(torch.device("cpu"), n=2048) for _ in range(3))  # fresh, not the cached value
    diff = max(abs(a - b) for a, b in zip(ours[0]["losses"], hf[0]["losses"], strict=True))
    print(f"\nsame setup check: largest per-step train-loss difference homeforge vs Trainer: {diff:.2e}")
    print(f"measured fp32 matmul peak ({base['threads']} threads): {peak / 1e9:.1f} GFLOP/s; "
          f"model FLOPs per token: {fpt / 1e6:.1f} M")
    print(f"homeforge : {t_ours:8.0f} tokens/s  MFU {t_ours * fpt / peak:6.1%}  peak RSS {max(x['rss_mb'] for x in ours):.0f} MB")
    print(f"HF Trainer: {t_hf:8.0f} tokens/s  MFU {t_hf * fpt / peak:6.1%}  peak RSS {max(x['rss_mb'] for x in hf):.0f} MB")
    print(f"tokens/s ratio homeforge / Trainer: {t_ours / t_hf:.3f}x (goal >= 1.0x)")

    ck = run_worker("ours", {**base, "ckpt": True, "out": str(tmp / "ckpt")})
    plain = max(ours, key=lambda x: -x["rss_mb"])
    print(f"\nactivation checkpointing (homeforge): peak RSS {ck['rss_mb']:.0f} MB vs {plain['rss_mb']:.0f} MB "
          f"without (saves {plain['rss_mb'] - ck['rss_mb']:.0f} MB); {ck['tokens_per_s']:.0f} tokens/s "
          f"({ck['tokens_per_s'] / t_ours:.0%} of the speed without)")


if __name__ == "__main__":
    main()
