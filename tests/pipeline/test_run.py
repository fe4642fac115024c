"""`homeforge run` through the real CLI on a tiny folder: skip when unchanged, re-run downstream of a
change, resume after kill -9 (bit-identical), stop at a failed gate, and bad pipeline files."""

from __future__ import annotations

import ast
import hashlib
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

PIPELINE = {
    "workdir": "work",
    "prepare": {"inputs": ["docs"], "split": {"val": 0.15}, "tokenizer": {"vocab_size": 400}, "workers": 1},
    "train": {"model": {"preset": "debug"}, "max_steps": 12, "seq_len": 64, "eval_every": 6, "optim": {"lr": 3e-3},
              "checkpoint": {"every": 4}, "tracking": {"tensorboard": False}, "threads": 1},
    "eval": {"robustness": {"enabled": False}, "generation": {"enabled": False}, "gates": {"max_ppl": 1e9},
             "threads": 1},
    "register": {"name": "docs", "promote_to": "champion"},
}


def make_docs(folder: Path, n_docs: int = 30) -> None:
    folder.mkdir(parents=True)
    n = 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs = [ast.get_docstring(x) for x in ast.walk(tree) if isinstance(x, (ast.FunctionDef, ast.ClassDef))]
        text = "\n\n".join(d for d in docs if d and len(d) > 80)
        if len(text) > 2000:
            (folder / f"{f.stem}.md").write_text(text[:5000])
            n += 1
        if n == n_docs:
            return


def env(tmp: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "HOMEFORGE_REGISTRY": str(tmp / "registry")}


def hf(tmp: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "homeforge", *map(str, args)], capture_output=True, text=True,
                       env=env(tmp), cwd=tmp, timeout=600)
    if check:
        assert r.returncode == 0, f"homeforge {' '.join(map(str, args))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def write(tmp: Path, data: dict, name: str = "pipeline.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def ran(out: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if ln.startswith("pipeline done"))
    part = line.split("ran ", 1)[1].split(";")[0]
    return [] if part == "nothing" else part.split(", ")


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
def test_skip_rerun_downstream_and_gate(tmp_path):
    make_docs(tmp_path / "docs")
    write(tmp_path, PIPELINE)
    first = hf(tmp_path, "run", "pipeline.yaml")
    assert ran(first.stdout) == ["prepare", "train", "eval", "register"]
    assert "promoted docs version 1 to @champion" in first.stdout
    again = hf(tmp_path, "run", "pipeline.yaml")
    assert ran(again.stdout) == [] and again.stdout.count(": skipped, up to date") == 4
    dry = hf(tmp_path, "run", "pipeline.yaml", "--dry-run", "train.max_steps=16").stdout
    assert "prepare   skip" in dry and "train     would run" in dry and "eval      would run train runs first" in dry
    changed = hf(tmp_path, "run", "pipeline.yaml", "train.max_steps=16")
    assert ran(changed.stdout) == ["train", "eval", "register"]  # not prepare
    # a failed gate stops the pipeline: exit 3, the gate named, nothing after it ran
    gate = hf(tmp_path, "run", "pipeline.yaml", "train.max_steps=16", "eval.gates.max_ppl=1.5", check=False)
    assert gate.returncode == 3, gate.stdout + gate.stderr
    assert "stopped at stage eval" in gate.stderr and "max_ppl" in gate.stderr and "Traceback" not in gate.stderr
    assert "[3/3] register" not in gate.stdout


@pytest.mark.slow
def test_kill_9_during_train_resumes_to_the_same_model(tmp_path):
    make_docs(tmp_path / "docs")
    long = {**PIPELINE, "train": {**PIPELINE["train"], "max_steps": 80}}
    long.pop("register")
    write(tmp_path, long)
    write(tmp_path, {**long, "workdir": "straight"}, "straight.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "homeforge", "run", "pipeline.yaml"], cwd=tmp_path, env=env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "work" / "train" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.is_dir() and any(p.name == "step-00000024" for p in ckpts.iterdir())):
        assert proc.poll() is None, "the pipeline ended before it could be killed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "work" / "train" / "model").exists()
    dry = hf(tmp_path, "run", "pipeline.yaml", "--dry-run").stdout
    assert "prepare   skip" in dry and "resumes from checkpoint step-" in dry
    resumed = hf(tmp_path, "run", "pipeline.yaml")
    assert ran(resumed.stdout) == ["train", "eval"] and "resuming from checkpoint" in resumed.stdout
    hf(tmp_path, "run", "straight.yaml")
    a, b = tmp_path / "work/train/model/model.safetensors", tmp_path / "straight/train/model/model.safetensors"
    assert sha(a) == sha(b)  # bit-identical to the uninterrupted run
    assert ran(hf(tmp_path, "run", "pipeline.yaml").stdout) == []


# --------------------------------------------------------------------------- bad pipeline files (no training)


def test_unknown_stage_key_names_the_line(tmp_path):
    (tmp_path / "p.yaml").write_text("workdir: w\nprepare:\n  inputs: [docs]\ntrian:\n  max_steps: 3\n")
    r = hf(tmp_path, "run", "p.yaml", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "trian: unknown key" in r.stderr and "did you mean 'train'" in r.stderr and "p.yaml:4" in r.stderr


def test_bad_stage_value_names_the_line(tmp_path):
    (tmp_path / "p.yaml").write_text("prepare:\n  inputs: [docs]\ntrain:\n  max_steps: -3\n")
    r = hf(tmp_path, "run", "p.yaml", check=False)
    assert r.returncode == 2 and "train.max_steps" in r.stderr and "p.yaml:4" in r.stderr


def test_cycle_is_refused(tmp_path):
    (tmp_path / "p.yaml").write_text("train: {data: d}\ncompress: {model: export, data: d}\n"
                                     "export: {model: compress}\n")
    r = hf(tmp_path, "run", "p.yaml", "--dry-run", check=False)
    assert r.returncode == 2 and "cycle" in r.stderr and "compress -> export" in r.stderr


def test_missing_artifact_and_stage_links(tmp_path):
    (tmp_path / "p.yaml").write_text("eval:\n  model: nowhere/model\n  data: nowhere/data\n")
    r = hf(tmp_path, "run", "p.yaml", check=False)
    assert r.returncode == 2 and "eval.model" in r.stderr and "does not exist" in r.stderr and "p.yaml:2" in r.stderr
    (tmp_path / "q.yaml").write_text("train:\n  max_steps: 3\neval:\n  data: prepare\n")
    r = hf(tmp_path, "run", "q.yaml", check=False)
    assert r.returncode == 2 and "stage 'prepare' is not in this pipeline" in r.stderr and "q.yaml:4" in r.stderr
    assert "train.data: no dataset to read" in r.stderr


def test_init_writes_a_pipeline_that_loads(tmp_path):
    make_docs(tmp_path / "notes", n_docs=3)
    hf(tmp_path, "run", "--init", "notes")
    text = (tmp_path / "pipeline.yaml").read_text()
    assert "inputs: [notes]" in text and "# " in text
    dry = hf(tmp_path, "run", "pipeline.yaml", "--dry-run").stdout
    for stage in ("prepare", "train", "eval", "compress", "export", "register", "serve"):
        assert stage in dry
    assert "prepare   would run no artifact yet" in dry
    again = hf(tmp_path, "run", "--init", "notes", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_from_until_checked(tmp_path):
    (tmp_path / "p.yaml").write_text("prepare: {inputs: [docs]}\ntrain: {max_steps: 3}\n")
    r = hf(tmp_path, "run", "p.yaml", "--until", "serve", "--dry-run", check=False)
    assert r.returncode == 2 and "--until serve: no such stage" in r.stderr
    r = hf(tmp_path, "run", "p.yaml", "--from", "train", "--dry-run")
    assert [ln.split()[0] for ln in r.stdout.splitlines()] == ["train"]
    assert "reads the prepare stage's artifact" in r.stdout  # what --from leaves out must exist
