"""The whole loop through the real CLI and server: serve -> feedback -> learn -> candidate -> A/B -> promote ->
swap, and the audit log telling the story."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def env(tmp: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "HOMEFORGE_REGISTRY": str(tmp / "registry"),
            "HOMEFORGE_HOME": str(tmp / "home")}


def hf(tmp: Path, *args, code: int = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "homeforge", *map(str, args)], capture_output=True, text=True,
                       env=env(tmp), cwd=tmp, timeout=900)
    assert r.returncode == code, f"homeforge {' '.join(map(str, args))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


class Server:
    def __init__(self, tmp: Path, *args):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "homeforge", "serve", *args, "--port", str(self.port),
                                      "threads=1", "registry_poll=0.2"], cwd=tmp, env=env(tmp),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline, why = time.time() + 300, ""
        while True:
            assert self.proc.poll() is None and time.time() < deadline, f"{why}\n{self.output()}"
            try:
                r = httpx.get(f"{self.url}/ready", timeout=2)
                if r.status_code == 200 and self.candidate_ready():
                    return
                why = r.text
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def candidate_ready(self) -> bool:
        """With ab.candidate: the candidate answers too (its arm shows up within a few requests)."""
        if not any(a.startswith("ab.candidate=") for a in self.proc.args):
            return True
        for _ in range(8):
            r = httpx.post(f"{self.url}/v1/completions", json={"prompt": "a", "max_tokens": 1}, timeout=60).json()
            if r.get("arm") == "candidate":
                return True
        return False

    def output(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.communicate(timeout=60)[0]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


QUESTIONS = [f"What does the {w} function return?" for w in
             ("len", "sorted", "open", "format", "round", "zip", "map", "iter", "next", "repr", "hash", "abs",
              "min", "max", "sum", "any", "all", "chr", "ord", "divmod", "pow", "id", "dir", "vars")]


@pytest.mark.slow
def test_serve_feedback_learn_ab_promote_swap(tmp_path):
    from openai import OpenAI

    hf(tmp_path, "keys", "init")  # the feedback log is encrypted with it; every artifact below is signed with it
    hf(tmp_path, "prepare", "builtin:stdlib-docstrings", "--output", "data", "max_builtin_chars=200000",
       "tokenizer.vocab_size=512", "workers=1")
    tiny_dataset = tmp_path / "data"
    hf(tmp_path, "train", "--data", tiny_dataset, "--output", "champ", "model.preset=debug", "max_steps=4",
       "seq_len=64", "optim.lr=3e-3", "tracking.tensorboard=false", "threads=1")
    for_eval = ["robustness.enabled=false", "generation.enabled=false", "max_examples=40", "threads=1"]
    hf(tmp_path, "eval", "champ/model", "--data", tiny_dataset, *for_eval)
    hf(tmp_path, "registry", "register", "champ/model", "--name", "docs", "--eval", "champ/model-eval",
       "--alias", "champion")

    # 1. serve the champion with feedback capture; users ask, rate and correct
    fb = tmp_path / "feedback"
    srv = Server(tmp_path, "registry:docs@champion", "feedback.enabled=true", f"feedback.dir={fb}")
    try:
        api = OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=120)
        for q in QUESTIONS:
            r = api.chat.completions.create(model="docs", max_tokens=8, messages=[{"role": "user", "content": q}])
            fix = f"It returns the value of {q.split()[3]}; see the Python documentation for details."
            httpx.post(f"{srv.url}/v1/feedback", json={"id": r.id, "rating": 1, "correction": fix}).raise_for_status()
    finally:
        srv.stop()

    # 2. learn from the feedback with replay (+ EWC) -> candidate, evaluated on the same data as the champion
    out = hf(tmp_path, "learn", "docs", "--feedback", fb, "--output", "learn1", "replay.ratio=0.5", "ewc.lam=100",
             "train.max_steps=40", "train.seq_len=64", "train.optim.lr=3e-3", "train.threads=1").stdout
    assert "registered docs version 2 @candidate" in out, out
    man = json.loads((tmp_path / "learn1" / "model" / "homeforge.json").read_text())
    assert {"forgetting", "gain", "old_ppl_before", "new_ppl_after"} <= set(man["metrics"])
    assert (tmp_path / "learn1" / "model" / "ewc" / "fisher.safetensors").is_file()
    hf(tmp_path, "eval", "learn1/model", "--data", tiny_dataset, *for_eval)
    hf(tmp_path, "registry", "register", "learn1/model", "--name", "docs", "--eval", "learn1/model-eval")

    # 3. A/B: half the traffic to the candidate; users prefer its answers
    fb2 = tmp_path / "feedback-ab"
    srv = Server(tmp_path, "registry:docs@champion", "feedback.enabled=true", f"feedback.dir={fb2}",
                 "ab.candidate=registry:docs@candidate", "ab.percent=50")
    try:
        for _ in range(3):
            for q in QUESTIONS:
                r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
                    "model": "docs", "max_tokens": 6, "messages": [{"role": "user", "content": q}]}).json()
                score = 5 if r["arm"] == "candidate" else 2
                httpx.post(f"{srv.url}/v1/feedback", json={"id": r["id"], "rating": score}).raise_for_status()
        before = httpx.get(f"{srv.url}/v1/models").json()["data"][0]["version"]
        assert before.startswith("docs@v1-")
        rep = hf(tmp_path, "ab", "report", fb2, "--promote", "docs").stdout  # A/B significant -> the gate decides
        assert "candidate better" in rep and "promoted docs version 2" in rep, rep
        deadline = time.time() + 120
        while not httpx.get(f"{srv.url}/v1/models").json()["data"][0]["version"].startswith("docs@v2-"):
            assert time.time() < deadline, "the server did not swap to the promoted version"
            time.sleep(0.2)
    finally:
        srv.stop()

    # 4. the audit log tells the story, in order, and its chain is intact
    log = tmp_path / "home" / "audit" / "audit.jsonl"
    events = [json.loads(line).get("event") for line in log.read_text().splitlines() if line.strip()]
    story = ["registry-register", "learn", "registry-register", "ab-report", "registry-promote"]
    it = iter(events)
    assert all(any(e == s for e in it) for s in story), [e for e in events if e in story]
    hf(tmp_path, "audit", "verify")
    serve_lines = (tmp_path / "home" / "audit" / "serve.jsonl").read_text()
    assert '"arm": "candidate"' in serve_lines or '"arm":"candidate"' in serve_lines
