"""The gateway's managed upstream: `--backend vllm` starts `vllm serve` as a child, waits for its health,
captures its log and stops it on shutdown. vLLM needs a GPU and is not installed here, so a stand-in
`vllm` command on PATH runs a real `homeforge serve` with the arguments vLLM would get: the
child-management code runs for real (process, port, health wait, log, signals)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time

import httpx
import pytest

from homeforge.config import ServeConfig

from .conftest import ServeProcess, running_gateway

FAKE_VLLM = '''#!{python}
"""Stand-in for `vllm serve DIR --host H --port P --served-model-name N`: a real homeforge server."""
import json, os, sys
args = sys.argv[1:]
assert args[0] == "serve", args
opts = dict(zip(args[2::2], args[3::2]))
seen = {{k: os.environ.get(k) for k in ("VLLM_API_KEY", "VLLM_NO_USAGE_STATS", "HF_HUB_OFFLINE")}}
with open({record!r}, "w") as f:
    json.dump({{"argv": args, "env": seen}}, f)
os.environ["HOMEFORGE_HOME"] = {home!r}
os.execv(sys.executable, [sys.executable, "-m", "homeforge", "serve", args[1], "--host", opts["--host"],
                          "--port", opts["--port"], "--model-name", opts["--served-model-name"], "threads=1"])
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_backend_vllm_runs_vllm_serve_as_a_managed_child(tiny_model_dir, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "vllm-call.json"
    fake = bindir / "vllm"
    fake.write_text(FAKE_VLLM.format(python=sys.executable, record=str(record), home=str(tmp_path / "child-home")))
    fake.chmod(0o755)
    log = tmp_path / "vllm.log"
    gw = ServeProcess([tiny_model_dir, "--backend", "vllm", f"gateway.log_file={log}",
                       "gateway.extra_args=[--tensor-parallel-size, '1']"], tmp_path / "home",
                      env={"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}).start()
    try:
        gw.wait_ready(timeout=240)
        r = httpx.post(gw.url + "/v1/completions", json={"model": "tiny-llama", "prompt": "def", "max_tokens": 3},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
        assert [m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]] == ["tiny-llama"]
        call = json.loads(record.read_text())
        assert call["argv"][:2] == ["serve", str(tiny_model_dir)] and call["argv"][-2:] == ["--tensor-parallel-size", "1"]
        assert call["env"]["VLLM_NO_USAGE_STATS"] == "1" and call["env"]["HF_HUB_OFFLINE"] == "1"
        assert len(call["env"]["VLLM_API_KEY"] or "") >= 32  # only the gateway may use the child
        pid = int(re.search(r"started vllm serve \(pid (\d+)\)", gw.log_path.read_text()).group(1))
        assert _alive(pid) and log.stat().st_size > 0
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(90) == 0
        deadline = time.time() + 30
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "the managed child must stop with the gateway"
    finally:
        gw.stop()


def test_a_managed_command_that_dies_leaves_the_pool_with_its_reason(tiny_model_dir, tmp_path):
    """`gateway.command` (any OpenAI-compatible server; placeholders filled) as a child; killed: /ready says why."""
    cmd = [sys.executable, "-m", "homeforge", "serve", "{model_dir}", "--host", "{host}", "--port", "{port}",
           "--model-name", "{model_name}", "threads=1"]
    cfg = ServeConfig(model_dir=str(tiny_model_dir), keys_file=str(tmp_path / "keys.json"),
                      gateway={"command": cmd, "log_file": str(tmp_path / "child.log"), "health_interval": 0.3,
                               "max_backoff": 0.5})
    with running_gateway(cfg, timeout=240) as (base, st):
        r = httpx.post(base + "/v1/chat/completions", timeout=30,
                       json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        child = st.driver.managed
        assert child.proc.poll() is None
        child.proc.send_signal(signal.SIGKILL)
        deadline = time.time() + 15  # out of the pool at once; the reason names the exit at the next check
        while time.time() < deadline:
            r = httpx.get(base + "/ready")
            if r.status_code == 503 and "exited with code -9" in r.json()["error"]["message"]:
                break
            time.sleep(0.05)
        assert r.status_code == 503 and "exited with code -9" in r.json()["error"]["message"], r.text
        r = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 503 and r.headers.get("retry-after")
    assert (tmp_path / "child.log").stat().st_size > 0


@pytest.mark.skipif(shutil.which("vllm") is not None, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_says_what_to_do(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from homeforge.cli import app

    r = CliRunner().invoke(app, ["serve", str(tiny_model_dir), "--backend", "vllm", "--keys-file",
                                 str(tmp_path / "k.json")])
    text = r.exception.render()
    assert "`vllm` command is not installed" in text and "--upstream" in text and "HOMEFORGE_ALLOW_HOSTS" in text
