"""Real 2-process torchrun runs on CPU (gloo): DDP and FSDP2 match one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_task import make_cfg, make_task  # noqa: E402

from homeforge.train import checkpoint as ck  # noqa: E402
from homeforge.train.distributed import torchrun_command  # noqa: E402
from homeforge.train.loop import train_task  # noqa: E402

WORKER = Path(__file__).parent / "engine_task.py"
# global batch 4 = 2 processes x micro-batch 2 = 1 process x micro-batch 2 x 2 accumulation steps
COMMON = ["micro_batch_size=2", "max_steps=6"]


def torchrun(out: Path, *overrides: str, resume: Path | None = None) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # the worker's folder, and the code under test (PYTHONPATH)
           "PYTHONPATH": os.pathsep.join(p for p in (str(WORKER.parent), os.environ.get("PYTHONPATH")) if p)}
    if resume is not None:
        env["ENGINE_RESUME"] = str(resume)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(out), *COMMON, *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "losses.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    cfg = make_cfg(tmp, *COMMON, "grad_accum=2")
    task = make_task(cfg)
    state = train_task(task, cfg, tmp)
    return [r["loss"] for r in state.history], dict(task.model.named_parameters())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_run_matches_one_process(strategy, single, tmp_path):
    losses = torchrun(tmp_path, f"distributed.strategy={strategy}")
    want, params = single
    assert len(losses) == 6
    assert losses == pytest.approx(want, rel=1e-5, abs=1e-5)
    final = torch.load(tmp_path / "final_weights.pt")
    for name, p in params.items():
        assert torch.allclose(final[name], p, atol=2e-5), name
    # rank 0 alone logs and saves; every rank stores its RNG state in the checkpoint
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    last = ck.latest_checkpoint(tmp_path)
    assert last.name == "step-00000006" and ck.read_meta(last)["world_size"] == 2
    assert sorted(p.name for p in last.glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]
    # the final model directory is a plain HF model with the gathered (unsharded) weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert torch.allclose(model.model.layers[1].self_attn.q_proj.weight, final["model.layers.1.self_attn.q_proj.weight"])
    if strategy == "fsdp":  # resumed from step 4 under FSDP2: bit-identical to the uninterrupted run
        torchrun(tmp_path, f"distributed.strategy={strategy}", resume=tmp_path / "checkpoints" / "step-00000004")
        resumed = torch.load(tmp_path / "final_weights.pt")
        assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_torchrun_command_shape():
    cmd = torchrun_command(2, ["train", "--config", "x.yaml"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[-4:] == ["homeforge", "train", "--config", "x.yaml"]
