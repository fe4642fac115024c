"""Slow: the gateway in front of llama.cpp's real `llama-server` (a GGUF of the tiny model made with
llama.cpp's own converter), with the upstream's API key: streams relayed token for token, the same
greedy tokens as transformers, usage from the upstream, keys at the gateway, a clean error when the
upstream dies.

llama.cpp is found through ``benchmarks/llamacpp.py`` when present (it builds it once, outside the
repo), else through ``HOMEFORGE_LLAMA_SERVER`` = the path of a built ``llama-server`` inside a
llama.cpp source tree (the converter is taken from that tree); without either the test is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from homeforge.config import ServeConfig
from homeforge.serve.auth import KeyStore

from .conftest import free_port, running_gateway
from .test_gateway import sse

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

# llama.cpp's converter, run in its own process; a byte-level BPE trained here has no entry in its
# table of pre-tokenizer hashes, and GPT-2's pre-tokenizer is the one it uses
RUNNER = '''
import os, runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, os.path.join(src, "gguf-py")]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(os.path.join(src, "convert_hf_to_gguf.py"), run_name="__main__")
'''


def _llamacpp() -> tuple[Path, Path]:
    """(llama-server binary, llama.cpp source tree) or skip."""
    helper = ROOT / "benchmarks" / "llamacpp.py"
    if helper.is_file():
        sys.path.insert(0, str(helper.parent))
        try:
            import llamacpp

            try:
                bindir = llamacpp.build()
                return bindir / "llama-server", llamacpp.source_dir()
            except llamacpp.Unavailable as exc:
                pytest.skip(f"llama.cpp unavailable: {exc}")
        finally:
            sys.path.remove(str(helper.parent))
    env = os.environ.get("HOMEFORGE_LLAMA_SERVER")
    if not env:
        pytest.skip("llama.cpp's llama-server not found: set HOMEFORGE_LLAMA_SERVER to a built llama-server "
                    "(inside its llama.cpp source tree, e.g. .../llama.cpp/build/bin/llama-server)")
    binary = Path(env).expanduser()
    src = binary.resolve().parents[2]
    if not binary.is_file() or not (src / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"HOMEFORGE_LLAMA_SERVER={env}: not a llama-server inside a llama.cpp tree with its converter")
    return binary, src


@pytest.fixture(scope="module")
def llama_server(request, tmp_path_factory):
    binary, src = _llamacpp()  # skip before building anything
    tiny_model_dir = request.getfixturevalue("tiny_model_dir")
    root = tmp_path_factory.mktemp("llamacpp")
    gguf = root / "tiny-f32.gguf"
    runner = root / "convert.py"
    runner.write_text(RUNNER)
    r = subprocess.run([sys.executable, str(runner), str(src), str(tiny_model_dir), "--outtype", "f32", "--outfile",
                        str(gguf)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_LOCAL_GGUF": "", "PYTHONPATH": ""})
    assert r.returncode == 0 and gguf.is_file(), r.stderr[-3000:]
    key = "llama-upstream-key-123"
    (root / "upstream.key").write_text(key + "\n")
    port = free_port()
    log = open(root / "llama-server.log", "w")
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", "2",
                             "-c", "512", "--threads", "1", "--api-key", key], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (root / "llama-server.log").read_text()[-2000:]
        time.sleep(0.2)
    try:
        yield url, key, root / "upstream.key", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        log.close()


def test_gateway_in_front_of_llama_server(llama_server, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    url, key, key_file, proc = llama_server
    store = KeyStore.open(tmp_path / "keys.json")
    user = store.add("app", "user", tokens_per_minute=100_000)[1]
    hdr = {"Authorization": f"Bearer {user}"}
    cfg = ServeConfig(model_dir=str(tiny_model_dir), keys_file=str(tmp_path / "keys.json"),
                      upstreams=[{"url": url, "key_file": str(key_file)}],
                      gateway={"health_interval": 0.3, "max_backoff": 0.5})
    body = {"prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    direct = sse(url + "/v1/completions", body, {"Authorization": f"Bearer {key}"})
    assert direct["status"] == 200 and len(direct["pieces"]) >= 6, direct
    with running_gateway(cfg, keys=store) as (base, st):
        assert [m["id"] for m in httpx.get(base + "/v1/models", headers=hdr).json()["data"]] == ["tiny-llama"]
        assert httpx.post(base + "/v1/completions", json=body).status_code == 401
        via = sse(base + "/v1/completions", body, hdr)
        assert via["pieces"] == direct["pieces"] and via["finish"] == direct["finish"] and via["done"]
        assert via["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"] == 12

        # the same greedy tokens as transformers on the original model (llama.cpp f32 = torch fp32)
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        ids = tok(body["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        want = tok.decode(out[0, ids.shape[1]:])
        want = want.rstrip("\ufffd")  # a last token that ends inside a UTF-8 character
        assert len(want) >= 4 and "".join(via["pieces"]).startswith(want), (via["pieces"], want)

        chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(base + "/v1/chat/completions", json=chat, headers=hdr, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text
        kid = store.verify(user).id
        time.sleep(0.2)
        assert sum(n for _, n in st.limiter._tokens[kid]) == via["usage"]["total_tokens"] + \
            r.json()["usage"]["total_tokens"]

        proc.kill()  # the only upstream dies: a clean 503/502, never a hang
        proc.wait(10)
        r = httpx.post(base + "/v1/completions", json=body, headers=hdr, timeout=60)
        assert r.status_code in (502, 503) and r.json()["error"]["type"] in ("service_unavailable", "server_error")
