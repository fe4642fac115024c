"""`homeforge train` end to end: a run, refusals that overwrite nothing, resume, and --nproc via torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from methods_data import write_text_dataset  # noqa: E402

from homeforge.cli import app  # noqa: E402
from homeforge.errors import HomeforgeError  # noqa: E402
from homeforge.train import checkpoint as ck  # noqa: E402

ARGS = ["model.preset=debug", "seq_len=32", "micro_batch_size=4", "max_steps=6", "checkpoint.every=3", "eval_every=3",
        "eval_batches=2", "log_every=1", "threads=1", "peak_tflops=0.05", "tracking.tensorboard=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("data") / "text")


def cli(*args: str):
    """Run the command in-process as `homeforge.cli.main` would: a HomeforgeError is exit 2 plus its message."""
    result = CliRunner().invoke(app, list(args))
    if isinstance(result.exception, HomeforgeError):
        return result.exception.exit_code, result.output + result.exception.render()
    return result.exit_code, result.output


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_train_run_then_refusals_and_resume(data, tmp_path):
    out = tmp_path / "run"
    code, text = cli("train", "--data", str(data), "--output", str(out), *ARGS)
    assert code == 0, text
    assert (out / "model" / "homeforge.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert [p.name for p in ck.step_checkpoints(out)] == ["step-00000003", "step-00000006"]
    before = tree_bytes(out / "checkpoints")

    # starting again over an existing run is refused
    code, text = cli("train", "--data", str(data), "--output", str(out), *ARGS)
    assert code != 0 and "already holds checkpoints" in text and "--resume latest" in text
    # resuming with a different config is refused, naming the field
    code, text = cli("train", "--output", str(out), "--resume", "latest", "optim.lr=0.5")
    assert code != 0 and "optim.lr" in text and "different training config" in text
    # a resume path that is not a checkpoint
    code, text = cli("train", "--output", str(out), "--resume", str(out / "model"))
    assert code != 0 and "not a complete homeforge checkpoint" in text
    assert tree_bytes(out / "checkpoints") == before

    # resume from step 3 with the checkpoint's own config: reaches the same final weights
    from safetensors.torch import load_file

    first = load_file(str(out / "checkpoints" / "step-00000006" / "model.safetensors"))
    code, text = cli("train", "--output", str(out), "--resume", str(out / "checkpoints" / "step-00000003"))
    assert code == 0, text
    again = load_file(str(out / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert all((first[k] == again[k]).all() for k in first)


def test_bad_dataset_is_a_clear_error(tmp_path):
    code, text = cli("train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "run"), *ARGS)
    assert code == 2 and "does not exist" in text
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nproc_launches_torchrun(data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "homeforge", "train", "--nproc", "2", "--data", str(data), "--output", str(out),
           *ARGS, "max_steps=2", "micro_batch_size=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = ck.read_meta(ck.latest_checkpoint(out))
    assert meta["world_size"] == 2 and meta["samples"] == 2 * 2 * 2
    assert (out / "model" / "model.safetensors").is_file()


def test_ctrl_c_checkpoints_the_current_step_and_resume_finishes_the_same_run(data, tmp_path):
    import signal
    import time

    from safetensors.torch import load_file

    args = [*ARGS, "max_steps=150", "checkpoint.every=1000", "eval_every=1000", "schedule.warmup_steps=5"]
    out = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "homeforge", "train", "--data", str(data), "--output", str(out),
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    err = " ".join(err.split())  # the console wraps long lines
    assert "stopped on request" in err and "--resume latest" in err
    (stopped,) = ck.step_checkpoints(out)
    step = ck.read_meta(stopped)["step"]
    assert 5 <= step < 150

    code, text = cli("train", "--output", str(out), "--resume", "latest")
    assert code == 0, text
    code, text = cli("train", "--data", str(data), "--output", str(tmp_path / "straight"), *args)
    assert code == 0, text
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)  # interrupted at an arbitrary step + resumed == uninterrupted


def test_help_has_examples():
    code, text = cli("train", "--help")
    assert code == 0 and "Examples" in text and "--resume latest" in text and "--nproc" in text
