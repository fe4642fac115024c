"""SFT (packed, variable loss tokens per rank) and LoRA under a real 2-process torchrun on CPU (gloo).

`homeforge train --nproc 2` must give the loss curve and weights of one process with the
same global batch (1 process x micro-batch 2 x 2 accumulation steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import methods_data as md  # noqa: E402


def homeforge_train(out: Path, *args: str) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOMEFORGE_CACHE": str(out.parent / "cache")}
    base = ["seq_len=128", "micro_batch_size=2", "max_steps=4", "optim.lr=3e-3", "schedule.warmup_steps=1",
            "eval_every=100", "log_every=1", "checkpoint.every=0", "threads=1", "tracking.tensorboard=false",
            "peak_tflops=0.05", "seed=7", "lora.dropout=0"]
    proc = subprocess.run([sys.executable, "-m", "homeforge", "train", "--output", str(out), *args, *base],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,strategy", [("sft", "ddp"), ("lora", "fsdp")])
def test_two_processes_match_one(method, strategy, tmp_path):
    data = md.write_chat_dataset(tmp_path / "chat", n_train=40, n_val=4)
    base = md.tiny_model_dir(tmp_path / "base", "llama")
    common = ["--data", str(data), "--method", method, f"model.path={base}"]
    one = homeforge_train(tmp_path / "one", *common, "grad_accum=2")
    two = homeforge_train(tmp_path / "two", *common, "--nproc", "2", f"distributed.strategy={strategy}")
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-5, abs=1e-5)
    name = "adapter/adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(tmp_path / "one" / "model" / name), load_file(tmp_path / "two" / "model" / name)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), k
