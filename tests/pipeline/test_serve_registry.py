"""`homeforge serve registry:NAME@champion` (a real server on loopback) follows promotions and rollbacks
while 16 official-client streaming clients run: no failed or truncated response, each wholly from one
version (its system_fingerprint), both versions served."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

from .test_run import env, hf


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_version(url: str) -> str | None:
    data = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return data[0].get("version") if data else None


@pytest.mark.slow
def test_swaps_under_streaming_load(two_models, tmp_path):
    from openai import OpenAI

    _, m = two_models
    (weak, weak_eval), (strong, strong_eval) = m["weak"], m["strong"]
    hf(tmp_path, "registry", "register", weak, "--name", "docs", "--eval", weak_eval, "--alias", "champion")
    hf(tmp_path, "registry", "register", strong, "--name", "docs", "--eval", strong_eval)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "homeforge", "serve", "registry:docs@champion", "--port", str(port),
                             "threads=1", "registry_poll=0.2", "max_batch_size=16"], cwd=tmp_path, env=env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        v1 = served_version(url)
        assert v1 and v1.startswith("docs@v1-")
        stop = threading.Event()
        results: list[dict] = []
        failures: list[str] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            api = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
            while not stop.is_set():
                try:
                    fps, text, finish, usage = set(), "", None, None
                    stream = api.completions.create(model="docs", prompt="Return the", max_tokens=24, stream=True,
                                                    temperature=0, stream_options={"include_usage": True})
                    for chunk in stream:
                        fps.add(chunk.system_fingerprint)
                        if chunk.choices:
                            text += chunk.choices[0].text
                            finish = chunk.choices[0].finish_reason or finish
                        if chunk.usage is not None:
                            usage = chunk.usage
                    ok = finish in ("length", "stop") and usage is not None and usage.completion_tokens >= 1
                    with lock:
                        results.append({"fps": fps, "ok": ok, "end": time.time()})
                        if not ok:
                            failures.append(f"client {i}: truncated (finish {finish}, usage {usage})")
                except Exception as exc:  # noqa: BLE001 - any failure is what the test counts
                    with lock:
                        failures.append(f"client {i}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()

        def wait_for(version_prefix: str) -> float:
            t_end = time.time() + 90
            while time.time() < t_end:
                v = served_version(url)
                if v and v.startswith(version_prefix):
                    return time.time()
                time.sleep(0.1)
            raise AssertionError(f"the server did not swap to {version_prefix}")

        time.sleep(3)
        promoted = hf(tmp_path, "registry", "promote", "docs").stdout
        assert "promoted docs version 2" in promoted
        t_swap1 = wait_for("docs@v2-")
        time.sleep(3)
        hf(tmp_path, "registry", "rollback", "docs")
        t_swap2 = wait_for("docs@v1-")
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not failures, failures[:5]
        assert all(len(r["fps"]) == 1 for r in results)  # every response wholly from one version
        seen = {next(iter(r["fps"])) for r in results}
        assert {v for v in seen if v.startswith("docs@v1-")} and {v for v in seen if v.startswith("docs@v2-")}
        after = [r for r in results if r["end"] > t_swap2 + 1]
        assert after and all(next(iter(r["fps"])).startswith("docs@v1-") for r in after)
        between = [r for r in results if t_swap1 + 1 < r["end"] < t_swap2]
        assert between and any(next(iter(r["fps"])).startswith("docs@v2-") for r in between)
        assert len(results) >= 32
    finally:
        proc.terminate()
        proc.wait(timeout=60)
